r"""2-D convolution and transposed convolution, by im2col and one matrix multiply.

Convolution (cross-correlation, as in every deep-learning library)
    x (N, C, H, W), w (F, C, kh, kw), b (F,), stride (sh, sw), padding (ph, pw)

        out[n, f, p, q] = b[f] + sum_{c, i, j} w[f, c, i, j] * xpad[n, c, p*sh + i, q*sw + j]

    with ``xpad`` the input with ``ph`` / ``pw`` zeros on each side, and
    ``OH = (H + 2 ph - kh) // sh + 1`` (likewise ``OW``).

im2col turns this into a matrix product. Stack, for every output position
``(n, p, q)``, the patch ``xpad[n, :, p*sh : p*sh + kh, q*sw : q*sw + kw]`` as
one column:

    cols[(c, i, j), (n, p, q)] = xpad[n, c, p*sh + i, q*sw + j]       (C kh kw, N OH OW)

Then with ``W = w.reshape(F, C kh kw)``:

    out2 = W @ cols                                                   (F, N OH OW)

and ``out[n, f, p, q] = out2[f, (n, p, q)] + b[f]``.

Backward. Write ``dout2[f, (n, p, q)] = dout[n, f, p, q]``. Because
``out2 = W @ cols`` is linear in each factor,

    dW    = dout2 @ cols^T            (F, C kh kw)     -> dw = dW.reshape(w.shape)
    dcols = W^T @ dout2               (C kh kw, N OH OW)
    db[f] = sum_{n, p, q} dout[n, f, p, q]

and ``dx`` is the adjoint of im2col applied to ``dcols``: every input pixel
was copied into each column whose patch covers it, so its gradient is the sum
of those entries (col2im, a scatter-add of the patches; the padding border is
dropped at the end):

    dx[n, c, h, v] = sum over (i, j, p, q) with p*sh + i - ph = h and
                     q*sw + j - pw = v of dcols[(c, i, j), (n, p, q)]

Transposed convolution
    x (N, C_in, H, W), w (C_in, C_out, kh, kw) as in PyTorch, b (C_out,)

    It is the adjoint of the convolution with the same weight, where that
    convolution maps C_out channels to C_in: its forward is the convolution's
    input gradient, and the other way round. Output size
    ``H_out = (H - 1) * sh - 2 ph + kh``. With ``W = w.reshape(C_in, C_out kh kw)``
    and ``x2[c, (n, h, v)] = x[n, c, h, v]``:

        forward:   cols = W^T @ x2,  out = col2im(cols) + b
        backward:  dcols = im2col(dout)
                   dx2 = W @ dcols,  dW = x2 @ dcols^T,  db = sum of dout over (n, h, v)

    The im2col / col2im here use the geometry of the convolution that goes
    from the output (H_out, W_out) back to (H, W): same kernel, stride and
    padding, so ``(H_out + 2 ph - kh) // sh + 1 == H``.

So both layers need only a handful of operations: im2col, col2im, a GEMM
(as ``A @ B``, ``A @ B^T`` and ``A^T @ B``), the permutation between NCHW
and the ``(C, N L)`` layout of ``cols`` (with the bias added on the way
back), adding a bias, and the bias gradient. Each backend provides them
as one table (``_NumpyOps``, ``_CpuOps``, ``_CudaOps``, registered with the
backend objects as ``"conv.ops"``); the two layers are written once on top
of whichever table the current backend holds.

Backends:

* ``"numpy"``: im2col as ``kh * kw`` strided slices of the padded input (one
  per kernel offset), col2im as the same slices added back, ``@`` for the
  GEMM.
* ``"cpu"``: 3x3 stride-1 layers by Winograd - F(4x4, 3x3) on maps from
  8 x 8 outputs and 512 positions (``winograd_f4.py``: 36 smaller
  multiplies, 0.25 of im2col's FLOPs), F(2x2, 3x3) on smaller ones
  (``winograd.py``: 16, 0.44 of the FLOPs); the others by im2col, as
  NumPy's strided copies (memory-bound: a parallel Numba kernel was
  slower); col2im a Numba kernel, parallel over (n, c) planes of ``dx``:
  each iteration adds the rows of ``cols`` that belong to its own plane, so
  no two iterations write the same element. BLAS (``minimask._blas``:
  OpenBLAS on one thread per call, a large multiply split between
  minimask's threads) for the GEMM, which is where the FLOPs are. The input
  gradient of a stride-1 conv is computed as a conv of ``dout`` with the
  kernel turned by 180 degrees (im2col + GEMM, no col2im;
  ``_CpuOps.input_grad_stride1``). Matrices above ``BLOCK_BYTES`` are built
  and multiplied in blocks of columns (a block may start and end anywhere
  in a row of output positions; the block kernels are parallel over rows,
  and over channels for the scatter-add); ``dcols`` lives in one reused
  workspace.
* ``"cuda"``: one thread per element of ``cols`` for im2col; col2im a
  gather, one thread per input element summing the (at most kh * kw) column
  entries that hold it, so no atomics are needed; the GEMM is
  the tiled kernel of ``minimask.layers.gemm``; the bias gradient is one
  block per channel with a shared-memory tree reduction.

The cache keeps ``cols`` (conv2d) or ``x2`` (transposed conv) and the weight
matrix, on the device on the ``"cuda"`` backend.
"""
from __future__ import annotations

import threading
from collections import namedtuple

import numpy as np
from numba import njit, prange

from minimask import _blas, _cuda, _threads
from minimask._checks import (check_float_array, check_nonnegative_int, check_positive_int,
                              check_same_dtype, is_device_array, pair)
