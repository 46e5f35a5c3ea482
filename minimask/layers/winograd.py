r"""Winograd's minimal filtering, F(2x2, 3x3): a 3x3 stride-1 convolution in
16 small matrix multiplies instead of one big one with 2.25x the FLOPs.

Lavin and Gray ("Fast Algorithms for Convolutional Neural Networks", 2016)
brought Winograd's 1980 result to CNNs; cuDNN, oneDNN and NNPACK use it for
3x3 layers. The idea, in one dimension first: two outputs of a 3-tap
correlation,

    y0 = d0 g0 + d1 g1 + d2 g2,     y1 = d1 g0 + d2 g1 + d3 g2,

take 6 multiplies done directly, but only 4 this way:

    m0 = (d0 - d2) g0                 m1 = (d1 + d2) (g0 + g1 + g2) / 2
    m3 = (d1 - d3) g2                 m2 = (d2 - d1) (g0 - g1 + g2) / 2
    y0 = m0 + m1 + m2,                y1 = m1 - m2 - m3.

In matrices, ``y = A^T [(G g) * (B^T d)]`` with ``*`` element by element:

    B^T = [[1,  0, -1,  0],     G = [[1,    0,   0],     A^T = [[1, 1,  1,  0],
           [0,  1,  1,  0],          [1/2, 1/2, 1/2],            [0, 1, -1, -1]]
           [0, -1,  1,  0],          [1/2,-1/2, 1/2],
           [0,  1,  0, -1]]          [0,    0,   1]]

Nesting it along both axes gives a 2x2 output tile from a 4x4 input tile d
(the tiles overlap by 2 pixels) and the 3x3 filter g:

    Y = A^T [ (G g G^T) * (B^T d B) ] A                                  (W1)

16 multiplies for 4 outputs, against 36. A convolution sums this over the
input channels, and the sum can be taken before the (linear) output
transform. Number the 16 positions of a 4x4 tile by xi, the tiles by t =
(n, ty, tx), and write

    U[xi, f, c] = (G w[f, c] G^T)[xi]        the filter transform    (16, F, C)
    V[xi, c, t] = (B^T d[c, t] B)[xi]        the input transform     (16, C, T)
    M[xi] = U[xi] @ V[xi]                    16 matrix multiplies    (16, F, T)
    y[n, f, tile t] = A^T M[:, f, t] A + b[f]  the output transform      (W2)

so the FLOPs sit in 16 multiplies of (F x C) by (C x T), where T = N *
ceil(OH / 2) * ceil(OW / 2): 16 * 2 F C T = 8 F C N OH OW, against
18 F C N OH OW for im2col's one multiply (``conv.py``).

Backward. Every stage of (W2) is linear, so the gradient of each is its
adjoint (transpose), taken in reverse order:

    dM[:, f, t] = A dY[f, t] A^T             2x2 -> 4x4 (a tile cut by the
                                              border gets zeros there)
    dU[xi] = dM[xi] @ V[xi]^T                dV[xi] = U[xi]^T @ dM[xi]
    dw[f, c] = G^T dU[:, f, c] G             4x4 -> 3x3
    dx += B dV[:, c, t] B^T                  each 4x4 tile added back where
                                              it was read (tiles overlap)
    db[f] = sum of dY[:, f]

The same 16 multiplies, three times: the whole layer costs 8/18 = 0.44 of
im2col's FLOPs, forward and backward. This is the exact gradient of (W2),
which computes the convolution exactly in real arithmetic; in floating point
the sums run in another order (and go through ``G``'s halves), so the
results differ from im2col's by round-off: float64 ~1e-15, float32 ~1e-6
relative.

What is here:

* ``transform_matrices``, ``winograd_conv2d_numpy`` and
  ``winograd_conv2d_backward_numpy``: (W1)-(W2) and their adjoints in plain
  NumPy, the readable reference (``tiled_conv2d_numpy`` and its backward
  do the work for any tile's matrices; ``winograd_f4.py`` calls them too).
* Numba kernels for the transforms (``"cpu"`` backend), each written out
  for F(2x2, 3x3) with the matrices above, parallel over channels (or over
  (n, c) planes for the scatter-add of ``dx``, so no two iterations write
  one element), and the 16 multiplies through BLAS; with more than one
  thread the 16 are shared out between threads, each multiply on one.
* ``tile_for``: larger maps take F(4x4, 3x3) instead (``winograd_f4.py``:
  6x6 input tiles, 36 multiplies, 0.56 of these FLOPs, 7 times this
  float32 round-off on average and up to 19 times at most); ``forward``
  hands them over, and ``backward`` follows whatever tiles its forward
  took (U's 16 or 36 planes).
* ``forward`` / ``backward``: what ``conv2d_forward`` / ``conv2d_backward``
  call on the ``"cpu"`` backend when ``applies(geometry)``: a 3x3 kernel,
  stride 1, at least ``MIN_CHANNELS`` input channels and ``MIN_POSITIONS``
  output positions, algorithm ``"auto"``
  (few output channels are fine: 64 -> 1 measured 1.27 ms against 1.38 for
  im2col).
  ``set_algorithm("im2col")`` (or ``MINIMASK_CONV=im2col`` in the
  environment) turns it off; ``algorithm("im2col")`` does so for a
  ``with`` block; ``"f2x2"`` keeps Winograd with 2x2 tiles only.
"""
from __future__ import annotations

