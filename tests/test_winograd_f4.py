"""Winograd F(4x4, 3x3) (minimask/layers/winograd_f4.py) and when the "cpu"
conv2d takes it (minimask/layers/winograd.py: ``tile_for``).

As for F(2x2, 3x3) (tests/test_winograd.py): the matrices against the direct
correlation, the 1-D helpers against the matrices, the NumPy reference
against the definition (the "numpy" backend), each Numba kernel (serial and
parallel) against its NumPy stage and against its forward (the adjoint
identity), the "cpu" conv2d through 6x6 tiles against the "numpy" backend
with a gradient check, and the rule that picks the tile size. CPU only,
tiny sizes.
"""
import numpy as np
import pytest

import minimask
from minimask.gradcheck import check_layer
from minimask.layers import conv2d_backward, conv2d_forward, winograd, winograd_f4
from minimask.layers.conv import WinogradCache
from tests.test_threads import thresholds, two_threads  # noqa: F401
# the NaN-filled plane buffers and the serial-against-parallel runner are F(2x2)'s
from tests.test_winograd import _assert_adjoint, _both, _buffer, _close, _pair, _tail_untouched
from tests.test_winograd import _filled_buffer as _filled


@pytest.fixture(autouse=True)
def _auto_with_small_f4_floors(monkeypatch):
    """The default algorithm, with every floor at 1 so tiny maps take 6x6
    tiles (``test_tile_for_*`` set the floors they check)."""
    old = winograd.set_algorithm("auto")
    monkeypatch.setattr(winograd, "MIN_POSITIONS", 1)
    monkeypatch.setattr(winograd, "F4_MIN_SIZE", 1)
    monkeypatch.setattr(winograd, "F4_MIN_POSITIONS", 1)
    yield
    winograd.set_algorithm(old)


# ----------------------------------------------------------------------
# The matrices and the 1-D helpers
# ----------------------------------------------------------------------

def _correlate(d, g):
    """Valid 2-D correlation of d (h, w) with g (3, 3), by its definition."""
    out = np.zeros((d.shape[0] - 2, d.shape[1] - 2))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = np.sum(d[i:i + 3, j:j + 3] * g)
    return out


