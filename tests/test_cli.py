"""The command line (``python -m minimask ...``) and ``minimask.predict``.

Commands run in-process through ``minimask.__main__.main([...])`` (a
subprocess per call would pay the import and JIT-cache load each time);
two subprocess tests prove that ``--help`` works from the shell and that a
bad input leaves no traceback there either. Sizes are tiny (64 px images,
3-5 training steps): these tests check the plumbing, not the accuracy.

An untrained model scores every anchor near the class prior (0.01), so the
tests that need detections pass ``--score-thresh 0``: every box that
survives NMS is kept (up to the model's 100 per image).
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from minimask.__main__ import _fill_train_defaults, build_parser, main
from minimask.masks import background_fraction, box_mask, paste_masks
from minimask.predict import (crop_window, load_image, predict_array, predict_steps,
                              rle_to_mask)
from minimask.train import TrainSettings, load_model

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["check", "train", "export-shapes", "evaluate", "predict", "crop"]
SIZE = 64


# ----------------------------------------------------------------------
# shared, built once per module: a tiny exported dataset and a tiny run
# ----------------------------------------------------------------------


# main() in this process trains here (tests/test_distributed.py runs the
# multi-rank launcher), so capsys sees what train prints: see conftest.one_rank
pytestmark = pytest.mark.usefixtures("one_rank")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    assert main(["export-shapes", "--seed", "5", "--num-images", "3",
                 "--image-size", str(SIZE), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run: (its folder, what train printed)."""
    out = tmp_path_factory.mktemp("run") / "train"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", "--iters", "3", "--num-images", "4", "--image-size", str(SIZE),
                     "--out", str(out), "--eval-images", "2", "--no-progress"])
    assert code == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def run_dir(trained):
    return trained[0]


@pytest.fixture(scope="module")
def weights(run_dir):
    return run_dir / "checkpoint.npz"


@pytest.fixture(scope="module")
def odd_images(shapes_dir, tmp_path_factory):
    """One exported image re-saved in other sizes and modes: non-square
    RGB, greyscale, palette and RGBA (with a transparent corner)."""
    out = tmp_path_factory.mktemp("odd")
    src = Image.open(shapes_dir / "images" / "shapes_5_00000.png").convert("RGB")
    paths = {}
    paths["wide"] = out / "wide.png"
    src.resize((90, 50), Image.BILINEAR).save(paths["wide"])
    paths["grey"] = out / "grey.png"
    src.resize((40, 70), Image.BILINEAR).convert("L").save(paths["grey"])
    paths["palette"] = out / "palette.png"
    src.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(paths["palette"])
    rgba = src.resize((100, 100), Image.BILINEAR).convert("RGBA")
    alpha = np.full((100, 100), 255, np.uint8)
    alpha[:10, :10] = 0
    rgba.putalpha(Image.fromarray(alpha))
    paths["rgba"] = out / "rgba.png"
    rgba.save(paths["rgba"])
    return paths


