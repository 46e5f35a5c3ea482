"""COCO box AP and mask AP of a model on a dataset, via pycocotools.

    from minimask.evaluate import evaluate, format_metrics
    metrics = evaluate(model, dataset, "runs/eval")
    print(format_metrics(metrics))

The steps:

1. ``model.predict`` on batches of images gives, per image, boxes
   ``(x1, y1, x2, y2)``, scores, labels ``0..K-1`` and pasted masks, all in
   model-input pixels.
2. For a ``CocoDataset`` these are mapped back to the ORIGINAL image: boxes
   divided by the dataset's scale ``s`` and clipped to the image; masks
   cropped to the unpadded content ``(round(H s), round(W s))`` and resized
   (nearest) to ``(H, W)``. The evaluation is then against the COCO file
   itself, crowd regions included. For other datasets (``ShapesDataset``)
   the model input is the original image and the ground truth is built in
   memory by the same conversion ``export_coco`` uses.
3. Detections are written in the COCO results format (``detections.json``)
   and scored by ``COCOeval`` twice, ``iouType="bbox"`` and ``"segm"``.

AP is averaged over IoU thresholds 0.50:0.05:0.95 (AP50, AP75 at one
threshold); APs/APm/APl restrict to areas < 32^2, 32^2..96^2, > 96^2 pixels.
pycocotools reports -1 where a number is undefined: no ground truth at all
(or none in an area range). With ground truth but no detections it reports
0. ``evaluate`` passes both through unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from minimask.data.coco import (CocoDataset, coco_ground_truth, dataset_categories,
                                mask_to_rle, target_to_annotations, _file_name, _image_id)

__all__ = ["evaluate", "format_metrics", "detections_to_coco", "coco_metrics", "per_category_ap",
           "CutoutReport", "METRIC_NAMES"]

# the first six numbers of COCOeval.stats, in its order
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _check_detection(d, n: int, H: int, W: int) -> None:
    for key in ("boxes", "scores", "labels", "masks"):
        if key not in d:
            raise ValueError(f"model.predict result {n} has no {key!r}")
    D = len(d["boxes"])
    if np.shape(d["boxes"]) not in ((D, 4),) or len(d["scores"]) != D or len(d["labels"]) != D:
        raise ValueError(f"model.predict result {n}: boxes (D, 4), scores (D,) and labels (D,) "
                         f"must agree, got {np.shape(d['boxes'])}, {np.shape(d['scores'])}, "
                         f"{np.shape(d['labels'])}")
    if np.shape(d["masks"]) != (D, H, W):
        raise ValueError(f"model.predict result {n}: masks must be (D, H, W) = {(D, H, W)}, "
                         f"got {np.shape(d['masks'])}")


def _to_original(d, dataset, index: int):
    """Boxes (D, 4) and masks (D, H0, W0) of one image's detections in the
    original image's pixels (see the module docstring, step 2)."""
    boxes = np.asarray(d["boxes"], dtype=np.float64)
    masks = np.asarray(d["masks"]).astype(bool)
    if not isinstance(dataset, CocoDataset):
        return boxes, masks
    from PIL import Image
    H0, W0 = dataset.original_size(index)
    h, w = dataset.resized_size(index)
    s = dataset.scale(index)
    boxes = boxes / s
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, W0)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, H0)
    out = np.zeros((len(masks), H0, W0), dtype=bool)
    for k, m in enumerate(masks):
        crop = Image.fromarray(m[:h, :w].astype(np.uint8) * 255)
        out[k] = np.asarray(crop.resize((W0, H0), Image.Resampling.NEAREST)) > 127
    return boxes, out


