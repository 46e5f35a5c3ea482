"""conv2d and conv_transpose2d: gradient checks, properties, parity, errors."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minimask
from minimask._cuda import cuda_available
from minimask.gradcheck import check_layer, rel_error
from minimask.layers import (conv2d_backward, conv2d_forward, conv_transpose2d_backward,
                             conv_transpose2d_forward)
from tests.conftest import SIMULATED
from tests.strategies import arrays, dims

KERNELS = [(1, 1), (3, 3), (2, 3)]
STRIDES = [1, 2, (1, 2)]
PADDINGS = [0, 1, (1, 0)]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


@st.composite
def conv_cases(draw):
    """Sizes, kernel, stride, padding and bias flag of a conv2d whose output
    is not empty (H + 2 ph >= kh), H and W odd or even up to 6."""
    kh, kw = draw(st.sampled_from(KERNELS))
    stride = draw(st.sampled_from(STRIDES))
    padding = draw(st.sampled_from(PADDINGS))
    ph, pw = _pair(padding)
    N, C, F = draw(dims(1, 2)), draw(dims(1, 3)), draw(dims(1, 3))
    H = draw(st.integers(max(1, kh - 2 * ph), 6))
    W = draw(st.integers(max(1, kw - 2 * pw), 6))
    bias = draw(st.booleans())
    return N, C, F, H, W, (kh, kw), stride, padding, bias


def conv2d_loops(x, w, b, stride, padding):
    """conv2d straight from its definition, one output pixel at a time."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    N, C, H, W = x.shape
    F, _, kh, kw = w.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    OH, OW = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    out = np.zeros((N, F, OH, OW))
    for n in range(N):
        for f in range(F):
            for p in range(OH):
                for q in range(OW):
                    patch = xpad[n, :, p * sh:p * sh + kh, q * sw:q * sw + kw]
                    out[n, f, p, q] = np.sum(patch * w[f]) + (b[f] if b is not None else 0)
    return out


# --------------------------------------------------------------------------
# Gradient checks (float64, centred differences, random upstream gradient)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["numpy", "cpu"])
@given(case=conv_cases(), seed=st.integers(0, 2**32 - 1))
def test_conv2d_gradcheck(backend_name, case, seed):
    N, C, F, H, W, (kh, kw), stride, padding, bias = case
    rng = np.random.default_rng(seed)
    inputs = {"x": rng.standard_normal((N, C, H, W)),
              "w": rng.standard_normal((F, C, kh, kw)),
              "b": rng.standard_normal(F) if bias else None}
    wrt = ["x", "w", "b" if bias else None]
    with minimask.using_backend(backend_name):
        errors = check_layer(conv2d_forward, conv2d_backward, inputs, wrt, seed=seed,
                             stride=stride, padding=padding)
    # conv is linear in each input: the centred difference is exact up to
    # round-off, so 1e-6 leaves a wide margin.
    assert all(e < 1e-6 for e in errors.values()), (case, errors)


