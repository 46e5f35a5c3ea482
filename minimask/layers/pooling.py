r"""2-D max pooling, as ``torch.nn.functional.max_pool2d`` (no ceil_mode,
no dilation).

Forward
    For a kernel (kh, kw), stride (sh, sw) and padding (ph, pw), output
    pixel (i, j) of each (n, c) plane looks at the window of rows
    ``i*sh - ph ... i*sh - ph + kh - 1`` and columns
    ``j*sw - pw ... j*sw - pw + kw - 1`` and keeps its largest value:

        out[n, c, i, j] = max over the window of x[n, c, r, s]
        Ho = floor((H + 2 ph - kh) / sh) + 1,  Wo likewise

    As LaTeX: :math:`y_{ij} = \max_{(r, s) \in \mathcal{W}_{ij}} x_{rs}`.
    Padding cells count as minus infinity, so they never win. Like torch,
    the padding may be at most half the kernel (``2 p <= k``); then every
    window - the first and the last included - holds at least one real
    pixel, and the padding can be skipped rather than materialised.

    Ties go to the first maximum in row-major order within the window (a
    strict ``>`` while scanning), which is what torch does. A NaN in a
    window wins over numbers (the output is NaN, as in torch; here the
    first NaN is the one recorded).

Backward
    The max is locally a selection: ``out[i, j] = x[a(i, j)]`` for the
    argmax a(i, j). So each dout[i, j] goes to that one input pixel and
    nowhere else,

        dx[n, c, r, s] = sum over the (i, j) with a(i, j) = (r, s) of dout[n, c, i, j]

    The forward stores a(i, j) as a flat index ``r * W + s`` into its plane.
    With overlapping windows (k = 3, s = 2 in the ResNet stem; k = 3, s = 1
    more so) one input pixel can be the argmax of several windows: a
    scatter-add with collisions.

The fast paths
    "cpu": one ``prange`` iteration per (n, c) plane. In the backward each
    iteration owns its dx plane outright, so the scatter inside a plane is a
    plain sequential loop and no two iterations write the same element.
    "cuda": one thread per output element in both directions; the backward
    adds into dx with ``cuda.atomic.add`` since two threads may share an
    argmax. The window scan is one helper, written once below and compiled
    for both targets.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from minimask import _cuda
from minimask._checks import check_float_array, check_nonnegative_int, check_same_shape, pair
from minimask._cuda import cuda
from minimask._threads import parallel_kernel
from minimask.backend import CPU, CUDA, NUMPY, current_backend


def pooled_size(size, k, s, p):
    """Output length along one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * p - k) // s + 1


# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------


def max_pool2d_forward_numpy(x, kernel, stride, padding):
    """Returns ``(out, argmax)``; argmax holds ``r * W + s`` per output pixel."""
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    Ho, Wo = pooled_size(H, kh, sh, ph), pooled_size(W, kw, sw, pw)
    rows0 = np.arange(Ho) * sh - ph          # top row of each window
    cols0 = np.arange(Wo) * sw - pw          # left column of each window
    best = np.full((N, C, Ho, Wo), -np.inf, dtype=x.dtype)
    argmax = np.full((N, C, Ho, Wo), -1, dtype=np.int64)
    # Walk the window offsets in row-major order; an offset replaces the
    # running best only where it is strictly larger, so ties keep the first.
    for di in range(kh):
        for dj in range(kw):
            r = rows0 + di
            s = cols0 + dj
            valid = ((r >= 0) & (r < H))[:, None] & ((s >= 0) & (s < W))[None, :]
            v = x[:, :, np.clip(r, 0, H - 1)][:, :, :, np.clip(s, 0, W - 1)]
            first = argmax < 0                # nothing taken yet (x may hold -inf)
            nan_wins = np.isnan(v) & ~np.isnan(best)
            take = valid & (first | (v > best) | nan_wins)
            best = np.where(take, v, best)
            argmax = np.where(take, r[:, None] * W + s[None, :], argmax)
    return best, argmax


def max_pool2d_backward_numpy(dout, argmax, x_shape):
    N, C, H, W = x_shape
    dx = np.zeros((N, C, H * W), dtype=dout.dtype)
    n, c = np.meshgrid(np.arange(N), np.arange(C), indexing="ij")
    # add.at accumulates repeated indices (a plain fancy += would drop them)
    np.add.at(dx, (n[:, :, None, None], c[:, :, None, None], argmax), dout)
    return dx.reshape(N, C, H, W)


# --------------------------------------------------------------------------
# The window scan, written once for both targets
# --------------------------------------------------------------------------