def _run(capsys, argv):
    """main(argv) -> (exit code, stdout, stderr); argparse exits become codes."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------
# --help
# ----------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    code, out, _ = _run(capsys, [command, "--help"])
    assert code == 0
    assert out.startswith("usage: python -m minimask " + command), out[:200]


def test_train_help_shows_the_train_settings_defaults(capsys):
    defaults = TrainSettings()
    _, out, _ = _run(capsys, ["train", "--help"])
    flat = " ".join(out.split())
    for option, value in [("--iters", defaults.iters), ("--lr", defaults.lr),
                          ("--batch-size", defaults.batch_size),
                          ("--out", f"a new one, {defaults.out}")]:
        assert option in flat and f"default: {value}" in flat, (option, value, flat)
    # the settings are None when not typed (so --resume can tell), then filled in
    args = build_parser().parse_args(["train"])
    assert args.lr is None and args.seed is None and args.out is None
    _fill_train_defaults(args)
    args.out = defaults.out
    assert (args.iters, args.lr, args.batch_size, args.out, args.dataset, args.backend,
            args.image_size, args.num_images) == (defaults.iters, defaults.lr,
                                                  defaults.batch_size, defaults.out,
                                                  "shapes", "cpu", 128, 2000)


def test_crop_help_defines_the_background_fractions(capsys):
    _, out, _ = _run(capsys, ["crop", "--help"])
    for word in ("box_background", "mask_background", "1 - M/B", "transparent"):
        assert word in out, word


def test_top_level_help_in_a_subprocess_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "minimask", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout, (command, result.stdout)


# ----------------------------------------------------------------------
# export-shapes, train (+ resume), evaluate
# ----------------------------------------------------------------------


def test_export_shapes_writes_n_images_and_a_coco_file_that_reads_back(shapes_dir):
    from pycocotools.coco import COCO

    from minimask.data.coco import CocoDataset
    from minimask.data.synthetic import ShapesDataset

    pngs = sorted((shapes_dir / "images").glob("*.png"))
    assert len(pngs) == 3
    data = json.loads((shapes_dir / "annotations.json").read_text())
    assert len(data["images"]) == 3 and len(data["annotations"]) >= 3
    assert [c["name"] for c in data["categories"]] == list(ShapesDataset.class_names)
    coco = COCO(str(shapes_dir / "annotations.json"))        # pycocotools accepts it
    assert len(coco.getImgIds()) == 3
    # read back: the same pixels (8-bit rounding) and the same masks
    shapes = ShapesDataset(seed=5, num_images=3, size=SIZE)
    back = CocoDataset(shapes_dir / "annotations.json", shapes_dir / "images", image_size=SIZE)
    for i in range(3):
        (img_a, tgt_a), (img_b, tgt_b) = shapes[i], back[i]
        assert np.abs(img_a - img_b).max() <= 0.5 / 255 + 1e-6
        np.testing.assert_array_equal(tgt_a["masks"], tgt_b["masks"])
        np.testing.assert_array_equal(tgt_a["labels"], tgt_b["labels"])


def test_train_writes_its_files_and_reports_them(run_dir):
    for name in ("checkpoint.npz", "checkpoint.json", "metrics.jsonl", "losses.png",
                 "examples.png", "eval/metrics.json", "eval/detections.json"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    assert meta["step"] == 3 and meta["image_size"] == SIZE
    assert meta["config"]["num_classes"] == 4
    model, _ = load_model(run_dir / "checkpoint.npz", num_classes=4)
    from minimask.model import Config
    tiny = Config.preset("tiny", num_classes=4)
    assert (model.config.widths, model.config.fpn_channels) == (tiny.widths, tiny.fpn_channels)


def test_train_prints_paths_and_mask_ap(trained):
    out, stdout = trained
    for name in ("checkpoint.npz", "metrics.jsonl", "losses.png", "examples.png"):
        assert str(out / name) in stdout, (name, stdout)
    assert "mask AP50" in stdout and "2 fresh shapes (seed 1000)" in stdout, stdout


def test_train_resumes_from_step_3_to_5(run_dir, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(run_dir, out)
    before = np.load(out / "checkpoint.npz")
    before = {k: before[k] for k in before.files}
    code, stdout, _ = _run(capsys, ["train", "--iters", "5", "--num-images", "4",
                                    "--image-size", str(SIZE), "--out", str(out), "--resume",
                                    "--eval-images", "0", "--no-progress"])
    assert code == 0, stdout
    assert "at step 3" in stdout, stdout
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["step"] == 5
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 5 and steps == sorted(steps), steps
    after = np.load(out / "checkpoint.npz")
    changed = [k for k in after.files if k in before and not k.startswith("__")
               and after[k].dtype.kind == "f" and not np.array_equal(after[k], before[k])]
    assert changed, "two more steps changed no weight"


def test_evaluate_on_fresh_shapes_writes_both_json(weights, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, _ = _run(capsys, ["evaluate", "--weights", str(weights), "--num-images", "2",
                                    "--seed", "1000", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm", "per_category", "cutout"} and "AP50" in metrics["segm"]
    # per-class AP (issue 11): every class of the shapes, box and mask
    for iou_type in ("bbox", "segm"):
        assert set(metrics["per_category"][iou_type]) == {"circle", "square", "triangle", "bar"}
    assert isinstance(json.loads((out / "detections.json").read_text()), list)
    assert "segm" in stdout and "AP50" in stdout
    assert "mask AP50" in stdout and "bar" in stdout


def test_evaluate_on_an_exported_coco_file(weights, shapes_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, err = _run(capsys, ["evaluate", "--weights", str(weights), "--dataset",
                                      str(shapes_dir / "annotations.json"), "--out", str(out),
                                      "--no-progress"])
    assert code == 0, err
    assert (out / "metrics.json").is_file() and (out / "detections.json").is_file()
    image_ids = {d["image_id"] for d in json.loads((out / "detections.json").read_text())}
    assert image_ids <= {1, 2, 3}


# ----------------------------------------------------------------------
# minimask.predict: preparing images and mapping answers back
# ----------------------------------------------------------------------


@pytest.mark.parametrize("name, hw", [("wide", (50, 90)), ("grey", (70, 40)),
                                      ("palette", (SIZE, SIZE)), ("rgba", (100, 100))])
def test_load_image_converts_resizes_and_pads(odd_images, name, hw):
    model_input, original, scale = load_image(odd_images[name], SIZE)
    H, W = hw
    assert original.shape == (H, W, 3) and original.dtype == np.uint8
    assert model_input.shape == (3, SIZE, SIZE) and model_input.dtype == np.float32
    assert scale == pytest.approx(SIZE / max(H, W))
    h, w = round(H * scale), round(W * scale)
    assert 0 <= model_input.min() and model_input.max() <= 1
    assert np.all(model_input[:, h:, :] == 0) and np.all(model_input[:, :, w:] == 0)
    assert model_input[:, :h, :w].max() > 0.05          # the content is there
    if name == "grey":
        assert np.array_equal(original[..., 0], original[..., 1])
    if (H, W) == (SIZE, SIZE):                          # no resize: exact pixels
        np.testing.assert_allclose(model_input.transpose(1, 2, 0), original / 255.0, atol=1e-7)


def test_predict_steps_agrees_with_model_predict(weights, shapes_dir):
    """predict_steps re-runs the model's inference to keep the mask
    probabilities; its boxes, scores, labels and masks must be the model's."""
    model, _ = load_model(weights)
    x, _, _ = load_image(shapes_dir / "images" / "shapes_5_00001.png", SIZE)
    model.config.score_thresh = 0.0
    expected = model.predict(x[None])[0]
    got = predict_steps(model, x[None])[0]
    assert len(expected["boxes"]) > 0
    np.testing.assert_allclose(got["boxes"], expected["boxes"], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=1e-6)
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    np.testing.assert_array_equal(got["masks"], expected["masks"])
    D, K = len(got["boxes"]), model.config.num_classes
    m = model.config.mask_size
    assert got["class_masks"].shape == (D, K, m, m)
    np.testing.assert_array_equal(got["mask_probs"], got["class_masks"][np.arange(D),
                                                                        got["labels"]])


