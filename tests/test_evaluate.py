"""Evaluation plumbing: a fake model that returns the ground truth scores
AP = 1 for boxes and masks; spoiling its boxes or masks lowers exactly the
matching AP; detections are written in the COCO results format and, for a
CocoDataset of non-square images, in the ORIGINAL image's pixels."""
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from minimask.data.coco import CocoDataset
from minimask.data.synthetic import ShapesDataset
from minimask.evaluate import METRIC_NAMES, evaluate, format_metrics

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class FakeModel:
    """Predicts each image's ground truth (found by matching the image
    against the dataset's), optionally spoiled by ``spoil(d) -> d``."""

    def __init__(self, dataset, spoil=None):
        self.items = [dataset[i] for i in range(len(dataset))]
        self.spoil = spoil
        self.calls = []

    def predict(self, images):
        assert images.dtype == np.float32 and images.ndim == 4
        self.calls.append(len(images))
        out = []
        for image in images:
            (target,) = [t for img, t in self.items if np.array_equal(img, image)]
            D = len(target["labels"])
            d = {"boxes": target["boxes"].astype(np.float32).copy(),
                 "scores": np.linspace(0.9, 0.5, D).astype(np.float32),
                 "labels": target["labels"].copy(), "masks": target["masks"].copy()}
            out.append(self.spoil(d) if self.spoil else d)
        return out


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(seed=2, num_images=5, size=64)


def test_perfect_predictions_score_ap_one(tmp_path, shapes):
    model = FakeModel(shapes)
    metrics = evaluate(model, shapes, tmp_path, batch_size=2, progress=False)
    assert model.calls == [2, 2, 1]
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == set(METRIC_NAMES)
        assert metrics[iou_type]["AP"] == 1.0, metrics
        assert metrics[iou_type]["AP50"] == 1.0 and metrics[iou_type]["AP75"] == 1.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics


def test_detections_json_is_coco_results(tmp_path, shapes):
    evaluate(FakeModel(shapes), shapes, tmp_path, progress=False)
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert isinstance(dets, list)
    expected = sum(len(shapes[i][1]["labels"]) for i in range(len(shapes)))
    assert len(dets) == expected > 0
    image_ids = {shapes.image_id(i) for i in range(len(shapes))}
    for d in dets:
        assert set(d) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert d["image_id"] in image_ids and d["category_id"] in (1, 2, 3, 4)
        assert len(d["bbox"]) == 4 and d["bbox"][2] > 0 and d["bbox"][3] > 0
        assert 0.5 <= d["score"] <= 0.9
        seg = d["segmentation"]
        assert seg["size"] == [64, 64] and isinstance(seg["counts"], str)
        mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        x, y, w, h = mask_utils.toBbox({"size": seg["size"], "counts": seg["counts"].encode()})
        assert mask.sum() > 0 and [x, y, w, h] == d["bbox"]   # fake boxes are mask boxes
    # the first image's detections are its ground truth, class for class
    _, target = shapes[0]
    first = [d for d in dets if d["image_id"] == shapes.image_id(0)]
    assert [d["category_id"] for d in first] == list(target["labels"] + 1)


def _shift_boxes(d):
    d["boxes"] = d["boxes"] + np.array([4, 3, 4, 3], np.float32)
    return d


def _erode_masks(d):
    # keep only every other row of each mask: IoU with the truth about 1/2
    d["masks"] = d["masks"].copy()
    d["masks"][:, ::2] = False
    return d


def test_spoiled_boxes_lower_box_ap_only(tmp_path, shapes):
    metrics = evaluate(FakeModel(shapes, _shift_boxes), shapes, tmp_path, progress=False)
    assert metrics["bbox"]["AP"] < 0.9, metrics
    assert metrics["segm"]["AP"] == 1.0                  # the masks were left alone


def test_spoiled_masks_lower_mask_ap_only(tmp_path, shapes):
    metrics = evaluate(FakeModel(shapes, _erode_masks), shapes, tmp_path, progress=False)
    assert metrics["segm"]["AP"] < 0.5, metrics
    assert metrics["bbox"]["AP"] == 1.0


def test_no_detections_give_zero_ap_not_a_crash(tmp_path, shapes):
    def nothing(d):
        return {"boxes": d["boxes"][:0], "scores": d["scores"][:0], "labels": d["labels"][:0],
                "masks": d["masks"][:0]}
    metrics = evaluate(FakeModel(shapes, nothing), shapes, tmp_path, progress=False)
    # ground truth and no detections: pycocotools says precision 0; the
    # area ranges with no ground truth at all stay -1 (undefined)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == 0.0 and metrics[iou_type]["AP50"] == 0.0
        assert all(v in (0.0, -1.0) for v in metrics[iou_type].values())
    assert json.loads((tmp_path / "detections.json").read_text()) == []


