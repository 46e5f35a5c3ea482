r"""The model's glue on every backend: the small operations between layers.

A training step is more than its layers. Between them the model adds
(residual shortcuts, the FPN's top-down sums, gradients that meet), crops
and pads (the FPN's upsampled maps on odd sizes), flattens and concatenates
the heads' maps into one row per anchor, gathers and scatters rows (RoIs by
pyramid level, positive anchors), builds the focal loss's targets, measures
the gradient norm and takes the SGD step. If any of these ran in NumPy, a
GPU step would copy every feature map to the host and back; here each one is
written once per backend, so on ``"cuda"`` the whole step stays on the
device and only scalars and a few small index arrays cross.

Operations (``x`` arrays of the backend; indices are small host int arrays)

    add(a, b)               a + b (a new array)
    add_into(dst, src)      dst += src
    scale_into(a, s)        a *= s
    fill(a, v)              a[...] = v
    crop_hw(x, H, W)        x[:, :, :H, :W]
    pad_hw(d, shape)        zeros(shape) with d in the top-left corner
    flatten_heads(maps, P)  [(N, A P, H, W), ...] -> (N, sum H W A, P): row
                            (h W + w) A + a of a level holds map[n, a P + p, h, w]
    unflatten_heads(d, shapes)   the inverse (the heads' backward)
    take_rows(x, idx)       x[idx] along axis 0
    put_rows(dst, idx, src) dst[idx] = src along axis 0
    fill_at(a, idx, v)      a.flat[idx] = v
    sum_squares(arrays)     sum of x^2 over all of them, float64 (one number)
    sgd_update(w, g, v, lr, momentum, weight_decay)
                            g' = g + wd w;  v = momentum v + g';  w = w - lr v
    above(x, t, capacity)   sorted flat indices of x > t (None if more than
                            ``capacity``: the caller then reads x whole)

NumPy implements them for both host backends (they are memory moves or one
vectorised expression each, exactly what the model did before). The CUDA
kernels are one thread per element; ``sum_squares`` reduces in shared memory
(``minimask._cuda.device_sum``) and ``above`` compacts with an atomic
counter, after which the host sorts the (few) indices so the order is the
one ``np.flatnonzero`` gives.
"""
from __future__ import annotations

import numpy as np

from minimask import _cuda
from minimask._cuda import THREADS_PER_BLOCK, blocks_for, cuda, nchw_of_cuda
from minimask.backend import CPU, CUDA, NUMPY, current_backend

# --------------------------------------------------------------------------
# NumPy (the "numpy" and "cpu" backends)
# --------------------------------------------------------------------------


def _add_into_np(dst, src):
    dst += src


def _scale_into_np(a, s):
    a *= a.dtype.type(s)


def _fill_np(a, v):
    a[...] = v


def _crop_np(x, H, W):
    return np.ascontiguousarray(x[:, :, :H, :W])


def _pad_np(d, shape):
    padded = np.zeros(shape, dtype=d.dtype)
    padded[:, :, :d.shape[2], :d.shape[3]] = d
    return padded


def _flatten_np(maps, per):
    from minimask.anchors import flatten_head_output
    return np.concatenate([flatten_head_output(m, per) for m in maps], axis=1)


def _unflatten_np(d, shapes):
    from minimask.anchors import unflatten_head_grad
    out, start = [], 0
    per = d.shape[2]
    for shape in shapes:
        n = shape[2] * shape[3] * (shape[1] // per)
        out.append(unflatten_head_grad(d[:, start:start + n], shape))
        start += n
    return out


def _put_rows_np(dst, idx, src):
    dst[idx] = src


def _fill_at_np(a, idx, v):
    a.reshape(-1)[idx] = v


def _sum_squares_np(arrays):
    return sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays)


def _sgd_np(w, g, v, lr, momentum, weight_decay):
    if weight_decay:
        g = g + weight_decay * w
    v *= momentum
    v += g
    w -= lr * v


def _above_np(x, t, capacity):
    return np.flatnonzero(x.reshape(-1) > t)


for _backend in (NUMPY, CPU):
    _backend.register("glue.add", lambda a, b: a + b)
    _backend.register("glue.add_into", _add_into_np)
    _backend.register("glue.scale_into", _scale_into_np)
    _backend.register("glue.fill", _fill_np)
    _backend.register("glue.crop_hw", _crop_np)
    _backend.register("glue.pad_hw", _pad_np)
    _backend.register("glue.flatten_heads", _flatten_np)
    _backend.register("glue.unflatten_heads", _unflatten_np)
    _backend.register("glue.take_rows", lambda x, idx: x[idx])
    _backend.register("glue.put_rows", _put_rows_np)
    _backend.register("glue.fill_at", _fill_at_np)
    _backend.register("glue.sum_squares", _sum_squares_np)
    _backend.register("glue.sgd_update", _sgd_np)
    _backend.register("glue.above", _above_np)


# --------------------------------------------------------------------------
# CUDA kernels (one thread per element)
# --------------------------------------------------------------------------