def test_predict_steps_score_thresh_overrides_for_one_call(weights, shapes_dir):
    model, _ = load_model(weights)
    x, _, _ = load_image(shapes_dir / "images" / "shapes_5_00001.png", SIZE)
    before = model.config.score_thresh
    all_boxes = predict_steps(model, x[None], score_thresh=0.0)[0]
    assert model.config.score_thresh == before
    t = float(np.median(all_boxes["scores"]))
    above = predict_steps(model, x[None], score_thresh=t)[0]
    assert np.all(above["scores"] > t) and 0 < len(above["scores"]) < len(all_boxes["scores"])


def test_predict_array_maps_boxes_and_masks_to_the_original_pixels(weights, shapes_dir):
    """A 2x larger copy of an image: the model sees (almost) the same input,
    so boxes come back doubled and the masks are the same probabilities
    pasted into the doubled boxes at the doubled size."""
    model, _ = load_model(weights)
    small = np.asarray(Image.open(shapes_dir / "images" / "shapes_5_00002.png").convert("RGB"))
    big = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)          # (128, 128, 3)
    det = predict_array(model, big, SIZE, score_thresh=0.0)
    x = np.asarray(Image.fromarray(big).resize((SIZE, SIZE), Image.BILINEAR),
                   np.float32).transpose(2, 0, 1) / 255
    step = predict_steps(model, x[None], score_thresh=0.0)[0]
    assert det["scale"] == 0.5 and len(det["boxes"]) > 0
    np.testing.assert_allclose(det["boxes"], step["boxes"] * 2, rtol=1e-12, atol=1e-9)
    assert det["masks"].shape == (len(det["boxes"]), 128, 128)
    np.testing.assert_array_equal(det["masks"],
                                  paste_masks(step["mask_probs"], step["boxes"] * 2, 128, 128))


