"""Instance masks: how much background a box crop lets in.

A detector that only returns boxes hands the next stage everything inside
the box. For a long, thin object lying at an angle most of that is
background; a mask keeps only the object's pixels. The helpers here put a
number on that (chapter 1):

* ``box_of_mask(mask)`` - the tightest box around a mask;
* ``box_mask(box, shape)`` - which pixels a box crop contains;
* ``background_fraction(mask, box)`` - the share of a box crop's pixels that
  are not the object.

Conventions. Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates
with no ``+1``: pixel ``(i, j)`` (row ``i``, column ``j``) covers
``[j, j + 1) x [i, i + 1)`` and has its centre at ``(j + 0.5, i + 0.5)``. A
box crop holds the pixels whose centre lies inside the box, so an integer box
``(x1, y1, x2, y2)`` crops exactly ``mask[y1:y2, x1:x2]``.

For the mask branch:

* ``mask_targets(gt_masks, boxes, m)`` - each RoI's training target, its
  ground-truth mask resampled onto an ``m x m`` grid by RoIAlign;
* ``paste_mask`` / ``paste_masks`` - a predicted ``m x m`` mask resized
  bilinearly into its box in the image, then thresholded;
* ``oracle_mask_quality(dataset, m)`` - the best an ``m x m`` mask can do:
  each object's own target pasted back, scored against its true mask.
"""
from __future__ import annotations

import numpy as np


def _check_mask(name: str, mask) -> np.ndarray:
    """Return ``mask`` as a 2-D bool array; refuse other shapes and values."""
    if mask is None:
        raise ValueError(f"{name} must be an array, got None")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must have 2 dimensions (H, W), got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be bool or hold only 0 and 1, got dtype {mask.dtype}")
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{name} must be bool or hold only 0 and 1")
    return mask.astype(bool)


def _check_box(name: str, box) -> np.ndarray:
    box = np.asarray(box, dtype=np.float64) if box is not None else None
    if box is None or box.shape != (4,):
        shape = None if box is None else box.shape
        raise ValueError(f"{name} must be 4 numbers (x1, y1, x2, y2), got shape {shape}")
    if not np.all(np.isfinite(box)):
        raise ValueError(f"{name} must be finite, got {box.tolist()}")
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{name} must have x2 > x1 and y2 > y1, got {box.tolist()}")
    return box


def box_of_mask(mask) -> np.ndarray:
    """The tightest box around the pixels of a mask.

    Parameters
    ----------
    mask : (H, W) bool (or 0/1) array with at least one pixel set.

    Returns
    -------
    box : (4,) float64 ``(x1, y1, x2, y2)``: ``x1`` is the first column the
        mask touches and ``x2`` one past the last (no ``+1`` convention), so
        a mask spanning columns 3..7 gives ``x1 = 3, x2 = 8``; rows likewise.
    """
    mask = _check_mask("mask", mask)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty: an empty mask has no box")
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def box_mask(box, shape) -> np.ndarray:
    """The pixels a box crop keeps, as a mask.

    Parameters
    ----------
    box : 4 numbers ``(x1, y1, x2, y2)``, continuous pixel coordinates.
    shape : ``(H, W)`` of the image.

    Returns
    -------
    (H, W) bool: pixel ``(i, j)`` is ``True`` when its centre
    ``(j + 0.5, i + 0.5)`` lies in ``[x1, x2] x [y1, y2]``.
    """
    box = _check_box("box", box)
    if len(shape) != 2:
        raise ValueError(f"shape must be (H, W), got {tuple(shape)}")
    height, width = (int(s) for s in shape)
    x1, y1, x2, y2 = box
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    in_x = (xs >= x1) & (xs <= x2)
    in_y = (ys >= y1) & (ys <= y2)
    return in_y[:, None] & in_x[None, :]