def detections_to_coco(boxes, scores, labels, masks, image_id: int, category_ids) -> list[dict]:
    """One image's detections in the COCO results format.

    Parameters
    ----------
    boxes : (D, 4) ``(x1, y1, x2, y2)``; scores : (D,); labels : (D,) in
    ``0..K-1``; masks : (D, H, W) bool; image_id : the COCO image id;
    category_ids : K COCO category ids, ``category_ids[label]``.

    Returns
    -------
    D dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score",
    "segmentation": {"size": [H, W], "counts": str}}``.
    """
    results = []
    for box, score, label, mask in zip(boxes, scores, labels, masks):
        x1, y1, x2, y2 = (float(v) for v in box)
        results.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                        "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                        "score": round(float(score), 5), "segmentation": mask_to_rle(mask)})
    return results


class CutoutReport:
    """How much background a cut-out keeps, per class, against the true masks.

    For each ground-truth object, the detection a user would cut it out with
    is the highest-scoring one of its class whose box overlaps the object's
    box at IoU >= 0.5 (any score). Of that detection's two crops,

        box crop:   |box \\ M| / |box|          (``masks.background_fraction``)
        mask crop:  |P \\ M| / |P|              (P its pasted mask, M the true one)

    are the shares of pixels that are not the object. The report keeps, per
    class, the objects, how many had such a detection, and the two means
    over those. Everything is in model-input pixels, where the targets are.
    """

    def __init__(self, class_names):
        self.class_names = list(class_names)
        K = len(self.class_names)
        self.objects = np.zeros(K, np.int64)
        self.matched = np.zeros(K, np.int64)
        self.box_bg = np.zeros(K)
        self.mask_bg = np.zeros(K)

    def add(self, detection: dict, target: dict) -> None:
        from minimask.boxes import box_iou
        from minimask.masks import background_fraction
        gt_boxes = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)
        gt_labels = np.asarray(target["labels"]).astype(np.int64)
        gt_masks = np.asarray(target["masks"]).astype(bool)
        boxes = np.asarray(detection["boxes"], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(detection["labels"]).astype(np.int64)
        scores = np.asarray(detection["scores"], dtype=np.float64)
        masks = np.asarray(detection["masks"]).astype(bool)
        iou = box_iou(gt_boxes, boxes) if len(gt_boxes) and len(boxes) else \
            np.zeros((len(gt_boxes), len(boxes)))
        for g, c in enumerate(gt_labels):
            self.objects[c] += 1
            ok = np.flatnonzero((labels == c) & (iou[g] >= 0.5))
            if not len(ok):
                continue
            d = ok[np.argmax(scores[ok])]
            self.matched[c] += 1
            self.box_bg[c] += background_fraction(gt_masks[g], boxes[d])
            p = masks[d]
            # an empty pasted mask cuts out nothing: no background, but no
            # object either - count it as all background, the honest worst
            self.mask_bg[c] += 1.0 - (p & gt_masks[g]).sum() / p.sum() if p.any() else 1.0

    def as_dict(self) -> dict:
        out = {}
        for c, name in enumerate(self.class_names):
            m = int(self.matched[c])
            out[name] = {"objects": int(self.objects[c]), "matched": m,
                         "box_crop_background": float(self.box_bg[c] / m) if m else -1.0,
                         "mask_crop_background": float(self.mask_bg[c] / m) if m else -1.0}
        return out


def _coco_api(dataset_dict: dict):
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(dataset_dict)
        coco.createIndex()
    return coco


def per_category_ap(ev) -> dict:
    """``{category id: {"AP", "AP50"}}`` from an accumulated ``COCOeval``.

    ``ev.eval["precision"]`` has shape (IoU thresholds, recall points,
    categories, area ranges, max detections); -1 marks a cell with no
    ground truth. A category's AP is the mean of its defined cells over all
    IoU thresholds and recall points, for all areas and 100 detections per
    image - the same average ``COCOeval.summarize`` takes over every
    category together, restricted to one (detectron2 reports it this way).
    AP50 takes the first IoU threshold, 0.5, alone. -1 where the category
    has no ground truth.
    """
    precision = ev.eval["precision"]
    area_all = list(ev.params.areaRngLbl).index("all")
    t50 = int(np.argmin(np.abs(np.asarray(ev.params.iouThrs) - 0.5)))
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, area_all, -1]
        p50 = p[t50]
        out[int(cat_id)] = {"AP": float(p[p > -1].mean()) if np.any(p > -1) else -1.0,
                            "AP50": float(p50[p50 > -1].mean()) if np.any(p50 > -1) else -1.0}
    return out