from minimask._cuda import THREADS_PER_BLOCK, blocks_for, cuda, nchw_of_cuda
from minimask._threads import parallel_kernel
from minimask.backend import CPU, CUDA, NUMPY, current_backend
from minimask.layers import winograd

# The geometry of one convolution: an "image" (N, C, H, W), read through a
# (kh, kw) window with stride (sh, sw) and padding (ph, pw), giving a grid of
# (OH, OW) window positions. For conv2d the image is the input x; for the
# transposed convolution it is the output.
Geometry = namedtuple("Geometry", "N C H W kh kw sh sw ph pw OH OW")

# What a conv2d cache holds in place of ``cols`` when the forward went
# through Winograd: the transformed weights U (16, F, C) and input V (16, C, T).
WinogradCache = namedtuple("WinogradCache", "U V")


# --------------------------------------------------------------------------
# Index helpers, written once for both targets
# --------------------------------------------------------------------------


def _image_index(o, k, stride, pad, size):
    """Row (or column) of the image that window position ``o`` reads at
    kernel offset ``k``; -1 in the zero padding."""
    h = o * stride - pad + k
    if h < 0 or h >= size:
        return -1
    return h


def _grid_index(h, k, stride, pad, n_grid):
    """The inverse: the window position that reads image row ``h`` at kernel
    offset ``k``, or -1 if none does (``h + pad - k`` must be a non-negative
    multiple of the stride, below ``stride * n_grid``)."""
    t = h + pad - k
    if t < 0 or t % stride != 0:
        return -1
    o = t // stride
    if o >= n_grid:
        return -1
    return o


image_index_cpu, image_index_cuda = _cuda.compile_for_both(_image_index)
# grid_index drives the CUDA gather; the CPU col2im loops over _valid_range.
grid_index_cpu, grid_index_cuda = _cuda.compile_for_both(_grid_index)


# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------


def im2col_numpy(x, g):
    """``cols[(c, i, j), (n, p, q)] = xpad[n, c, p*sh + i, q*sw + j]``."""
    xpad = np.pad(x, ((0, 0), (0, 0), (g.ph, g.ph), (g.pw, g.pw)))
    cols = np.empty((g.C, g.kh, g.kw, g.N, g.OH, g.OW), dtype=x.dtype)
    for i in range(g.kh):
        for j in range(g.kw):
            # Every window position's pixel at offset (i, j): a strided slice.
            rows = slice(i, i + g.sh * (g.OH - 1) + 1, g.sh)
            columns = slice(j, j + g.sw * (g.OW - 1) + 1, g.sw)
            cols[:, i, j] = xpad[:, :, rows, columns].transpose(1, 0, 2, 3)
    return cols.reshape(g.C * g.kh * g.kw, g.N * g.OH * g.OW)


def col2im_numpy(cols, g):
    """The adjoint of ``im2col_numpy``: add each column's entries back to the
    pixels they were copied from, then drop the padding."""
    cols = cols.reshape(g.C, g.kh, g.kw, g.N, g.OH, g.OW)
    xpad = np.zeros((g.N, g.C, g.H + 2 * g.ph, g.W + 2 * g.pw), dtype=cols.dtype)
    for i in range(g.kh):
        for j in range(g.kw):
            rows = slice(i, i + g.sh * (g.OH - 1) + 1, g.sh)
            columns = slice(j, j + g.sw * (g.OW - 1) + 1, g.sw)
            xpad[:, :, rows, columns] += cols[:, i, j].transpose(1, 0, 2, 3)
    return np.ascontiguousarray(xpad[:, :, g.ph:g.ph + g.H, g.pw:g.pw + g.W])


class _Unblocked:
    """``conv_forward`` / ``conv_input_grad`` from the table's own pieces,
    unblocked (the NumPy reference and the CUDA backend)."""

    @classmethod
    def conv_forward(cls, x, W2, g):
        cols = cls.im2col(x, g)                      # (C kh kw, N OH OW)
        return cls.matmul(W2, cols), cols

    @classmethod
    def conv_input_grad(cls, W2, dout2, g):
        return cls.col2im(cls.temp_matmul(W2, dout2, trans_a=True), g)


class _NumpyOps(_Unblocked):
    """The operations in plain NumPy."""

    im2col = staticmethod(im2col_numpy)
    col2im = staticmethod(col2im_numpy)

    @staticmethod
    def matmul(a, b, trans_a=False, trans_b=False):
        return (a.T if trans_a else a) @ (b.T if trans_b else b)

    temp_matmul = matmul

    @staticmethod
    def to_rows(x):
        """(N, C, H, W) -> (C, N H W): one row per channel."""
        N, C, H, W = x.shape
        return x.transpose(1, 0, 2, 3).reshape(C, N * H * W)

    @staticmethod
    def from_rows(y2, b, N, H, W):
        """(C, N H W) -> (N, C, H, W), plus ``b[c]`` when ``b`` is given."""
        C = y2.shape[0]
        out = np.ascontiguousarray(y2.reshape(C, N, H, W).transpose(1, 0, 2, 3))
        if b is not None:
            out += b.reshape(1, C, 1, 1)
        return out

    @staticmethod
    def add_bias(out, b):
        """``out[n, c] += b[c]`` in place, on an NCHW array."""
        out += b.reshape(1, -1, 1, 1)

    @staticmethod
    def bias_grad(dout):
        return dout.sum(axis=(0, 2, 3))

    @staticmethod
    def weight_matrix(w):
        return w.reshape(w.shape[0], -1)

    @staticmethod
    def like_weight(dW, w):
        return dW.reshape(w.shape)


