"""Chapter 7 exercises: IoU, and matching anchors to objects.

``check_box_iou(fn)`` grades ``fn(a, b) -> (A, B)`` IoUs against
``minimask.boxes.box_iou`` on boxes that overlap, nest, touch, lie apart and
have no area.

``check_match_anchors(fn)`` grades ``fn(iou, pos_iou, neg_iou) -> matches``:
given the (G, A) IoU matrix of G objects and A anchors, each anchor gets the
index of its object (positive), ``-1`` (negative) or ``-2`` (ignored). The
rule is torchvision's ``Matcher`` with ``allow_low_quality_matches``:

1. every anchor looks at the object it overlaps most, IoU ``u``: positive
   (that object) when ``u >= pos_iou``, ignored when ``neg_iou <= u <
   pos_iou``, negative below;
2. low-quality matches: for each object (with a best IoU above 0), every
   anchor whose IoU with it equals its best becomes positive - matched, like
   any anchor, to the object *it* overlaps most. A low-quality match adds a
   positive; it never takes an anchor from an object with a higher IoU.

The reference is written here from that rule.
"""
from __future__ import annotations

import numpy as np

from minimask.boxes import box_iou
from minimask.exercises._grading import Grade
from minimask.exercises.ch06 import _call, _grader

__all__ = ["check_box_iou", "check_match_anchors"]

NEGATIVE, IGNORED = -1, -2


def _match_from_iou(iou, pos_iou: float = 0.5, neg_iou: float = 0.4) -> np.ndarray:
    """The matching rule above, on a (G, A) IoU matrix; (A,) int64."""
    iou = np.asarray(iou, dtype=np.float64)
    G, A = iou.shape
    matches = np.full(A, NEGATIVE, dtype=np.int64)
    if G == 0 or A == 0:
        return matches
    best_gt = iou.argmax(0)                       # each anchor's own best object
    best_iou = iou.max(0)
    matches[best_iou >= pos_iou] = best_gt[best_iou >= pos_iou]
    matches[(best_iou >= neg_iou) & (best_iou < pos_iou)] = IGNORED
    best_of_gt = iou.max(1)                       # each object's best IoU
    claimed = np.any((iou == best_of_gt[:, None]) & (best_of_gt[:, None] > 0), axis=0)
    matches[claimed] = best_gt[claimed]
    return matches


def _iou_cases():
    """(name, a, b) cases: each catches a typical slip."""
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 40, size=(6, 2))
    wh = rng.uniform(2, 30, size=(6, 2))
    random = np.concatenate([xy, xy + wh], 1)
    xy = rng.uniform(0, 40, size=(5, 2))
    wh = rng.uniform(2, 30, size=(5, 2))
    random2 = np.concatenate([xy, xy + wh], 1)
    return [
        ("random boxes (6 x 5)", random, random2),
        ("a box with itself", np.array([[2.0, 3.0, 12.0, 8.0]]), np.array([[2.0, 3.0, 12.0, 8.0]])),
        ("nested boxes", np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([[2.0, 2.0, 6.0, 6.0]])),
        ("boxes far apart (the overlap is negative in x and y)",
         np.array([[0.0, 0.0, 4.0, 4.0]]), np.array([[10.0, 10.0, 20.0, 20.0]])),
        ("apart in x only", np.array([[0.0, 0.0, 4.0, 4.0]]), np.array([[6.0, 1.0, 9.0, 3.0]])),
        ("boxes that touch along an edge", np.array([[0.0, 0.0, 4.0, 4.0]]),
         np.array([[4.0, 0.0, 8.0, 4.0]])),
        ("a box without area, against itself", np.array([[3.0, 3.0, 3.0, 7.0]]),
         np.array([[3.0, 3.0, 3.0, 7.0]])),
    ]


@_grader("box IoU")
def check_box_iou(grade: Grade, fn):
    """``fn(a, b) -> (A, B)``, boxes ``(x1, y1, x2, y2)``; IoU 0 where there
    is no union."""
    for name, a, b in _iou_cases():
        ok, out = _call(grade, name, fn, a.copy(), b.copy())
        if ok:
            grade.compare(name, out, box_iou(a, b).astype(np.float64), rtol=1e-6, atol=1e-9)


def _match_cases():
    rng = np.random.default_rng(70)
    # a real anchor set: 9 anchors at each location of two levels, three objects
    from minimask.anchors import generate_anchors
    anchors = np.concatenate(generate_anchors([(6, 6), (3, 3)], (8, 16), (16, 32)))
    gt = np.array([[6.0, 8.0, 30.0, 26.0], [20.0, 14.0, 44.0, 40.0], [33.0, 2.0, 38.0, 7.0]])
    real = box_iou(gt, anchors).astype(np.float64)
    # object 1 claims anchor 0 by a low-quality match, but anchor 0 overlaps
    # object 0 more: it must stay object 0's
    conflict_low = np.array([[0.45, 0.30, 0.10],
                             [0.20, 0.05, 0.10]])
    # object 1's best anchor is anchor 1, a clear positive of object 0
    conflict_pos = np.array([[0.20, 0.70, 0.60],
                             [0.00, 0.35, 0.10]])
    # the thresholds themselves, and a tie for an object's best anchor
    edges = np.array([[0.5, 0.4, 0.3999, 0.4999, 0.62, 0.62, 0.00],
                      [0.1, 0.1, 0.1000, 0.1000, 0.10, 0.00, 0.30]])
    # an object with no overlap at all claims nothing
    no_overlap = np.array([[0.0, 0.0, 0.0],
                           [0.2, 0.6, 0.1]])
    random = rng.uniform(0, 0.7, size=(4, 25)).round(2)   # rounding makes ties
    return [
        ("a real anchor set, three objects", real),
        ("a low-quality match must not take an anchor from a better object", conflict_low),
        ("a low-quality match must not take a positive from a better object", conflict_pos),
        ("IoU exactly at the thresholds, and a tie for an object's best", edges),
        ("an object that overlaps no anchor", no_overlap),
        ("random IoUs with ties", random),
    ]


@_grader("anchor matching")
def check_match_anchors(grade: Grade, fn):
    """``fn(iou, pos_iou, neg_iou) -> matches`` (A,) ints."""
    for name, iou in _match_cases():
        ok, out = _call(grade, name, fn, iou.copy(), 0.5, 0.4)
        if not ok:
            continue
        expected = _match_from_iou(iou, 0.5, 0.4)
        try:
            out = np.asarray(out).astype(np.int64)
        except (TypeError, ValueError) as e:
            grade.record(name, False, f"could not read your matches as integers ({e})")
            continue
        grade.compare(name, out, expected)