def background_fraction(mask, box) -> float:
    """Share of a box crop's pixels that do not belong to the object.

    With ``B`` the pixels of the box crop (see ``box_mask``) and ``M`` the
    object's mask,

        background_fraction = |B \\ M| / |B| = 1 - |B & M| / |B|.

    0 means the crop is all object; for a thin bar at 45 degrees in its tight
    box it is close to ``1 - bar area / box area``.

    Parameters
    ----------
    mask : (H, W) bool (or 0/1) array, the object.
    box : 4 numbers ``(x1, y1, x2, y2)``; the crop must hold at least one
        pixel of the image.

    Returns
    -------
    float in ``[0, 1]``.
    """
    mask = _check_mask("mask", mask)
    crop = box_mask(box, mask.shape)
    n_crop = int(crop.sum())
    if n_crop == 0:
        raise ValueError(f"box {np.asarray(box).tolist()} holds no pixel of a "
                         f"{mask.shape[0]}x{mask.shape[1]} image")
    n_object = int((crop & mask).sum())
    return 1.0 - n_object / n_crop


# --------------------------------------------------------------------------
# Mask targets (training) and mask pasting (inference)
# --------------------------------------------------------------------------


def mask_targets(gt_masks, boxes, mask_size: int) -> np.ndarray:
    """The m x m training target of each RoI: its ground-truth mask cropped
    to the RoI and resampled by RoIAlign (avg, aligned, adaptive sampling),
    then thresholded at 0.5 (detectron2's recipe).

    gt_masks: (R, H, W) - the mask of the object each RoI is matched to,
    one per RoI; boxes: (R, 4) RoIs in image pixels. Returns (R, m, m)
    float of 0/1.
    """
    from minimask import using_backend
    from minimask.layers import roi_align_forward
    gt_masks = np.asarray(gt_masks)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if gt_masks.ndim != 3 or len(gt_masks) != len(boxes):
        raise ValueError(f"gt_masks must be (R, H, W) with one mask per box; got shape "
                         f"{gt_masks.shape} for {len(boxes)} boxes")
    if len(boxes) == 0:
        return np.zeros((0, mask_size, mask_size), dtype=np.float32)
    R = len(boxes)
    features = gt_masks.astype(np.float32)[:, None]                  # (R, 1, H, W)
    rois = np.concatenate([np.arange(R, dtype=np.float64)[:, None], boxes], 1).astype(np.float32)
    with using_backend("cpu" if _fast_ok() else "numpy"):
        crops, _ = roi_align_forward(features, rois, mask_size, 1.0, sampling_ratio=0,
                                     aligned=True)
    return (np.asarray(crops)[:, 0] >= 0.5).astype(np.float32)


def _fast_ok() -> bool:
    from minimask.backend import get_backend
    return get_backend() != "numpy"