def _window_argmax(x, plane, H, W, r0, s0, kh, kw):
    """Flat index ``r * W + s`` of the first largest value of plane ``plane``
    of ``x`` (viewed as (planes, H * W)) in the window whose top-left corner
    is (r0, s0); rows and columns outside the image are skipped."""
    best_index = -1
    best = 0.0
    for r in range(max(r0, 0), min(r0 + kh, H)):
        for s in range(max(s0, 0), min(s0 + kw, W)):
            v = x[plane, r * W + s]
            if best_index < 0 or v > best or (v != v and best == best):
                best = v
                best_index = r * W + s
    return best_index


window_argmax_cpu, window_argmax_cuda = _cuda.compile_for_both(_window_argmax)


# --------------------------------------------------------------------------
# Numba CPU kernels: one prange iteration per (n, c) plane
# --------------------------------------------------------------------------


def _max_pool_work(x, H, W, kh, kw, sh, sw, ph, pw, out, argmax):
    """The thread rule's work measure: each output compares its kh kw inputs
    (with the NaN rule), about 4 elements of a copy each. Measured: a 3x3
    stride-2 pool of 4 x 16 x 64 x 64 (393K elements of arguments) took
    1.73 ms on one thread and 0.84 on two."""
    return 4 * kh * kw * out.size


@parallel_kernel(work=_max_pool_work)
def _max_pool_forward_cpu(x, H, W, kh, kw, sh, sw, ph, pw, out, argmax):
    """x is (planes, H * W); out and argmax are (planes, Ho, Wo)."""
    planes, Ho, Wo = out.shape
    for p in prange(planes):
        for i in range(Ho):
            for j in range(Wo):
                a = window_argmax_cpu(x, p, H, W, i * sh - ph, j * sw - pw, kh, kw)
                argmax[p, i, j] = a
                out[p, i, j] = x[p, a]


@parallel_kernel
def _max_pool_backward_cpu(dout, argmax, dx):
    """dout and argmax are (planes, Ho, Wo); dx is (planes, H * W), zeroed.
    Iteration p writes only row p of dx: no two iterations collide."""
    planes, Ho, Wo = dout.shape
    for p in prange(planes):
        for i in range(Ho):
            for j in range(Wo):
                dx[p, argmax[p, i, j]] += dout[p, i, j]


# --------------------------------------------------------------------------
# CUDA kernels: one thread per output element
# --------------------------------------------------------------------------

