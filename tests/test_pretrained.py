"""Pretrained backbones (issue 15): frozen batch norm, the torchvision-layout
ResNet, importing torchvision/timm checkpoints, equality with torchvision on
the committed golden files, the import-weights command, and fine-tuning with
frozen stages.

tests/golden/ was written by ``benchmarks/compare_torchvision.py --golden``
with torch and torchvision: narrow networks in torchvision's exact naming,
random weights, their input and torchvision's outputs in float64. No torch
is needed here."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minimask
from minimask.anchors import flatten_head_output
from minimask.boxes import decode_boxes
from minimask.gradcheck import check_layer, numerical_gradient, rel_error
from minimask.layers import frozen_bn_backward, frozen_bn_forward
from minimask.model import Config, RetinaMask
from minimask.model.config import TORCHVISION_RETINANET
from minimask.nn import load_npz
from minimask.pretrained import checkpoint_kind, import_state, import_weights, read_checkpoint
from tests.conftest import SIMULATED

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
INFO = json.loads((GOLDEN / "golden.json").read_text())


# --------------------------------------------------------------------------
# frozen batch norm: the layer
# --------------------------------------------------------------------------


def _bn_problem(rng, shape, dtype=np.float64):
    C = shape[1]
    x = rng.standard_normal(shape)
    gamma = 0.5 + rng.random(C)
    beta = rng.standard_normal(C)
    mean = rng.standard_normal(C)
    var = 0.5 + rng.random(C)
    return [a.astype(dtype) for a in (x, gamma, beta, mean, var)]


def test_frozen_bn_gradcheck(rng):
    x, gamma, beta, mean, var = _bn_problem(rng, (2, 3, 4, 5))
    with minimask.using_backend("numpy"):
        errors = check_layer(frozen_bn_forward, frozen_bn_backward,
                             {"x": x, "gamma": gamma, "beta": beta, "running_mean": mean,
                              "running_var": var}, ["x"])
    assert errors["x"] < 1e-6, errors


def test_frozen_bn_is_batch_norm_at_inference(backend, rng):
    """The definition, (x - mean) / sqrt(var + eps) * gamma + beta, and no
    dependence on the batch: each sample alone gives the same output."""
    x, gamma, beta, mean, var = _bn_problem(rng, (3, 4, 5, 2))
    out = np.asarray(frozen_bn_forward(x, gamma, beta, mean, var, eps=1e-3)[0])
    c = (slice(None), None, None)
    expected = (x - mean[c]) / np.sqrt(var[c] + 1e-3) * gamma[c] + beta[c]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    alone = np.asarray(frozen_bn_forward(x[1:2], gamma, beta, mean, var, eps=1e-3)[0])
    np.testing.assert_array_equal(alone, out[1:2])


PARITY_SHAPES = [(2, 3, 2, 3), (1, 5, 1, 1)]
if not SIMULATED:
    PARITY_SHAPES += [(2, 64, 9, 11), (1, 7, 33, 17)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=str)
def test_frozen_bn_parity_with_numpy(fast_backend, dtype, shape, rng):
    x, gamma, beta, mean, var = _bn_problem(rng, shape, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    results = {}
    for name in ("numpy", fast_backend):
        with minimask.using_backend(name):
            out, cache = frozen_bn_forward(x, gamma, beta, mean, var)
            results[name] = (np.asarray(out), np.asarray(frozen_bn_backward(dout, cache)))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-6)
    for ref, got in zip(results["numpy"], results[fast_backend]):
        assert got.dtype == dtype and got.shape == shape
        np.testing.assert_allclose(got, ref, **tol)


def test_frozen_bn_errors():
    x, g = np.ones((2, 3, 2, 2)), np.ones(3)
    with pytest.raises(ValueError, match=r"x must have 4 dimensions"):
        frozen_bn_forward(np.ones((3, 2, 2)), g, g, g, g)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        frozen_bn_forward(x, g, g, g, np.ones(4))
    with pytest.raises(ValueError, match="running_var \\+ eps must be positive"):
        frozen_bn_forward(x, g, g, g, -np.ones(3))
    _, cache = frozen_bn_forward(x, g, g, g, g)
    with pytest.raises(ValueError, match="dout must have the shape of the forward output"):
        frozen_bn_backward(np.ones((2, 3, 2, 1)), cache)


# --------------------------------------------------------------------------
# the torchvision-layout ResNet: gradients, freezing
# --------------------------------------------------------------------------


def narrow_config(name="retinanet_narrow", num_classes=None, **kw):
    g = INFO[name]
    extra = dict(TORCHVISION_RETINANET) if name == "retinanet_narrow" else {}
    extra = {"dtype": "float64", **extra, **kw}
    return Config(num_classes=num_classes or g.get("num_classes", 3),
                  backbone="frozenbn", block=g["block"], blocks=tuple(g["blocks"]),
                  widths=tuple(g["widths"]), stem_channels=g["stem_channels"],
                  fpn_channels=g.get("fpn_channels", 8), head_convs=4, mask_convs=1,
                  mask_size=8, **extra).validated()


def golden_model(name="retinanet_narrow", **kw):
    model = RetinaMask(narrow_config(name, **kw))
    tensors = read_checkpoint(GOLDEN / f"{name}.safetensors")
    report = import_state(model, tensors, checkpoint_kind(tensors))
    return model, report


def test_resnet_backward_matches_numerical_gradient(rng):
    """d(sum(C * dC))/d(image) and /d(a layer1 conv weight), every stage
    trainable, against centred differences (float64)."""
    model, _ = golden_model("resnet_basic_narrow", trainable_stages=5)
    x = rng.random((1, 3, 12, 16)) + 0.1     # the smallest image with C5 still 1x1
    C, cache = model.backbone.forward(x)
    dC = [rng.standard_normal(c.shape) for c in C]
    model.zero_grad()
    dx = model.backbone.backward(dC, cache)

    def f():
        return np.concatenate([c.ravel() for c in model.backbone.forward(x)[0]])
    d_flat = np.concatenate([d.ravel() for d in dC])
    assert rel_error(dx, numerical_gradient(f, x, d_flat)) < 1e-6
    w = model.backbone.layer1[0].conv2.weight
    assert rel_error(w.grad, numerical_gradient(f, w.value, d_flat)) < 1e-6


def test_freezing_stops_the_backward_and_keeps_bn_frozen(rng):
    model, _ = golden_model("resnet_basic_narrow", trainable_stages=3)
    x = rng.random((1, 3, 20, 24))
    C, cache = model.backbone.forward(x)
    model.zero_grad()
    assert model.backbone.backward([np.ones_like(c) for c in C], cache) is None
    frozen = {n for n, p in model.named_parameters() if p.frozen}
    # stem and layer1 frozen, every batch-norm array frozen, layer2.. convs train
    assert "backbone.conv1.weight" in frozen and "backbone.layer1.0.conv1.weight" in frozen
    assert "backbone.layer2.0.conv1.weight" not in frozen
    assert "backbone.layer4.0.bn2.running_var" in frozen
    assert np.all(model.backbone.layer1[0].conv1.weight.grad == 0)
    assert np.any(model.backbone.layer2[0].conv1.weight.grad != 0)
    with pytest.raises(ValueError, match="trainable_stages must be an integer in 0..5"):
        model.backbone.set_trainable_stages(6)


# --------------------------------------------------------------------------
# equality with torchvision (golden files)
# --------------------------------------------------------------------------


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def test_golden_retinanet_equals_torchvision():
    """Backbone, FPN, both heads (flattened as torchvision's (N, HWA, K)),
    torchvision's anchors and decoded boxes, float64, 1e-6 relative."""
    model, report = golden_model()
    assert not report["skipped"]
    assert all(n.startswith("mask_head.") for n in report["initialised"])
    ref = dict(np.load(GOLDEN / "retinanet_narrow_outputs.npz"))
    x = ref["x"].astype(np.float64)
    C, _ = model.backbone.forward(x)
    P, _ = model.fpn.forward(C)
    got = {f"C{3 + i}": c for i, c in enumerate(C)}
    got.update({f"P{3 + i}": p for i, p in enumerate(P)})
    got["cls_logits"] = np.concatenate([flatten_head_output(m, 3) for m in model.cls_head.forward(P)[0]], 1)
    got["bbox_regression"] = np.concatenate([flatten_head_output(m, 4) for m in model.box_head.forward(P)[0]], 1)
    anchors = np.concatenate(model._anchors(P, x.shape[2:]))
    got["anchors"] = anchors
    got["boxes"] = decode_boxes(got["bbox_regression"][0], anchors, model.config.box_weights)
    for key in ("C3", "C4", "C5", "P3", "P4", "P5", "P6", "P7", "cls_logits",
                "bbox_regression", "anchors", "boxes"):
        assert got[key].shape == ref[key].shape, (key, got[key].shape, ref[key].shape)
        assert _rel(got[key], ref[key]) < 1e-6, (key, _rel(got[key], ref[key]))


def test_golden_anchors_need_torchvision_conventions():
    """With minimask's own anchor conventions the anchors differ: the
    config fields are what makes them equal."""
    model, _ = golden_model(anchor_offset=0.5, anchor_round=False, anchor_size_floor=False,
                            anchor_stride_from_image=False)
    ref = np.load(GOLDEN / "retinanet_narrow_outputs.npz")
    P, _ = model.fpn.forward(model.backbone.forward(ref["x"].astype(np.float64))[0])
    anchors = np.concatenate(model._anchors(P, ref["x"].shape[2:]))
    assert anchors.shape == ref["anchors"].shape
    assert np.max(np.abs(anchors - ref["anchors"])) > 1.0


def test_golden_classification_resnet_equals_torchvision():
    """A basic-block ResNet in classification naming (with ``fc``, which is
    left out): C3, C4, C5 equal torchvision's IntermediateLayerGetter."""
    model, report = golden_model("resnet_basic_narrow")
    assert sorted(report["skipped"]) == ["fc.bias", "fc.weight"]
    ref = np.load(GOLDEN / "resnet_basic_narrow_outputs.npz")
    C, _ = model.backbone.forward(ref["x"].astype(np.float64))
    for i, c in enumerate(C):
        assert _rel(c, ref[f"C{3 + i}"]) < 1e-6, i


def test_golden_predict_runs_with_normalisation_and_float32():
    """The imported detector end to end (float32): predict normalises
    with the config's mean/std and gives boxes inside the image."""
    model, _ = golden_model(dtype="float32", pixel_mean=(0.485, 0.456, 0.406),
                            pixel_std=(0.229, 0.224, 0.225), score_thresh=0.0)
    x = np.random.default_rng(0).random((1, 3, 40, 56)).astype(np.float32)
    norm = model.normalize_images(x)
    np.testing.assert_allclose(norm[0, 1], (x[0, 1] - 0.456) / 0.224, rtol=1e-6)
    out = model.predict(x)[0]
    assert len(out["boxes"]) > 0
    assert np.all(out["boxes"][:, 2] <= 56) and np.all(out["boxes"][:, 3] <= 40)


# --------------------------------------------------------------------------
# import errors
# --------------------------------------------------------------------------


def _save(tensors, path):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def _golden_tensors():
    return read_checkpoint(GOLDEN / "retinanet_narrow.safetensors")


def test_import_names_the_first_tensor_with_a_wrong_name(tmp_path):
    tensors = _golden_tensors()
    renamed = {("backbone.body.layer2.0.conv9.weight" if k == "backbone.body.layer2.0.conv2.weight"
                else k): v for k, v in tensors.items()}
    path = _save(renamed, tmp_path / "bad.safetensors")
    model = RetinaMask(narrow_config())
    with pytest.raises(ValueError, match=r"'backbone.body.layer2.0.conv9.weight' .* has no place"):
        import_state(model, read_checkpoint(path), "retinanet")


def test_import_names_a_wrong_shape(tmp_path):
    tensors = _golden_tensors()
    tensors["backbone.fpn.layer_blocks.1.0.weight"] = np.zeros((8, 8, 1, 1), np.float32)
    model = RetinaMask(narrow_config())
    with pytest.raises(ValueError, match=r"'backbone.fpn.layer_blocks.1.0.weight' has shape "
                                         r"\(8, 8, 1, 1\), .* expects \(8, 8, 3, 3\)"):
        import_state(model, tensors, "retinanet")


def test_import_names_a_missing_tensor():
    tensors = _golden_tensors()
    del tensors["backbone.body.layer4.0.bn3.running_var"]
    model = RetinaMask(narrow_config())
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*'backbone.layer4.0.bn3.running_var'"):
        import_state(model, tensors, "retinanet")


def test_import_refuses_a_truncated_file(tmp_path):
    data = (GOLDEN / "retinanet_narrow.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_checkpoint(path)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_checkpoint(path)


def test_pth_without_torch_says_so(tmp_path, monkeypatch):
    path = tmp_path / "resnet50.pth"
    path.write_bytes(b"not really a pickle")
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch -> ImportError
    with pytest.raises(ValueError, match=r"needs torch, which is not installed.*safetensors"):
        read_checkpoint(path)


def test_import_refuses_groupnorm_presets_and_other_extensions(tmp_path):
    with pytest.raises(ValueError, match="GroupNorm backbone"):
        import_weights(GOLDEN / "retinanet_narrow.safetensors", "resnet50", 3)
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown extension '.h5'"):
        read_checkpoint(tmp_path / "w.h5")


def test_class_head_for_other_classes_is_initialised_not_imported():
    model, report = golden_model(num_classes=4)
    assert any("cls_logits.weight" in s and "3 classes" in s for s in report["skipped"])
    fresh = RetinaMask(narrow_config(num_classes=4))
    np.testing.assert_array_equal(model.cls_head.predict.weight.value,
                                  fresh.cls_head.predict.weight.value)


# --------------------------------------------------------------------------
# the command, end to end
# --------------------------------------------------------------------------


def _torchvision_resnet18_file(path):
    """A ResNet-18 state dict as torchvision saves it: its names (the
    torchvision-layout model uses them, and the golden test ties them to
    torchvision's), plus ``fc`` and integer ``num_batches_tracked``."""
    rng = np.random.default_rng(7)
    model = RetinaMask(Config.preset("resnet18-frozenbn", num_classes=1))
    tensors = {}
    for name, p in model.backbone.named_parameters():
        tensors[name] = (rng.standard_normal(p.shape) * 0.1 + (1.0 if "running_var" in name else 0.0)
                         ).astype(np.float32)
        if name.endswith("running_var"):
            tensors[name.replace("running_var", "num_batches_tracked")] = np.array(5, np.int64)
    tensors["fc.weight"] = rng.standard_normal((1000, 512)).astype(np.float32)
    tensors["fc.bias"] = np.zeros(1000, np.float32)
    return _save(tensors, path), tensors


def test_import_weights_command_end_to_end(tmp_path):
    src, tensors = _torchvision_resnet18_file(tmp_path / "resnet18.safetensors")
    out = tmp_path / "r18.npz"
    result = subprocess.run([sys.executable, "-m", "minimask", "import-weights", str(src),
                             "--preset", "resnet18-frozenbn", "--num-classes", "2",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tensors imported" in result.stdout
    arrays, meta = load_npz(out)
    config = Config.from_dict(meta["config"])
    assert config.preset_name == "resnet18-frozenbn" and config.num_classes == 2
    model = RetinaMask(config)
    model.load(out)                                   # RetinaMask(...).load accepts it
    for name in ("conv1.weight", "layer3.1.bn2.running_mean", "layer4.0.downsample.0.weight"):
        np.testing.assert_array_equal(dict(model.named_parameters())["backbone." + name].value,
                                      tensors[name])
    from minimask.train import load_model              # and so does every --weights option
    loaded, _ = load_model(out, num_classes=2)
    assert loaded.config.trainable_stages == 3

    # a wrong preset: one line, exit 2, naming the tensor
    bad = subprocess.run([sys.executable, "-m", "minimask", "import-weights", str(src),
                          "--preset", "resnet50-frozenbn", "--num-classes", "2",
                          "--out", str(tmp_path / "x.npz")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.startswith("minimask: error: ") and bad.stderr.count("\n") == 1
    assert "'layer1.0.conv1.weight' has shape (64, 64, 3, 3)" in bad.stderr, bad.stderr
    assert not (tmp_path / "x.npz").exists()


# --------------------------------------------------------------------------
# fine-tuning from imported weights
# --------------------------------------------------------------------------


def test_finetune_keeps_frozen_stages_bit_for_bit(tmp_path):
    from minimask.data.synthetic import ShapesDataset
    from minimask.train import TrainSettings, train

    data = ShapesDataset(seed=3, num_images=4, size=64)
    model, _ = golden_model(num_classes=data.num_classes, dtype="float32",
                            anchor_sizes=(8, 16, 32, 64, 128), canonical_size=32,
                            trainable_stages=3)
    before = {n: p.value.copy() for n, p in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if p.frozen}
    s = TrainSettings(iters=2, batch_size=1, lr=0.01, warmup_iters=0, out=str(tmp_path / "run"),
                      progress=False, checkpoint_every=2, log_every=1)
    trained = train(data, s, model=model, log=lambda *a: None)
    after = dict(trained.named_parameters())
    for n in frozen:
        assert np.array_equal(after[n].value, before[n]), n
    assert any(n.startswith("backbone.conv1") for n in frozen)
    assert not np.array_equal(after["backbone.layer4.0.conv2.weight"].value,
                              before["backbone.layer4.0.conv2.weight"])
    assert not np.array_equal(after["mask_head.predict.weight"].value,
                              before["mask_head.predict.weight"])
    # the checkpoint keeps the freezing and the normalisation
    _, meta = load_npz(tmp_path / "run" / "checkpoint.npz")
    assert meta["config"]["trainable_stages"] == 3 and meta["config"]["backbone"] == "frozenbn"


def test_train_command_from_imported_weights(tmp_path):
    """``train --weights W --trainable-stages 2``: the run starts from the
    imported tensors, keeps stem..layer2 frozen and records it."""
    from minimask.__main__ import main
    from minimask.nn import save_npz

    model, _ = golden_model(num_classes=4, dtype="float32", anchor_sizes=(8, 16, 32, 64, 128),
                            canonical_size=32, trainable_stages=3)
    weights = tmp_path / "imported.npz"
    save_npz(weights, model.state_dict(), {"config": model.config.to_dict(), "image_size": 64})
    out = tmp_path / "run"
    code = main(["train", "--weights", str(weights), "--trainable-stages", "2", "--iters", "2",
                 "--batch-size", "1", "--workers", "1", "--num-images", "2", "--image-size", "64",
                 "--eval-images", "0", "--lr", "0.01", "--out", str(out), "--no-progress"])
    assert code == 0
    arrays, meta = load_npz(out / "checkpoint.npz")
    assert meta["config"]["trainable_stages"] == 2
    start = model.state_dict()
    for name in ("backbone.conv1.weight", "backbone.layer2.0.conv2.weight",
                 "backbone.layer4.0.bn1.running_var"):
        np.testing.assert_array_equal(arrays[name], start[name])
    assert not np.array_equal(arrays["backbone.layer3.0.conv2.weight"],
                              start["backbone.layer3.0.conv2.weight"])
    # --trainable-stages without --weights, and on a GroupNorm model, are refused
    assert main(["train", "--trainable-stages", "2", "--iters", "1", "--out",
                 str(tmp_path / "x")]) == 2


def test_timm_deep_stem_is_refused_by_name():
    """timm's resnet*d variants have a 3-conv stem (conv1.0, conv1.1, ...):
    the error names the tensor and says why."""
    tensors = read_checkpoint(GOLDEN / "resnet_basic_narrow.safetensors")
    tensors = {("conv1.0.weight" if k == "conv1.weight" else k): v for k, v in tensors.items()}
    model = RetinaMask(narrow_config("resnet_basic_narrow"))
    with pytest.raises(ValueError, match=r"'conv1.0.weight' .* deep-stem ResNet"):
        import_state(model, tensors, "resnet")


def test_fpn_with_p6_from_c5_gradient(rng):
    """``p6_input="c5"`` (torchvision's LastLevelP6P7 when its input width
    differs from the FPN's): P6 reads C5, and the backward sends P6's
    gradient to C5 - checked against centred differences."""
    from minimask.model.fpn import FPN
    fpn = FPN((3, 4, 5), 2, rng=rng, dtype=np.float64, p6_input="c5")
    assert fpn.p6.weight.shape == (2, 5, 3, 3)
    C = [rng.standard_normal((1, 3, 8, 6)), rng.standard_normal((1, 4, 4, 3)),
         rng.standard_normal((1, 5, 2, 2))]
    P, cache = fpn.forward(C)
    dP = [rng.standard_normal(p.shape) for p in P]
    dC = fpn.backward(dP, cache)
    d_flat = np.concatenate([d.ravel() for d in dP])
    for i in range(3):
        numeric = numerical_gradient(
            lambda: np.concatenate([p.ravel() for p in fpn.forward(C)[0]]), C[i], d_flat)
        assert rel_error(dC[i], numeric) < 1e-6, i


def test_retinanet_v2_naming_is_recognised_and_mapped(rng):
    """retinanet_resnet50_fpn_v2's layout (checked against torchvision by
    benchmarks/compare_torchvision.py): head convs without bias followed by
    GroupNorm at ``conv.k.1``, and P6 reading C5."""
    tensors = {}
    for name, value in _golden_tensors().items():
        m = re.match(r"^(head\.\w+_head\.conv\.\d+)\.0\.bias$", name)
        if m:       # v2: no conv bias, a GroupNorm after the conv
            tensors[f"{m.group(1)}.1.weight"] = (1 + rng.random(value.shape)).astype(np.float32)
            tensors[f"{m.group(1)}.1.bias"] = rng.standard_normal(value.shape).astype(np.float32)
        elif name == "backbone.fpn.extra_blocks.p6.weight":
            tensors[name] = rng.standard_normal((8, 128, 3, 3)).astype(np.float32)
        else:
            tensors[name] = value
    assert checkpoint_kind(tensors) == "retinanet_v2"
    model = RetinaMask(narrow_config(head_norm=True, p6_input="c5"))
    report = import_state(model, tensors, "retinanet_v2")
    params = dict(model.named_parameters())
    np.testing.assert_array_equal(params["cls_head.tower.layers.4.weight"].value,
                                  tensors["head.classification_head.conv.1.1.weight"])
    np.testing.assert_array_equal(params["box_head.tower.layers.9.weight"].value,
                                  tensors["head.regression_head.conv.3.0.weight"])
    assert len(report["zero_bias"]) == 8
    assert np.all(params["cls_head.tower.layers.3.bias"].value == 0)
    np.testing.assert_array_equal(params["fpn.p6.weight"].value,
                                  tensors["backbone.fpn.extra_blocks.p6.weight"])
    assert all(n.startswith("mask_head.") for n in report["initialised"])
