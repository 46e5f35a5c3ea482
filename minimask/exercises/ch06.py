"""Chapter 6 exercises: group normalisation, forward and backward.

``check_group_norm_forward(fn)`` grades ``fn(x, gamma, beta, num_groups, eps)
-> out`` against ``minimask.layers.group_norm``'s NumPy reference.

``check_group_norm_backward(fn)`` grades ``fn(dout, x, gamma, mean, rstd,
num_groups) -> (dx, dgamma, dbeta)`` (``mean`` and ``rstd`` of shape (N, G),
as the forward computes them) twice: against the reference backward, and
against centred differences of the reference forward - an independent check
that does not trust the reference's algebra.

This module also holds what the graders of chapters 6-10 share: a learner
function that still raises ``NotImplementedError`` is "not attempted yet" -
the check says so and returns ``False`` without raising, so a chapter runs
top to bottom before the learner has written a line.
"""
from __future__ import annotations

import functools

import numpy as np

from minimask.exercises._grading import Grade, NotAttempted
from minimask.gradcheck import numerical_gradient, rel_error
from minimask.layers.group_norm import group_norm_backward_numpy, group_norm_forward_numpy

__all__ = ["check_group_norm_forward", "check_group_norm_backward"]


def _call(grade: Grade, name: str, fn, *args, **kwargs):
    """``Grade.call``: an exception is a failed check, and ``NotImplementedError``
    raises ``NotAttempted``, which ends the grading (see ``_grader``)."""
    return grade.call(name, fn, *args, **kwargs)


def _grader(exercise: str):
    """Decorate a check: a learner function raising ``NotImplementedError``
    prints "not attempted yet" and the check returns ``False``."""
    def wrap(check):
        @functools.wraps(check)
        def checked(your_function, verbose: bool = True):
            grade = Grade(exercise, verbose)
            try:
                check(grade, your_function)
            except NotAttempted as e:
                if verbose:
                    print(e)
                return False
            return grade.finish()
        return checked
    return wrap


def _pair(grade: Grade, name: str, result, n: int):
    """Unpack a learner's tuple of ``n`` results, or record why it cannot be."""
    if not isinstance(result, (tuple, list)) or len(result) != n:
        got = type(result).__name__ + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        grade.record(name, False, f"expected a tuple of {n} arrays, got {got}")
        return None
    return result


def _gn_case(rng, N, C, H, W, G):
    x = rng.normal(1.5, 2.0, size=(N, C, H, W))        # a mean far from 0: mu matters
    gamma = rng.normal(1.0, 0.5, size=C)
    beta = rng.normal(0.0, 0.5, size=C)
    return x, gamma, beta, G


_GN_CASES = [(2, 6, 3, 4, 3), (1, 4, 5, 5, 1), (3, 4, 2, 3, 4)]   # N, C, H, W, G: groups, LN, IN


@_grader("group norm forward")
def check_group_norm_forward(grade: Grade, fn):
    """``fn(x, gamma, beta, num_groups, eps) -> out`` (N, C, H, W)."""
    rng = np.random.default_rng(6)
    for N, C, H, W, G in _GN_CASES:
        x, gamma, beta, G = _gn_case(rng, N, C, H, W, G)
        ok, out = _call(grade, f"N={N} C={C} G={G}", fn, x.copy(), gamma.copy(), beta.copy(), G, 1e-5)
        if ok:
            expected, _, _ = group_norm_forward_numpy(x, gamma, beta, G, 1e-5)
            grade.compare(f"out, N={N} C={C} H={H} W={W} G={G}", out, expected, rtol=1e-6, atol=1e-8)


@_grader("group norm backward")
def check_group_norm_backward(grade: Grade, fn):
    """``fn(dout, x, gamma, mean, rstd, num_groups) -> (dx, dgamma, dbeta)``."""
    rng = np.random.default_rng(60)
    eps = 1e-5
    for N, C, H, W, G in _GN_CASES:
        x, gamma, beta, G = _gn_case(rng, N, C, H, W, G)
        _, mean, rstd = group_norm_forward_numpy(x, gamma, beta, G, eps)
        dout = rng.normal(size=x.shape)                 # random: a sum would hide a transposition
        case = f"N={N} C={C} G={G}"
        ok, result = _call(grade, case, fn, dout.copy(), x.copy(), gamma.copy(), mean.copy(),
                           rstd.copy(), G)
        if not ok or _pair(grade, case, result, 3) is None:
            continue
        dx, dgamma, dbeta = result
        ref_dx, ref_dgamma, ref_dbeta = group_norm_backward_numpy(dout, x, gamma, mean, rstd, G)
        grade.compare(f"dbeta, {case}", dbeta, ref_dbeta, rtol=1e-6, atol=1e-8)
        grade.compare(f"dgamma, {case}", dgamma, ref_dgamma, rtol=1e-6, atol=1e-8)
        grade.compare(f"dx, {case}", dx, ref_dx, rtol=1e-6, atol=1e-8)
        # independent of the reference backward: centred differences of the forward
        xx = x.copy()
        num_dx = numerical_gradient(lambda: group_norm_forward_numpy(xx, gamma, beta, G, eps)[0],
                                    xx, dout)
        try:
            err = rel_error(np.asarray(dx, dtype=np.float64), num_dx)
        except ValueError as e:
            grade.record(f"dx against centred differences, {case}", False, str(e))
            continue
        grade.record(f"dx against centred differences, {case}", err < 1e-6,
                     f"relative error {err:.1e}" + ("" if err < 1e-6 else " (must be < 1e-6)"))
