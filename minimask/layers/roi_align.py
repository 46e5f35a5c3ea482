r"""RoIAlign: a fixed-size feature map for every region of interest.

A RoI is a box ``[x1, y1, x2, y2]`` in image pixels on image ``n`` of the
batch. Scaled onto a feature map (``spatial_scale = 1 / stride``) it covers a
region that is cut into ``ph x pw`` bins; every bin is read at a regular grid
of ``gh x gw`` sampling points, each point by bilinear interpolation, and the
bin's value is the average (``mode="avg"``) or the largest (``mode="max"``)
of its samples (Fig. 2 of the write-up).

Geometry, per axis (the same for y with ``ph`` and for x with ``pw``)
    offset = 0.5 if aligned else 0
    start  = x1 * spatial_scale - offset
    extent = (x2 * spatial_scale - offset) - start     (>= 1 if not aligned)
    bin    = extent / pw
    gw     = sampling_ratio if sampling_ratio > 0 else ceil(extent / pw)
    x(j, ix) = start + j * bin + (ix + 1/2) * bin / gw,   ix = 0 .. gw - 1

    ``aligned=True`` puts pixel centres at integer coordinates: pixel ``k``
    of the map covers ``[k - 1/2, k + 1/2]`` in scaled image coordinates, so
    the half-pixel shift makes a box's edges land on pixel edges.

Bilinear interpolation, per axis (``_axis_weights``, torchvision's rules)
    a sample with t < -1 or t > size lies outside: it contributes 0;
    t <= 0 is moved to 0;
    lo = floor(t), hi = lo + 1, unless lo >= size - 1, when lo = hi = size - 1
    and t = lo;
    the weights are (1 - l) for ``lo`` and l for ``hi``, with l = t - lo.

    In 2-D the four neighbours get the products of the axis weights:
        f(y, x) = sum over a in {lo, hi}_y, b in {lo, hi}_x of wy_a wx_b F[a, b]
    and a sample is outside when it is outside along either axis.

Forward
    avg:  out[r, c, i, j] = (1 / count) sum_s f_s,  count = max(gh * gw, 1),
          where f_s = bilinear sample s of F[n_r, c]; outside samples are 0
          and still counted (exactly torchvision.ops.roi_align).
    max:  out[r, c, i, j] = max_s f_s,  again with outside samples worth 0;
          the index s* of the largest (the first one on ties) is kept as
          ``argmax``. An empty grid (gh * gw = 0, a zero-size aligned RoI
          with adaptive sampling) gives 0 and argmax -1.

Backward (only the features get a gradient; the RoIs do not, as in
torchvision). Each sample is linear in the features, f_s = sum_k w_sk F[k],
so d f_s / d F[k] = w_sk, and
    avg:  dF[n_r, c, k] += dout[r, c, i, j] * w_sk / count   for every s
    max:  dF[n_r, c, k] += dout[r, c, i, j] * w_s*k            for s = s* only
Several bins, RoIs and samples touch the same pixel: the backward is a
scatter-add. If the winner s* is an outside sample (value 0), no gradient
flows for that bin: its value does not depend on any feature.

Inputs and precision
    ``rois`` may be any real dtype; the RoI geometry and sample positions
    are always computed in float64, on every backend, so that all backends
    sample the same points. The NumPy reference evaluates samples in
    float64 and rounds once when it stores the result. The cpu avg kernels
    use weights and sums in the features' dtype (so float32 stays
    vectorised); the cpu max kernel and the cuda kernels evaluate samples in
    float64. For float32 features all of this differs from torchvision's
    all-float32 arithmetic only by float32 round-off.

Kernels
    ``_axis_weights``, ``_roi_axis`` and ``_sample_coord`` are written once
    in plain Python. The NumPy reference calls them as they are; the CPU and
    CUDA kernels use copies compiled by ``_cuda.compile_for_both``.

    Memory layout on the cpu: the features are NCHW, so the C values a
    sample needs are H * W elements apart. The cpu kernels first make a
    channels-last copy (N, H, W, C): then the four neighbours of a sample
    are four contiguous rows of C values and the innermost loop, over
    channels, runs over contiguous memory and vectorises. The per-axis
    sampling tables (neighbour rows/columns and weights of every sample) are
    computed once per RoI, not once per channel (``_tables_cpu``).

    cpu forward: one parallel iteration per (RoI, bin row); it writes only
    its own outputs.
    cpu backward (avg): one parallel iteration per (image, block of
    channels); iteration (n, b) loops over every RoI of image n and adds
    only into its own slice of the channels-last gradient, so no two
    iterations ever write the same element - no race, no atomics. The
    gradient is transposed back to NCHW at the end.
    cpu backward (max): one parallel iteration per (image, channel), adding
    into the NCHW plane dF[n, c] only (the winner differs per channel, so
    there is nothing contiguous to vectorise over).
    cuda: one thread per output element; the backward scatters with
    ``cuda.atomic.add``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from minimask import _cuda
from minimask._checks import check_float_array, pair
from minimask._cuda import THREADS_PER_BLOCK, blocks_for, cuda
from minimask._threads import parallel_kernel
from minimask.backend import CPU, CUDA, NUMPY, current_backend

MODES = ("avg", "max")

# channels per parallel iteration of the cpu avg backward (see its kernel)
CPU_CHANNEL_BLOCK = 32

# --------------------------------------------------------------------------
# Scalar helpers, written once (plain Python; compiled for cpu and cuda below)
# --------------------------------------------------------------------------


def _roi_axis(a1, a2, spatial_scale, aligned, pooled, sampling_ratio, max_grid=0):
    """One axis of a RoI on the feature map: ``(start, bin_size, grid)``.

    ``a1, a2`` are the box edges in image pixels, ``pooled`` the number of
    bins and ``grid`` the number of samples per bin along this axis. An
    adaptive grid (``sampling_ratio <= 0``) is capped at ``max_grid`` when
    that is positive (see ``adaptive_grid_cap``).
    """
    offset = 0.5 if aligned else 0.0
    start = a1 * spatial_scale - offset
    end = a2 * spatial_scale - offset
    extent = end - start
    if not aligned:
        # torchvision turns malformed (tiny) RoIs into 1-pixel ones
        extent = max(extent, 1.0)
    bin_size = extent / pooled
    if sampling_ratio > 0:
        grid = sampling_ratio
    else:
        per_bin = extent / pooled   # compared as a float: no int overflow
        if max_grid > 0 and per_bin > max_grid:
            grid = max_grid
        else:
            grid = int(math.ceil(per_bin))
    return start, bin_size, grid


def adaptive_grid_cap(size):
    """The most samples per bin an adaptive grid takes along an axis of
    ``size`` feature pixels: ``size + 1``.

    Why it is harmless: the adaptive rule takes ``ceil(extent / pooled)``
    samples, so the cap changes nothing unless a single bin is wider than
    ``size + 1`` pixels - a RoI more than ``pooled`` times as long as the
    whole feature map. Every RoI that lies on the map (extent <= size) keeps
    exactly torchvision's grid. Without it a degenerate RoI (say a box of
    +-1e6 pixels) would ask for ~10^10 samples per bin and never return;
    with it, such a RoI costs at most ``(size + 1)^2`` samples per bin, most
    of them outside the map (worth 0).
    """
    return int(size) + 1


def _sample_coord(start, bin_size, p, i, grid):
    """Coordinate of sample ``i`` (of ``grid``) inside bin ``p``."""
    return start + p * bin_size + (i + 0.5) * bin_size / grid


def _axis_weights(t, size):
    """Linear interpolation at ``t`` along an axis of ``size`` pixels.

    Returns ``(inside, lo, hi, w_lo, w_hi)``: the two neighbouring pixels and
    their weights. ``inside`` is False for ``t < -1`` or ``t > size``, where
    the sample contributes 0 (then lo = hi = 0 and both weights are 0).
    """
    if t < -1.0 or t > size:
        return False, 0, 0, 0.0, 0.0
    if t <= 0.0:
        t = 0.0
    lo = int(t)
    if lo >= size - 1:
        lo = size - 1
        hi = size - 1
        t = float(lo)
    else:
        hi = lo + 1
    frac = t - lo
    return True, lo, hi, 1.0 - frac, frac


roi_axis_cpu, roi_axis_cuda = _cuda.compile_for_both(_roi_axis)
sample_coord_cpu, sample_coord_cuda = _cuda.compile_for_both(_sample_coord)
axis_weights_cpu, axis_weights_cuda = _cuda.compile_for_both(_axis_weights)


def roi_align_sample_points(roi, output_size, spatial_scale=1.0, sampling_ratio=-1,
                            aligned=True, feature_shape=None):
    """Where RoIAlign samples the feature map for one RoI.

    Inputs:
    - roi: ``[x1, y1, x2, y2]`` in image pixels (a leading batch index, as
      in a row of ``rois``, is allowed and ignored)
    - output_size: int or ``(ph, pw)``; spatial_scale, sampling_ratio,
      aligned: as in ``roi_align_forward``
    - feature_shape: ``(H, W)`` of the map, to cap an adaptive grid as the
      layer does (``adaptive_grid_cap``); None leaves it uncapped
    Returns ``(ys, xs)``, float64 arrays of shape ``(ph, pw, S)`` with
    ``S = gh * gw``: the feature-map coordinates of the samples of bin
    ``(i, j)``, sample ``s = iy * gw + ix``. These are the points the layer
    reads (the NumPy reference calls this function; the kernels use compiled
    copies of the same helpers).
    """
    ph, pw = pair("output_size", output_size)
    roi = np.asarray(roi, dtype=np.float64).reshape(-1)
    if roi.size == 5:
        roi = roi[1:]
    if roi.size != 4:
        raise ValueError(f"roi must be [x1, y1, x2, y2], got {roi.size} values")
    x1, y1, x2, y2 = (float(v) for v in roi)
    cap_y, cap_x = (0, 0) if feature_shape is None else \
        (adaptive_grid_cap(feature_shape[0]), adaptive_grid_cap(feature_shape[1]))
    start_y, bin_y, gh = _roi_axis(y1, y2, spatial_scale, aligned, ph, sampling_ratio, cap_y)
    start_x, bin_x, gw = _roi_axis(x1, x2, spatial_scale, aligned, pw, sampling_ratio, cap_x)
    y = np.array([[_sample_coord(start_y, bin_y, i, iy, gh) for iy in range(gh)]
                  for i in range(ph)]).reshape(ph, gh)
    x = np.array([[_sample_coord(start_x, bin_x, j, ix, gw) for ix in range(gw)]
                  for j in range(pw)]).reshape(pw, gw)
    # sample s = iy * gw + ix of bin (i, j) sits at (y[i, iy], x[j, ix])
    ys = np.broadcast_to(y[:, None, :, None], (ph, pw, gh, gw)).reshape(ph, pw, gh * gw)
    xs = np.broadcast_to(x[None, :, None, :], (ph, pw, gh, gw)).reshape(ph, pw, gh * gw)
    return ys.astype(np.float64), xs.astype(np.float64)


def bilinear_neighbours(y, x, H, W):
    """The four pixels bilinear interpolation at ``(y, x)`` reads, with
    weights: a list of ``((row, col), weight)``, empty for an outside
    sample. Plain Python composition of ``_axis_weights`` along each axis
    (used by the NumPy reference and the grid plot)."""
    in_y, y_lo, y_hi, wy_lo, wy_hi = _axis_weights(y, H)
    in_x, x_lo, x_hi, wx_lo, wx_hi = _axis_weights(x, W)
    if not (in_y and in_x):
        return []
    return [((y_lo, x_lo), wy_lo * wx_lo), ((y_lo, x_hi), wy_lo * wx_hi),
            ((y_hi, x_lo), wy_hi * wx_lo), ((y_hi, x_hi), wy_hi * wx_hi)]


# --------------------------------------------------------------------------
# NumPy reference (loops over RoIs, bins and samples; vectorised over C)
# --------------------------------------------------------------------------


def roi_align_forward_numpy(features, boxes, batch_index, ph, pw, spatial_scale,
                            sampling_ratio, aligned, mode):
    """Returns ``(out, argmax)``; ``argmax`` is None in avg mode."""
    N, C, H, W = features.shape
    R = boxes.shape[0]
    out = np.zeros((R, C, ph, pw), dtype=np.float64)
    argmax = np.full((R, C, ph, pw), -1, dtype=np.int32) if mode == "max" else None
    for r in range(R):
        fmap = features[batch_index[r]].astype(np.float64)  # (C, H, W)
        ys, xs = roi_align_sample_points(boxes[r], (ph, pw), spatial_scale,
                                         sampling_ratio, aligned, (H, W))
        S = ys.shape[2]
        for i in range(ph):
            for j in range(pw):
                if S == 0:
                    continue  # empty grid: output 0 (argmax stays -1)
                samples = np.zeros((S, C))  # outside samples stay 0
                for s in range(S):
                    for (yy, xx), w in bilinear_neighbours(ys[i, j, s], xs[i, j, s], H, W):
                        samples[s] += w * fmap[:, yy, xx]
                if mode == "avg":
                    out[r, :, i, j] = samples.sum(axis=0) / S
                else:
                    best = np.argmax(samples, axis=0)  # first maximum on ties
                    out[r, :, i, j] = samples[best, np.arange(C)]
                    argmax[r, :, i, j] = best
    return out.astype(features.dtype), argmax


def roi_align_backward_numpy(dout, shape, boxes, batch_index, ph, pw, spatial_scale,
                             sampling_ratio, aligned, mode, argmax):
    """dF (float64): every sample s of bin (r, i, j) hands dout[r, :, i, j]
    times its bilinear weights to its four neighbours - divided by S (avg),
    or only where s is the channel's winner (max)."""
    N, C, H, W = shape
    dfeatures = np.zeros(shape, dtype=np.float64)
    for r in range(boxes.shape[0]):
        dmap = dfeatures[batch_index[r]]  # a view: (C, H, W)
        ys, xs = roi_align_sample_points(boxes[r], (ph, pw), spatial_scale,
                                         sampling_ratio, aligned, (H, W))
        S = ys.shape[2]
        for i in range(ph):
            for j in range(pw):
                g = dout[r, :, i, j].astype(np.float64)
                for s in range(S):
                    if mode == "avg":
                        share = g / S
                    else:  # only the channels whose winner is sample s
                        share = np.where(argmax[r, :, i, j] == s, g, 0.0)
                    for (yy, xx), w in bilinear_neighbours(ys[i, j, s], xs[i, j, s], H, W):
                        dmap[:, yy, xx] += w * share
    return dfeatures