@st.composite
def transpose_cases(draw):
    kh, kw = draw(st.sampled_from(KERNELS))
    stride = draw(st.sampled_from(STRIDES))
    padding = draw(st.sampled_from(PADDINGS))
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    N, C_in, C_out = draw(dims(1, 2)), draw(dims(1, 3)), draw(dims(1, 3))
    # the output (H - 1) * sh - 2 ph + kh must be at least 1
    H = draw(st.integers(max(1, -(-(2 * ph - kh + 1) // sh) + 1), 5))
    W = draw(st.integers(max(1, -(-(2 * pw - kw + 1) // sw) + 1), 5))
    bias = draw(st.booleans())
    return N, C_in, C_out, H, W, (kh, kw), stride, padding, bias


@pytest.mark.parametrize("backend_name", ["numpy", "cpu"])
@given(case=transpose_cases(), seed=st.integers(0, 2**32 - 1))
def test_conv_transpose2d_gradcheck(backend_name, case, seed):
    N, C_in, C_out, H, W, (kh, kw), stride, padding, bias = case
    rng = np.random.default_rng(seed)
    inputs = {"x": rng.standard_normal((N, C_in, H, W)),
              "w": rng.standard_normal((C_in, C_out, kh, kw)),
              "b": rng.standard_normal(C_out) if bias else None}
    wrt = ["x", "w", "b" if bias else None]
    with minimask.using_backend(backend_name):
        errors = check_layer(conv_transpose2d_forward, conv_transpose2d_backward, inputs, wrt,
                             seed=seed, stride=stride, padding=padding)
    assert all(e < 1e-6 for e in errors.values()), (case, errors)


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


@given(case=conv_cases(), seed=st.integers(0, 2**32 - 1))
def test_conv2d_matches_its_definition(case, seed):
    N, C, F, H, W, (kh, kw), stride, padding, bias = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((F, C, kh, kw))
    b = rng.standard_normal(F) if bias else None
    expected = conv2d_loops(x, w, b, stride, padding)
    for name in ("numpy", "cpu"):
        with minimask.using_backend(name):
            out, _ = conv2d_forward(x, w, b, stride=stride, padding=padding)
        assert out.shape == expected.shape, (name, out.shape, expected.shape)
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12, err_msg=name)


def test_one_hot_kernel_shifts_the_input(backend):
    # w[f, f] is 3x3 with a single 1 at (0, 1) and padding 1: the output
    # pixel (i, j) reads xpad[i + 0, j + 1] = x[i - 1, j], zero on row 0.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 4, 5))
    w = np.zeros((2, 2, 3, 3))
    w[0, 0, 0, 1] = w[1, 1, 0, 1] = 1.0
    out, _ = conv2d_forward(x, w, None, stride=1, padding=1)
    out = np.asarray(out)
    expected = np.zeros_like(x)
    expected[:, :, 1:, :] = x[:, :, :-1, :]
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, expected)


def test_one_hot_transposed_kernel_shifts_back(backend):
    # The adjoint of that shift is the shift the other way: x[i + 1, j].
    rng = np.random.default_rng(2)
    y = rng.standard_normal((1, 2, 4, 3))
    w = np.zeros((2, 2, 3, 3))
    w[0, 0, 0, 1] = w[1, 1, 0, 1] = 1.0
    out, _ = conv_transpose2d_forward(y, w, None, stride=1, padding=1)
    out = np.asarray(out)
    expected = np.zeros_like(y)
    expected[:, :, :-1, :] = y[:, :, 1:, :]
    np.testing.assert_array_equal(out, expected)


@st.composite
def adjoint_cases(draw):
    """A conv2d whose window grid covers the padded input exactly, so the
    transposed conv maps its output back to the input's size."""
    kh, kw = draw(st.sampled_from(KERNELS))
    stride = draw(st.sampled_from(STRIDES))
    padding = draw(st.sampled_from(PADDINGS))
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    OH, OW = draw(dims(1, 4)), draw(dims(1, 4))
    H, W = (OH - 1) * sh - 2 * ph + kh, (OW - 1) * sw - 2 * pw + kw
    N, C, F = draw(dims(1, 2)), draw(dims(1, 3)), draw(dims(1, 3))
    return N, C, F, H, W, (kh, kw), stride, padding


@given(case=adjoint_cases(), seed=st.integers(0, 2**32 - 1))
def test_conv_transpose2d_is_the_adjoint_of_conv2d(case, seed):
    N, C, F, H, W, kernel, stride, padding = case
    assume(H >= 1 and W >= 1)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((F, C) + kernel)
    for name in ("numpy", "cpu"):
        with minimask.using_backend(name):
            out = conv2d_forward(x, w, None, stride, padding)[0]
            y = rng.standard_normal(out.shape)
            lhs = np.sum(out * y)
            # conv2d's w (F, C, kh, kw) is the transposed conv's (C_in=F, C_out=C, kh, kw)
            back = conv_transpose2d_forward(y, w, None, stride, padding)[0]
        assert back.shape == x.shape, (name, back.shape, x.shape)
        rhs = np.sum(x * back)
        assert abs(lhs - rhs) <= 1e-10 * (abs(lhs) + abs(rhs) + 1), (name, lhs, rhs)


def test_adjoint_identity_on_every_backend(backend):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 5, 4))   # a size the window grid covers exactly
    w = rng.standard_normal((3, 2, 3, 2))
    out = np.asarray(conv2d_forward(x, w, None, 2, (1, 0))[0])
    y = rng.standard_normal(out.shape)
    lhs = np.sum(out * y)
    rhs = np.sum(x * np.asarray(conv_transpose2d_forward(y, w, None, 2, (1, 0))[0]))
    assert abs(lhs - rhs) <= 1e-10 * (abs(lhs) + 1), (lhs, rhs)


def test_1x1_conv_is_an_einsum(backend):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5))
    w = rng.standard_normal((4, 3, 1, 1))
    b = rng.standard_normal(4)
    out, _ = conv2d_forward(x, w, b)
    expected = np.einsum("nchw,fc->nfhw", x, w[:, :, 0, 0]) + b[None, :, None, None]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-12)
    # with stride 2 it reads every other pixel
    out2, _ = conv2d_forward(x, w, None, stride=2)
    expected2 = np.einsum("nchw,fc->nfhw", x[:, :, ::2, ::2], w[:, :, 0, 0])
    np.testing.assert_allclose(np.asarray(out2), expected2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride, padding, kernel, size, expected", [
    (1, 0, (3, 3), (5, 7), (3, 5)),
    (2, 1, (3, 3), (5, 7), (3, 4)),
    ((1, 2), (1, 0), (2, 3), (4, 6), (5, 2)),
])
def test_conv2d_output_size(stride, padding, kernel, size, expected):
    x = np.zeros((1, 1) + size)
    out, _ = conv2d_forward(x, np.zeros((2, 1) + kernel), None, stride, padding)
    assert out.shape == (1, 2) + expected