# --------------------------------------------------------------------------
# Numba CPU kernels
# --------------------------------------------------------------------------


@njit(inline="always", cache=True)
def _valid_range(k, stride, pad, size, n_grid):
    """Window positions ``o`` in ``[lo, hi)`` whose pixel at kernel offset
    ``k``, ``o * stride - pad + k``, lies inside ``[0, size)``. Knowing the
    range up front leaves the inner loops branch-free (and vectorisable)."""
    lo = max(0, -((k - pad) // stride))            # ceil((pad - k) / stride)
    hi = min(n_grid, (size - 1 + pad - k) // stride + 1)
    return lo, max(lo, hi)


@parallel_kernel
def _col2im_cpu(cols, dx, kh, kw, sh, sw, ph, pw, OH, OW):
    N, C, H, W = dx.shape
    L = OH * OW
    # Parallel over (n, c) planes of dx: an iteration adds the rows (c, i, j)
    # of cols into its own plane only, so no element is written by two
    # iterations (the partition is by output, as a race-free scatter needs).
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        for h in range(H):
            for v in range(W):
                dx[n, c, h, v] = 0
        for i in range(kh):
            p_lo, p_hi = _valid_range(i, sh, ph, H, OH)
            for j in range(kw):
                q_lo, q_hi = _valid_range(j, sw, pw, W, OW)
                r = (c * kh + i) * kw + j
                for p in range(p_lo, p_hi):
                    h = p * sh - ph + i
                    base = n * L + p * OW
                    for q in range(q_lo, q_hi):
                        dx[n, c, h, q * sw - pw + j] += cols[r, base + q]


@parallel_kernel
def _to_rows_cpu(x, out):
    N, C, L = x.shape
    for c in prange(C):
        for n in range(N):
            for l in range(L):
                out[c, n * L + l] = x[n, c, l]


@parallel_kernel
def _from_rows_cpu(y2, b, has_bias, out):
    N, C, L = out.shape
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        shift = b[c] if has_bias else y2[0, 0] * 0
        for l in range(L):
            out[n, c, l] = y2[c, n * L + l] + shift


@parallel_kernel
def _add_bias_cpu(out, b):
    N, C, L = out.shape
    for nc in prange(N * C):
        c = nc % C
        for l in range(L):
            out[nc // C, c, l] += b[c]


@parallel_kernel
def _bias_grad_cpu(dout, db):
    N, C, L = dout.shape
    for c in prange(C):
        total = dout[0, 0, 0] * 0
        for n in range(N):
            for l in range(L):
                total += dout[n, c, l]
        db[c] = total


def _block_work(a, c0, b, j0, j1, *geometry):
    """Work of a block kernel for the thread rule: its block of columns."""
    rows = a.shape[0] if a.ndim == 2 else b.shape[0]
    return rows * (j1 - j0)


@parallel_kernel(work=_block_work)
def _im2col_block_cpu(x, c0, cols, j0, j1, kh, kw, sh, sw, ph, pw, OH, OW):
    """Columns ``j0 .. j1`` of im2col's matrix, written to ``cols[:, c0 :
    c0 + j1 - j0]``: the same values as ``_im2col_strided``, for any column
    range (it may start and end in the middle of a row of output
    positions)."""
    N, C, H, W = x.shape
    row0 = j0 // OW
    row1 = (j1 - 1) // OW
    for r in prange(C * kh * kw):
        c = r // (kh * kw)
        i = (r // kw) % kh
        j = r % kw
        q_lo, q_hi = _valid_range(j, sw, pw, W, OW)
        for row in range(row0, row1 + 1):        # row = n * OH + p
            n = row // OH
            p = row % OH
            base = row * OW - j0 + c0            # column of cols that holds q = 0
            a = max(0, j0 - row * OW)
            b = min(OW, j1 - row * OW)
            h = image_index_cpu(p, i, sh, ph, H)
            if h < 0:
                for q in range(a, b):
                    cols[r, base + q] = 0
                continue
            for q in range(a, min(b, q_lo)):
                cols[r, base + q] = 0
            for q in range(max(a, q_lo), min(b, q_hi)):
                cols[r, base + q] = x[n, c, h, q * sw - pw + j]
            for q in range(max(a, q_hi), b):
                cols[r, base + q] = 0


@parallel_kernel(work=_block_work)
def _col2im_block_add_cpu(cols, c0, dx, j0, j1, kh, kw, sh, sw, ph, pw, OH, OW):
    """Add columns ``j0 .. j1`` of a ``dcols`` matrix, held in ``cols[:, c0 :
    c0 + j1 - j0]``, into ``dx`` (which holds the earlier blocks' sums): the
    adjoint of ``_im2col_block_cpu``. Parallel over channels: an iteration
    writes the planes ``dx[:, c]`` of its own channel only."""
    N, C, H, W = dx.shape
    row0 = j0 // OW
    row1 = (j1 - 1) // OW
    for c in prange(C):
        for i in range(kh):
            for j in range(kw):
                r = (c * kh + i) * kw + j
                q_lo, q_hi = _valid_range(j, sw, pw, W, OW)
                for row in range(row0, row1 + 1):
                    n = row // OH
                    p = row % OH
                    h = image_index_cpu(p, i, sh, ph, H)
                    if h < 0:
                        continue
                    base = row * OW - j0 + c0
                    a = max(q_lo, j0 - row * OW)
                    b = min(q_hi, j1 - row * OW)
                    for q in range(a, b):
                        dx[n, c, h, q * sw - pw + j] += cols[r, base + q]


def _valid_range_py(k, stride, pad, size, n_grid):
    """``_valid_range`` in Python (for the NumPy im2col below)."""
    lo = max(0, -((k - pad) // stride))
    hi = min(n_grid, (size - 1 + pad - k) // stride + 1)
    return lo, max(lo, hi)


def _im2col_strided(x, g, cols):
    """im2col on one thread with NumPy's strided copies, into ``cols``: per
    kernel offset (i, j), one copy of the window positions whose pixel lies
    inside the image and zeros for the strips that fall in the padding (no
    padded copy of x). The inner loops run in NumPy's C code: 2.4-3x faster
    than the Numba kernel on one thread (4 x 64 x 16 x 16, 3x3: 0.16 against
    0.45 ms; 1 x 256 x 64 x 64: 2.4 against 5.3 ms). The same values."""
    c6 = cols.reshape(g.C, g.kh, g.kw, g.N, g.OH, g.OW)
    xt = x.transpose(1, 0, 2, 3)                                 # (C, N, H, W)
    for i in range(g.kh):
        p_lo, p_hi = _valid_range_py(i, g.sh, g.ph, g.H, g.OH)
        for j in range(g.kw):
            q_lo, q_hi = _valid_range_py(j, g.sw, g.pw, g.W, g.OW)
            dst = c6[:, i, j]                                    # (C, N, OH, OW)
            if p_lo == p_hi or q_lo == q_hi:                     # all in the padding
                dst[...] = 0
                continue
            dst[:, :, :p_lo] = 0
            dst[:, :, p_hi:] = 0
            dst[:, :, p_lo:p_hi, :q_lo] = 0
            dst[:, :, p_lo:p_hi, q_hi:] = 0
            h0 = p_lo * g.sh - g.ph + i
            v0 = q_lo * g.sw - g.pw + j
            dst[:, :, p_lo:p_hi, q_lo:q_hi] = xt[:, :, h0:h0 + g.sh * (p_hi - p_lo - 1) + 1:g.sh,
                                                 v0:v0 + g.sw * (q_hi - q_lo - 1) + 1:g.sw]


def _im2col_whole(x, g, cols):
    """The whole im2col into ``cols``: NumPy's strided copies, on one thread
    whatever the thread count. A Numba kernel parallel over rows of cols was
    measured against it and lost everywhere, even on two threads (idle,
    float32, batch 4, 3x3: 3 x 256 x 256 stride 2: 0.51 ms strided against
    1.27 on two threads; 64 x 64 x 64 stride 1: 1.9 against 9.7): the copy
    is memory-bound and the strided copies already run at memory speed."""
    _im2col_strided(x, g, cols)


# The CPU conv works on blocks of columns of at most this many bytes of cols
# (or dcols). Measured (3x3, 256 -> 256, 64 x 64, one thread, fwd + bwd,
# CPU ms, load 4.4): unblocked 90-92; blocks of 8 / 4 / 2 / 1 MB 95 / 97 /
# 103 / 106. Blocks that fit in cache do not pay here: OpenBLAS packs the
# weight matrix again for every block, and a narrow block multiplies less
# efficiently. So blocking only bounds memory: a block is the whole matrix
# unless that is larger than this (batch 4 at 512 px on P3: 151 MB of cols,
# 3 blocks), and the dcols workspace is one block, reused. A single block
# runs the whole-matrix kernels (_im2col_strided, _col2im_cpu): the range logic
# of the block kernels costs 50% more per element on small maps (4 x 64 x
# 16 x 16, 3x3: 0.71 against 0.46 ms for im2col, one thread).
BLOCK_BYTES = 64 << 20


def block_columns(rows, itemsize):
    """Columns per block of a ``(rows, ...)`` cols matrix (at least 64)."""
    return max(64, BLOCK_BYTES // (rows * itemsize))


_WORKSPACE = threading.local()


def _workspace(size, dtype, key="dcols"):
    """A flat scratch array of at least ``size`` elements of ``dtype``, kept
    between calls (one per key, dtype and Python thread, grown when a larger
    one is asked for). What it holds is valid until the next call with the
    same key."""
    dtype = np.dtype(dtype)
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    buf = buffers.get((key, dtype))
    if buf is None or buf.size < size:
        buf = buffers[(key, dtype)] = np.empty(size, dtype=dtype)
    return buf[:size]


class _CpuOps:
    """Numba kernels for the data movement, BLAS for the multiply."""

    winograd = True     # conv2d takes 3x3 stride-1 layers through winograd.py

    @staticmethod
    def im2col(x, g):
        cols = np.empty((g.C * g.kh * g.kw, g.N * g.OH * g.OW), dtype=x.dtype)
        _im2col_whole(np.ascontiguousarray(x), g, cols)
        return cols

    @staticmethod
    def col2im(cols, g):
        dx = np.empty((g.N, g.C, g.H, g.W), dtype=cols.dtype)
        _col2im_cpu(np.ascontiguousarray(cols), dx, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw,
                    g.OH, g.OW)
        return dx

    @staticmethod
    def matmul(a, b, trans_a=False, trans_b=False):
        # minimask's BLAS call: its kernels and its threads by work size
        # (minimask._blas); transposes are flags, not copies.
        return _blas.gemm(a, b, trans_a, trans_b)

    @staticmethod
    def temp_matmul(a, b, trans_a=False, trans_b=False):
        """``matmul`` into a workspace that the next ``temp_matmul`` call
        overwrites: for a product that is used once, at once (``dcols``,
        consumed by ``col2im``). The largest of these is 38 MB (3x3,
        256 -> 256 at 64 x 64); a fresh one every backward pass is fresh
        pages from the kernel, each faulted in and zeroed."""
        M = a.shape[1] if trans_a else a.shape[0]
        N = b.shape[0] if trans_b else b.shape[1]
        return _blas.gemm(a, b, trans_a, trans_b, out=_workspace(M * N, a.dtype).reshape(M, N))

    @staticmethod
    def conv_forward(x, W2, g):
        """``(W2 @ im2col(x), im2col(x))`` block by block: each block of
        columns is built and multiplied while it is in cache. cols is kept
        whole (the weight gradient needs it)."""
        x = np.ascontiguousarray(x)
        rows, n_cols = g.C * g.kh * g.kw, g.N * g.OH * g.OW
        cols = np.empty((rows, n_cols), dtype=x.dtype)
        out2 = np.empty((W2.shape[0], n_cols), dtype=x.dtype)
        step = block_columns(rows, x.itemsize)
        if step >= n_cols:      # one block: the whole-matrix kernel (no range logic)
            _im2col_whole(x, g, cols)
            _blas.gemm(W2, cols, out=out2)
            return out2, cols
        for j0 in range(0, n_cols, step):
            j1 = min(n_cols, j0 + step)
            _im2col_block_cpu(x, j0, cols, j0, j1, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw,
                              g.OH, g.OW)
            _blas.gemm(W2, cols[:, j0:j1], out=out2[:, j0:j1])
        return out2, cols

    @staticmethod
    def input_grad_stride1(W2, dout2, g):
        """dx of a stride-1 conv as a convolution of dout, without col2im:

            dx[n, c, h, v] = sum_{f, i, j} w[f, c, kh-1-i, kw-1-j] * doutpad[n, f, h + i, v + j]

        with dout padded by ``kh - 1 - ph`` (``kw - 1 - pw``), i.e. conv2d
        of dout with the kernel turned by 180 degrees and input and output
        channels swapped. It needs im2col (NumPy's strided copies) where the
        adjoint form needs col2im (a Numba scatter-add, 2-3x slower on one
        thread); the multiply has the same FLOPs. The same sums in another
        order: float round-off apart, the values of col2im(W2^T @ dout2)."""
        F = W2.shape[0]
        N, C, kh, kw = g.N, g.C, g.kh, g.kw
        w_rot = np.ascontiguousarray(
            W2.reshape(F, C, kh, kw)[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(C, -1)
        gd = Geometry(N, F, g.OH, g.OW, kh, kw, 1, 1, kh - 1 - g.ph, kw - 1 - g.pw, g.H, g.W)
        dout = dout2.reshape(F, N, g.OH, g.OW).transpose(1, 0, 2, 3)
        rows = F * kh * kw
        cols = _workspace(rows * N * g.H * g.W, W2.dtype).reshape(rows, N * g.H * g.W)
        _im2col_whole(dout, gd, cols)
        return _CpuOps.from_rows(_blas.gemm(w_rot, cols), None, N, g.H, g.W)

    @staticmethod
    def conv_input_grad(W2, dout2, g):
        """``col2im(W2^T @ dout2)`` block by block: each block of ``dcols``
        is multiplied into one reused workspace and added into ``dx`` at
        once, so the whole ``dcols`` is never held."""
        rows, n_cols = W2.shape[1], dout2.shape[1]
        step = block_columns(rows, W2.itemsize)
        if step >= n_cols and g.sh == g.sw == 1 and g.ph < g.kh and g.pw < g.kw:
            return _CpuOps.input_grad_stride1(W2, dout2, g)
        if step >= n_cols:      # one block: the whole-matrix kernel
            dcols = _workspace(rows * n_cols, W2.dtype).reshape(rows, n_cols)
            _blas.gemm(W2, dout2, trans_a=True, out=dcols)
            dx = np.empty((g.N, g.C, g.H, g.W), dtype=W2.dtype)
            _col2im_cpu(dcols, dx, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW)
            return dx
        dx = np.zeros((g.N, g.C, g.H, g.W), dtype=W2.dtype)
        for j0 in range(0, n_cols, step):
            j1 = min(n_cols, j0 + step)
            block = _workspace(rows * (j1 - j0), W2.dtype).reshape(rows, j1 - j0)
            _blas.gemm(W2, dout2[:, j0:j1], trans_a=True, out=block)
            _col2im_block_add_cpu(block, 0, dx, j0, j1, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw,
                                  g.OH, g.OW)
        return dx

    @staticmethod
    def to_rows(x):
        N, C, H, W = x.shape
        out = np.empty((C, N * H * W), dtype=x.dtype)
        _to_rows_cpu(np.ascontiguousarray(x).reshape(N, C, H * W), out)
        return out

    @staticmethod
    def from_rows(y2, b, N, H, W):
        C = y2.shape[0]
        out = np.empty((N, C, H, W), dtype=y2.dtype)
        bias = b if b is not None else np.zeros(1, dtype=y2.dtype)
        _from_rows_cpu(np.ascontiguousarray(y2), np.ascontiguousarray(bias), b is not None,
                       out.reshape(N, C, H * W))
        return out

    @staticmethod
    def add_bias(out, b):
        N, C, H, W = out.shape
        _add_bias_cpu(out.reshape(N, C, H * W), np.ascontiguousarray(b))

    @staticmethod
    def bias_grad(dout):
        N, C, H, W = dout.shape
        db = np.empty(C, dtype=dout.dtype)
        _bias_grad_cpu(np.ascontiguousarray(dout).reshape(N, C, H * W), db)
        return db

    @staticmethod
    def weight_matrix(w):
        return np.ascontiguousarray(w).reshape(w.shape[0], -1)

    like_weight = _NumpyOps.like_weight


# --------------------------------------------------------------------------
# CUDA kernels
# --------------------------------------------------------------------------

if cuda is not None:
    @cuda.jit
    def _im2col_cuda(x, cols, kh, kw, sh, sw, ph, pw, OH, OW):
        # One thread per element of cols; neighbouring threads write
        # neighbouring columns, so the stores coalesce.
        N, C, H, W = x.shape
        L = OH * OW
        n_cols = N * L
        t = cuda.grid(1)
        if t < cols.shape[0] * n_cols:
            r = t // n_cols
            col = t % n_cols
            c = r // (kh * kw)
            i = (r // kw) % kh
            j = r % kw
            n = col // L
            p = (col % L) // OW
            q = col % OW
            h = image_index_cuda(p, i, sh, ph, H)
            v = image_index_cuda(q, j, sw, pw, W)
            if h >= 0 and v >= 0:
                cols[r, col] = x[n, c, h, v]
            else:
                cols[r, col] = 0

    @cuda.jit
    def _col2im_cuda(cols, dx, kh, kw, sh, sw, ph, pw, OH, OW):
        # One thread per input element gathering its sum: no atomics.
        N, C, H, W = dx.shape
        L = OH * OW
        t = cuda.grid(1)
        if t < N * C * H * W:
            n, c, h, v = nchw_of_cuda(t, C, H, W)
            total = cols[0, 0] * 0
            for i in range(kh):
                p = grid_index_cuda(h, i, sh, ph, OH)
                if p >= 0:
                    for j in range(kw):
                        q = grid_index_cuda(v, j, sw, pw, OW)
                        if q >= 0:
                            total += cols[(c * kh + i) * kw + j, n * L + p * OW + q]
            dx[n, c, h, v] = total

    @cuda.jit
    def _to_rows_cuda(x, out):
        N, C, L = x.shape
        t = cuda.grid(1)
        if t < N * C * L:
            c = t // (N * L)
            n = (t // L) % N
            l = t % L
            out[c, n * L + l] = x[n, c, l]

    @cuda.jit
    def _from_rows_cuda(y2, b, has_bias, out):
        N, C, L = out.shape
        t = cuda.grid(1)
        if t < N * C * L:
            n = t // (C * L)
            c = (t // L) % C
            l = t % L
            value = y2[c, n * L + l]
            if has_bias:
                value += b[c]
            out[n, c, l] = value

    @cuda.jit
    def _add_bias_cuda(out, b):
        N, C, L = out.shape
        t = cuda.grid(1)
        if t < N * C * L:
            out[t // (C * L), (t // L) % C, t % L] += b[(t // L) % C]

    def _make_bias_grad_cuda(nb_dtype):
        @cuda.jit
        def bias_grad(dout, db):
            # One block per channel: each thread sums a strided share of the
            # N * L values, then the block halves the partial sums in shared
            # memory. Every thread reaches every barrier.
            N, C, L = dout.shape
            partial = cuda.shared.array(THREADS_PER_BLOCK, nb_dtype)
            c = cuda.blockIdx.x
            t = cuda.threadIdx.x
            total = nb_dtype(0)
            if c < C:
                for e in range(t, N * L, THREADS_PER_BLOCK):
                    total += dout[e // L, c, e % L]
            partial[t] = total
            cuda.syncthreads()
            half = THREADS_PER_BLOCK // 2
            while half > 0:
                if t < half:
                    partial[t] += partial[t + half]
                cuda.syncthreads()
                half //= 2
            if t == 0 and c < C:
                db[c] = partial[0]
        return bias_grad

    import numba as _numba
    _BIAS_GRAD_CUDA = {np.dtype(np.float32): _make_bias_grad_cuda(_numba.float32),
                       np.dtype(np.float64): _make_bias_grad_cuda(_numba.float64)}


class _CudaOps(_Unblocked):
    """CUDA kernels on device arrays; the GEMM from ``minimask.layers.gemm``."""

    @staticmethod
    def im2col(x, g):
        cols = cuda.device_array((g.C * g.kh * g.kw, g.N * g.OH * g.OW), dtype=x.dtype)
        _im2col_cuda[blocks_for(cols.size), THREADS_PER_BLOCK](
            x, cols, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW)
        return cols

    @staticmethod
    def col2im(cols, g):
        dx = cuda.device_array((g.N, g.C, g.H, g.W), dtype=cols.dtype)
        _col2im_cuda[blocks_for(dx.size), THREADS_PER_BLOCK](
            cols, dx, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW)
        return dx

    @staticmethod
    def matmul(a, b, trans_a=False, trans_b=False):
        from minimask.layers.gemm import gemm_device
        return gemm_device(a, b, trans_a, trans_b)

    temp_matmul = matmul

    @staticmethod
    def to_rows(x):
        N, C, H, W = x.shape
        out = cuda.device_array((C, N * H * W), dtype=x.dtype)
        _to_rows_cuda[blocks_for(out.size), THREADS_PER_BLOCK](x.reshape(N, C, H * W), out)
        return out

    @staticmethod
    def from_rows(y2, b, N, H, W):
        C = y2.shape[0]
        out = cuda.device_array((N, C, H, W), dtype=y2.dtype)
        bias = b if b is not None else cuda.device_array(1, dtype=y2.dtype)
        _from_rows_cuda[blocks_for(out.size), THREADS_PER_BLOCK](
            y2, bias, b is not None, out.reshape(N, C, H * W))
        return out

    @staticmethod
    def add_bias(out, b):
        N, C, H, W = out.shape
        _add_bias_cuda[blocks_for(out.size), THREADS_PER_BLOCK](out.reshape(N, C, H * W), b)

    @staticmethod
    def bias_grad(dout):
        N, C, H, W = dout.shape
        db = cuda.device_array(C, dtype=dout.dtype)
        _BIAS_GRAD_CUDA[np.dtype(dout.dtype)][C, THREADS_PER_BLOCK](
            dout.reshape(N, C, H * W), db)
        return db

    @staticmethod
    def weight_matrix(w):
        return w.reshape(w.shape[0], w.size // w.shape[0])

    @staticmethod
    def like_weight(dW, w):
        return dW.reshape(*w.shape)


NUMPY.register("conv.ops", _NumpyOps)
CPU.register("conv.ops", _CpuOps)
if cuda is not None:
    CUDA.register("conv.ops", _CudaOps)


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def _check_inputs(x, w, stride, padding, w_layout):
    """Check x and w and turn stride / padding into pairs."""
    x = check_float_array("x", x, ndim=4, what="(N, C, H, W)")
    w = check_float_array("w", w, ndim=4, what=w_layout)
    check_same_dtype("w", w, "x", x)
    if w.shape[0] < 1 or any(s < 1 for s in w.shape[1:]):
        raise ValueError(f"w must have no empty dimension, got shape {tuple(w.shape)}")
    sh, sw = pair("stride", stride, check_positive_int)
    ph, pw = pair("padding", padding, check_nonnegative_int)
    return x, w, (sh, sw), (ph, pw)


def _check_bias(b, n_out, x, name_of_size):
    if b is None:
        return None
    b = check_float_array("b", b, ndim=1, what=f"({name_of_size},)")
    check_same_dtype("b", b, "x", x)
    if b.shape[0] != n_out:
        raise ValueError(f"b must have shape ({n_out},) to match {name_of_size} of w, "
                         f"got ({b.shape[0]},)")
    return b


def _check_dout(dout, shape, dtype):
    dout = check_float_array("dout", dout, ndim=4, what="(N, C, H, W)")
    if tuple(dout.shape) != tuple(shape):
        raise ValueError(f"dout must have the shape of the forward output {tuple(shape)}, "
                         f"got {tuple(dout.shape)}")
    if dout.dtype != dtype:
        if is_device_array(dout):
            raise ValueError(f"dout must have the dtype of the forward input ({dtype}), "
                             f"got {dout.dtype}")
        # A host array of the other float dtype is cast, so that a float32
        # layer keeps float32 gradients (and float64 stays float64).
        dout = dout.astype(dtype)
    return dout


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def conv2d_forward(x, w, b, stride=1, padding=0):
    """2-D convolution (cross-correlation), by im2col and one GEMM (on the
    ``"cpu"`` backend, 3x3 stride-1 layers by Winograd: ``winograd.py``).

        out[n, f, p, q] = b[f] + sum_{c, i, j} w[f, c, i, j] * xpad[n, c, p*sh + i, q*sw + j]

    Inputs:
    - x: (N, C, H, W), float32 or float64
    - w: (F, C, kh, kw), the dtype of x (kh != kw allowed)
    - b: (F,) or None
    - stride: int or pair (sh, sw), >= 1
    - padding: int or pair (ph, pw), >= 0 (zeros on each side)

    Returns ``(out, cache)``: out is (N, F, OH, OW) with
    ``OH = (H + 2 ph - kh) // sh + 1`` and ``OW = (W + 2 pw - kw) // sw + 1``.
    Raises ValueError on wrong shapes or dtypes, a channel mismatch, or an
    empty output.
    """
    x, w, (sh, sw), (ph, pw) = _check_inputs(x, w, stride, padding, "(F, C, kh, kw)")
    N, C, H, W = x.shape
    F, C_w, kh, kw = w.shape
    if C_w != C:
        raise ValueError(f"w must have C = {C} input channels to match x {tuple(x.shape)}, "
                         f"got w of shape {tuple(w.shape)}")
    b = _check_bias(b, F, x, "F")
    OH = (H + 2 * ph - kh) // sh + 1
    OW = (W + 2 * pw - kw) // sw + 1
    if H + 2 * ph < kh or W + 2 * pw < kw or N == 0 or C == 0:
        raise ValueError(f"conv2d output would be empty: x {tuple(x.shape)} with kernel "
                         f"({kh}, {kw}), stride ({sh}, {sw}), padding ({ph}, {pw})")
    g = Geometry(N, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW)
    be = current_backend()
    ops = be.op("conv.ops")
    d_x, d_w, d_b = be.asarray(x), be.asarray(w), be.asarray(b)

    W2 = ops.weight_matrix(d_w)                      # (F, C kh kw)
    if getattr(ops, "winograd", False) and winograd.applies(g):
        # 3x3, stride 1 on the "cpu" backend: 16 smaller multiplies (winograd.py)
        out, transformed = winograd.forward(d_x, d_w, d_b, g, _workspace)
        cache = (be, WinogradCache(*transformed), W2, d_w, b is not None, g)
        return be.output(out, x), cache
    out2, cols = ops.conv_forward(d_x, W2, g)        # W2 @ cols: (F, N OH OW)
    out = ops.from_rows(out2, d_b, N, OH, OW)        # (N, F, OH, OW) + b
    cache = (be, cols, W2, d_w, b is not None, g)
    return be.output(out, x), cache


def conv2d_backward(dout, cache, need_dx=True):
    """Gradients of ``conv2d_forward``.

    Inputs:
    - dout: (N, F, OH, OW), upstream gradient
    - cache: from ``conv2d_forward``
    - need_dx: False skips the input gradient (the first layer of a network,
      whose input is the image: a third of the layer's backward FLOPs)

    Returns ``(dx, dw, db)``: dx (N, C, H, W) (None when not ``need_dx``),
    dw (F, C, kh, kw), db (F,) or None when the forward had no bias.

        dW = dout2 @ cols^T,  dx = col2im(W^T @ dout2),  db[f] = sum dout[:, f]
    """
    be, cols, W2, w, has_bias, g = cache
    F = W2.shape[0]
    dout = _check_dout(dout, (g.N, F, g.OH, g.OW), W2.dtype)
    ops = be.op("conv.ops")
    d_dout = be.asarray(dout)
    if isinstance(cols, WinogradCache):                      # the forward went through Winograd
        dx, dw, db = winograd.backward(d_dout, cols, g, _workspace, need_dx)
        db = db if has_bias else None
        return be.output(dx, dout), be.output(dw, dout), be.output(db, dout)

    dout2 = ops.to_rows(d_dout)                              # (F, N OH OW)
    dw = ops.like_weight(ops.matmul(dout2, cols, trans_b=True), w)
    dx = ops.conv_input_grad(W2, dout2, g) if need_dx else None   # col2im(W2^T @ dout2)
    db = ops.bias_grad(d_dout) if has_bias else None
    return be.output(dx, dout), be.output(dw, dout), be.output(db, dout)


def conv_transpose2d_forward(x, w, b, stride=2, padding=0):
    """2-D transposed convolution ("deconvolution"), the adjoint of conv2d.

        out = col2im(W^T @ x2) + b,  W = w.reshape(C_in, C_out kh kw),
        x2[c, (n, h, v)] = x[n, c, h, v]

    i.e. each input pixel adds ``x[n, c, h, v] * w[c, :, :, :]`` into the
    output window at ``(h*sh - ph, v*sw - pw)``.

    Inputs:
    - x: (N, C_in, H, W), float32 or float64
    - w: (C_in, C_out, kh, kw), as in PyTorch; the dtype of x
    - b: (C_out,) or None
    - stride: int or pair (sh, sw), >= 1 (default 2)
    - padding: int or pair (ph, pw), >= 0 (cropped from each side)

    Returns ``(out, cache)``: out is (N, C_out, H_out, W_out) with
    ``H_out = (H - 1) * sh - 2 ph + kh`` and ``W_out = (W - 1) * sw - 2 pw + kw``.
    """
    x, w, (sh, sw), (ph, pw) = _check_inputs(x, w, stride, padding,
                                             "(C_in, C_out, kh, kw)")
    N, C_in, H, W = x.shape
    C_w, C_out, kh, kw = w.shape
    if C_w != C_in:
        raise ValueError(f"w must have C_in = {C_in} input channels to match x "
                         f"{tuple(x.shape)}, got w of shape {tuple(w.shape)}")
    b = _check_bias(b, C_out, x, "C_out")
    H_out = (H - 1) * sh - 2 * ph + kh
    W_out = (W - 1) * sw - 2 * pw + kw
    if H_out < 1 or W_out < 1 or N == 0 or C_in == 0 or H == 0 or W == 0:
        raise ValueError(f"conv_transpose2d output would be empty: x {tuple(x.shape)} with "
                         f"kernel ({kh}, {kw}), stride ({sh}, {sw}), padding ({ph}, {pw})")
    # The convolution from the output back to x: image (H_out, W_out), grid (H, W).
    g = Geometry(N, C_out, H_out, W_out, kh, kw, sh, sw, ph, pw, H, W)
    be = current_backend()
    ops = be.op("conv.ops")
    d_x, d_w, d_b = be.asarray(x), be.asarray(w), be.asarray(b)

    x2 = ops.to_rows(d_x)                            # (C_in, N H W)
    W2 = ops.weight_matrix(d_w)                      # (C_in, C_out kh kw)
    cols = ops.temp_matmul(W2, x2, trans_a=True)     # (C_out kh kw, N H W)
    out = ops.col2im(cols, g)                        # (N, C_out, H_out, W_out)
    if b is not None:
        ops.add_bias(out, d_b)
    cache = (be, x2, W2, d_w, b is not None, g)
    return be.output(out, x), cache


def conv_transpose2d_backward(dout, cache):
    """Gradients of ``conv_transpose2d_forward``.

    Inputs:
    - dout: (N, C_out, H_out, W_out), upstream gradient
    - cache: from ``conv_transpose2d_forward``

    Returns ``(dx, dw, db)``: dx (N, C_in, H, W), dw (C_in, C_out, kh, kw),
    db (C_out,) or None when the forward had no bias.

        dcols = im2col(dout),  dx2 = W @ dcols,  dW = x2 @ dcols^T
    """
    be, x2, W2, w, has_bias, g = cache
    dout = _check_dout(dout, (g.N, g.C, g.H, g.W), W2.dtype)
    ops = be.op("conv.ops")
    d_dout = be.asarray(dout)

    dcols = ops.im2col(d_dout, g)                            # (C_out kh kw, N H W)
    dx = ops.from_rows(ops.matmul(W2, dcols), None, g.N, g.OH, g.OW)
    dw = ops.like_weight(ops.matmul(x2, dcols, trans_b=True), w)
    db = ops.bias_grad(d_dout) if has_bias else None
    return be.output(dx, dout), be.output(dw, dout), be.output(db, dout)