# --------------------------------------------------------------------------
# Numba CPU kernels
# --------------------------------------------------------------------------


@njit(cache=True)
def _grids_cpu(boxes, H, W, ph, pw, spatial_scale, sampling_ratio, aligned, grids):
    """grids[r] = (gh, gw), the samples per bin of RoI r along each axis
    (``H + 1`` and ``W + 1``: ``adaptive_grid_cap``, here and in every kernel)."""
    for r in range(boxes.shape[0]):
        grids[r, 0] = roi_axis_cpu(boxes[r, 1], boxes[r, 3], spatial_scale, aligned,
                                   ph, sampling_ratio, H + 1)[2]
        grids[r, 1] = roi_axis_cpu(boxes[r, 0], boxes[r, 2], spatial_scale, aligned,
                                   pw, sampling_ratio, W + 1)[2]


@njit(cache=True)
def _tables_cpu(boxes, H, W, ph, pw, spatial_scale, sampling_ratio, aligned,
                y_idx, y_w, x_idx, x_w):
    """Per RoI and axis, the two neighbours and weights of every sample.

    y_idx[r, i, iy] = (lo, hi), y_w[r, i, iy] = (w_lo, w_hi); x likewise.
    An outside sample gets weights 0 (and index 0), so it adds exactly 0.
    A few hundred numbers per RoI: a serial loop is plenty.
    """
    for r in range(boxes.shape[0]):
        start, bin_size, grid = roi_axis_cpu(boxes[r, 1], boxes[r, 3], spatial_scale,
                                             aligned, ph, sampling_ratio, H + 1)
        for i in range(ph):
            for iy in range(grid):
                t = sample_coord_cpu(start, bin_size, i, iy, grid)
                inside, lo, hi, w_lo, w_hi = axis_weights_cpu(t, H)
                y_idx[r, i, iy, 0] = lo
                y_idx[r, i, iy, 1] = hi
                y_w[r, i, iy, 0] = w_lo
                y_w[r, i, iy, 1] = w_hi
        start, bin_size, grid = roi_axis_cpu(boxes[r, 0], boxes[r, 2], spatial_scale,
                                             aligned, pw, sampling_ratio, W + 1)
        for j in range(pw):
            for ix in range(grid):
                t = sample_coord_cpu(start, bin_size, j, ix, grid)
                inside, lo, hi, w_lo, w_hi = axis_weights_cpu(t, W)
                x_idx[r, j, ix, 0] = lo
                x_idx[r, j, ix, 1] = hi
                x_w[r, j, ix, 0] = w_lo
                x_w[r, j, ix, 1] = w_hi


