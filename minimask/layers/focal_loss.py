r"""Sigmoid focal loss, RetinaNet's classification loss.

Each anchor gets K independent binary classifiers, one per class. For one
logit ``x`` with target ``t`` (0 or 1) write ``p = sigmoid(x)`` and

    ce      = -t log p - (1 - t) log(1 - p)           binary cross-entropy
    p_t     = p t + (1 - p)(1 - t)                     prob. of the true label
    alpha_t = alpha t + (1 - alpha)(1 - t)             (1 when alpha < 0)
    FL(x)   = w * alpha_t * (1 - p_t)^gamma * ce       w = weight, 0 = ignored

As LaTeX: :math:`FL = -w\,\alpha_t (1 - p_t)^\gamma \log p_t` for 0/1
targets. The factor ``(1 - p_t)^gamma`` is what makes it *focal*: an anchor
already classified well (``p_t`` near 1) contributes almost nothing, so the
~100k easy background anchors of an image no longer drown the few hard ones.
``gamma = 0`` gives back the (alpha-weighted) cross-entropy. The reductions
"none", "sum" and "mean" are those of ``torchvision.ops.sigmoid_focal_loss``.
Dividing by the number of positive anchors (RetinaNet's normalisation) is the
model's job, not this function's: use ``reduction="sum"`` and divide.

Stable evaluation
    ``ce`` is never computed as ``log(sigmoid(x))``, which is ``log(0)`` once
    ``sigmoid`` rounds to 0 or 1. With ``e = exp(-|x|)`` (in (0, 1], so it
    cannot overflow)

        ce = max(x, 0) - x t + log1p(e),

    exact for any finite ``x``. ``p`` and ``1 - p`` are each computed without
    a subtraction (``1/(1+e)`` and ``e/(1+e)``, chosen by the sign of ``x``),
    so ``q = 1 - p_t = t (1 - p) + (1 - t) p`` keeps full relative precision
    even when it is tiny.

Backward, derived
    ``dp/dx = p (1 - p)``, ``d ce/dx = p - t`` and
    ``d p_t/dx = (2t - 1) p (1 - p)``, so ``dq/dx = (1 - 2t) p (1 - p)`` and

        dFL/dx = w alpha_t [ q^gamma (p - t)
                             + gamma q^(gamma - 1) ce (1 - 2t) p (1 - p) ].

    Written like that, ``q^(gamma-1)`` is infinite when ``q`` rounds to 0 and
    ``gamma < 1`` (e.g. ``t = 1``, ``x = 800``): ``inf * 0 = NaN``. So we pull
    ``q^gamma`` out:

        dFL/dx = w alpha_t q^gamma [ (p - t) + gamma ce (1 - 2t) r ],
        r = p (1 - p) / q.

    ``r`` is bounded: ``q >= min(p, 1 - p)`` for any ``t`` in [0, 1], so
    ``r <= max(p, 1 - p) <= 1`` (for 0/1 targets ``r`` is exactly ``p_t``).
    Where ``q`` is exactly 0 we set ``r = 0``: then either ``gamma > 0`` and
    the factor ``q^gamma = 0`` kills the bracket anyway (the true limit is 0),
    or ``gamma = 0`` and the ``r`` term is multiplied by ``gamma = 0``. So the
    gradient is finite for every finite logit and every ``gamma >= 0``,
    including ``gamma`` in (0, 1) and ``gamma = 0`` (``0^0 = 1``). ``p - t``
    is evaluated as ``(1 - t) p - t (1 - p)`` for the same reason as ``q``.
    Soft targets in [0, 1] work too (the formulas above never assume 0/1).

Reductions and dtypes
    "none" returns the per-element loss (the shape of ``logits``); "sum" and
    "mean" return a 0-d array of the input dtype (``float(loss)`` gives a
    Python float). "mean" of an empty input is 0, not NaN. Sums are
    accumulated in float64 on every backend, so float32 totals over millions
    of anchors do not drift, and the backends agree to float32 round-off of
    the elements. The fast kernels evaluate each element in float64 and store
    it in the input dtype; the NumPy reference works in the input dtype.

Fast paths
    "cpu" and "cuda" fuse the loss and its local derivative into one pass
    over the elements: the forward stores ``dFL/dx`` in the cache, and the
    backward only multiplies it by ``dout`` (and ``1/n`` for "mean"). The
    backward therefore follows the backend that ran the forward. The CUDA
    forward sums with a shared-memory tree reduction per block and one
    ``cuda.atomic.add`` per block into a float64 total. The reduction glue
    (``block_sum_into``, ``finish_reduction``, ``scale_gradient``) and the
    stable ``bce_terms`` are reused by ``smooth_l1`` and ``mask_bce``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float64, prange

from minimask import _cuda
from minimask._checks import check_float_array, check_same_shape, is_device_array
from minimask._cuda import THREADS_PER_BLOCK, blocks_for, cuda
from minimask._threads import parallel_kernel
from minimask.backend import CPU, CUDA, NUMPY, current_backend

REDUCTIONS = ("none", "sum", "mean")

# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------


def _sigmoid_pair_numpy(x):
    """``(p, 1 - p)`` for ``p = sigmoid(x)``, each without cancellation."""
    e = np.exp(-np.abs(x))  # in (0, 1]: never overflows
    big = 1 / (1 + e)       # sigmoid(|x|)
    small = e / (1 + e)     # sigmoid(-|x|)
    p = np.where(x >= 0, big, small)
    one_minus_p = np.where(x >= 0, small, big)
    return p, one_minus_p


def bce_with_logits_numpy(x, t):
    """Elementwise ``-t log p - (1-t) log(1-p)``, ``p = sigmoid(x)``, stably."""
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def _alpha_t_numpy(t, alpha):
    return alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else np.ones_like(t)


def focal_loss_numpy(x, t, w, alpha, gamma):
    """Per-element focal loss (no reduction); ``w`` may be None."""
    p, one_minus_p = _sigmoid_pair_numpy(x)
    ce = bce_with_logits_numpy(x, t)
    q = t * one_minus_p + (1 - t) * p          # 1 - p_t
    loss = _alpha_t_numpy(t, alpha) * q ** gamma * ce
    return loss if w is None else loss * w


def focal_loss_grad_numpy(x, t, w, alpha, gamma):
    """Per-element ``dFL/dx`` (the derivation is in the module docstring)."""
    p, one_minus_p = _sigmoid_pair_numpy(x)
    ce = bce_with_logits_numpy(x, t)
    q = t * one_minus_p + (1 - t) * p
    p_minus_t = (1 - t) * p - t * one_minus_p
    # r = p (1 - p) / q, and 0 where q == 0 (see the docstring)
    r = np.divide(p * one_minus_p, q, out=np.zeros_like(q), where=q > 0)
    grad = _alpha_t_numpy(t, alpha) * q ** gamma * (p_minus_t + gamma * ce * (1 - 2 * t) * r)
    return grad if w is None else grad * w


def reduce_numpy(loss, reduction):
    """Apply a reduction; sums accumulate in float64, the result keeps the
    input dtype (a 0-d array for "sum" and "mean")."""
    if reduction == "none":
        return loss
    total = np.sum(loss, dtype=np.float64)
    if reduction == "mean":
        total = total / loss.size if loss.size else 0.0
    return np.asarray(total, dtype=loss.dtype)


# --------------------------------------------------------------------------
# Scalar math, written once and compiled for the CPU and the GPU
# --------------------------------------------------------------------------


def _bce_terms(x, t):
    """For one logit: ``(ce, p, 1 - p)``, the stable BCE-with-logits and the
    sigmoid and its complement, each without cancellation."""
    e = math.exp(-abs(x))
    ce = max(x, 0.0) - x * t + math.log1p(e)
    if x >= 0:
        p = 1.0 / (1.0 + e)
        one_minus_p = e / (1.0 + e)
    else:
        p = e / (1.0 + e)
        one_minus_p = 1.0 / (1.0 + e)
    return ce, p, one_minus_p


bce_terms_cpu, bce_terms_cuda = _cuda.compile_for_both(_bce_terms)


def _focal_terms(t, ce, p, one_minus_p, alpha, gamma):
    """For one element, given ``bce_terms`` of its logit: ``(loss, dloss/dx)``
    of the focal loss without the weight (module docstring for the algebra)."""
    q = t * one_minus_p + (1.0 - t) * p              # 1 - p_t, no cancellation
    p_minus_t = (1.0 - t) * p - t * one_minus_p
    r = p * one_minus_p / q if q > 0.0 else 0.0      # bounded by 1; 0 at q == 0
    modulator = math.pow(q, gamma)                   # 0^0 = 1 for gamma = 0
    loss = modulator * ce
    grad = modulator * (p_minus_t + gamma * ce * (1.0 - 2.0 * t) * r)
    if alpha >= 0.0:
        alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
        loss *= alpha_t
        grad *= alpha_t
    return loss, grad


focal_terms_cpu, focal_terms_cuda = _cuda.compile_for_both(_focal_terms)


# --------------------------------------------------------------------------
# Numba CPU kernels (flat, contiguous arrays; one prange over elements)
# --------------------------------------------------------------------------


def _focal_work(x, *rest):
    """The thread rule's work measure: a focal term (an exp, a log1p, a
    division, a pow) costs about what 64 elements of an element-wise copy
    do. Measured: 2 x 4096 x 8 logits took 0.98 ms on one thread and 0.60
    on two; 2 x 1024 x 8, 0.25 and 0.23."""
    return 64 * x.size


@parallel_kernel(work=_focal_work, reduces=True)
def _focal_forward_cpu(x, t, w, has_weights, alpha, gamma, loss, grad):
    """Fill ``loss`` and ``grad`` (the local derivative) and return the float64
    sum of ``loss``. ``total`` is a prange reduction variable, not a shared
    array element, so Numba combines the per-thread partial sums safely."""
    total = 0.0
    for i in prange(x.size):
        ce, p, one_minus_p = bce_terms_cpu(x[i], t[i])
        li, gi = focal_terms_cpu(t[i], ce, p, one_minus_p, alpha, gamma)
        if has_weights:
            li *= w[i]
            gi *= w[i]
        loss[i] = li
        grad[i] = gi
        total += li
    return total


@parallel_kernel
def _scale_cpu(grad, scale, out):
    for i in prange(grad.size):
        out[i] = grad[i] * scale


@parallel_kernel
def _multiply_cpu(grad, dout, out):
    for i in prange(grad.size):
        out[i] = grad[i] * dout[i]


# --------------------------------------------------------------------------
# CUDA kernels (one thread per element, block tree reduction for the sum)
# --------------------------------------------------------------------------

if cuda is not None:
    @cuda.jit(device=True)
    def block_sum_into(value, total):
        """Add ``value`` of every thread of the block into ``total[0]``.

        Plan: each thread puts its value in shared memory; the tree halves the
        active threads each step (``syncthreads`` after every step, outside
        any branch, so all threads of the block reach it); thread 0 then adds
        the block's partial sum with one atomic. Needs ``blockDim.x ==
        THREADS_PER_BLOCK`` (a power of two).
        """
        partial = cuda.shared.array(THREADS_PER_BLOCK, float64)
        tid = cuda.threadIdx.x
        partial[tid] = value
        cuda.syncthreads()
        step = THREADS_PER_BLOCK // 2
        while step > 0:
            if tid < step:
                partial[tid] += partial[tid + step]
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            cuda.atomic.add(total, 0, partial[0])

    @cuda.jit
    def _focal_forward_cuda(x, t, w, has_weights, alpha, gamma, loss, grad, total):
        i = cuda.grid(1)
        li = 0.0
        if i < x.size:
            ce, p, one_minus_p = bce_terms_cuda(x[i], t[i])
            li, gi = focal_terms_cuda(t[i], ce, p, one_minus_p, alpha, gamma)
            if has_weights:
                li *= w[i]
                gi *= w[i]
            loss[i] = li
            grad[i] = gi
        # every thread, in range or not, takes part in the block reduction
        block_sum_into(li, total)

    @cuda.jit
    def _scale_cuda(grad, scale, out):
        i = cuda.grid(1)
        if i < grad.size:
            out[i] = grad[i] * scale

    @cuda.jit
    def _multiply_cuda(grad, dout, out):
        i = cuda.grid(1)
        if i < grad.size:
            out[i] = grad[i] * dout[i]

    @cuda.jit
    def _store_total_cuda(total, scale, out):
        i = cuda.grid(1)
        if i < 1:
            out[0] = total[0] * scale
else:  # pragma: no cover - only without numba-cuda
    block_sum_into = None


# --------------------------------------------------------------------------
# Glue shared by the three losses
# --------------------------------------------------------------------------


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def host_as(name, a, like_name, like):
    """A non-differentiated float input (targets, weights) of the shape of
    ``like``, as a contiguous host array of its dtype; device arrays are
    passed through unchanged (the kernels accept either float dtype)."""
    a = check_float_array(name, a)
    check_same_shape(name, a, like_name, like)
    if is_device_array(a):
        return a
    return np.ascontiguousarray(a, dtype=like.dtype)


def finish_reduction(total, n, reduction, dtype, on_device):
    """Turn a float64 ``total`` into the value ``*_forward`` returns for
    "sum"/"mean": a 0-d array of ``dtype``. ``total`` is a Python float
    (cpu) or, with ``on_device``, a 1-element float64 device array (cuda);
    then the result is a device 0-d array (``Backend.output`` brings it to
    the host for a caller that passed host arrays)."""
    scale = 1.0
    if reduction == "mean":
        scale = 1.0 / n if n else 0.0
    if not on_device:
        return np.asarray(total * scale, dtype=dtype)
    out = cuda.device_array(1, dtype=dtype)
    _store_total_cuda[1, THREADS_PER_BLOCK](total, scale, out)
    return out.reshape(())


def scalar_dout(dout):
    """``dout`` for a "sum"/"mean" loss: a Python number or a 0-d array
    (host or device), returned as a Python float."""
    if isinstance(dout, (int, float, np.integer, np.floating)) and not isinstance(dout, bool):
        return float(dout)
    if is_device_array(dout):
        dout = dout.copy_to_host() if hasattr(dout, "copy_to_host") else np.asarray(dout)
    dout = np.asarray(dout)
    if dout.shape != () or dout.dtype.kind not in "fiu":
        raise ValueError(f"dout must be a scalar (a number or a 0-d array) for a "
                         f"summed or averaged loss, got shape {dout.shape} dtype {dout.dtype}")
    return float(dout)


def upstream(dout, reduction, shape, be):
    """Check ``dout`` against the loss it differentiates: for "none" an
    array of the loss's shape, brought to backend ``be``; otherwise a scalar,
    returned as a Python float."""
    if reduction == "none":
        dout = check_float_array("dout", dout)
        if tuple(dout.shape) != tuple(shape):
            raise ValueError(f"dout must have the shape of the loss {tuple(shape)}, "
                             f"got {tuple(dout.shape)}")
        return be.asarray(dout)
    return scalar_dout(dout)


def _scale_gradient_cpu(grad, dout, reduction):
    """``dx = dout * grad`` (``dout`` an array for "none", else a float),
    with ``1/n`` for "mean", by the Numba kernels; grad's dtype."""
    n = grad.size
    flat = grad.reshape(-1)
    out = np.empty_like(flat)
    if reduction == "none":
        _multiply_cpu(flat, np.ascontiguousarray(dout, dtype=grad.dtype).reshape(-1), out)
    else:
        scale = dout / n if reduction == "mean" and n else (0.0 if reduction == "mean" else dout)
        _scale_cpu(flat, scale, out)
    return out.reshape(grad.shape)