if cuda is not None:
    @cuda.jit
    def _add_cuda(a, b, out):
        i = cuda.grid(1)
        if i < out.size:
            out[i] = a[i] + b[i]

    @cuda.jit
    def _add_into_cuda(dst, src):
        i = cuda.grid(1)
        if i < dst.size:
            dst[i] += src[i]

    @cuda.jit
    def _scale_into_cuda(a, s):
        i = cuda.grid(1)
        if i < a.size:
            a[i] *= s

    @cuda.jit
    def _fill_cuda(a, v):
        i = cuda.grid(1)
        if i < a.size:
            a[i] = v

    @cuda.jit
    def _crop_cuda(x, out):
        # out (N, C, H, W) reads the top-left H x W of x
        N, C, H, W = out.shape
        t = cuda.grid(1)
        if t < N * C * H * W:
            n, c, h, w = nchw_of_cuda(t, C, H, W)
            out[n, c, h, w] = x[n, c, h, w]

    @cuda.jit
    def _pad_cuda(d, out):
        N, C, H, W = out.shape
        t = cuda.grid(1)
        if t < N * C * H * W:
            n, c, h, w = nchw_of_cuda(t, C, H, W)
            if h < d.shape[2] and w < d.shape[3]:
                out[n, c, h, w] = d[n, c, h, w]
            else:
                out[n, c, h, w] = 0

    @cuda.jit
    def _flatten_level_cuda(m, out, offset, A, P):
        # thread per element of the level's block of rows in out
        N, AP, H, W = m.shape
        t = cuda.grid(1)
        if t < N * H * W * A * P:
            p = t % P
            a = (t // P) % A
            w = (t // (P * A)) % W
            h = (t // (P * A * W)) % H
            n = t // (P * A * W * H)
            out[n, offset + (h * W + w) * A + a, p] = m[n, a * P + p, h, w]

    @cuda.jit
    def _unflatten_level_cuda(d, m, offset, A, P):
        N, AP, H, W = m.shape
        t = cuda.grid(1)
        if t < N * AP * H * W:
            n, ap, h, w = nchw_of_cuda(t, AP, H, W)
            a = ap // P
            p = ap % P
            m[n, ap, h, w] = d[n, offset + (h * W + w) * A + a, p]

    @cuda.jit
    def _take_rows_cuda(x, idx, out):
        R, L = out.shape
        t = cuda.grid(1)
        if t < R * L:
            out[t // L, t % L] = x[idx[t // L], t % L]

    @cuda.jit
    def _put_rows_cuda(dst, idx, src):
        R, L = src.shape
        t = cuda.grid(1)
        if t < R * L:
            dst[idx[t // L], t % L] = src[t // L, t % L]

    @cuda.jit
    def _fill_at_cuda(flat, idx, v):
        i = cuda.grid(1)
        if i < idx.size:
            flat[idx[i]] = v

    @cuda.jit
    def _sgd_cuda(w, g, v, lr, momentum, weight_decay):
        i = cuda.grid(1)
        if i < w.size:
            gi = g[i]
            if weight_decay != 0:
                gi = gi + weight_decay * w[i]
            vi = v[i] * momentum
            vi = vi + gi
            v[i] = vi
            w[i] = w[i] - lr * vi

    @cuda.jit
    def _above_cuda(x, t, idx, count):
        i = cuda.grid(1)
        if i < x.size and x[i] > t:
            k = cuda.atomic.add(count, 0, 1)
            if k < idx.size:
                idx[k] = i


def _launch(kernel, n, *args):
    if n:
        kernel[blocks_for(n), THREADS_PER_BLOCK](*args)


def _flat(a):
    return a.reshape(a.size)


def _add_dev(a, b):
    out = cuda.device_array(a.shape, dtype=a.dtype)
    _launch(_add_cuda, out.size, _flat(a), _flat(b), _flat(out))
    return out


def _add_into_dev(dst, src):
    _launch(_add_into_cuda, dst.size, _flat(dst), _flat(CUDA.asarray(src)))


def _scale_into_dev(a, s):
    _launch(_scale_into_cuda, a.size, _flat(a), a.dtype.type(s))


def _fill_dev(a, v):
    _launch(_fill_cuda, a.size, _flat(a), a.dtype.type(v))


def _crop_dev(x, H, W):
    N, C = x.shape[:2]
    out = cuda.device_array((N, C, H, W), dtype=x.dtype)
    _launch(_crop_cuda, out.size, x, out)
    return out


def _pad_dev(d, shape):
    out = cuda.device_array(tuple(shape), dtype=d.dtype)
    _launch(_pad_cuda, out.size, d, out)
    return out


def _flatten_dev(maps, per):
    N = maps[0].shape[0]
    rows = [m.shape[2] * m.shape[3] * (m.shape[1] // per) for m in maps]
    out = cuda.device_array((N, sum(rows), per), dtype=maps[0].dtype)
    offset = 0
    for m, r in zip(maps, rows):
        _launch(_flatten_level_cuda, N * r * per, m, out, offset, m.shape[1] // per, per)
        offset += r
    return out


def _unflatten_dev(d, shapes):
    per = d.shape[2]
    out, offset = [], 0
    for shape in shapes:
        m = cuda.device_array(tuple(shape), dtype=d.dtype)
        _launch(_unflatten_level_cuda, m.size, d, m, offset, shape[1] // per, per)
        out.append(m)
        offset += shape[2] * shape[3] * (shape[1] // per)
    return out


def _rows(a):
    return a.reshape(a.shape[0], a.size // a.shape[0] if a.shape[0] else 0)


def _take_rows_dev(x, idx):
    idx = np.asarray(idx, dtype=np.int64)
    out = cuda.device_array((len(idx),) + tuple(x.shape[1:]), dtype=x.dtype)
    if out.size:
        _launch(_take_rows_cuda, out.size, _rows(x), CUDA.asarray(idx), _rows(out))
    return out


def _put_rows_dev(dst, idx, src):
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) and dst.size:
        src = CUDA.asarray(src)
        _launch(_put_rows_cuda, src.size, _rows(dst), CUDA.asarray(idx), _rows(src))


def _fill_at_dev(a, idx, v):
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if len(idx):
        _launch(_fill_at_cuda, len(idx), _flat(a), CUDA.asarray(idx), a.dtype.type(v))


def _sum_squares_dev(arrays):
    total = _cuda.device_zeros(1, np.float64)
    for a in arrays:
        if a.size:
            _launch(_cuda._sum_into, a.size, _flat(a), True, total)
    return float(CUDA.to_host(total)[0])


def _sgd_dev(w, g, v, lr, momentum, weight_decay):
    t = w.dtype.type
    _launch(_sgd_cuda, w.size, _flat(w), _flat(g), _flat(v), t(lr), t(momentum),
            t(weight_decay))


def _above_dev(x, t, capacity):
    idx = cuda.device_array(max(int(capacity), 1), dtype=np.int64)
    count = _cuda.device_zeros(1, np.int64)
    _launch(_above_cuda, x.size, _flat(x), x.dtype.type(t), idx, count)
    n = int(CUDA.to_host(count)[0])
    if n > capacity:
        return None
    return np.sort(CUDA.to_host(idx[:n])) if n else np.zeros(0, dtype=np.int64)


if cuda is not None:
    CUDA.register("glue.add", _add_dev)
    CUDA.register("glue.add_into", _add_into_dev)
    CUDA.register("glue.scale_into", _scale_into_dev)
    CUDA.register("glue.fill", _fill_dev)
    CUDA.register("glue.crop_hw", _crop_dev)
    CUDA.register("glue.pad_hw", _pad_dev)
    CUDA.register("glue.flatten_heads", _flatten_dev)
    CUDA.register("glue.unflatten_heads", _unflatten_dev)
    CUDA.register("glue.take_rows", _take_rows_dev)
    CUDA.register("glue.put_rows", _put_rows_dev)
    CUDA.register("glue.fill_at", _fill_at_dev)
    CUDA.register("glue.sum_squares", _sum_squares_dev)
    CUDA.register("glue.sgd_update", _sgd_dev)
    CUDA.register("glue.above", _above_dev)


# --------------------------------------------------------------------------
# Public API: each runs on the current backend (or ``be``) on its arrays
# --------------------------------------------------------------------------


def _be(be):
    return current_backend() if be is None else be


def add(a, b, be=None):
    be = _be(be)
    return be.op("glue.add")(be.asarray(a), be.asarray(b))


def add_into(dst, src, be=None):
    _be(be).op("glue.add_into")(dst, src)


def scale_into(a, s, be=None):
    _be(be).op("glue.scale_into")(a, s)


def fill(a, value, be=None):
    _be(be).op("glue.fill")(a, value)


def crop_hw(x, H, W, be=None):
    return _be(be).op("glue.crop_hw")(x, H, W)


def pad_hw(d, shape, be=None):
    return _be(be).op("glue.pad_hw")(d, tuple(shape))


def flatten_heads(maps, per_anchor, be=None):
    return _be(be).op("glue.flatten_heads")(list(maps), per_anchor)


def unflatten_heads(d, shapes, be=None):
    return _be(be).op("glue.unflatten_heads")(d, [tuple(s) for s in shapes])


def take_rows(x, idx, be=None):
    return _be(be).op("glue.take_rows")(x, np.asarray(idx, dtype=np.int64))


def put_rows(dst, idx, src, be=None):
    _be(be).op("glue.put_rows")(dst, np.asarray(idx, dtype=np.int64), src)


def fill_at(a, idx, value, be=None):
    _be(be).op("glue.fill_at")(a, np.asarray(idx, dtype=np.int64), value)


def sum_squares(arrays, be=None) -> float:
    return _be(be).op("glue.sum_squares")(list(arrays))


def sgd_update(w, g, v, lr, momentum, weight_decay, be=None):
    _be(be).op("glue.sgd_update")(w, g, v, lr, momentum, weight_decay)


def above(x, threshold, capacity, be=None):
    return _be(be).op("glue.above")(x, threshold, capacity)