@parallel_kernel
def _forward_avg_cpu(fh, batch_index, grids, y_idx, y_w, x_idx, x_w, out):
    """fh is the channels-last copy (N, H, W, C): the four neighbours of a
    sample are four contiguous rows of C values, so the innermost loop runs
    over channels and vectorises. One parallel iteration per (RoI, bin row)
    writes only out[r, :, i, :]."""
    R, C, ph, pw = out.shape
    for k in prange(R * ph):
        r = k // ph
        i = k - r * ph
        n = batch_index[r]
        gh = grids[r, 0]
        gw = grids[r, 1]
        count = max(gh * gw, 1)
        acc = np.zeros((pw, C), dtype=fh.dtype)
        for j in range(pw):
            a = acc[j]
            for iy in range(gh):
                y0 = y_idx[r, i, iy, 0]
                y1 = y_idx[r, i, iy, 1]
                wy0 = y_w[r, i, iy, 0]
                wy1 = y_w[r, i, iy, 1]
                for ix in range(gw):
                    x0 = x_idx[r, j, ix, 0]
                    x1 = x_idx[r, j, ix, 1]
                    wx0 = x_w[r, j, ix, 0]
                    wx1 = x_w[r, j, ix, 1]
                    w00 = wy0 * wx0
                    w01 = wy0 * wx1
                    w10 = wy1 * wx0
                    w11 = wy1 * wx1
                    f00 = fh[n, y0, x0]
                    f01 = fh[n, y0, x1]
                    f10 = fh[n, y1, x0]
                    f11 = fh[n, y1, x1]
                    for c in range(C):
                        a[c] += w00 * f00[c] + w01 * f01[c] + w10 * f10[c] + w11 * f11[c]
        for c in range(C):
            for j in range(pw):
                out[r, c, i, j] = acc[j, c] / count