import contextlib
import os
from collections import namedtuple

import numpy as np
from numba import njit, prange

from minimask import _blas, _threads
from minimask._threads import parallel_kernel

# ----------------------------------------------------------------------
# When it is used
# ----------------------------------------------------------------------

ALGORITHMS = ("auto", "f2x2", "im2col")
_algorithm = os.environ.get("MINIMASK_CONV", "auto").strip().lower() or "auto"
if _algorithm not in ALGORITHMS:
    raise ValueError(f"MINIMASK_CONV must be one of {ALGORITHMS}, got {_algorithm!r}")

# Fewer input channels than this and the 16 multiplies are too thin to run
# at BLAS speed (the 3-channel stem: K = 3); im2col then.
MIN_CHANNELS = 8

# Fewer output positions (N OH OW) than this and the fixed costs win: the
# filter transform and its adjoint (F C of them), 16 multiplies too small
# for BLAS speed, whole tiles for a 1x1 or 2x2 map. Measured (fwd + bwd,
# float32, one thread, 3x3 C -> C): at 16 positions Winograd took 1.17-1.8x
# im2col's time, at 64 positions 0.83-0.90x, at 256 0.60-0.65x, at 4096
# 0.48-0.55x (C = 64 and 256).
MIN_POSITIONS = 64

# "auto" takes F(4x4, 3x3) (``winograd_f4.py``: 0.56 of F(2x2)'s multiply
# FLOPs, 7-19x its float32 round-off) from an output of F4_MIN_SIZE on each
# side and F4_MIN_POSITIONS output positions (N OH OW) up; below, F(2x2,
# 3x3), whose filter transform (F C tiles of 16, not 36) and smaller tiles
# cost less on a small map. Measured (fwd + bwd, float32, 1 / 2 threads,
# time F(4x4) / F(2x2)): 4 x 64 x 8 x 8 0.99 / 1.02; 1 x 256 x 16 x 16
# 1.11 / 1.04; 4 x 64 x 16 x 16 0.78 / 0.94; 1 x 256 x 32 x 32 0.79 / 0.77;
# 4 x 64 x 32 x 32 0.68 / 0.76; 1 x 256 x 64 x 64 0.67 / 0.65.
F4_MIN_SIZE = 8
F4_MIN_POSITIONS = 512


def set_algorithm(name: str) -> str:
    """``"auto"`` (Winograd where ``applies``, 4x4 or 2x2 tiles by
    ``tile_for``), ``"f2x2"`` (Winograd where ``applies``, 2x2 tiles only:
    the smaller float32 round-off) or ``"im2col"`` (never); returns the
    previous setting."""
    global _algorithm
    if name not in ALGORITHMS:
        raise ValueError(f"the conv algorithm must be one of {ALGORITHMS}, got {name!r}")
    old, _algorithm = _algorithm, name
    return old


def get_algorithm() -> str:
    return _algorithm


@contextlib.contextmanager
def algorithm(name: str):
    """``with algorithm("im2col"): ...`` - the setting for a block."""
    old = set_algorithm(name)
    try:
        yield
    finally:
        set_algorithm(old)


