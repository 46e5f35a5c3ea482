"""Chapter 9 exercises: the learning-rate schedule and gradient clipping.

``check_learning_rate(fn)`` grades ``fn(step, lr, warmup_iters,
warmup_factor, iters) -> float``, the linear warm-up then cosine decay of
``minimask.train.learning_rate`` (``schedule="cosine"``), at every step of
a few schedules.

``check_clip_gradients(fn)`` grades ``fn(grads, max_norm) -> (clipped,
norm)``: ``grads`` is a list of arrays, ``clipped`` the list scaled by one
common factor so that the global L2 norm is at most ``max_norm``, ``norm``
the global norm before clipping - ``minimask.train.clip_gradients`` on
plain arrays instead of ``Parameter``s.
"""
from __future__ import annotations

import numpy as np

from minimask.exercises._grading import Grade
from minimask.exercises.ch06 import _call, _grader, _pair
from minimask.nn import Parameter
from minimask.train import TrainSettings, clip_gradients, learning_rate

__all__ = ["check_learning_rate", "check_clip_gradients"]


@_grader("learning rate: warm-up, then cosine")
def check_learning_rate(grade: Grade, fn):
    """``fn(step, lr, warmup_iters, warmup_factor, iters) -> float``."""
    for lr, warmup, factor, iters in [(0.08, 20, 0.001, 100), (0.01, 7, 0.1, 50), (0.5, 0, 0.001, 30)]:
        settings = TrainSettings(iters=iters, lr=lr, warmup_iters=warmup, warmup_factor=factor,
                                 schedule="cosine")
        steps = np.arange(iters + 1)
        name = f"lr={lr} warm-up {warmup} steps from {factor} x lr, {iters} steps"
        yours = []
        for t in steps:
            ok, value = _call(grade, f"{name}, step {t}", fn, int(t), lr, warmup, factor, iters)
            if not ok:
                break
            yours.append(value)
        else:
            expected = np.array([learning_rate(int(t), settings) for t in steps])
            try:
                yours = np.array(yours, dtype=np.float64)
            except (TypeError, ValueError) as e:
                grade.record(name, False, f"could not read your values as numbers ({e})")
                continue
            grade.compare(f"{name} (entry = step)", yours, expected, rtol=1e-9, atol=1e-12)


def _grad_cases():
    rng = np.random.default_rng(9)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    big = [rng.normal(0, 3, size=s) for s in shapes]          # norm about 12: clipped at 5
    small = [rng.normal(0, 0.1, size=s) for s in shapes]      # norm about 0.4: untouched
    one = [np.array([3.0, 0.0, 4.0]), np.array([[12.0, 0.0], [0.0, 0.0]])]   # norm 13
    return [("norm above the bound", big, 5.0), ("norm below the bound", small, 5.0),
            ("the 3-4-12-13 example", one, 10.0)]


@_grader("gradient clipping by the global norm")
def check_clip_gradients(grade: Grade, fn):
    """``fn(grads, max_norm) -> (clipped, norm)``."""
    for name, grads, max_norm in _grad_cases():
        ok, result = _call(grade, name, fn, [g.copy() for g in grads], max_norm)
        if not ok or _pair(grade, name, result, 2) is None:
            continue
        clipped, norm = result
        params = [Parameter(np.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad[...] = g
        expected_norm = clip_gradients(params, max_norm)
        grade.compare(f"norm before clipping, {name}", np.asarray(norm, dtype=np.float64).reshape(()),
                      expected_norm, rtol=1e-9)
        if not isinstance(clipped, (list, tuple)) or len(clipped) != len(grads):
            grade.record(f"clipped gradients, {name}", False,
                         f"expected a list of {len(grads)} arrays, got {type(clipped).__name__}")
            continue
        for k, (c, p) in enumerate(zip(clipped, params)):
            grade.compare(f"clipped gradient {k}, {name}", c, p.grad, rtol=1e-6, atol=1e-12)