def coco_metrics(ground_truth: dict, detections: list[dict]) -> dict:
    """``{"bbox": {AP, AP50, AP75, APs, APm, APl}, "segm": {...},
    "per_category": {"bbox": {name: {"AP", "AP50"}}, "segm": {...}}}`` from
    COCOeval on a ground-truth COCO dict and a list of results.

    For ``segm`` the detections go in without their ``bbox``, so that
    pycocotools takes each detection's area (for APs/APm/APl) from its mask
    rather than from its box, as it does for the ground truth. Per category
    (see ``per_category_ap``), names come from the ground truth's categories.
    """
    from pycocotools.cocoeval import COCOeval
    gt = _coco_api(ground_truth)
    metrics = {}
    names = {c["id"]: str(c.get("name", c["id"])) for c in ground_truth["categories"]}
    per_category = {}
    for iou_type in ("bbox", "segm"):
        if iou_type == "bbox":
            dets = [{k: v for k, v in d.items() if k != "segmentation"} for d in detections]
        else:
            dets = [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
        with contextlib.redirect_stdout(io.StringIO()):
            if dets:
                dt = gt.loadRes(copy.deepcopy(dets))
            else:
                # loadRes cannot take an empty list (it looks at the first
                # element): an empty results set is built by hand instead
                dt = _coco_api({"images": ground_truth["images"], "annotations": [],
                                "categories": ground_truth["categories"]})
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[iou_type] = {name: float(v) for name, v in zip(METRIC_NAMES, ev.stats[:6])}
        per_category[iou_type] = {names[c]: v for c, v in per_category_ap(ev).items()}
    metrics["per_category"] = per_category
    return metrics


def evaluate(model, dataset, out_dir, batch_size: int = 8, progress: bool = True) -> dict:
    """COCO box and mask AP of ``model`` on ``dataset``.

    Parameters
    ----------
    model : anything with ``predict(images (N, 3, H, W) float32)`` -> list of
        ``{"boxes" (D, 4) x1y1x2y2, "scores" (D,), "labels" (D,) in 0..K-1,
        "masks" (D, H, W) bool}`` (``RetinaMask``).
    dataset : ``CocoDataset``, ``ShapesDataset`` or any dataset giving
        ``(image (3, H, W), target)`` with ``class_names``/``num_classes``.
    out_dir : folder for ``detections.json`` (COCO results, original image
        pixels, category ids of the ground truth) and ``metrics.json``.
    batch_size : images per ``predict`` call.
    progress : print a progress line and the metrics table to stderr.

    Returns
    -------
    ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "segm": {...}}``,
    floats in [0, 1], or -1 where pycocotools finds the number undefined;
    ``"per_category"``: box and mask AP / AP50 of each class
    (``coco_metrics``); ``"cutout"``: per class, the background share of the
    box crop and of the mask crop of each object's detection
    (``CutoutReport``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("dataset has no images to evaluate")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names, category_ids = dataset_categories(dataset)
    is_coco = isinstance(dataset, CocoDataset)
    gt_images, gt_annotations, detections = [], [], []
    cutouts = CutoutReport(class_names)
    start, N = time.time(), len(dataset)
    for first in range(0, N, batch_size):
        indices = list(range(first, min(N, first + batch_size)))
        items = [dataset[i] for i in indices]
        images = np.stack([np.asarray(img, dtype=np.float32) for img, _ in items])
        results = model.predict(images)
        if len(results) != len(indices):
            raise ValueError(f"model.predict gave {len(results)} results for {len(indices)} images")
        for i, (image, target), d in zip(indices, items, results):
            _check_detection(d, i, image.shape[-2], image.shape[-1])
            cutouts.add(d, target)
            image_id = _image_id(dataset, i)
            boxes, masks = _to_original(d, dataset, i)
            detections += detections_to_coco(boxes, np.asarray(d["scores"]),
                                              np.asarray(d["labels"]), masks, image_id,
                                              category_ids)
            if not is_coco:   # the ground truth in memory, from the same pass
                gt_images.append({"id": image_id, "file_name": _file_name(dataset, i),
                                  "height": int(image.shape[-2]), "width": int(image.shape[-1])})
                gt_annotations += target_to_annotations(target, image_id, category_ids,
                                                        first_id=len(gt_annotations) + 1)
        if progress:
            done = indices[-1] + 1
            print(f"\revaluating {done}/{N} images ({time.time() - start:.1f} s)",
                  end="" if done < N else "\n", file=sys.stderr, flush=True)
    if is_coco:
        ground_truth = coco_ground_truth(dataset)
    else:
        ground_truth = {"images": gt_images, "annotations": gt_annotations,
                        "categories": [{"id": c, "name": n} for c, n in zip(category_ids,
                                                                             class_names)]}
    metrics = coco_metrics(ground_truth, detections)
    metrics["cutout"] = cutouts.as_dict()
    _write_json(out_dir / "detections.json", detections)
    _write_json(out_dir / "metrics.json", metrics)
    return metrics


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1 if isinstance(obj, dict) else None))
    os.replace(tmp, path)


def _percent(v, width: int = 8) -> str:
    return f"{'-':>{width}}" if v is None or v < 0 else f"{100 * v:{width}.1f}"


def format_metrics(metrics: dict) -> str:
    """A small table of ``evaluate``'s metrics, one row per IoU type, in
    percent; ``-`` where pycocotools reported -1 (undefined). When the
    metrics hold ``per_category``, a second table gives box and mask AP and
    AP50 of each category, so a weak class shows without any code."""
    header = f"{'':6}" + "".join(f"{name:>8}" for name in METRIC_NAMES)
    rows = [header]
    for iou_type in ("bbox", "segm"):
        if iou_type not in metrics:
            continue
        cells = [_percent(metrics[iou_type].get(name)) for name in METRIC_NAMES]
        rows.append(f"{iou_type:6}" + "".join(cells))
    per = metrics.get("per_category") or {}
    names = list(dict.fromkeys(n for t in ("bbox", "segm") for n in per.get(t, {})))
    if names:
        width = max(8, max(len(n) for n in names))
        rows += ["", f"{'category':{width}}" + "".join(
            f"{h:>10}" for h in ("box AP", "box AP50", "mask AP", "mask AP50"))]
        for n in names:
            b, m = per.get("bbox", {}).get(n, {}), per.get("segm", {}).get(n, {})
            rows.append(f"{n:{width}}" + "".join(_percent(v, 10) for v in (
                b.get("AP"), b.get("AP50"), m.get("AP"), m.get("AP50"))))
    cut = metrics.get("cutout") or {}
    if cut:
        width = max(8, max(len(n) for n in cut))
        rows += ["", "background kept by a cut-out (share of the crop that is not the object,",
                 "mean over objects with a detection of their class at box IoU >= 0.5)",
                 f"{'category':{width}}" + "".join(f"{h:>10}" for h in ("matched", "box crop",
                                                                        "mask crop"))]
        for n, r in cut.items():
            rows.append(f"{n:{width}}" + f"{r['matched']:>5}/{r['objects']:<4}" + "".join(
                f"{'-':>10}" if v < 0 else f"{v:10.3f}"
                for v in (r["box_crop_background"], r["mask_crop_background"])))
    return "\n".join(rows)