def test_w4_on_one_tile_is_the_direct_4x4_correlation():
    BT, G, AT = winograd_f4.transform_matrices()
    assert BT.shape == (6, 6) and G.shape == (6, 3) and AT.shape == (4, 6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        d, g = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
        Y = AT @ ((G @ g @ G.T) * (BT @ d @ BT.T)) @ AT.T
        np.testing.assert_allclose(Y, _correlate(d, g), rtol=0, atol=1e-12)


def test_transform_matrices_take_the_dtype():
    for m in winograd_f4.transform_matrices(np.float32):
        assert m.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_1d_helpers_are_the_matrices_and_their_transposes(dtype):
    """``_bt``, ``_b``, ``_at``, ``_a`` (integer factors of the dtype, from
    ``_constants``) and ``_g``, ``_gt`` (float64) against B^T, B, A^T, A, G, G^T."""
    from numba import njit
    BT, G, AT = winograd_f4.transform_matrices()
    two, four, five, eight = winograd_f4._constants(dtype)
    assert winograd_f4._constants(dtype).dtype == dtype

    @njit
    def run(v6, v4, v3, two, four, five, eight):
        return (winograd_f4._bt(v6[0], v6[1], v6[2], v6[3], v6[4], v6[5], two, four, five),
                winograd_f4._b(v6[0], v6[1], v6[2], v6[3], v6[4], v6[5], two, four, five),
                winograd_f4._at(v6[0], v6[1], v6[2], v6[3], v6[4], v6[5], two, four, eight),
                winograd_f4._a(v4[0], v4[1], v4[2], v4[3], two, four, eight),
                # the filter kernels hand these float64 values
                winograd_f4._g(np.float64(v3[0]), np.float64(v3[1]), np.float64(v3[2])),
                winograd_f4._gt(np.float64(v6[0]), np.float64(v6[1]), np.float64(v6[2]),
                                np.float64(v6[3]), np.float64(v6[4]), np.float64(v6[5])))

    rng = np.random.default_rng(1)
    rel = 1e-6 if dtype == np.float32 else 1e-14
    for _ in range(10):
        v6, v4, v3 = (rng.standard_normal(n).astype(dtype) for n in (6, 4, 3))
        bt, b, at, a, g, gt = run(v6, v4, v3, two, four, five, eight)
        u6, u4, u3 = (v.astype(np.float64) for v in (v6, v4, v3))
        _close(bt, BT @ u6, rel)
        _close(b, BT.T @ u6, rel)
        _close(at, AT @ u6, rel)
        _close(a, AT.T @ u4, rel)
        _close(g, G @ u3, 1e-14)
        _close(gt, G.T @ u6, 1e-14)


# ----------------------------------------------------------------------
# The NumPy reference against the definition
# ----------------------------------------------------------------------

REFERENCE_CASES = [
    # N, C, F, H, W, padding, bias
    (1, 2, 3, 10, 10, 0, True),        # 8 x 8: whole tiles
    (2, 3, 2, 7, 9, 0, False),         # 5 x 7: the last tiles overhang
    (2, 2, 4, 9, 6, 1, True),          # 9 x 6
    (1, 3, 2, 4, 4, 1, False),         # 4 x 4: one tile
    (2, 2, 3, 3, 5, 2, True),          # 5 x 7
    (1, 2, 3, 1, 1, 2, False),         # 1 x 1 input, 3 x 3 out: a tile mostly padding
    (2, 2, 1, 2, 3, 1, True),          # 2 x 3 input
    (1, 2, 3, 6, 5, (1, 2), True),     # 6 x 7
    (2, 3, 2, 4, 3, (2, 0), False),    # 6 x 1
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
    out, (U, V) = winograd_f4.winograd_conv2d_numpy(x, w, b, padding)
    TH, TW = winograd_f4.tiles_of(*expect.shape[2:])
    assert U.shape == (36, F, C) and V.shape == (36, C, N * TH * TW)
    _close(out, expect, 1e-12)
    dx, dw, db = winograd_f4.winograd_conv2d_backward_numpy(dout, x.shape, U, V, padding)
    _close(dx, dx_e, 1e-12)
    _close(dw, dw_e, 1e-12)
    _close(db, dout.sum(axis=(0, 2, 3)), 1e-12)


# ----------------------------------------------------------------------
# The Numba kernels against their NumPy stages, and their adjoints
# ----------------------------------------------------------------------

# N, C, F, H, W, ph, pw: a 9 x 9 output (3 x 3 tiles, the last overhanging)
KN, KC, KF, KH, KW, KPH, KPW = 2, 3, 4, 9, 7, 1, 2
KOH, KOW = KH + 2 * KPH - 2, KW + 2 * KPW - 2
KTH, KTW = winograd_f4.tiles_of(KOH, KOW)
KT = KN * KTH * KTW
K64 = winograd_f4._constants(np.float64)


def _tiles():
    for n in range(KN):
        for ty in range(KTH):
            for tx in range(KTW):
                yield n, ty, tx, (n * KTH + ty) * KTW + tx


def _pad(x):
    xpad = np.zeros((KN, KC, 4 * KTH + 2, 4 * KTW + 2))
    xpad[:, :, KPH:KPH + KH, KPW:KPW + KW] = x
    return xpad


def _input_transform(xpad):
    (Vb,) = _both(winograd_f4._input_transform_cpu, lambda: (_buffer(36, KC, KT),),
                  lambda o: (xpad, o[0], KTH, KTW, K64))
    _tail_untouched(Vb, KC, KT)
    return winograd.planes(Vb, KC, KT)


def _input_adjoint(dVb):
    (dx,) = _both(winograd_f4._input_adjoint_cpu, lambda: (np.full((KN, KC, KH, KW), np.nan),),
                  lambda o: (dVb, o[0], KPH, KPW, KTH, KTW, K64))
    return dx


def _output_transform(Mb, b, has_bias):
    (out,) = _both(winograd_f4._output_transform_cpu,
                   lambda: (np.full((KN, KF, 4 * KTH, 4 * KTW), np.nan),),
                   lambda o: (Mb, b, has_bias, o[0], K64))
    return out


def _output_adjoint(dY):
    dMb, db = _both(winograd_f4._output_adjoint_cpu,
                    lambda: (_buffer(36, KF, KT), np.full(KF, np.nan)),
                    lambda o: (dY, o[0], o[1], K64))
    _tail_untouched(dMb, KF, KT)
    return winograd.planes(dMb, KF, KT), db


def test_input_transform_kernel_is_bt_d_b_on_the_padded_tiles():
    BT, _, _ = winograd_f4.transform_matrices()
    rng = np.random.default_rng(3)
    xpad = rng.standard_normal((KN, KC, 4 * KTH + 2, 4 * KTW + 2))
    expect = np.empty((36, KC, KT))
    for c in range(KC):
        for n, ty, tx, t in _tiles():
            d = xpad[n, c, 4 * ty:4 * ty + 6, 4 * tx:4 * tx + 6]
            expect[:, c, t] = (BT @ d @ BT.T).reshape(36)
    _close(_input_transform(xpad), expect, 1e-14)
    x = rng.standard_normal((KN, KC, KH, KW))
    _, (_, V_ref) = winograd_f4.winograd_conv2d_numpy(x, rng.standard_normal((KF, KC, 3, 3)),
                                                      None, (KPH, KPW))
    _close(_input_transform(_pad(x)), V_ref, 1e-13)


def test_input_adjoint_kernel_matches_its_numpy_stage():
    BT, _, _ = winograd_f4.transform_matrices()
    dVb = _filled(np.random.default_rng(4), 36, KC, KT)
    dV = winograd.planes(dVb, KC, KT)
    dxpad = np.zeros((KN, KC, 4 * KTH + 2, 4 * KTW + 2))
    for c in range(KC):
        for n, ty, tx, t in _tiles():
            dxpad[n, c, 4 * ty:4 * ty + 6, 4 * tx:4 * tx + 6] += BT.T @ dV[:, c, t].reshape(6, 6) @ BT
    _close(_input_adjoint(dVb), dxpad[:, :, KPH:KPH + KH, KPW:KPW + KW], 1e-13)


@pytest.mark.parametrize("has_bias", [True, False])
def test_output_transform_kernel_matches_its_numpy_stage(has_bias):
    _, _, AT = winograd_f4.transform_matrices()
    rng = np.random.default_rng(5)
    Mb = _filled(rng, 36, KF, KT)
    M = winograd.planes(Mb, KF, KT)
    b = rng.standard_normal(KF)
    expect = np.empty((KN, KF, 4 * KTH, 4 * KTW))
    for f in range(KF):
        for n, ty, tx, t in _tiles():
            expect[n, f, 4 * ty:4 * ty + 4, 4 * tx:4 * tx + 4] = (
                AT @ M[:, f, t].reshape(6, 6) @ AT.T + (b[f] if has_bias else 0.0))
    _close(_output_transform(Mb, b, has_bias), expect, 1e-13)


def test_output_adjoint_kernel_matches_its_numpy_stage_and_gives_the_bias_gradient():
    _, _, AT = winograd_f4.transform_matrices()
    dY = np.random.default_rng(6).standard_normal((KN, KF, 4 * KTH, 4 * KTW))
    expect = np.empty((36, KF, KT))
    for f in range(KF):
        for n, ty, tx, t in _tiles():
            expect[:, f, t] = (AT.T @ dY[n, f, 4 * ty:4 * ty + 4, 4 * tx:4 * tx + 4] @ AT).reshape(36)
    dM, db = _output_adjoint(dY)
    _close(dM, expect, 1e-13)
    _close(db, dY.sum(axis=(0, 2, 3)), 1e-13)


@pytest.mark.parametrize("dtype, rel", [(np.float32, 1e-6), (np.float64, 1e-14)])
def test_filter_transform_and_adjoint_kernels_match_their_numpy_stages(dtype, rel):
    """In float64 inside whatever the dtype: float32 results are the exact
    transforms rounded once (1e-6 relative, not float32 arithmetic's ~1e-5)."""
    _, G, _ = winograd_f4.transform_matrices()
    rng = np.random.default_rng(7)
    w = rng.standard_normal((KF, KC, 3, 3)).astype(dtype)
    Ub = winograd.plane_buffer(36, KF, KC, dtype)
    Ub[...] = np.nan
    winograd_f4._filter_transform_cpu(w, Ub)
    assert np.isnan(Ub[:, KF * KC:]).all()
    w64 = w.astype(np.float64)
    expect = np.stack([np.stack([(G @ w64[f, c] @ G.T).reshape(36) for c in range(KC)], -1)
                       for f in range(KF)], 1)
    _close(winograd.planes(Ub, KF, KC), expect, rel)
    dUb = winograd.plane_buffer(36, KF, KC, dtype)
    dU = winograd.planes(dUb, KF, KC)
    dU[...] = rng.standard_normal(dU.shape)
    dw = np.full((KF, KC, 3, 3), np.nan, dtype=dtype)
    winograd_f4._filter_adjoint_cpu(dUb, dw)
    dU64 = dU.astype(np.float64)
    expect = np.array([[G.T @ dU64[:, f, c].reshape(6, 6) @ G for c in range(KC)]
                       for f in range(KF)])
    _close(dw, expect, rel)


def test_input_adjoint_kernel_is_the_adjoint_of_pad_then_input_transform():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((KN, KC, KH, KW))
    yb = _filled(rng, 36, KC, KT)
    _assert_adjoint(x, _input_transform(_pad(x)), winograd.planes(yb, KC, KT), _input_adjoint(yb))


def test_output_adjoint_kernel_is_the_adjoint_of_the_output_transform():
    rng = np.random.default_rng(9)
    Mb = _filled(rng, 36, KF, KT)
    y = rng.standard_normal((KN, KF, 4 * KTH, 4 * KTW))
    Ax = _output_transform(Mb, np.zeros(KF), False)
    _assert_adjoint(winograd.planes(Mb, KF, KT), Ax, y, _output_adjoint(y)[0])


def test_filter_adjoint_kernel_is_the_adjoint_of_the_filter_transform():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((KF, KC, 3, 3))
    yb = _filled(rng, 36, KF, KC)
    Ub, dw = _buffer(36, KF, KC), np.empty((KF, KC, 3, 3))
    winograd_f4._filter_transform_cpu(w, Ub)
    winograd_f4._filter_adjoint_cpu(yb, dw)
    _assert_adjoint(w, winograd.planes(Ub, KF, KC), winograd.planes(yb, KF, KC), dw)


# ----------------------------------------------------------------------
# The "cpu" conv2d through 6x6 tiles
# ----------------------------------------------------------------------

CPU_CASES = [
    # N, C, F, H, W, padding
    (2, 8, 9, 9, 7, 1),            # 9 x 7: overhanging tiles, F != C
    (1, 8, 8, 10, 10, 0),          # 8 x 8
    (3, 9, 8, 6, 7, 2),            # 8 x 9
    (1, 8, 10, 5, 5, (1, 2)),      # 5 x 7
    (1, 8, 8, 1, 1, 1),            # 1 x 1 input
    (2, 8, 8, 3, 4, 0),            # 1 x 2: one row of tiles, mostly cut off
]

# float32 tolerance, relative to max(1, max |expect|). F(4x4)'s transforms
# sum terms of more different sizes than F(2x2)'s (the 8 of A^T, the 5 of
# B^T), so its float32 round-off is larger: winograd_f4.py's docstring
# measures 5.5e-6 of the largest output at 64 channels against 2.9e-7 for
# F(2x2) (19 times). tests/test_winograd.py holds F(2x2) to 1e-5, this holds
# F(4x4) to 1e-4. float64 is held to 1e-12, as F(2x2) is.
REL32 = 1e-4


def _conv_both_ways(x, w, b, padding, dout):
    with minimask.using_backend("cpu"):
        out, cache = conv2d_forward(x, w, b, 1, padding)
        grads = conv2d_backward(dout, cache)
    up = [None if v is None else v.astype(np.float64) for v in (x, w, b, dout)]
    with minimask.using_backend("numpy"):
        ref, ref_cache = conv2d_forward(up[0], up[1], up[2], 1, padding)
        ref_grads = conv2d_backward(up[3], ref_cache)
    return (out, *grads), (ref, *ref_grads), cache


@pytest.mark.parametrize("dtype, rel", [(np.float32, REL32), (np.float64, 1e-12)])
@pytest.mark.parametrize("N, C, F, H, W, padding", CPU_CASES)
def test_cpu_conv2d_goes_through_6x6_tiles_and_matches_numpy(N, C, F, H, W, padding, dtype, rel):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, 3, 3)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    ph, pw = _pair(padding)
    dout = rng.standard_normal((N, F, H + 2 * ph - 2, W + 2 * pw - 2)).astype(dtype)
    got, ref, cache = _conv_both_ways(x, w, b, padding, dout)
    assert isinstance(cache[1], WinogradCache) and cache[1].U.shape == (36, F, C)
    for g, r in zip(got, ref):
        assert g.dtype == dtype
        _close(g, r, rel)


def test_cpu_conv2d_6x6_tiles_gradient_check():
    """Centred differences of the "cpu" conv2d through 6x6 tiles: an
    overhanging output (6 x 7), padding 1, random upstream gradient."""
    rng = np.random.default_rng(12)
    inputs = {"x": rng.standard_normal((2, 8, 6, 7)),
              "w": rng.standard_normal((5, 8, 3, 3)),
              "b": rng.standard_normal(5)}
    with minimask.using_backend("cpu"):
        _, cache = conv2d_forward(inputs["x"], inputs["w"], inputs["b"], 1, 1)
        assert cache[1].U.shape[0] == 36
        errors = check_layer(conv2d_forward, conv2d_backward, inputs, ["x", "w", "b"],
                             seed=14, stride=1, padding=1)
    assert set(errors) == {"x", "w", "b"}
    assert max(errors.values()) < 1e-6, errors


def test_cpu_conv2d_6x6_tiles_serial_and_parallel_agree(thresholds, two_threads):
    """Every kernel and multiply forced parallel, then forced serial: the
    same bits (the kernels add in the same order either way)."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 16, 12, 12)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    dout = rng.standard_normal((2, 16, 12, 12)).astype(np.float32)
    results = []
    for elements, flops in ((0, 0.0), (1 << 60, 1e30)):
        thresholds(elements, flops)
        with minimask.using_backend("cpu"):
            out, cache = conv2d_forward(x, w, b, 1, 1)
            results.append((out, *conv2d_backward(dout, cache)))
    for a, c in zip(*results):
        assert np.array_equal(a, c)


# ----------------------------------------------------------------------
# Which tile the "cpu" conv takes
# ----------------------------------------------------------------------

def _planes_taken(N, C, H, W):
    x = np.random.default_rng(14).standard_normal((N, C, H, W)).astype(np.float32)
    w = np.zeros((C, C, 3, 3), np.float32)
    with minimask.using_backend("cpu"):
        _, cache = conv2d_forward(x, w, None, 1, 1)
    return cache[1].U.shape[0] if isinstance(cache[1], WinogradCache) else None


def test_tile_for_takes_6x6_tiles_from_the_size_and_position_floors(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_POSITIONS", 64)
    monkeypatch.setattr(winograd, "F4_MIN_SIZE", 8)
    monkeypatch.setattr(winograd, "F4_MIN_POSITIONS", 512)
    assert _planes_taken(8, 8, 8, 8) == 36        # 8 x 8 outputs, 512 positions
    assert _planes_taken(7, 8, 8, 8) == 16        # 448 positions
    assert _planes_taken(16, 8, 7, 8) == 16       # 7 rows
    assert _planes_taken(16, 8, 8, 7) == 16       # 7 columns
    assert _planes_taken(1, 8, 32, 32) == 36
    assert _planes_taken(1, 8, 4, 4) is None      # 16 positions: im2col


def test_algorithm_f2x2_keeps_4x4_tiles_and_im2col_none():
    assert _planes_taken(2, 8, 16, 16) == 36
    with winograd.algorithm("f2x2"):
        assert _planes_taken(2, 8, 16, 16) == 16
    with winograd.algorithm("im2col"):
        assert _planes_taken(2, 8, 16, 16) is None
    assert _planes_taken(2, 8, 16, 16) == 36


def test_a_cache_from_6x6_tiles_goes_back_through_them_after_the_setting_changed():
    """The backward follows the forward's tiles (U's 36 planes), whatever
    the algorithm setting is by then."""
    rng = np.random.default_rng(15)
    x = rng.standard_normal((1, 8, 8, 8))
    w = rng.standard_normal((8, 8, 3, 3))
    dout = rng.standard_normal((1, 8, 8, 8))
    with minimask.using_backend("cpu"):
        out, cache = conv2d_forward(x, w, None, 1, 1)
        assert cache[1].U.shape[0] == 36
        with winograd.algorithm("f2x2"):
            dx, dw, _ = conv2d_backward(dout, cache)
    with minimask.using_backend("numpy"):
        _, ref_cache = conv2d_forward(x, w, None, 1, 1)
        dx_e, dw_e, _ = conv2d_backward(dout, ref_cache)
    _close(dx, dx_e, 1e-12)
    _close(dw, dw_e, 1e-12)
