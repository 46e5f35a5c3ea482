"""P2 for the mask RoIs (config.roi_min_level = 2, RetinaMask's p2p7 variant).

* the FPN's P2 = smooth2(lateral2(C2) + up2(t3)): its forward against a
  direct NumPy computation, its backward against centred differences;
* a micro RetinaMask with P2: the total loss's gradient w.r.t. lateral2,
  smooth2 and a stage-1 parameter, against centred differences (GroupNorm
  and frozen-BN backbones); only the mask branch reads P2;
* eq. (1)'s levels with min level 2, on hand-computed boxes;
* config validation of the levels;
* with roi_min_level >= 3 nothing changed: the names, initial weights, loss
  and gradients of a micro model equal those the code computed before P2
  existed (tests/golden/fpn_p3_reference.npz, see make_p3_reference.py);
* a checkpoint with P2 round-trips; one without P2 does not load into a
  model with P2 (a clear error);
* on "cuda" (the simulator in CI) a step with P2 equals "cpu".
"""
import hashlib
from pathlib import Path

import numpy as np
import pytest

import minimask
from minimask._cuda import cuda_available
from minimask.gradcheck import numerical_gradient, rel_error
from minimask.model import Config, RetinaMask
from minimask.model.fpn import FPN
from tests.test_model import micro_config, scene

GOLDEN = Path(__file__).parent / "golden" / "fpn_p3_reference.npz"


# ----------------------------------------------------------------------
# the FPN
# ----------------------------------------------------------------------

def _conv(x, w, b, pad):
    """Stride-1 convolution written out directly (the reference)."""
    N, C, H, W = x.shape
    F, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    Ho, Wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    out = np.zeros((N, F, Ho, Wo)) + b[None, :, None, None]
    for i in range(k):
        for j in range(k):
            out += np.einsum("fc,nchw->nfhw", w[:, :, i, j], xp[:, :, i:i + Ho, j:j + Wo])
    return out


def _up(x, H, W):
    return x.repeat(2, axis=2).repeat(2, axis=3)[:, :, :H, :W]


def _feats(rng, odd=True):
    # C2 15 x 11: the doubled C3 (16 x 12) is cropped, as for an odd image side
    shapes = [(2, 2, 15, 11) if odd else (2, 2, 16, 12), (2, 3, 8, 6), (2, 4, 4, 3),
              (2, 5, 2, 2)]
    return [rng.standard_normal(s) for s in shapes]


