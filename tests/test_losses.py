"""The three losses: sigmoid focal loss, smooth L1 and the mask BCE.

Gradient checks (float64, centred differences, a random upstream gradient:
an array for reduction "none", a random 0-d scalar for "sum"/"mean") run on
the NumPy reference over Hypothesis-drawn shapes and hyper-parameters.
Properties and edge cases run on every backend. Parity tests compare each
fast backend with the reference.

Parity tolerances (``|fast - ref| <= atol + rtol * |ref|``):

* float64: rtol 1e-10, atol 1e-13. Both sides evaluate the same formulas in
  float64; the only differences are the order of the float64 sums and libm
  versus NumPy's ``exp``/``log1p``/``pow`` (an ulp or two).
* float32: rtol 1e-5, atol 1e-7. The NumPy reference evaluates each element
  in float32 (a chain of ~5 roundings and float32 ``exp``/``log1p``/``pow``,
  each within a couple of ulps, 6e-8 relative each), while the fast kernels
  evaluate in float64 and round once; measured worst case ~1e-6 relative.
  All backends accumulate sums in float64, so a sum over many elements adds
  no further drift. ``atol`` covers elements whose value is itself tiny
  (denormal-range losses of very confident logits).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minimask
from minimask.gradcheck import check_layer, rel_error
from minimask.layers.focal_loss import sigmoid_focal_loss_backward, sigmoid_focal_loss_forward
from minimask.layers.mask_bce import mask_bce_backward, mask_bce_forward
from minimask.layers.smooth_l1 import smooth_l1_backward, smooth_l1_forward
from tests.conftest import SIMULATED
from tests.strategies import dims, seeds, tiny_or

REDUCTIONS = ["none", "sum", "mean"]
TOL = {np.float64: dict(rtol=1e-10, atol=1e-13), np.float32: dict(rtol=1e-5, atol=1e-7)}
GRAD_TOL = 1e-6


# --------------------------------------------------------------------------
# Strategies and helpers
# --------------------------------------------------------------------------


def shapes(max_ndim=3, hi=4):
    """Any number of dimensions (1 to 3), each small: losses accept any shape."""
    return st.integers(1, max_ndim).flatmap(lambda n: st.tuples(*[dims(1, hi)] * n))


@st.composite
def focal_inputs(draw, dtype=np.float64):
    """logits in [-4, 4] (no kinks: the focal loss is smooth), 0/1 or soft
    targets, and weights that are None, random, or random with zeros."""
    shape = draw(shapes())
    rng = np.random.default_rng(draw(seeds()))
    logits = rng.uniform(-4, 4, shape)
    if draw(st.booleans()):
        targets = (rng.random(shape) < 0.4).astype(np.float64)
    else:
        targets = rng.random(shape)  # soft targets, as torchvision allows
    kind = draw(st.sampled_from(["none", "random", "zeros"]))
    weights = None
    if kind != "none":
        weights = rng.uniform(0.1, 2.0, shape)
        if kind == "zeros":
            weights[rng.random(shape) < 0.5] = 0.0
    cast = (lambda a: None if a is None else a.astype(dtype))
    return cast(logits), cast(targets), cast(weights)


def smooth_l1_diffs(rng, shape, beta, gap=1e-3):
    """Differences ``d`` with ``|d|`` at least ``gap`` from 0 and from beta,
    the two kinks of smooth L1 (a centred difference straddling one would
    average the two slopes)."""
    d = rng.uniform(-3 * max(beta, 0.2), 3 * max(beta, 0.2), shape)
    for kink in (0.0, beta):
        close = np.abs(np.abs(d) - kink) < gap
        d[close] = np.sign(d[close] + 1e-300) * (kink + 2 * gap)
    return d


def reference(fn, *args, **kwargs):
    with minimask.using_backend("numpy"):
        return fn(*args, **kwargs)


def assert_close(actual, expected, dtype, what):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                               err_msg=what, **TOL[dtype])


def bce_naive(x, t):
    """Cross-entropy the textbook way, on moderate logits only: -t log p -
    (1-t) log(1-p) with p = 1/(1+exp(-x)); independent of the library."""
    p = 1.0 / (1.0 + np.exp(-x))
    return -t * np.log(p) - (1 - t) * np.log(1 - p)


def focal(x, t, **kwargs):
    loss, cache = sigmoid_focal_loss_forward(x, t, **kwargs)
    return np.asarray(loss), cache


# --------------------------------------------------------------------------
# Focal loss: gradient checks
# --------------------------------------------------------------------------


@given(inputs=focal_inputs(),
       alpha=st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0]),
       gamma=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]),
       reduction=st.sampled_from(REDUCTIONS), seed=seeds())
def test_focal_gradcheck(inputs, alpha, gamma, reduction, seed):
    logits, targets, weights = inputs
    with minimask.using_backend("numpy"):
        errors = check_layer(sigmoid_focal_loss_forward, sigmoid_focal_loss_backward,
                             {"logits": logits}, ["logits"], seed=seed, targets=targets,
                             weights=weights, alpha=alpha, gamma=gamma, reduction=reduction)
    assert errors["logits"] < GRAD_TOL, errors


# --------------------------------------------------------------------------
# Focal loss: properties
# --------------------------------------------------------------------------


def test_focal_gamma0_alpha_half_is_half_bce(backend, rng):
    x = rng.uniform(-5, 5, (3, 4))
    t = (rng.random(x.shape) < 0.5).astype(np.float64)
    loss, cache = focal(x, t, alpha=0.5, gamma=0.0, reduction="none")
    np.testing.assert_allclose(loss, 0.5 * bce_naive(x, t), rtol=1e-10)
    # and the gradient of a cross-entropy: 0.5 (p - t)
    dx = np.asarray(sigmoid_focal_loss_backward(np.ones_like(x), cache))
    np.testing.assert_allclose(dx, 0.5 * (1 / (1 + np.exp(-x)) - t), rtol=1e-10, atol=1e-15)


def test_focal_gamma0_alpha_off_is_bce(backend, rng):
    x = rng.uniform(-5, 5, (2, 3, 2))
    t = (rng.random(x.shape) < 0.5).astype(np.float64)
    loss, _ = focal(x, t, alpha=-1.0, gamma=0.0, reduction="sum")
    assert loss.shape == () and loss.dtype == np.float64
    np.testing.assert_allclose(loss, bce_naive(x, t).sum(), rtol=1e-10)


def test_focal_down_weights_confident_correct_logits(backend):
    # two confident correct ones, then two hard (wrong) ones
    x = np.array([6.0, -6.0, -2.0, 2.0])
    t = np.array([1.0, 0.0, 1.0, 0.0])
    ce = bce_naive(x, t)
    loss, _ = focal(x, t, alpha=-1.0, gamma=2.0, reduction="none")
    p = 1 / (1 + np.exp(-x))
    p_t = np.where(t == 1, p, 1 - p)
    np.testing.assert_allclose(loss, (1 - p_t) ** 2 * ce, rtol=1e-10)
    assert np.all(loss[:2] < 1e-4 * ce[:2]), (loss, ce)   # easy: almost silenced
    assert np.all(loss[2:] > 0.7 * ce[2:]), (loss, ce)    # hard: nearly kept


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_all_ignored_gives_exact_zeros(backend, reduction, rng):
    x = rng.uniform(-3, 3, (2, 5))
    t = (rng.random(x.shape) < 0.5).astype(np.float64)
    loss, cache = focal(x, t, weights=np.zeros_like(x), reduction=reduction)
    dout = np.ones_like(x) if reduction == "none" else 1.0
    dx = np.asarray(sigmoid_focal_loss_backward(dout, cache))
    assert np.all(np.isfinite(loss)) and np.all(loss == 0), loss
    assert np.all(np.isfinite(dx)) and np.all(dx == 0), dx


def test_focal_no_positives(backend, rng):
    x = rng.uniform(-4, 4, (3, 5))
    t = np.zeros_like(x)
    loss, cache = focal(x, t, alpha=0.25, gamma=2.0, reduction="none")
    dx = np.asarray(sigmoid_focal_loss_backward(np.ones_like(x), cache))
    p = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(loss, 0.75 * p ** 2 * -np.log(1 - p), rtol=1e-10)
    assert np.all(np.isfinite(dx)) and np.all(dx > 0)  # pushes every logit down


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_focal_extreme_logits_are_finite(backend, dtype):
    x = np.array([-1000.0, -100.0, 100.0, 1000.0] * 2, dtype=dtype)
    t = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=dtype)
    # The CUDA kernel runs the very scalar helper the CPU kernel runs
    # (compile_for_both), so the simulator checks two gammas, not all five.
    gammas = (0.0, 0.5) if (backend == "cuda" and SIMULATED) else (0.0, 0.5, 1.0, 2.0, 3.5)
    for gamma in gammas:
        loss, cache = focal(x, t, alpha=0.25, gamma=gamma, reduction="none")
        dx = np.asarray(sigmoid_focal_loss_backward(np.ones_like(x), cache))
        assert loss.dtype == dtype and dx.dtype == dtype
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(dx)), (gamma, loss, dx)
        # Confidently wrong: q = 1, ce = |x|: the loss is linear, slope alpha_t.
        wrong = np.array([2, 3, 4, 5])  # t=0 with x=+100,+1000; t=1 with x=-1000,-100
        expected = np.array([0.75 * 100, 0.75 * 1000, 0.25 * 1000, 0.25 * 100])
        np.testing.assert_allclose(loss[wrong], expected, rtol=1e-6, err_msg=f"gamma={gamma}")
        np.testing.assert_allclose(dx[wrong], [0.75, 0.75, -0.25, -0.25], rtol=1e-6,
                                   err_msg=f"gamma={gamma}")
        # Confidently right: loss and gradient vanish (and are not NaN).
        right = np.array([0, 1, 6, 7])
        assert np.all(np.abs(loss[right]) < 1e-30), (gamma, loss)
        assert np.all(np.abs(dx[right]) < 1e-30), (gamma, dx)


def test_focal_gamma_below_one_near_saturation_float64(backend):
    # q = 1 - p_t as small as float64 goes (and exactly 0 at x = 800), where
    # q^(gamma-1) alone would overflow: the gradient stays finite and tends
    # to 0 as it should.
    x = np.array([30.0, 700.0, 745.0, 800.0])
    t = np.ones_like(x)
    for gamma in (0.01, 0.5):
        loss, cache = focal(x, t, alpha=-1.0, gamma=gamma, reduction="none")
        dx = np.asarray(sigmoid_focal_loss_backward(np.ones_like(x), cache))
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(dx)), (gamma, loss, dx)
        assert np.all(dx <= 0) and np.all(np.abs(dx) < 1e-6), dx
        assert dx[-1] == 0 and loss[-1] == 0


def test_focal_reductions_are_consistent(backend, rng):
    x = rng.uniform(-3, 3, (2, 3, 4))
    t = (rng.random(x.shape) < 0.3).astype(np.float64)
    w = rng.random(x.shape)
    per, c_none = focal(x, t, weights=w, reduction="none")
    total, c_sum = focal(x, t, weights=w, reduction="sum")
    mean, c_mean = focal(x, t, weights=w, reduction="mean")
    np.testing.assert_allclose(total, per.sum(), rtol=1e-12)
    np.testing.assert_allclose(mean, per.sum() / x.size, rtol=1e-12)
    d_none = np.asarray(sigmoid_focal_loss_backward(np.full_like(x, 2.0), c_none))
    d_sum = np.asarray(sigmoid_focal_loss_backward(np.float64(2.0), c_sum))
    d_mean = np.asarray(sigmoid_focal_loss_backward(2.0, c_mean))
    np.testing.assert_allclose(d_sum, d_none, rtol=1e-12)
    np.testing.assert_allclose(d_mean, d_none / x.size, rtol=1e-12)


def test_focal_empty_input(backend):
    x = np.zeros((0, 3))
    for reduction in ("sum", "mean"):
        loss, cache = focal(x, x, reduction=reduction)
        assert loss.shape == () and loss == 0
        assert np.asarray(sigmoid_focal_loss_backward(1.0, cache)).shape == (0, 3)


def test_focal_refuses_bad_inputs():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="targets must have the shape of logits"):
        sigmoid_focal_loss_forward(x, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="weights must have the shape of logits"):
        sigmoid_focal_loss_forward(x, x, weights=np.ones(6))
    with pytest.raises(ValueError, match="targets must lie in"):
        sigmoid_focal_loss_forward(x, np.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="logits must be float32 or float64"):
        sigmoid_focal_loss_forward(np.zeros((2, 3), dtype=int), x)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sigmoid_focal_loss_forward(x, x, reduction="avg")
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        sigmoid_focal_loss_forward(x, x, gamma=-1.0)
    _, cache = sigmoid_focal_loss_forward(x, x, reduction="sum")
    with pytest.raises(ValueError, match="dout must be a scalar"):
        sigmoid_focal_loss_backward(np.ones((2, 3)), cache)
    _, cache = sigmoid_focal_loss_forward(x, x, reduction="none")
    with pytest.raises(ValueError, match="dout must have the shape of the loss"):
        sigmoid_focal_loss_backward(np.ones((3, 2)), cache)


# --------------------------------------------------------------------------
# Smooth L1
# --------------------------------------------------------------------------


@given(shape=shapes(), seed=seeds(), beta=st.sampled_from([0.0, 1 / 9, 0.5, 1.0]),
       weights_kind=st.sampled_from(["none", "random", "zeros"]),
       reduction=st.sampled_from(REDUCTIONS))
def test_smooth_l1_gradcheck(shape, seed, beta, weights_kind, reduction):
    rng = np.random.default_rng(seed)
    target = rng.uniform(-1, 1, shape)
    pred = target + smooth_l1_diffs(rng, shape, beta)
    weights = None
    if weights_kind != "none":
        weights = rng.uniform(0.1, 2.0, shape)
        if weights_kind == "zeros":
            weights[rng.random(shape) < 0.5] = 0.0
    with minimask.using_backend("numpy"):
        errors = check_layer(smooth_l1_forward, smooth_l1_backward, {"pred": pred}, ["pred"],
                             seed=seed, target=target, beta=beta, weights=weights,
                             reduction=reduction)
    assert errors["pred"] < GRAD_TOL, errors


def test_smooth_l1_matches_the_formula(backend):
    beta = 1 / 9
    d = np.array([0.05, -0.05, 0.5, -2.0, 0.0])
    target = np.linspace(-1, 1, d.size)
    loss, cache = smooth_l1_forward(target + d, target, beta=beta, reduction="none")
    expected = np.where(np.abs(d) < beta, 0.5 * d ** 2 / beta, np.abs(d) - 0.5 * beta)
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-9, atol=1e-15)
    dpred = np.asarray(smooth_l1_backward(np.ones_like(d), cache))
    np.testing.assert_allclose(dpred, [0.05 / beta, -0.05 / beta, 1, -1, 0], rtol=1e-9,
                               atol=1e-15)


def test_smooth_l1_beta0_is_l1(backend, rng):
    target = rng.uniform(-1, 1, (3, 4))
    d = rng.uniform(-2, 2, (3, 4))
    d[0, 0] = 0.0  # the subgradient at 0 is 0
    loss, cache = smooth_l1_forward(target + d, target, beta=0.0, reduction="none")
    dd = (target + d) - target  # the difference as the function sees it
    np.testing.assert_array_equal(np.asarray(loss), np.abs(dd))
    dpred = np.asarray(smooth_l1_backward(np.ones_like(d), cache))
    np.testing.assert_array_equal(dpred, np.sign(dd))
    assert dpred[0, 0] == 0


@pytest.mark.parametrize("beta", [1 / 9, 1.0])
def test_smooth_l1_is_continuous_at_beta(backend, beta):
    eps = 1e-9
    d = np.array([beta - eps, beta + eps, -beta + eps, -beta - eps])
    loss, cache = smooth_l1_forward(d, np.zeros_like(d), beta=beta, reduction="none")
    loss = np.asarray(loss)
    np.testing.assert_allclose(loss, 0.5 * beta, atol=2e-9)  # both pieces give beta/2
    dpred = np.asarray(smooth_l1_backward(np.ones_like(d), cache))
    np.testing.assert_allclose(dpred, [1, 1, -1, -1], atol=1e-8 / beta)  # same slope


@given(seed=seeds(), beta=st.sampled_from([0.0, 1 / 9, 0.5, 2.0]))
def test_smooth_l1_gradient_is_capped_at_one(seed, beta):
    rng = np.random.default_rng(seed)
    pred = rng.standard_normal(50) * 10
    target = rng.standard_normal(50)
    for name in ("numpy", "cpu"):
        with minimask.using_backend(name):
            _, cache = smooth_l1_forward(pred, target, beta=beta, reduction="sum")
            dpred = np.asarray(smooth_l1_backward(1.0, cache))
        assert np.all(np.abs(dpred) <= 1.0), (name, dpred)


def test_smooth_l1_weights_and_reductions(backend, rng):
    pred, target = rng.standard_normal((2, 4, 4))
    w = (rng.random(pred.shape) < 0.5).astype(np.float64)
    per, _ = smooth_l1_forward(pred, target, weights=w, reduction="none")
    per = np.asarray(per)
    assert np.all(per[w == 0] == 0)
    total, _ = smooth_l1_forward(pred, target, weights=w, reduction="sum")
    mean, c_mean = smooth_l1_forward(pred, target, weights=w, reduction="mean")
    np.testing.assert_allclose(np.asarray(total), per.sum(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(mean), per.sum() / per.size, rtol=1e-12)
    dpred = np.asarray(smooth_l1_backward(np.asarray(3.0), c_mean))
    assert np.all(dpred[w == 0] == 0) and np.any(dpred != 0)


def test_smooth_l1_refuses_bad_inputs():
    x = np.zeros((2, 4))
    with pytest.raises(ValueError, match="beta must be >= 0"):
        smooth_l1_forward(x, x, beta=-0.1)
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        smooth_l1_forward(x, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="weights must have the shape of pred"):
        smooth_l1_forward(x, x, weights=np.ones((2, 3)))
    with pytest.raises(ValueError, match="pred must be float32 or float64"):
        smooth_l1_forward(np.zeros((2, 4), dtype=np.int32), x)


# --------------------------------------------------------------------------
# Mask BCE
# --------------------------------------------------------------------------


@st.composite
def mask_inputs(draw, dtype=np.float64):
    R, K, m = draw(dims(1, 3)), draw(dims(1, 4)), draw(dims(1, 4))
    rng = np.random.default_rng(draw(seeds()))
    logits = rng.uniform(-4, 4, (R, K, m, m)).astype(dtype)
    labels = rng.integers(0, K, R)
    targets = (rng.random((R, m, m)) < 0.5).astype(dtype)
    return logits, labels, targets


@given(inputs=mask_inputs(), seed=seeds())
def test_mask_bce_gradcheck(inputs, seed):
    logits, labels, targets = inputs
    with minimask.using_backend("numpy"):
        errors = check_layer(mask_bce_forward, mask_bce_backward, {"mask_logits": logits},
                             ["mask_logits"], seed=seed, labels=labels, targets=targets)
    assert errors["mask_logits"] < GRAD_TOL, errors


def test_mask_bce_hand_computed(backend):
    # 2 RoIs, 3 classes, 2x2 masks; RoI 0 is class 2, RoI 1 is class 0.
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 2, 2) / 6 - 2
    labels = np.array([2, 0])
    y = np.array([[[1, 0], [0, 1]], [[0, 0], [1, 1]]], dtype=np.float64)
    loss, cache = mask_bce_forward(x, labels, y)
    total = 0.0
    for r, k in enumerate(labels):
        for i in range(2):
            for j in range(2):
                p = 1 / (1 + np.exp(-x[r, k, i, j]))
                total -= y[r, i, j] * np.log(p) + (1 - y[r, i, j]) * np.log(1 - p)
    loss = np.asarray(loss)
    assert loss.shape == () and loss.dtype == np.float64
    np.testing.assert_allclose(loss, total / 8, rtol=1e-12)
    dx = np.asarray(mask_bce_backward(2.0, cache))
    p = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(dx[0, 2], 2.0 * (p[0, 2] - y[0]) / 8, rtol=1e-12)
    np.testing.assert_allclose(dx[1, 0], 2.0 * (p[1, 0] - y[1]) / 8, rtol=1e-12)


@given(data=st.data())
def test_mask_bce_other_channels_get_exactly_zero(data):
    logits, labels, targets = data.draw(mask_inputs())
    for name in ("numpy", "cpu"):
        with minimask.using_backend(name):
            _, cache = mask_bce_forward(logits, labels, targets)
            dx = np.asarray(mask_bce_backward(1.0, cache))
        R, K = logits.shape[:2]
        others = np.ones((R, K), dtype=bool)
        others[np.arange(R), labels] = False
        assert np.all(dx[others] == 0), (name, dx)
        assert np.all(dx[~others] != 0), (name, dx)  # logits in [-4, 4]: sigmoid != y


def test_mask_bce_other_channels_zero_on_every_backend(backend, rng):
    logits = rng.standard_normal((3, 4, 2, 2))
    labels = np.array([3, 0, 3])
    targets = (rng.random((3, 2, 2)) < 0.5).astype(np.float64)
    _, cache = mask_bce_forward(logits, labels, targets)
    dx = np.asarray(mask_bce_backward(1.0, cache))
    keep = np.zeros((3, 4), dtype=bool)
    keep[[0, 1, 2], labels] = True
    assert np.all(dx[~keep] == 0) and np.all(dx[keep] != 0), dx


def test_mask_bce_no_rois(backend):
    logits = np.zeros((0, 5, 4, 4))
    loss, cache = mask_bce_forward(logits, np.zeros(0, dtype=np.int64), np.zeros((0, 4, 4)))
    loss = np.asarray(loss)
    assert loss.shape == () and loss == 0 and np.isfinite(loss)
    dx = np.asarray(mask_bce_backward(1.0, cache))
    assert dx.shape == (0, 5, 4, 4) and dx.dtype == np.float64


def test_mask_bce_extreme_logits_are_finite(backend):
    logits = np.array([-1000.0, -100.0, 100.0, 1000.0]).reshape(4, 1, 1, 1)
    for dtype in (np.float32, np.float64):
        x = logits.astype(dtype)
        for value in (0.0, 1.0):
            y = np.full((4, 1, 1), value, dtype=dtype)
            loss, cache = mask_bce_forward(x, np.zeros(4, dtype=np.int64), y)
            dx = np.asarray(mask_bce_backward(1.0, cache))
            assert np.isfinite(loss) and np.all(np.isfinite(dx)), (dtype, value, loss, dx)
            # BCE of a confidently wrong logit is |x|: mean of the wrong ones
            expected = (1000 + 100) / 4
            np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-6)


def test_mask_bce_accepts_bool_targets(rng):
    logits = rng.standard_normal((2, 3, 2, 2))
    labels = np.array([1, 2])
    mask = rng.random((2, 2, 2)) < 0.5
    loss_bool, _ = mask_bce_forward(logits, labels, mask)
    loss_float, _ = mask_bce_forward(logits, labels, mask.astype(np.float64))
    assert np.asarray(loss_bool) == np.asarray(loss_float)


def test_mask_bce_refuses_bad_inputs():
    logits = np.zeros((2, 3, 4, 4))
    targets = np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        mask_bce_forward(logits, np.array([0, 3]), targets)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        mask_bce_forward(logits, np.array([-1, 0]), targets)
    with pytest.raises(ValueError, match="labels must be integer"):
        mask_bce_forward(logits, np.array([0.0, 1.0]), targets)
    with pytest.raises(ValueError, match="labels must have shape"):
        mask_bce_forward(logits, np.array([0, 1, 2]), targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        mask_bce_forward(logits, np.array([0, 1]), np.zeros((2, 5, 5)))
    with pytest.raises(ValueError, match="targets must have 3 dimensions"):
        mask_bce_forward(logits, np.array([0, 1]), np.zeros((2, 16)))
    with pytest.raises(ValueError, match="targets must lie in"):
        mask_bce_forward(logits, np.array([0, 1]), np.full((2, 4, 4), 1.5))
    with pytest.raises(ValueError, match="mask_logits must have 4 dimensions"):
        mask_bce_forward(np.zeros((2, 3, 4)), np.array([0, 1]), targets)
    _, cache = mask_bce_forward(logits, np.array([0, 1]), targets)
    with pytest.raises(ValueError, match="dout must be a scalar"):
        mask_bce_backward(np.ones(2), cache)


# --------------------------------------------------------------------------
# Parity: each fast backend against the NumPy reference
# --------------------------------------------------------------------------


def _parity(fast_backend, forward, backward, args, kwargs, dtype, what, rng):
    ref, ref_cache = reference(forward, *args, **kwargs)
    ref = np.asarray(ref)
    dout = rng.standard_normal(ref.shape).astype(dtype)  # 0-d for sum/mean
    dref = reference(backward, dout, ref_cache)
    with minimask.using_backend(fast_backend):
        out, cache = forward(*args, **kwargs)
        dx = backward(dout, cache)
    assert_close(out, ref, dtype, f"{what} loss")
    assert_close(dx, dref, dtype, f"{what} gradient")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_parity(fast_backend, dtype, reduction):
    rng = np.random.default_rng(1)
    shape = (2, tiny_or(40, 3), 7)
    x = rng.uniform(-8, 8, shape).astype(dtype)
    t = (rng.random(shape) < 0.3).astype(dtype)
    w = (rng.random(shape) * (rng.random(shape) < 0.8)).astype(dtype)
    configs = [(0.25, 2.0, w), (-1.0, 0.5, None)]
    if SIMULATED and reduction != "sum":  # the simulator is slow: one config
        configs = configs[:1]             # per reduction, both for "sum"
    for alpha, gamma, weights in configs:
        _parity(fast_backend, sigmoid_focal_loss_forward, sigmoid_focal_loss_backward,
                (x, t), dict(alpha=alpha, gamma=gamma, weights=weights, reduction=reduction),
                dtype, f"focal alpha={alpha} gamma={gamma}", rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_smooth_l1_parity(fast_backend, dtype, reduction):
    rng = np.random.default_rng(2)
    shape = (2, tiny_or(40, 3), 4)
    pred = rng.standard_normal(shape).astype(dtype) * 0.3
    target = rng.standard_normal(shape).astype(dtype) * 0.3
    w = (rng.random(shape) < 0.7).astype(dtype)
    configs = [(1 / 9, w), (0.0, None)]
    if SIMULATED and reduction != "sum":
        configs = configs[:1]
    for beta, weights in configs:
        _parity(fast_backend, smooth_l1_forward, smooth_l1_backward, (pred, target),
                dict(beta=beta, weights=weights, reduction=reduction), dtype,
                f"smooth L1 beta={beta}", rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_bce_parity(fast_backend, dtype):
    rng = np.random.default_rng(3)
    R, K, m = tiny_or(6, 2), 5, tiny_or(7, 3)
    logits = (rng.standard_normal((R, K, m, m)) * 3).astype(dtype)
    labels = rng.integers(0, K, R)
    targets = (rng.random((R, m, m)) < 0.5).astype(dtype)
    _parity(fast_backend, mask_bce_forward, mask_bce_backward, (logits, labels, targets), {},
            dtype, "mask BCE", rng)


def test_focal_sum_spans_several_blocks(fast_backend):
    """More elements than one CUDA block: the per-block partial sums must all
    reach the total (a float64 sum of float32 elements)."""
    rng = np.random.default_rng(4)
    x = rng.uniform(-5, 5, 2 * 256 + 3).astype(np.float32)
    t = (rng.random(x.size) < 0.5).astype(np.float32)
    ref, _ = reference(sigmoid_focal_loss_forward, x, t)
    with minimask.using_backend(fast_backend):
        out, _ = sigmoid_focal_loss_forward(x, t)
    assert_close(out, ref, np.float32, "focal sum over 515 elements")


def test_focal_on_all_anchors_of_a_512_image():
    """RetinaNet on a 512x512 image: 9 anchors at each of 64^2 + 32^2 + 16^2
    + 8^2 + 4^2 locations = 49104 anchors, 80 classes, float32, on "cpu"."""
    rng = np.random.default_rng(5)
    A, K = 9 * (64 ** 2 + 32 ** 2 + 16 ** 2 + 8 ** 2 + 4 ** 2), 80
    logits = rng.normal(-4.6, 2.0, (1, A, K)).astype(np.float32)  # prior-like init
    targets = np.zeros((1, A, K), dtype=np.float32)
    positives = rng.choice(A, 100, replace=False)
    targets[0, positives, rng.integers(0, K, 100)] = 1
    weights = np.ones((1, A, K), dtype=np.float32)
    weights[0, rng.choice(A, 2000, replace=False)] = 0  # ignored anchors
    ref, ref_cache = reference(sigmoid_focal_loss_forward, logits, targets, weights=weights)
    dref = reference(sigmoid_focal_loss_backward, np.float32(0.01), ref_cache)
    with minimask.using_backend("cpu"):
        out, cache = sigmoid_focal_loss_forward(logits, targets, weights=weights)
        dx = sigmoid_focal_loss_backward(np.float32(0.01), cache)
    assert_close(out, ref, np.float32, "focal sum over 3.9M anchors x classes")
    assert_close(dx, dref, np.float32, "focal gradient over 3.9M elements")
    assert rel_error(out, ref) < 1e-6