def test_conv_transpose2d_output_size_and_stride2_upsampling():
    # 2x2 kernel, stride 2: every input pixel paints its own 2x2 block.
    x = np.arange(6, dtype=np.float64).reshape(1, 1, 2, 3)
    w = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    out, _ = conv_transpose2d_forward(x, w, None)
    assert out.shape == (1, 1, 4, 6)
    expected = np.kron(x[0, 0], w[0, 0])
    np.testing.assert_array_equal(out[0, 0], expected)
    out_p, _ = conv_transpose2d_forward(x, w, None, stride=2, padding=1)
    assert out_p.shape == (1, 1, 2, 4)
    np.testing.assert_array_equal(out_p[0, 0], expected[1:-1, 1:-1])


def test_no_bias_gives_no_bias_gradient(backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 3, 3))
    for fwd, bwd, w in [(conv2d_forward, conv2d_backward, rng.standard_normal((2, 2, 1, 1))),
                        (conv_transpose2d_forward, conv_transpose2d_backward,
                         rng.standard_normal((2, 2, 1, 1)))]:
        out, cache = fwd(x, w, None, 1, 0)
        dx, dw, db = bwd(np.ones(np.asarray(out).shape), cache)
        assert db is None
        assert np.asarray(dx).shape == x.shape and np.asarray(dw).shape == w.shape


# --------------------------------------------------------------------------
# Parity: each fast backend against the NumPy reference
# --------------------------------------------------------------------------

# float32 tolerance: |fast - ref| <= ATOL32 + RTOL32 * |ref|. Each output is a
# sum of C kh kw (or F OH OW for dw) products of O(1) values, about 50 here;
# float32 round-off of such a sum is ~50 * 6e-8 = 3e-6 in absolute terms when
# the two backends add in different orders.
ATOL32, RTOL32 = 2e-5, 1e-5
# float64: the same sums, 1e-16 round-off each; 1e-10 of the largest entry.
REL64 = 1e-10

PARITY_CASES = [
    # (layer, x shape, w shape, stride, padding)
    ("conv2d", (2, 3, 7, 6), (4, 3, 3, 3), 1, 1),
    ("conv2d", (1, 3, 6, 9), (2, 3, 2, 3), (1, 2), (1, 0)),
    ("conv_transpose2d", (2, 3, 4, 5), (3, 4, 2, 2), 2, 0),
    ("conv_transpose2d", (1, 2, 3, 5), (2, 3, 3, 3), 2, 1),
]
# The CUDA simulator runs one Python thread per CUDA thread: tiny cases.
TINY_PARITY_CASES = [
    ("conv2d", (1, 2, 3, 4), (3, 2, 2, 3), (1, 2), (1, 0)),
    ("conv_transpose2d", (1, 2, 2, 3), (2, 3, 3, 2), 2, 1),
]

LAYERS = {"conv2d": (conv2d_forward, conv2d_backward),
          "conv_transpose2d": (conv_transpose2d_forward, conv_transpose2d_backward)}


