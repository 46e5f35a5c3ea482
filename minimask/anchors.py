r"""Anchors: generating them, matching them to objects, and which FPN level
a RoI is read from (eq. (1) of the write-up).

* ``generate_anchors`` - 3 ratios x 3 scales at every location of every
  level, centred at ``((j + 0.5) * stride, (i + 0.5) * stride)``;
* ``match_anchors`` - IoU >= 0.5 positive, < 0.4 negative, in between
  ignored, plus each object's best anchors (RetinaMask's best matches);
* ``fpn_level`` - eq. (1):

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


# --------------------------------------------------------------------------
# Anchors: 9 per location, on every FPN level
# --------------------------------------------------------------------------

ANCHOR_RATIOS = (0.5, 1.0, 2.0)
ANCHOR_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))


def anchor_shapes(size: float, ratios=ANCHOR_RATIOS, scales=ANCHOR_SCALES) -> np.ndarray:
    """(A, 2) widths and heights of the anchors of one level.

    For a base ``size``, scale ``s`` and aspect ratio ``r = h / w``, the
    anchor has area ``(s * size)^2`` and ``w = s * size / sqrt(r)``,
    ``h = s * size * sqrt(r)``. Ordered ratio-major: (r0 s0, r0 s1, ...).
    """
    shapes = []
    for r in ratios:
        for s in scales:
            shapes.append((s * size / np.sqrt(r), s * size * np.sqrt(r)))
    return np.array(shapes, dtype=np.float64)


def level_anchors(height: int, width: int, stride, size: float,
                  ratios=ANCHOR_RATIOS, scales=ANCHOR_SCALES, offset: float = 0.5,
                  size_floor: bool = False, round_corners: bool = False) -> np.ndarray:
    """All anchors of one feature map, (height * width * A, 4).

    Anchor ``a`` of location ``(i, j)`` is row ``(i * width + j) * A + a``
    and is centred at ``((j + 0.5) * stride, (i + 0.5) * stride)`` - the
    order a head's ``(N, A * K, H, W)`` output has once reshaped to
    ``(N, H * W * A, K)`` (see ``flatten_head_output``). torchvision's
    ``AnchorGenerator`` uses the same order.

    The conventions of other code bases, for imported weights:
    - ``offset``: centres at ``(j + offset) * stride``; torchvision uses 0;
    - ``stride``: a number, or ``(stride_y, stride_x)`` (torchvision takes
      ``image side // map side`` per axis);
    - ``size_floor``: each ``scale * size`` is floored to an integer first
      (torchvision's RetinaNet sizes 32, 40, 50 for 32 * 2^(0, 1/3, 2/3));
    - ``round_corners``: the corners ``(-w/2, -h/2, w/2, h/2)`` of the
      anchor around its centre are rounded to integers (half to even).
    """
    if size_floor:
        sizes = [float(np.floor(s * size)) for s in scales]
        wh = np.concatenate([anchor_shapes(z, ratios, (1.0,)) for z in sizes], 0)
        # back to ratio-major order: row r * len(scales) + s
        wh = wh.reshape(len(scales), len(ratios), 2).transpose(1, 0, 2).reshape(-1, 2)
    else:
        wh = anchor_shapes(size, ratios, scales)
    sy, sx = (stride, stride) if np.isscalar(stride) else stride
    cy = (np.arange(height) + offset) * sy
    cx = (np.arange(width) + offset) * sx
    cy, cx = np.meshgrid(cy, cx, indexing="ij")
    centres = np.stack([cx, cy], -1).reshape(-1, 1, 2)          # (HW, 1, 2)
    half = wh.reshape(1, -1, 2) / 2                              # (1, A, 2)
    low, high = -half, half
    if round_corners:
        low, high = np.round(low), np.round(high)
    return np.concatenate([centres + low, centres + high], -1).reshape(-1, 4)


def generate_anchors(feature_shapes, strides, sizes, ratios=ANCHOR_RATIOS,
                     scales=ANCHOR_SCALES, offset: float = 0.5, size_floor: bool = False,
                     round_corners: bool = False) -> list[np.ndarray]:
    """Anchors of each level: ``feature_shapes`` are the (H, W) of P3..P7,
    with one stride and one anchor size per level. ``offset``,
    ``size_floor``, ``round_corners``: see ``level_anchors``. Raises
    ``ValueError`` when the three lists differ in length (``zip`` would
    silently drop the extra levels)."""
    feature_shapes, strides, sizes = list(feature_shapes), list(strides), list(sizes)
    if not len(feature_shapes) == len(strides) == len(sizes):
        raise ValueError(f"feature_shapes, strides and sizes need one entry per level; got "
                         f"{len(feature_shapes)} feature shapes, {len(strides)} strides and "
                         f"{len(sizes)} sizes")
    for k, shape in enumerate(feature_shapes):
        if len(shape) != 2:
            raise ValueError(f"feature_shapes[{k}] must be (H, W), got {shape!r}")
    return [level_anchors(h, w, s, size, ratios, scales, offset, size_floor, round_corners)
            for (h, w), s, size in zip(feature_shapes, strides, sizes)]


def flatten_head_output(out, per_anchor: int):
    """(N, A * per_anchor, H, W) -> (N, H * W * A, per_anchor), anchor order
    as ``level_anchors``."""
    N, AK, H, W = out.shape
    A = AK // per_anchor
    return out.reshape(N, A, per_anchor, H, W).transpose(0, 3, 4, 1, 2).reshape(N, H * W * A, per_anchor)


def unflatten_head_grad(dflat, shape):
    """The inverse of ``flatten_head_output``, for the backward pass."""
    N, AK, H, W = shape
    per_anchor = dflat.shape[-1]
    A = AK // per_anchor
    return np.ascontiguousarray(
        dflat.reshape(N, H, W, A, per_anchor).transpose(0, 3, 4, 1, 2).reshape(N, AK, H, W))


# --------------------------------------------------------------------------
# Matching anchors to ground truth
# --------------------------------------------------------------------------

NEGATIVE = -1
IGNORED = -2


def match_anchors(anchors, gt_boxes, pos_iou: float = 0.5, neg_iou: float = 0.4,
                  low_quality: bool = True, *, low_quality_iou: float = 0.0) -> np.ndarray:
    """Assign each anchor a ground truth, or mark it negative or ignored.

    Returns ``matches`` of shape (num_anchors,): the index of the matched
    ground-truth box for positives, ``NEGATIVE`` (-1) where the best IoU is
    below ``neg_iou``, ``IGNORED`` (-2) in between. With ``low_quality``,
    each ground truth also claims the anchor(s) it overlaps most, even below
    ``pos_iou`` (RetinaMask's best matches): a small or oddly shaped object
    would otherwise get no positive anchor at all. ``low_quality_iou``: a
    claim counts only when that best IoU is at least this (RetinaMask
    ablates 0.0-0.4); at 0.0 any overlap above zero counts.
    """
    from minimask.boxes import box_iou
    anchors = np.asarray(anchors, dtype=np.float64)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    matches = np.full(len(anchors), NEGATIVE, dtype=np.int64)
    if len(gt_boxes) == 0 or len(anchors) == 0:
        return matches
    if not pos_iou >= neg_iou:
        raise ValueError(f"pos_iou ({pos_iou}) must be >= neg_iou ({neg_iou})")
    is_number = isinstance(low_quality_iou, (int, float, np.number)) \
        and not isinstance(low_quality_iou, (bool, np.bool_))
    if not (is_number and 0.0 <= low_quality_iou <= 1.0):
        raise ValueError(f"low_quality_iou must be a number in [0, 1], got {low_quality_iou!r}")
    iou = box_iou(gt_boxes, anchors)                  # (G, num_anchors)
    best_gt = iou.argmax(0)
    best_iou = iou[best_gt, np.arange(len(anchors))]
    matches[best_iou >= pos_iou] = best_gt[best_iou >= pos_iou]
    matches[(best_iou >= neg_iou) & (best_iou < pos_iou)] = IGNORED
    if low_quality:
        # An anchor that is some object's best (ties included) becomes a
        # positive even below pos_iou - but for the object it overlaps MOST,
        # not for the object that claimed it: a claim must never take an
        # anchor away from an object with a higher IoU (torchvision's Matcher
        # and detectron2's do the same). Objects that overlap no anchor at all
        # (best IoU 0) claim nothing, nor do those whose best IoU is below
        # low_quality_iou.
        top = iou.max(1, keepdims=True)                  # (G, 1)
        _, claimed = np.nonzero((iou == top) & (top > 0) & (top >= low_quality_iou))
        matches[claimed] = best_gt[claimed]
    return matches