@parallel_kernel
def _forward_max_cpu(fh, batch_index, grids, y_idx, y_w, x_idx, x_w, out, argmax):
    """Channels-last like the avg kernel, one parallel iteration per (RoI,
    bin row). Samples are evaluated in float64 with the same products in the
    same order as the reference, so values - and winners - agree exactly."""
    R, C, ph, pw = out.shape
    for k in prange(R * ph):
        r = k // ph
        i = k - r * ph
        n = batch_index[r]
        gh = grids[r, 0]
        gw = grids[r, 1]
        best = np.full((pw, C), -np.inf)
        best_s = np.full((pw, C), -1, dtype=np.int32)
        for j in range(pw):
            b = best[j]
            bs = best_s[j]
            for iy in range(gh):
                y0 = y_idx[r, i, iy, 0]
                y1 = y_idx[r, i, iy, 1]
                wy0 = y_w[r, i, iy, 0]
                wy1 = y_w[r, i, iy, 1]
                for ix in range(gw):
                    x0 = x_idx[r, j, ix, 0]
                    x1 = x_idx[r, j, ix, 1]
                    wx0 = x_w[r, j, ix, 0]
                    wx1 = x_w[r, j, ix, 1]
                    w00 = wy0 * wx0
                    w01 = wy0 * wx1
                    w10 = wy1 * wx0
                    w11 = wy1 * wx1
                    f00 = fh[n, y0, x0]
                    f01 = fh[n, y0, x1]
                    f10 = fh[n, y1, x0]
                    f11 = fh[n, y1, x1]
                    s = iy * gw + ix
                    for c in range(C):
                        v = w00 * f00[c] + w01 * f01[c] + w10 * f10[c] + w11 * f11[c]
                        if v > b[c]:  # strict: the first maximum wins ties
                            b[c] = v
                            bs[c] = s
        for c in range(C):
            for j in range(pw):
                s = best_s[j, c]
                out[r, c, i, j] = best[j, c] if s >= 0 else 0.0
                argmax[r, c, i, j] = s