def applies(g) -> bool:
    """Whether the ``"cpu"`` conv2d takes this geometry (``conv.Geometry``)
    through Winograd."""
    return (_algorithm in ("auto", "f2x2") and g.kh == 3 and g.kw == 3 and g.sh == 1 and g.sw == 1
            and g.C >= MIN_CHANNELS and g.N * g.OH * g.OW >= MIN_POSITIONS
            and g.ph <= 2 and g.pw <= 2)


def tile_for(g) -> int:
    """Outputs per tile side for a geometry that ``applies``: 4 (F(4x4, 3x3),
    ``winograd_f4.py``) when the algorithm is ``"auto"`` and the output is
    at least ``F4_MIN_SIZE`` on both sides with ``F4_MIN_POSITIONS``
    output positions, else 2 (F(2x2, 3x3))."""
    if (_algorithm == "auto" and min(g.OH, g.OW) >= F4_MIN_SIZE
            and g.N * g.OH * g.OW >= F4_MIN_POSITIONS):
        return 4
    return 2


# ----------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------

def transform_matrices(dtype=np.float64):
    """``(BT, G, AT)`` of F(2x2, 3x3): shapes (4, 4), (4, 3), (2, 4)."""
    BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=dtype)
    G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=dtype)
    AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=dtype)
    return BT, G, AT


