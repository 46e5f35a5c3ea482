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

Mask targets for training (RoIAlign of a ground-truth mask onto an ``m x m``
grid) and pasting predicted masks back into the image come in a later issue.
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
