"""The assembled detector: shapes, the whole-model gradient check, the mask
loss reaching the backbone, bad input, and an overfit run."""
import numpy as np
import pytest

import minimask
from minimask.gradcheck import rel_error
from minimask.model import Config, RetinaMask


def micro_config(**overrides):
    """The smallest model with every part of the real one: two-channel-wide
    stages, one conv per subnet, float64 for gradient checks."""
    base = dict(stem_channels=4, stem_kernel=3, block="basic", blocks=(1, 1, 1, 1),
                widths=(4, 4, 4, 4), fpn_channels=4, head_convs=1, mask_convs=1,
                anchor_sizes=(8, 16, 32, 64, 128), canonical_size=16, mask_size=8,
                num_classes=2, dtype="float64", seed=3)
    base.update(overrides)
    return Config(**base).validated()


def scene(size=64, seed=0):
    """One image with two rectangles of different classes, and its target.

    64 px, so that C5 is 2x2: at 32 px it is 1x1, every GroupNorm group of
    the last stage holds one value, normalises it to exactly 0, and the
    residual ReLU sits exactly on its kink - where no centred difference
    agrees with any one-sided derivative."""
    rng = np.random.default_rng(seed)
    s = size // 32
    image = rng.uniform(0, 0.2, (1, 3, size, size))
    masks = np.zeros((2, size, size), bool)
    masks[0, 4 * s:14 * s, 3 * s:20 * s] = True
    masks[1, 16 * s:30 * s, 18 * s:26 * s] = True
    image[0, 0][masks[0]] += 0.8
    image[0, 1][masks[1]] += 0.8
    boxes = np.array([[3, 4, 20, 14], [18, 16, 26, 30]], float) * s
    return image, [{"boxes": boxes, "labels": np.array([0, 1]), "masks": masks}]


def test_loss_returns_finite_terms_and_fills_every_gradient():
    model = RetinaMask(micro_config())
    images, targets = scene()
    losses = model.loss(images, targets)
    assert set(losses) >= {"cls", "box", "mask", "total"}
    assert all(np.isfinite(losses[k]) for k in ("cls", "box", "mask", "total"))
    assert losses["total"] == pytest.approx(losses["cls"] + losses["box"] + losses["mask"])
    assert losses["num_pos"] > 0 and losses["num_mask_rois"] >= 2
    for name, p in model.named_parameters():
        assert p.grad.shape == p.value.shape
        assert np.all(np.isfinite(p.grad)), name
    # every module receives some gradient (P7's conv through the cls/box heads too)
    for module in ("backbone", "fpn", "cls_head", "box_head", "mask_head"):
        total = sum(np.abs(p.grad).sum() for n, p in model.named_parameters() if n.startswith(module))
        assert total > 0, module


def _sampled_gradcheck(model, images, targets, names_per_module=4, seed=0, h=1e-6, **kw):
    rng = np.random.default_rng(seed)
    model.loss(images, targets, **kw)
    analytic, numeric = [], []
    params = dict(model.named_parameters())
    by_module = {}
    for name in params:
        by_module.setdefault(name.split(".")[0], []).append(name)
    for module, names in by_module.items():
        for name in rng.choice(names, size=min(names_per_module, len(names)), replace=False):
            p = params[name]
            i = tuple(rng.integers(0, s) for s in p.value.shape)
            analytic.append(p.grad[i])
            old = p.value[i]
            p.value[i] = old + h
            plus = model.loss(images, targets, **kw)["total"]
            p.value[i] = old - h
            minus = model.loss(images, targets, **kw)["total"]
            p.value[i] = old
            numeric.append((plus - minus) / (2 * h))
    return np.array(analytic), np.array(numeric)


@pytest.mark.parametrize("variant", [
    dict(mask_upsample="deconv"),
    dict(mask_upsample="upsample"),
    # GroupNorm in the dense heads, and a mask head narrower than the FPN
    # whose first conv changes the width
    dict(head_norm=True, mask_channels=3, mask_convs=2),
], ids=["deconv", "upsample", "head-norm-narrow-mask"])
def test_whole_model_gradient_check(variant):
    # Mask RoIs come from the ground truth only: detections are a
    # piecewise-constant function of the weights (thresholds, NMS), a kink
    # no centred difference can cross.
    with minimask.using_backend("numpy"):
        model = RetinaMask(micro_config(mask_rois_from_detections=False, **variant))
        images, targets = scene()
        analytic, numeric = _sampled_gradcheck(model, images, targets, names_per_module=6)
    assert np.count_nonzero(analytic) > len(analytic) // 2
    err = rel_error(analytic, numeric)
    assert err < 1e-6, (err, analytic, numeric)


def test_mask_loss_alone_reaches_the_backbone():
    model = RetinaMask(micro_config(mask_rois_from_detections=False))
    images, targets = scene()
    model.loss(images, targets, terms=("mask",))
    for name, p in model.named_parameters():
        if name.startswith(("cls_head", "box_head")):
            assert np.all(p.grad == 0), name
    backbone = [np.abs(p.grad).sum() for n, p in model.named_parameters() if n.startswith("backbone")]
    assert sum(backbone) > 0
    # and the terms add up: grad(mask only) + grad(cls, box) = grad(all three)
    mask_only = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.loss(images, targets, terms=("cls", "box"))
    dense = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.loss(images, targets)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(mask_only[n] + dense[n], p.grad, rtol=1e-9, atol=1e-12)


def test_an_image_without_objects_is_a_valid_target():
    model = RetinaMask(micro_config())
    images, targets = scene()
    empty = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int), "masks": np.zeros((0, 64, 64), bool)}]
    losses = model.loss(images, empty)
    assert np.isfinite(losses["total"]) and losses["mask"] == 0 and losses["box"] == 0
    assert losses["num_pos"] == 0


