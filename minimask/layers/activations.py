r"""ReLU and sigmoid, elementwise.

ReLU
    forward   y = max(x, 0)
    backward  dx = dout * 1[x > 0]

    The derivative at exactly ``x = 0`` is taken as 0 (PyTorch's choice);
    gradient checks keep inputs away from that kink.

Sigmoid
    forward   y = 1 / (1 + exp(-x))
    backward  dx = dout * y * (1 - y)

    Computed without overflow: for x < 0 it uses exp(x) / (1 + exp(x)), so
    ``exp`` never sees a large positive argument.

This file is the pattern every layer module follows: the NumPy reference
first, then the Numba CPU kernels, then the CUDA kernels, then the public
``*_forward`` / ``*_backward`` pair that checks its inputs, takes the current
backend object, runs that backend's registered implementation, and keeps the
backend in the cache so that the backward runs where the forward did.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from minimask import _cuda
from minimask._checks import check_float_array, check_same_shape
from minimask._cuda import THREADS_PER_BLOCK, blocks_for, cuda
from minimask._threads import parallel_kernel
from minimask.backend import CPU, CUDA, NUMPY, current_backend

# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------


def relu_forward_numpy(x):
    return np.maximum(x, 0)


def relu_backward_numpy(dout, x):
    return dout * (x > 0)


def sigmoid_numpy(x):
    # exp(-|x|) is in (0, 1]: no overflow for any finite x.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def sigmoid_backward_numpy(dout, y):
    return dout * y * (1 - y)


# --------------------------------------------------------------------------
# Numba CPU kernels (flat, contiguous arrays; one prange over elements)
# --------------------------------------------------------------------------


def _sigmoid_scalar(x):
    if x >= 0:
        return 1.0 / (1.0 + np.exp(-x))
    e = np.exp(x)
    return e / (1.0 + e)


sigmoid_scalar_cpu, sigmoid_scalar_cuda = _cuda.compile_for_both(_sigmoid_scalar)


@parallel_kernel
def _relu_forward_cpu(x, out):
    for i in prange(x.size):
        # written so that NaN passes through, as np.maximum does: a NaN that
        # ReLU turned into 0 would hide a diverged network from the loss
        out[i] = 0 if x[i] <= 0 else x[i]


@parallel_kernel
def _relu_backward_cpu(dout, x, dx):
    for i in prange(x.size):
        dx[i] = dout[i] if x[i] > 0 else 0


@parallel_kernel
def _sigmoid_forward_cpu(x, out):
    for i in prange(x.size):
        out[i] = sigmoid_scalar_cpu(x[i])


@parallel_kernel
def _sigmoid_backward_cpu(dout, y, dx):
    for i in prange(y.size):
        dx[i] = dout[i] * y[i] * (1 - y[i])


# --------------------------------------------------------------------------
# CUDA kernels (one thread per element)
# --------------------------------------------------------------------------

if cuda is not None:
    @cuda.jit
    def _relu_forward_cuda(x, out):
        i = cuda.grid(1)
        if i < x.size:
            out[i] = 0 if x[i] <= 0 else x[i]  # NaN passes through

    @cuda.jit
    def _relu_backward_cuda(dout, x, dx):
        i = cuda.grid(1)
        if i < x.size:
            dx[i] = dout[i] if x[i] > 0 else 0

    @cuda.jit
    def _sigmoid_forward_cuda(x, out):
        i = cuda.grid(1)
        if i < x.size:
            out[i] = sigmoid_scalar_cuda(x[i])

    @cuda.jit
    def _sigmoid_backward_cuda(dout, y, dx):
        i = cuda.grid(1)
        if i < y.size:
            dx[i] = dout[i] * y[i] * (1 - y[i])


# --------------------------------------------------------------------------
# Registration: one flat elementwise launch per backend
# --------------------------------------------------------------------------


def _on_cpu(kernel):
    """A flat Numba kernel as a function of same-shape host arrays."""
    def run(*arrays):
        flat = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
        out = np.empty_like(flat[0])
        kernel(*flat, out)
        return out.reshape(arrays[0].shape)
    return run


def _on_cuda(kernel):
    """A flat CUDA kernel as a function of same-shape device arrays."""
    def run(*arrays):
        d_out = cuda.device_array(arrays[0].shape, dtype=arrays[0].dtype)
        n = d_out.size
        if n:
            flat = [a.reshape(n) for a in arrays] + [d_out.reshape(n)]
            kernel[blocks_for(n), THREADS_PER_BLOCK](*flat)
        return d_out
    return run


NUMPY.register("relu_forward", relu_forward_numpy)
NUMPY.register("relu_backward", relu_backward_numpy)
NUMPY.register("sigmoid_forward", sigmoid_numpy)
NUMPY.register("sigmoid_backward", sigmoid_backward_numpy)
CPU.register("relu_forward", _on_cpu(_relu_forward_cpu))
CPU.register("relu_backward", _on_cpu(_relu_backward_cpu))
CPU.register("sigmoid_forward", _on_cpu(_sigmoid_forward_cpu))
CPU.register("sigmoid_backward", _on_cpu(_sigmoid_backward_cpu))
if cuda is not None:
    CUDA.register("relu_forward", _on_cuda(_relu_forward_cuda))
    CUDA.register("relu_backward", _on_cuda(_relu_backward_cuda))
    CUDA.register("sigmoid_forward", _on_cuda(_sigmoid_forward_cuda))
    CUDA.register("sigmoid_backward", _on_cuda(_sigmoid_backward_cuda))


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def relu_forward(x):
    """ReLU, ``y = max(x, 0)``.

    Inputs:
    - x: any shape, float32 or float64
    Returns ``(out, cache)``; ``out`` has the shape and dtype of ``x``.
    """
    x = check_float_array("x", x)
    be = current_backend()
    d_x = be.asarray(x)
    out = be.op("relu_forward")(d_x)
    return be.output(out, x), (be, d_x)


def relu_backward(dout, cache):
    """Gradient of ReLU: ``dx = dout * 1[x > 0]``. Returns ``dx``."""
    be, x = cache
    dout = check_float_array("dout", dout)
    check_same_shape("dout", dout, "the forward output", x)
    return be.output(be.op("relu_backward")(be.asarray(dout), x), dout)


def sigmoid_forward(x):
    """Logistic sigmoid, ``y = 1 / (1 + exp(-x))``, overflow-free.

    Returns ``(out, cache)``; ``out`` has the shape and dtype of ``x``.
    """
    x = check_float_array("x", x)
    be = current_backend()
    out = be.op("sigmoid_forward")(be.asarray(x))
    return be.output(out, x), (be, out)


def sigmoid_backward(dout, cache):
    """Gradient of the sigmoid: ``dx = dout * y * (1 - y)``. Returns ``dx``."""
    be, y = cache
    dout = check_float_array("dout", dout)
    check_same_shape("dout", dout, "the forward output", y)
    return be.output(be.op("sigmoid_backward")(be.asarray(dout), y), dout)
