"""Chapter 4's exercises: the focal loss gradient and smooth L1.

``check_focal_loss_gradient(fn)``
    ``fn(logits, targets, alpha, gamma) -> dlogits``: the derivative of the
    per-element focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` with respect
    to each logit (0/1 targets, ``0 < alpha < 1``, ``gamma >= 0``, logits of
    moderate size). Graded against ``sigmoid_focal_loss_backward`` and by a
    gradient check against centred differences of
    ``sigmoid_focal_loss_forward``.

``check_smooth_l1(fn)``
    ``fn(d, beta) -> (loss, grad)``: per element, the smooth L1 loss of the
    difference ``d = pred - target`` and its derivative with respect to
    ``d``, for ``beta > 0``. Graded against ``smooth_l1_forward`` /
    ``smooth_l1_backward`` (with points kept off the kink ``|d| = beta``).

``check_answer_focal_tenth(value)``
    The ``p_t`` at which the focal loss with ``gamma = 2`` (no alpha) is one
    tenth of the cross-entropy.
"""
from __future__ import annotations

import math

import numpy as np

import minimask
from minimask.exercises._grading import Grade
from minimask.layers import (sigmoid_focal_loss_backward, sigmoid_focal_loss_forward,
                             smooth_l1_backward, smooth_l1_forward)

__all__ = ["check_focal_loss_gradient", "check_smooth_l1", "check_answer_focal_tenth"]


def check_focal_loss_gradient(fn, verbose: bool = True) -> bool:
    """Grade ``fn(logits, targets, alpha, gamma) -> dlogits`` (per element)."""
    g = Grade("focal_loss_gradient", verbose)
    rng = np.random.default_rng(6)
    for alpha, gamma in [(0.25, 0.0), (0.25, 2.0), (0.5, 0.5), (0.75, 5.0)]:
        logits = rng.normal(0.0, 2.0, size=(4, 6))
        targets = (rng.random((4, 6)) < 0.4).astype(np.float64)
        name = f"alpha {alpha}, gamma {gamma}"
        ok, yours = g.call(name, fn, logits.copy(), targets.copy(), alpha, gamma)
        if not ok:
            continue
        with minimask.using_backend("numpy"):
            _, cache = sigmoid_focal_loss_forward(logits, targets, alpha=alpha, gamma=gamma,
                                                  reduction="none")
            expected = sigmoid_focal_loss_backward(np.ones_like(logits), cache)
            if not g.compare(name, yours, expected, rtol=1e-8, atol=1e-12):
                continue
            dout = rng.normal(size=logits.shape)
            g.gradient(f"{name}, gradient check with a random upstream gradient",
                       lambda: sigmoid_focal_loss_forward(logits, targets, alpha=alpha,
                                                          gamma=gamma, reduction="none")[0],
                       logits, dout * np.asarray(yours, dtype=np.float64), dout)
    return g.finish()


def check_smooth_l1(fn, verbose: bool = True) -> bool:
    """Grade ``fn(d, beta) -> (loss, grad)`` (per element)."""
    g = Grade("smooth_l1", verbose)
    rng = np.random.default_rng(7)
    for beta in [1 / 9, 0.5, 1.0, 2.0]:
        d = rng.uniform(-3, 3, size=40)
        d[:4] = [0.0, 0.3 * beta, -0.7 * beta, 1.5 * beta]      # inside and just outside
        d[np.abs(np.abs(d) - beta) < 1e-3] += 0.01              # off the kink
        name = f"beta {beta:.3g}"
        ok, result = g.call(name, fn, d.copy(), beta)
        if not ok:
            continue
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            g.record(name, False, "return (loss, grad)")
            continue
        with minimask.using_backend("numpy"):
            loss, cache = smooth_l1_forward(d, np.zeros_like(d), beta=beta, reduction="none")
            grad = smooth_l1_backward(np.ones_like(d), cache)
        g.compare(f"loss, {name}", result[0], loss, rtol=1e-10, atol=1e-12)
        g.compare(f"grad, {name}", result[1], grad, rtol=1e-10, atol=1e-12)
    return g.finish()


def check_answer_focal_tenth(value, verbose: bool = True) -> bool:
    """Grade the ``p_t`` with ``(1 - p_t)^2 = 0.1``."""
    g = Grade("answer_focal_tenth", verbose)
    g.answer("p_t where FL = CE / 10 (gamma 2)", value, 1.0 - math.sqrt(0.1), rtol=1e-3)
    return g.finish()
