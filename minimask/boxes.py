r"""Boxes: IoU, non-maximum suppression, and the box coder.

Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates with no
``+1``: a box from 0 to 10 is 10 pixels wide (torchvision and detectron2's
convention).

IoU
    iou(a, b) = |a ∩ b| / |a ∪ b|; two boxes with no area at all have IoU 0
    (not 0/0).

Box coder (RetinaNet, torchvision's ``BoxCoder``)
    An anchor with centre (x_a, y_a) and size (w_a, h_a) and a box with
    (x, y, w, h) are related by the four regression targets

        dx = wx (x - x_a) / w_a       dy = wy (y - y_a) / h_a
        dw = ww log(w / w_a)          dh = wh log(h / h_a)

    ``decode_boxes`` inverts this; it clamps dw, dh at log(1000/16) so that
    an untrained head cannot overflow ``exp``.

NMS
    Greedy: take the highest-scoring box, drop every remaining box whose IoU
    with it exceeds the threshold, repeat. ``batched_nms`` does this per
    class, so boxes of different classes never suppress each other.

    ``nms_numpy`` is the readable reference: one (N, N) IoU matrix, then
    the greedy pass. ``nms`` is the same pass in a Numba kernel that
    computes an IoU only between a kept box and the boxes still alive after
    it: early in training a class can have thousands of candidates, and
    the full matrix (N^2 IoUs and memory) was a fifth of a training step.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_boxes(name, boxes):
    boxes = np.asarray(boxes)
    if boxes.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a numeric array, got dtype {boxes.dtype}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (B, 4) of (x1, y1, x2, y2), got shape {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return boxes


def box_area(boxes) -> np.ndarray:
    """Area of each ``(x1, y1, x2, y2)`` box; (B, 4) -> (B,).

    Integer boxes are multiplied in int64 and float16 in float32: the area
    of a box is about the square of its coordinates, which overflows a
    narrow type (int8 ``[0, 0, 100, 100]`` would give 16)."""
    boxes = _check_boxes("boxes", boxes)
    if boxes.dtype.kind in "iu":
        boxes = boxes.astype(np.int64)
    elif boxes.dtype.itemsize < 4:
        boxes = boxes.astype(np.float32)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a, b) -> np.ndarray:
    """Intersection over union of every pair: (A, 4), (B, 4) -> (A, B)."""
    a = _check_boxes("a", a)
    b = _check_boxes("b", b)
    dtype = np.result_type(a.dtype, b.dtype, np.float32)
    a, b = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0).astype(dtype)


def _nms_inputs(boxes, scores):
    boxes = _check_boxes("boxes", boxes)
    scores = np.asarray(scores)
    if scores.shape != (len(boxes),):
        raise ValueError(f"scores must have shape ({len(boxes)},), got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contains NaN or infinite values")
    boxes = boxes.astype(np.result_type(boxes.dtype, np.float32), copy=False)
    return boxes, np.argsort(-scores, kind="stable")


@njit(cache=True)
def _nms_kernel(boxes, order, iou_threshold):
    n = len(order)
    suppressed = np.zeros(n, dtype=np.bool_)          # by position in ``order``
    keep = np.empty(n, dtype=np.int64)
    n_keep = 0
    zero = boxes[0, 0] - boxes[0, 0]          # 0 in the boxes dtype (float32 * 0 is float64)
    for a in range(n):
        if suppressed[a]:
            continue
        i = order[a]
        keep[n_keep] = i
        n_keep += 1
        x1, y1, x2, y2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        area_i = (x2 - x1) * (y2 - y1)
        for b in range(a + 1, n):
            if suppressed[b]:
                continue
            j = order[b]
            # the same operations, in the same order, as box_iou
            w = min(x2, boxes[j, 2]) - max(x1, boxes[j, 0])
            h = min(y2, boxes[j, 3]) - max(y1, boxes[j, 1])
            w = max(w, zero)
            h = max(h, zero)
            inter = w * h
            union = area_i + (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]) - inter
            iou = inter / union if union > 0 else zero
            if iou > iou_threshold:
                suppressed[b] = True
    return keep[:n_keep]


def nms(boxes, scores, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept by greedy NMS, highest score first.

    A box is dropped when its IoU with a kept, higher-scoring box is greater
    than ``iou_threshold`` (as ``torchvision.ops.nms``). Equal scores keep
    their input order (a stable sort). Same result as ``nms_numpy``.
    """
    boxes, order = _nms_inputs(boxes, scores)
    if len(order) == 0:
        return np.zeros(0, dtype=np.int64)
    return _nms_kernel(np.ascontiguousarray(boxes), order.astype(np.int64),
                       boxes.dtype.type(iou_threshold))


