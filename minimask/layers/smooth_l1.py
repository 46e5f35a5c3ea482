r"""Smooth L1 loss, RetinaNet's box-regression loss.

For one regression target, with ``d = pred - target``:

    loss(d) = 0.5 d^2 / beta     where |d| < beta
            = |d| - 0.5 beta     elsewhere

As LaTeX: :math:`\ell(d) = \frac{d^2}{2\beta}` for :math:`|d| < \beta`,
else :math:`|d| - \frac{\beta}{2}`. The quadratic piece near zero keeps the
gradient small for nearly-right boxes; the linear piece keeps outliers from
dominating (the gradient never exceeds 1 in magnitude). The two pieces meet
at ``|d| = beta`` with the same value ``beta / 2`` and the same slope
``sign(d)``, so the loss is continuously differentiable for ``beta > 0``.
``beta = 0`` is plain L1 (the quadratic piece is empty). RetinaMask uses
``beta = 1/9``.

Backward
    d loss / d pred = d / beta    where |d| < beta
                    = sign(d)     elsewhere (0 at d == 0, which happens only
                                  for beta = 0: the subgradient PyTorch uses)

    With per-element ``weights`` (0 for anchors that are not positive) both
    the loss and its gradient are multiplied by the weight. Reductions
    "none", "sum", "mean" and their float64 accumulation are as in
    ``focal_loss`` (whose reduction glue this module reuses); "sum"/"mean"
    return a 0-d array of the input dtype. The "cpu" and "cuda" paths fuse
    loss and local gradient in one pass; the backward scales that gradient.
    The gradient with respect to ``target`` is not returned (targets are
    data, not parameters).
"""
from __future__ import annotations

import numpy as np
from numba import prange

from minimask import _cuda
from minimask._checks import check_float_array
from minimask._cuda import THREADS_PER_BLOCK, blocks_for, cuda
from minimask._threads import parallel_kernel
from minimask.backend import CPU, CUDA, NUMPY, current_backend
from minimask.layers.focal_loss import (LossCache, block_sum_into, check_reduction,
                                        finish_reduction, host_as, loss_backward,
                                        loss_backward_numpy, reduce_numpy)

# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------


def smooth_l1_numpy(pred, target, w, beta):
    """Per-element smooth L1 (no reduction); ``w`` may be None."""
    d = pred - target
    ad = np.abs(d)
    # beta = 0: the quadratic branch is never taken, so 0/0 is never used
    quadratic = 0.5 * d * d / beta if beta > 0 else np.zeros_like(d)
    loss = np.where(ad < beta, quadratic, ad - 0.5 * beta)
    return loss if w is None else loss * w


def smooth_l1_grad_numpy(pred, target, w, beta):
    """Per-element ``d loss / d pred``."""
    d = pred - target
    slope = d / beta if beta > 0 else np.zeros_like(d)
    grad = np.where(np.abs(d) < beta, slope, np.sign(d))
    return grad if w is None else grad * w


# --------------------------------------------------------------------------
# Scalar math, written once and compiled for the CPU and the GPU
# --------------------------------------------------------------------------


def _smooth_l1_terms(d, beta):
    """``(loss, dloss/dd)`` for one difference ``d = pred - target``."""
    ad = abs(d)
    if ad < beta:  # never true for beta = 0
        return 0.5 * d * d / beta, d / beta
    if d > 0:
        return ad - 0.5 * beta, 1.0
    if d < 0:
        return ad - 0.5 * beta, -1.0
    return ad - 0.5 * beta, 0.0


smooth_l1_terms_cpu, smooth_l1_terms_cuda = _cuda.compile_for_both(_smooth_l1_terms)


# --------------------------------------------------------------------------
# Numba CPU kernel (flat arrays; loss, local gradient and the sum in one pass)
# --------------------------------------------------------------------------


@parallel_kernel(reduces=True)
def _smooth_l1_forward_cpu(pred, target, w, has_weights, beta, loss, grad):
    total = 0.0  # a prange reduction variable
    for i in prange(pred.size):
        li, gi = smooth_l1_terms_cpu(pred[i] - target[i], beta)
        if has_weights:
            li *= w[i]
            gi *= w[i]
        loss[i] = li
        grad[i] = gi
        total += li
    return total


# --------------------------------------------------------------------------
# CUDA kernel (one thread per element; block tree reduction for the sum)
# --------------------------------------------------------------------------

