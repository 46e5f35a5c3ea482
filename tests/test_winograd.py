"""Winograd F(2x2, 3x3) (minimask/layers/winograd.py) and the threads and BLAS
calls under it (minimask._threads.run_shares, minimask._blas.gemm).

From the bottom up: the transform matrices against the direct correlation;
the NumPy reference against the definition (conv2d on the "numpy" backend);
each Numba transform kernel, serial and parallel, against its NumPy stage and
against its forward (the adjoint identity); the 16 multiplies and their
thread shares against np.matmul; the "cpu" conv2d through Winograd against
the "numpy" backend, with a gradient check; and the switch to im2col.
CPU only, tiny sizes.
"""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import minimask
from minimask import _blas, _threads
from minimask._threads import ParallelKernel
from minimask.gradcheck import check_layer
from minimask.layers import conv2d_backward, conv2d_forward, winograd
from minimask.layers.conv import Geometry, WinogradCache
from minimask.model import Config, RetinaMask
from minimask.model import modules
from minimask.model.backbone import ResNet
from minimask.model.modules import Conv2d, GroupNorm, MaxPool2d, ReLU, Sequential
# the fixtures that force the thread split and restore the settings afterwards
from tests.test_threads import thresholds, two_threads  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
TRANSPOSES = [(False, False), (False, True), (True, False), (True, True)]


@pytest.fixture(autouse=True)
def _auto_algorithm():
    """Every test starts from the default ("auto", whatever MINIMASK_CONV
    the run has) and leaves the setting as it found it."""
    old = winograd.set_algorithm("auto")
    yield
    winograd.set_algorithm(old)


@pytest.fixture(autouse=True)
def _small_maps_take_winograd_too(monkeypatch):
    """The layer takes Winograd only from ``MIN_POSITIONS`` output positions
    (below, im2col is faster); these tests use tiny maps, so the floor is 1
    here. ``test_applies_from_min_positions`` checks the floor itself."""
    monkeypatch.setattr(winograd, "MIN_POSITIONS", 1)


def _pair(padding):
    return (padding, padding) if np.isscalar(padding) else tuple(padding)


def _close(got, expect, rel):
    """max |got - expect| <= rel * max(1, max |expect|)."""
    got, expect = np.asarray(got, np.float64), np.asarray(expect, np.float64)
    assert got.shape == expect.shape, (got.shape, expect.shape)
    scale = max(1.0, float(np.abs(expect).max(initial=0.0)))
    err = float(np.abs(got - expect).max(initial=0.0))
    assert err <= rel * scale, f"max error {err:.3g} against {rel * scale:.3g}"


# ----------------------------------------------------------------------
# 2. The transform matrices
# ----------------------------------------------------------------------