def _scale_gradient_cuda(grad, dout, reduction):
    """The same on the device (``grad`` and an array ``dout`` device arrays)."""
    n = grad.size
    out = cuda.device_array(grad.shape, dtype=grad.dtype)
    if n:
        if reduction == "none":
            _multiply_cuda[blocks_for(n), THREADS_PER_BLOCK](grad.reshape(n), dout.reshape(n),
                                                             out.reshape(n))
        else:
            scale = dout / n if reduction == "mean" else dout
            _scale_cuda[blocks_for(n), THREADS_PER_BLOCK](grad.reshape(n), scale, out.reshape(n))
    return out


def loss_backward_numpy(grad_numpy):
    """The NumPy backward of an elementwise loss whose local derivative is
    ``grad_numpy(*inputs)``: it is evaluated here, from the stored inputs."""
    def backward(inputs, dout, reduction):
        local = grad_numpy(*inputs)
        if reduction == "none":
            return (dout * local).astype(local.dtype, copy=False)
        scale = dout
        if reduction == "mean":
            scale = scale / local.size if local.size else 0.0
        return (local * local.dtype.type(scale)).astype(local.dtype, copy=False)
    return backward


class LossCache:
    """What a loss's backward needs: the backend that ran the forward, the
    reduction, the loss's shape, ``state`` - the local gradient (fast
    backends, host or device) or the inputs (the NumPy reference) - and
    whether the caller's input was a host array (then so is the gradient)."""

    def __init__(self, be, reduction, shape, state, like):
        self.backend = be
        self.reduction = reduction
        self.shape = shape
        self.state = state
        self.host_input = not be.on_device or not be.is_native(like)


