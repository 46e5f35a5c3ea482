r"""Anchors: which FPN level a RoI is read from (eq. (1) of the write-up).

This module will also hold anchor generation (3 ratios x 3 scales per
location, centred at ``(i + 0.5) * stride``) and IoU matching of anchors to
ground-truth boxes; those come with another issue. For now it holds eq. (1):

    k = floor(k0 + log2(sqrt(w h) / 224))                          (1)

clamped to ``[k_min, k_max]``, the pyramid levels that exist. A box of
``224 x 224`` image pixels goes to level ``k0 = 4``; each halving of its side
moves it one level down (a finer map), each doubling one level up. The tiny
``1e-6`` added inside the logarithm (as detectron2 and torchvision's
``LevelMapper`` do) keeps boxes whose side is exactly a power of two times
224 on the level they belong to despite round-off in ``sqrt`` and ``log2``.
"""
from __future__ import annotations

import numpy as np


def fpn_level(boxes, k0=4, canonical_size=224, k_min=3, k_max=5):
    """The FPN level of each box, eq. (1).

    Inputs:
    - boxes: ``(B, 4)`` rows ``(x1, y1, x2, y2)`` in image pixels; every box
      must have positive width and height
    - k0: the level of a box of ``canonical_size x canonical_size``
    - canonical_size: 224, the ImageNet pre-training size
    - k_min, k_max: the lowest and highest levels that exist
    Returns ``(B,)`` int64:
    ``clip(floor(k0 + log2(sqrt(w h) / canonical_size + 1e-6)), k_min, k_max)``
    with ``w = x2 - x1`` and ``h = y2 - y1``.
    Raises ``ValueError`` for a wrong shape, non-finite values or a box with
    zero or negative width or height (its level is undefined: ``log2(0)``).
    """
    boxes = np.asarray(boxes)
    if boxes.dtype.kind not in "fiu":
        raise ValueError(f"boxes must hold real numbers, got dtype {boxes.dtype}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (B, 4) (x1, y1, x2, y2), "
                         f"got shape {tuple(boxes.shape)}")
    if k_min > k_max:
        raise ValueError(f"k_min must be <= k_max, got k_min={k_min}, k_max={k_max}")
    if not canonical_size > 0:
        raise ValueError(f"canonical_size must be positive, got {canonical_size!r}")
    boxes = boxes.astype(np.float64)
    if not np.all(np.isfinite(boxes)):
        raise ValueError("boxes contains NaN or infinite values")
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    bad = (w <= 0) | (h <= 0)
    if np.any(bad):
        raise ValueError(f"boxes must have positive width and height; box(es) "
                         f"{np.flatnonzero(bad).tolist()} do not")
    k = np.floor(k0 + np.log2(np.sqrt(w * h) / canonical_size + 1e-6))
    return np.clip(k, k_min, k_max).astype(np.int64)