def test_predict_array_on_a_non_square_image_stays_inside_it(weights, odd_images):
    model, _ = load_model(weights)
    _, rgb, _ = load_image(odd_images["wide"], SIZE)
    det = predict_array(model, rgb, SIZE, score_thresh=0.0)
    assert len(det["boxes"]) > 0
    b = det["boxes"]
    assert np.all(b[:, 0] >= 0) and np.all(b[:, 2] <= 90) and np.all(b[:, 1] >= 0) \
        and np.all(b[:, 3] <= 50)
    for box, mask in zip(b, det["masks"]):       # every mask pixel lies in its box crop
        if box[2] > box[0] and box[3] > box[1]:
            assert not np.any(mask & ~box_mask(box, mask.shape))
        else:                                    # a box wholly in the padding
            assert not mask.any()


@given(x1=st.floats(-5, 30), y1=st.floats(-5, 30), w=st.floats(0.01, 30),
       h=st.floats(0.01, 30), H=st.integers(1, 24), W=st.integers(1, 24))
def test_crop_window_holds_exactly_the_box_crop_pixels(x1, y1, w, h, H, W):
    box = (x1, y1, x1 + w, y1 + h)
    i0, i1, j0, j1 = crop_window(box, H, W)
    window = np.zeros((H, W), bool)
    if i1 > i0 and j1 > j0:
        window[i0:i1, j0:j1] = True
    np.testing.assert_array_equal(window, box_mask(box, (H, W)))


# ----------------------------------------------------------------------
# predict and crop commands
# ----------------------------------------------------------------------


def test_predict_writes_overlays_and_json_in_original_pixels(weights, shapes_dir, odd_images,
                                                             tmp_path, capsys):
    out = tmp_path / "pred"
    inputs = [shapes_dir / "images" / "shapes_5_00000.png", odd_images["wide"],
              odd_images["grey"]]
    code, stdout, err = _run(capsys, ["predict", "--weights", str(weights), "--out", str(out),
                                      "--score-thresh", "0", "--max-instances", "5",
                                      *map(str, inputs)])
    assert code == 0, err
    records = json.loads((out / "detections.json").read_text())
    assert [r["file"] for r in records] == [str(p) for p in inputs]
    names = {"circle", "square", "triangle", "bar"}
    model, _ = load_model(weights)
    for path, record in zip(inputs, records):
        overlay = out / f"{path.stem}_overlay.png"
        assert overlay.is_file() and str(overlay) in stdout
        with Image.open(path) as im:
            W, H = im.size
        assert (record["width"], record["height"]) == (W, H)
        assert len(record["instances"]) == 5          # --max-instances 5
        expected = predict_array(model, load_image(path, SIZE)[1], SIZE, score_thresh=0.0,
                                 max_detections=5)
        assert len(expected["boxes"]) == len(record["instances"])
        for inst, box, mask in zip(record["instances"], expected["boxes"], expected["masks"]):
            assert inst["label"] in names and 0 < inst["score"] < 1
            x1, y1, x2, y2 = inst["box"]
            assert 0 <= x1 <= x2 <= W and 0 <= y1 <= y2 <= H
            np.testing.assert_allclose(inst["box"], box, atol=1e-3)
            decoded = rle_to_mask(inst["mask"])
            assert decoded.shape == (H, W)
            np.testing.assert_array_equal(decoded, mask)