def loss_backward(dout, cache, op):
    """Backward shared by the losses: run ``op`` (registered per backend,
    taking ``(state, dout, reduction)``) on the forward's backend; the
    gradient lives where the forward's input did."""
    be = cache.backend
    d = upstream(dout, cache.reduction, cache.shape, be)
    dx = be.op(op)(cache.state, d, cache.reduction)
    return be.to_host(dx) if cache.host_input else dx


# --------------------------------------------------------------------------
# The focal loss on each backend: forward (x, t, w, alpha, gamma, reduction)
# -> (loss, state); backward (state, dout, reduction) -> dx
# --------------------------------------------------------------------------


def _focal_forward_numpy(x, t, w, alpha, gamma, reduction):
    loss = focal_loss_numpy(x, t, w, alpha, gamma)
    return reduce_numpy(loss, reduction), (x, t, w, alpha, gamma)


def _focal_forward_fast_cpu(x, t, w, alpha, gamma, reduction):
    has_weights = w is not None
    xf = np.ascontiguousarray(x).reshape(-1)
    tf = np.ascontiguousarray(t, dtype=x.dtype).reshape(-1)
    wf = np.ascontiguousarray(w, dtype=x.dtype).reshape(-1) if has_weights else xf[:1]
    loss = np.empty_like(xf)
    grad = np.empty_like(xf)
    total = _focal_forward_cpu(xf, tf, wf, has_weights, alpha, gamma, loss, grad)
    grad = grad.reshape(x.shape)
    if reduction == "none":
        return loss.reshape(x.shape), grad
    return finish_reduction(total, x.size, reduction, x.dtype, False), grad