def test_predict_returns_the_contract_fields():
    model = RetinaMask(micro_config(dtype="float32", score_thresh=0.0, detections_per_image=7))
    images, _ = scene()
    (det,) = model.predict(images.astype(np.float32))
    D = len(det["boxes"])
    assert 0 < D <= 7
    assert det["boxes"].shape == (D, 4) and det["scores"].shape == (D,)
    assert det["labels"].shape == (D,) and det["masks"].shape == (D, 64, 64)
    assert det["masks"].dtype == bool
    assert np.all(np.diff(det["scores"]) <= 0)
    assert np.all((det["boxes"] >= 0) & (det["boxes"] <= 64))
    # the probabilities behind the masks, on request
    (full,) = model.predict(images.astype(np.float32), return_probabilities=True)
    K, m = model.config.num_classes, model.config.mask_size
    assert full["class_masks"].shape == (D, K, m, m) and full["mask_probs"].shape == (D, m, m)
    np.testing.assert_array_equal(full["mask_probs"],
                                  full["class_masks"][np.arange(D), full["labels"]])
    assert np.all((full["class_masks"] > 0) & (full["class_masks"] < 1))
    from minimask.masks import paste_masks
    np.testing.assert_array_equal(
        paste_masks(full["mask_probs"], full["boxes"].astype(np.float64), 64, 64, 0.5), det["masks"])
    for key in ("boxes", "scores", "labels", "masks"):
        np.testing.assert_array_equal(full[key], det[key])


@pytest.mark.parametrize("bad, message", [
    (lambda im, t: (im[:, :2], t), "images must have shape"),
    (lambda im, t: (im.astype(np.int64), t), "must be float32"),
    (lambda im, t: (np.where(np.arange(64) == 3, np.nan, im), t), "NaN"),
    (lambda im, t: (im, t * 2), "list of 1 dicts"),
    (lambda im, t: (im, [dict(t[0], boxes=np.array([[3, 4, 3, 14], [18, 16, 26, 30.0]]))]), "zero or negative area"),
    (lambda im, t: (im, [dict(t[0], labels=np.array([0, 5]))]), "labels.*must lie in"),
    (lambda im, t: (im, [dict(t[0], masks=np.zeros((2, 16, 16), bool))]), "masks.*must have shape"),
    (lambda im, t: (im, [{"boxes": t[0]["boxes"]}]), "has no 'labels'"),
])
def test_bad_input_is_refused_with_a_clear_message(bad, message):
    model = RetinaMask(micro_config())
    images, targets = scene()
    images, targets = bad(images, targets)
    with pytest.raises(ValueError, match=message):
        model.loss(images, targets)


def test_config_round_trips_through_json_and_refuses_unknown_fields():
    config = Config.preset("tiny", num_classes=4)
    import json
    again = Config.from_dict(json.loads(config.to_json()))
    assert again == config
    with pytest.raises(ValueError, match="unknown config fields"):
        Config.from_dict({**config.to_dict(), "nope": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        Config.preset("resnet9000")


def test_presets_build_with_the_documented_layouts():
    # C3-C5 feed the FPN; the tiny preset also hands C2 on, for its P2 (masks)
    for name, widths, outputs in [("tiny", (16, 32, 64, 128), (16, 32, 64, 128)),
                                  ("resnet18", (64, 128, 256, 512), (128, 256, 512))]:
        model = RetinaMask(Config.preset(name, num_classes=3))
        assert model.backbone.out_channels == list(outputs)
        assert model.backbone.out_channels[-3:] == list(widths[1:])
    r50 = Config.preset("resnet50", num_classes=80)
    assert r50.block == "bottleneck" and r50.fpn_channels == 256
    # the tiny mask head is narrower than its FPN: 64 channels in, 32 inside
    tiny = RetinaMask(Config.preset("tiny", num_classes=3))
    widths = [p.value.shape for n, p in tiny.named_parameters()
              if n.startswith("mask_head.") and n.endswith("weight")]
    assert widths[0][:2] == (32, 64) and widths[-1][:2] == (3, 32), widths
    with pytest.raises(ValueError, match="mask_channels"):
        Config.preset("tiny", num_classes=3, mask_channels=0)


def test_self_adjusting_beta_follows_the_box_errors():
    model = RetinaMask(micro_config(self_adjusting_beta=True, box_beta=0.11))
    errors = np.full(50, 0.05)
    beta = model._box_beta(errors)
    # one update from (0.11, 0) towards (mean 0.05, var 0): 0.9 * 0.11 + 0.1 * 0.05
    assert beta == pytest.approx(0.104)
    for _ in range(100):
        beta = model._box_beta(errors)
    assert beta == pytest.approx(0.05, rel=1e-3)
    # large errors never push beta above the configured cap
    assert model._box_beta(np.full(50, 5.0)) == pytest.approx(0.11)
    images, targets = scene()
    assert np.isfinite(model.loss(images, targets)["box"])


@pytest.mark.parametrize("mask_size", [28, 56])
def test_mask_size_is_configurable(mask_size):
    model = RetinaMask(micro_config(mask_size=mask_size, mask_rois_from_detections=False))
    images, targets = scene()
    losses = model.loss(images, targets)
    assert np.isfinite(losses["mask"]) and losses["num_mask_rois"] == 2
    # the mask head turns (R, C, m/2, m/2) RoI features into (R, K, m, m)
    feats = np.zeros((3, 4, mask_size // 2, mask_size // 2))
    logits, _ = model.mask_head.forward(feats)
    assert logits.shape == (3, 2, mask_size, mask_size)
