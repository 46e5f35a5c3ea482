"""RoIAlign (avg and max): gradient checks, properties, hand-computed
torchvision values, input errors, parity of the fast backends with the NumPy
reference, and the Fig. 2 grid plot."""
import math
import zlib

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import minimask
from minimask._cuda import cuda_available
from minimask.gradcheck import check_layer, rel_error
from minimask.layers import roi_align_backward, roi_align_forward
from minimask.layers.roi_align import bilinear_neighbours, roi_align_sample_points
from tests.conftest import SIMULATED
from tests.strategies import seeds, tiny_or

# An irrational-ish shift added to every RoI coordinate, so that sample points
# never land exactly on integer pixel coordinates (where the bilinear weights
# have a kink in the coordinates) or on the -1 / H boundaries.
JITTER = math.pi * 1e-4

ROI_KINDS = ("inside", "partly_outside", "outside", "tiny", "huge")


def _axis_interval(rng, kind, size):
    """Two edges (feature-map units) of one axis of a RoI of a given kind."""
    if kind == "inside":
        a = rng.uniform(0.0, size - 0.5)
        return a, rng.uniform(a + 0.3, size)
    if kind == "partly_outside":
        a = rng.uniform(-3.0, size - 0.5)
        b = rng.uniform(max(a + 0.5, 0.2), size + 3.0)
        return a, b
    if kind == "outside":
        if rng.random() < 0.5:
            a = rng.uniform(-6.0, -4.0)
            return a, rng.uniform(a + 0.2, -2.5)
        a = rng.uniform(size + 2.0, size + 4.0)
        return a, a + rng.uniform(0.2, 2.0)
    if kind == "tiny":
        a = rng.uniform(-0.5, size - 0.5)
        return a, a + rng.uniform(0.02, 0.4)
    # "huge": larger than the map on both sides
    return rng.uniform(-4.0, -1.0), rng.uniform(size + 1.0, size + 4.0)


def make_rois(rng, N, H, W, R, spatial_scale, kinds=ROI_KINDS):
    """``(R, 5)`` RoIs in image pixels whose feature-map extent is of the
    requested kinds (the kind of each RoI is drawn from ``kinds``)."""
    rois = np.zeros((R, 5))
    for r in range(R):
        kind = kinds[rng.integers(len(kinds))]
        x1, x2 = _axis_interval(rng, kind, W)
        y1, y2 = _axis_interval(rng, kind, H)
        if kind == "outside" and rng.random() < 0.5:  # outside along one axis only
            y1, y2 = _axis_interval(rng, "inside", H)
        rois[r] = [rng.integers(N), x1 + JITTER, y1 + JITTER, x2 + JITTER, y2 + JITTER]
    rois[:, 1:] /= spatial_scale
    return rois


@st.composite
def roi_problems(draw, max_n=2, max_c=2, max_hw=5, max_r=3, max_out=3, kinds=ROI_KINDS):
    """A whole RoIAlign call: features, RoIs and the layer's settings."""
    rng = np.random.default_rng(draw(seeds()))
    N = draw(st.integers(1, max_n))
    C = draw(st.integers(1, max_c))
    H = draw(st.integers(1, max_hw))
    W = draw(st.integers(1, max_hw))
    R = draw(st.integers(1, max_r))
    ph = draw(st.integers(1, max_out))
    pw = draw(st.one_of(st.just(ph), st.integers(1, max_out)))
    spatial_scale = draw(st.sampled_from([1.0, 0.5, 0.25]))
    sampling_ratio = draw(st.sampled_from([-1, 1, 2, 3]))
    aligned = draw(st.booleans())
    features = rng.uniform(-2.0, 2.0, size=(N, C, H, W))
    rois = make_rois(rng, N, H, W, R, spatial_scale, kinds)
    return dict(features=features, rois=rois, output_size=(ph, pw),
                spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned)


