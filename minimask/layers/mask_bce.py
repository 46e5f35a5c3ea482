r"""Mask loss of RetinaMask: binary cross-entropy on the RoI's own class.

The mask subnet predicts K masks of m x m logits for every RoI, one per
class; only the mask of the RoI's class ``k = labels[r]`` is trained. For
one RoI the write-up's eq. (3) is the average per-pixel cross-entropy

.. math::

    L_{mask} = -\frac{1}{m^2} \sum_{1 \le i, j \le m}
        \left[ y_{ij} \log \hat{y}^k_{ij} + (1 - y_{ij}) \log (1 - \hat{y}^k_{ij}) \right]
    \qquad (3)

with :math:`\hat{y}^k_{ij} = \sigma(x^k_{ij})` the sigmoid of the logit and
:math:`y_{ij} \in \{0, 1\}` the target. With R RoIs in the batch we average
eq. (3) over the RoIs as well, i.e. take the mean over all ``R * m * m``
pixels (every RoI has the same ``m^2`` pixels, so this is the mean of the
per-RoI losses):

.. math::

    L_{mask} = \frac{1}{R} \sum_{r=1}^{R} L^{(r)}_{mask}
             = \frac{1}{R m^2} \sum_{r, i, j} \mathrm{BCE}(x^{k_r}_{r i j}, y_{r i j}).

Each term is computed stably from the logit,
``BCE(x, y) = max(x, 0) - x y + log1p(exp(-|x|))`` (no ``log(0)`` for any
finite logit; the helper ``bce_terms`` is shared with ``focal_loss``).

Backward
    ``d BCE / dx = sigmoid(x) - y``, so

        dL/dx[r, k, i, j] = dout * (sigmoid(x[r, k, i, j]) - y[r, i, j]) / (R m^2)
                            if k == labels[r], else exactly 0.

    The other K - 1 channels get no gradient: a mask is not penalised for
    what it says about RoIs of other classes. ``R = 0`` gives a loss of 0 and
    an empty gradient of shape ``(0, K, m, m)``, never ``0/0``.

Fast paths
    The forward kernels run one thread per selected pixel ``(r, i, j)``,
    computing the BCE term (summed in float64; a prange reduction on the
    CPU, a block tree reduction plus one atomic per block on the GPU) and the
    local gradient ``sigmoid(x) - y``, stored compactly as ``(R, m, m)``. The
    backward writes each of the ``R K m m`` output elements exactly once
    (partitioned by output element, so no two threads touch the same one):
    the scaled local gradient on the label channel and 0 elsewhere.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from minimask import _cuda
from minimask._checks import check_float_array, is_device_array
from minimask._cuda import THREADS_PER_BLOCK, blocks_for, cuda
from minimask._threads import parallel_kernel
from minimask.backend import CPU, CUDA, NUMPY, current_backend
from minimask.layers.activations import sigmoid_numpy
from minimask.layers.focal_loss import (bce_terms_cpu, bce_terms_cuda, bce_with_logits_numpy,
                                        block_sum_into, finish_reduction, scalar_dout)

# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------


def mask_bce_numpy(mask_logits, labels, targets):
    """Mean BCE over the label channel of each RoI; 0 when there are no pixels."""
    R = mask_logits.shape[0]
    x = mask_logits[np.arange(R), labels]          # (R, m, m): channel k = labels[r]
    bce = bce_with_logits_numpy(x, targets)
    total = np.sum(bce, dtype=np.float64)
    return np.asarray(total / bce.size if bce.size else 0.0, dtype=mask_logits.dtype)


def mask_bce_grad_numpy(dout, mask_logits, labels, targets):
    """``dL/dx``: ``dout (sigmoid(x) - y) / (R m^2)`` on the label channel."""
    R = mask_logits.shape[0]
    dx = np.zeros_like(mask_logits)
    if targets.size == 0:
        return dx
    rows = np.arange(R)
    x = mask_logits[rows, labels]
    dx[rows, labels] = dout * (sigmoid_numpy(x) - targets) / targets.size
    return dx


# --------------------------------------------------------------------------
# Numba CPU kernels
# --------------------------------------------------------------------------


@parallel_kernel(reduces=True)
def _mask_bce_forward_cpu(x, labels, y, K, mm, grad):
    """``x`` is the flat (R*K*m*m) logits, ``y`` and ``grad`` flat (R*m*m).
    Returns the float64 sum of the BCE terms (``total`` is a prange reduction
    variable; each iteration writes only its own ``grad[e]``)."""
    total = 0.0
    for e in prange(y.size):
        r = e // mm
        ij = e - r * mm
        ce, p, one_minus_p = bce_terms_cpu(x[(r * K + labels[r]) * mm + ij], y[e])
        # sigmoid(x) - y, as (1 - y) p - y (1 - p) to avoid cancellation
        grad[e] = (1.0 - y[e]) * p - y[e] * one_minus_p
        total += ce
    return total


@parallel_kernel
def _mask_bce_backward_cpu(grad, labels, K, mm, scale, dx):
    """One iteration per output element of the flat (R*K*m*m) ``dx``."""
    for e in prange(dx.size):
        r = e // (K * mm)
        k = (e // mm) % K
        if k == labels[r]:
            dx[e] = grad[r * mm + e % mm] * scale
        else:
            dx[e] = 0.0


# --------------------------------------------------------------------------
# CUDA kernels
# --------------------------------------------------------------------------

if cuda is not None:
    @cuda.jit
    def _mask_bce_forward_cuda(x, labels, y, K, mm, grad, total):
        e = cuda.grid(1)
        ce = 0.0
        if e < y.size:
            r = e // mm
            ij = e - r * mm
            ce, p, one_minus_p = bce_terms_cuda(x[(r * K + labels[r]) * mm + ij], y[e])
            grad[e] = (1.0 - y[e]) * p - y[e] * one_minus_p
        block_sum_into(ce, total)  # every thread of the block, outside the branch

    @cuda.jit
    def _mask_bce_backward_cuda(grad, labels, K, mm, scale, dx):
        e = cuda.grid(1)
        if e < dx.size:
            r = e // (K * mm)
            k = (e // mm) % K
            if k == labels[r]:
                dx[e] = grad[r * mm + e % mm] * scale
            else:
                dx[e] = 0.0


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def _check_labels(labels, R, K):
    """``labels``: (R,) integer class ids in [0, K); returned as host int64
    (or, for a device array, as given after checking a host copy)."""
    on_device = is_device_array(labels)
    host = labels.copy_to_host() if on_device and hasattr(labels, "copy_to_host") else labels
    host = np.asarray(host)
    if host.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class ids, got dtype {host.dtype}")
    if host.shape != (R,):
        raise ValueError(f"labels must have shape ({R},) (one class id per RoI), "
                         f"got shape {host.shape}")
    if R and (host.min() < 0 or host.max() >= K):
        raise ValueError(f"labels must lie in [0, {K}) (K = {K} mask channels), "
                         f"got values in [{host.min()}, {host.max()}]")
    return labels if on_device else np.ascontiguousarray(host, dtype=np.int64)


def _check_targets(targets, mask_logits):
    R, _, H, W = mask_logits.shape
    if targets is None:
        raise ValueError("targets must be an array, got None")
    if not is_device_array(targets):
        targets = np.asarray(targets)
        if targets.dtype == np.bool_:
            targets = targets.astype(mask_logits.dtype)
    targets = check_float_array("targets", targets, ndim=3, what="(R, m, m)")
    if tuple(targets.shape) != (R, H, W):
        raise ValueError(f"targets must have shape ({R}, {H}, {W}) to match mask_logits "
                         f"{tuple(mask_logits.shape)}, got shape {tuple(targets.shape)}")
    if is_device_array(targets):
        return targets
    if targets.size and not (np.all(targets >= 0) and np.all(targets <= 1)):
        raise ValueError("targets must lie in [0, 1] (mask targets are 0 or 1), "
                         f"got values in [{targets.min()}, {targets.max()}]")
    return np.ascontiguousarray(targets, dtype=mask_logits.dtype)


# --------------------------------------------------------------------------
# Registration: forward (x, labels, y) -> (loss, state), backward
# (state, dout, shape) -> dx, with dout the upstream scalar
# --------------------------------------------------------------------------


def _forward_numpy(x, labels, y):
    return mask_bce_numpy(x, labels, y), (x, labels, y)


def _backward_numpy(state, dout, shape):
    return mask_bce_grad_numpy(dout, *state)


def _per_element(dout, shape):
    R, K, H, W = shape
    return dout / (R * H * W) if R * H * W else dout


def _forward_cpu(x, labels, y):
    R, K, H, W = x.shape
    mm = H * W
    grad = np.empty(R * mm, dtype=x.dtype)
    total = _mask_bce_forward_cpu(np.ascontiguousarray(x).reshape(-1),
                                  np.ascontiguousarray(labels, dtype=np.int64),
                                  np.ascontiguousarray(y, dtype=x.dtype).reshape(-1),
                                  K, mm, grad)
    return finish_reduction(total, R * mm, "mean", x.dtype, False), (grad, labels)


def _backward_cpu(state, dout, shape):
    grad, labels = state
    R, K, H, W = shape
    scale = _per_element(dout, shape)
    dx = np.empty(R * K * H * W, dtype=grad.dtype)
    _mask_bce_backward_cpu(grad, np.ascontiguousarray(labels, dtype=np.int64), K, H * W,
                           scale, dx)
    return dx.reshape(shape)


def _forward_cuda(x, labels, y):
    R, K, H, W = x.shape
    mm = H * W
    n = R * mm
    grad = cuda.device_array(n, dtype=x.dtype)
    total = _cuda.device_zeros(1, np.float64)
    if n:
        _mask_bce_forward_cuda[blocks_for(n), THREADS_PER_BLOCK](
            x.reshape(x.size), labels, y.reshape(n), K, mm, grad, total)
    return finish_reduction(total, n, "mean", x.dtype, True), (grad, labels)


def _backward_cuda(state, dout, shape):
    grad, labels = state
    R, K, H, W = shape
    scale = _per_element(dout, shape)
    dx = cuda.device_array(R * K * H * W, dtype=grad.dtype)
    if dx.size:
        _mask_bce_backward_cuda[blocks_for(dx.size), THREADS_PER_BLOCK](
            grad, labels, K, H * W, scale, dx)
    return dx.reshape(shape)


NUMPY.register("mask_bce_forward", _forward_numpy)
NUMPY.register("mask_bce_backward", _backward_numpy)
CPU.register("mask_bce_forward", _forward_cpu)
CPU.register("mask_bce_backward", _backward_cpu)
if cuda is not None:
    CUDA.register("mask_bce_forward", _forward_cuda)
    CUDA.register("mask_bce_backward", _backward_cuda)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def mask_bce_forward(mask_logits, labels, targets):
    """Mask loss, eq. (3) averaged over the RoIs.

    Inputs:
    - mask_logits: (R, K, m, m) float32 or float64, K mask logits per RoI
    - labels: (R,) integer class ids in [0, K), the channel each RoI trains
    - targets: (R, m, m) mask targets in {0, 1} (float or bool; values
      outside [0, 1] are refused), cast to the dtype of mask_logits

    Returns ``(loss, cache)``: ``loss`` is a 0-d array of the dtype of
    mask_logits, ``1/(R m^2) * sum_{r,i,j} BCE(x[r, labels[r], i, j],
    targets[r, i, j])``, and 0 when R == 0.
    """
    mask_logits = check_float_array("mask_logits", mask_logits, ndim=4, what="(R, K, m, m)")
    R, K, H, W = mask_logits.shape
    labels = _check_labels(labels, R, K)
    targets = _check_targets(targets, mask_logits)

    be = current_backend()
    loss, state = be.op("mask_bce_forward")(be.asarray(mask_logits), be.asarray(labels),
                                            be.asarray(targets))
    cache = (be, tuple(mask_logits.shape), state,
             not be.on_device or not be.is_native(mask_logits))
    return be.output(loss, mask_logits), cache


def mask_bce_backward(dout, cache):
    """Gradient of the mask loss with respect to the mask logits.

    Inputs:
    - dout: a scalar (a number or a 0-d array), the upstream gradient
    - cache: from ``mask_bce_forward``

    Returns ``dmask_logits`` (R, K, m, m), dtype of mask_logits:
    ``dout (sigmoid(x) - y) / (R m^2)`` on channel ``labels[r]`` of RoI r and
    exactly 0 on every other channel.
    """
    be, shape, state, host_input = cache
    dx = be.op("mask_bce_backward")(state, scalar_dout(dout), shape)
    return be.to_host(dx) if host_input else dx