def tiles_of(OH, OW, m=2):
    """Tiles per image along each axis, for tiles of m x m outputs:
    ``(ceil(OH / m), ceil(OW / m))``."""
    return -(-OH // m), -(-OW // m)


def input_tiles_numpy(x, ph, pw, m=2):
    """``d[n, c, ty, tx]``: the (m + 2) x (m + 2) input tiles, (N, C, TH, TW,
    m + 2, m + 2), starting every m pixels, read from x padded with zeros
    (``ph`` / ``pw`` on the leading side, and as many as the last tile needs
    on the trailing side). Returns ``(d, xpad)``."""
    N, C, H, W = x.shape
    OH, OW = H + 2 * ph - 2, W + 2 * pw - 2
    TH, TW = tiles_of(OH, OW, m)
    a = m + 2
    xpad = np.zeros((N, C, m * TH + 2, m * TW + 2), dtype=x.dtype)
    xpad[:, :, ph:ph + H, pw:pw + W] = x
    d = np.empty((N, C, TH, TW, a, a), dtype=x.dtype)
    for i in range(a):
        for j in range(a):
            d[..., i, j] = xpad[:, :, i:i + m * TH:m, j:j + m * TW:m]
    return d, xpad


def tiled_conv2d_numpy(x, w, b, padding, matrices):
    """(W1)-(W2) in NumPy for the tile given by ``matrices = (BT, G, AT)``
    (F(m x m, 3x3): BT (a, a), G (a, 3), AT (m, a), a = m + 2). Returns
    ``(out, (U, V))``, U (a^2, F, C) and V (a^2, C, T)."""
    ph, pw = (padding, padding) if np.isscalar(padding) else padding
    BT, G, AT = (mat.astype(x.dtype) for mat in matrices)
    m, a = AT.shape
    N, C, H, W = x.shape
    F = w.shape[0]
    OH, OW = H + 2 * ph - 2, W + 2 * pw - 2
    TH, TW = tiles_of(OH, OW, m)
    d, _ = input_tiles_numpy(x, ph, pw, m)
    U = np.einsum("ai,fcij,bj->abfc", G, w, G).reshape(a * a, F, C)          # G g G^T
    V = np.einsum("ia,nctuab,jb->ijcntu", BT, d, BT).reshape(a * a, C, N * TH * TW)
    M = np.matmul(U, V)                                                    # (a^2, F, T)
    Y = np.einsum("ai,ijfntu,bj->nftaub", AT, M.reshape(a, a, F, N, TH, TW), AT)
    out = Y.reshape(N, F, m * TH, m * TW)[:, :, :OH, :OW]
    if b is not None:
        out = out + b.reshape(1, F, 1, 1)
    return np.ascontiguousarray(out), (U, V)


def tiled_conv2d_backward_numpy(dout, x_shape, U, V, padding, matrices):
    """The adjoints of ``tiled_conv2d_numpy``'s stages: ``(dx, dw, db)``."""
    ph, pw = (padding, padding) if np.isscalar(padding) else padding
    BT, G, AT = (mat.astype(dout.dtype) for mat in matrices)
    m, a = AT.shape
    N, C, H, W = x_shape
    F, OH, OW = dout.shape[1:]
    TH, TW = tiles_of(OH, OW, m)
    dY = np.zeros((N, F, m * TH, m * TW), dtype=dout.dtype)
    dY[:, :, :OH, :OW] = dout
    dY = dY.reshape(N, F, TH, m, TW, m)
    dM = np.einsum("ai,nftaub,bj->ijfntu", AT, dY, AT).reshape(a * a, F, N * TH * TW)  # A dY A^T
    dU = np.matmul(dM, V.transpose(0, 2, 1))                          # (a^2, F, C)
    dV = np.matmul(U.transpose(0, 2, 1), dM)                          # (a^2, C, T)
    dw = np.einsum("ai,abfc,bj->fcij", G, dU.reshape(a, a, F, C), G)  # G^T dU G
    dd = np.einsum("ia,ijcntu,jb->nctuab", BT, dV.reshape(a, a, C, N, TH, TW), BT)  # B dV B^T
    dxpad = np.zeros((N, C, m * TH + 2, m * TW + 2), dtype=dout.dtype)
    for i in range(a):
        for j in range(a):
            dxpad[:, :, i:i + m * TH:m, j:j + m * TW:m] += dd[..., i, j]
    dx = np.ascontiguousarray(dxpad[:, :, ph:ph + H, pw:pw + W])
    return dx, dw, dout.sum(axis=(0, 2, 3))


def winograd_conv2d_numpy(x, w, b=None, padding=1):
    """(W1)-(W2) in NumPy: ``conv2d(x, w, b, stride=1, padding)`` for a 3x3
    ``w``. Returns ``(out, (U, V))`` with U (16, F, C) and V (16, C, T)."""
    return tiled_conv2d_numpy(x, w, b, padding, transform_matrices())


def winograd_conv2d_backward_numpy(dout, x_shape, U, V, padding=1):
    """The adjoints of (W2) in NumPy: ``(dx, dw, db)``."""
    return tiled_conv2d_backward_numpy(dout, x_shape, U, V, padding, transform_matrices())


# ----------------------------------------------------------------------
# Numba kernels: the transforms written out for F(2x2, 3x3)
# ----------------------------------------------------------------------

@njit(inline="always", cache=True)
def _bt(d0, d1, d2, d3):
    """B^T times a 4-vector."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(inline="always", cache=True)
def _b(v0, v1, v2, v3):
    """B times a 4-vector (the adjoint of ``_bt``)."""
    return v0, v1 - v2 + v3, v1 + v2 - v0, -v3


@njit(inline="always", cache=True)
def _at(m0, m1, m2, m3):
    """A^T times a 4-vector."""
    return m0 + m1 + m2, m1 - m2 - m3


@njit(inline="always", cache=True)
def _a(y0, y1):
    """A times a 2-vector (the adjoint of ``_at``)."""
    return y0, y0 + y1, y0 - y1, -y1


def _tile_work(*args):
    """The thread rule's work measure for the tile transforms: twice the
    elements of their arrays (a tile is a few dozen additions over 16
    planes). Measured, 4 x 64 x 32 x 32 (1.3M elements): 0.265 ms on one
    thread, 0.188 on two; 4 x 64 x 16 x 16 (345K): 0.068 / 0.083."""
    return 2 * _threads.array_elements(args)


@parallel_kernel(work=_tile_work)
def _input_transform_cpu(xpad, V, TH, TW):
    """V[xi, c T + t] = (B^T d[c, t] B)[xi], d the 4x4 tile of ``xpad`` at
    (2 ty, 2 tx). ``xpad`` is the input with its zero padding on (and room
    for the last tile), so no tile needs a bounds check. ``V`` is the (16,
    P) buffer behind ``planes`` (P >= C T)."""
    N, C = xpad.shape[0], xpad.shape[1]
    T = N * TH * TW
    for c in prange(C):
        for n in range(N):
            for ty in range(TH):
                h = 2 * ty
                t0 = c * T + (n * TH + ty) * TW
                for tx in range(TW):
                    v = 2 * tx
                    t = t0 + tx
                    # B^T d: the tile's 4 rows combined, one column at a time
                    r00, r10, r20, r30 = _bt(xpad[n, c, h, v], xpad[n, c, h + 1, v],
                                             xpad[n, c, h + 2, v], xpad[n, c, h + 3, v])
                    r01, r11, r21, r31 = _bt(xpad[n, c, h, v + 1], xpad[n, c, h + 1, v + 1],
                                             xpad[n, c, h + 2, v + 1], xpad[n, c, h + 3, v + 1])
                    r02, r12, r22, r32 = _bt(xpad[n, c, h, v + 2], xpad[n, c, h + 1, v + 2],
                                             xpad[n, c, h + 2, v + 2], xpad[n, c, h + 3, v + 2])
                    r03, r13, r23, r33 = _bt(xpad[n, c, h, v + 3], xpad[n, c, h + 1, v + 3],
                                             xpad[n, c, h + 2, v + 3], xpad[n, c, h + 3, v + 3])
                    # (B^T d) B: the 4 columns of each row combined
                    V[0, t], V[1, t], V[2, t], V[3, t] = _bt(r00, r01, r02, r03)
                    V[4, t], V[5, t], V[6, t], V[7, t] = _bt(r10, r11, r12, r13)
                    V[8, t], V[9, t], V[10, t], V[11, t] = _bt(r20, r21, r22, r23)
                    V[12, t], V[13, t], V[14, t], V[15, t] = _bt(r30, r31, r32, r33)


@parallel_kernel(work=_tile_work)
def _output_transform_cpu(M, b, has_bias, out):
    """out[n, f, 2 ty + a, 2 tx + b] = (A^T M[:, f T + t] A)[a, b] + b[f]. ``out``
    is (N, F, 2 TH, 2 TW): the caller crops a last row or column of tiles
    that passes the border. ``M`` is the (16, P) buffer behind ``planes``."""
    N, F, OH2, OW2 = out.shape
    TH, TW = OH2 // 2, OW2 // 2
    T = N * TH * TW
    for f in prange(F):
        shift = b[f] if has_bias else M[0, 0] * 0
        for n in range(N):
            for ty in range(TH):
                h = 2 * ty
                t0 = f * T + (n * TH + ty) * TW
                for tx in range(TW):
                    v = 2 * tx
                    t = t0 + tx
                    # A^T M: the 4 rows of the 4x4 tile combined, per column
                    s00, s10 = _at(M[0, t], M[4, t], M[8, t], M[12, t])
                    s01, s11 = _at(M[1, t], M[5, t], M[9, t], M[13, t])
                    s02, s12 = _at(M[2, t], M[6, t], M[10, t], M[14, t])
                    s03, s13 = _at(M[3, t], M[7, t], M[11, t], M[15, t])
                    # (A^T M) A: the 4 columns of each of its 2 rows combined
                    y00, y01 = _at(s00, s01, s02, s03)
                    y10, y11 = _at(s10, s11, s12, s13)
                    out[n, f, h, v] = y00 + shift
                    out[n, f, h, v + 1] = y01 + shift
                    out[n, f, h + 1, v] = y10 + shift
                    out[n, f, h + 1, v + 1] = y11 + shift


@parallel_kernel(work=_tile_work)
def _output_adjoint_cpu(dout, dM, db):
    """dM[:, f T + t] = A dY A^T, dY the 2x2 tile of ``dout`` at (2 ty, 2 tx),
    and on the way the bias gradient db[f] = sum of dout[:, f]. ``dout`` is
    (N, F, 2 TH, 2 TW): the caller pads it with zeros when the output has an
    odd size. ``dM`` is the (16, P) buffer behind ``planes``."""
    N, F, OH2, OW2 = dout.shape
    TH, TW = OH2 // 2, OW2 // 2
    T = N * TH * TW
    for f in prange(F):
        total = dout[0, 0, 0, 0] * 0
        for n in range(N):
            for ty in range(TH):
                h = 2 * ty
                t0 = f * T + (n * TH + ty) * TW
                for tx in range(TW):
                    v = 2 * tx
                    t = t0 + tx
                    # A dY: the 4 rows of the 4x4 from dY's 2 rows, per column
                    y00, y01 = dout[n, f, h, v], dout[n, f, h, v + 1]
                    y10, y11 = dout[n, f, h + 1, v], dout[n, f, h + 1, v + 1]
                    total += (y00 + y01) + (y10 + y11)
                    a00, a10, a20, a30 = _a(y00, y10)
                    a01, a11, a21, a31 = _a(y01, y11)
                    # (A dY) A^T: each row's 2 entries spread over 4
                    dM[0, t], dM[1, t], dM[2, t], dM[3, t] = _a(a00, a01)
                    dM[4, t], dM[5, t], dM[6, t], dM[7, t] = _a(a10, a11)
                    dM[8, t], dM[9, t], dM[10, t], dM[11, t] = _a(a20, a21)
                    dM[12, t], dM[13, t], dM[14, t], dM[15, t] = _a(a30, a31)
        db[f] = total


@njit(inline="always", cache=True)
def _add_row(plane, h, v, e0, e1, e2, e3):
    """Row ``h`` of a tile: ``B`` times the row's 4 entries, added at v .. v + 3."""
    k0, k1, k2, k3 = _b(e0, e1, e2, e3)
    plane[h, v] += k0
    plane[h, v + 1] += k1
    plane[h, v + 2] += k2
    plane[h, v + 3] += k3


@parallel_kernel(work=_tile_work)
def _input_adjoint_cpu(dV, dx, ph, pw, TH, TW):
    """dx = sum over tiles of B dV[:, c T + t] B^T, added where the tile was
    read, then the padding dropped. Parallel over (n, c) planes: a plane's
    tiles are all added by one iteration (into its own padded scratch
    plane), so the overlapping tiles never race. ``dV`` is the (16, P)
    buffer behind ``planes``."""
    N, C, H, W = dx.shape
    T = N * TH * TW
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        plane = np.zeros((2 * TH + 2, 2 * TW + 2), dtype=dx.dtype)
        for ty in range(TH):
            h = 2 * ty
            t0 = c * T + (n * TH + ty) * TW
            for tx in range(TW):
                v = 2 * tx
                t = t0 + tx
                # B dV: the 4 rows of the 4x4 combined, per column
                e00, e10, e20, e30 = _b(dV[0, t], dV[4, t], dV[8, t], dV[12, t])
                e01, e11, e21, e31 = _b(dV[1, t], dV[5, t], dV[9, t], dV[13, t])
                e02, e12, e22, e32 = _b(dV[2, t], dV[6, t], dV[10, t], dV[14, t])
                e03, e13, e23, e33 = _b(dV[3, t], dV[7, t], dV[11, t], dV[15, t])
                # (B dV) B^T, row by row, added into the tile's 16 pixels
                _add_row(plane, h, v, e00, e01, e02, e03)
                _add_row(plane, h + 1, v, e10, e11, e12, e13)
                _add_row(plane, h + 2, v, e20, e21, e22, e23)
                _add_row(plane, h + 3, v, e30, e31, e32, e33)
        for h in range(H):
            for v in range(W):
                dx[n, c, h, v] = plane[h + ph, v + pw]


@njit(inline="always", cache=True)
def _g(w0, w1, w2):
    """G times a 3-vector."""
    return w0, (w0 + w1 + w2) * 0.5, (w0 - w1 + w2) * 0.5, w2


@njit(inline="always", cache=True)
def _gt(u0, u1, u2, u3):
    """G^T times a 4-vector (the adjoint of ``_g``)."""
    return u0 + (u1 + u2) * 0.5, (u1 - u2) * 0.5, (u1 + u2) * 0.5 + u3


@parallel_kernel
def _filter_transform_cpu(w, U):
    """U[:, f C + c] = G w[f, c] G^T, its 4x4 entries row by row (``U`` the
    (16, P) buffer behind ``planes``)."""
    F, C = w.shape[0], w.shape[1]
    for f in prange(F):
        for c in range(C):
            # G w: one column of the 3x3 at a time, giving the (4, 3) product
            a0, a1, a2, a3 = _g(w[f, c, 0, 0], w[f, c, 1, 0], w[f, c, 2, 0])
            b0, b1, b2, b3 = _g(w[f, c, 0, 1], w[f, c, 1, 1], w[f, c, 2, 1])
            c0, c1, c2, c3 = _g(w[f, c, 0, 2], w[f, c, 1, 2], w[f, c, 2, 2])
            # (G w) G^T: each of its 4 rows times G^T
            U[0, f * C + c], U[1, f * C + c], U[2, f * C + c], U[3, f * C + c] = _g(a0, b0, c0)
            U[4, f * C + c], U[5, f * C + c], U[6, f * C + c], U[7, f * C + c] = _g(a1, b1, c1)
            U[8, f * C + c], U[9, f * C + c], U[10, f * C + c], U[11, f * C + c] = _g(a2, b2, c2)
            U[12, f * C + c], U[13, f * C + c], U[14, f * C + c], U[15, f * C + c] = _g(a3, b3, c3)


@parallel_kernel
def _filter_adjoint_cpu(dU, dw):
    """dw[f, c] = G^T dU[:, f C + c] G (``dU`` the (16, P) buffer behind ``planes``)."""
    F, C = dw.shape[0], dw.shape[1]
    for f in prange(F):
        for c in range(C):
            # dU G: each of the 4 rows of dU times G, giving (4, 3)
            a0, a1, a2 = _gt(dU[0, f * C + c], dU[1, f * C + c], dU[2, f * C + c], dU[3, f * C + c])
            b0, b1, b2 = _gt(dU[4, f * C + c], dU[5, f * C + c], dU[6, f * C + c], dU[7, f * C + c])
            c0, c1, c2 = _gt(dU[8, f * C + c], dU[9, f * C + c], dU[10, f * C + c], dU[11, f * C + c])
            d0, d1, d2 = _gt(dU[12, f * C + c], dU[13, f * C + c], dU[14, f * C + c], dU[15, f * C + c])
            # G^T (dU G): one column at a time
            dw[f, c, 0, 0], dw[f, c, 1, 0], dw[f, c, 2, 0] = _gt(a0, b0, c0, d0)
            dw[f, c, 0, 1], dw[f, c, 1, 1], dw[f, c, 2, 1] = _gt(a1, b1, c1, d1)
            dw[f, c, 0, 2], dw[f, c, 1, 2], dw[f, c, 2, 2] = _gt(a2, b2, c2, d2)


# ----------------------------------------------------------------------
# The 16 multiplies
# ----------------------------------------------------------------------

def batched_gemm(a, b, out, trans_a=False, trans_b=False):
    """``out[k] = op(a[k]) @ op(b[k])`` for the 16 k: ``minimask._blas.gemm_batch``,
    which shares the k out between threads, each multiply whole on one."""
    return _blas.gemm_batch(a, b, out, trans_a, trans_b)


# ----------------------------------------------------------------------
# The layer on the "cpu" backend
# ----------------------------------------------------------------------

def plane_stride(R, T, itemsize):
    """Elements from one plane of a (K, R, T) batch to the next: R T rounded
    up to a multiple of 4 KiB, plus 64 bytes."""
    return (-(-R * T * itemsize // 4096) * 4096 + 64) // itemsize


def plane_buffer(K, R, T, dtype, workspace=None, key=None):
    """The storage of K planes of (R, T): a C-contiguous (K, P) array, P =
    ``plane_stride``, from ``workspace(size, dtype, key)`` when given (kept
    between calls) or new.

    The transforms write (or read) all 16 planes at once, one element each
    per tile; planes exactly a multiple of 4 KiB apart (64 x 1024 float32,
    say) fall on the same cache sets and evict each other, which made the
    transforms 3-8x slower. The kernels index the buffer as ``[k, r T +
    t]`` (a C-contiguous array: the compiler knows the last stride is one
    element and can vectorise); BLAS gets the ``planes`` view of it."""
    dtype = np.dtype(dtype)
    P = plane_stride(R, T, dtype.itemsize)
    flat = np.empty(K * P, dtype=dtype) if workspace is None else workspace(K * P, dtype, key)
    return flat.reshape(K, P)


def planes(buffer, R, T):
    """The (K, R, T) view of a ``plane_buffer``: plane k is the row-major
    (R, T) matrix at the start of row k."""
    # explicit strides: NumPy may give a length-1 axis any stride, and BLAS
    # (minimask._blas) wants the last one to be one element
    return np.ndarray((buffer.shape[0], R, T), buffer.dtype, buffer,
                      strides=(buffer.strides[0], T * buffer.itemsize, buffer.itemsize))


# The six stage kernels of one tile size, each called the way F(2x2)'s are
# (``winograd_f4.STAGES`` wraps its kernels to the same calls), so that one
# ``forward`` / ``backward`` drives either tile.
Stages = namedtuple("Stages", "m filter_transform input_transform output_transform "
                              "output_adjoint input_adjoint filter_adjoint")
F2_STAGES = Stages(2, _filter_transform_cpu, _input_transform_cpu, _output_transform_cpu,
                   _output_adjoint_cpu, _input_adjoint_cpu, _filter_adjoint_cpu)


def stages_for(m):
    """The ``Stages`` of m x m output tiles (2 or 4)."""
    if m == 4:
        from minimask.layers import winograd_f4
        return winograd_f4.STAGES
    return F2_STAGES


def _pad_input(x, g, TH, TW, m):
    """x with its zero padding, (N, C, m TH + 2, m TW + 2): room for every tile."""
    N, C, H, W = x.shape
    xpad = np.zeros((N, C, m * TH + 2, m * TW + 2), dtype=x.dtype)
    xpad[:, :, g.ph:g.ph + H, g.pw:g.pw + W] = x
    return xpad


def forward(x, w, b, g, workspace):
    """conv2d of ``x`` (N, C, H, W) by 3x3 ``w`` (F, C, 3, 3), stride 1,
    padding ``(g.ph, g.pw)``, on the tiles ``tile_for(g)`` picks. Returns
    ``(out, (U, V))``: the cache holds the transformed weights and input
    ((m + 2)^2 planes: for 2x2 tiles 16 F C + 4 C N OH OW numbers, about 4/9
    of im2col's ``cols``). ``workspace(size, dtype, key)`` gives scratch
    arrays kept between calls (``conv._workspace``)."""
    st = stages_for(tile_for(g))
    m, K = st.m, (st.m + 2) ** 2
    N, C, H, W = x.shape
    F = w.shape[0]
    TH, TW = tiles_of(g.OH, g.OW, m)
    T = N * TH * TW
    dt = x.dtype
    Ub = plane_buffer(K, F, C, dt)
    st.filter_transform(np.ascontiguousarray(w), Ub)
    Vb = plane_buffer(K, C, T, dt)
    st.input_transform(_pad_input(x, g, TH, TW, m), Vb, TH, TW)
    Mb = plane_buffer(K, F, T, dt, workspace, "winograd.M")
    U, V = planes(Ub, F, C), planes(Vb, C, T)
    batched_gemm(U, V, planes(Mb, F, T))
    bias = b if b is not None else np.zeros(1, dtype=dt)
    out = np.empty((N, F, m * TH, m * TW), dtype=dt)
    st.output_transform(Mb, np.ascontiguousarray(bias), b is not None, out)
    if (m * TH, m * TW) != (g.OH, g.OW):    # the last tiles overhang
        out = np.ascontiguousarray(out[:, :, :g.OH, :g.OW])
    return out, (U, V)


def backward(dout, UV, g, workspace, need_dx=True):
    """``(dx, dw, db)`` of ``forward`` (dx None when not ``need_dx``), on the
    tiles the forward took (U's 16 or 36 planes); db, the sum of dout over
    (n, h, w), comes free with the first transform (the caller drops it
    when the layer has no bias)."""
    U, V = UV
    st = stages_for(4 if U.shape[0] == 36 else 2)
    m, K = st.m, U.shape[0]
    F, C = U.shape[1], U.shape[2]
    N = g.N
    TH, TW = tiles_of(g.OH, g.OW, m)
    T = N * TH * TW
    dt = dout.dtype
    if (m * TH, m * TW) == (g.OH, g.OW):
        dY = np.ascontiguousarray(dout)
    else:                                # zeros where the last tiles overhang
        dY = np.zeros((N, F, m * TH, m * TW), dtype=dt)
        dY[:, :, :g.OH, :g.OW] = dout
    dMb = plane_buffer(K, F, T, dt, workspace, "winograd.dM")
    db = np.empty(F, dtype=dt)
    st.output_adjoint(dY, dMb, db)
    dM = planes(dMb, F, T)
    dUb = plane_buffer(K, F, C, dt, workspace, "winograd.dU")
    batched_gemm(dM, V, planes(dUb, F, C), trans_b=True)
    dx = None
    if need_dx:
        dVb = plane_buffer(K, C, T, dt, workspace, "winograd.dV")
        batched_gemm(U, dM, planes(dVb, C, T), trans_a=True)
        dx = np.empty((N, C, g.H, g.W), dtype=dt)
        st.input_adjoint(dVb, dx, g.ph, g.pw, TH, TW)
    dw = np.empty((F, C, 3, 3), dtype=dt)
    st.filter_adjoint(dUb, dw)
    return dx, dw, db