def test_predict_with_a_high_threshold_finds_nothing_and_still_writes(weights, shapes_dir,
                                                                      tmp_path, capsys):
    out = tmp_path / "pred"
    image = shapes_dir / "images" / "shapes_5_00000.png"
    code, stdout, _ = _run(capsys, ["predict", "--weights", str(weights), "--out", str(out),
                                    "--score-thresh", "0.99", str(image)])
    assert code == 0 and "0 instances" in stdout
    assert json.loads((out / "detections.json").read_text())[0]["instances"] == []
    assert (out / "shapes_5_00000_overlay.png").is_file()


def test_crop_writes_rgba_cutouts_transparent_outside_the_mask(weights, shapes_dir, odd_images,
                                                               tmp_path, capsys):
    out = tmp_path / "crop"
    inputs = [shapes_dir / "images" / "shapes_5_00001.png", odd_images["rgba"]]
    code, stdout, err = _run(capsys, ["crop", "--weights", str(weights), "--out", str(out),
                                      "--score-thresh", "0", "--max-instances", "5",
                                      *map(str, inputs)])
    assert code == 0, err
    records = json.loads((out / "crops.json").read_text())
    lines = stdout.strip().splitlines()
    assert len(lines) == len(records) > 0            # one line per instance, nothing else
    model, _ = load_model(weights)
    line_of = dict(zip(map(id, records), lines))     # the lines come in record order
    checked = 0
    for path in inputs:
        _, rgb, _ = load_image(path, SIZE)
        det = predict_array(model, rgb, SIZE, score_thresh=0.0, max_detections=5)
        mine = [r for r in records if r["image"] == str(path)]
        assert len(mine) == len(det["boxes"])
        for record, box, mask in zip(mine, det["boxes"], det["masks"]):
            line = line_of[id(record)]
            if record["file"] is None:
                continue
            assert line.startswith(record["file"]) and f"class={record['class']}" in line
            i0, i1, j0, j1 = crop_window(box, *rgb.shape[:2])
            with Image.open(record["file"]) as im:
                assert im.mode == "RGBA" and im.size == (j1 - j0, i1 - i0)
                cut = np.asarray(im)
            np.testing.assert_array_equal(cut[..., 3], np.where(mask[i0:i1, j0:j1], 255, 0))
            np.testing.assert_array_equal(cut[..., :3], rgb[i0:i1, j0:j1])
            assert record["mask_px"] == mask.sum() and record["box_px"] == cut.shape[0] * cut.shape[1]
            assert record["box_background"] == pytest.approx(background_fraction(mask, box))
            assert record["box_background"] == pytest.approx(1 - record["mask_px"] / record["box_px"])
            assert record["mask_background"] == 0.0
            assert f"box_background={record['box_background']:.3f}" in line
            checked += 1
    assert checked > 0


# ----------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, no traceback
# ----------------------------------------------------------------------


def _assert_clean_error(code, out, err, *words):
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minimask: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def two_class_weights(tmp_path_factory):
    """A checkpoint of the tiny model for 2 classes (the shapes have 4)."""
    from minimask.model import Config, RetinaMask
    from minimask.nn import save_npz
    model = RetinaMask(Config.preset("tiny", num_classes=2))
    path = tmp_path_factory.mktemp("two") / "checkpoint.npz"
    save_npz(path, model.state_dict(), {"step": 1, "config": model.config.to_dict(),
                                        "image_size": SIZE})
    return path