def test_fpn_builds_p2_as_the_formula_says_and_p3_p7_as_before():
    rng = np.random.default_rng(0)
    fpn = FPN((2, 3, 4, 5), 3, rng=np.random.default_rng(1), dtype=np.float64)
    plain = FPN((3, 4, 5), 3, rng=np.random.default_rng(1), dtype=np.float64)
    assert fpn.with_p2 and not plain.with_p2 and not hasattr(plain, "lateral2")
    # the P2 convs come from a child generator: the other weights are the same
    names = [n for n, _ in plain.named_parameters()]
    assert [n for n, _ in fpn.named_parameters()] == names + [
        "lateral2.weight", "lateral2.bias", "smooth2.weight", "smooth2.bias"]
    for (n, a), (_, b) in zip(plain.named_parameters(), fpn.named_parameters()):
        np.testing.assert_array_equal(a.value, b.value, err_msg=n)
    for p in fpn.parameters():      # non-zero biases, so that a dropped bias shows
        p.value[...] = rng.standard_normal(p.value.shape)
    for (n, a), (_, b) in zip(plain.named_parameters(), fpn.named_parameters()):
        a.value[...] = b.value
    C = _feats(rng)
    P, _ = fpn.forward(C)
    Q, _ = plain.forward(C[1:])
    assert len(P) == 6 and P[0].shape == (2, 3, 15, 11)
    for a, b in zip(P[1:], Q):
        np.testing.assert_array_equal(a, b)
    # P2 written out: t3 = lateral3(C3) + up(lateral4(C4) + up(lateral5(C5)))
    v = {n: p.value for n, p in fpn.named_parameters()}
    l5 = _conv(C[3], v["lateral5.weight"], v["lateral5.bias"], 0)
    t4 = _conv(C[2], v["lateral4.weight"], v["lateral4.bias"], 0) + _up(l5, 4, 3)
    t3 = _conv(C[1], v["lateral3.weight"], v["lateral3.bias"], 0) + _up(t4, 8, 6)
    t2 = _conv(C[0], v["lateral2.weight"], v["lateral2.bias"], 0) + _up(t3, 15, 11)
    np.testing.assert_allclose(P[0], _conv(t2, v["smooth2.weight"], v["smooth2.bias"], 1),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(P[1], _conv(t3, v["smooth3.weight"], v["smooth3.bias"], 1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("odd", [True, False], ids=["cropped", "even"])
def test_fpn_with_p2_gradient(odd):
    """Random upstream gradients on all six outputs P2..P7; the gradients of
    C2..C5 and of the P2 convolutions against centred differences."""
    rng = np.random.default_rng(5)
    fpn = FPN((2, 3, 4, 5), 3, rng=rng, dtype=np.float64)
    for p in fpn.parameters():
        p.value[...] = rng.standard_normal(p.value.shape) * 0.5
    C = _feats(rng, odd)
    P, cache = fpn.forward(C)
    dP = [rng.standard_normal(p.shape) for p in P]
    fpn.zero_grad()
    dC = fpn.backward(dP, cache)
    assert [d.shape for d in dC] == [c.shape for c in C]
    d_flat = np.concatenate([d.ravel() for d in dP])

    def outputs():
        return np.concatenate([p.ravel() for p in fpn.forward(C)[0]])
    for i in range(4):
        err = rel_error(dC[i], numerical_gradient(outputs, C[i], d_flat))
        assert err < 1e-6, (i, err)
    params = dict(fpn.named_parameters())
    for name in ("lateral2.weight", "lateral2.bias", "smooth2.weight", "smooth2.bias",
                 "lateral3.weight", "smooth3.weight"):
        p = params[name]
        err = rel_error(p.grad, numerical_gradient(outputs, p.value, d_flat))
        assert np.any(p.grad != 0) and err < 1e-6, (name, err)


def test_fpn_refuses_a_wrong_number_of_input_widths():
    with pytest.raises(ValueError, match="C3..C5 .3. or C2..C5 .4."):
        FPN((2, 3), 3, rng=np.random.default_rng(0))


# ----------------------------------------------------------------------
# the whole model
# ----------------------------------------------------------------------

# canonical_size 24 at level 3: the scene's boxes (34 x 20 and 16 x 28 px)
# go to P3 and P2 by eq. (1): floor(3 + log2(26.1 / 24)) = 3,
# floor(3 + log2(21.2 / 24)) = 2
P2_LEVELS = dict(roi_min_level=2, canonical_level=3, canonical_size=24)
BACKBONES = {
    "gn": (dict(), "backbone.stages.0.layers.0.branch.layers.0.weight"),
    "frozenbn": (dict(backbone="frozenbn", stem_kernel=7, trainable_stages=4),
                 "backbone.layer1.0.conv1.weight"),
}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_micro_model_gradient_check_with_p2(backbone):
    extra, stage1 = BACKBONES[backbone]
    names = ["fpn.lateral2.weight", "fpn.lateral2.bias", "fpn.smooth2.weight",
             "fpn.smooth2.bias", stage1, "fpn.smooth3.weight", "mask_head.tower.layers.0.weight"]
    with minimask.using_backend("numpy"):
        model = RetinaMask(micro_config(mask_rois_from_detections=False, **P2_LEVELS, **extra))
        assert model.pooler.first_level == 2
        images, targets = scene()
        assert model.pooler.levels_of(targets[0]["boxes"]).tolist() == [3, 2]
        model.loss(images, targets)
        params = dict(model.named_parameters())
        rng = np.random.default_rng(0)
        analytic, numeric = [], []
        h = 1e-6
        for name in names:
            p = params[name]
            assert np.any(p.grad != 0), name
            for _ in range(3):
                i = tuple(int(rng.integers(0, s)) for s in p.value.shape)
                analytic.append(p.grad[i])
                old = p.value[i]
                p.value[i] = old + h
                plus = model.loss(images, targets)["total"]
                p.value[i] = old - h
                minus = model.loss(images, targets)["total"]
                p.value[i] = old
                numeric.append((plus - minus) / (2 * h))
    err = rel_error(np.array(analytic), np.array(numeric))
    assert err < 1e-6, (err, analytic, numeric)


def test_only_the_mask_branch_reads_p2():
    with minimask.using_backend("numpy"):
        model = RetinaMask(micro_config(mask_rois_from_detections=False, **P2_LEVELS))
        images, targets = scene()
        model.loss(images, targets, terms=("cls", "box"))
        for name in ("fpn.lateral2.weight", "fpn.smooth2.weight", "fpn.smooth2.bias"):
            assert np.all(dict(model.named_parameters())[name].grad == 0), name
        model.loss(images, targets, terms=("mask",))
        for name in ("fpn.lateral2.weight", "fpn.smooth2.weight", "fpn.smooth2.bias"):
            assert np.any(dict(model.named_parameters())[name].grad != 0), name
        # the dense heads see the same P3..P7 as a model without P2: every
        # parameter they share starts equal, and the dense outputs are the same
        plain = RetinaMask(micro_config(mask_rois_from_detections=False,
                                        **{**P2_LEVELS, "roi_min_level": 3}))
        shared = plain.state_dict()
        full = model.state_dict()
        assert set(full) - set(shared) == {"fpn.lateral2.weight", "fpn.lateral2.bias",
                                           "fpn.smooth2.weight", "fpn.smooth2.bias"}
        x = model.normalize_images(images)
        P, logits, deltas, _ = model._forward_dense(x)
        Q, logits0, deltas0, _ = plain._forward_dense(x)
        assert len(P) == len(Q) == 5
        for a, b in zip(P, Q):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(logits, logits0)
        np.testing.assert_array_equal(deltas, deltas0)


def test_roi_min_level_2_with_no_roi_on_p2_gives_the_same_loss_and_gradients():
    """All RoIs at P3 or above (canonical level 4): P2 gets a zero gradient,
    and every shared parameter's gradient equals the model without P2's."""
    with minimask.using_backend("numpy"):
        a = RetinaMask(micro_config(roi_min_level=2))
        b = RetinaMask(micro_config(roi_min_level=3))
        images, targets = scene()
        assert a.pooler.levels_of(targets[0]["boxes"]).min() >= 3
        la, lb = a.loss(images, targets), b.loss(images, targets)
    assert la == lb
    ga = dict(a.named_parameters())
    for name, p in b.named_parameters():
        np.testing.assert_array_equal(ga[name].grad, p.grad, err_msg=name)
    assert np.all(ga["fpn.smooth2.weight"].grad == 0)


def test_predict_reads_p2_for_the_masks_of_small_detections_only():
    """Changing smooth2's bias changes the masks of the detections eq. (1)
    sends to P2, and nothing else: not the boxes, scores, labels, nor the
    masks read from P3 and above."""
    model = RetinaMask(micro_config(dtype="float32", score_thresh=0.0, detections_per_image=40,
                                    **P2_LEVELS))
    images = scene()[0].astype(np.float32)
    (a,) = model.predict(images, return_probabilities=True)
    levels = model.pooler.levels_of(a["boxes"].astype(np.float64))
    assert np.any(levels == 2) and np.any(levels >= 3), levels
    model.fpn.smooth2.bias.value += 0.5
    (b,) = model.predict(images, return_probabilities=True)
    for key in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(a[key], b[key])
    on_p2 = levels == 2
    np.testing.assert_array_equal(a["class_masks"][~on_p2], b["class_masks"][~on_p2])
    assert np.all(np.abs(a["class_masks"][on_p2] - b["class_masks"][on_p2]).max(axis=(1, 2, 3))
                  > 0)


# ----------------------------------------------------------------------
# eq. (1) and the config
# ----------------------------------------------------------------------

def test_levels_of_eq1_with_min_level_2():
    """The tiny preset's eq. (1), k = floor(4 + log2(sqrt(w h) / 56)), on
    boxes whose levels are worked out by hand."""
    model = RetinaMask(Config.preset("tiny", roi_min_level=2, roi_max_level=5,
                                     canonical_level=4))
    pooler = model.pooler
    assert (pooler.min_level, pooler.max_level, pooler.first_level) == (2, 5, 2)
    boxes = np.array([
        [0, 0, 5, 40],      # a thin bar: sqrt(200) = 14.1, 4 + log2(0.253) = 2.01 -> 2
        [0, 0, 14, 14],     # 4 + log2(1/4) = 2 exactly -> 2
        [0, 0, 10, 10],     # 4 + log2(0.179) = 1.51 -> 1, clamped to 2
        [0, 0, 27, 27],     # 4 + log2(0.482) = 2.95 -> 2
        [0, 0, 28, 28],     # 4 + log2(1/2) = 3 exactly -> 3
        [0, 0, 8, 98],      # sqrt(784) = 28 -> 3
        [0, 0, 56, 56],     # -> 4
        [0, 0, 120, 120],   # 4 + log2(2.14) = 5.1 -> 5
        [0, 0, 400, 400],   # -> 6.8, clamped to 5
    ], float)
    assert pooler.levels_of(boxes).tolist() == [2, 2, 2, 2, 3, 3, 4, 5, 5]
    # without P2 the same boxes stop at P3
    plain = RetinaMask(Config.preset("tiny", roi_min_level=3, roi_max_level=5,
                                     canonical_level=4)).pooler
    assert plain.first_level == 3
    assert plain.levels_of(boxes).tolist() == [3, 3, 3, 3, 3, 3, 4, 5, 5]


def test_the_pooler_reads_p2_for_level_2_rois():
    """A RoI of level 2 is pooled from levels[0] (P2) at scale 1/4, one of
    level 3 from levels[1] at 1/8: each map holds a distinct constant."""
    model = RetinaMask(Config.preset("tiny", roi_min_level=2, roi_max_level=5,
                                     canonical_level=4))
    levels = [np.full((1, 2, 32 // 2 ** i, 32 // 2 ** i), float(10 + i), np.float32)
              for i in range(6)]
    rois = np.array([[0, 10, 10, 24, 24], [0, 0, 0, 40, 40]], np.float32)
    assert model.pooler.levels_of(rois[:, 1:]).tolist() == [2, 3]
    out, _ = model.pooler.forward(levels, rois)
    np.testing.assert_allclose(out[0], 10.0, rtol=1e-6)
    np.testing.assert_allclose(out[1], 11.0, rtol=1e-6)


@pytest.mark.parametrize("fields, message", [
    (dict(roi_min_level=1), r"'roi_min_level' must be an integer in \[2, 7\], got 1"),
    (dict(roi_min_level=2, canonical_level=1), r"'canonical_level' must be an integer in \[2, 7\]"),
    (dict(canonical_level=8), r"'canonical_level' must be an integer in \[2, 7\], got 8"),
    (dict(roi_min_level=3, canonical_level=2),
     r"'canonical_level' \(2\) must lie within roi_min_level"),
    (dict(roi_min_level=6, roi_max_level=5), r"range of levels within P2..P7"),
])
def test_config_refuses_levels_outside_the_pyramid(fields, message):
    with pytest.raises(ValueError, match=message):
        Config.preset("tiny", **fields)


def test_the_tiny_preset_reads_every_mask_roi_of_a_128px_image_from_p2():
    """Issue 11's study chose P2 for the tiny preset's masks: eq. (1) with
    canonical size 56 at level 2, clamped to P2..P3."""
    c = Config.preset("tiny")
    assert (c.roi_min_level, c.roi_max_level, c.canonical_level) == (2, 3, 2)
    model = RetinaMask(c)
    assert model.fpn.with_p2 and model.pooler.first_level == 2
    # floor(2 + log2(sqrt(w h) / 56)): below 112 px -> 2, from 112 px -> 3
    boxes = np.array([[0, 0, 5, 100], [0, 0, 111, 111], [0, 0, 112, 112], [0, 0, 128, 128],
                      [0, 0, 4, 4]], float)
    assert model.pooler.levels_of(boxes).tolist() == [2, 2, 3, 3, 2]
    # the preset before the study, as weights/README.md's table starts from
    old = RetinaMask(Config.preset("tiny", roi_min_level=3, roi_max_level=5, canonical_level=4))
    assert not old.fpn.with_p2 and old.pooler.first_level == 3


# ----------------------------------------------------------------------
# roi_min_level >= 3: the same model as before P2 existed
# ----------------------------------------------------------------------

@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_without_p2_the_model_is_the_one_before(backbone):
    """Names, order and initial bytes (exact: NumPy's generators give the
    same bits everywhere); losses and gradients up to round-off (the
    reference was bit-identical on the machine that made it, but another
    CPU's BLAS may round differently)."""
    ref = np.load(GOLDEN)
    extra, _ = BACKBONES[backbone]
    with minimask.using_backend("numpy"):
        model = RetinaMask(micro_config(**extra))
        state = model.state_dict()
        assert list(state) == ref[f"{backbone}/names"].tolist()
        h = hashlib.sha256()
        for name, value in state.items():
            h.update(name.encode())
            h.update(np.ascontiguousarray(value).tobytes())
        assert h.hexdigest() == str(ref[f"{backbone}/init_sha256"])
        images, targets = scene()
        losses = model.loss(images, targets)
    np.testing.assert_allclose([losses[k] for k in ("cls", "box", "mask", "total")],
                               ref[f"{backbone}/losses"], rtol=1e-12, atol=0)
    for name, p in model.named_parameters():
        expected = ref[f"{backbone}/grad/{name}"]
        np.testing.assert_allclose(p.grad, expected, rtol=1e-9,
                                   atol=1e-12 * max(1.0, np.abs(expected).max()), err_msg=name)


# ----------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------

def test_checkpoint_round_trip_with_p2(tmp_path):
    from minimask.nn import SGD
    from minimask.train import TrainSettings, load_model, save_checkpoint
    config = micro_config(**P2_LEVELS)
    model = RetinaMask(config)
    rng = np.random.default_rng(2)
    for p in model.parameters():
        p.value += rng.normal(0, 0.05, p.value.shape)
    save_checkpoint(tmp_path, model, SGD(model.parameters(), lr=0.1), 3, TrainSettings())
    loaded, meta = load_model(tmp_path / "checkpoint.npz")
    assert loaded.config == config and loaded.fpn.with_p2 and meta["step"] == 3
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        np.testing.assert_array_equal(a.value, b.value, err_msg=n)
    images, targets = scene()
    with minimask.using_backend("numpy"):
        assert model.loss(images, targets) == loaded.loss(images, targets)
    # weights without P2 do not fit a model with P2: a clear error, not a crash
    plain = RetinaMask(micro_config())
    with pytest.raises(ValueError, match="lateral2"):
        loaded.load_state_dict(plain.state_dict())


# ----------------------------------------------------------------------
# cuda (the simulator in CI) equals cpu with P2
# ----------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="runs in the GPU / simulator run (-m cuda)")
def test_cuda_step_with_p2_equals_cpu():
    from tests.test_device_step import host, micro_batch, micro_config as device_micro

    def model():
        # canonical size 8 at level 3: the two boxes (10 x 10, 8 x 5) go to P3 and P2
        c = device_micro()
        c = Config.from_dict({**c.to_dict(), "roi_min_level": 2, "canonical_level": 3,
                              "canonical_size": 8})
        m = RetinaMask(c)
        rng = np.random.default_rng(123)
        for p in m.parameters():
            p.value += rng.normal(0, 0.05, p.value.shape)
        return m

    images, targets = micro_batch(np.float64)
    results = {}
    for backend in ("cpu", "cuda"):
        m = model()
        assert m.pooler.levels_of(np.concatenate([t["boxes"] for t in targets])).tolist() == [3, 2]
        with minimask.using_backend(backend):
            out = m.loss(images, targets)
            results[backend] = (out, {n: host(p.grad) for n, p in m.named_parameters()})
    (cpu, gcpu), (gpu, ggpu) = results["cpu"], results["cuda"]
    for k in ("cls", "box", "mask", "total"):
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-9), k
    assert np.any(gcpu["fpn.smooth2.weight"] != 0)
    for name, g in gcpu.items():
        np.testing.assert_allclose(ggpu[name], g, rtol=1e-9, atol=1e-12, err_msg=name)


def test_an_imported_retinanet_takes_a_p2_for_the_masks():
    """torchvision's RetinaNet has no P2: imported into a model with
    roi_min_level=2, its P3..P7 are the golden ones and the P2 convs start
    from their initial values, as the mask head does."""
    from tests.test_pretrained import GOLDEN as TV_GOLDEN, golden_model
    model, report = golden_model(roi_min_level=2, canonical_level=4)
    assert model.fpn.with_p2 and not report["skipped"]
    assert {"fpn.lateral2.weight", "fpn.smooth2.bias"} <= set(report["initialised"])
    assert all(n.startswith(("mask_head.", "fpn.lateral2.", "fpn.smooth2."))
               for n in report["initialised"])
    ref = np.load(TV_GOLDEN / "retinanet_narrow_outputs.npz")
    P, _ = model.fpn.forward(model.backbone.forward(ref["x"].astype(np.float64))[0])
    assert len(P) == 6
    for i, p in enumerate(P[1:]):
        assert rel_error(p, ref[f"P{3 + i}"]) < 1e-6, i


def test_a_model_with_p2_trains_on_an_image_of_odd_size():
    """100 x 74 px: C2 is 25 x 19, the doubled C3 26 x 20 is cropped."""
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 0.2, (1, 3, 100, 74))
    masks = np.zeros((1, 100, 74), bool)
    masks[0, 30:46, 20:28] = True
    targets = [{"boxes": np.array([[20, 30, 28, 46.0]]), "labels": np.array([1]), "masks": masks}]
    with minimask.using_backend("numpy"):
        model = RetinaMask(micro_config(mask_rois_from_detections=False, **P2_LEVELS))
        assert model.pooler.levels_of(targets[0]["boxes"]).tolist() == [2]
        out = model.loss(image, targets)
    assert np.isfinite(out["total"]) and out["num_mask_rois"] == 1
    assert np.any(model.fpn.smooth2.weight.grad != 0)
