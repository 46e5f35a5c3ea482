r"""Nearest-neighbour upsampling by an integer factor, as
``torch.nn.functional.interpolate(x, scale_factor=s, mode="nearest")``.

Forward
    With scale (sh, sw), every input pixel becomes an sh x sw block:

        out[n, c, i, j] = x[n, c, i // sh, j // sw]
        out has shape (N, C, H * sh, W * sw)

    As LaTeX: :math:`y_{ij} = x_{\lfloor i/s_h \rfloor \lfloor j/s_w \rfloor}`.
    The FPN's top-down path uses it with s = 2 to bring a coarse map to the
    size of the next finer one.

Backward
    Each output pixel is a copy of exactly one input pixel, so the gradient
    of an input pixel is the sum of dout over the block it was copied into:

        dx[n, c, r, s] = sum_{a < sh, b < sw} dout[n, c, r*sh + a, s*sw + b]

    Written this way it is a gather - every input element reads its own
    block and writes only itself - so neither the CPU ``prange`` nor the
    CUDA threads (one per input element) ever write the same element, and
    no atomics are needed.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from minimask import _cuda
from minimask._checks import check_float_array, pair
from minimask._cuda import cuda
from minimask._threads import parallel_kernel
from minimask.backend import CPU, CUDA, NUMPY, current_backend

# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------


def upsample_nearest2d_forward_numpy(x, sh, sw):
    return x.repeat(sh, axis=2).repeat(sw, axis=3)


def upsample_nearest2d_backward_numpy(dout, sh, sw):
    N, C, Ho, Wo = dout.shape
    H, W = Ho // sh, Wo // sw
    # split each output axis into (input index, offset in the block) and sum the offsets
    return dout.reshape(N, C, H, sh, W, sw).sum(axis=(3, 5))


# --------------------------------------------------------------------------
# Numba CPU kernels: one prange iteration per (plane, input row)
# --------------------------------------------------------------------------


@parallel_kernel
def _upsample_forward_cpu(x, sh, sw, out):
    """x is (planes, H, W); out is (planes, H * sh, W * sw)."""
    planes, H, W = x.shape
    for pr in prange(planes * H):
        p = pr // H
        r = pr % H
        for a in range(sh):
            for s in range(W):
                v = x[p, r, s]
                for b in range(sw):
                    out[p, r * sh + a, s * sw + b] = v


@parallel_kernel
def _upsample_backward_cpu(dout, sh, sw, dx):
    """dx is (planes, H, W); each element sums its own sh x sw block."""
    planes, H, W = dx.shape
    for pr in prange(planes * H):
        p = pr // H
        r = pr % H
        for s in range(W):
            total = 0.0
            for a in range(sh):
                for b in range(sw):
                    total += dout[p, r * sh + a, s * sw + b]
            dx[p, r, s] = total


# --------------------------------------------------------------------------
# CUDA kernels: forward one thread per output element, backward one per
# input element
# --------------------------------------------------------------------------

if cuda is not None:
    @cuda.jit
    def _upsample_forward_cuda(x, sh, sw, out):
        planes, Ho, Wo = out.shape
        t = cuda.grid(1)
        if t < planes * Ho * Wo:
            p = t // (Ho * Wo)
            i = (t // Wo) % Ho
            j = t % Wo
            out[p, i, j] = x[p, i // sh, j // sw]

    @cuda.jit
    def _upsample_backward_cuda(dout, sh, sw, dx):
        planes, H, W = dx.shape
        t = cuda.grid(1)
        if t < planes * H * W:
            p = t // (H * W)
            r = (t // W) % H
            s = t % W
            total = 0.0
            for a in range(sh):
                for b in range(sw):
                    total += dout[p, r * sh + a, s * sw + b]
            dx[p, r, s] = total


# --------------------------------------------------------------------------
# Registration: forward (x, sh, sw) -> out and backward (dout, sh, sw) -> dx
# on each backend's arrays
# --------------------------------------------------------------------------

_launch = _cuda.launch_config


def _forward_cpu(x, sh, sw):
    N, C, H, W = x.shape
    x3 = np.ascontiguousarray(x).reshape(N * C, H, W)
    out = np.empty((N * C, H * sh, W * sw), dtype=x3.dtype)
    _upsample_forward_cpu(x3, sh, sw, out)
    return out.reshape(N, C, H * sh, W * sw)


def _backward_cpu(dout, sh, sw):
    N, C, Hs, Ws = dout.shape
    d3 = np.ascontiguousarray(dout).reshape(N * C, Hs, Ws)
    dx = np.empty((N * C, Hs // sh, Ws // sw), dtype=dout.dtype)
    _upsample_backward_cpu(d3, sh, sw, dx)
    return dx.reshape(N, C, Hs // sh, Ws // sw)


def _forward_cuda(x, sh, sw):
    N, C, H, W = x.shape
    d_x = x.reshape(N * C, H, W)
    d_out = cuda.device_array((N * C, H * sh, W * sw), dtype=d_x.dtype)
    if d_out.size:
        _upsample_forward_cuda[_launch(d_out.size)](d_x, sh, sw, d_out)
    return d_out.reshape(N, C, H * sh, W * sw)


def _backward_cuda(dout, sh, sw):
    N, C, Hs, Ws = dout.shape
    d_dout = dout.reshape(N * C, Hs, Ws)
    d_dx = cuda.device_array((N * C, Hs // sh, Ws // sw), dtype=dout.dtype)
    if d_dx.size:
        _upsample_backward_cuda[_launch(d_dx.size)](d_dout, sh, sw, d_dx)
    return d_dx.reshape(N, C, Hs // sh, Ws // sw)


NUMPY.register("upsample_nearest2d_forward", upsample_nearest2d_forward_numpy)
NUMPY.register("upsample_nearest2d_backward", upsample_nearest2d_backward_numpy)
CPU.register("upsample_nearest2d_forward", _forward_cpu)
CPU.register("upsample_nearest2d_backward", _backward_cpu)
if cuda is not None:
    CUDA.register("upsample_nearest2d_forward", _forward_cuda)
    CUDA.register("upsample_nearest2d_backward", _backward_cuda)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def upsample_nearest2d_forward(x, scale=2):
    """Nearest-neighbour upsampling by an integer factor.

    Inputs:
    - x: (N, C, H, W), float32 or float64
    - scale: s or (sh, sw), integers >= 1

    Returns ``(out, cache)``: ``out`` (N, C, H * sh, W * sw) in the dtype of
    x, with ``out[n, c, i, j] = x[n, c, i // sh, j // sw]``.
    """
    x = check_float_array("x", x, ndim=4, what="(N, C, H, W)")
    sh, sw = pair("scale", scale)
    N, C, H, W = x.shape
    out_shape = (N, C, H * sh, W * sw)
    be = current_backend()
    out = be.op("upsample_nearest2d_forward")(be.asarray(x), sh, sw)
    return be.output(out, x), (be, tuple(x.shape), (sh, sw), x.dtype)


def upsample_nearest2d_backward(dout, cache):
    """Gradient of nearest-neighbour upsampling.

    Inputs:
    - dout: (N, C, H * sh, W * sw), the shape of the forward output
    - cache: from ``upsample_nearest2d_forward``

    Returns ``dx`` (N, C, H, W) in the dtype of x:
    ``dx[n, c, r, s] = sum_{a < sh, b < sw} dout[n, c, r*sh + a, s*sw + b]``.
    """
    be, x_shape, (sh, sw), dtype = cache
    N, C, H, W = x_shape
    dout = check_float_array("dout", dout)
    out_shape = (N, C, H * sh, W * sw)
    if tuple(dout.shape) != out_shape:
        raise ValueError(f"dout must have the shape of the forward output {out_shape}, "
                         f"got {tuple(dout.shape)}")
    if dout.dtype != dtype:
        if not isinstance(dout, np.ndarray):
            raise ValueError(f"dout must have the dtype of x ({dtype}), got {dout.dtype}")
        dout = dout.astype(dtype)
    dx = be.op("upsample_nearest2d_backward")(be.asarray(dout), sh, sw)
    return be.output(dx, dout)
