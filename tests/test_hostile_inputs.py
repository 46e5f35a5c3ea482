"""Hostile and careless inputs outside the COCO reader (issue 10): weights
files, model configs, training targets and images. Each case is refused
with a ValueError (one line on the command line, exit 2) that names the
file and the field - never a crash, a hang, a MemoryError or silently
wrong numbers. (COCO files: tests/test_coco.py; run folders:
tests/test_runs.py.)"""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minimask.__main__ import main
from minimask.model import Config, RetinaMask
from minimask.nn import load_npz, save_npz
from minimask.predict import read_rgb
from minimask.train import load_model

# single-process training: the ranks are tests/test_distributed.py's
pytestmark = pytest.mark.usefixtures("one_rank")

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(**kw):
    return Config(stem_channels=4, stem_kernel=3, blocks=(1, 1, 1, 1), widths=(4, 8, 8, 8),
                  fpn_channels=8, head_convs=1, mask_convs=1, anchor_sizes=(8, 16, 32, 64, 128),
                  canonical_size=16, mask_size=8, num_classes=2, **kw).validated()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.npz"
    model = RetinaMask(tiny_config())
    save_npz(path, model.state_dict(), {"config": model.config.to_dict(), "image_size": 64,
                                        "class_names": ["a", "b"]})
    return path


def _rewrite(src, dst, arrays=None, meta=None):
    a, m = load_npz(src)
    save_npz(dst, {**a, **(arrays or {})}, {**m, **(meta or {})})
    return dst


# ----------------------------------------------------------------------
# weights files (load_npz)
# ----------------------------------------------------------------------


def test_an_integer_parameter_is_refused_not_truncated(weights, tmp_path):
    arrays, _ = load_npz(weights)
    name = next(k for k in arrays if k.endswith("weight"))
    bad = _rewrite(weights, tmp_path / "int.npz", arrays={name: arrays[name].astype(np.int64)})
    with pytest.raises(ValueError, match=rf"int.npz.*array '{name}' is int64, not floating point"):
        load_model(bad)


def test_a_header_declaring_1e12_elements_is_refused_before_allocating(weights, tmp_path):
    bad = tmp_path / "huge.npz"
    with zipfile.ZipFile(weights) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "fpn.lateral3.weight.npy" or info is src.infolist()[0]:
                header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
                header["shape"] = (10 ** 12,)
                import io
                buf = io.BytesIO()
                np.lib.format.write_array_header_1_0(buf, header)
                data = buf.getvalue() + b"\0" * 16
            dst.writestr(info, data)
    with pytest.raises(ValueError, match=r"huge.npz.*declares shape \(1000000000000,\)"):
        load_npz(bad)