def test_untrained_tiny_model_runs_through(tmp_path):
    from minimask.model import Config, RetinaMask
    model = RetinaMask(Config.preset("tiny", num_classes=4))
    ds = ShapesDataset(seed=0, num_images=2, size=64)
    metrics = evaluate(model, ds, tmp_path, batch_size=2, progress=False)
    for iou_type in ("bbox", "segm"):
        assert all(-1.0 <= v <= 1.0 for v in metrics[iou_type].values())
    assert isinstance(json.loads((tmp_path / "detections.json").read_text()), list)


# ------------------------------------------------- CocoDataset, original size


def _coco_with_rectangles(tmp_path):
    """Two non-square images, each scaled by exactly 1/2 into 64 x 64, with
    rectangles on even coordinates, so that downscaling and the nearest
    upscaling back are both exact."""
    rects = {1: [(10, 6, 50, 30), (60, 40, 120, 90)], 2: [(4, 20, 40, 100)]}
    sizes = {1: (96, 128), 2: (128, 64)}          # (H, W)
    images, annotations = [], []
    for image_id, (H, W) in sizes.items():
        name = f"img{image_id}.png"
        rng = np.random.default_rng(image_id)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / name)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        for x1, y1, x2, y2 in rects[image_id]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": 5 if image_id == 1 else 8,
                                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 8, "name": "b"}, {"id": 5, "name": "a"}]}))
    return CocoDataset(path, tmp_path, image_size=64), rects, sizes


def test_coco_dataset_detections_mapped_to_original_size(tmp_path):
    dataset, rects, sizes = _coco_with_rectangles(tmp_path)
    assert [dataset.scale(i) for i in range(2)] == [0.5, 0.5]
    metrics = evaluate(FakeModel(dataset), dataset, tmp_path / "eval", progress=False)
    assert metrics["bbox"]["AP"] == 1.0 and metrics["segm"]["AP"] == 1.0, metrics
    dets = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert len(dets) == 3
    for d in dets:
        H, W = sizes[d["image_id"]]
        assert d["category_id"] == (5 if d["image_id"] == 1 else 8)     # COCO ids back
        assert d["segmentation"]["size"] == [H, W]
        x, y, w, h = d["bbox"]
        assert (x, y, x + w, y + h) in rects[d["image_id"]]
        x1, y1, x2, y2 = (int(v) for v in (x, y, x + w, y + h))
        mask = mask_utils.decode({"size": [H, W], "counts": d["segmentation"]["counts"].encode()})
        expected = np.zeros((H, W), np.uint8)
        expected[y1:y2, x1:x2] = 1
        np.testing.assert_array_equal(mask, expected)


def test_coco_boxes_clipped_to_the_original_image(tmp_path):
    dataset, _, sizes = _coco_with_rectangles(tmp_path)

    def overflow(d):
        d["boxes"] = d["boxes"] + np.array([-30, -30, 30, 30], np.float32)
        return d
    evaluate(FakeModel(dataset, overflow), dataset, tmp_path / "eval", progress=False)
    for d in json.loads((tmp_path / "eval" / "detections.json").read_text()):
        H, W = sizes[d["image_id"]]
        x, y, w, h = d["bbox"]
        assert x >= 0 and y >= 0 and x + w <= W and y + h <= H
    # image 2 is 64 wide: its content ends at x = 32 in the model input, so
    # a box reaching x = 64 there maps to W = 64 at most, not 128
    assert max(d["bbox"][0] + d["bbox"][2] for d in
               json.loads((tmp_path / "eval" / "detections.json").read_text())
               if d["image_id"] == 2) == 64


