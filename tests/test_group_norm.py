"""GroupNorm: gradient checks, properties (instance norm, layer norm,
normalised statistics), input errors, and parity of the fast backends with
the NumPy reference."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minimask
from minimask._cuda import cuda
from minimask.gradcheck import check_layer, rel_error
from minimask.layers import group_norm_backward, group_norm_forward
from tests.conftest import SIMULATED
from tests.strategies import seeds

# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------


@st.composite
def gn_problems(draw, max_c=6, odd_hw=(1, 3, 5)):
    """(x, gamma, beta, num_groups) in float64. num_groups is any divisor of
    C, so G = 1 (layer norm), G = C (instance norm) and the cases between
    are all drawn. x has a non-zero mean (3) so that a missing mean
    subtraction shows, and every group a variance well away from zero (no
    kinks in GroupNorm, but a near-constant group would make the centred
    difference poorly conditioned)."""
    N = draw(st.integers(1, 2))
    C = draw(st.integers(1, max_c))
    G = draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]))
    H = draw(st.sampled_from(odd_hw))
    W = draw(st.sampled_from(odd_hw))
    rng = np.random.default_rng(draw(seeds()))
    x = rng.uniform(-2.0, 2.0, size=(N, C, H, W)) + 3.0
    group_var = x.reshape(N, G, -1).var(axis=2)
    # A group of 1 or 2 values normalises to fixed values (0, or -1 and +1
    # up to eps): its true dx is ~eps-small and the check would compare two
    # round-off noises. From 3 values on, xhat keeps a degree of freedom.
    assume(x.size // (N * G) >= 3 and group_var.min() > 0.05)
    gamma = rng.uniform(0.5, 2.0, size=C) * rng.choice([-1.0, 1.0], size=C)
    beta = rng.standard_normal(C)
    return x, gamma, beta, G


# --------------------------------------------------------------------------
# Gradient checks (float64, centred differences, random dout)
# --------------------------------------------------------------------------


def _gradcheck(backend_name, problem, eps):
    x, gamma, beta, G = problem
    with minimask.using_backend(backend_name):
        errors = check_layer(group_norm_forward, group_norm_backward,
                             {"x": x, "gamma": gamma, "beta": beta},
                             ["x", "gamma", "beta"], num_groups=G, eps=eps)
    assert max(errors.values()) < 1e-6, errors


@given(problem=gn_problems(), eps=st.sampled_from([1e-8, 1e-5]))
def test_group_norm_gradcheck(problem, eps):
    _gradcheck("numpy", problem, eps)


@settings(max_examples=8)
@given(problem=gn_problems(), eps=st.sampled_from([1e-8, 1e-5]))
def test_group_norm_gradcheck_cpu_kernels(problem, eps):
    """The Numba kernels checked directly too, on fewer examples: each
    centred difference is a parallel Numba call with ~1 ms of dispatch
    overhead, and parity with the reference is tested below."""
    _gradcheck("cpu", problem, eps)


# --------------------------------------------------------------------------
# Properties, on every backend
# --------------------------------------------------------------------------


def _problem(rng, shape, offset=3.0):
    x = rng.uniform(-2.0, 2.0, size=shape) + offset
    C = shape[1]
    return x, rng.uniform(0.5, 2.0, size=C), rng.standard_normal(C)


def test_group_statistics_are_normalised(backend, rng):
    N, C, H, W, G, eps = 2, 4, 3, 3, 2, 1e-5
    x = rng.uniform(-2.0, 2.0, size=(N, C, H, W)) * 5 + 7
    out, _ = group_norm_forward(x, np.ones(C), np.zeros(C), G, eps=eps)
    og = np.asarray(out).reshape(N, G, -1)
    var_x = x.reshape(N, G, -1).var(axis=2)
    # the biased variance of xhat is var / (var + eps) exactly, not 1
    np.testing.assert_allclose(og.mean(axis=2), 0.0, atol=1e-12)
    np.testing.assert_allclose(og.var(axis=2), var_x / (var_x + eps), rtol=1e-12)


def test_one_group_per_channel_is_instance_norm(backend, rng):
    N, C, H, W, eps = 2, 3, 3, 5, 1e-5
    x, gamma, beta = _problem(rng, (N, C, H, W))
    out, _ = group_norm_forward(x, gamma, beta, num_groups=C, eps=eps)
    mu = x.mean(axis=(2, 3), keepdims=True)
    var = x.var(axis=(2, 3), keepdims=True)
    expected = (x - mu) / np.sqrt(var + eps) * gamma[:, None, None] + beta[:, None, None]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-12)


def test_one_group_is_layer_norm(backend, rng):
    N, C, H, W, eps = 2, 4, 3, 3, 1e-5
    x, gamma, beta = _problem(rng, (N, C, H, W))
    out, _ = group_norm_forward(x, gamma, beta, num_groups=1, eps=eps)
    mu = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    expected = (x - mu) / np.sqrt(var + eps) * gamma[:, None, None] + beta[:, None, None]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-12)


def test_gradients_have_closed_forms_for_simple_dout(backend, rng):
    """With a constant dout and a constant gamma, dbeta is N*H*W times the
    constant, dgamma the sum of dout * xhat, and dx is exactly zero: the
    loss is then sum(c * xhat) = 0 for every x (xhat has zero mean in each
    group), so no change of x can move it."""
    N, C, H, W, G = 2, 4, 3, 3, 2
    x, _, beta = _problem(rng, (N, C, H, W))
    gamma = np.full(C, 1.7)
    out, cache = group_norm_forward(x, gamma, beta, G)
    dout = np.ones_like(x) * 0.3
    dx, dgamma, dbeta = (np.asarray(a) for a in group_norm_backward(dout, cache))
    np.testing.assert_allclose(dbeta, 0.3 * N * H * W, rtol=1e-12)
    np.testing.assert_allclose(dx, 0.0, atol=1e-12)
    xhat = (np.asarray(out) - beta[:, None, None]) / 1.7
    np.testing.assert_allclose(dgamma, (0.3 * xhat).sum(axis=(0, 2, 3)), atol=1e-12)


def test_stable_for_large_mean(backend, rng):
    """A large mean and a small spread: the one-pass E[x^2] - E[x]^2 would
    lose every digit here; the two-pass variance does not."""
    x = 1e4 + rng.uniform(-1.0, 1.0, size=(1, 2, 3, 3)).astype(np.float32)
    x = x.astype(np.float32)
    C = 2
    out, _ = group_norm_forward(x, np.ones(C, np.float32), np.zeros(C, np.float32), 1, eps=0.0)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean()) / x64.std()
    # float32 round-off of x - mean at 1e4 is ~1e-3 of the spread: tolerance 1e-3
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-3)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_errors():
    x = np.ones((2, 4, 3, 3))
    g = np.ones(4)
    with pytest.raises(ValueError, match=r"x must have 4 dimensions \(N, C, H, W\), got shape \(4, 3, 3\)"):
        group_norm_forward(np.ones((4, 3, 3)), g, g, 2)
    with pytest.raises(ValueError, match=r"gamma must have shape \(C,\) = \(4,\), got shape \(3,\)"):
        group_norm_forward(x, np.ones(3), g, 2)
    with pytest.raises(ValueError, match=r"beta must have 1 dimensions"):
        group_norm_forward(x, g, np.ones((4, 1)), 2)
    with pytest.raises(ValueError, match="num_groups must divide the number of channels C = 4, got 3"):
        group_norm_forward(x, g, g, 3)
    with pytest.raises(ValueError, match="num_groups must be a positive integer"):
        group_norm_forward(x, g, g, 0)
    with pytest.raises(ValueError, match="x must be float32 or float64, got dtype int64"):
        group_norm_forward(np.ones((2, 4, 3, 3), dtype=np.int64), g, g, 2)
    with pytest.raises(ValueError, match="gamma must have the dtype of x"):
        group_norm_forward(x, g.astype(np.float32), g, 2)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        group_norm_forward(x, g, g, 2, eps=-1.0)
    _, cache = group_norm_forward(x, g, g, 2)
    with pytest.raises(ValueError, match="dout must have the shape of x"):
        group_norm_backward(np.ones((2, 4, 3, 2)), cache)


# --------------------------------------------------------------------------
# Parity: fast backends against the NumPy reference
# --------------------------------------------------------------------------

# float64: the same sums in another order, so ~1e-15 relative; 1e-10 leaves
# room for cancellation in dx. float32: the reference accumulates in
# float32 and the fast paths in float64; round-off of a few float32 ulps
# (6e-8 each) on values of order 1-10 and on sums of up to a few hundred
# terms (dgamma, dbeta).
TOL = {np.float64: dict(out=(1e-12, 1e-10), dx=(1e-12, 1e-10), dparam=(1e-12, 1e-10)),
       np.float32: dict(out=(1e-5, 1e-5), dx=(1e-5, 1e-5), dparam=(1e-4, 1e-5))}

PARITY_SHAPES = [  # (N, C, H, W, G); tiny under the CUDA simulator
    (2, 4, 3, 3, 2),
    (1, 6, 1, 3, 6),     # instance norm, 1-pixel rows
    (2, 6, 3, 1, 1),     # layer norm
]
if not SIMULATED:
    PARITY_SHAPES += [(3, 8, 5, 7, 4),
                      (2, 32, 9, 11, 8), (1, 16, 20, 20, 4)]   # groups larger than a block


def _run(backend_name, x, gamma, beta, G, dout):
    with minimask.using_backend(backend_name):
        out, cache = group_norm_forward(x, gamma, beta, G)
        grads = group_norm_backward(dout, cache)
    return [np.asarray(out)] + [np.asarray(g) for g in grads]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=str)
def test_parity_with_numpy(fast_backend, dtype, shape, rng):
    N, C, H, W, G = shape
    x, gamma, beta = (a.astype(dtype) for a in _problem(rng, (N, C, H, W)))
    dout = rng.standard_normal(x.shape).astype(dtype)
    ref = _run("numpy", x, gamma, beta, G, dout)
    got = _run(fast_backend, x, gamma, beta, G, dout)
    tol = TOL[dtype]
    for name, r, g in zip(["out", "dx", "dgamma", "dbeta"], ref, got):
        assert g.dtype == dtype and g.shape == r.shape, (name, g.dtype, g.shape)
        atol, rtol = tol["dparam" if name in ("dgamma", "dbeta") else name]
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, err_msg=f"{name} on {fast_backend}")


def test_cuda_group_larger_than_a_block(fast_backend, rng):
    """M = C/G * H * W = 2 * 13 * 13 = 338 > 256 threads: the strided loops
    and every step of the tree reduction run (also in the simulator)."""
    x, gamma, beta = _problem(rng, (1, 2, 13, 13))
    dout = rng.standard_normal(x.shape)
    ref = _run("numpy", x, gamma, beta, 1, dout)
    got = _run(fast_backend, x, gamma, beta, 1, dout)
    for r, g in zip(ref, got):
        assert rel_error(r, g) < 1e-10


def test_cuda_device_arrays_stay_on_device(fast_backend, rng):
    """Device inputs give device outputs (host inputs were covered above)."""
    if fast_backend != "cuda":
        # the cpu backend takes and returns host arrays: the same check is
        # that the output is a plain ndarray of the input dtype
        x, gamma, beta = _problem(rng, (1, 4, 3, 3))
        with minimask.using_backend(fast_backend):
            out, cache = group_norm_forward(x, gamma, beta, 2)
            dx, dgamma, dbeta = group_norm_backward(np.ones_like(x), cache)
        assert all(type(a) is np.ndarray and a.dtype == np.float64 for a in (out, dx, dgamma, dbeta))
        return
    x, gamma, beta = _problem(rng, (1, 4, 3, 3))
    dout = rng.standard_normal(x.shape)
    ref = _run("numpy", x, gamma, beta, 2, dout)
    with minimask.using_backend("cuda"):
        out, cache = group_norm_forward(cuda.to_device(x), cuda.to_device(gamma),
                                        cuda.to_device(beta), 2)
        grads = group_norm_backward(cuda.to_device(dout), cache)
    got = [out, *grads]
    for r, g in zip(ref, got):
        # device arrays in, device arrays out (simulator arrays included)
        assert hasattr(g, "copy_to_host"), type(g)
        g = g.copy_to_host() if hasattr(g, "copy_to_host") else g
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