def _correlate_loops(d, g):
    """Valid 2-D correlation of d (h, w) with g (kh, kw), by loops."""
    kh, kw = g.shape
    out = np.zeros((d.shape[0] - kh + 1, d.shape[1] - kw + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            for a in range(kh):
                for b in range(kw):
                    out[i, j] += d[i + a, j + b] * g[a, b]
    return out


def test_w1_on_one_tile_is_the_direct_2x2_correlation():
    rng = np.random.default_rng(0)
    BT, G, AT = winograd.transform_matrices()
    assert BT.shape == (4, 4) and G.shape == (4, 3) and AT.shape == (2, 4)
    for _ in range(5):
        d = rng.standard_normal((4, 4))
        g = rng.standard_normal((3, 3))
        Y = AT @ ((G @ g @ G.T) * (BT @ d @ BT.T)) @ AT.T                 # (W1)
        np.testing.assert_allclose(Y, _correlate_loops(d, g), rtol=0, atol=1e-13)


def test_transform_matrices_take_the_dtype():
    for dtype in (np.float32, np.float64):
        assert all(m.dtype == dtype for m in winograd.transform_matrices(dtype))


def test_the_1d_identity_of_the_docstring():
    rng = np.random.default_rng(1)
    BT, G, AT = winograd.transform_matrices()
    for _ in range(5):
        d0, d1, d2, d3 = d = rng.standard_normal(4)
        g0, g1, g2 = g = rng.standard_normal(3)
        direct = np.array([d0 * g0 + d1 * g1 + d2 * g2, d1 * g0 + d2 * g1 + d3 * g2])
        m0 = (d0 - d2) * g0
        m1 = (d1 + d2) * (g0 + g1 + g2) / 2
        m2 = (d2 - d1) * (g0 - g1 + g2) / 2
        m3 = (d1 - d3) * g2
        np.testing.assert_allclose([m0 + m1 + m2, m1 - m2 - m3], direct, rtol=0, atol=1e-13)
        # the same in matrices: y = A^T [(G g) * (B^T d)], its 4 products the m's
        np.testing.assert_allclose((G @ g) * (BT @ d), [m0, m1, m2, m3], rtol=0, atol=1e-13)
        np.testing.assert_allclose(AT @ ((G @ g) * (BT @ d)), direct, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------
# 1. The NumPy reference against the definition
# ----------------------------------------------------------------------

REFERENCE_CASES = [
    # N, C, F, H, W, padding, bias
    (1, 2, 3, 6, 6, 0, True),          # OH = OW = 4: even
    (2, 3, 2, 7, 5, 0, False),         # 5 x 3: odd
    (3, 2, 4, 5, 6, 1, True),          # 5 x 6
    (1, 3, 2, 4, 4, 1, False),         # 4 x 4
    (2, 2, 3, 3, 5, 2, True),          # 5 x 7
    (1, 2, 3, 1, 1, 2, False),         # 1 x 1 input, 3 x 3 out: tiles mostly padding
    (1, 1, 2, 1, 1, 1, True),          # 1 x 1 input
    (2, 2, 1, 2, 3, 1, True),          # 2 x 3 input
    (1, 2, 3, 5, 4, (1, 2), True),     # 5 x 6
    (2, 3, 2, 4, 3, (2, 0), False),    # 6 x 1
    (3, 2, 2, 6, 5, (0, 1), True),     # 4 x 5
]


@pytest.mark.parametrize("N, C, F, H, W, padding, bias", REFERENCE_CASES)
def test_numpy_reference_matches_the_definition(N, C, F, H, W, padding, bias):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((F, C, 3, 3))
    b = rng.standard_normal(F) if bias else None
    with minimask.using_backend("numpy"):
        expect, cache = conv2d_forward(x, w, b, 1, padding)
        dout = rng.standard_normal(expect.shape)
        dx_e, dw_e, db_e = conv2d_backward(dout, cache)
    ph, pw = _pair(padding)
    assert expect.shape == (N, F, H + 2 * ph - 2, W + 2 * pw - 2)
    out, (U, V) = winograd.winograd_conv2d_numpy(x, w, b, padding)
    TH, TW = winograd.tiles_of(*expect.shape[2:])
    assert U.shape == (16, F, C) and V.shape == (16, C, N * TH * TW)
    _close(out, expect, 1e-12)
    dx, dw, db = winograd.winograd_conv2d_backward_numpy(dout, x.shape, U, V, padding)
    _close(dx, dx_e, 1e-12)
    _close(dw, dw_e, 1e-12)
    # the reference returns the bias gradient whether or not there was a bias
    _close(db, dout.sum(axis=(0, 2, 3)), 1e-12)
    if bias:
        _close(db, db_e, 1e-12)


# ----------------------------------------------------------------------
# 3. The Numba kernels against their NumPy stages, and their adjoints
# ----------------------------------------------------------------------

# N, C, F, H, W, ph, pw: an odd output (5 x 8 -> 3 x 4 tiles), two paddings
KN, KC, KF, KH, KW, KPH, KPW = 2, 3, 4, 5, 6, 1, 2
KOH, KOW = KH + 2 * KPH - 2, KW + 2 * KPW - 2
KTH, KTW = winograd.tiles_of(KOH, KOW)
KT = KN * KTH * KTW


def _buffer(K, R, T, dtype=np.float64):
    """A ``plane_buffer`` of K planes of (R, T), the (K, P) array the layer
    hands the transform kernels, every element NaN: what a kernel leaves
    unwritten shows, and so does a read of the unused tail of a row."""
    buffer = winograd.plane_buffer(K, R, T, dtype)
    assert buffer.shape == (K, winograd.plane_stride(R, T, np.dtype(dtype).itemsize))
    buffer[...] = np.nan
    return buffer


def _planes(K, R, T, dtype=np.float64):
    """A (K, R, T) array laid out as the layer lays out V, M, dM and dV: the
    ``planes`` view of a NaN-filled ``_buffer``."""
    return winograd.planes(_buffer(K, R, T, dtype), R, T)


def _tail_untouched(buffer, R, T):
    """The columns of a buffer past the (R, T) plane are still NaN."""
    assert np.isnan(buffer[:, R * T:]).all(), "a kernel wrote past the end of a plane"


def _both(kernel, make_outputs, inputs):
    """Run a ParallelKernel's serial and parallel versions on the same
    inputs, each into fresh outputs; require them equal (NaN where both
    left an element unwritten); return one."""
    assert isinstance(kernel, ParallelKernel)
    results = []
    for version in (kernel.serial, kernel.parallel):
        outs = make_outputs()
        version(*inputs(outs))
        results.append(outs)
    for s, p in zip(*results):
        assert np.array_equal(s, p, equal_nan=True), kernel
    return results[0]


def _tile_index(n, ty, tx):
    return (n * KTH + ty) * KTW + tx


def _tiles():
    """(n, ty, tx, t) of every tile of the kernel tests' geometry."""
    for n in range(KN):
        for ty in range(KTH):
            for tx in range(KTW):
                yield n, ty, tx, _tile_index(n, ty, tx)


def _input_transform_reference(xpad):
    BT, _, _ = winograd.transform_matrices()
    V = np.empty((16, KC, KT))
    for c in range(KC):
        for n, ty, tx, t in _tiles():
            d = xpad[n, c, 2 * ty:2 * ty + 4, 2 * tx:2 * tx + 4]
            V[:, c, t] = (BT @ d @ BT.T).reshape(16)
    return V


def _input_adjoint_reference(dV):
    BT, _, _ = winograd.transform_matrices()
    dxpad = np.zeros((KN, KC, 2 * KTH + 2, 2 * KTW + 2))
    for c in range(KC):
        for n, ty, tx, t in _tiles():
            tile = dV[:, c, t].reshape(4, 4)
            dxpad[n, c, 2 * ty:2 * ty + 4, 2 * tx:2 * tx + 4] += BT.T @ tile @ BT
    return dxpad[:, :, KPH:KPH + KH, KPW:KPW + KW]


def _output_transform_reference(M, b):
    _, _, AT = winograd.transform_matrices()
    out = np.empty((KN, KF, 2 * KTH, 2 * KTW))
    for f in range(KF):
        for n, ty, tx, t in _tiles():
            tile = M[:, f, t].reshape(4, 4)
            out[n, f, 2 * ty:2 * ty + 2, 2 * tx:2 * tx + 2] = AT @ tile @ AT.T + b[f]
    return out


def _output_adjoint_reference(dY):
    _, _, AT = winograd.transform_matrices()
    dM = np.empty((16, KF, KT))
    for f in range(KF):
        for n, ty, tx, t in _tiles():
            tile = dY[n, f, 2 * ty:2 * ty + 2, 2 * tx:2 * tx + 2]
            dM[:, f, t] = (AT.T @ tile @ AT).reshape(16)
    return dM


def _pad(x):
    xpad = np.zeros((KN, KC, 2 * KTH + 2, 2 * KTW + 2))
    xpad[:, :, KPH:KPH + KH, KPW:KPW + KW] = x
    return xpad


def _input_transform(xpad):
    """V's planes (16, KC, KT) from the kernel, written into a (16, P) buffer."""
    (Vb,) = _both(winograd._input_transform_cpu, lambda: (_buffer(16, KC, KT),),
                  lambda o: (xpad, o[0], KTH, KTW))
    _tail_untouched(Vb, KC, KT)
    return winograd.planes(Vb, KC, KT)


def _input_adjoint(dVb):
    """dx from the kernel, ``dVb`` a (16, P) buffer."""
    (dx,) = _both(winograd._input_adjoint_cpu,
                  lambda: (np.full((KN, KC, KH, KW), np.nan),),
                  lambda o: (dVb, o[0], KPH, KPW, KTH, KTW))
    return dx


def _output_transform(Mb, b, has_bias):
    (out,) = _both(winograd._output_transform_cpu,
                   lambda: (np.full((KN, KF, 2 * KTH, 2 * KTW), np.nan),),
                   lambda o: (Mb, b, has_bias, o[0]))
    return out


def _output_adjoint(dY):
    """(dM's planes (16, KF, KT), db) from the kernel."""
    dMb, db = _both(winograd._output_adjoint_cpu,
                    lambda: (_buffer(16, KF, KT), np.full(KF, np.nan)),
                    lambda o: (dY, o[0], o[1]))
    _tail_untouched(dMb, KF, KT)
    return winograd.planes(dMb, KF, KT), db


def _filled_buffer(rng, K, R, T):
    """A ``_buffer`` whose planes hold random numbers (its tail stays NaN:
    a kernel that reads it spreads NaN into its output)."""
    buffer = _buffer(K, R, T)
    winograd.planes(buffer, R, T)[...] = rng.standard_normal((K, R, T))
    return buffer


def test_input_transform_kernel_is_bt_d_b_on_the_padded_tiles():
    rng = np.random.default_rng(3)
    xpad = rng.standard_normal((KN, KC, 2 * KTH + 2, 2 * KTW + 2))   # every entry read
    _close(_input_transform(xpad), _input_transform_reference(xpad), 1e-14)
    # and the reference's V of the same (padded) input, in the same layout
    x = rng.standard_normal((KN, KC, KH, KW))
    w = rng.standard_normal((KF, KC, 3, 3))
    _, (_, V_ref) = winograd.winograd_conv2d_numpy(x, w, None, (KPH, KPW))
    _close(_input_transform(_pad(x)), V_ref, 1e-14)


def test_input_adjoint_kernel_matches_its_numpy_stage():
    dVb = _filled_buffer(np.random.default_rng(4), 16, KC, KT)
    expect = _input_adjoint_reference(winograd.planes(dVb, KC, KT))
    _close(_input_adjoint(dVb), expect, 1e-14)


@pytest.mark.parametrize("has_bias", [True, False])
def test_output_transform_kernel_matches_its_numpy_stage(has_bias):
    rng = np.random.default_rng(5)
    Mb = _filled_buffer(rng, 16, KF, KT)
    b = rng.standard_normal(KF)
    expect = _output_transform_reference(winograd.planes(Mb, KF, KT),
                                         b if has_bias else np.zeros(KF))
    _close(_output_transform(Mb, b, has_bias), expect, 1e-14)


def test_output_adjoint_kernel_matches_its_numpy_stage():
    dY = np.random.default_rng(6).standard_normal((KN, KF, 2 * KTH, 2 * KTW))
    dM, db = _output_adjoint(dY)
    _close(dM, _output_adjoint_reference(dY), 1e-14)
    _close(db, dY.sum(axis=(0, 2, 3)), 1e-14)


@pytest.mark.parametrize("dtype, rel", [(np.float32, 1e-5), (np.float64, 1e-14)])
@pytest.mark.parametrize("OH, OW", [(KOH, KOW), (2 * KTH, 2 * KTW), (2 * KTH - 1, 2 * KTW - 1)])
def test_output_adjoint_kernel_gives_the_bias_gradient(OH, OW, dtype, rel):
    """db[f] = sum of dout[:, f] over (n, h, w), also when the output has an
    odd size and the caller pads dout with zeros to whole tiles (as
    ``winograd.backward`` does): the zeros change neither db nor dM."""
    assert winograd.tiles_of(OH, OW) == (KTH, KTW)
    rng = np.random.default_rng(25)
    dout = rng.standard_normal((KN, KF, OH, OW)).astype(dtype)
    dY = np.zeros((KN, KF, 2 * KTH, 2 * KTW), dtype=dtype)
    dY[:, :, :OH, :OW] = dout
    dMb = _buffer(16, KF, KT, dtype)
    db = np.full(KF, np.nan, dtype=dtype)
    for version in (winograd._output_adjoint_cpu.serial, winograd._output_adjoint_cpu.parallel,
                    winograd._output_adjoint_cpu):
        db[...] = np.nan
        version(dY, dMb, db)
        assert db.dtype == dtype
        _close(db, dout.astype(np.float64).sum(axis=(0, 2, 3)), rel)
        _close(winograd.planes(dMb, KF, KT), _output_adjoint_reference(dY.astype(np.float64)),
               rel)
        _tail_untouched(dMb, KF, KT)


def test_filter_transform_and_adjoint_kernels_match_their_numpy_stages():
    rng = np.random.default_rng(7)
    _, G, _ = winograd.transform_matrices()
    w = rng.standard_normal((KF, KC, 3, 3))
    Ub = _buffer(16, KF, KC)
    winograd._filter_transform_cpu(w, Ub)
    _tail_untouched(Ub, KF, KC)
    expect = np.stack([np.stack([(G @ w[f, c] @ G.T).reshape(16) for c in range(KC)], -1)
                       for f in range(KF)], 1)
    _close(winograd.planes(Ub, KF, KC), expect, 1e-14)
    dUb = _filled_buffer(rng, 16, KF, KC)
    dU = winograd.planes(dUb, KF, KC)
    dw = np.full((KF, KC, 3, 3), np.nan)
    winograd._filter_adjoint_cpu(dUb, dw)
    expect = np.array([[G.T @ dU[:, f, c].reshape(4, 4) @ G for c in range(KC)]
                       for f in range(KF)])
    _close(dw, expect, 1e-14)


def _assert_adjoint(x, Ax, y, ATy):
    """<A x, y> == <x, A^T y> to 1e-12 (relative to |A x| |y|)."""
    lhs = float(np.sum(np.asarray(Ax) * np.asarray(y)))
    rhs = float(np.sum(np.asarray(x) * np.asarray(ATy)))
    scale = np.linalg.norm(np.asarray(Ax)) * np.linalg.norm(np.asarray(y))
    assert abs(lhs - rhs) <= 1e-12 * scale, (lhs, rhs)


def test_input_adjoint_kernel_is_the_adjoint_of_pad_then_input_transform():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((KN, KC, KH, KW))
    yb = _filled_buffer(rng, 16, KC, KT)
    _assert_adjoint(x, _input_transform(_pad(x)), winograd.planes(yb, KC, KT), _input_adjoint(yb))


def test_output_adjoint_kernel_is_the_adjoint_of_the_output_transform():
    rng = np.random.default_rng(9)
    Mb = _filled_buffer(rng, 16, KF, KT)
    y = rng.standard_normal((KN, KF, 2 * KTH, 2 * KTW))
    Ax = _output_transform(Mb, np.zeros(KF), False)
    _assert_adjoint(winograd.planes(Mb, KF, KT), Ax, y, _output_adjoint(y)[0])


def test_filter_adjoint_kernel_is_the_adjoint_of_the_filter_transform():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((KF, KC, 3, 3))
    yb = _filled_buffer(rng, 16, KF, KC)
    Ub, dw = _buffer(16, KF, KC), np.empty((KF, KC, 3, 3))
    winograd._filter_transform_cpu(w, Ub)
    winograd._filter_adjoint_cpu(yb, dw)
    _assert_adjoint(w, winograd.planes(Ub, KF, KC), winograd.planes(yb, KF, KC), dw)


# ----------------------------------------------------------------------
# 4. The "cpu" conv2d through Winograd
# ----------------------------------------------------------------------

CPU_CASES = [
    # N, C, F, H, W, padding
    (2, 8, 9, 7, 6, 1),           # 7 x 6: odd rows, F != C
    (1, 8, 8, 6, 6, 0),           # 4 x 4
    (3, 9, 8, 3, 4, 2),           # 5 x 6
    (1, 8, 10, 5, 5, (1, 2)),     # 5 x 7
    (1, 8, 8, 1, 1, 1),           # 1 x 1 input
    (2, 8, 8, 2, 3, 1),           # 2 x 3 input
    (1, 8, 8, 3, 4, 0),           # 1 x 2: one row of tiles, half cut off
]


def _conv_both_ways(x, w, b, padding, dout):
    """(out, dx, dw, db) on the "cpu" backend (and its cache) and on the
    "numpy" backend in float64."""
    with minimask.using_backend("cpu"):
        out, cache = conv2d_forward(x, w, b, 1, padding)
        grads = conv2d_backward(dout, cache)
    up = [None if v is None else v.astype(np.float64) for v in (x, w, b, dout)]
    with minimask.using_backend("numpy"):
        ref, ref_cache = conv2d_forward(up[0], up[1], up[2], 1, padding)
        ref_grads = conv2d_backward(up[3], ref_cache)
    return (out, *grads), (ref, *ref_grads), cache


@pytest.mark.parametrize("dtype, rel", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("N, C, F, H, W, padding", CPU_CASES)
def test_cpu_conv2d_goes_through_winograd_and_matches_numpy(N, C, F, H, W, padding,
                                                            dtype, rel):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, 3, 3)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    ph, pw = _pair(padding)
    dout = rng.standard_normal((N, F, H + 2 * ph - 2, W + 2 * pw - 2)).astype(dtype)
    got, expect, cache = _conv_both_ways(x, w, b, padding, dout)
    assert isinstance(cache[1], WinogradCache)
    for name, g, e in zip(("out", "dx", "dw", "db"), got, expect):
        assert g.dtype == dtype and g.shape == e.shape, name
        scale = float(np.abs(e).max())
        err = float(np.abs(g.astype(np.float64) - e).max())
        assert err <= rel * scale, (name, err, scale)


def test_cpu_conv2d_winograd_without_bias():
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal((2, 8, 5, 4)), rng.standard_normal((8, 8, 3, 3))
    dout = rng.standard_normal((2, 8, 5, 4))
    got, expect, cache = _conv_both_ways(x, w, None, 1, dout)
    assert isinstance(cache[1], WinogradCache)
    assert got[3] is None and expect[3] is None
    for g, e in zip(got[:3], expect[:3]):
        _close(g, e, 1e-12)


def test_cpu_conv2d_winograd_layers_interleaved_and_backward_twice():
    """Two Winograd layers forward, then backward in reverse order (the
    layers share the workspaces), one backward repeated: each gradient is
    that of its own layer."""
    rng = np.random.default_rng(20)
    x1, w1 = rng.standard_normal((2, 8, 6, 7)), rng.standard_normal((12, 8, 3, 3))
    x2, w2 = rng.standard_normal((1, 12, 9, 4)), rng.standard_normal((8, 12, 3, 3))
    d1, d2 = rng.standard_normal((2, 12, 6, 7)), rng.standard_normal((1, 8, 9, 4))
    with minimask.using_backend("numpy"):
        ref1 = conv2d_forward(x1, w1, None, 1, 1)
        ref2 = conv2d_forward(x2, w2, None, 1, 1)
        expect = [ref1[0], ref2[0], *conv2d_backward(d2, ref2[1])[:2],
                  *conv2d_backward(d1, ref1[1])[:2]]
    with minimask.using_backend("cpu"):
        out1, c1 = conv2d_forward(x1, w1, None, 1, 1)
        out2, c2 = conv2d_forward(x2, w2, None, 1, 1)
        g2 = conv2d_backward(d2, c2)[:2]
        g1 = conv2d_backward(d1, c1)[:2]
        again = conv2d_backward(d2, c2)[:2]
    for got, e in zip((out1, out2, *g2, *g1), expect):
        _close(got, e, 1e-12)
    for a, b in zip(again, g2):
        assert np.array_equal(a, b)


def test_cpu_conv2d_winograd_takes_strided_inputs():
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 8, 12, 5)).transpose(0, 1, 3, 2)[:, :, :, ::2]   # (2, 8, 5, 6)
    w = rng.standard_normal((3, 3, 8, 9)).transpose(3, 2, 1, 0)                    # (9, 8, 3, 3)
    b = rng.standard_normal(18)[::2]
    dout = rng.standard_normal((2, 9, 6, 5)).transpose(0, 1, 3, 2)               # (2, 9, 5, 6)
    assert not (x.flags.c_contiguous or w.flags.c_contiguous or dout.flags.c_contiguous)
    got, expect, cache = _conv_both_ways(x, w, b, 1, dout)
    assert isinstance(cache[1], WinogradCache)
    for g, e in zip(got, expect):
        _close(g, e, 1e-12)


def test_cpu_conv2d_winograd_takes_read_only_inputs():
    rng = np.random.default_rng(24)
    x, w, b = (rng.standard_normal((1, 8, 4, 5)), rng.standard_normal((8, 8, 3, 3)),
               rng.standard_normal(8))
    dout = rng.standard_normal((1, 8, 4, 5))
    for a in (x, w, b, dout):
        a.setflags(write=False)
    got, expect, cache = _conv_both_ways(x, w, b, 1, dout)
    assert isinstance(cache[1], WinogradCache)
    for g, e in zip(got, expect):
        _close(g, e, 1e-12)


def test_cpu_conv2d_winograd_gradient_check():
    """Centred differences of the "cpu" conv2d for a Winograd geometry: odd
    output (3 x 5), padding 1, random upstream gradient."""
    rng = np.random.default_rng(13)
    inputs = {"x": rng.standard_normal((1, 8, 3, 5)),
              "w": rng.standard_normal((8, 8, 3, 3)),
              "b": rng.standard_normal(8)}
    with minimask.using_backend("cpu"):
        _, cache = conv2d_forward(inputs["x"], inputs["w"], inputs["b"], 1, 1)
        assert isinstance(cache[1], WinogradCache)
        errors = check_layer(conv2d_forward, conv2d_backward, inputs, ["x", "w", "b"],
                             seed=14, stride=1, padding=1)
    assert set(errors) == {"x", "w", "b"}
    assert max(errors.values()) < 1e-6, errors


def test_cpu_conv2d_winograd_serial_and_parallel_agree(thresholds, two_threads):
    """Every transform kernel parallel and the 16 multiplies split between
    two threads, against everything on one thread: the same numbers."""
    rng = np.random.default_rng(15)
    x, w, b = (rng.standard_normal((2, 8, 7, 5)), rng.standard_normal((9, 8, 3, 3)),
               rng.standard_normal(9))
    dout = rng.standard_normal((2, 9, 7, 5))
    results = []
    with minimask.using_backend("cpu"):
        for limits in ((1 << 60, 1e30), (0, 0.0)):
            thresholds(*limits)
            out, cache = conv2d_forward(x, w, b, 1, 1)
            assert isinstance(cache[1], WinogradCache)
            results.append((out, *conv2d_backward(dout, cache)))
    for s, p in zip(*results):
        assert np.array_equal(s, p)


# ----------------------------------------------------------------------
# 5. When Winograd is used, and the switch to im2col
# ----------------------------------------------------------------------

def test_algorithm_im2col_switches_the_cpu_conv_for_a_block():
    rng = np.random.default_rng(16)
    x, w, b = (rng.standard_normal((2, 8, 6, 5)), rng.standard_normal((8, 8, 3, 3)),
               rng.standard_normal(8))
    dout = rng.standard_normal((2, 8, 6, 5))
    assert winograd.get_algorithm() == "auto"
    with minimask.using_backend("cpu"):
        out_w, cache_w = conv2d_forward(x, w, b, 1, 1)
        grads_w = conv2d_backward(dout, cache_w)
        with winograd.algorithm("im2col"):
            assert winograd.get_algorithm() == "im2col"
            out_i, cache_i = conv2d_forward(x, w, b, 1, 1)
            grads_i = conv2d_backward(dout, cache_i)
        assert winograd.get_algorithm() == "auto"
        _, cache_after = conv2d_forward(x, w, b, 1, 1)
    assert isinstance(cache_w[1], WinogradCache)
    assert isinstance(cache_i[1], np.ndarray) and not isinstance(cache_i[1], WinogradCache)
    assert isinstance(cache_after[1], WinogradCache)
    for g, e in zip((out_w, *grads_w), (out_i, *grads_i)):
        _close(g, e, 1e-12)


def test_algorithm_block_restores_the_setting_on_an_exception():
    with pytest.raises(RuntimeError, match="inside"):
        with winograd.algorithm("im2col"):
            raise RuntimeError("inside")
    assert winograd.get_algorithm() == "auto"


def test_set_algorithm_rejects_an_unknown_name():
    with pytest.raises(ValueError, match=r"must be one of.*'im2col'.*got 'bogus'"):
        winograd.set_algorithm("bogus")
    with pytest.raises(ValueError, match="bogus"):
        with winograd.algorithm("bogus"):
            pass
    assert winograd.get_algorithm() == "auto"


def test_set_algorithm_returns_the_previous_setting():
    assert winograd.set_algorithm("im2col") == "auto"
    try:
        assert winograd.get_algorithm() == "im2col"
    finally:
        assert winograd.set_algorithm("auto") == "im2col"


def _geometry(C=8, k=3, stride=1, padding=1, H=6, W=6):
    OH = (H + 2 * padding - k) // stride + 1
    OW = (W + 2 * padding - k) // stride + 1
    return Geometry(2, C, H, W, k, k, stride, stride, padding, padding, OH, OW)


def test_applies_from_min_positions(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_POSITIONS", 64)
    C = winograd.MIN_CHANNELS
    # N OH OW output positions: 2 x 4 x 8 = 64 takes it, 2 x 4 x 7 = 56 does not
    assert winograd.applies(Geometry(2, C, 4, 8, 3, 3, 1, 1, 1, 1, 4, 8))
    assert not winograd.applies(Geometry(2, C, 4, 7, 3, 3, 1, 1, 1, 1, 4, 7))
    assert not winograd.applies(Geometry(1, C, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1))
    with minimask.using_backend("cpu"):
        x = np.ones((1, C, 2, 2), np.float32)
        _, cache = conv2d_forward(x, np.ones((4, C, 3, 3), np.float32), None, padding=1)
    assert not isinstance(cache[1], WinogradCache)      # 4 positions: im2col


def test_applies_only_to_3x3_stride_1_with_enough_channels():
    C = winograd.MIN_CHANNELS
    assert winograd.applies(_geometry(C=C))
    assert winograd.applies(_geometry(C=C, padding=0))
    assert winograd.applies(_geometry(C=C + 5, padding=2))
    assert not winograd.applies(_geometry(C=C, stride=2))
    assert not winograd.applies(_geometry(C=C, k=5, padding=2))
    assert not winograd.applies(_geometry(C=C, k=1, padding=0))
    assert not winograd.applies(_geometry(C=C - 1))
    assert not winograd.applies(_geometry(C=1))
    assert not winograd.applies(Geometry(2, C, 6, 6, 3, 3, 1, 2, 1, 1, 6, 3))
    with winograd.algorithm("im2col"):
        assert not winograd.applies(_geometry(C=C))


def test_cpu_conv2d_takes_im2col_where_winograd_does_not_apply():
    rng = np.random.default_rng(17)
    with minimask.using_backend("cpu"):
        for C, k, stride in ((winograd.MIN_CHANNELS - 1, 3, 1), (8, 3, 2), (8, 1, 1)):
            x, w = rng.standard_normal((1, C, 6, 6)), rng.standard_normal((8, C, k, k))
            _, cache = conv2d_forward(x, w, None, stride, k // 2)
            assert isinstance(cache[1], np.ndarray), (C, k, stride)
            assert not isinstance(cache[1], WinogradCache)


def _python_with(env_value, code):
    env = {**os.environ, "MINIMASK_CONV": env_value,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_minimask_conv_environment_variable():
    # minimask.layers imports its submodules on first use: the check runs
    # when the conv layer (and with it winograd.py) is first imported
    bad = _python_with("bogus", "from minimask.layers import conv2d_forward")
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and "MINIMASK_CONV" in last and "bogus" in last, last
    good = _python_with(" IM2COL ", "from minimask.layers import winograd; "
                                    "print(winograd.get_algorithm())")
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == "im2col"


# ----------------------------------------------------------------------
# 6. planes
# ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K, R, T", [(16, 1, 1), (16, 3, 5), (4, 16, 64), (3, 64, 1024),
                                     (2, 7, 1000), (5, 1, 4096)])
def test_planes_layout(dtype, K, R, T):
    item = np.dtype(dtype).itemsize
    stride = winograd.plane_stride(R, T, item)
    assert stride * item % 4096 == 64
    assert stride >= R * T                                    # planes never overlap
    buffer = winograd.plane_buffer(K, R, T, dtype)
    assert buffer.shape == (K, stride) and buffer.dtype == dtype
    assert buffer.flags.c_contiguous                          # what the kernels index [k, r T + t]
    P = winograd.planes(buffer, R, T)
    assert P.shape == (K, R, T) and P.dtype == dtype
    assert np.shares_memory(P, buffer)
    base = buffer.ctypes.data
    for k in range(K):
        plane = P[k]
        assert plane.ctypes.data - base == k * stride * item
        assert plane.flags.c_contiguous
        assert plane.strides == (T * item, item)          # what _blas.gemm takes as is
        plane[...] = k
    assert all(np.all(P[k] == k) for k in range(K))      # no plane wrote over another
    assert all(np.all(buffer[k, :R * T] == k) for k in range(K))   # plane k: row k's start
    assert (K - 1) * stride + R * T <= buffer.size


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plane_buffer_takes_its_storage_from_the_workspace(dtype):
    """With a workspace, the buffer is a (K, P) view of what
    ``workspace(K P, dtype, key)`` returned, not a copy."""
    K, R, T = 16, 5, 9
    P = winograd.plane_stride(R, T, np.dtype(dtype).itemsize)
    asked, given = [], []

    def workspace(size, dt, key):
        asked.append((size, np.dtype(dt), key))
        given.append(np.empty(size, dtype=dt))
        return given[-1]

    buffer = winograd.plane_buffer(K, R, T, dtype, workspace, "winograd.test")
    assert asked == [(K * P, np.dtype(dtype), "winograd.test")]
    assert buffer.shape == (K, P) and buffer.dtype == dtype and buffer.flags.c_contiguous
    assert buffer.ctypes.data == given[0].ctypes.data and np.shares_memory(buffer, given[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_takes_planes_without_a_copy(dtype, monkeypatch):
    """A plane as the output and as an operand goes to OpenBLAS itself, not
    to NumPy's fallback."""
    if _blas.info()["blas"] != "scipy-openblas":
        pytest.fail(f"this test checks the OpenBLAS path: {_blas.info()['why']}")
    name = "sgemm" if dtype == np.float32 else "dgemm"
    real, calls = _blas._state[name], []

    def counting(*args):
        calls.append(args[3:6])                       # M, N, K of the call
        return real(*args)

    monkeypatch.setitem(_blas._state, name, counting)
    rng = np.random.default_rng(23)
    R, T, inner = 6, 37, 5
    P = _planes(3, R, T, dtype)
    a = rng.standard_normal((R, inner)).astype(dtype)
    b = rng.standard_normal((inner, T)).astype(dtype)
    _blas.gemm(a, b, out=P[1], threads=1)
    assert calls == [(R, T, inner)]
    _close(P[1], a.astype(np.float64) @ b, 1e-5 if dtype == np.float32 else 1e-12)
    assert np.isnan(P[0]).all() and np.isnan(P[2]).all()
    got = _blas.gemm(P[1], P[1], trans_b=True, threads=1)        # (R, T) @ (T, R)
    assert calls[1:] == [(R, R, T)]
    _close(got, P[1].astype(np.float64) @ P[1].T, 1e-5 if dtype == np.float32 else 1e-12)


# ----------------------------------------------------------------------
# 7. batched_gemm
# ----------------------------------------------------------------------

@pytest.fixture
def shares_seen(monkeypatch):
    """Record ``(n_items, threads, pieces)`` of each ``_threads.run_shares`` call."""
    seen = []
    real = _threads.run_shares

    def spy(share, n_items, threads, pieces=None):
        seen.append((n_items, threads, pieces))
        return real(share, n_items, threads, pieces)

    monkeypatch.setattr(_threads, "run_shares", spy)
    return seen


@pytest.fixture
def blas_calls(monkeypatch):
    """Record ``(M, N, K)`` of every call into OpenBLAS's sgemm and dgemm
    (each of them one multiply, or one share of one): from Python through
    ctypes, and from the compiled batch loop ``_blas._gemm_loop`` (one entry
    per multiply it makes)."""
    if _blas.info()["blas"] != "scipy-openblas":
        pytest.fail(f"this test checks the OpenBLAS path: {_blas.info()['why']}")
    calls = []
    for name in ("sgemm", "dgemm"):
        real = _blas._state[name]

        def counting(*args, _real=real):
            calls.append(tuple(args[3:6]))            # M, N, K of the call
            return _real(*args)

        monkeypatch.setitem(_blas._state, name, counting)
    real_loop = _blas._gemm_loop

    def counting_loop(fn, ta, tb, M, N, K, *rest):
        lo, hi = rest[-2:]
        calls.extend([(M, N, K)] * (hi - lo))
        return real_loop(fn, ta, tb, M, N, K, *rest)

    monkeypatch.setattr(_blas, "_gemm_loop", counting_loop)
    return calls


def _op(m, trans):
    """op(m) for a batch of matrices, in float64."""
    m = m.astype(np.float64)
    return m.transpose(0, 2, 1) if trans else m


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES)
def test_batched_gemm_on_one_and_two_threads(trans_a, trans_b, dtype, thresholds,
                                             two_threads, shares_seen, blas_calls):
    rng = np.random.default_rng(18)
    K, M, inner, N = 5, 7, 11, 13
    a = rng.standard_normal((K, inner, M) if trans_a else (K, M, inner)).astype(dtype)
    b = rng.standard_normal((K, N, inner) if trans_b else (K, inner, N)).astype(dtype)
    expect = np.matmul(a.transpose(0, 2, 1) if trans_a else a,
                       b.transpose(0, 2, 1) if trans_b else b)
    results = []
    for flops, threads in ((1e30, 1), (0.0, 2)):
        thresholds(None, flops)
        out = _planes(K, M, N, dtype)              # as the layer calls it
        shares_seen.clear()
        blas_calls.clear()
        got = winograd.batched_gemm(a, b, out, trans_a, trans_b)
        assert got is out
        # the batch shared out between the threads, one piece per multiply
        # (one thread: the whole batch in one go), and each multiply one
        # whole OpenBLAS call
        assert shares_seen == [(K, threads, K if threads > 1 else None)]
        assert blas_calls == [(M, N, inner)] * K
        rel = 1e-5 if dtype == np.float32 else 1e-12
        _close(out, expect, rel)
        results.append(np.array(out))
    assert np.array_equal(*results)       # each multiply whole on one thread either way


def _filled_planes(rng, K, R, T, dtype):
    """A ``planes`` view (of a NaN-filled buffer) holding random numbers."""
    view = _planes(K, R, T, dtype)
    view[...] = rng.standard_normal((K, R, T))
    return view


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES)
def test_gemm_batch_on_planes_against_matmul(trans_a, trans_b, dtype, thresholds,
                                             two_threads, shares_seen, blas_calls):
    """Operands and output as ``planes`` views (rows contiguous, planes P
    apart), on one thread and split over two: by the FLOP rule
    (``threads=None``, the threshold forced either way) and by ``threads``."""
    rng = np.random.default_rng(26)
    B, M, inner, N = 6, 9, 7, 12
    a = _filled_planes(rng, B, *((inner, M) if trans_a else (M, inner)), dtype)
    b = _filled_planes(rng, B, *((N, inner) if trans_b else (inner, N)), dtype)
    expect = np.matmul(_op(a, trans_a), _op(b, trans_b))
    rel = 1e-5 if dtype == np.float32 else 1e-12
    results = []
    for flops, threads, asked in ((1e30, 1, None), (0.0, 2, None), (1e30, 2, 2), (0.0, 1, 1)):
        thresholds(None, flops)
        buffer = _buffer(B, M, N, dtype)
        out = winograd.planes(buffer, M, N)
        shares_seen.clear()
        blas_calls.clear()
        got = _blas.gemm_batch(a, b, out, trans_a, trans_b, threads=asked)
        assert got is out
        assert shares_seen == [(B, threads, B if threads > 1 else None)]
        assert blas_calls == [(M, N, inner)] * B       # one OpenBLAS call per multiply
        assert out.dtype == dtype
        _close(out, expect, rel)
        _tail_untouched(buffer, M, N)                 # nothing written between the planes
        results.append(np.array(out))
    assert all(np.array_equal(results[0], r) for r in results[1:])
    assert np.isfinite(a).all() and np.isfinite(b).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES)
@pytest.mark.parametrize("strided", ["a", "b", "out"])
def test_gemm_batch_falls_back_to_numpy_for_a_strided_last_axis(strided, trans_a, trans_b,
                                                               dtype, thresholds, two_threads,
                                                               shares_seen, blas_calls):
    """A last axis that is not contiguous (here every second element) is
    not something OpenBLAS takes: each multiply goes to NumPy, with the
    same result, and only the output's own elements are written."""
    rng = np.random.default_rng(27)
    B, M, inner, N = 4, 5, 6, 7
    a_shape = (B, inner, M) if trans_a else (B, M, inner)
    b_shape = (B, N, inner) if trans_b else (B, inner, N)

    def operand(shape, name):
        if strided == name:
            full = rng.standard_normal(shape[:2] + (2 * shape[2],)).astype(dtype)
            view = full[:, :, ::2]
            assert view.strides[2] == 2 * view.itemsize
            return view
        return rng.standard_normal(shape).astype(dtype)

    a, b = operand(a_shape, "a"), operand(b_shape, "b")
    expect = np.matmul(_op(a, trans_a), _op(b, trans_b))
    rel = 1e-5 if dtype == np.float32 else 1e-12
    for flops, threads in ((1e30, 1), (0.0, 2)):
        thresholds(None, flops)
        big = np.full((B, M, 2 * N) if strided == "out" else (B, M, N), np.nan, dtype=dtype)
        out = big[:, :, ::2] if strided == "out" else big
        shares_seen.clear()
        blas_calls.clear()
        got = _blas.gemm_batch(a, b, out, trans_a, trans_b)
        assert got is out
        assert blas_calls == []                       # NumPy's multiply, not OpenBLAS
        assert shares_seen == [(B, threads, B if threads > 1 else None)]   # by multiply
        _close(out, expect, rel)
        if strided == "out":
            assert np.isnan(big[:, :, 1::2]).all()    # the elements between untouched


# ----------------------------------------------------------------------
# 8. _blas.gemm's shares, and run_shares
# ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES)
@pytest.mark.parametrize("M, K, N, by", [(45, 13, 7, "rows"), (7, 13, 45, "cols"),
                                         (19, 5, 19, "cols"), (3, 4, 2, "rows")])
def test_blas_gemm_shares_into_strided_views(M, K, N, by, trans_a, trans_b, dtype,
                                             shares_seen):
    if _blas.info()["blas"] != "scipy-openblas":
        pytest.fail(f"these tests check the OpenBLAS path: {_blas.info()['why']}")
    rng = np.random.default_rng(19)
    # a and b as views with a row stride larger than their rows
    a_shape = (K, M) if trans_a else (M, K)
    b_shape = (N, K) if trans_b else (K, N)
    a = rng.standard_normal((a_shape[0], a_shape[1] + 3)).astype(dtype)[:, 2:2 + a_shape[1]]
    b = rng.standard_normal((b_shape[0], b_shape[1] + 5)).astype(dtype)[:, 1:1 + b_shape[1]]
    expect = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
    rel = 1e-5 if dtype == np.float32 else 1e-12
    unit = 64 // np.dtype(dtype).itemsize                 # elements of one cache line
    n_shares = -(-(N if by == "cols" else M) // unit)
    for threads in (1, 2, 5):
        for accumulate in (False, True):
            big = rng.standard_normal((M + 3, N + 7)).astype(dtype)
            before = big.copy()
            out = big[1:1 + M, 4:4 + N]
            shares_seen.clear()
            got = _blas.gemm(a, b, trans_a, trans_b, out=out, accumulate=accumulate,
                             threads=threads)
            assert got is out
            # GEMM_PIECES pieces, claimed, when split (a large multiply is cut
            # the same way on one thread); this small one on one thread is one
            # call (run_shares clips both to n_shares)
            pieces = _blas.GEMM_PIECES if threads > 1 else 1
            assert shares_seen == [(n_shares, threads, pieces)]
            _close(out, expect + (before[1:1 + M, 4:4 + N] if accumulate else 0), rel)
            inside = np.zeros(big.shape, bool)
            inside[1:1 + M, 4:4 + N] = True
            assert np.array_equal(big[~inside], before[~inside])   # nothing else written


def _recording_share(n_items):
    """``(share, counts, calls)``: a share that counts the indices it is given
    and records ``(lo, hi, thread)`` of every call."""
    counts = np.zeros(n_items, int)
    calls, lock = [], threading.Lock()

    def share(lo, hi):
        with lock:
            calls.append((lo, hi, threading.get_ident()))
            counts[lo:hi] += 1
    return share, counts, calls


@pytest.mark.parametrize("n_items", [1, 2, 3, 17])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_run_shares_covers_every_index_once(n_items, threads):
    share, counts, calls = _recording_share(n_items)
    _threads.run_shares(share, n_items, threads)
    assert np.all(counts == 1)
    assert len(calls) == min(threads, n_items)
    assert all(lo < hi for lo, hi, _ in calls)
    _assert_ran_on_caller_or_pool(calls, threads)


def _assert_ran_on_caller_or_pool(calls, threads):
    """Pieces are claimed by whichever thread comes first: each ran on the
    calling thread or on one of minimask's pool threads, at most
    ``threads`` of them in all (one thread for ``threads=1``)."""
    pool_idents = {t.ident for t in threading.enumerate() if t.name.startswith("minimask")}
    idents = {t for _, _, t in calls}
    assert idents <= pool_idents | {threading.get_ident()}, "a piece ran on a foreign thread"
    assert len(idents) <= threads
    if threads == 1:
        assert idents == {threading.get_ident()}


@pytest.mark.parametrize("n_items, threads, pieces", [(17, 2, 5), (17, 2, 34), (10, 3, 4),
                                                      (7, 2, 9), (100, 5, 16), (3, 1, 2)])
def test_run_shares_with_more_pieces_than_threads_covers_every_index_once(n_items, threads,
                                                                          pieces):
    share, counts, calls = _recording_share(n_items)
    _threads.run_shares(share, n_items, threads, pieces=pieces)
    assert np.all(counts == 1)
    n_pieces = min(max(pieces, threads), n_items)    # the same pieces on one thread too
    assert len(calls) == n_pieces
    # contiguous pieces that tile range(n_items), of sizes differing by at most one
    spans = sorted((lo, hi) for lo, hi, _ in calls)
    assert spans[0][0] == 0 and spans[-1][1] == n_items
    assert all(prev[1] == nxt[0] for prev, nxt in zip(spans, spans[1:]))
    sizes = {hi - lo for lo, hi in spans}
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    _assert_ran_on_caller_or_pool(calls, threads)


def test_run_shares_does_every_piece_itself_when_the_pool_is_blocked(monkeypatch):
    """A pool thread that never comes (here: the pool's only worker is
    busy with another task) holds nothing up: the calling thread claims
    every piece, and run_shares returns while the worker is still busy."""
    for key in list(_threads._POOL):          # restored after the test
        monkeypatch.setitem(_threads._POOL, key, _threads._POOL[key])
    _threads._POOL.update(pid=None, workers=0, executor=None)
    pool = _threads._executor(1)               # a fresh pool of one worker
    started, release, blocker_done = threading.Event(), threading.Event(), threading.Event()

    def blocker():
        started.set()
        release.wait(timeout=30)               # the test cannot hang on it
        blocker_done.set()

    pool.submit(blocker)
    try:
        assert started.wait(timeout=30), "the pool's worker never started"
        assert _threads._executor(1) is pool   # the pool run_shares will use
        me = threading.get_ident()
        for n, pieces in ((10, None), (10, 4), (3, 8)):
            calls = []

            def share(lo, hi):
                calls.append((lo, hi, threading.get_ident()))

            _threads.run_shares(share, n, 2, pieces=pieces)
            assert not blocker_done.is_set(), "run_shares waited for the busy pool thread"
            expect = min(pieces or 2, n)
            assert sorted(c[:2] for c in calls) == [(n * i // expect, n * (i + 1) // expect)
                                                    for i in range(expect)]
            assert all(t == me for _, _, t in calls), "a piece ran on the blocked pool"
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert blocker_done.is_set()


def test_run_shares_propagates_an_exception_from_a_pool_share():
    done = []

    def share(lo, hi):
        if lo != 0:
            raise RuntimeError(f"share {lo}-{hi} failed")
        done.append((lo, hi))

    with pytest.raises(RuntimeError, match="share 8-17 failed"):
        _threads.run_shares(share, 17, 2)
    assert done == [(0, 8)]
    # and from the calling thread's own share, after the pool's shares finish
    pool_done = []

    def first_fails(lo, hi):
        if lo == 0:
            raise KeyError("first")
        pool_done.append((lo, hi))

    with pytest.raises(KeyError, match="first"):
        _threads.run_shares(first_fails, 17, 3)
    assert sorted(pool_done) == [(5, 11), (11, 17)]
    # the pool still works afterwards (checked at the end)
    counts = np.zeros(9, int)
    _threads.run_shares(lambda lo, hi: counts.__setitem__(slice(lo, hi), 1), 9, 2)
    assert np.all(counts == 1)


def test_run_shares_waits_for_every_share_when_one_fails():
    """"returns when all are done": also when a pool share raises, the other
    shares have finished when run_shares returns (a BLAS share writes
    through raw pointers into the caller's arrays)."""
    done = []

    def share(lo, hi):
        if lo == 1:
            raise RuntimeError("share 1 failed")
        if lo == 2:
            time.sleep(0.3)
        done.append(lo)

    with pytest.raises(RuntimeError, match="share 1 failed"):
        _threads.run_shares(share, 3, 3)
    done_at_return = sorted(done)
    time.sleep(0.4)              # a share left running finishes before the next test
    assert done_at_return == [0, 2], "run_shares returned while share 2 was still running"


# ----------------------------------------------------------------------
# 9. No gradient for the input: conv2d_backward(need_dx=False) and the
#    modules and models above it
# ----------------------------------------------------------------------

NEED_DX_CASES = [
    # backend, stride, through Winograd
    pytest.param("cpu", 1, True, id="cpu-winograd"),
    pytest.param("cpu", 2, False, id="cpu-im2col-stride2"),
    pytest.param("numpy", 1, False, id="numpy"),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend, stride, through_winograd", NEED_DX_CASES)
def test_conv2d_backward_without_dx_gives_the_same_dw_and_db(backend, stride,
                                                              through_winograd, dtype, bias):
    """need_dx=False: dx is None, dw and db bit for bit those of the full
    backward, in either order (the Winograd workspaces are shared)."""
    rng = np.random.default_rng(28)
    x = rng.standard_normal((2, 8, 7, 6)).astype(dtype)           # odd rows
    w = rng.standard_normal((9, 8, 3, 3)).astype(dtype)
    b = rng.standard_normal(9).astype(dtype) if bias else None
    with minimask.using_backend(backend):
        out, cache = conv2d_forward(x, w, b, stride, 1)
        assert isinstance(cache[1], WinogradCache) == through_winograd
        dout = rng.standard_normal(out.shape).astype(dtype)
        first = conv2d_backward(dout, cache, need_dx=False)
        full = conv2d_backward(dout, cache)
        again = conv2d_backward(dout, cache, False)
    assert full[0] is not None and full[0].shape == x.shape and full[0].dtype == dtype
    for got in (first, again):
        assert got[0] is None
        assert got[1].dtype == dtype and np.array_equal(got[1], full[1])
        if bias:
            assert got[2].dtype == dtype and np.array_equal(got[2], full[2])
        else:
            assert got[2] is None and full[2] is None
    # and they are the gradients (the "numpy" backend in float64)
    up = [None if v is None else v.astype(np.float64) for v in (x, w, b, dout)]
    with minimask.using_backend("numpy"):
        _, ref_cache = conv2d_forward(up[0], up[1], up[2], stride, 1)
        ref = conv2d_backward(up[3], ref_cache)
    rel = 1e-5 if dtype == np.float32 else 1e-12
    for g, e in zip(first[1:], ref[1:]):
        if e is not None:
            _close(g, e, rel)


@pytest.fixture
def conv_backward_calls(monkeypatch):
    """Record the ``need_dx`` of every ``conv2d_backward`` a ``Conv2d``
    module makes."""
    seen = []
    real = modules.conv2d_backward

    def spy(dout, cache, need_dx=True):
        seen.append(need_dx)
        return real(dout, cache, need_dx)

    monkeypatch.setattr(modules, "conv2d_backward", spy)
    return seen


def _grads(module):
    return {name: np.array(p.grad) for name, p in module.named_parameters()}


def _assert_same_grads(got, expect):
    assert set(got) == set(expect)
    for name in expect:
        assert np.array_equal(got[name], expect[name]), name


def _sequential(first, rng):
    """Three Winograd / im2col convs with GroupNorm and ReLU between, after
    a ``first`` layer: a Conv2d, a parameter-free ReLU or a GroupNorm."""
    f64 = dict(rng=rng, dtype=np.float64)
    head = {"conv": Conv2d(8, 8, 3, 1, 1, **f64),
            "relu": ReLU(),
            "groupnorm": GroupNorm(2, 8, dtype=np.float64)}[first]
    if first == "groupnorm":
        head.weight.value[...] = rng.uniform(0.5, 1.5, 8)
        head.bias.value[...] = rng.standard_normal(8)
    return Sequential(head, Conv2d(8, 12, 3, 2, 1, **f64), GroupNorm(4, 12, dtype=np.float64),
                      ReLU(), Conv2d(12, 8, 3, 1, 1, **f64), MaxPool2d(3, 2, 1),
                      Conv2d(8, 8, 1, 1, 0, bias=False, **f64))


@pytest.mark.parametrize("first", ["conv", "relu", "groupnorm"])
def test_sequential_backward_without_dx(first, conv_backward_calls):
    """need_dx=False returns None; every parameter gradient equals the
    need_dx=True run's; a first Conv2d skips its dx, the others do not."""
    rng = np.random.default_rng(29)
    seq = _sequential(first, rng)
    x = rng.standard_normal((2, 8, 9, 8))
    with minimask.using_backend("cpu"):
        out, caches = seq.forward(x)
        assert isinstance(caches[-3][1], WinogradCache)          # the 3x3 stride-1 conv
        dout = rng.standard_normal(out.shape)
        seq.zero_grad()
        dx = seq.backward(dout, caches)
        full = _grads(seq)
        assert conv_backward_calls == [True] * len(conv_backward_calls)
        conv_backward_calls.clear()
        seq.zero_grad()
        assert seq.backward(dout, caches, need_dx=False) is None
        _assert_same_grads(_grads(seq), full)
    assert dx is not None and dx.shape == x.shape
    n_convs = sum(isinstance(m, Conv2d) for m in seq.layers)
    expect = [True] * n_convs
    if first == "conv":
        expect[-1] = False                      # the first conv, called last
    assert conv_backward_calls == expect
    assert all(np.any(g != 0) for g in full.values())


def _small_resnet(with_c2, rng):
    return ResNet(stem_channels=8, stem_kernel=3, blocks=(1, 1, 1, 1), widths=(8, 8, 16, 16),
                  rng=rng, dtype=np.float64, with_c2=with_c2)


@pytest.mark.parametrize("with_c2", [False, True])
def test_backbone_backward_without_the_input_gradient(with_c2, conv_backward_calls):
    """ResNet.backward(need_input_grad=False): None, the same parameter
    gradients as need_input_grad=True, and only the stem conv skips dx."""
    rng = np.random.default_rng(30)
    backbone = _small_resnet(with_c2, rng)
    x = rng.uniform(0, 1, (2, 3, 32, 24))
    with minimask.using_backend("cpu"):
        C, cache = backbone.forward(x)
        dC = [rng.standard_normal(c.shape) for c in C]
        backbone.zero_grad()
        dx = backbone.backward(dC, cache)
        full = _grads(backbone)
        n_calls = len(conv_backward_calls)
        assert conv_backward_calls == [True] * n_calls
        conv_backward_calls.clear()
        backbone.zero_grad()
        assert backbone.backward(dC, cache, need_input_grad=False) is None
        _assert_same_grads(_grads(backbone), full)
    assert dx is not None and dx.shape == x.shape and np.any(dx != 0)
    assert conv_backward_calls == [True] * (n_calls - 1) + [False]   # the stem conv is last
    assert np.any(backbone.stem.layers[0].weight.grad != 0)


@pytest.mark.parametrize("trainable_stages", [5, 3])
def test_pretrained_resnet_backward_without_the_input_gradient(trainable_stages,
                                                               conv_backward_calls):
    """The torchvision-layout ResNet with the golden weights: None, and the
    same parameter gradients as need_input_grad=True; with the stem
    trainable its conv1 skips dx, with it frozen neither run reaches it."""
    from tests.test_pretrained import golden_model
    model, _ = golden_model("resnet_basic_narrow", trainable_stages=trainable_stages)
    backbone = model.backbone
    rng = np.random.default_rng(31)
    x = rng.random((1, 3, 20, 24)) + 0.1
    with minimask.using_backend("cpu"):
        C, cache = backbone.forward(x)
        dC = [rng.standard_normal(c.shape) for c in C]
        backbone.zero_grad()
        dx = backbone.backward(dC, cache)
        full = _grads(backbone)
        n_calls = len(conv_backward_calls)
        conv_backward_calls.clear()
        backbone.zero_grad()
        assert backbone.backward(dC, cache, need_input_grad=False) is None
        _assert_same_grads(_grads(backbone), full)
    if trainable_stages == 5:
        assert dx is not None and dx.shape == x.shape and np.any(dx != 0)
        assert conv_backward_calls == [True] * (n_calls - 1) + [False]
        assert np.any(backbone.conv1.weight.grad != 0)
    else:
        assert dx is None                       # the pass stops below layer2
        assert conv_backward_calls == [True] * n_calls
        assert np.all(backbone.conv1.weight.grad == 0)


def test_retinamask_loss_gradients_do_not_depend_on_the_input_gradient(monkeypatch):
    """The training step asks the backbone for no d(images); the tiny
    model's loss and every parameter gradient are bit for bit those of a
    step that computes it (the backbone called with need_input_grad=True)."""
    from tests.test_model import scene
    model = RetinaMask(Config.preset("tiny", num_classes=2))
    images, targets = scene(64)
    images = images.astype(np.float32)
    real = model.backbone.backward
    asked, returned = [], []

    def calling(force):
        """backbone.backward, recording what it was asked and returned;
        ``force`` (not None) overrides need_input_grad."""
        def backward(dfeatures, cache, need_input_grad=True):
            asked.append(need_input_grad)
            dx = real(dfeatures, cache,
                      need_input_grad=need_input_grad if force is None else force)
            returned.append(dx)
            return dx
        return backward

    runs = []
    with minimask.using_backend("cpu"):
        for force in (None, True):
            monkeypatch.setattr(model.backbone, "backward", calling(force))
            asked.clear()
            returned.clear()
            losses = model.loss(images, targets)
            runs.append((losses, _grads(model), list(asked), list(returned)))
    (loss_a, grads_a, asked_a, ret_a), (loss_b, grads_b, asked_b, ret_b) = runs
    assert asked_a == [False] and ret_a == [None]          # what the step asks for
    assert len(ret_b) == 1 and ret_b[0] is not None and ret_b[0].shape == images.shape
    for key in ("cls", "box", "mask", "total"):
        assert loss_a[key] == loss_b[key], key
    _assert_same_grads(grads_a, grads_b)
    assert np.any(grads_a["backbone.stem.layers.0.weight"] != 0)   # the stem conv still trains