def _run(backend_name, layer, x, w, b, dout_seed, stride, padding):
    forward, backward = LAYERS[layer]
    with minimask.using_backend(backend_name):
        out, cache = forward(x, w, b, stride, padding)
        out = np.asarray(out)
        dout = np.random.default_rng(dout_seed).standard_normal(out.shape).astype(x.dtype)
        grads = backward(dout, cache)
    return (out,) + tuple(np.asarray(g) for g in grads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_backends_agree_with_numpy(fast_backend, dtype):
    cases = TINY_PARITY_CASES if (fast_backend == "cuda" and SIMULATED) else PARITY_CASES
    rng = np.random.default_rng(6)
    for layer, x_shape, w_shape, stride, padding in cases:
        x = rng.standard_normal(x_shape).astype(dtype)
        w = rng.standard_normal(w_shape).astype(dtype)
        n_out = w_shape[0] if layer == "conv2d" else w_shape[1]
        b = rng.standard_normal(n_out).astype(dtype)
        ref = _run("numpy", layer, x, w, b, 7, stride, padding)
        got = _run(fast_backend, layer, x, w, b, 7, stride, padding)
        for name, r, g in zip(["out", "dx", "dw", "db"], ref, got):
            what = f"{layer} {fast_backend} {np.dtype(dtype).name} {name}"
            assert g.dtype == dtype, (what, g.dtype)
            assert g.shape == r.shape, (what, g.shape, r.shape)
            if dtype == np.float64:
                assert rel_error(g, r) < REL64, (what, rel_error(g, r))
            else:
                np.testing.assert_allclose(g, r, rtol=RTOL32, atol=ATOL32, err_msg=what)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------

X = np.zeros((1, 2, 5, 5))
W = np.zeros((3, 2, 3, 3))


@pytest.mark.parametrize("call, message", [
    (lambda: conv2d_forward(np.zeros((2, 5, 5)), W, None), "x must have 4 dimensions"),
    (lambda: conv2d_forward(X, np.zeros((3, 2, 3)), None), "w must have 4 dimensions"),
    (lambda: conv2d_forward(X, np.zeros((3, 4, 3, 3)), None), "w must have C = 2"),
    (lambda: conv2d_forward(X.astype(np.int64), W, None), "x must be float32 or float64"),
    (lambda: conv2d_forward(X, W.astype(np.float32), None), "w must have the dtype of x"),
    (lambda: conv2d_forward(X, W, np.zeros(4)), r"b must have shape \(3,\)"),
    (lambda: conv2d_forward(X, W, np.zeros((3, 1))), "b must have 1 dimensions"),
    (lambda: conv2d_forward(X, np.zeros((3, 2, 7, 7)), None), "output would be empty"),
    (lambda: conv2d_forward(X, np.zeros((3, 2, 7, 7)), None, padding=(1, 0)),
     "output would be empty"),
    (lambda: conv2d_forward(X, W, None, stride=0), "stride must be a positive integer"),
    (lambda: conv2d_forward(X, W, None, padding=-1), "padding must be a non-negative"),
    (lambda: conv_transpose2d_forward(X, np.zeros((3, 2, 2, 2)), None),
     "w must have C_in = 2"),
    (lambda: conv_transpose2d_forward(X.astype(np.int32), np.zeros((2, 3, 2, 2)), None),
     "x must be float32 or float64"),
    (lambda: conv_transpose2d_forward(np.zeros((1, 2, 1, 1)), np.zeros((2, 3, 1, 1)), None,
                                      stride=1, padding=1), "output would be empty"),
    (lambda: conv_transpose2d_forward(X, np.zeros((2, 3, 2, 2)), np.zeros(2)),
     r"b must have shape \(3,\)"),
])
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_backward_checks_dout_shape():
    _, cache = conv2d_forward(X, W, None, 1, 1)
    with pytest.raises(ValueError, match="dout must have the shape of the forward output"):
        conv2d_backward(np.zeros((1, 3, 4, 4)), cache)
    _, cache = conv_transpose2d_forward(X, np.zeros((2, 3, 2, 2)), None)
    with pytest.raises(ValueError, match="dout must have the shape of the forward output"):
        conv_transpose2d_backward(np.zeros((1, 3, 5, 5)), cache)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="runs in the GPU / simulator run (-m cuda)")
def test_device_inputs_give_device_outputs():
    from numba import cuda

    from minimask._checks import is_device_array
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    dout = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    with minimask.using_backend("numpy"):
        out_ref, cache = conv2d_forward(x, w, b, 2, 1)
        grads_ref = conv2d_backward(dout, cache)
    with minimask.using_backend("cuda"):
        out, cache = conv2d_forward(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), 2, 1)
        grads = conv2d_backward(cuda.to_device(dout), cache)
    for name, got, ref in zip(["out", "dx", "dw", "db"], (out,) + grads, (out_ref,) + grads_ref):
        assert is_device_array(got), name
        np.testing.assert_allclose(got.copy_to_host(), ref, rtol=RTOL32, atol=ATOL32, err_msg=name)


# --------------------------------------------------------------------------
# The blocked CPU path (conv.BLOCK_BYTES): blocks of columns of cols
# --------------------------------------------------------------------------