@parallel_kernel
def _backward_avg_cpu(dout, batch_index, grids, y_idx, y_w, x_idx, x_w, dfh, block):
    """Scatter into the channels-last gradient dfh (N, H, W, C). Parallel
    iteration (n, b) owns image n and channels [b * block, (b + 1) * block):
    it loops over every RoI of image n and adds only into its own slice
    dfh[n, :, :, c0:c1], so no two iterations write the same element."""
    N = dfh.shape[0]
    R, C, ph, pw = dout.shape
    blocks = (C + block - 1) // block
    for k in prange(N * blocks):
        n = k // blocks
        c0 = (k - n * blocks) * block
        nc = min(C, c0 + block) - c0
        g = np.empty(nc, dtype=dfh.dtype)
        for r in range(R):
            if batch_index[r] != n:
                continue
            gh = grids[r, 0]
            gw = grids[r, 1]
            count = max(gh * gw, 1)
            for i in range(ph):
                for j in range(pw):
                    for cc in range(nc):
                        g[cc] = dout[r, c0 + cc, i, j] / count
                    for iy in range(gh):
                        y0 = y_idx[r, i, iy, 0]
                        y1 = y_idx[r, i, iy, 1]
                        wy0 = y_w[r, i, iy, 0]
                        wy1 = y_w[r, i, iy, 1]
                        for ix in range(gw):
                            x0 = x_idx[r, j, ix, 0]
                            x1 = x_idx[r, j, ix, 1]
                            wx0 = x_w[r, j, ix, 0]
                            wx1 = x_w[r, j, ix, 1]
                            # four separate loops: a clamped sample has
                            # neighbours that are the same pixel (weight 0)
                            w = wy0 * wx0
                            d = dfh[n, y0, x0, c0:c0 + nc]
                            for cc in range(nc):
                                d[cc] += w * g[cc]
                            w = wy0 * wx1
                            d = dfh[n, y0, x1, c0:c0 + nc]
                            for cc in range(nc):
                                d[cc] += w * g[cc]
                            w = wy1 * wx0
                            d = dfh[n, y1, x0, c0:c0 + nc]
                            for cc in range(nc):
                                d[cc] += w * g[cc]
                            w = wy1 * wx1
                            d = dfh[n, y1, x1, c0:c0 + nc]
                            for cc in range(nc):
                                d[cc] += w * g[cc]


@parallel_kernel
def _backward_max_cpu(dout, argmax, batch_index, grids, y_idx, y_w, x_idx, x_w, dfeatures):
    N, C, H, W = dfeatures.shape
    R, _, ph, pw = dout.shape
    for k in prange(N * C):
        n = k // C
        c = k - n * C
        dplane = dfeatures[n, c]
        for r in range(R):
            if batch_index[r] != n:
                continue
            gw = grids[r, 1]
            for i in range(ph):
                for j in range(pw):
                    s = argmax[r, c, i, j]
                    if s < 0:
                        continue
                    iy = s // gw
                    ix = s - iy * gw
                    g = dout[r, c, i, j]
                    y0 = y_idx[r, i, iy, 0]
                    y1 = y_idx[r, i, iy, 1]
                    wy0 = y_w[r, i, iy, 0]
                    wy1 = y_w[r, i, iy, 1]
                    x0 = x_idx[r, j, ix, 0]
                    x1 = x_idx[r, j, ix, 1]
                    wx0 = x_w[r, j, ix, 0]
                    wx1 = x_w[r, j, ix, 1]
                    dplane[y0, x0] += g * (wy0 * wx0)
                    dplane[y0, x1] += g * (wy0 * wx1)
                    dplane[y1, x0] += g * (wy1 * wx0)
                    dplane[y1, x1] += g * (wy1 * wx1)


def _cpu_tables(boxes, H, W, ph, pw, spatial_scale, sampling_ratio, aligned,
                weight_dtype=np.float64):
    R = boxes.shape[0]
    grids = np.zeros((R, 2), dtype=np.int64)
    _grids_cpu(boxes, H, W, ph, pw, spatial_scale, sampling_ratio, aligned, grids)
    gh = max(int(grids[:, 0].max()), 1) if R else 1
    gw = max(int(grids[:, 1].max()), 1) if R else 1
    y_idx = np.zeros((R, ph, gh, 2), dtype=np.int64)
    y_w = np.zeros((R, ph, gh, 2), dtype=np.float64)
    x_idx = np.zeros((R, pw, gw, 2), dtype=np.int64)
    x_w = np.zeros((R, pw, gw, 2), dtype=np.float64)
    _tables_cpu(boxes, H, W, ph, pw, spatial_scale, sampling_ratio, aligned,
                y_idx, y_w, x_idx, x_w)
    return (grids, y_idx, y_w.astype(weight_dtype, copy=False), x_idx,
            x_w.astype(weight_dtype, copy=False))