def test_a_directory_as_weights(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory, not a .npz file"):
        load_npz(tmp_path)


def test_deeply_nested_metadata(weights, tmp_path):
    arrays, _ = load_npz(weights)
    bad = tmp_path / "deep.npz"
    payload = {**arrays, "__metadata__": np.frombuffer(("[" * 100_000 + "]" * 100_000).encode(),
                                                       np.uint8)}
    np.savez(bad, **payload)
    with pytest.raises(ValueError, match=r"deep.npz.* corrupt metadata \(RecursionError"):
        load_npz(bad)


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(OSError, match=r"cannot write '.*x.npz': No space left"):
        save_npz(tmp_path / "x.npz", {"a": np.zeros(2)})
    assert list(tmp_path.iterdir()) == []          # no temporary file left


# ----------------------------------------------------------------------
# model configs
# ----------------------------------------------------------------------

BAD_CONFIGS = [
    ({"blocks": [1, 1, 1, "a"]}, "blocks"), ({"seed": "x"}, "seed"),
    ({"fpn_channels": 100000}, "fpn_channels"), ({"score_thresh": 5}, "score_thresh"),
    ({"strides": [1] * 5}, "strides"), ({"topk_per_level": 0}, "topk_per_level"),
    ({"detections_per_image": -1}, "detections_per_image"), ({"num_classes": "2"}, "num_classes"),
    ({"nms_thresh": float("nan")}, "nms_thresh"), ({"head_norm": "yes"}, "head_norm"),
    ({"mask_size": 7}, "mask_size"), ({"roi_min_level": 6, "roi_max_level": 4}, "roi_m"),
    ({"neg_iou": 0.7, "pos_iou": 0.5}, "neg_iou"), ({"anchor_ratios": []}, "anchor_ratios"),
]


@pytest.mark.parametrize("change,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_config_field_is_refused_naming_it(weights, tmp_path, change, field):
    _, meta = load_npz(weights)
    bad = _rewrite(weights, tmp_path / "bad.npz", meta={"config": {**meta["config"], **change}})
    with pytest.raises(ValueError, match=rf"bad.npz.*invalid config: config field.* '{field}"):
        load_model(bad)


def test_a_config_that_is_not_an_object(weights, tmp_path):
    bad = _rewrite(weights, tmp_path / "bad.npz", meta={"config": "hello"})
    with pytest.raises(ValueError, match=r"a config must be a JSON object of fields, got str"):
        load_model(bad)


def test_every_preset_passes_its_own_rules():
    for name in Config.preset_names():
        assert Config.from_dict(Config.preset(name, num_classes=5).to_dict()).preset_name == name


@pytest.mark.parametrize("meta,field", [({"class_names": 5}, "class_names"),
                                        ({"image_size": "x"}, "image_size"),
                                        ({"image_size": 10 ** 9}, "image_size")])
def test_bad_metadata_through_the_cli_is_one_line(weights, tmp_path, capsys, meta, field):
    bad = _rewrite(weights, tmp_path / "bad.npz", meta=meta)
    image = tmp_path / "i.png"
    Image.new("RGB", (16, 16)).save(image)
    code = main(["predict", "--weights", str(bad), str(image), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "bad.npz" in lines[0] and field in lines[0], err


# ----------------------------------------------------------------------
# training targets: a box far outside the image (run under a timeout)
# ----------------------------------------------------------------------

HUGE_BOX = """
import json, numpy as np
from minimask.model import Config, RetinaMask

c = Config(stem_channels=4, stem_kernel=3, blocks=(1, 1, 1, 1), widths=(4, 8, 8, 8),
           fpn_channels=8, head_convs=1, mask_convs=1, anchor_sizes=(8, 16, 32, 64, 128),
           canonical_size=16, mask_size=8, num_classes=2).validated()
images = np.random.default_rng(0).random((1, 3, 64, 64)).astype(np.float32)
masks = np.ones((1, 64, 64), bool)
out = {}
for name, box in [("huge", [-1e6, -1e6, 1e6, 1e6]), ("clipped", [0, 0, 64, 64])]:
    model = RetinaMask(c)
    losses = model.loss(images, [{"boxes": np.array([box]), "labels": np.array([1]),
                                  "masks": masks}])
    out[name] = {k: float(losses[k]) for k in ("cls", "box", "mask", "total")}
    out[name + "_grad"] = float(sum(np.abs(p.grad).sum() for p in model.parameters()))
try:
    RetinaMask(c).loss(images, [{"boxes": np.array([[100.0, 5, 200, 9]]),
                                 "labels": np.array([0]), "masks": masks}])
    out["outside"] = "accepted"
except ValueError as e:
    out["outside"] = str(e)
print(json.dumps(out))
"""


def test_a_box_far_outside_the_image_is_clipped_before_any_kernel():
    result = subprocess.run([sys.executable, "-c", HUGE_BOX], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # the huge box is the whole 64 px image once clipped: the same loss and gradients
    assert out["huge"] == out["clipped"], out
    assert out["huge_grad"] == out["clipped_grad"] and np.isfinite(out["huge"]["total"])
    assert "lies outside the 64x64 (WxH) image" in out["outside"], out["outside"]


# ----------------------------------------------------------------------
# images for predict
# ----------------------------------------------------------------------


def test_predict_refuses_a_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (32, 32)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match=r"big.png' is too large to read safely"):
        read_rgb(path)


def test_predict_reads_a_float_tiff_in_0_1(tmp_path):
    grey = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    Image.fromarray(grey, mode="F").save(tmp_path / "f.tif")
    rgb = read_rgb(tmp_path / "f.tif")
    np.testing.assert_array_equal(rgb[..., 1], np.rint(grey * 255).astype(np.uint8))


def test_predict_refuses_a_float_tiff_out_of_range(tmp_path):
    Image.fromarray(np.full((4, 4), 300.0, np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"f.tif' is a floating-point image with values in "
                                         r"\[300, 300\]"):
        read_rgb(tmp_path / "f.tif")


# ----------------------------------------------------------------------
# predict on a very large photo: memory
# ----------------------------------------------------------------------


def test_paste_mask_in_bands_equals_the_whole_box_formula():
    from minimask.masks import paste_mask
    rng = np.random.default_rng(0)
    mask = rng.random((28, 28))
    H, W = 300, 20000                      # 2 bands of rows at this width
    box = np.array([0.3, 0.7, 19999.2, 299.5])
    got = paste_mask(mask, box, H, W)
    # the formula on the whole box at once (what the banded loop replaces)
    x1, y1, x2, y2 = box
    # the pixels whose centre lies in the box: columns 0..19998, rows 1..299
    u = np.clip((np.arange(0, 19999) + 0.5 - x1) / (x2 - x1) * 28 - 0.5, 0, 27)
    v = np.clip((np.arange(1, 300) + 0.5 - y1) / (y2 - y1) * 28 - 0.5, 0, 27)
    u0, v0 = np.minimum(np.floor(u).astype(int), 26), np.minimum(np.floor(v).astype(int), 26)
    fu, fv = u - u0, v - v0
    u1, v1 = u0 + 1, v0 + 1
    top = mask[v0][:, u0] * (1 - fu) + mask[v0][:, u1] * fu
    bottom = mask[v1][:, u0] * (1 - fu) + mask[v1][:, u1] * fu
    expected = np.zeros((H, W), np.float32)
    expected[1:300, 0:19999] = top * (1 - fv[:, None]) + bottom * fv[:, None]
    np.testing.assert_array_equal(got, expected)


def test_a_large_overlay_is_drawn_scaled_down(tmp_path, monkeypatch):
    import minimask.predict as predict
    monkeypatch.setattr(predict, "MAX_OVERLAY_SIDE", 500)
    image = np.zeros((600, 1000, 3), np.uint8)
    masks = np.zeros((1, 600, 1000), bool)
    masks[0, 100:300, 200:600] = True
    detections = {"boxes": np.array([[200.0, 100, 600, 300]]), "scores": np.array([0.9]),
                  "labels": np.array([0]), "masks": masks}
    path = predict.save_overlay(image, detections, tmp_path / "o.png", ["a"])
    with Image.open(path) as im:
        assert im.size == (500, 300), im.size
    small, scaled = predict._scaled_down(image, detections, 500)
    assert small.shape == (300, 500, 3)
    np.testing.assert_allclose(scaled["boxes"], [[100, 50, 300, 150]])
    assert scaled["masks"][0].sum() == 100 * 200 and scaled["masks"][0, 50:150, 100:300].all()


def test_predict_json_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno
    import pathlib
    import minimask.predict as predict

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OSError, match=r"cannot write '.*detections.json': No space left on "
                                      r"device \(the disk is full\)"):
        predict.write_json(tmp_path / "detections.json", [])
