"""ReLU and sigmoid: gradient checks, properties, parity across backends."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minimask
from minimask._cuda import cuda_available
from minimask.gradcheck import check_layer
from minimask.layers import relu_backward, relu_forward, sigmoid_backward, sigmoid_forward
from tests.strategies import arrays, dims


@given(data=st.data())
def test_relu_gradcheck(data):
    shape = data.draw(st.tuples(dims(), dims(), dims()))
    x = data.draw(arrays(shape, away_from=0.0))
    with minimask.using_backend("numpy"):
        errors = check_layer(relu_forward, relu_backward, {"x": x}, ["x"])
    assert errors["x"] < 1e-6, errors


@given(data=st.data())
def test_sigmoid_gradcheck(data):
    shape = data.draw(st.tuples(dims(), dims()))
    x = data.draw(arrays(shape, lo=-6, hi=6))
    with minimask.using_backend("numpy"):
        errors = check_layer(sigmoid_forward, sigmoid_backward, {"x": x}, ["x"])
    assert errors["x"] < 1e-6, errors


def test_sigmoid_is_finite_and_exact_at_extremes(backend):
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    y, _ = sigmoid_forward(x)
    y = np.asarray(y)
    assert np.all(np.isfinite(y))
    assert y[2] == 0.5
    assert y[0] == 0.0 and y[-1] == 1.0
    # sigmoid(-x) = 1 - sigmoid(x)
    np.testing.assert_allclose(y[::-1], 1 - y, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_agree_with_reference(fast_backend, dtype, rng):
    x = rng.standard_normal((2, 3, 5, 7)).astype(dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    for fwd, bwd in [(relu_forward, relu_backward), (sigmoid_forward, sigmoid_backward)]:
        with minimask.using_backend("numpy"):
            ref, cache = fwd(x)
            dref = bwd(dout, cache)
        with minimask.using_backend(fast_backend):
            out, cache = fwd(x)
            dx = bwd(dout, cache)
        out, dx = np.asarray(out), np.asarray(dx)
        assert out.dtype == dtype and dx.dtype == dtype
        rtol = 1e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(dx, dref, rtol=rtol, atol=rtol)


def test_relu_refuses_integer_input():
    with pytest.raises(ValueError, match="x must be float32 or float64"):
        relu_forward(np.arange(4))


def test_relu_backward_checks_dout_shape():
    _, cache = relu_forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="dout must have the shape"):
        relu_backward(np.ones((3, 2)), cache)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="runs in the GPU / simulator run (-m cuda)")
def test_device_arrays_in_give_device_arrays_out():
    from minimask._cuda import cuda
    x = np.random.default_rng(0).standard_normal((3, 4))
    with minimask.using_backend("cuda"):
        d_out, cache = relu_forward(cuda.to_device(x))
        assert hasattr(d_out, "copy_to_host")
        d_dx = relu_backward(cuda.to_device(np.ones_like(x)), cache)
        assert hasattr(d_dx, "copy_to_host")
    np.testing.assert_array_equal(d_out.copy_to_host(), np.maximum(x, 0))
    np.testing.assert_array_equal(d_dx.copy_to_host(), (x > 0).astype(float))


def test_nan_passes_through_relu_on_every_backend(backend):
    # a NaN turned into 0 would hide a diverged network from the loss
    x = np.array([np.nan, -1.0, 2.0, np.inf, -np.inf])
    out, _ = relu_forward(x)
    out = np.asarray(out.copy_to_host() if hasattr(out, "copy_to_host") else out)
    np.testing.assert_array_equal(out, [np.nan, 0.0, 2.0, np.inf, 0.0])
