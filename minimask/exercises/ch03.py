"""Chapter 3's exercises: one bilinear sample, and eq. (1).

``check_bilinear_weights(fn)``
    ``fn(y, x) -> (row, col, weights)`` for a sample at ``(y, x)`` inside a
    feature map (``0 <= y, x`` and at least one cell from the far border):
    the top-left neighbour ``(row, col)`` and the 2 x 2 array of bilinear
    weights of cells ``(row + a, col + b)``, ``a, b`` in ``{0, 1}``.
    Graded against ``minimask.layers.roi_align.bilinear_neighbours``.

``check_fpn_level(fn)``
    ``fn(boxes) -> levels``: eq. (1), ``floor(4 + log2(sqrt(w h) / 224))``
    clamped to 3..5, as ``minimask.anchors.fpn_level`` computes it - for
    boxes whose size lies exactly on a level boundary too, also when their
    width comes out of ``x2 - x1`` a hair below it.
"""
from __future__ import annotations

import numpy as np

from minimask.anchors import fpn_level
from minimask.exercises._grading import Grade
from minimask.layers.roi_align import bilinear_neighbours

__all__ = ["check_bilinear_weights", "check_fpn_level"]


def check_bilinear_weights(fn, verbose: bool = True) -> bool:
    """Grade ``fn(y, x) -> (row, col, weights)`` on interior samples."""
    g = Grade("bilinear_weights", verbose)
    rng = np.random.default_rng(4)
    points = [(1.25, 2.5), (0.1, 0.7), (3.0, 4.6), (2.9, 2.0), (5.0, 1.0)]
    points += [tuple(p) for p in rng.uniform(0, 6, size=(5, 2))]
    H = W = 8
    for y, x in points:
        name = f"sample at (y, x) = ({y:.3f}, {x:.3f})"
        ok, result = g.call(name, fn, float(y), float(x))
        if not ok:
            continue
        try:
            row, col, weights = result
        except (TypeError, ValueError):
            g.record(name, False, "return (row, col, weights)")
            continue
        nb = bilinear_neighbours(y, x, H, W)
        (r0, c0), _ = nb[0]
        expected = np.array([[nb[0][1], nb[1][1]], [nb[2][1], nb[3][1]]])
        if (int(row), int(col)) != (r0, c0):
            g.record(name, False, f"top-left neighbour ({row}, {col}), expected ({r0}, {c0})")
            continue
        g.compare(name, weights, expected, rtol=1e-12, atol=1e-12)
    return g.finish()


def check_fpn_level(fn, verbose: bool = True) -> bool:
    """Grade ``fn(boxes) -> levels`` (eq. (1), clamped to 3..5) against
    ``minimask.anchors.fpn_level``."""
    g = Grade("fpn_level", verbose)
    cases = {
        "squares on and around the boundaries 112, 224, 448":
            [[0, 0, s, s] for s in (56, 111, 111.9, 112, 150, 223.9, 224, 300, 447.5, 448,
                                    900, 2000)],
        "thin boxes: the level follows the area, not the long side":
            [[0, 0, 20, 400], [0, 0, 400, 20], [10, 10, 66, 906], [0, 0, 28, 1792]],
        "a 224 x 224 box whose width x2 - x1 is 223.99999999999994 in float64":
            [[303.3, 192.4, 303.3 + 224, 192.4 + 224]],
    }
    rng = np.random.default_rng(5)
    corners = rng.uniform(0, 500, size=(20, 2))
    sizes = np.exp(rng.uniform(np.log(20), np.log(900), size=(20, 2)))
    cases["random boxes"] = np.concatenate([corners, corners + sizes], axis=1).tolist()
    for name, boxes in cases.items():
        boxes = np.array(boxes, dtype=np.float64)
        ok, levels = g.call(name, fn, boxes.copy())
        if ok:
            try:
                levels = np.asarray(levels).astype(np.int64)
            except (TypeError, ValueError):
                g.record(name, False, "return an array of integer levels")
                continue
            g.compare(name, levels, fpn_level(boxes))
    return g.finish()
