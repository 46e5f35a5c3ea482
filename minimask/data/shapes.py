"""Synthetic shapes with exact masks: thin rotated bars.

A bar is a rectangle of a given ``length`` and ``thickness`` centred at
``center = (cx, cy)`` and turned by ``angle_deg`` counter-clockwise as seen
on screen (the image's ``y`` axis points down, so the bar's long axis runs
along ``(cos a, -sin a)`` in ``(x, y)``). Pixel ``(i, j)`` has its centre at
``(x, y) = (j + 0.5, i + 0.5)`` and belongs to the bar when that centre lies
inside the rectangle. In the bar's own frame, with ``dx = x - cx`` and
``dy = y - cy``,

    u =  dx cos a - dy sin a      (along the bar)
    v =  dx sin a + dy cos a      (across the bar)

    inside  <=>  |u| <= length / 2  and  |v| <= thickness / 2.

Long, thin, tilted objects are where a box crop is mostly background and a
mask is not (chapter 1). The full synthetic shapes dataset (several shape
classes, boxes, labels, a dataset object for training) comes in a later
issue.
"""
from __future__ import annotations

import numpy as np


def _check_size(name: str, value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (H, W), got {value!r}")
        pair = tuple(value)
    else:
        pair = (value, value)
    for v in pair:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be positive integers, got {value!r}")
    return int(pair[0]), int(pair[1])


def rotated_bar_mask(height, width, center, length, thickness, angle_deg) -> np.ndarray:
    """Mask of a rotated rectangle, exact by the pixel-centre test.

    Parameters
    ----------
    height, width : int, the image size ``H, W``.
    center : ``(cx, cy)``, the bar's centre in continuous pixel coordinates.
    length : float > 0, the bar's extent along its axis, in pixels.
    thickness : float > 0, its extent across, in pixels.
    angle_deg : float, the axis' angle from the ``+x`` axis, counter-clockwise
        on screen.

    Returns
    -------
    (H, W) bool: ``True`` where ``|u| <= length / 2`` and
    ``|v| <= thickness / 2`` at the pixel's centre (see the module docstring).
    """
    height, width = _check_size("height and width", (height, width))
    center = np.asarray(center, dtype=np.float64)
    if center.shape != (2,) or not np.all(np.isfinite(center)):
        raise ValueError(f"center must be two finite numbers (cx, cy), got {center.tolist()}")
    for name, v in (("length", length), ("thickness", thickness)):
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    if not np.isfinite(angle_deg):
        raise ValueError(f"angle_deg must be finite, got {angle_deg!r}")
    a = np.deg2rad(angle_deg)
    dx = (np.arange(width) + 0.5)[None, :] - center[0]
    dy = (np.arange(height) + 0.5)[:, None] - center[1]
    u = dx * np.cos(a) - dy * np.sin(a)
    v = dx * np.sin(a) + dy * np.cos(a)
    return (np.abs(u) <= length / 2) & (np.abs(v) <= thickness / 2)


def thin_bars_image(seed, size=64, num_bars=3, angles=None):
    """An image of a few thin rotated bars on a noisy background.

    Each bar has a random length (45-80 % of the shorter side), thickness
    (2-4 % of it, at least 2 pixels), colour and position, and lies wholly
    inside the image. Bars drawn later cover earlier ones, and each mask
    holds only the pixels where its bar is visible.

    Parameters
    ----------
    seed : int, for ``numpy.random.default_rng``; the same seed gives the
        same image.
    size : int or ``(H, W)``, the image size (default 64).
    num_bars : int >= 1, how many bars (ignored when ``angles`` is given).
    angles : sequence of angles in degrees, one per bar; random in
        ``[0, 180)`` when ``None``.

    Returns
    -------
    image : (3, H, W) float32 in ``[0, 1]``, channels first.
    masks : list of (H, W) bool arrays, one per bar, in drawing order.
    """
    height, width = _check_size("size", size)
    rng = np.random.default_rng(seed)
    if angles is None:
        if isinstance(num_bars, (bool, np.bool_)) or not isinstance(num_bars, (int, np.integer)) \
                or num_bars < 1:
            raise ValueError(f"num_bars must be a positive integer, got {num_bars!r}")
        angles = rng.uniform(0.0, 180.0, size=int(num_bars))
    angles = np.asarray(angles, dtype=np.float64).reshape(-1)
    if angles.size == 0 or not np.all(np.isfinite(angles)):
        raise ValueError(f"angles must be one or more finite numbers, got {angles.tolist()}")
    side = min(height, width)
    if side < 8:
        raise ValueError(f"size must be at least 8 pixels on each side, got {(height, width)}")

    background = rng.uniform(0.2, 0.5, size=3)[:, None, None]
    image = background + 0.08 * rng.standard_normal((3, height, width))
    masks = []
    for angle in angles:
        length = rng.uniform(0.45, 0.8) * side
        thickness = max(2.0, rng.uniform(0.02, 0.04) * side)
        a = np.deg2rad(angle)
        # half extents of the rotated rectangle along x and y: keep it inside
        ex = 0.5 * (length * abs(np.cos(a)) + thickness * abs(np.sin(a)))
        ey = 0.5 * (length * abs(np.sin(a)) + thickness * abs(np.cos(a)))
        cx = rng.uniform(ex, max(ex, width - ex))
        cy = rng.uniform(ey, max(ey, height - ey))
        mask = rotated_bar_mask(height, width, (cx, cy), length, thickness, angle)
        colour = rng.uniform(0.6, 1.0, size=3)
        image[:, mask] = colour[:, None] + 0.03 * rng.standard_normal((3, int(mask.sum())))
        for earlier in masks:
            earlier &= ~mask
        masks.append(mask)
    return np.clip(image, 0.0, 1.0).astype(np.float32), masks