def test_crowd_region_does_not_count_against_detections(tmp_path):
    """A detection on a crowd region is ignored, not a false positive."""
    dataset, _, _ = _coco_with_rectangles(tmp_path)
    data = json.loads(dataset.annotations_path.read_text())
    data["annotations"].append({"id": 99, "image_id": 2, "category_id": 8, "iscrowd": 1,
                                "segmentation": [[44, 4, 60, 4, 60, 16, 44, 16]]})
    dataset.annotations_path.write_text(json.dumps(data))
    dataset = CocoDataset(dataset.annotations_path, tmp_path, image_size=64)
    assert len(dataset[1][1]["labels"]) == 1            # the crowd is not a target

    def plus_crowd_detection(d):
        if len(d["labels"]) == 1:                            # image 2 (category 8: label 1)
            assert d["labels"][0] == 1
            crowd = np.zeros((1, 64, 64), bool)
            crowd[0, 2:8, 22:30] = True
            d = {"boxes": np.concatenate([d["boxes"], [[22, 2, 30, 8]]]).astype(np.float32),
                 "scores": np.array([0.3, 0.95], np.float32),    # the crowd scores highest
                 "labels": np.array([1, 1]), "masks": np.concatenate([d["masks"], crowd])}
        return d
    metrics = evaluate(FakeModel(dataset, plus_crowd_detection), dataset, tmp_path / "e",
                       progress=False)
    assert len(json.loads((tmp_path / "e" / "detections.json").read_text())) == 4
    assert metrics["bbox"]["AP"] == 1.0 and metrics["segm"]["AP"] == 1.0, metrics
    # the same detection without the crowd region is a false positive
    data["annotations"].pop()
    dataset.annotations_path.write_text(json.dumps(data))
    dataset = CocoDataset(dataset.annotations_path, tmp_path, image_size=64)
    metrics = evaluate(FakeModel(dataset, plus_crowd_detection), dataset, tmp_path / "f",
                       progress=False)
    assert metrics["bbox"]["AP"] < 1.0 and metrics["segm"]["AP"] < 1.0, metrics


# ------------------------------------------------- format, refusals


def test_format_metrics_table():
    metrics = {"bbox": dict(zip(METRIC_NAMES, [0.5, 0.75, 0.25, -1.0, 0.125, 1.0])),
               "segm": dict(zip(METRIC_NAMES, [0.0] * 6))}
    lines = format_metrics(metrics).splitlines()
    assert lines[0].split() == list(METRIC_NAMES)
    assert lines[1].split() == ["bbox", "50.0", "75.0", "25.0", "-", "12.5", "100.0"]
    assert lines[2].split() == ["segm"] + ["0.0"] * 6


def test_bad_arguments_and_bad_predictions(tmp_path, shapes):
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(FakeModel(shapes), shapes, tmp_path, batch_size=0, progress=False)

    def wrong_masks(d):
        d["masks"] = d["masks"][:, :10]
        return d
    with pytest.raises(ValueError, match=r"masks must be \(D, H, W\)"):
        evaluate(FakeModel(shapes, wrong_masks), shapes, tmp_path, progress=False)


def test_progress_prints_a_line_and_leaves_the_table_to_the_caller(tmp_path, shapes, capsys):
    metrics = evaluate(FakeModel(shapes), shapes, tmp_path, batch_size=5, progress=True)
    captured = capsys.readouterr()
    assert "evaluating 5/5 images" in captured.err and "bbox" not in captured.err
    table = format_metrics(metrics)
    assert "bbox" in table and "100.0" in table


# ------------------------------------------------- per-category AP (issue 11)


def _square_mask(H, W, x1, y1, x2, y2):
    m = np.zeros((H, W), dtype=bool)
    m[y1:y2, x1:x2] = True
    return m


def test_per_category_ap_by_hand():
    """One image, one object each of categories 1 and 2, none of 3.
    Category 1: a perfect detection alone -> AP 1. Category 2: a false
    detection scored above the perfect one -> precision 1/2 at every
    recall level (COCO interpolates precision as the best at any higher
    recall) -> AP 0.5. Category 3 has no ground truth -> -1 (undefined)."""
    from minimask.data.coco import mask_to_rle
    from minimask.evaluate import coco_metrics
    H = W = 40
    a, b = _square_mask(H, W, 2, 2, 12, 12), _square_mask(H, W, 20, 20, 36, 30)
    fp = _square_mask(H, W, 25, 2, 38, 14)
    gt = {"images": [{"id": 7, "height": H, "width": W, "file_name": "x.png"}],
          "categories": [{"id": 1, "name": "cat1"}, {"id": 2, "name": "cat2"},
                         {"id": 3, "name": "cat3"}],
          "annotations": [
              {"id": 1, "image_id": 7, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
               "iscrowd": 0, "segmentation": mask_to_rle(a)},
              {"id": 2, "image_id": 7, "category_id": 2, "bbox": [20, 20, 16, 10], "area": 160,
               "iscrowd": 0, "segmentation": mask_to_rle(b)}]}
    dets = [{"image_id": 7, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9,
             "segmentation": mask_to_rle(a)},
            {"image_id": 7, "category_id": 2, "bbox": [25, 2, 13, 12], "score": 0.95,
             "segmentation": mask_to_rle(fp)},
            {"image_id": 7, "category_id": 2, "bbox": [20, 20, 16, 10], "score": 0.8,
             "segmentation": mask_to_rle(b)}]
    metrics = coco_metrics(gt, dets)
    for iou_type in ("bbox", "segm"):
        per = metrics["per_category"][iou_type]
        assert set(per) == {"cat1", "cat2", "cat3"}
        # pycocotools divides by tp + fp + eps (np.spacing(1)): 1 - 2e-16, not 1
        assert per["cat1"] == {"AP": pytest.approx(1.0, abs=1e-12),
                               "AP50": pytest.approx(1.0, abs=1e-12)}, per
        assert per["cat2"]["AP"] == pytest.approx(0.5) and per["cat2"]["AP50"] == pytest.approx(0.5)
        assert per["cat3"] == {"AP": -1.0, "AP50": -1.0}
        # the overall AP is the mean over the categories that have ground truth
        assert metrics[iou_type]["AP"] == pytest.approx(0.75)