if cuda is not None:
    @cuda.jit
    def _smooth_l1_forward_cuda(pred, target, w, has_weights, beta, loss, grad, total):
        i = cuda.grid(1)
        li = 0.0
        if i < pred.size:
            li, gi = smooth_l1_terms_cuda(pred[i] - target[i], beta)
            if has_weights:
                li *= w[i]
                gi *= w[i]
            loss[i] = li
            grad[i] = gi
        block_sum_into(li, total)  # all threads of the block, outside the branch


# --------------------------------------------------------------------------
# Registration: forward (pred, target, w, beta, reduction) -> (loss, state),
# backward (state, dout, reduction) -> dpred
# --------------------------------------------------------------------------


def _forward_numpy(pred, target, w, beta, reduction):
    loss = smooth_l1_numpy(pred, target, w, beta)
    return reduce_numpy(loss, reduction), (pred, target, w, beta)


def _forward_cpu(pred, target, w, beta, reduction):
    has_weights = w is not None
    x = np.ascontiguousarray(pred).reshape(-1)
    t = np.ascontiguousarray(target, dtype=pred.dtype).reshape(-1)
    wf = np.ascontiguousarray(w, dtype=pred.dtype).reshape(-1) if has_weights else x[:1]
    loss = np.empty_like(x)
    grad = np.empty_like(x)
    total = _smooth_l1_forward_cpu(x, t, wf, has_weights, beta, loss, grad)
    grad = grad.reshape(pred.shape)
    if reduction == "none":
        return loss.reshape(pred.shape), grad
    return finish_reduction(total, pred.size, reduction, pred.dtype, False), grad


def _forward_cuda(pred, target, w, beta, reduction):
    has_weights = w is not None
    n = pred.size
    d_w = w if has_weights else _cuda.device_zeros(1, pred.dtype)
    loss = cuda.device_array(pred.shape, dtype=pred.dtype)
    grad = cuda.device_array(pred.shape, dtype=pred.dtype)
    total = _cuda.device_zeros(1, np.float64)
    if n:
        _smooth_l1_forward_cuda[blocks_for(n), THREADS_PER_BLOCK](
            pred.reshape(n), target.reshape(n), d_w.reshape(d_w.size), has_weights, beta,
            loss.reshape(n), grad.reshape(n), total)
    if reduction == "none":
        return loss, grad
    return finish_reduction(total, n, reduction, pred.dtype, True), grad


NUMPY.register("smooth_l1_forward", _forward_numpy)
NUMPY.register("smooth_l1_backward", loss_backward_numpy(smooth_l1_grad_numpy))
CPU.register("smooth_l1_forward", _forward_cpu)
CPU.register("smooth_l1_backward", CPU.op("loss.scale_gradient"))
if cuda is not None:
    CUDA.register("smooth_l1_forward", _forward_cuda)
    CUDA.register("smooth_l1_backward", CUDA.op("loss.scale_gradient"))


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def smooth_l1_forward(pred, target, beta=1.0 / 9.0, weights=None, reduction="sum"):
    """Smooth L1 loss of ``d = pred - target``.

    Inputs:
    - pred: any shape, e.g. (N, A, 4) box deltas; float32 or float64
    - target: the shape of pred (cast to its dtype)
    - beta: width of the quadratic zone, >= 0 (0 gives plain L1)
    - weights: the shape of pred, or None; 0 for elements that do not count
    - reduction: "none", "sum" or "mean" (mean over all elements)

    Returns ``(loss, cache)``: per element
    ``w * (0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta)``, reduced as
    asked ("sum"/"mean" give a 0-d array of the dtype of pred).
    """
    pred = check_float_array("pred", pred)
    check_reduction(reduction)
    beta = float(beta)
    if not beta >= 0.0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    target = host_as("target", target, "pred", pred)
    if weights is not None:
        weights = host_as("weights", weights, "pred", pred)

    be = current_backend()
    loss, state = be.op("smooth_l1_forward")(be.asarray(pred), be.asarray(target),
                                             be.asarray(weights), beta, reduction)
    cache = LossCache(be, reduction, tuple(pred.shape), state, pred)
    return be.output(loss, pred), cache


def smooth_l1_backward(dout, cache):
    """Gradient of the smooth L1 loss with respect to ``pred``.

    Inputs:
    - dout: the shape of the loss for "none"; a scalar (number or 0-d array)
      for "sum" and "mean"
    - cache: from ``smooth_l1_forward``

    Returns ``dpred`` (shape and dtype of pred):
    ``dout * w * (d / beta if |d| < beta else sign(d))``, divided by the
    element count for "mean".
    """
    return loss_backward(dout, cache, "smooth_l1_backward")
