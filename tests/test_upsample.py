"""Nearest-neighbour upsampling: gradient checks, properties, input errors,
and parity of the fast backends with the NumPy reference."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minimask
from minimask._cuda import cuda
from minimask.gradcheck import check_layer
from minimask.layers import upsample_nearest2d_backward, upsample_nearest2d_forward
from tests.conftest import SIMULATED
from tests.strategies import arrays, dims

SCALES = [1, 2, 3, (2, 3), (3, 1)]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def direct_upsample(x, scale):
    """The definition, element by element."""
    sh, sw = _pair(scale)
    N, C, H, W = x.shape
    out = np.empty((N, C, H * sh, W * sw), dtype=x.dtype)
    for i in range(H * sh):
        for j in range(W * sw):
            out[:, :, i, j] = x[:, :, i // sh, j // sw]
    return out


# --------------------------------------------------------------------------
# Gradient check (float64, random dout; upsampling is linear: no kinks)
# --------------------------------------------------------------------------


@given(data=st.data(), scale=st.sampled_from(SCALES))
def test_upsample_gradcheck(data, scale):
    shape = data.draw(st.tuples(dims(1, 2), dims(1, 3), dims(1, 5), dims(1, 5)))
    x = data.draw(arrays(shape))
    with minimask.using_backend("numpy"):
        errors = check_layer(upsample_nearest2d_forward, upsample_nearest2d_backward,
                             {"x": x}, ["x"], scale=scale)
    assert errors["x"] < 1e-6, errors


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_forward_is_the_definition(backend, scale, rng):
    x = rng.standard_normal((2, 3, 3, 4))
    out = np.asarray(upsample_nearest2d_forward(x, scale)[0])
    np.testing.assert_array_equal(out, direct_upsample(x, scale))
    sh, sw = _pair(scale)
    np.testing.assert_array_equal(out[:, :, ::sh, ::sw], x)   # every block starts with x


@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_backward_of_ones_counts_the_block(backend, scale, rng):
    x = rng.standard_normal((2, 2, 3, 5))
    out, cache = upsample_nearest2d_forward(x, scale)
    dx = np.asarray(upsample_nearest2d_backward(np.ones(np.asarray(out).shape), cache))
    sh, sw = _pair(scale)
    np.testing.assert_array_equal(dx, np.full(x.shape, float(sh * sw)))


def test_backward_is_the_adjoint(backend, rng):
    """<up(x), d> = <x, up^T(d)> for random x and d: the backward is the
    transpose of the forward, with nothing summed into a wrong pixel."""
    x = rng.standard_normal((2, 3, 4, 3))
    out, cache = upsample_nearest2d_forward(x, (2, 3))
    d = rng.standard_normal(np.asarray(out).shape)
    dx = np.asarray(upsample_nearest2d_backward(d, cache))
    np.testing.assert_allclose(np.sum(np.asarray(out) * d), np.sum(x * dx), rtol=1e-12)
    # and block by block
    expected = d.reshape(2, 3, 4, 2, 3, 3).sum(axis=(3, 5))
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-12)


def test_scale_one_is_identity(backend, rng):
    x = rng.standard_normal((1, 2, 3, 3))
    out, cache = upsample_nearest2d_forward(x, 1)
    np.testing.assert_array_equal(np.asarray(out), x)
    np.testing.assert_array_equal(np.asarray(upsample_nearest2d_backward(x, cache)), x)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_errors():
    x = np.ones((1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"x must have 4 dimensions \(N, C, H, W\), got shape \(3, 3\)"):
        upsample_nearest2d_forward(np.ones((3, 3)))
    with pytest.raises(ValueError, match="x must be float32 or float64, got dtype int32"):
        upsample_nearest2d_forward(np.ones((1, 2, 3, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="scale must be a positive integer, got 0"):
        upsample_nearest2d_forward(x, 0)
    with pytest.raises(ValueError, match="scale must be a positive integer, got 1.5"):
        upsample_nearest2d_forward(x, 1.5)
    with pytest.raises(ValueError, match="scale must be a positive integer, got -2"):
        upsample_nearest2d_forward(x, (2, -2))
    _, cache = upsample_nearest2d_forward(x, 2)
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward output \(1, 2, 6, 6\)"):
        upsample_nearest2d_backward(np.ones((1, 2, 6, 5)), cache)


# --------------------------------------------------------------------------
# Parity: fast backends against the NumPy reference
# --------------------------------------------------------------------------

# The forward copies values: exact. dx sums sh*sw values per pixel, maybe
# in another order: float64 to 1e-12; float32 to atol 1e-6 + 1e-6 |ref| (a
# few ulps of sums of up to 9 values of order 1).
TOL = {np.float64: (1e-12, 1e-12), np.float32: (1e-6, 1e-6)}

PARITY_CASES = [((2, 2, 3, 3), 2), ((1, 3, 2, 3), (2, 3)), ((1, 2, 3, 2), 3), ((2, 1, 2, 2), 1)]
if not SIMULATED:
    PARITY_CASES += [((2, 16, 13, 17), 2), ((1, 8, 9, 7), (3, 2))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", PARITY_CASES, ids=str)
def test_parity_with_numpy(fast_backend, dtype, case, rng):
    shape, scale = case
    x = rng.standard_normal(shape).astype(dtype)
    with minimask.using_backend("numpy"):
        ref, ref_cache = upsample_nearest2d_forward(x, scale)
        dout = rng.standard_normal(ref.shape).astype(dtype)
        dref = upsample_nearest2d_backward(dout, ref_cache)
    with minimask.using_backend(fast_backend):
        out, cache = upsample_nearest2d_forward(x, scale)
        dx = upsample_nearest2d_backward(dout, cache)
    out, dx = np.asarray(out), np.asarray(dx)
    assert out.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(out, ref)
    atol, rtol = TOL[dtype]
    np.testing.assert_allclose(dx, dref, rtol=rtol, atol=atol)


def test_device_arrays_in_and_out(fast_backend, rng):
    x = rng.standard_normal((1, 2, 3, 2))
    dout = rng.standard_normal((1, 2, 6, 4))
    with minimask.using_backend("numpy"):
        ref, ref_cache = upsample_nearest2d_forward(x, 2)
        dref = upsample_nearest2d_backward(dout, ref_cache)
    on_cuda = fast_backend == "cuda"
    with minimask.using_backend(fast_backend):
        out, cache = upsample_nearest2d_forward(cuda.to_device(x) if on_cuda else x, 2)
        dx = upsample_nearest2d_backward(cuda.to_device(dout) if on_cuda else dout, cache)
    for got, want in ((out, ref), (dx, dref)):
        if on_cuda:  # device arrays in, device arrays out
            assert hasattr(got, "copy_to_host"), type(got)
        if not on_cuda:
            assert type(got) is np.ndarray
        got = got.copy_to_host() if hasattr(got, "copy_to_host") else got
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