def max_margin(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Smallest gap, over all bins and channels, between the largest sample
    and the best sample that is a *different* function of the features.

    Samples with identical neighbours and weights (several clamped onto the
    last row, or all outside, worth 0) move together, so a tie between them
    is no kink; a near-tie between different functions is, and a centred
    difference must not straddle it."""
    _, C, H, W = features.shape
    gap = np.inf
    for row in rois:
        fmap = features[int(row[0])]
        ys, xs = roi_align_sample_points(row, output_size, spatial_scale, sampling_ratio,
                                         aligned)
        ph, pw, S = ys.shape
        for i in range(ph):
            for j in range(pw):
                functions = {}
                for s in range(S):
                    terms = tuple(sorted((yx, w) for yx, w in
                                         bilinear_neighbours(ys[i, j, s], xs[i, j, s], H, W)
                                         if w != 0))
                    functions[terms] = sum((w * fmap[:, y, x] for (y, x), w in terms),
                                           np.zeros(C))
                if len(functions) < 2:
                    continue
                values = np.sort(np.stack(list(functions.values())), axis=0)
                gap = min(gap, float(np.min(values[-1] - values[-2])))
    return gap


def run_layer(backend, problem, mode, dtype=np.float64, dout=None):
    """Forward (and backward with ``dout``) on ``backend``; host arrays back."""
    kwargs = dict(problem)
    kwargs["features"] = np.asarray(kwargs["features"], dtype=dtype)
    with minimask.using_backend(backend):
        out, cache = roi_align_forward(mode=mode, **kwargs)
        out = np.asarray(out)
        if dout is None:
            return out, None
        return out, np.asarray(roi_align_backward(dout.astype(dtype), cache))


# --------------------------------------------------------------------------
# Gradient checks (NumPy reference, float64, random upstream gradient)
# --------------------------------------------------------------------------


@hsettings(max_examples=12)
@given(problem=roi_problems())
def test_gradcheck_avg(problem):
    # avg RoIAlign is linear in the features, so the centred difference is
    # exact up to round-off: a wrong weight or index shows up at O(1).
    with minimask.using_backend("numpy"):
        errors = check_layer(roi_align_forward, roi_align_backward,
                             {"features": problem.pop("features")}, ["features"],
                             mode="avg", **problem)
    assert errors["features"] < 1e-6, errors


@hsettings(max_examples=12)
@given(problem=roi_problems())
def test_gradcheck_max(problem):
    margin = max_margin(**problem)
    assume(margin > 1e-4)  # keep away from ties between different samples
    with minimask.using_backend("numpy"):
        errors = check_layer(roi_align_forward, roi_align_backward,
                             {"features": problem.pop("features")}, ["features"],
                             mode="max", **problem)
    assert errors["features"] < 1e-6, errors


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("kind", ROI_KINDS)
@pytest.mark.parametrize("sampling_ratio,output_size,spatial_scale,aligned", [
    (1, 4, 1.0, True), (2, (1, 3), 0.5, False), (3, (2, 1), 0.25, True),
    (-1, (3, 2), 0.5, True), (-1, 1, 1.0, False)])
def test_gradcheck_each_roi_kind(mode, kind, sampling_ratio, output_size, spatial_scale,
                                 aligned):
    """Every kind of RoI with each setting at least once (Hypothesis may not
    draw every combination)."""
    rng = np.random.default_rng(zlib.crc32(f"{mode}{kind}{sampling_ratio}".encode()))
    features = rng.uniform(-2, 2, size=(2, 2, 4, 5))
    rois = make_rois(rng, 2, 4, 5, 2, spatial_scale, kinds=(kind,))
    problem = dict(rois=rois, output_size=output_size, spatial_scale=spatial_scale,
                   sampling_ratio=sampling_ratio, aligned=aligned)
    if mode == "max":
        assert max_margin(features, **problem) > 1e-4, "reseed: a near-tie"
    with minimask.using_backend("numpy"):
        errors = check_layer(roi_align_forward, roi_align_backward, {"features": features},
                             ["features"], mode=mode, **problem)
    assert errors["features"] < 1e-6, errors


# --------------------------------------------------------------------------
# torchvision's semantics, computed by hand on a 4 x 4 map
# --------------------------------------------------------------------------

F4 = np.array([[1.0, 2.0, 0.0, 4.0],
               [3.0, 5.0, 7.0, 1.0],
               [2.0, 8.0, 6.0, 0.0],
               [9.0, 1.0, 3.0, 5.0]])


def pool_f4(roi, output_size=1, sampling_ratio=2, aligned=False, mode="avg"):
    out, _ = roi_align_forward(F4[None, None], np.array([[0.0, *roi]]), output_size, 1.0,
                               sampling_ratio, aligned, mode)
    return np.asarray(out)[0, 0]


def test_hand_computed_interior_average(backend):
    # aligned=False, box 0..2: one bin of size 2, samples at 0.5 and 1.5 on
    # each axis; each sample sits in the middle of 4 pixels (weights 1/4):
    s00 = (1 + 2 + 3 + 5) / 4   # (y, x) = (0.5, 0.5)
    s01 = (2 + 0 + 5 + 7) / 4   # (0.5, 1.5)
    s10 = (3 + 5 + 2 + 8) / 4   # (1.5, 0.5)
    s11 = (5 + 7 + 8 + 6) / 4   # (1.5, 1.5)
    assert pool_f4([0, 0, 2, 2])[0, 0] == pytest.approx((s00 + s01 + s10 + s11) / 4)
    # max mode: the largest of the same four samples
    assert pool_f4([0, 0, 2, 2], mode="max")[0, 0] == pytest.approx(s11)


def test_hand_computed_aligned_shift_and_lower_edge(backend):
    # aligned=True, box -1..1: start = -1 - 0.5 = -1.5, extent 2, samples at
    # -1.5 + 0.5 = -1.0 and -1.5 + 1.5 = 0.0. y = -1 is not < -1, so it is
    # inside and clamped to 0: all four samples read F[0, 0] = 1.
    assert pool_f4([-1, -1, 1, 1], aligned=True)[0, 0] == pytest.approx(1.0)


def test_hand_computed_outside_samples_count_as_zero(backend):
    # aligned=False, x from -3 to 1 (extent 4): x samples at -3 + 1 = -2
    # (< -1: outside, worth 0) and -3 + 3 = 0. y from 0 to 1 (extent 1):
    # samples at 0.25 and 0.75, between rows 0 and 1 of column 0.
    at_025 = 0.75 * F4[0, 0] + 0.25 * F4[1, 0]  # 1.5
    at_075 = 0.25 * F4[0, 0] + 0.75 * F4[1, 0]  # 2.5
    # the average divides by all 4 samples, the 2 outside ones included
    assert pool_f4([-3, 0, 1, 1])[0, 0] == pytest.approx((at_025 + at_075 + 0 + 0) / 4)
    # max: the outside samples are worth 0 and the inside ones are larger
    assert pool_f4([-3, 0, 1, 1], mode="max")[0, 0] == pytest.approx(at_075)


def test_hand_computed_upper_edge_clamp(backend):
    # aligned=False, sampling 1: y box 3.2..4.0 has extent 0.8, forced to 1,
    # so the one sample is at y = 3.7; x box 2.5..3.5, sample at x = 3.0.
    # y_low = 3 >= H - 1: clamped to row 3; x_low = 3 >= W - 1: column 3.
    assert pool_f4([2.5, 3.2, 3.5, 4.0], sampling_ratio=1)[0, 0] == pytest.approx(F4[3, 3])
    # a sample beyond y > H = 4 is outside: y box 3.8..4.8 -> y = 4.3
    assert pool_f4([2.5, 3.8, 3.5, 4.8], sampling_ratio=1)[0, 0] == 0.0
    # a sample at x = 2.25 on row 3.7 -> row 3: 0.75 * F[3, 2] + 0.25 * F[3, 3]
    assert pool_f4([1.75, 3.2, 2.75, 4.0], sampling_ratio=1)[0, 0] == pytest.approx(
        0.75 * 3 + 0.25 * 5)


def test_hand_computed_adaptive_grid(backend):
    # aligned=True, box 0..2.5 on both axes, 1 bin: extent 2.5, adaptive grid
    # ceil(2.5 / 1) = 3 samples per axis, at -0.5 + (k + 1/2) * 2.5 / 3.
    ys, xs = roi_align_sample_points([0, 0, 2.5, 2.5], 1, 1.0, -1, True)
    expected = [-0.5 + (k + 0.5) * 2.5 / 3 for k in range(3)]
    assert ys.shape == (1, 1, 9)
    np.testing.assert_allclose(ys[0, 0].reshape(3, 3)[:, 0], expected)
    np.testing.assert_allclose(xs[0, 0].reshape(3, 3)[0, :], expected)
    # a zero-size aligned box has an empty adaptive grid: output 0 (not NaN)
    assert pool_f4([1, 1, 1, 1], sampling_ratio=-1, aligned=True)[0, 0] == 0.0
    # ... while aligned=False makes it 1 pixel wide: one sample at (1.5, 1.5)
    assert pool_f4([1, 1, 1, 1], sampling_ratio=-1)[0, 0] == pytest.approx(
        (5 + 7 + 8 + 6) / 4)


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


def inside_rois(rng, N, H, W, R, spatial_scale, aligned):
    """RoIs whose every sample lies inside [0, H - 1] x [0, W - 1]."""
    offset = 0.5 if aligned else 0.0
    rois = np.zeros((R, 5))
    for r in range(R):
        lo_y = rng.uniform(0.0, (H - 1) / 2)
        lo_x = rng.uniform(0.0, (W - 1) / 2)
        hi_y = rng.uniform(max(lo_y + 1.0, (H - 1) / 2), H - 1)
        hi_x = rng.uniform(max(lo_x + 1.0, (W - 1) / 2), W - 1)
        rois[r] = [rng.integers(N), (lo_x + offset) / spatial_scale,
                   (lo_y + offset) / spatial_scale, (hi_x + offset) / spatial_scale,
                   (hi_y + offset) / spatial_scale]
    return rois


@hsettings(max_examples=tiny_or(15, 3))
@given(seed=seeds(), sampling_ratio=st.sampled_from([-1, 1, 2, 3]),
       out_h=st.integers(1, tiny_or(4, 2)), out_w=st.integers(1, tiny_or(4, 2)),
       spatial_scale=st.sampled_from([1.0, 0.5]), aligned=st.booleans())
def test_linear_ramp_is_reproduced(backend, seed, sampling_ratio, out_h, out_w,
                                   spatial_scale, aligned):
    """Bilinear interpolation is exact on f = a y + b x + c, so avg RoIAlign
    of a ramp is the ramp at the mean sample position of each bin."""
    rng = np.random.default_rng(seed)
    N, C, H, W = 2, tiny_or(3, 1), 6, 7
    a, b, c = rng.uniform(-1, 1, (3, C))
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    ramp = a[:, None, None] * y + b[:, None, None] * x + c[:, None, None]
    features = np.stack([ramp, ramp + 1.0])
    rois = inside_rois(rng, N, H, W, tiny_or(3, 1), spatial_scale, aligned)
    out, _ = roi_align_forward(features, rois, (out_h, out_w), spatial_scale,
                               sampling_ratio, aligned)
    out = np.asarray(out)
    for r, row in enumerate(rois):
        ys, xs = roi_align_sample_points(row, (out_h, out_w), spatial_scale,
                                         sampling_ratio, aligned)
        assert ys.min() >= 0 and ys.max() <= H - 1 and xs.min() >= 0 and xs.max() <= W - 1
        expected = (a[:, None, None] * ys.mean(axis=2) + b[:, None, None] * xs.mean(axis=2)
                    + c[:, None, None] + row[0])
        np.testing.assert_allclose(out[r], expected, rtol=1e-12, atol=1e-12)


def test_roi_on_one_pixel_reads_that_pixel(backend, rng):
    # aligned=True, box [col, row, col + 1, row + 1], one bin, one sample:
    # the sample lands on the pixel centre (row, col), weight 1.
    features = rng.standard_normal((1, 2, 4, 5))
    rois = np.array([[0, col, row, col + 1, row + 1] for row in range(4) for col in range(5)],
                    dtype=np.float64)
    for mode in ("avg", "max"):
        out, _ = roi_align_forward(features, rois, 1, 1.0, 1, True, mode)
        np.testing.assert_array_equal(np.asarray(out)[:, :, 0, 0],
                                      features[0].reshape(2, -1).T)


@hsettings(max_examples=tiny_or(20, 3))
@given(problem=roi_problems(max_n=2, max_c=tiny_or(3, 1), max_r=tiny_or(4, 1),
                            max_out=tiny_or(3, 2)))
def test_max_is_at_least_avg(backend, problem):
    """Outside samples are 0 in both modes and the average counts every
    sample, so the bin's largest sample is >= their mean, for every RoI."""
    avg, _ = roi_align_forward(mode="avg", **problem)
    mx, _ = roi_align_forward(mode="max", **problem)
    avg, mx = np.asarray(avg), np.asarray(mx)
    assert np.all(mx >= avg - 1e-12), np.max(avg - mx)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_zero_rois(backend, mode, rng):
    features = rng.standard_normal((2, 3, 4, 5))
    out, cache = roi_align_forward(features, np.zeros((0, 5)), (2, 3), 0.5, 2, True, mode)
    out = np.asarray(out)
    assert out.shape == (0, 3, 2, 3) and out.dtype == features.dtype
    d = np.asarray(roi_align_backward(np.zeros((0, 3, 2, 3)), cache))
    assert d.shape == features.shape and d.dtype == features.dtype
    assert np.all(d == 0)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_batch_index_picks_the_image(backend, mode, rng):
    features = rng.standard_normal((3, 2, 4, 4))
    box = [0.3 + JITTER, 0.6 + JITTER, 3.1 + JITTER, 2.7 + JITTER]
    rois = np.array([[k, *box] for k in (2, 0, 1)])
    out, cache = roi_align_forward(features, rois, 2, 1.0, 2, True, mode)
    dout = rng.standard_normal((3, 2, 2, 2))
    d = np.asarray(roi_align_backward(dout, cache))
    for r, k in enumerate((2, 0, 1)):
        alone, alone_cache = roi_align_forward(features[k:k + 1], np.array([[0, *box]]), 2,
                                               1.0, 2, True, mode)
        np.testing.assert_allclose(np.asarray(out)[r], np.asarray(alone)[0], rtol=1e-12)
        d_alone = np.asarray(roi_align_backward(dout[r:r + 1], alone_cache))
        np.testing.assert_allclose(d[k], d_alone[0], rtol=1e-12, atol=1e-15)
    # the gradient of an image no RoI reads is exactly zero
    _, cache = roi_align_forward(features, rois[:1], 2, 1.0, 2, True, mode)
    d = np.asarray(roi_align_backward(dout[:1], cache))
    assert np.all(d[:2] == 0) and np.any(d[2] != 0)


def test_float_dtypes_are_kept(backend, rng):
    rois = np.array([[0, 0.2, 0.3, 2.9, 3.1]], dtype=np.float32)
    for dtype in (np.float32, np.float64):
        features = rng.standard_normal((1, 2, 4, 4)).astype(dtype)
        for mode in ("avg", "max"):
            out, cache = roi_align_forward(features, rois, 2, 1.0, 2, True, mode)
            d = roi_align_backward(np.ones((1, 2, 2, 2), dtype=dtype), cache)
            assert np.asarray(out).dtype == dtype and np.asarray(d).dtype == dtype


def test_max_gradient_goes_to_the_winning_sample_only(rng):
    # one bin, 2 x 2 samples well inside; the winner's 4 neighbours share dout
    features = rng.standard_normal((1, 1, 5, 5))
    rois = np.array([[0, 0.7 + JITTER, 0.9 + JITTER, 3.8 + JITTER, 4.1 + JITTER]])
    with minimask.using_backend("numpy"):
        out, cache = roi_align_forward(features, rois, 1, 1.0, 2, True, "max")
        d = roi_align_backward(np.full((1, 1, 1, 1), 2.0), cache)
    s = cache["argmax"][0, 0, 0, 0]
    ys, xs = roi_align_sample_points(rois[0], 1, 1.0, 2, True)
    expected = np.zeros((5, 5))
    for (y, x), w in bilinear_neighbours(ys[0, 0, s], xs[0, 0, s], 5, 5):
        expected[y, x] += 2.0 * w
    np.testing.assert_allclose(d[0, 0], expected, rtol=1e-14)
    assert out[0, 0, 0, 0] == pytest.approx(np.sum(expected * features[0, 0]) / 2.0)


def test_max_with_an_outside_winner_sends_no_gradient():
    # all features negative; half the samples are outside (worth 0) and win
    features = -np.ones((1, 1, 3, 3)) - np.arange(9.0).reshape(1, 1, 3, 3)
    rois = np.array([[0, -5.0, 0.2, 1.0, 1.3]])  # x samples at -3.5 (outside), -0.5 -> 0
    for backend in ("numpy", "cpu"):
        with minimask.using_backend(backend):
            out, cache = roi_align_forward(features, rois, 1, 1.0, 2, False, "max")
            d = np.asarray(roi_align_backward(np.ones((1, 1, 1, 1)), cache))
        assert np.asarray(out)[0, 0, 0, 0] == 0.0
        assert np.all(d == 0)


# --------------------------------------------------------------------------
# Input errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(rois=np.zeros((2, 4))), "rois must have shape \\(R, 5\\)"),
    (dict(rois=np.zeros(5)), "rois must have shape \\(R, 5\\)"),
    (dict(rois=np.array([[2.0, 0, 0, 1, 1]])), "batch index\\) must lie in \\[0, 2\\)"),
    (dict(rois=np.array([[-1.0, 0, 0, 1, 1]])), "batch index\\) must lie in"),
    (dict(rois=np.array([[0.5, 0, 0, 1, 1]])), "batch index\\) must hold integers"),
    (dict(rois=np.array([[0, 3.0, 0, 1, 1]])), "x2 >= x1"),
    (dict(rois=np.array([[0, 0, 3.0, 1, 1]])), "y2 >= y1"),
    (dict(rois=np.array([[0, 0, np.nan, 1, 1]])), "rois contains NaN"),
    (dict(features=np.zeros((2, 4, 4))), "features must have 4 dimensions"),
    (dict(features=np.zeros((2, 1, 4, 4), dtype=np.int64)), "features must be float32"),
    (dict(output_size=0), "output_size must be a positive integer"),
    (dict(output_size=(2, 0)), "output_size must be a positive integer"),
    (dict(mode="min"), "mode must be one of"),
    (dict(spatial_scale=0.0), "spatial_scale must be a positive number"),
    (dict(sampling_ratio=1.5), "sampling_ratio must be an integer"),
])
def test_bad_inputs_raise(kwargs, match):
    args = dict(features=np.zeros((2, 1, 4, 4)), rois=np.array([[0.0, 0, 0, 2, 2]]),
                output_size=2, spatial_scale=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        roi_align_forward(**args)


def test_backward_checks_dout_shape():
    _, cache = roi_align_forward(np.zeros((1, 2, 4, 4)), np.array([[0.0, 0, 0, 2, 2]]), 2, 1.0)
    with pytest.raises(ValueError, match="dout must have the shape"):
        roi_align_backward(np.zeros((1, 2, 3, 2)), cache)


# --------------------------------------------------------------------------
# Parity: each fast backend against the NumPy reference
# --------------------------------------------------------------------------

# float64: the same sample points and weights, only the summation order
# differs, so round-off level. float32: the fast kernels and the reference
# both accumulate in float64 and round once; the reference rounds the output,
# the backward rounds the scattered sum: tolerance atol + |ref| * rtol with
# rtol = 1e-5 (a few float32 ulps) and atol = 1e-6 (for values near 0).
TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-6)}


def assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    assert actual.dtype == dtype, (what, actual.dtype)
    bad = np.abs(actual - expected) > tol["atol"] + np.abs(expected) * tol["rtol"]
    assert not np.any(bad), (f"{what}: {bad.sum()} of {bad.size} differ; worst "
                             f"{np.max(np.abs(actual - expected))}; first at "
                             f"{np.argwhere(bad)[0]}: {actual[bad][0]} vs {expected[bad][0]}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["avg", "max"])
@hsettings(max_examples=tiny_or(10, 2))
@given(problem=roi_problems(max_n=2, max_c=tiny_or(4, 1), max_hw=tiny_or(7, 4),
                            max_r=tiny_or(5, 2), max_out=tiny_or(4, 2)),
       seed=seeds())
def test_parity_with_reference(fast_backend, mode, dtype, problem, seed):
    if mode == "max":  # a near-tie could pick different winners in float32
        assume(max_margin(**problem) > 1e-3)
    R, C = problem["rois"].shape[0], problem["features"].shape[1]
    dout = np.random.default_rng(seed).standard_normal((R, C, *problem["output_size"]))
    ref, dref = run_layer("numpy", problem, mode, dtype, dout)
    out, d = run_layer(fast_backend, problem, mode, dtype, dout)
    assert_close(out, ref, dtype, "out")
    assert_close(d, dref, dtype, "dfeatures")


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_parity_many_overlapping_rois(fast_backend, mode):
    """A race catcher: many RoIs on the same pixels, many channels. A
    parallel backward that let two iterations add into the same element
    without atomics would lose updates and miss the float64 reference."""
    rng = np.random.default_rng(7)
    # C = 40: two channel blocks of the cpu backward per image (32 + 8)
    N, C, H, W = 2, tiny_or(40, 2), tiny_or(9, 3), tiny_or(9, 3)
    R = tiny_or(48, 6)
    centre = np.array([W / 2, H / 2, W / 2, H / 2])
    boxes = centre + rng.uniform(-1.5, 1.5, (R, 4)) + np.array([-2, -2, 2, 2])
    rois = np.concatenate([rng.integers(0, N, (R, 1)), boxes + JITTER], axis=1)
    problem = dict(features=rng.standard_normal((N, C, H, W)), rois=rois,
                   output_size=tiny_or(5, 2), spatial_scale=1.0, sampling_ratio=2,
                   aligned=True)
    dout = rng.standard_normal((R, C, *([tiny_or(5, 2)] * 2)))
    ref, dref = run_layer("numpy", problem, mode, np.float64, dout)
    out, d = run_layer(fast_backend, problem, mode, np.float64, dout)
    assert_close(out, ref, np.float64, "out")
    assert_close(d, dref, np.float64, "dfeatures")
    assert np.abs(dref).sum() > 0


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_backward_has_no_race_on_shared_pixels(fast_backend, mode):
    """Thousands of copies of one RoI, each with the same upstream gradient,
    on a 3 x 3 map: every update hits the same few pixels. The exact answer
    is R times the gradient of one copy. A parallel loop over RoIs adding
    into shared pixels without atomics loses updates here (measured: 6-12 %
    off with 2 threads); a correct one is off by summation round-off only
    (measured 3e-12 relative for 20000 float64 terms, hence 1e-10)."""
    rng = np.random.default_rng(11)
    R, C, size = tiny_or(20000, 8), tiny_or(2, 1), tiny_or(5, 2)
    features = rng.standard_normal((1, C, 3, 3))
    rois = np.tile([0.0, -0.3 + JITTER, -0.2 + JITTER, 3.1 + JITTER, 3.3 + JITTER], (R, 1))
    one = rng.standard_normal((1, C, size, size))
    with minimask.using_backend("numpy"):
        _, cache = roi_align_forward(features, rois[:1], size, 1.0, 2, True, mode)
        expected = R * roi_align_backward(one, cache)
    with minimask.using_backend(fast_backend):
        _, cache = roi_align_forward(features, rois, size, 1.0, 2, True, mode)
        d = np.asarray(roi_align_backward(np.tile(one, (R, 1, 1, 1)), cache))
    assert rel_error(d, expected) < 1e-10, rel_error(d, expected)
    assert np.abs(expected).max() > 0


if cuda_available():  # defined only where kernels run (GPU or simulator)
    @pytest.mark.cuda
    def test_cuda_keeps_device_arrays_on_device():
        from minimask._cuda import cuda
        rng = np.random.default_rng(3)
        features = rng.standard_normal((1, 1, 3, 3))
        rois = np.array([[0, 0.2, 0.3, 2.1, 2.4]])
        with minimask.using_backend("cuda"):
            out, cache = roi_align_forward(cuda.to_device(features), rois, 2, 1.0, 1)
            d = roi_align_backward(cuda.to_device(np.ones((1, 1, 2, 2))), cache)
        if not SIMULATED:
            # the simulator's arrays lack __cuda_array_interface__, so
            # _checks.is_device_array does not see them as device arrays
            assert hasattr(out, "copy_to_host") and hasattr(d, "copy_to_host")
        out, d = np.asarray(out), np.asarray(d)
        with minimask.using_backend("numpy"):
            ref, cache = roi_align_forward(features, rois, 2, 1.0, 1)
            dref = roi_align_backward(np.ones((1, 1, 2, 2)), cache)
        np.testing.assert_allclose(out, ref, rtol=1e-12)
        np.testing.assert_allclose(d, dref, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------
# The Fig. 2 plot
# --------------------------------------------------------------------------


@pytest.mark.parametrize("output_size,sampling_ratio,aligned",
                         [(2, 2, True), ((3, 2), 1, False), (2, -1, True)])
def test_plot_draws_the_layers_sample_points(output_size, sampling_ratio, aligned):
    import matplotlib.pyplot as plt

    from minimask.viz import plot_roi_align_grid
    features = np.arange(2 * 6 * 7, dtype=np.float64).reshape(2, 6, 7)
    roi = [1.2 + JITTER, 0.7 + JITTER, 5.1 + JITTER, 4.6 + JITTER]
    ax = plot_roi_align_grid(features, roi, output_size=output_size,
                             sampling_ratio=sampling_ratio, aligned=aligned, channel=1)
    try:
        assert ax.__class__.__name__.endswith("Axes")
        ys, xs = roi_align_sample_points(roi, output_size, 1.0, sampling_ratio, aligned)
        points = ax.collections[0].get_offsets()
        assert len(points) == ys.size
        np.testing.assert_allclose(np.asarray(points), np.stack([xs.ravel(), ys.ravel()], 1))
        # the samples' neighbours carry the weights the layer uses
        texts = {t.get_text() for t in ax.texts}
        for _, w in bilinear_neighbours(ys[0, 0, 0], xs[0, 0, 0], 6, 7):
            assert f"{w:.2f}" in texts
    finally:
        plt.close(ax.figure)


# --------------------------------------------------------------------------
# Adaptive sampling on a degenerate RoI: capped, so it returns
# --------------------------------------------------------------------------

_HUGE_ROI_SCRIPT = r"""
import sys, time
import numpy as np
import minimask
from minimask.layers import roi_align_backward, roi_align_forward
backend, size, out_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
f = np.random.default_rng(0).standard_normal((1, 2, size, size))
with minimask.using_backend(backend):
    roi_align_forward(f, np.array([[0, 1.0, 1.0, 9.0, 9.0]]), out_size, 1.0, 0)  # compile
    t0 = time.perf_counter()
    out, cache = roi_align_forward(f, np.array([[0, -1e6, -1e6, 1e6, 1e6]]), out_size, 1.0, 0)
    d = roi_align_backward(np.ones(np.shape(out)), cache)
    elapsed = time.perf_counter() - t0
to_np = lambda a: a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)
ok = np.all(np.isfinite(to_np(out))) and np.all(np.isfinite(to_np(d)))
print(f"{elapsed:.3f} {int(ok)}")
"""


@pytest.mark.parametrize("backend_name, size, out_size", [
    pytest.param("cpu", 64, 14, id="cpu-64px"),
    pytest.param("numpy", 16, 2, id="numpy-16px"),
    pytest.param("cuda", 8, 2, id="cuda-8px", marks=pytest.mark.cuda),
])
def test_huge_roi_with_adaptive_sampling_returns_quickly(backend_name, size, out_size):
    """sampling_ratio <= 0 asks for ceil(extent / output_size) samples per
    bin; a +-1e6 pixel box would mean ~10^5 x 10^5 per bin and never return.
    The grid is capped at size + 1 per axis; in a subprocess with a timeout
    so a regression fails instead of hanging the suite."""
    import os
    import subprocess
    import sys
    if backend_name == "cuda" and not cuda_available():
        pytest.skip("runs in the GPU / simulator run (-m cuda)")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _HUGE_ROI_SCRIPT, backend_name, str(size),
                           str(out_size)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    elapsed, finite = done.stdout.split()[-2:]
    assert finite == "1"
    assert float(elapsed) < 20.0, f"the huge RoI took {elapsed} s"


def test_grid_cap_leaves_rois_on_the_map_unchanged(rng):
    """The cap (size + 1 samples per bin and axis) only bites for a bin wider
    than the map: any RoI inside the map keeps torchvision's adaptive grid."""
    from minimask.layers.roi_align import adaptive_grid_cap
    H, W = 13, 21
    for _ in range(50):
        x1, x2 = np.sort(rng.uniform(-0.5, W - 0.5, 2))
        y1, y2 = np.sort(rng.uniform(-0.5, H - 0.5, 2))
        for out in (1, 2, 7):
            free = roi_align_sample_points([x1, y1, x2, y2], out, 1.0, 0, True)
            capped = roi_align_sample_points([x1, y1, x2, y2], out, 1.0, 0, True, (H, W))
            np.testing.assert_array_equal(free[0], capped[0])
            np.testing.assert_array_equal(free[1], capped[1])
    ys, xs = roi_align_sample_points([-1e6, -1e6, 1e6, 1e6], 2, 1.0, 0, True, (H, W))
    assert ys.shape == (2, 2, adaptive_grid_cap(H) * adaptive_grid_cap(W))