BLOCK_CASES = [
    # (x shape, w shape, stride, padding): odd sizes, stride 2, padding,
    # 1x1, kernels wider than tall
    ((2, 3, 7, 9), (4, 3, 3, 3), 1, 1),
    ((4, 3, 17, 15), (5, 3, 3, 3), 2, 1),
    ((2, 4, 9, 8), (3, 4, 1, 1), 1, 0),
    ((3, 2, 9, 11), (2, 2, 2, 3), (2, 1), (0, 1)),
    ((3, 2, 15, 13), (2, 2, 3, 3), 2, 0),
]


@pytest.mark.parametrize("case", BLOCK_CASES)
@pytest.mark.parametrize("columns", [64, 65, 100])
def test_blocked_cpu_conv_agrees_with_numpy(monkeypatch, case, columns):
    """Blocks of 64, 65 or 100 columns: boundaries in the middle of a row of
    output positions and between images, a short last block. float64; the
    only change from the reference is the order in which dx adds the
    blocks' contributions, so 1e-13 relative to the largest value."""
    from minimask.layers import conv
    x_shape, w_shape, stride, padding = case
    rng = np.random.default_rng(11)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    with minimask.using_backend("numpy"):
        out, cache = conv2d_forward(x, w, b, stride, padding)
        dout = rng.standard_normal(out.shape)
        ref = (out, *conv2d_backward(dout, cache))
    rows = w_shape[1] * w_shape[2] * w_shape[3]
    monkeypatch.setattr(conv, "BLOCK_BYTES", columns * rows * 8)
    assert conv.block_columns(rows, 8) == columns
    n_cols = out.shape[0] * out.shape[2] * out.shape[3]
    assert n_cols > columns            # really more than one block
    with minimask.using_backend("cpu"):
        out, cache = conv2d_forward(x, w, b, stride, padding)
        got = (out, *conv2d_backward(dout, cache))
    for name, g, r in zip(["out", "dx", "dw", "db"], got, ref):
        assert np.abs(g - r).max() <= 1e-13 * np.abs(r).max(), (name, case, columns)


@pytest.mark.parametrize("j0, j1", [(0, 70), (5, 70), (13, 14), (36, 41), (61, 67), (67, 70)])
def test_im2col_block_and_col2im_block_match_the_whole(j0, j1):
    """Any column range of the block kernels equals that range of the whole
    im2col; col2im of the blocks, added up, equals col2im of the whole."""
    from minimask.layers import conv
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 7, 9))
    g = conv.Geometry(2, 3, 7, 9, 3, 2, 1, 2, 1, 1, 7, 5)  # OW = (9 + 2 - 2) // 2 + 1
    whole = conv.im2col_numpy(x, g)
    assert whole.shape == (18, 70)
    block = np.full((18, j1 - j0 + 2), np.nan)
    conv._im2col_block_cpu(x, 2, block, j0, j1, 3, 2, 1, 2, 1, 1, 7, 5)
    np.testing.assert_array_equal(block[:, 2:], whole[:, j0:j1])
    assert np.isnan(block[:, :2]).all()
    dcols = rng.standard_normal(whole.shape)
    dx = np.zeros(x.shape)
    for a, b in ((0, j0), (j0, j1), (j1, whole.shape[1])):
        if b > a:
            conv._col2im_block_add_cpu(np.ascontiguousarray(dcols[:, a:b]), 0, dx, a, b,
                                       3, 2, 1, 2, 1, 1, 7, 5)
    np.testing.assert_allclose(dx, conv.col2im_numpy(dcols, g), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("geometry", [
    (2, 3, 7, 9, 3, 3, 1, 1, 1, 1), (2, 3, 9, 7, 3, 2, 2, 1, 1, 0), (1, 2, 5, 5, 3, 3, 2, 2, 2, 2),
    (2, 2, 4, 4, 1, 1, 1, 1, 1, 1), (1, 1, 2, 2, 3, 3, 1, 1, 2, 2), (3, 4, 6, 5, 2, 3, 2, 2, 0, 1)])
def test_numpy_strided_im2col_of_the_cpu_backend_equals_the_reference(geometry):
    """The CPU backend's one-thread im2col (no padded copy: zeros written
    for the strips in the padding, including windows wholly in it) gives
    exactly the reference's columns."""
    from minimask.layers import conv
    N, C, H, W, kh, kw, sh, sw, ph, pw = geometry
    g = conv.Geometry(N, C, H, W, kh, kw, sh, sw, ph, pw,
                      (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)
    x = np.random.default_rng(13).standard_normal((N, C, H, W))
    cols = np.full((C * kh * kw, N * g.OH * g.OW), np.nan)
    conv._im2col_strided(x, g, cols)
    np.testing.assert_array_equal(cols, conv.im2col_numpy(x, g))
