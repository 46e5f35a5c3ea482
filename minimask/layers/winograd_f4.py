r"""Winograd's F(4x4, 3x3): the same layer as ``winograd.py`` with larger
tiles - a 4x4 output tile from a 6x6 input tile in 36 multiplies, against
144 done directly and 64 for four F(2x2, 3x3) tiles.

In one dimension, four outputs of a 3-tap correlation from six inputs,
``y = A^T [(G g) * (B^T d)]``, with the matrices of Lavin and Gray (2016)
(interpolation points 0, 1, -1, 2, -2 and infinity):

    B^T = [[4,  0, -5,  0, 1, 0],     G = [[ 1/4,    0,    0],
           [0, -4, -4,  1, 1, 0],          [-1/6, -1/6, -1/6],
           [0,  4, -4, -1, 1, 0],          [-1/6,  1/6, -1/6],
           [0, -2, -1,  2, 1, 0],          [1/24, 1/12,  1/6],
           [0,  2, -1, -2, 1, 0],          [1/24,-1/12,  1/6],
           [0,  4,  0, -5, 0, 1]]          [   0,    0,    1]]

    A^T = [[1, 1,  1, 1,  1, 0],
           [0, 1, -1, 2, -2, 0],
           [0, 1,  1, 4,  4, 0],
           [0, 1, -1, 8, -8, 1]]

Nested along both axes, exactly as (W1) of ``winograd.py``:

    Y = A^T [ (G g G^T) * (B^T d B) ] A                                  (W4)

and the layer is (W2) with 36 planes instead of 16: U (36, F, C), V (36,
C, T), 36 multiplies of (F x C)(C x T), T = N ceil(OH / 4) ceil(OW / 4).
36 * 2 F C T = 4.5 F C N OH OW FLOPs, against 8 for F(2x2, 3x3) and 18
for im2col: 0.56 of F(2x2)'s multiplies, a quarter of im2col's. The
backward is the adjoint of each stage, as there.

The price is round-off. The larger points (2, -2: the 8 in A^T, the 1/24 in
G) make the transforms sum numbers of more different sizes, so in float32
the output differs from an exact convolution by more than F(2x2)'s does:
measured, 64 -> 64 channels on unit-variance inputs, 1.7e-6 relative (RMS)
and 5.5e-6 of the largest output at most, against 2.6e-7 and 2.9e-7 for
F(2x2) (7 and 19 times); in float64, 1e-14. cuDNN and oneDNN use this tile
size for float32 training.
The filter transform and its adjoint compute in float64 whatever the
dtype (their fractions are not exact in float32, and they are F C tiles,
not N C tiles).

What is here, as in ``winograd.py``: ``transform_matrices``,
``winograd_conv2d_numpy`` and ``winograd_conv2d_backward_numpy`` (the NumPy
reference), the Numba kernels (parallel over channels, or (n, c) planes
for the scatter-add of dx), and ``STAGES``: those kernels in the calls of
F(2x2)'s, which ``winograd.forward`` / ``winograd.backward`` drive when
``winograd.tile_for`` picks 4x4 tiles. The layer's driver, the multiplies,
the plane buffers and the thread rule are ``winograd.py``'s.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from minimask import _threads
from minimask._threads import parallel_kernel
from minimask.layers import winograd

PLANES = 36     # the 6 x 6 positions of an input tile
TILE = 4        # outputs per tile along each axis


# ----------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------

def transform_matrices(dtype=np.float64):
    """``(BT, G, AT)`` of F(4x4, 3x3): shapes (6, 6), (6, 3), (4, 6)."""
    BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                   [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=dtype)
    G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=dtype)
    AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                   [0, 1, -1, 8, -8, 1]], dtype=dtype)
    return BT, G, AT


def tiles_of(OH, OW):
    """Tiles per image along each axis: ``(ceil(OH / 4), ceil(OW / 4))``."""
    return winograd.tiles_of(OH, OW, TILE)


def input_tiles_numpy(x, ph, pw):
    """``d[n, c, ty, tx]``: the 6x6 input tiles, (N, C, TH, TW, 6, 6), read
    from x padded with zeros; neighbouring tiles overlap by 2 pixels
    (``winograd.input_tiles_numpy`` with m = 4)."""
    return winograd.input_tiles_numpy(x, ph, pw, TILE)


def winograd_conv2d_numpy(x, w, b=None, padding=1):
    """(W4) and (W2) in NumPy: ``conv2d(x, w, b, stride=1, padding)`` for a
    3x3 ``w``. Returns ``(out, (U, V))`` with U (36, F, C) and V (36, C, T).
    The stages are ``winograd.tiled_conv2d_numpy``'s, with this module's
    matrices."""
    return winograd.tiled_conv2d_numpy(x, w, b, padding, transform_matrices())


def winograd_conv2d_backward_numpy(dout, x_shape, U, V, padding=1):
    """The adjoints of (W4)-(W2) in NumPy: ``(dx, dw, db)``."""
    return winograd.tiled_conv2d_backward_numpy(dout, x_shape, U, V, padding,
                                                transform_matrices())


# ----------------------------------------------------------------------
# Numba kernels: the transforms written out for F(4x4, 3x3)
# ----------------------------------------------------------------------
#
# Each 2-D transform is a 1-D one applied to every column of the tile and
# then to every row of the result (X -> M X, then -> (M X) M^T). The 1-D
# ones take their integer factors as arguments of the array's dtype (``k``,
# from ``_constants``): a Python literal would make Numba compute a float32
# tile in float64.

_CONSTANTS = {}


def _constants(dtype):
    """``(2, 4, 5, 8)`` as an array of ``dtype``, for the kernels."""
    dtype = np.dtype(dtype)
    if dtype not in _CONSTANTS:
        _CONSTANTS[dtype] = np.array([2, 4, 5, 8], dtype=dtype)
    return _CONSTANTS[dtype]


@njit(inline="always", cache=True)
def _bt(d0, d1, d2, d3, d4, d5, two, four, five):
    """B^T times a 6-vector."""
    return (four * d0 - five * d2 + d4,
            (d3 + d4) - four * (d1 + d2),
            (d4 - d3) + four * (d1 - d2),
            (d4 - d2) + two * (d3 - d1),
            (d4 - d2) - two * (d3 - d1),
            four * d1 - five * d3 + d5)


@njit(inline="always", cache=True)
def _b(v0, v1, v2, v3, v4, v5, two, four, five):
    """B times a 6-vector (the adjoint of ``_bt``)."""
    return (four * v0,
            four * (v2 - v1) + two * (v4 - v3) + four * v5,
            -five * v0 - four * (v1 + v2) - (v3 + v4),
            (v1 - v2) + two * (v3 - v4) - five * v5,
            v0 + (v1 + v2) + (v3 + v4),
            v5)


@njit(inline="always", cache=True)
def _at(m0, m1, m2, m3, m4, m5, two, four, eight):
    """A^T times a 6-vector."""
    a, b, c, d = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return m0 + a + c, b + two * d, a + four * c, b + eight * d + m5


@njit(inline="always", cache=True)
def _a(y0, y1, y2, y3, two, four, eight):
    """A times a 4-vector (the adjoint of ``_at``)."""
    return (y0,
            (y0 + y2) + (y1 + y3),
            (y0 + y2) - (y1 + y3),
            (y0 + four * y2) + (two * y1 + eight * y3),
            (y0 + four * y2) - (two * y1 + eight * y3),
            y3)


# G's fractions, as float64 factors (a multiply; a division is 5-10x slower)
_SIXTH, _TWELFTH, _TWENTYFOURTH = 1.0 / 6.0, 1.0 / 12.0, 1.0 / 24.0


@njit(inline="always", cache=True)
def _g(w0, w1, w2):
    """G times a 3-vector (in float64: the factors are Python floats)."""
    even, odd = w0 + w2, w1
    return (w0 * 0.25, -(even + odd) * _SIXTH, -(even - odd) * _SIXTH,
            (w0 * _TWENTYFOURTH + w2 * _SIXTH) + w1 * _TWELFTH,
            (w0 * _TWENTYFOURTH + w2 * _SIXTH) - w1 * _TWELFTH, w2)


@njit(inline="always", cache=True)
def _gt(u0, u1, u2, u3, u4, u5):
    """G^T times a 6-vector (the adjoint of ``_g``)."""
    return (u0 * 0.25 - (u1 + u2) * _SIXTH + (u3 + u4) * _TWENTYFOURTH,
            (u2 - u1) * _SIXTH + (u3 - u4) * _TWELFTH,
            (u3 + u4 - u1 - u2) * _SIXTH + u5)


def _tile_work(*args):
    """The thread rule's work measure for the tile transforms: four times
    the elements of their arrays - a 6x6 tile takes about 4.7 operations
    per transformed value, against 2 for F(2x2, 3x3)'s 4x4 tile, whose
    kernels count twice their elements (``winograd._tile_work``)."""
    return 4 * _threads.array_elements(args)


@parallel_kernel(work=_tile_work)
def _input_transform_cpu(xpad, V, TH, TW, k):
    """V[xi, c T + t] = (B^T d[c, t] B)[xi], d the 6x6 tile of ``xpad`` at
    (4 ty, 4 tx); ``xpad`` is (N, C, 4 TH + 2, 4 TW + 2), zero-padded, and
    ``V`` the (36, P) buffer behind ``winograd.planes``. ``k``: ``_constants``."""
    N, C = xpad.shape[0], xpad.shape[1]
    T = N * TH * TW
    two, four, five = k[0], k[1], k[2]
    for c in prange(C):
        for n in range(N):
            for ty in range(TH):
                h = 4 * ty
                t0 = c * T + (n * TH + ty) * TW
                for tx in range(TW):
                    v = 4 * tx
                    t = t0 + tx
                    # B^T d: each of the tile's 6 columns
                    c0 = _bt(xpad[n, c, h, v], xpad[n, c, h + 1, v], xpad[n, c, h + 2, v],
                             xpad[n, c, h + 3, v], xpad[n, c, h + 4, v], xpad[n, c, h + 5, v],
                             two, four, five)
                    c1 = _bt(xpad[n, c, h, v + 1], xpad[n, c, h + 1, v + 1],
                             xpad[n, c, h + 2, v + 1], xpad[n, c, h + 3, v + 1],
                             xpad[n, c, h + 4, v + 1], xpad[n, c, h + 5, v + 1], two, four, five)
                    c2 = _bt(xpad[n, c, h, v + 2], xpad[n, c, h + 1, v + 2],
                             xpad[n, c, h + 2, v + 2], xpad[n, c, h + 3, v + 2],
                             xpad[n, c, h + 4, v + 2], xpad[n, c, h + 5, v + 2], two, four, five)
                    c3 = _bt(xpad[n, c, h, v + 3], xpad[n, c, h + 1, v + 3],
                             xpad[n, c, h + 2, v + 3], xpad[n, c, h + 3, v + 3],
                             xpad[n, c, h + 4, v + 3], xpad[n, c, h + 5, v + 3], two, four, five)
                    c4 = _bt(xpad[n, c, h, v + 4], xpad[n, c, h + 1, v + 4],
                             xpad[n, c, h + 2, v + 4], xpad[n, c, h + 3, v + 4],
                             xpad[n, c, h + 4, v + 4], xpad[n, c, h + 5, v + 4], two, four, five)
                    c5 = _bt(xpad[n, c, h, v + 5], xpad[n, c, h + 1, v + 5],
                             xpad[n, c, h + 2, v + 5], xpad[n, c, h + 3, v + 5],
                             xpad[n, c, h + 4, v + 5], xpad[n, c, h + 5, v + 5], two, four, five)
                    # (B^T d) B: each of its 6 rows
                    for i in range(6):
                        V[6 * i, t], V[6 * i + 1, t], V[6 * i + 2, t], V[6 * i + 3, t], \
                            V[6 * i + 4, t], V[6 * i + 5, t] = _bt(c0[i], c1[i], c2[i], c3[i],
                                                                   c4[i], c5[i], two, four, five)


@parallel_kernel(work=_tile_work)
def _output_transform_cpu(M, b, has_bias, out, k):
    """out[n, f, 4 ty + a, 4 tx + b] = (A^T M[:, f T + t] A)[a, b] + b[f]; ``out``
    is (N, F, 4 TH, 4 TW) (the caller crops tiles that overhang the border),
    ``M`` the (36, P) buffer behind ``winograd.planes``."""
    N, F, OH4, OW4 = out.shape
    TH, TW = OH4 // 4, OW4 // 4
    T = N * TH * TW
    two, four, eight = k[0], k[1], k[3]
    for f in prange(F):
        shift = b[f] if has_bias else M[0, 0] * 0
        for n in range(N):
            for ty in range(TH):
                h = 4 * ty
                t0 = f * T + (n * TH + ty) * TW
                for tx in range(TW):
                    v = 4 * tx
                    t = t0 + tx
                    # A^T M: each of the 6 columns of the 6x6 tile, to 4 rows
                    s0 = _at(M[0, t], M[6, t], M[12, t], M[18, t], M[24, t], M[30, t],
                             two, four, eight)
                    s1 = _at(M[1, t], M[7, t], M[13, t], M[19, t], M[25, t], M[31, t],
                             two, four, eight)
                    s2 = _at(M[2, t], M[8, t], M[14, t], M[20, t], M[26, t], M[32, t],
                             two, four, eight)
                    s3 = _at(M[3, t], M[9, t], M[15, t], M[21, t], M[27, t], M[33, t],
                             two, four, eight)
                    s4 = _at(M[4, t], M[10, t], M[16, t], M[22, t], M[28, t], M[34, t],
                             two, four, eight)
                    s5 = _at(M[5, t], M[11, t], M[17, t], M[23, t], M[29, t], M[35, t],
                             two, four, eight)
                    # (A^T M) A: each of its 4 rows, to 4 outputs
                    for i in range(4):
                        y0, y1, y2, y3 = _at(s0[i], s1[i], s2[i], s3[i], s4[i], s5[i],
                                             two, four, eight)
                        out[n, f, h + i, v] = y0 + shift
                        out[n, f, h + i, v + 1] = y1 + shift
                        out[n, f, h + i, v + 2] = y2 + shift
                        out[n, f, h + i, v + 3] = y3 + shift


@parallel_kernel(work=_tile_work)
def _output_adjoint_cpu(dout, dM, db, k):
    """dM[:, f T + t] = A dY A^T, dY the 4x4 tile of ``dout`` at (4 ty, 4 tx),
    and db[f] = sum of dout[:, f] on the way. ``dout`` is (N, F, 4 TH, 4 TW)
    (the caller pads it with zeros to whole tiles), ``dM`` the (36, P)
    buffer behind ``winograd.planes``."""
    N, F, OH4, OW4 = dout.shape
    TH, TW = OH4 // 4, OW4 // 4
    T = N * TH * TW
    two, four, eight = k[0], k[1], k[3]
    for f in prange(F):
        total = dout[0, 0, 0, 0] * 0
        for n in range(N):
            for ty in range(TH):
                h = 4 * ty
                t0 = f * T + (n * TH + ty) * TW
                for tx in range(TW):
                    v = 4 * tx
                    t = t0 + tx
                    # A dY: each of dY's 4 columns, to 6 rows
                    a0 = _a(dout[n, f, h, v], dout[n, f, h + 1, v], dout[n, f, h + 2, v],
                            dout[n, f, h + 3, v], two, four, eight)
                    a1 = _a(dout[n, f, h, v + 1], dout[n, f, h + 1, v + 1],
                            dout[n, f, h + 2, v + 1], dout[n, f, h + 3, v + 1], two, four, eight)
                    a2 = _a(dout[n, f, h, v + 2], dout[n, f, h + 1, v + 2],
                            dout[n, f, h + 2, v + 2], dout[n, f, h + 3, v + 2], two, four, eight)
                    a3 = _a(dout[n, f, h, v + 3], dout[n, f, h + 1, v + 3],
                            dout[n, f, h + 2, v + 3], dout[n, f, h + 3, v + 3], two, four, eight)
                    for r in range(4):          # the bias gradient: the tile's 16 values
                        total += ((dout[n, f, h + r, v] + dout[n, f, h + r, v + 1])
                                  + (dout[n, f, h + r, v + 2] + dout[n, f, h + r, v + 3]))
                    # (A dY) A^T: each of its 6 rows, to 6 entries
                    for i in range(6):
                        dM[6 * i, t], dM[6 * i + 1, t], dM[6 * i + 2, t], dM[6 * i + 3, t], \
                            dM[6 * i + 4, t], dM[6 * i + 5, t] = _a(a0[i], a1[i], a2[i], a3[i],
                                                                    two, four, eight)
        db[f] = total


@parallel_kernel(work=_tile_work)
def _input_adjoint_cpu(dV, dx, ph, pw, TH, TW, k):
    """dx = sum over tiles of B dV[:, c T + t] B^T, added where the tile was
    read, the padding then dropped. Parallel over (n, c) planes, each into
    its own padded scratch plane, so overlapping tiles never race."""
    N, C, H, W = dx.shape
    T = N * TH * TW
    two, four, five = k[0], k[1], k[2]
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        plane = np.zeros((4 * TH + 2, 4 * TW + 2), dtype=dx.dtype)
        for ty in range(TH):
            h = 4 * ty
            t0 = c * T + (n * TH + ty) * TW
            for tx in range(TW):
                v = 4 * tx
                t = t0 + tx
                # B dV: each of the 6 columns of the 6x6
                e0 = _b(dV[0, t], dV[6, t], dV[12, t], dV[18, t], dV[24, t], dV[30, t],
                        two, four, five)
                e1 = _b(dV[1, t], dV[7, t], dV[13, t], dV[19, t], dV[25, t], dV[31, t],
                        two, four, five)
                e2 = _b(dV[2, t], dV[8, t], dV[14, t], dV[20, t], dV[26, t], dV[32, t],
                        two, four, five)
                e3 = _b(dV[3, t], dV[9, t], dV[15, t], dV[21, t], dV[27, t], dV[33, t],
                        two, four, five)
                e4 = _b(dV[4, t], dV[10, t], dV[16, t], dV[22, t], dV[28, t], dV[34, t],
                        two, four, five)
                e5 = _b(dV[5, t], dV[11, t], dV[17, t], dV[23, t], dV[29, t], dV[35, t],
                        two, four, five)
                # (B dV) B^T: each of its 6 rows, added into the tile's pixels
                for i in range(6):
                    k0, k1, k2, k3, k4, k5 = _b(e0[i], e1[i], e2[i], e3[i], e4[i], e5[i],
                                                two, four, five)
                    plane[h + i, v] += k0
                    plane[h + i, v + 1] += k1
                    plane[h + i, v + 2] += k2
                    plane[h + i, v + 3] += k3
                    plane[h + i, v + 4] += k4
                    plane[h + i, v + 5] += k5
        for h in range(H):
            for v in range(W):
                dx[n, c, h, v] = plane[h + ph, v + pw]


@parallel_kernel
def _filter_transform_cpu(w, U):
    """U[:, f C + c] = G w[f, c] G^T, its 6x6 entries row by row (in float64,
    stored in U's dtype; ``U`` the (36, P) buffer behind ``winograd.planes``)."""
    F, C = w.shape[0], w.shape[1]
    for f in prange(F):
        for c in range(C):
            j = f * C + c
            # G w: each of the 3 columns of w, to 6 rows
            a0 = _g(np.float64(w[f, c, 0, 0]), np.float64(w[f, c, 1, 0]), np.float64(w[f, c, 2, 0]))
            a1 = _g(np.float64(w[f, c, 0, 1]), np.float64(w[f, c, 1, 1]), np.float64(w[f, c, 2, 1]))
            a2 = _g(np.float64(w[f, c, 0, 2]), np.float64(w[f, c, 1, 2]), np.float64(w[f, c, 2, 2]))
            # (G w) G^T: each of its 6 rows, to 6 entries
            for i in range(6):
                U[6 * i, j], U[6 * i + 1, j], U[6 * i + 2, j], U[6 * i + 3, j], \
                    U[6 * i + 4, j], U[6 * i + 5, j] = _g(a0[i], a1[i], a2[i])


@parallel_kernel
def _filter_adjoint_cpu(dU, dw):
    """dw[f, c] = G^T dU[:, f C + c] G (in float64, stored in dw's dtype)."""
    F, C = dw.shape[0], dw.shape[1]
    for f in prange(F):
        for c in range(C):
            j = f * C + c
            # G^T dU: each of the 6 columns of dU, to 3 rows
            b0 = _gt(np.float64(dU[0, j]), np.float64(dU[6, j]), np.float64(dU[12, j]),
                     np.float64(dU[18, j]), np.float64(dU[24, j]), np.float64(dU[30, j]))
            b1 = _gt(np.float64(dU[1, j]), np.float64(dU[7, j]), np.float64(dU[13, j]),
                     np.float64(dU[19, j]), np.float64(dU[25, j]), np.float64(dU[31, j]))
            b2 = _gt(np.float64(dU[2, j]), np.float64(dU[8, j]), np.float64(dU[14, j]),
                     np.float64(dU[20, j]), np.float64(dU[26, j]), np.float64(dU[32, j]))
            b3 = _gt(np.float64(dU[3, j]), np.float64(dU[9, j]), np.float64(dU[15, j]),
                     np.float64(dU[21, j]), np.float64(dU[27, j]), np.float64(dU[33, j]))
            b4 = _gt(np.float64(dU[4, j]), np.float64(dU[10, j]), np.float64(dU[16, j]),
                     np.float64(dU[22, j]), np.float64(dU[28, j]), np.float64(dU[34, j]))
            b5 = _gt(np.float64(dU[5, j]), np.float64(dU[11, j]), np.float64(dU[17, j]),
                     np.float64(dU[23, j]), np.float64(dU[29, j]), np.float64(dU[35, j]))
            # (G^T dU) G: each of its 3 rows, to 3 entries
            for i in range(3):
                dw[f, c, i, 0], dw[f, c, i, 1], dw[f, c, i, 2] = _gt(b0[i], b1[i], b2[i],
                                                                     b3[i], b4[i], b5[i])


# ----------------------------------------------------------------------
# The layer on the "cpu" backend: winograd.forward / backward with these stages
# ----------------------------------------------------------------------
#
# The tile kernels above take the integer factors as a last argument; these
# wrappers give them the calls of F(2x2)'s kernels (``winograd.Stages``).

def _input_transform(xpad, V, TH, TW):
    _input_transform_cpu(xpad, V, TH, TW, _constants(xpad.dtype))


def _output_transform(M, b, has_bias, out):
    _output_transform_cpu(M, b, has_bias, out, _constants(out.dtype))


def _output_adjoint(dout, dM, db):
    _output_adjoint_cpu(dout, dM, db, _constants(dout.dtype))


def _input_adjoint(dV, dx, ph, pw, TH, TW):
    _input_adjoint_cpu(dV, dx, ph, pw, TH, TW, _constants(dx.dtype))


STAGES = winograd.Stages(TILE, _filter_transform_cpu, _input_transform, _output_transform,
                         _output_adjoint, _input_adjoint, _filter_adjoint_cpu)
