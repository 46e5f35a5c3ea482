"""Chapter 10 exercises: non-maximum suppression and pasting a mask into its
box.

``check_nms(fn)`` grades ``fn(boxes, scores, iou_threshold) -> keep``, the
indices of the boxes greedy NMS keeps, highest score first, against
``minimask.boxes.nms_numpy``: a box is dropped when its IoU with a *kept*,
higher-scoring box exceeds the threshold.

``check_paste_mask(fn)`` grades ``fn(mask, box, height, width) -> (H, W)``,
an ``m x m`` mask of probabilities resized bilinearly into its box, against
``minimask.masks.paste_mask``.
"""
from __future__ import annotations

import numpy as np

from minimask.boxes import nms_numpy
from minimask.exercises._grading import Grade
from minimask.exercises.ch06 import _call, _grader
from minimask.masks import paste_mask

__all__ = ["check_nms", "check_paste_mask"]


def _nms_cases():
    rng = np.random.default_rng(10)
    xy = rng.uniform(0, 30, size=(30, 2))
    random = np.concatenate([xy, xy + rng.uniform(8, 20, size=(30, 2))], 1)
    # a chain: B overlaps A and C, A and C do not overlap. A keeps, B goes,
    # and C stays: it is suppressed only by kept boxes
    chain = np.array([[0.0, 0.0, 10.0, 10.0], [3.0, 0.0, 13.0, 10.0], [6.0, 0.0, 16.0, 10.0]])
    # the best box is not first in the input
    unsorted = np.array([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [30.0, 30.0, 40.0, 40.0]])
    return [("30 random boxes, threshold 0.5", random, rng.uniform(size=30), 0.5),
            ("30 random boxes, threshold 0.3", random, rng.uniform(size=30), 0.3),
            ("a chain A-B-C with scores 0.9, 0.8, 0.7", chain, np.array([0.9, 0.8, 0.7]), 0.4),
            ("the best box last in the input", unsorted, np.array([0.5, 0.9, 0.7]), 0.5),
            ("no boxes", np.zeros((0, 4)), np.zeros(0), 0.5)]


@_grader("non-maximum suppression")
def check_nms(grade: Grade, fn):
    """``fn(boxes (B, 4), scores (B,), iou_threshold) -> keep`` (indices)."""
    for name, boxes, scores, t in _nms_cases():
        ok, keep = _call(grade, name, fn, boxes.copy(), scores.copy(), t)
        if not ok:
            continue
        try:
            keep = np.asarray(keep).astype(np.int64).reshape(-1)
        except (TypeError, ValueError) as e:
            grade.record(name, False, f"could not read your indices as integers ({e})")
            continue
        expected = nms_numpy(boxes, scores, t)
        if keep.shape != expected.shape:
            grade.record(f"{name} (kept indices, in order)", False,
                         f"you kept {len(keep)} boxes {_some(keep)}, expected {len(expected)}: "
                         f"{_some(expected)}")
            continue
        grade.compare(f"{name} (kept indices, in order)", keep, expected)


def _some(indices, n=12):
    shown = ", ".join(str(int(i)) for i in indices[:n])
    return f"[{shown}{', ...' if len(indices) > n else ''}]"


def _paste_cases():
    rng = np.random.default_rng(11)
    ramp = np.add.outer(np.arange(7.0), 2 * np.arange(7.0)) / 18.0     # no symmetry to hide a swap
    return [("a 7x7 ramp into a box with fractional corners", ramp, np.array([3.3, 5.6, 14.2, 22.7]), 30, 25),
            ("random 6x6 probabilities, a wide box", rng.uniform(size=(6, 6)),
             np.array([2.0, 4.0, 20.5, 9.5]), 16, 24),
            ("a box that leaves the image", rng.uniform(size=(5, 5)),
             np.array([-3.2, 10.4, 9.0, 19.8]), 18, 12)]


@_grader("pasting a mask into its box")
def check_paste_mask(grade: Grade, fn):
    """``fn(mask (m, m), box (4,), height, width) -> (height, width)``."""
    for name, mask, box, H, W in _paste_cases():
        ok, out = _call(grade, name, fn, mask.copy(), box.copy(), H, W)
        if ok:
            grade.compare(name, out, paste_mask(mask, box, H, W).astype(np.float64),
                          rtol=1e-5, atol=1e-6)
