"""Max pooling: gradient checks, properties (identity, window max, ties,
padding), input errors, and parity of the fast backends with the NumPy
reference (overlapping windows included, to catch scatter races)."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minimask
from minimask._cuda import cuda
from minimask.gradcheck import check_layer
from minimask.layers import max_pool2d_backward, max_pool2d_forward
from tests.conftest import SIMULATED
from tests.strategies import seeds

# --------------------------------------------------------------------------
# Helpers and strategies
# --------------------------------------------------------------------------


def spaced_values(shape, rng, spacing=0.1):
    """Distinct values at least ``spacing - 0.02`` apart: a random
    permutation of a grid of spaced values, centred on 0, plus small
    noise. A centred difference (h = 1e-6) can then never flip an argmax."""
    size = int(np.prod(shape))
    grid = (rng.permutation(size) - size / 2) * spacing
    return (grid + rng.uniform(-0.01, 0.01, size)).reshape(shape)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def direct_max_pool(x, kernel, stride, padding):
    """The definition, one window at a time: (max, first argmax in the
    window's row-major order) over the real pixels of each window."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    out = np.empty((N, C, Ho, Wo), dtype=x.dtype)
    arg = np.empty((N, C, Ho, Wo), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    best, best_at = None, None
                    for a in range(kh):
                        for b in range(kw):
                            r, s = i * sh - ph + a, j * sw - pw + b
                            if 0 <= r < H and 0 <= s < W and (best is None or x[n, c, r, s] > best):
                                best, best_at = x[n, c, r, s], r * W + s
                    out[n, c, i, j], arg[n, c, i, j] = best, best_at
    return out, arg


@st.composite
def pool_configs(draw):
    """(kernel, stride, padding, H, W): kernel 2, 3 or (2, 3); stride 1, 2
    or (1, 2); padding 0 or 1 where 2p <= k; H, W at least the kernel."""
    kernel = draw(st.sampled_from([2, 3, (2, 3)]))
    stride = draw(st.sampled_from([1, 2, (1, 2), (2, 1)]))
    padding = draw(st.sampled_from([0, 1, (0, 1), (1, 0)]))
    (kh, kw), (ph, pw) = _pair(kernel), _pair(padding)
    assume(2 * ph <= kh and 2 * pw <= kw)
    H = draw(st.integers(kh, 7))
    W = draw(st.integers(kw, 7))
    return kernel, stride, padding, H, W


# --------------------------------------------------------------------------
# Gradient check (float64, random dout, argmax margins of ~0.08)
# --------------------------------------------------------------------------


@given(config=pool_configs(), N=st.integers(1, 2), C=st.integers(1, 3), seed=seeds())
def test_max_pool_gradcheck(config, N, C, seed):
    """On the reference; the fast backends are held to it by the parity
    tests below (a centred difference costs two forward calls per input
    element, and a parallel Numba call has ~1 ms of dispatch overhead)."""
    kernel, stride, padding, H, W = config
    x = spaced_values((N, C, H, W), np.random.default_rng(seed))
    with minimask.using_backend("numpy"):
        errors = check_layer(max_pool2d_forward, max_pool2d_backward, {"x": x}, ["x"],
                             kernel_size=kernel, stride=stride, padding=padding, seed=seed)
    assert errors["x"] < 1e-6, errors


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["numpy", "cpu"])
@given(config=pool_configs(), seed=seeds(), ties=st.booleans())
def test_forward_is_the_window_max(backend_name, config, seed, ties):
    """Against the definition, on random shapes; with ties=True the values
    come from a set of 3, so most windows hold repeated maxima and the
    first-in-row-major rule is exercised."""
    kernel, stride, padding, H, W = config
    rng = np.random.default_rng(seed)
    shape = (2, 2, H, W)
    x = rng.integers(-1, 2, size=shape).astype(np.float64) if ties else spaced_values(shape, rng)
    with minimask.using_backend(backend_name):
        out, cache = max_pool2d_forward(x, kernel, stride, padding)
    ref, ref_arg = direct_max_pool(x, kernel, stride, padding)
    np.testing.assert_array_equal(np.asarray(out), ref)
    np.testing.assert_array_equal(np.asarray(cache[0]), ref_arg)


def test_output_bounds_every_window_element(backend, rng):
    x = spaced_values((2, 2, 7, 6), rng)
    k, s, p = 3, 2, 1
    out = np.asarray(max_pool2d_forward(x, k, s, p)[0])
    Ho, Wo = out.shape[2:]
    for i in range(Ho):
        for j in range(Wo):
            r0, c0 = i * s - p, j * s - p
            window = x[:, :, max(r0, 0):r0 + k, max(c0, 0):c0 + k]
            assert np.all(out[:, :, i, j][:, :, None, None] >= window)
            np.testing.assert_array_equal(out[:, :, i, j], window.max(axis=(2, 3)))


def test_unit_kernel_is_identity(backend, rng):
    x = rng.standard_normal((2, 3, 4, 5))
    out, cache = max_pool2d_forward(x, 1, 1)
    np.testing.assert_array_equal(np.asarray(out), x)
    dout = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(np.asarray(max_pool2d_backward(dout, cache)), dout)


def test_tie_goes_to_first_in_row_major_order(backend):
    # one 2x2 window [[1, 3], [3, 2]]: the maximum 3 sits at (0, 1) and (1, 0)
    x = np.array([[[[1.0, 3.0], [3.0, 2.0]]]])
    out, cache = max_pool2d_forward(x, 2, 2)
    dx = np.asarray(max_pool2d_backward(np.array([[[[5.0]]]]), cache))
    assert np.asarray(out).item() == 3.0
    np.testing.assert_array_equal(dx, [[[[0.0, 5.0], [0.0, 0.0]]]])
    # a constant map: every window sends its gradient to its top-left real pixel
    x = np.ones((1, 1, 4, 4))
    out, cache = max_pool2d_forward(x, 2, 2, 1)   # windows start at row/col -1
    dout = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    dx = np.asarray(max_pool2d_backward(dout, cache))
    expected = np.zeros((4, 4))
    for i in range(3):
        for j in range(3):
            expected[max(2 * i - 1, 0), max(2 * j - 1, 0)] += dout[0, 0, i, j]
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_backward_conserves_the_total_and_routes_to_argmax(backend, rng):
    x = spaced_values((2, 3, 7, 7), rng)
    out, cache = max_pool2d_forward(x, 3, 1, 1)   # heavily overlapping windows
    dout = rng.standard_normal(np.asarray(out).shape)
    dx = np.asarray(max_pool2d_backward(dout, cache))
    np.testing.assert_allclose(dx.sum(), dout.sum(), rtol=1e-12)
    # a pixel that is nobody's argmax gets exactly nothing
    _, arg = direct_max_pool(x, 3, 1, 1)
    hit = np.zeros(x.shape, dtype=bool).reshape(2, 3, -1)
    for n in range(2):
        for c in range(3):
            hit[n, c, arg[n, c].ravel()] = True
    assert np.all(dx.reshape(2, 3, -1)[~hit] == 0)


def test_padding_never_wins(backend, rng):
    """All values negative (so a zero pad would win) and some -inf: padding
    counts as -inf and still never wins, since every window holds a real
    pixel when 2p <= k; an all -inf window returns -inf from a real pixel."""
    x = -100.0 - np.abs(spaced_values((1, 2, 5, 4), rng))
    x[0, 1] = -np.inf
    out, cache = max_pool2d_forward(x, 2, 2, 1)
    out = np.asarray(out)
    ref, ref_arg = direct_max_pool(x, 2, 2, 1)
    np.testing.assert_array_equal(out, ref)
    assert np.all(out[0, 0] < -100) and np.all(out[0, 1] == -np.inf)
    arg = np.asarray(cache[0])
    assert arg.min() >= 0 and arg.max() < 5 * 4
    np.testing.assert_array_equal(arg, ref_arg)
    dx = np.asarray(max_pool2d_backward(np.ones(out.shape), cache))
    assert dx.sum() == out.size


def test_nan_propagates(backend):
    x = np.zeros((1, 1, 2, 4))
    x[0, 0, 1, 0] = np.nan
    out = np.asarray(max_pool2d_forward(x, 2, 2)[0])
    assert np.isnan(out[0, 0, 0, 0]) and out[0, 0, 0, 1] == 0.0


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_errors():
    x = np.ones((1, 2, 5, 5))
    with pytest.raises(ValueError, match=r"x must have 4 dimensions \(N, C, H, W\), got shape \(5, 5\)"):
        max_pool2d_forward(np.ones((5, 5)), 2, 2)
    with pytest.raises(ValueError, match="x must be float32 or float64, got dtype int64"):
        max_pool2d_forward(np.ones((1, 2, 5, 5), dtype=np.int64), 2, 2)
    with pytest.raises(ValueError, match="padding must be at most half the kernel size"):
        max_pool2d_forward(x, 3, 1, 2)
    with pytest.raises(ValueError, match="padding must be at most half the kernel size"):
        max_pool2d_forward(x, (2, 3), 1, (2, 1))
    with pytest.raises(ValueError, match="kernel_size .* is larger than the padded input"):
        max_pool2d_forward(x, (6, 2), 1)
    with pytest.raises(ValueError, match="kernel_size must be a positive integer"):
        max_pool2d_forward(x, 0, 1)
    with pytest.raises(ValueError, match="stride must be a positive integer"):
        max_pool2d_forward(x, 2, 0)
    with pytest.raises(ValueError, match="padding must be a non-negative integer"):
        max_pool2d_forward(x, 2, 1, -1)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        max_pool2d_forward(x, (2, 2, 2), 1)
    _, cache = max_pool2d_forward(x, 2, 2)
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward output \(1, 2, 2, 2\)"):
        max_pool2d_backward(np.ones((1, 2, 3, 3)), cache)


# --------------------------------------------------------------------------
# Parity: fast backends against the NumPy reference
# --------------------------------------------------------------------------

# The forward is a selection, so it is exact on every backend. dx sums at
# most kh*kw dout values per pixel, possibly in another order (CUDA atomics
# have none): float64 to 1e-12, float32 to atol 1e-6 + 1e-6 |ref| (a few ulps
# of sums of O(1) values).
TOL = {np.float64: (1e-12, 1e-12), np.float32: (1e-6, 1e-6)}

PARITY_CASES = [  # (N, C, H, W), kernel, stride, padding
    ((2, 2, 5, 5), 3, 2, 1),          # the ResNet stem's pool
    ((1, 2, 5, 6), 3, 1, 1),          # every pixel in up to 9 windows
    ((2, 1, 5, 7), (2, 3), (1, 2), (1, 0)),
    ((1, 3, 4, 4), 2, 2, 0),
]
if not SIMULATED:
    PARITY_CASES += [((4, 16, 17, 19), 3, 1, 1),      # many planes, many collisions
                     ((2, 8, 32, 32), 3, 2, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", PARITY_CASES, ids=str)
def test_parity_with_numpy(fast_backend, dtype, case, rng):
    shape, k, s, p = case
    # a few ties on purpose (values rounded to a coarse grid): the argmax
    # rule must agree across backends too
    x = np.round(rng.standard_normal(shape) * 4) / 4
    x = x.astype(dtype)
    with minimask.using_backend("numpy"):
        ref, ref_cache = max_pool2d_forward(x, k, s, p)
        dout = rng.standard_normal(ref.shape).astype(dtype)
        dref = max_pool2d_backward(dout, ref_cache)
    with minimask.using_backend(fast_backend):
        out, cache = max_pool2d_forward(x, k, s, p)
        dx = max_pool2d_backward(dout, cache)
    out, dx, arg = np.asarray(out), np.asarray(dx), np.asarray(cache[0])
    assert out.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(arg, ref_cache[0])
    atol, rtol = TOL[dtype]
    np.testing.assert_allclose(dx, dref, rtol=rtol, atol=atol)


def test_device_arrays_in_and_out(fast_backend, rng):
    x = spaced_values((1, 2, 5, 5), rng)
    dout = rng.standard_normal((1, 2, 3, 3))
    with minimask.using_backend("numpy"):
        ref, ref_cache = max_pool2d_forward(x, 3, 2, 1)
        dref = max_pool2d_backward(dout, ref_cache)
    on_cuda = fast_backend == "cuda"
    with minimask.using_backend(fast_backend):
        out, cache = max_pool2d_forward(cuda.to_device(x) if on_cuda else x, 3, 2, 1)
        dx = max_pool2d_backward(cuda.to_device(dout) if on_cuda else dout, cache)
    for got, want in ((out, ref), (dx, dref)):
        if on_cuda:  # device arrays in, device arrays out
            assert hasattr(got, "copy_to_host"), type(got)
        if not on_cuda:
            assert type(got) is np.ndarray
        got = got.copy_to_host() if hasattr(got, "copy_to_host") else got
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
