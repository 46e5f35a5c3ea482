"""Chapter 11's exercise: folding batch norm's statistics into a scale and a shift.

``check_fold_frozen_bn(fn)``
    ``fn(gamma, beta, running_mean, running_var, eps) -> (scale, shift)``, each
    of shape (C,), such that ``x * scale + shift`` (per channel) is what a
    frozen batch norm computes. Graded by running both on random inputs
    against ``minimask.layers.frozen_bn_forward``, for several ``eps``
    (including 0, which a missing epsilon would pass, and a large one, which
    it would not).
"""
from __future__ import annotations

import numpy as np

import minimask
from minimask.exercises._grading import Grade
from minimask.layers import frozen_bn_forward

__all__ = ["check_fold_frozen_bn"]


def check_fold_frozen_bn(fn, verbose: bool = True) -> bool:
    """Grade ``fn(gamma, beta, running_mean, running_var, eps) -> (scale, shift)``."""
    g = Grade("fold_frozen_bn", verbose)
    rng = np.random.default_rng(11)
    C = 5
    for eps in (1e-5, 0.0, 0.5):
        gamma, beta = rng.uniform(0.5, 2.0, C), rng.normal(size=C)
        mean, var = rng.normal(size=C), rng.uniform(0.2, 3.0, C)
        name = f"eps {eps:g}"
        ok, result = g.call(name, fn, gamma.copy(), beta.copy(), mean.copy(), var.copy(), eps)
        if not ok:
            continue
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            g.record(name, False, "expected a pair (scale, shift)")
            continue
        scale, shift = (np.asarray(r, dtype=np.float64) for r in result)
        if scale.shape != (C,) or shift.shape != (C,):
            g.record(name, False, f"scale and shift must have shape ({C},), got "
                     f"{scale.shape} and {shift.shape}")
            continue
        x = rng.normal(size=(2, C, 3, 4))
        with minimask.using_backend("numpy"):
            expected, _ = frozen_bn_forward(x, gamma, beta, mean, var, eps=eps)
        g.compare(f"{name}: x * scale + shift against frozen_bn_forward",
                  x * scale[:, None, None] + shift[:, None, None], expected,
                  rtol=1e-10, atol=1e-12)
    return g.finish()
