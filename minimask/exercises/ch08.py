"""Chapter 8 exercises: the mask loss, eq. (3), and its gradient; how far a
training RoI may be from its object.

``check_mask_bce(fn)`` grades ``fn(mask_logits, labels, targets) -> (loss,
dlogits)``: the mean binary cross-entropy of eq. (3) on each RoI's own class
channel, and its gradient with respect to all ``(R, K, m, m)`` logits (for an
upstream gradient of 1). The loss and the gradient are compared with
``minimask.layers.mask_bce``'s NumPy reference, and the gradient also with
centred differences of the reference loss.

``check_largest_shift(answer)`` checks a number: the largest shift ``s``
(as a fraction of the box's width and height, both at once) for which a
shifted copy of a box still has IoU >= 0.5 with it. ``None`` is "not
attempted yet".
"""
from __future__ import annotations

import numpy as np

from minimask.exercises._grading import Grade
from minimask.exercises.ch06 import _call, _grader, _pair
from minimask.gradcheck import numerical_gradient, rel_error
from minimask.layers.mask_bce import mask_bce_grad_numpy, mask_bce_numpy

__all__ = ["check_mask_bce", "check_largest_shift"]


def _bce_cases():
    rng = np.random.default_rng(8)
    cases = []
    for R, K, m in [(3, 4, 5), (2, 3, 4), (1, 2, 3)]:
        logits = rng.normal(0, 2, size=(R, K, m, m))
        labels = rng.integers(0, K, size=R)
        if R > 1:
            labels[:2] = [K - 1, 0]          # two RoIs of different classes
        targets = (rng.uniform(size=(R, m, m)) < 0.4).astype(np.float64)
        cases.append((f"R={R} K={K} m={m}", logits, labels, targets))
    return cases


@_grader("mask BCE, eq. (3), and its gradient")
def check_mask_bce(grade: Grade, fn):
    """``fn(mask_logits (R, K, m, m), labels (R,), targets (R, m, m)) ->
    (loss, dlogits)``."""
    for name, logits, labels, targets in _bce_cases():
        ok, result = _call(grade, name, fn, logits.copy(), labels.copy(), targets.copy())
        if not ok or _pair(grade, name, result, 2) is None:
            continue
        loss, dlogits = result
        grade.compare(f"loss, {name}", np.asarray(loss, dtype=np.float64).reshape(()),
                      mask_bce_numpy(logits, labels, targets), rtol=1e-7, atol=1e-10)
        grade.compare(f"dlogits, {name}", dlogits,
                      mask_bce_grad_numpy(1.0, logits, labels, targets), rtol=1e-6, atol=1e-10)
        x = logits.copy()
        num = numerical_gradient(lambda: mask_bce_numpy(x, labels, targets), x, np.ones(()))
        try:
            err = rel_error(np.asarray(dlogits, dtype=np.float64), num)
        except ValueError as e:
            grade.record(f"dlogits against centred differences, {name}", False, str(e))
            continue
        grade.record(f"dlogits against centred differences, {name}", err < 1e-6,
                     f"relative error {err:.1e}" + ("" if err < 1e-6 else " (must be < 1e-6)"))


def check_largest_shift(answer, verbose: bool = True) -> bool:
    """A box shifted by ``s`` times its width to the right and ``s`` times its
    height down overlaps itself in ``(1 - s)^2`` of its area; IoU >= 0.5 needs
    ``s <= 1 - sqrt(2/3)``. Three decimals are enough."""
    grade = Grade("the largest shift with IoU >= 0.5", verbose)
    expected = 1 - np.sqrt(2 / 3)
    if answer is None:
        if verbose:
            print(f"{grade.exercise}: not attempted yet (your answer is None)")
        return False
    try:
        value = float(answer)
    except (TypeError, ValueError):
        grade.record("your answer", False, f"expected a number, got {answer!r}")
        return grade.finish()
    if not np.isfinite(value):
        grade.record("your answer", False, f"expected a finite number, got {value}")
        return grade.finish()
    inter = (1 - value) ** 2 if 0 <= value <= 1 else 0.0
    grade.record("s to three decimals", abs(value - expected) < 5e-4,
                 f"yours {value:.4f}: a box shifted by it has IoU {inter / (2 - inter):.4f}"
                 if abs(value - expected) >= 5e-4 else "")
    return grade.finish()