def paste_mask(mask, box, height: int, width: int) -> np.ndarray:
    """Resize an m x m mask of probabilities into ``box`` on a
    ``height x width`` image, bilinearly; (H, W) float, zero outside the box.

    Pixel (i, j) has its centre at (j + 0.5, i + 0.5). A centre inside the
    box maps to mask coordinate u = (j + 0.5 - x1) / (x2 - x1) * m - 0.5
    (the mask's cells tile the box, cell centres at u = 0 .. m-1); samples
    beyond the outer cell centres take the edge value, so a mask of all ones
    pastes to every pixel whose centre lies in the box.
    """
    mask = np.asarray(mask, dtype=np.float64)
    m_h, m_w = mask.shape
    x1, y1, x2, y2 = [float(v) for v in box]
    out = np.zeros((height, width), dtype=np.float32)
    if not (x2 > x1 and y2 > y1):
        return out
    j0, j1 = max(int(np.ceil(x1 - 0.5)), 0), min(int(np.floor(x2 - 0.5)), width - 1)
    i0, i1 = max(int(np.ceil(y1 - 0.5)), 0), min(int(np.floor(y2 - 0.5)), height - 1)
    if j1 < j0 or i1 < i0:
        return out
    u = (np.arange(j0, j1 + 1) + 0.5 - x1) / (x2 - x1) * m_w - 0.5
    v = (np.arange(i0, i1 + 1) + 0.5 - y1) / (y2 - y1) * m_h - 0.5
    u = np.clip(u, 0, m_w - 1)
    v = np.clip(v, 0, m_h - 1)
    u0 = np.minimum(np.floor(u).astype(int), m_w - 2) if m_w > 1 else np.zeros_like(u, int)
    v0 = np.minimum(np.floor(v).astype(int), m_h - 2) if m_h > 1 else np.zeros_like(v, int)
    fu, fv = u - u0, v - v0
    u1, v1 = np.minimum(u0 + 1, m_w - 1), np.minimum(v0 + 1, m_h - 1)
    # interpolate along x once per mask row, then along y a band of rows at
    # a time: the float64 temporaries of a box as large as a 5000 x 5000
    # photo would otherwise take gigabytes (the values are the same)
    across = mask[:, u0] * (1 - fu) + mask[:, u1] * fu          # (m_h, box width)
    band = max(1, (1 << 22) // max(1, len(u)))
    for start in range(0, len(v), band):
        rows = slice(start, start + band)
        out[i0 + start:i0 + start + len(v[rows]), j0:j1 + 1] = (
            across[v0[rows]] * (1 - fv[rows, None]) + across[v1[rows]] * fv[rows, None])
    return out


def paste_masks(masks, boxes, height: int, width: int, threshold: float = 0.5) -> np.ndarray:
    """Paste each (m, m) probability mask into its box and threshold:
    (D, m, m), (D, 4) -> (D, H, W) bool."""
    masks = np.asarray(masks)
    boxes = np.asarray(boxes).reshape(-1, 4)
    if masks.ndim != 3 or len(masks) != len(boxes):
        raise ValueError(f"masks must be (D, m, m) with one mask per box; got shape "
                         f"{masks.shape} for {len(boxes)} boxes")
    out = np.zeros((len(boxes), height, width), dtype=bool)
    for d in range(len(boxes)):
        out[d] = paste_mask(masks[d], boxes[d], height, width) >= threshold
    return out


def oracle_mask_quality(dataset, mask_size: int, num_images=None) -> dict:
    """The best any ``m x m`` mask head can do on a dataset, per class.

    For every object the "oracle" prediction is its own training target,
    ``mask_targets`` of its true mask in its true box (thresholded at 0.5),
    pasted back into that box by ``paste_masks`` (thresholded at 0.5). What
    is lost is lost to the ``m x m`` grid alone: no model can beat it with
    masks of that size. Per object, with ``P`` the pasted mask and ``M`` the
    true one,

        mask IoU:             |P & M| / |P | M|
        mask crop background: |P \\ M| / |P|   (1 for an empty P, as
                                                ``evaluate.CutoutReport``)

    Inputs:
    - dataset: indexable, ``dataset[i] -> (image, target)`` with target
      ``{"boxes": (G, 4), "labels": (G,), "masks": (G, H, W)}`` (as
      ``ShapesDataset``); its ``class_names`` name the classes when it has
      them, else the classes are named by their index
    - mask_size: int >= 1, the mask's side ``m``
    - num_images: how many images from the start (default: all)
    Returns ``{class name: {"objects": n, "mask_iou": mean, "mask_crop_background":
    mean}}``, the means ``None`` for a class with no object.
    """
    if isinstance(mask_size, (bool, np.bool_)) or not isinstance(mask_size, (int, np.integer)) \
            or mask_size < 1:
        raise ValueError(f"mask_size must be an integer >= 1, got {mask_size!r}")
    n = len(dataset) if num_images is None else int(num_images)
    if not 0 < n <= len(dataset):
        raise ValueError(f"num_images must be in 1..{len(dataset)} (the dataset's size), "
                         f"got {num_images!r}")
    names = list(getattr(dataset, "class_names", []))
    ious, backgrounds = {}, {}
    for i in range(n):
        _, target = dataset[i]
        gt = np.asarray(target["masks"]).astype(bool)
        if len(gt) == 0:
            continue
        boxes = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)
        H, W = gt.shape[1:]
        pasted = paste_masks(mask_targets(gt, boxes, int(mask_size)), boxes, H, W)
        for label, p, g in zip(np.asarray(target["labels"]).astype(int), pasted, gt):
            both = int((p & g).sum())
            ious.setdefault(label, []).append(both / max(1, int((p | g).sum())))
            backgrounds.setdefault(label, []).append(1.0 - both / p.sum() if p.any() else 1.0)
    labels = range(max(len(names), max(ious, default=-1) + 1))
    out = {}
    for c in labels:
        name = names[c] if c < len(names) else str(c)
        found = ious.get(c, [])
        out[name] = {"objects": len(found),
                     "mask_iou": float(np.mean(found)) if found else None,
                     "mask_crop_background": float(np.mean(backgrounds[c])) if found else None}
    return out
