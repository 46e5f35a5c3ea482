r"""Frozen batch normalisation: batch norm at inference, as a fixed affine map.

A ResNet pretrained on ImageNet carries, for every batch-norm layer, a
learned scale and shift (gamma, beta) and the running mean and variance
(mu, sigma^2) of its input over the training set. Detection fine-tunes with
one or two large images per batch - far too few to estimate fresh batch
statistics - so every detector that starts from such a network (torchvision's
``FrozenBatchNorm2d``, detectron2's ``FrozenBatchNorm2d``) keeps the four
arrays fixed and uses batch norm's inference formula during training too.

Forward
    Per channel c, with eps = 1e-5 as torchvision:

        scale_c = gamma_c / sqrt(sigma^2_c + eps)
        shift_c = beta_c - mu_c * scale_c
        out[n, c, i, j] = x[n, c, i, j] * scale_c + shift_c

    As LaTeX: :math:`y_{ncij} = \gamma_c \frac{x_{ncij} - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta_c
    = s_c x_{ncij} + t_c`.

    Compare GroupNorm: there mean and variance are computed from x itself
    (per sample and group), so they depend on x and the backward has three
    terms. Here they are constants.

Backward (to the input only)
    The map is affine in x with constant coefficients, so

        dx[n, c, i, j] = dout[n, c, i, j] * scale_c

    and nothing flows to gamma, beta, mu or sigma^2: they are buffers, not
    parameters. Folding the four arrays into (scale, shift) once per call is
    what makes the layer as cheap as a per-channel multiply-add.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from minimask._checks import check_float_array
from minimask._cuda import cuda, launch_config
from minimask._threads import parallel_kernel
from minimask.backend import CPU, CUDA, NUMPY, current_backend

# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------


def frozen_bn_fold(gamma, beta, running_mean, running_var, eps=1e-5):
    """``(scale, shift)`` of the folded affine map, each ``(C,)``."""
    scale = gamma / np.sqrt(running_var + eps)
    return scale, beta - running_mean * scale


def frozen_bn_forward_numpy(x, scale, shift):
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def frozen_bn_backward_numpy(dout, scale):
    return dout * scale[None, :, None, None]


# --------------------------------------------------------------------------
# Numba CPU kernels: one prange iteration per (sample, channel) plane
# --------------------------------------------------------------------------


@parallel_kernel
def _frozen_bn_forward_cpu(x, scale, shift, out):
    """x, out are (N, C, HW)."""
    N, C, HW = x.shape
    for p in prange(N * C):
        n = p // C
        c = p % C
        s = scale[c]
        t = shift[c]
        for k in range(HW):
            out[n, c, k] = x[n, c, k] * s + t


@parallel_kernel
def _frozen_bn_backward_cpu(dout, scale, dx):
    N, C, HW = dout.shape
    for p in prange(N * C):
        n = p // C
        c = p % C
        s = scale[c]
        for k in range(HW):
            dx[n, c, k] = dout[n, c, k] * s


# --------------------------------------------------------------------------
# CUDA kernels: one thread per element
# --------------------------------------------------------------------------

if cuda is not None:
    @cuda.jit
    def _frozen_bn_forward_cuda(x, scale, shift, out):
        N, C, HW = x.shape
        t = cuda.grid(1)
        if t < N * C * HW:
            n = t // (C * HW)
            c = (t // HW) % C
            k = t % HW
            out[n, c, k] = x[n, c, k] * scale[c] + shift[c]

    @cuda.jit
    def _frozen_bn_backward_cuda(dout, scale, dx):
        N, C, HW = dout.shape
        t = cuda.grid(1)
        if t < N * C * HW:
            n = t // (C * HW)
            c = (t // HW) % C
            k = t % HW
            dx[n, c, k] = dout[n, c, k] * scale[c]


# --------------------------------------------------------------------------
# Registration: every backend takes (N, C, H, W) arrays and (C,) scale/shift
# --------------------------------------------------------------------------


def _planes(a):
    N, C, H, W = a.shape
    return a.reshape(N, C, H * W)


def _forward_cpu(x, scale, shift):
    x3 = np.ascontiguousarray(_planes(x))
    out = np.empty_like(x3)
    _frozen_bn_forward_cpu(x3, scale, shift, out)
    return out.reshape(x.shape)


def _backward_cpu(dout, scale):
    d3 = np.ascontiguousarray(_planes(dout))
    dx = np.empty_like(d3)
    _frozen_bn_backward_cpu(d3, scale, dx)
    return dx.reshape(dout.shape)


def _forward_cuda(x, scale, shift):
    d_out = cuda.device_array(x.shape, dtype=x.dtype)
    if d_out.size:
        _frozen_bn_forward_cuda[launch_config(d_out.size)](_planes(x), scale, shift,
                                                          _planes(d_out))
    return d_out


def _backward_cuda(dout, scale):
    d_dx = cuda.device_array(dout.shape, dtype=dout.dtype)
    if d_dx.size:
        _frozen_bn_backward_cuda[launch_config(d_dx.size)](_planes(dout), scale, _planes(d_dx))
    return d_dx


NUMPY.register("frozen_bn_forward", frozen_bn_forward_numpy)
NUMPY.register("frozen_bn_backward", frozen_bn_backward_numpy)
CPU.register("frozen_bn_forward", _forward_cpu)
CPU.register("frozen_bn_backward", _backward_cpu)
if cuda is not None:
    CUDA.register("frozen_bn_forward", _forward_cuda)
    CUDA.register("frozen_bn_backward", _backward_cuda)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def frozen_bn_forward(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """Batch norm with fixed statistics (inference-mode batch norm).

    Inputs:
    - x: (N, C, H, W), float32 or float64
    - gamma, beta: (C,) the learned scale and shift
    - running_mean, running_var: (C,) the statistics saved at pretraining;
      every variance must be >= 0
    - eps: added to the variance, 1e-5 as torchvision's FrozenBatchNorm2d

    Returns ``(out, cache)``: ``out`` (N, C, H, W) in the dtype of x,
    ``out = x * scale + shift`` with ``scale = gamma / sqrt(var + eps)`` and
    ``shift = beta - mean * scale``, per channel. The four (C,) arrays are
    folded on the host (they are small); ``x`` stays on the backend's device.
    """
    x = check_float_array("x", x, ndim=4, what="(N, C, H, W)")
    N, C, H, W = x.shape
    be = current_backend()
    arrays = {}
    for name, a in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        a = np.asarray(be.to_host(a))
        if a.dtype.kind != "f":
            raise ValueError(f"{name} must be float32 or float64, got dtype {a.dtype}")
        if a.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},) (one value per channel of x), "
                             f"got {a.shape}")
        arrays[name] = a.astype(np.float64)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if np.any(arrays["running_var"] + eps <= 0):
        raise ValueError("running_var + eps must be positive in every channel")
    scale, shift = frozen_bn_fold(arrays["gamma"], arrays["beta"], arrays["running_mean"],
                                  arrays["running_var"], eps)
    scale = be.asarray(scale.astype(x.dtype))
    shift = be.asarray(shift.astype(x.dtype))
    out = be.op("frozen_bn_forward")(be.asarray(x), scale, shift)
    return be.output(out, x), (be, tuple(x.shape), x.dtype, scale)


def frozen_bn_backward(dout, cache):
    """Gradient of frozen batch norm with respect to its input.

    Inputs:
    - dout: (N, C, H, W), the shape of the forward output
    - cache: from ``frozen_bn_forward``

    Returns ``dx`` (N, C, H, W): ``dx = dout * scale`` per channel. The
    frozen statistics and affine parameters get no gradient. Runs on the
    backend of the forward, whatever the current setting is.
    """
    be, x_shape, dtype, scale = cache
    dout = check_float_array("dout", dout)
    if tuple(dout.shape) != x_shape:
        raise ValueError(f"dout must have the shape of the forward output {x_shape}, "
                         f"got {tuple(dout.shape)}")
    if dout.dtype != dtype:
        if not isinstance(dout, np.ndarray):
            raise ValueError(f"dout must have the dtype of x ({dtype}), got {dout.dtype}")
        dout = dout.astype(dtype)
    return be.output(be.op("frozen_bn_backward")(be.asarray(dout), scale), dout)