def _focal_forward_fast_cuda(x, t, w, alpha, gamma, reduction):
    has_weights = w is not None
    n = x.size
    d_w = w if has_weights else _cuda.device_zeros(1, x.dtype)
    loss = cuda.device_array(x.shape, dtype=x.dtype)
    grad = cuda.device_array(x.shape, dtype=x.dtype)
    total = _cuda.device_zeros(1, np.float64)
    if n:
        _focal_forward_cuda[blocks_for(n), THREADS_PER_BLOCK](
            x.reshape(n), t.reshape(n), d_w.reshape(d_w.size), has_weights,
            alpha, gamma, loss.reshape(n), grad.reshape(n), total)
    if reduction == "none":
        return loss, grad
    return finish_reduction(total, n, reduction, x.dtype, True), grad


NUMPY.register("sigmoid_focal_loss_forward", _focal_forward_numpy)
NUMPY.register("sigmoid_focal_loss_backward", loss_backward_numpy(focal_loss_grad_numpy))
CPU.register("sigmoid_focal_loss_forward", _focal_forward_fast_cpu)
CPU.register("sigmoid_focal_loss_backward", _scale_gradient_cpu)
CPU.register("loss.scale_gradient", _scale_gradient_cpu)
if cuda is not None:
    CUDA.register("sigmoid_focal_loss_forward", _focal_forward_fast_cuda)
    CUDA.register("sigmoid_focal_loss_backward", _scale_gradient_cuda)
    CUDA.register("loss.scale_gradient", _scale_gradient_cuda)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def sigmoid_focal_loss_forward(logits, targets, alpha=0.25, gamma=2.0, weights=None,
                               reduction="sum"):
    """Sigmoid focal loss, ``FL = w alpha_t (1 - p_t)^gamma ce`` per element.

    Inputs:
    - logits: any shape, e.g. (N, A, K) - one logit per anchor and class;
      float32 or float64
    - targets: the shape of logits, 1 for the anchor's class and 0 elsewhere
      (soft targets in [0, 1] also work); cast to the dtype of logits
    - alpha: weight of the positives (negatives get 1 - alpha); alpha < 0
      turns the weighting off, as in torchvision
    - gamma: focusing exponent, >= 0 (0 gives the cross-entropy)
    - weights: the shape of logits, or None; 0 for ignored anchors
    - reduction: "none", "sum" or "mean" (mean over all elements)

    Returns ``(loss, cache)``: ``loss`` has the shape of logits for "none",
    and is a 0-d array of the dtype of logits for "sum"/"mean". Dividing by
    the number of positives is left to the caller.
    """
    logits = check_float_array("logits", logits)
    check_reduction(reduction)
    alpha, gamma = float(alpha), float(gamma)
    if not alpha <= 1.0:
        raise ValueError(f"alpha must be <= 1 (negative turns it off), got {alpha!r}")
    if not gamma >= 0.0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    targets = host_as("targets", targets, "logits", logits)
    if weights is not None:
        weights = host_as("weights", weights, "logits", logits)
    if isinstance(targets, np.ndarray) and targets.size and not (
            np.all(targets >= 0) and np.all(targets <= 1)):
        raise ValueError("targets must lie in [0, 1] (1 for the anchor's class, 0 elsewhere)")

    be = current_backend()
    loss, state = be.op("sigmoid_focal_loss_forward")(
        be.asarray(logits), be.asarray(targets), be.asarray(weights), alpha, gamma, reduction)
    cache = LossCache(be, reduction, tuple(logits.shape), state, logits)
    return be.output(loss, logits), cache


def sigmoid_focal_loss_backward(dout, cache):
    """Gradient of the focal loss with respect to the logits.

    Inputs:
    - dout: upstream gradient; the shape of the loss for reduction "none",
      a scalar (a number or a 0-d array) for "sum" and "mean"
    - cache: from ``sigmoid_focal_loss_forward``

    Returns ``dlogits``, the shape and dtype of logits:
    ``dout * w alpha_t q^gamma [(p - t) + gamma ce (1 - 2t) p(1-p)/q]`` with
    ``q = 1 - p_t`` (divided by the element count for "mean").
    """
    return loss_backward(dout, cache, "sigmoid_focal_loss_backward")