@pytest.fixture(scope="module")
def bad_files(weights, shapes_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    files = {}
    files["text"] = d / "notes.png"
    files["text"].write_text("this is not an image\n")
    files["truncated_weights"] = d / "truncated.npz"
    data = weights.read_bytes()
    files["truncated_weights"].write_bytes(data[: len(data) // 2])
    files["text_weights"] = d / "text.npz"
    files["text_weights"].write_text("hello\n")
    annotations = json.loads((shapes_dir / "annotations.json").read_text())
    del annotations["annotations"][1]["category_id"]
    files["no_category"] = d / "no_category.json"
    files["no_category"].write_text(json.dumps(annotations))
    files["not_json"] = d / "broken.json"
    files["not_json"].write_text('{"images": [')
    files["half_png"] = d / "half.png"
    png = (shapes_dir / "images" / "shapes_5_00000.png").read_bytes()
    files["half_png"].write_bytes(png[: len(png) // 3])
    return files


IMAGE = "shapes_5_00000.png"


@pytest.mark.parametrize("case", [
    "missing weights", "truncated weights", "text weights", "missing image", "text image",
    "truncated image", "image is a folder"])
@pytest.mark.parametrize("command", ["predict", "crop"])
def test_bad_inputs_to_predict_and_crop(command, case, weights, shapes_dir, bad_files, tmp_path,
                                        capsys):
    good_image = str(shapes_dir / "images" / IMAGE)
    w, image, words = str(weights), good_image, ()
    if case == "missing weights":
        w, words = str(tmp_path / "nope.npz"), ("nope.npz", "does not exist")
    elif case == "truncated weights":
        w, words = str(bad_files["truncated_weights"]), ("truncated.npz",)
    elif case == "text weights":
        w, words = str(bad_files["text_weights"]), ("text.npz", "not a .npz")
    elif case == "missing image":
        image, words = str(tmp_path / "ghost.png"), ("ghost.png", "does not exist")
    elif case == "text image":
        image, words = str(bad_files["text"]), ("notes.png", "not an image")
    elif case == "truncated image":
        image, words = str(bad_files["half_png"]), ("half.png",)
    elif case == "image is a folder":
        image, words = str(tmp_path), ("directory",)
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, [command, "--weights", w, "--out", str(out), good_image,
                                      image])
    _assert_clean_error(code, stdout, err, *words)
    if "image" in case:       # every image is read before anything is written
        assert not out.exists() or not any(out.iterdir())


def test_weights_of_another_configuration(two_class_weights, tmp_path, capsys):
    code, out, err = _run(capsys, ["evaluate", "--weights", str(two_class_weights),
                                   "--num-images", "1", "--out", str(tmp_path)])
    _assert_clean_error(code, out, err, "2 classes", "4")


def test_resume_from_a_checkpoint_of_another_configuration(two_class_weights, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(two_class_weights, run / "checkpoint.npz")
    code, out, err = _run(capsys, ["train", "--iters", "2", "--num-images", "2", "--image-size",
                                   str(SIZE), "--out", str(run), "--resume", "--no-progress"])
    _assert_clean_error(code, out, err, "2 classes", "4")


def test_resume_with_no_checkpoint(tmp_path, capsys):
    code, out, err = _run(capsys, ["train", "--iters", "2", "--out", str(tmp_path / "empty"),
                                   "--resume"])
    _assert_clean_error(code, out, err, "--resume", "checkpoint.npz")


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_unknown_dataset_name(command, weights, tmp_path, capsys):
    argv = [command, "--dataset", "imagenet", "--out", str(tmp_path)]
    if command == "evaluate":
        argv += ["--weights", str(weights)]
    code, out, err = _run(capsys, argv)
    _assert_clean_error(code, out, err, "unknown dataset 'imagenet'")


@pytest.mark.parametrize("case", ["missing field", "not json", "missing file",
                                  "missing image folder"])
def test_malformed_annotation_file(case, weights, shapes_dir, bad_files, tmp_path, capsys):
    images = str(shapes_dir / "images")
    if case == "missing field":
        ann, words = bad_files["no_category"], ("annotation 1", "category_id")
    elif case == "not json":
        ann, words = bad_files["not_json"], ("broken.json", "JSON")
    elif case == "missing file":
        ann, words = tmp_path / "absent.json", ("absent.json", "does not exist")
    else:
        ann, images, words = shapes_dir / "annotations.json", str(tmp_path / "nowhere"), \
            ("nowhere",)
    code, out, err = _run(capsys, ["evaluate", "--weights", str(weights), "--dataset", str(ann),
                                   "--images", images, "--out", str(tmp_path / "ev")])
    _assert_clean_error(code, out, err, *words)


def test_cuda_backend_without_a_gpu_is_a_clean_error(weights, shapes_dir, tmp_path, capsys):
    from minimask._cuda import cuda_available
    if cuda_available():
        pytest.skip("a CUDA device (or the simulator) is available here")
    code, out, err = _run(capsys, ["predict", "--weights", str(weights), "--backend", "cuda",
                                   "--out", str(tmp_path), str(shapes_dir / "images" / IMAGE)])
    _assert_clean_error(code, out, err, "cuda")


def test_bad_input_in_a_subprocess_leaves_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minimask", "predict", "--weights",
                             str(tmp_path / "missing.npz"), str(tmp_path / "x.png")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"minimask: error: weights file {str(tmp_path / 'missing.npz')!r} does not exist"]


@pytest.mark.parametrize("flag", ["--ranks", "--workers"])   # --workers: the old name
def test_more_ranks_than_images_per_batch(flag, tmp_path, capsys):
    code, out, err = _run(capsys, ["train", "--iters", "1", "--batch-size", "2", flag, "3",
                                   "--out", str(tmp_path / "w"), "--no-progress"])
    _assert_clean_error(code, out, err, "--ranks 3", "--batch-size 2")


def test_rank_count_from_flag_environment_or_cores(monkeypatch):
    from minimask import distributed
    from minimask.__main__ import CommandError, requested_ranks
    monkeypatch.setattr(distributed, "usable_cores", lambda: 16)
    monkeypatch.delenv("MINIMASK_RANKS", raising=False)
    args = build_parser().parse_args(["train", "--batch-size", "8"])
    assert requested_ranks(args) == 8
    monkeypatch.setenv("MINIMASK_RANKS", "3")
    assert requested_ranks(args) == 3
    assert requested_ranks(build_parser().parse_args(["train", "--ranks", "2"])) == 2
    monkeypatch.setenv("MINIMASK_RANKS", "two")
    with pytest.raises(CommandError, match="MINIMASK_RANKS"):
        requested_ranks(args)


# ----------------------------------------------------------------------
# train --set FIELD=VALUE (issue 11's study: one config field changed)
# ----------------------------------------------------------------------


def test_set_changes_the_config_the_checkpoint_records(tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, err = _run(capsys, [
        "train", "--iters", "2", "--num-images", "2", "--image-size", str(SIZE), "--out",
        str(out), "--eval-images", "0", "--no-progress", "--set", "mask_size=16",
        "--set", "roi_mode=max", "--set", "anchor_ratios=[0.25, 1, 4]"])
    assert code == 0, err
    assert "mask_size=16" in printed and "roi_mode='max'" in printed
    model, _ = load_model(out / "checkpoint.npz")
    c = model.config
    assert (c.mask_size, c.roi_mode, c.anchor_ratios) == (16, "max", (0.25, 1, 4))
    assert c.preset_name == "tiny" and c.num_classes == 4
    # everything not set is the tiny preset's
    from minimask.model.config import Config
    tiny = Config.preset("tiny", num_classes=4).to_dict()
    changed = {k for k, v in c.to_dict().items() if v != tiny[k]}
    assert changed == {"mask_size", "roi_mode", "anchor_ratios"}


@pytest.mark.parametrize("sets, expected", [
    (["mask_size=55"], "'mask_size' must be an even integer"),
    (["mask_siz=56"], "did you mean mask_size"),
    (["roi_mode=maxx"], "one of ['avg', 'max']"),
    (["mask_size"], "expected FIELD=VALUE"),
    (["seed=3"], "give --seed"),
    (["num_classes=7"], "from the dataset"),
    (["mask_size=56", "mask_size=28"], "given twice"),
])
def test_set_refuses_bad_fields_and_values_in_one_line(sets, expected, tmp_path, capsys):
    argv = ["train", "--iters", "1", "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    code, out, err = _run(capsys, argv)
    _assert_clean_error(code, out, err, expected)
    assert not (tmp_path / "run").exists()


def test_set_with_resume_or_weights_is_refused(weights, run_dir, tmp_path, capsys):
    code, out, err = _run(capsys, ["train", "--out", str(run_dir), "--resume", "--iters", "9",
                                   "--set", "mask_size=56"])
    _assert_clean_error(code, out, err, "--resume keeps the run's own config")
    code, out, err = _run(capsys, ["train", "--out", str(tmp_path / "r"), "--weights",
                                   str(weights), "--set", "mask_size=56"])
    _assert_clean_error(code, out, err, "--weights brings its own")
