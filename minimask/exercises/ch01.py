"""Chapter 1's exercises: the background fraction of a crop.

``check_crop_background_fraction(fn)``
    ``fn(object_mask, crop_mask) -> float``: the share of the pixels a crop
    keeps (``crop_mask``, bool ``(H, W)``) that do not belong to the object
    (``object_mask``): ``|K \\ M| / |K|`` for a crop ``K`` and an object
    ``M``. A box crop is ``K = box_mask(box, shape)``, a mask crop is the
    predicted mask itself.

``check_answer_aspect_ratio(value)``
    The aspect ratio ``L / T`` at which the tight box of a bar at 45
    degrees is 80 % background, by the chapter's continuous formula.
"""
from __future__ import annotations

import math

import numpy as np

from minimask.data import rotated_bar_mask, thin_bars_image
from minimask.exercises._grading import Grade
from minimask.masks import background_fraction, box_mask, box_of_mask

__all__ = ["check_crop_background_fraction", "check_answer_aspect_ratio"]


def _fatter(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel along rows and columns (a predicted mask
    that is slightly too fat)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def check_crop_background_fraction(fn, verbose: bool = True) -> bool:
    """Grade ``fn(object_mask, crop_mask) -> float`` on box crops (against
    ``minimask.masks.background_fraction``), exact mask crops (0) and
    slightly-too-fat mask crops."""
    g = Grade("crop_background_fraction", verbose)
    _, masks = thin_bars_image(seed=3, size=64, angles=[0.0, 20.0, 45.0])
    bar = rotated_bar_mask(48, 40, (20.0, 24.0), 36.0, 5.0, 65.0)
    cases = []
    for k, mask in enumerate(masks + [bar]):
        box = box_of_mask(mask)
        cases.append((f"box crop of bar {k}", mask, box_mask(box, mask.shape),
                      background_fraction(mask, box)))
    for k, mask in enumerate(masks + [bar]):
        cases.append((f"mask crop of bar {k} with its exact mask", mask, mask.copy(), 0.0))
        fat = _fatter(mask)
        expected = float((fat & ~mask).sum()) / float(fat.sum())   # |K \ M| / |K|
        cases.append((f"mask crop of bar {k} with a mask 1 px too fat", mask, fat, expected))
    for name, mask, crop, expected in cases:
        ok, yours = g.call(name, fn, mask.copy(), crop.copy())
        if ok:
            g.compare(name, np.float64(yours) if np.ndim(yours) == 0 else yours,
                      np.float64(expected), rtol=1e-12, atol=1e-12)
    return g.finish()


def check_answer_aspect_ratio(value, verbose: bool = True) -> bool:
    """Grade the aspect ratio ``L / T`` at which a 45-degree bar's tight box
    is 80 % background: ``1 - 2r / (1 + r)^2 = 0.8``."""
    g = Grade("answer_aspect_ratio", verbose)
    g.answer("L / T for 80 % background at 45 degrees", value, 4.0 + math.sqrt(15.0), rtol=1e-3)
    return g.finish()