def test_per_category_ap_singles_out_the_spoiled_class(tmp_path, shapes):
    """Erode only the bars' masks: the bar row drops, every other class stays at 1."""
    bar = shapes.class_names.index("bar")

    def erode_bars(d):
        d["masks"][d["labels"] == bar, :, ::2] = False
        return d
    metrics = evaluate(FakeModel(shapes, erode_bars), shapes, tmp_path, progress=False)
    per = metrics["per_category"]
    present = {shapes.class_names[int(l)] for i in range(len(shapes)) for l in shapes[i][1]["labels"]}
    assert "bar" in present, "the fixture must hold a bar for this test to mean anything"
    for name in present:
        assert per["bbox"][name]["AP"] == pytest.approx(1.0, abs=1e-12)
        if name == "bar":
            assert per["segm"][name]["AP"] < 0.5, per["segm"]
        else:
            assert per["segm"][name]["AP"] == pytest.approx(1.0, abs=1e-12), (name, per["segm"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["per_category"] == per
    table = format_metrics(metrics)
    section = table.split("box AP  box AP50")[1].split("\n\n")[0]
    rows = {line.split()[0]: line.split()[1:] for line in section.splitlines()[1:] if line.strip()}
    assert rows["bar"][0] == "100.0" and float(rows["bar"][2]) < 50, table


# ------------------------------------------------- cut-out background (issue 11)


class _OneScene:
    """One 40x40 image: a filled square (class 0) and a one-pixel diagonal
    line (class 1) in the box [20, 20, 30, 30]."""
    class_names = ["square", "line"]

    def __init__(self):
        H = W = 40
        sq = np.zeros((H, W), bool)
        sq[2:12, 2:12] = True
        line = np.zeros((H, W), bool)
        line[np.arange(20, 30), np.arange(20, 30)] = True
        self.target = {"boxes": np.array([[2, 2, 12, 12], [20, 20, 30, 30]], np.float32),
                       "labels": np.array([0, 1]), "masks": np.stack([sq, line])}
        self.image = np.random.default_rng(0).random((3, H, W)).astype(np.float32)

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.image, self.target


def test_cutout_background_by_hand(tmp_path):
    scene = _OneScene()

    def fatter_line(d):
        # the line's predicted mask gets 10 extra pixels next to the diagonal
        d["masks"][1, np.arange(20, 30), np.arange(21, 31)] = True
        return d
    cut = evaluate(FakeModel(scene, fatter_line), scene, tmp_path, progress=False)["cutout"]
    assert cut["square"] == {"objects": 1, "matched": 1, "box_crop_background": 0.0,
                             "mask_crop_background": 0.0}
    # box crop: 100 pixels, 10 of them the line -> 0.9; mask crop: 20 pixels, 10 of them the line
    assert cut["line"]["matched"] == 1
    assert cut["line"]["box_crop_background"] == pytest.approx(0.9)
    assert cut["line"]["mask_crop_background"] == pytest.approx(0.5)


def test_cutout_needs_a_detection_of_the_right_class(tmp_path):
    scene = _OneScene()

    def swap_labels(d):
        d["labels"] = d["labels"][::-1].copy()
        return d
    cut = evaluate(FakeModel(scene, swap_labels), scene, tmp_path, progress=False)["cutout"]
    for name in ("square", "line"):
        assert cut[name]["objects"] == 1 and cut[name]["matched"] == 0
        assert cut[name]["mask_crop_background"] == -1.0
    assert "background kept by a cut-out" in format_metrics({"cutout": cut})
    line_row = [r for r in format_metrics({"cutout": cut}).splitlines() if r.startswith("line")]
    assert line_row and line_row[0].split() == ["line", "0/1", "-", "-"], line_row