if cuda is not None:
    @cuda.jit
    def _max_pool_forward_cuda(x, H, W, kh, kw, sh, sw, ph, pw, out, argmax):
        planes, Ho, Wo = out.shape
        t = cuda.grid(1)
        if t < planes * Ho * Wo:
            p = t // (Ho * Wo)
            i = (t // Wo) % Ho
            j = t % Wo
            a = window_argmax_cuda(x, p, H, W, i * sh - ph, j * sw - pw, kh, kw)
            argmax[p, i, j] = a
            out[p, i, j] = x[p, a]

    @cuda.jit
    def _max_pool_backward_cuda(dout, argmax, dx):
        planes, Ho, Wo = dout.shape
        t = cuda.grid(1)
        if t < planes * Ho * Wo:
            p = t // (Ho * Wo)
            i = (t // Wo) % Ho
            j = t % Wo
            # windows overlap, so another thread may target the same pixel
            cuda.atomic.add(dx, (p, argmax[p, i, j]), dout[p, i, j])


# --------------------------------------------------------------------------
# Registration: each backend's forward (x, kernel, stride, padding) ->
# (out, argmax) and backward (dout, argmax, x_shape) -> dx, on its arrays
# --------------------------------------------------------------------------

_launch = _cuda.launch_config


def _forward_cpu(x, kernel, stride, padding):
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    Ho, Wo = pooled_size(H, kh, sh, ph), pooled_size(W, kw, sw, pw)
    x2 = np.ascontiguousarray(x).reshape(N * C, H * W)
    out = np.empty((N * C, Ho, Wo), dtype=x2.dtype)
    argmax = np.empty((N * C, Ho, Wo), dtype=np.int64)
    _max_pool_forward_cpu(x2, H, W, kh, kw, sh, sw, ph, pw, out, argmax)
    return out.reshape(N, C, Ho, Wo), argmax.reshape(N, C, Ho, Wo)


def _backward_cpu(dout, argmax, x_shape):
    N, C, H, W = x_shape
    Ho, Wo = argmax.shape[2], argmax.shape[3]
    dx = np.zeros((N * C, H * W), dtype=dout.dtype)
    _max_pool_backward_cpu(np.ascontiguousarray(dout).reshape(N * C, Ho, Wo),
                           np.ascontiguousarray(argmax).reshape(N * C, Ho, Wo), dx)
    return dx.reshape(N, C, H, W)


def _forward_cuda(x, kernel, stride, padding):
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    Ho, Wo = pooled_size(H, kh, sh, ph), pooled_size(W, kw, sw, pw)
    d_x = x.reshape(N * C, H * W)
    d_out = cuda.device_array((N * C, Ho, Wo), dtype=d_x.dtype)
    d_arg = cuda.device_array((N * C, Ho, Wo), dtype=np.int64)
    n_out = N * C * Ho * Wo
    if n_out:
        _max_pool_forward_cuda[_launch(n_out)](d_x, H, W, kh, kw, sh, sw, ph, pw, d_out, d_arg)
    return d_out.reshape(N, C, Ho, Wo), d_arg.reshape(N, C, Ho, Wo)


def _backward_cuda(dout, argmax, x_shape):
    N, C, H, W = x_shape
    Ho, Wo = argmax.shape[2], argmax.shape[3]
    d_dout = dout.reshape(N * C, Ho, Wo)
    d_arg = argmax.reshape(N * C, Ho, Wo)
    d_dx = cuda.device_array((N * C, H * W), dtype=dout.dtype)
    n_in = N * C * H * W
    if n_in:  # zero it first: the backward kernel accumulates into it
        _cuda._fill_zero[_launch(n_in)](d_dx.reshape(n_in))
    n_out = N * C * Ho * Wo
    if n_out:
        _max_pool_backward_cuda[_launch(n_out)](d_dout, d_arg, d_dx)
    return d_dx.reshape(N, C, H, W)


NUMPY.register("max_pool2d_forward", max_pool2d_forward_numpy)
NUMPY.register("max_pool2d_backward", max_pool2d_backward_numpy)
CPU.register("max_pool2d_forward", _forward_cpu)
CPU.register("max_pool2d_backward", _backward_cpu)
if cuda is not None:
    CUDA.register("max_pool2d_forward", _forward_cuda)
    CUDA.register("max_pool2d_backward", _backward_cuda)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def _check_geometry(x_shape, kernel_size, stride, padding):
    kernel = pair("kernel_size", kernel_size)
    stride = pair("stride", stride)
    padding = pair("padding", padding, check_nonnegative_int)
    H, W = x_shape[2], x_shape[3]
    if H == 0 or W == 0:
        raise ValueError(f"x must have H >= 1 and W >= 1, got shape {tuple(x_shape)}")
    for k, p in zip(kernel, padding):
        if 2 * p > k:
            raise ValueError(f"padding must be at most half the kernel size, got padding "
                             f"{padding} for kernel_size {kernel}")
    for size, k, p, axis in ((H, kernel[0], padding[0], "height"), (W, kernel[1], padding[1], "width")):
        if size + 2 * p < k:
            raise ValueError(f"kernel_size {kernel} is larger than the padded input: "
                             f"{axis} {size} + 2 * {p} < {k} (x has shape {tuple(x_shape)})")
    return kernel, stride, padding


def max_pool2d_forward(x, kernel_size, stride, padding=0):
    """2-D max pooling over each (n, c) plane.

    Inputs:
    - x: (N, C, H, W), float32 or float64
    - kernel_size: k or (kh, kw), positive
    - stride: s or (sh, sw), positive
    - padding: p or (ph, pw), >= 0 and at most half the kernel; padding
      counts as minus infinity

    Returns ``(out, cache)``: ``out`` (N, C, Ho, Wo) in the dtype of x, with
    ``Ho = floor((H + 2 ph - kh) / sh) + 1`` (Wo likewise) and

        out[n, c, i, j] = max_{0 <= a < kh, 0 <= b < kw} x[n, c, i*sh - ph + a, j*sw - pw + b]

    The cache holds the argmax (first maximum in row-major window order) of
    every output pixel as a flat index ``r * W + s`` into its plane.
    """
    x = check_float_array("x", x, ndim=4, what="(N, C, H, W)")
    kernel, stride, padding = _check_geometry(x.shape, kernel_size, stride, padding)
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    Ho, Wo = pooled_size(H, kh, sh, ph), pooled_size(W, kw, sw, pw)
    be = current_backend()
    out, argmax = be.op("max_pool2d_forward")(be.asarray(x), kernel, stride, padding)
    return be.output(out, x), (argmax, tuple(x.shape), x.dtype, be)


def max_pool2d_backward(dout, cache):
    """Gradient of max pooling: each dout goes to its window's argmax.

    Inputs:
    - dout: (N, C, Ho, Wo), the shape of the forward output
    - cache: from ``max_pool2d_forward``

    Returns ``dx`` (N, C, H, W) in the dtype of x:
    ``dx[n, c, r, s] = sum of dout[n, c, i, j] over the windows (i, j)
    whose argmax is (r, s)``.
    """
    argmax, x_shape, dtype, be = cache
    dout = check_float_array("dout", dout)
    check_same_shape("dout", dout, "the forward output", argmax)
    if dout.dtype != dtype:
        if not isinstance(dout, np.ndarray):
            raise ValueError(f"dout must have the dtype of x ({dtype}), got {dout.dtype}")
        dout = dout.astype(dtype)
    dx = be.op("max_pool2d_backward")(be.asarray(dout), argmax, x_shape)
    return be.output(dx, dout)