def nms_numpy(boxes, scores, iou_threshold: float) -> np.ndarray:
    """``nms`` the plain way: every pairwise IoU, then the greedy pass."""
    boxes, order = _nms_inputs(boxes, scores)
    if len(order) == 0:
        return np.zeros(0, dtype=np.int64)
    iou = box_iou(boxes, boxes)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes, scores, labels, iou_threshold: float) -> np.ndarray:
    """NMS run separately for each label; indices kept, highest score first."""
    boxes = _check_boxes("boxes", boxes)
    scores, labels = np.asarray(scores), np.asarray(labels)
    keep = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        keep.append(idx[nms(boxes[idx], scores[idx], iou_threshold)])
    if not keep:
        return np.zeros(0, dtype=np.int64)
    keep = np.concatenate(keep)
    return keep[np.argsort(-scores[keep], kind="stable")]


def _centres(boxes):
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode_boxes(gt, anchors, weights=(1.0, 1.0, 1.0, 1.0)) -> np.ndarray:
    """Regression targets ``(dx, dy, dw, dh)`` taking ``anchors`` to ``gt``
    (row by row; both (B, 4)). Boxes of zero or negative size are refused:
    their ``log`` would be -inf."""
    gt = _check_boxes("gt", gt)
    anchors = _check_boxes("anchors", anchors)
    if gt.shape != anchors.shape:
        raise ValueError(f"gt and anchors must have the same shape, got {gt.shape} and {anchors.shape}")
    gx, gy, gw, gh = _centres(gt)
    ax, ay, aw, ah = _centres(anchors)
    if np.any(gw <= 0) or np.any(gh <= 0):
        raise ValueError("gt contains a box with zero or negative width or height")
    if np.any(aw <= 0) or np.any(ah <= 0):
        raise ValueError("anchors contains a box with zero or negative width or height")
    wx, wy, ww, wh = weights
    return np.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                     ww * np.log(gw / aw), wh * np.log(gh / ah)], axis=1)


def decode_boxes(deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0)) -> np.ndarray:
    """Boxes from regression ``deltas`` (B, 4) applied to ``anchors`` (B, 4);
    the inverse of ``encode_boxes``, with dw, dh clamped at log(1000/16)."""
    deltas = _check_boxes("deltas", deltas)
    anchors = _check_boxes("anchors", anchors)
    if deltas.shape != anchors.shape:
        raise ValueError(f"deltas and anchors must have the same shape, got {deltas.shape} and {anchors.shape}")
    ax, ay, aw, ah = _centres(anchors.astype(deltas.dtype if deltas.dtype.kind == "f" else np.float64))
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = np.minimum(deltas[:, 2] / ww, BBOX_XFORM_CLIP)
    dh = np.minimum(deltas[:, 3] / wh, BBOX_XFORM_CLIP)
    cx, cy = dx * aw + ax, dy * ah + ay
    w, h = np.exp(dw) * aw, np.exp(dh) * ah
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1)


def clip_boxes(boxes, height: int, width: int) -> np.ndarray:
    """Clip boxes to the image ``[0, width] x [0, height]``."""
    boxes = _check_boxes("boxes", boxes).copy()
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    return boxes