# --------------------------------------------------------------------------
# CUDA kernels (one thread per output element)
# --------------------------------------------------------------------------

if cuda is not None:
    @cuda.jit
    def _forward_cuda(features, boxes, batch_index, spatial_scale, sampling_ratio,
                      aligned, is_max, out, argmax):
        R, C, ph, pw = out.shape
        H = features.shape[2]
        W = features.shape[3]
        k = cuda.grid(1)
        if k < out.size:
            j = k % pw
            i = (k // pw) % ph
            c = (k // (pw * ph)) % C
            r = k // (pw * ph * C)
            n = batch_index[r]
            start_y, bin_y, gh = roi_axis_cuda(boxes[r, 1], boxes[r, 3], spatial_scale,
                                               aligned, ph, sampling_ratio, H + 1)
            start_x, bin_x, gw = roi_axis_cuda(boxes[r, 0], boxes[r, 2], spatial_scale,
                                               aligned, pw, sampling_ratio, W + 1)
            acc = 0.0
            best = -math.inf
            best_s = -1
            for iy in range(gh):
                y = sample_coord_cuda(start_y, bin_y, i, iy, gh)
                in_y, y0, y1, wy0, wy1 = axis_weights_cuda(y, H)
                for ix in range(gw):
                    x = sample_coord_cuda(start_x, bin_x, j, ix, gw)
                    in_x, x0, x1, wx0, wx1 = axis_weights_cuda(x, W)
                    v = 0.0
                    if in_y and in_x:
                        v = (wy0 * wx0 * features[n, c, y0, x0]
                             + wy0 * wx1 * features[n, c, y0, x1]
                             + wy1 * wx0 * features[n, c, y1, x0]
                             + wy1 * wx1 * features[n, c, y1, x1])
                    acc += v
                    if v > best:
                        best = v
                        best_s = iy * gw + ix
            if is_max:
                out[r, c, i, j] = best if best_s >= 0 else 0.0
                argmax[r, c, i, j] = best_s
            else:
                out[r, c, i, j] = acc / max(gh * gw, 1)

    @cuda.jit
    def _backward_cuda(dout, boxes, batch_index, spatial_scale, sampling_ratio,
                       aligned, is_max, argmax, dfeatures):
        R, C, ph, pw = dout.shape
        H = dfeatures.shape[2]
        W = dfeatures.shape[3]
        k = cuda.grid(1)
        if k < dout.size:
            j = k % pw
            i = (k // pw) % ph
            c = (k // (pw * ph)) % C
            r = k // (pw * ph * C)
            n = batch_index[r]
            start_y, bin_y, gh = roi_axis_cuda(boxes[r, 1], boxes[r, 3], spatial_scale,
                                               aligned, ph, sampling_ratio, H + 1)
            start_x, bin_x, gw = roi_axis_cuda(boxes[r, 0], boxes[r, 2], spatial_scale,
                                               aligned, pw, sampling_ratio, W + 1)
            g = dout[r, c, i, j]
            first = 0
            last = gh * gw
            if is_max:
                first = argmax[r, c, i, j]
                last = first + 1
                if first < 0:
                    last = 0
            else:
                g = g / max(gh * gw, 1)
            for s in range(first, last):
                iy = s // gw
                ix = s - iy * gw
                y = sample_coord_cuda(start_y, bin_y, i, iy, gh)
                x = sample_coord_cuda(start_x, bin_x, j, ix, gw)
                in_y, y0, y1, wy0, wy1 = axis_weights_cuda(y, H)
                in_x, x0, x1, wx0, wx1 = axis_weights_cuda(x, W)
                if in_y and in_x:
                    cuda.atomic.add(dfeatures, (n, c, y0, x0), g * (wy0 * wx0))
                    cuda.atomic.add(dfeatures, (n, c, y0, x1), g * (wy0 * wx1))
                    cuda.atomic.add(dfeatures, (n, c, y1, x0), g * (wy1 * wx0))
                    cuda.atomic.add(dfeatures, (n, c, y1, x1), g * (wy1 * wx1))


# --------------------------------------------------------------------------
# Registration: forward (features, boxes, batch_index, ph, pw, geometry, mode)
# -> (out, argmax or None); backward (dout, argmax, boxes, batch_index, shape,
# ph, pw, geometry, mode) -> dfeatures, each on its backend's arrays. The
# RoIs (boxes, batch_index) are small host arrays, validated on the host.
# --------------------------------------------------------------------------


def _forward_numpy(f, boxes, batch_index, ph, pw, geometry, mode):
    return roi_align_forward_numpy(f, boxes, batch_index, ph, pw, *geometry, mode)


def _backward_numpy(dout, argmax, boxes, batch_index, shape, ph, pw, geometry, mode):
    d = roi_align_backward_numpy(dout, shape, boxes, batch_index, ph, pw, *geometry, mode,
                                 argmax)
    return d.astype(dout.dtype)


def _forward_cpu(f, boxes, batch_index, ph, pw, geometry, mode):
    N, C, H, W = f.shape
    R = boxes.shape[0]
    out = np.empty((R, C, ph, pw), dtype=f.dtype)
    if mode == "avg":
        # avg: weights in the features' dtype (float32 stays vectorised)
        tables = _cpu_tables(boxes, H, W, ph, pw, *geometry, f.dtype)
        channels_last = np.ascontiguousarray(f.transpose(0, 2, 3, 1))
        _forward_avg_cpu(channels_last, batch_index, *tables, out)
        return out, None
    # max: float64 samples, compared exactly as the reference does
    tables = _cpu_tables(boxes, H, W, ph, pw, *geometry)
    # one float64 build of the kernel serves float32 too (the channels-last
    # copy is made anyway; the cast rides along)
    argmax = np.empty((R, C, ph, pw), dtype=np.int32)
    channels_last = np.ascontiguousarray(f.transpose(0, 2, 3, 1), dtype=np.float64)
    out64 = out if out.dtype == np.float64 else np.empty(out.shape)
    _forward_max_cpu(channels_last, batch_index, *tables, out64, argmax)
    return out64.astype(f.dtype, copy=False), argmax


def _backward_cpu(dout, argmax, boxes, batch_index, shape, ph, pw, geometry, mode):
    N, C, H, W = shape
    dtype = dout.dtype
    g = np.ascontiguousarray(dout)
    if mode == "avg":
        tables = _cpu_tables(boxes, H, W, ph, pw, *geometry, dtype)
        channels_last = np.zeros((N, H, W, C), dtype=dtype)
        _backward_avg_cpu(g, batch_index, *tables, channels_last, CPU_CHANNEL_BLOCK)
        return np.ascontiguousarray(channels_last.transpose(0, 3, 1, 2))
    # max: one float64 build of the kernel for both dtypes
    tables = _cpu_tables(boxes, H, W, ph, pw, *geometry)
    dfeatures = np.zeros((N, C, H, W), dtype=np.float64)
    _backward_max_cpu(g.astype(np.float64, copy=False), np.ascontiguousarray(argmax),
                      batch_index, *tables, dfeatures)
    return dfeatures.astype(dtype, copy=False)


def _forward_on_cuda(f, boxes, batch_index, ph, pw, geometry, mode):
    N, C, H, W = f.shape
    R = boxes.shape[0]
    d_out = cuda.device_array((R, C, ph, pw), dtype=f.dtype)
    d_argmax = cuda.device_array((R, C, ph, pw) if mode == "max" else (1, 1, 1, 1),
                                 dtype=np.int32)
    if d_out.size:
        _forward_cuda[blocks_for(d_out.size), THREADS_PER_BLOCK](
            f, CUDA.asarray(boxes), CUDA.asarray(batch_index), *geometry, mode == "max",
            d_out, d_argmax)
    return d_out, (d_argmax if mode == "max" else None)


def _backward_on_cuda(dout, argmax, boxes, batch_index, shape, ph, pw, geometry, mode):
    d_dfeatures = _cuda.device_zeros(shape, dout.dtype)
    d_argmax = argmax if mode == "max" else cuda.device_array((1, 1, 1, 1), dtype=np.int32)
    if dout.size:
        _backward_cuda[blocks_for(dout.size), THREADS_PER_BLOCK](
            dout, CUDA.asarray(boxes), CUDA.asarray(batch_index), *geometry, mode == "max",
            d_argmax, d_dfeatures)
    return d_dfeatures


NUMPY.register("roi_align_forward", _forward_numpy)
NUMPY.register("roi_align_backward", _backward_numpy)
CPU.register("roi_align_forward", _forward_cpu)
CPU.register("roi_align_backward", _backward_cpu)
if cuda is not None:
    CUDA.register("roi_align_forward", _forward_on_cuda)
    CUDA.register("roi_align_backward", _backward_on_cuda)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def _check_rois(rois, N):
    """Return ``(boxes (R, 4) float64, batch_index (R,) int64)`` or raise."""
    if rois is None:
        raise ValueError("rois must be an array of shape (R, 5), got None")
    rois = current_backend().to_host(rois)  # small: validated on the host
    if rois.dtype.kind not in "fiu":
        raise ValueError(f"rois must hold real numbers, got dtype {rois.dtype}")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError("rois must have shape (R, 5) [batch_index, x1, y1, x2, y2], "
                         f"got shape {tuple(rois.shape)}")
    rois = rois.astype(np.float64)
    if not np.all(np.isfinite(rois)):
        raise ValueError("rois contains NaN or infinite values")
    index = rois[:, 0]
    bad = index != np.round(index)
    if np.any(bad):
        raise ValueError(f"rois[:, 0] (the batch index) must hold integers, got "
                         f"{index[bad][:5].tolist()} in rows {np.flatnonzero(bad)[:5].tolist()}")
    bad = (index < 0) | (index >= N)
    if np.any(bad):
        raise ValueError(f"rois[:, 0] (the batch index) must lie in [0, {N}), got "
                         f"{index[bad][:5].tolist()} in rows {np.flatnonzero(bad)[:5].tolist()}")
    boxes = np.ascontiguousarray(rois[:, 1:])
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if np.any(bad):
        raise ValueError("rois must have x2 >= x1 and y2 >= y1 (a box cannot have "
                         f"negative size); rows {np.flatnonzero(bad)[:5].tolist()} do not")
    return boxes, index.astype(np.int64)


def roi_align_forward(features, rois, output_size, spatial_scale, sampling_ratio=-1,
                      aligned=True, mode="avg"):
    """RoIAlign: pool a ``ph x pw`` feature map for every RoI.

    Inputs:
    - features: ``(N, C, H, W)`` float32 or float64 (host or, on "cuda",
      device array)
    - rois: ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in image pixels,
      any real dtype (coordinates are computed in float64); the batch index
      must be an integer in ``[0, N)`` and ``x2 >= x1``, ``y2 >= y1``
    - output_size: int or ``(ph, pw)``
    - spatial_scale: image pixels -> feature map (1 / stride), > 0
    - sampling_ratio: samples per bin along each axis; ``<= 0`` means
      ``ceil(roi_size / output_size)`` per axis (adaptive)
    - aligned: shift by half a pixel so pixel centres sit at integers
      (torchvision's ``aligned=True``); False also forces RoI sizes >= 1
    - mode: ``"avg"`` (exactly ``torchvision.ops.roi_align``) or ``"max"``
      (the largest bilinear sample of each bin)
    Returns ``(out, cache)``: ``out`` ``(R, C, ph, pw)`` of the features'
    dtype, where ``out[r, c, i, j] = mean_s f_s`` (avg) or ``max_s f_s``
    (max) over the bilinear samples ``f_s`` of bin ``(i, j)`` of RoI ``r``
    on image ``rois[r, 0]`` (see the module docstring for the exact rules).
    """
    features = check_float_array("features", features, ndim=4, what="(N, C, H, W)")
    N, C, H, W = features.shape
    ph, pw = pair("output_size", output_size)
    if isinstance(spatial_scale, (bool, np.bool_)) or not np.isfinite(spatial_scale) \
            or spatial_scale <= 0:
        raise ValueError(f"spatial_scale must be a positive number, got {spatial_scale!r}")
    spatial_scale = float(spatial_scale)
    if isinstance(sampling_ratio, (bool, np.bool_)) or \
            not isinstance(sampling_ratio, (int, np.integer)):
        raise ValueError(f"sampling_ratio must be an integer, got {sampling_ratio!r}")
    sampling_ratio = int(sampling_ratio)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    aligned = bool(aligned)
    if H < 1 or W < 1:
        raise ValueError(f"features must have H, W >= 1, got shape {tuple(features.shape)}")
    boxes, batch_index = _check_rois(rois, N)
    R = boxes.shape[0]

    be = current_backend()
    geometry = (spatial_scale, sampling_ratio, aligned)
    out, argmax = be.op("roi_align_forward")(be.asarray(features), boxes, batch_index,
                                             ph, pw, geometry, mode)
    cache = {"shape": (N, C, H, W), "dtype": features.dtype, "boxes": boxes,
             "batch_index": batch_index, "output_size": (ph, pw),
             "spatial_scale": spatial_scale, "sampling_ratio": sampling_ratio,
             "aligned": aligned, "mode": mode, "argmax": argmax, "backend": be}
    return be.output(out, features), cache


def roi_align_backward(dout, cache):
    """Gradient of RoIAlign with respect to the features.

    Inputs:
    - dout: ``(R, C, ph, pw)``, the upstream gradient (cast to the features'
      dtype)
    - cache: from ``roi_align_forward``
    Returns ``dfeatures`` ``(N, C, H, W)``: avg scatters
    ``dout[r, c, i, j] * w / count`` to the four neighbours (weights ``w``)
    of every sample of the bin; max sends ``dout[r, c, i, j] * w`` to the
    four neighbours of the winning sample only (nothing if it lies outside
    the map). RoIs get no gradient.
    """
    N, C, H, W = cache["shape"]
    dtype = cache["dtype"]
    ph, pw = cache["output_size"]
    boxes, batch_index = cache["boxes"], cache["batch_index"]
    R = boxes.shape[0]
    dout = check_float_array("dout", dout, ndim=4, what="(R, C, ph, pw)")
    if tuple(dout.shape) != (R, C, ph, pw):
        raise ValueError(f"dout must have the shape of the forward output "
                         f"{(R, C, ph, pw)}, got {tuple(dout.shape)}")
    geometry = (cache["spatial_scale"], cache["sampling_ratio"], cache["aligned"])
    be = cache["backend"]
    if dout.dtype != dtype:
        if be.on_device and be.is_native(dout):
            raise ValueError(f"dout must have the dtype of the features ({dtype}), "
                             f"got {dout.dtype}")
        dout = be.to_host(dout).astype(dtype)
    d = be.op("roi_align_backward")(be.asarray(dout), cache["argmax"], boxes, batch_index,
                                    (N, C, H, W), ph, pw, geometry, cache["mode"])
    return be.output(d, dout)
