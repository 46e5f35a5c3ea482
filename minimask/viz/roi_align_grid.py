"""Fig. 2 of the write-up: how RoIAlign samples a feature map.

The picture shows one channel of a feature map as its grid of pixels, the
RoI projected onto it, the RoI's ``ph x pw`` bins, the sampling points of
every bin, and for one chosen sample the four pixels bilinear interpolation
reads, with their weights. The points come from
``minimask.layers.roi_align.roi_align_sample_points`` and the weights from
``bilinear_neighbours`` - the very helpers the layer uses - so the picture
cannot drift from the code.
"""
from __future__ import annotations

import numpy as np

from minimask.layers.roi_align import (_roi_axis, bilinear_neighbours, roi_align_forward,
                                       roi_align_sample_points)


def plot_roi_align_grid(features, roi, output_size=2, sampling_ratio=2, spatial_scale=1.0,
                        aligned=True, ax=None, channel=0, show_neighbours=True,
                        sample=(0, 0, 0), show_values=True, mode="avg", cmap="Greys",
                        show_samples=True):
    """Draw the RoIAlign sampling grid of one RoI on a feature map.

    Inputs:
    - features: ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)`` array; channel
      ``channel`` is drawn
    - roi: ``[x1, y1, x2, y2]`` in image pixels (or a 5-value rois row)
    - output_size, sampling_ratio, spatial_scale, aligned, mode: as in
      ``roi_align_forward``
    - ax: matplotlib Axes to draw into (a new figure if None)
    - show_neighbours: mark the four pixels read by sample ``sample`` =
      ``(i, j, s)`` (bin row, bin column, sample index) and write their
      bilinear weights next to them
    - show_values: write each bin's pooled value in the bin, at a spot of
      the bin that is clear of the neighbour weights and sampling points
    - show_samples: draw the sampling points (turn off for a large grid,
      where they would bury bins and map)
    Returns the Axes.

    Coordinates are those of the layer on the feature map (after
    ``spatial_scale``): pixel ``(row, col)`` is drawn centred at
    ``(x, y) = (col, row)``, covering ``[col - 1/2, col + 1/2]``, which is
    the ``aligned=True`` convention (a box edge at image pixel ``x1`` lands
    at ``x1 * spatial_scale - 1/2``). With ``aligned=False`` the same pixel
    grid is drawn and the RoI is simply not shifted by half a pixel.
    Sampling points are drawn with one ``scatter`` call (its offsets are the
    points, as ``(x, y)``).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fmap = np.asarray(features, dtype=np.float64)
    if fmap.ndim == 4:
        fmap = fmap[0]
    if fmap.ndim == 3:
        fmap = fmap[channel]
    if fmap.ndim != 2:
        raise ValueError(f"features must be (H, W), (C, H, W) or (1, C, H, W), "
                         f"got shape {np.shape(features)}")
    H, W = fmap.shape
    roi = np.asarray(roi, dtype=np.float64).reshape(-1)
    if roi.size == 5:
        roi = roi[1:]
    ys, xs = roi_align_sample_points(roi, output_size, spatial_scale, sampling_ratio, aligned)
    ph, pw, S = ys.shape

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(fmap, cmap=cmap, origin="upper", extent=(-0.5, W - 0.5, H - 0.5, -0.5),
              alpha=0.6)
    # pixel borders, so each pixel reads as a cell centred on integers
    for k in range(W + 1):
        ax.axvline(k - 0.5, color="0.6", linewidth=0.5)
    for k in range(H + 1):
        ax.axhline(k - 0.5, color="0.6", linewidth=0.5)

    # the RoI on the map, and its bins (the same geometry the helpers use)
    y1, bin_h, _ = _roi_axis(roi[1], roi[3], spatial_scale, aligned, ph, sampling_ratio)
    x1, bin_w, _ = _roi_axis(roi[0], roi[2], spatial_scale, aligned, pw, sampling_ratio)
    y2, x2 = y1 + ph * bin_h, x1 + pw * bin_w
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="tab:red",
                           linewidth=2))
    for j in range(1, pw):
        x = x1 + j * (x2 - x1) / pw
        ax.plot([x, x], [y1, y2], color="tab:red", linewidth=1, linestyle="--")
    for i in range(1, ph):
        y = y1 + i * (y2 - y1) / ph
        ax.plot([x1, x2], [y, y], color="tab:red", linewidth=1, linestyle="--")

    if show_samples:
        ax.scatter(xs.reshape(-1), ys.reshape(-1), s=18, color="tab:blue", zorder=3,
                   label="sampling points")

    # where the weight labels go: inside each neighbour cell, pushed towards
    # the corner away from the sample so that the four labels stay apart
    weight_labels = []
    if show_neighbours and S:
        i, j, s = sample
        y, x = ys[i, j, s], xs[i, j, s]
        for (row, col), weight in bilinear_neighbours(y, x, H, W):
            ly = row + (0.28 if row >= y else -0.28)
            lx = col + (0.28 if col >= x else -0.28)
            weight_labels.append((row, col, ly, lx, weight))

    if show_values:
        rois = np.concatenate([[0.0], roi])[None]
        pooled, _ = roi_align_forward(fmap[None, None], rois, (ph, pw), spatial_scale,
                                      sampling_ratio, aligned, mode)
        pooled = np.asarray(pooled)[0, 0]
        taken = [(ly, lx) for _, _, ly, lx, _ in weight_labels]
        if show_samples:
            taken += list(zip(ys.reshape(-1), xs.reshape(-1)))
        bh, bw = (y2 - y1) / ph, (x2 - x1) / pw
        for i in range(ph):
            for j in range(pw):
                # candidate spots in the bin, as fractions of it; the first one
                # farthest from every other label and sample point wins
                spots = [(0.5, 0.5), (0.85, 0.5), (0.15, 0.5), (0.5, 0.2), (0.5, 0.8),
                         (0.85, 0.2), (0.85, 0.8), (0.15, 0.2), (0.15, 0.8)]
                points = [(y1 + (i + fy) * bh, x1 + (j + fx) * bw) for fy, fx in spots]

                def clearance(p):
                    if not taken:
                        return np.inf
                    return min(max(abs(p[0] - ty), abs(p[1] - tx) / 1.6) for ty, tx in taken)
                cy, cx = max(points, key=lambda p: min(clearance(p), 0.7))
                ax.text(cx, cy, f"{pooled[i, j]:.2f}", color="tab:red", ha="center",
                        va="center", fontsize=9, fontweight="bold", zorder=5,
                        bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1))

    if weight_labels:
        ax.scatter([x], [y], s=60, facecolor="none", edgecolor="tab:orange", linewidths=2,
                   zorder=4)
        for row, col, ly, lx, weight in weight_labels:
            ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False,
                                   edgecolor="tab:orange", linewidth=1.5))
            ax.plot([x, col], [y, row], color="tab:orange", linewidth=0.8)
            ax.text(lx, ly, f"{weight:.2f}", color="tab:orange", ha="center",
                    va="center", fontsize=8, zorder=5,
                    bbox=dict(facecolor="white", alpha=0.6, edgecolor="none", pad=0.5))

    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_title(f"RoIAlign: {ph}x{pw} bins, {S} samples per bin")
    return ax


def roi_pool_reference(features, roi, output_size, spatial_scale=1.0):
    """RoIPool (Fast R-CNN), the layer RoIAlign replaced: a reference for
    the chapter's picture of what quantisation loses. Not used by the model.

    Inputs:
    - features: ``(H, W)`` one channel of a feature map
    - roi: ``[x1, y1, x2, y2]`` in image pixels
    - output_size: int or ``(ph, pw)``; spatial_scale: 1 / stride
    Returns ``(out, cells)``: ``out (ph, pw)`` the largest value of each
    bin's cells (0 for a bin that holds no cell), and ``cells``, for every
    bin ``(i, j)``, the half-open cell ranges ``(r0, r1, c0, c1)`` it takes
    the maximum over.

    Two roundings, the ones RoIAlign removes: the RoI's corners are rounded
    to whole cells (rounded half up), ``round(x1 * spatial_scale)`` to ``round(x2 *
    spatial_scale)`` inclusive (so ``end - start + 1`` cells, at least one),
    and each bin, of fractional size ``cells / p``, is widened to whole
    cells: bin ``i`` covers ``floor(i * size / p)`` to ``ceil((i + 1) * size
    / p)`` past the start, cut to the map.
    """
    from minimask._checks import pair

    fmap = np.asarray(features, dtype=np.float64)
    if fmap.ndim != 2:
        raise ValueError(f"features must be one channel (H, W), got shape {fmap.shape}")
    ph, pw = pair("output_size", output_size)
    H, W = fmap.shape
    x1, y1, x2, y2 = (float(v) for v in np.asarray(roi, dtype=np.float64).reshape(-1)[-4:])

    def axis(a1, a2, pooled, size):
        start = int(np.floor(a1 * spatial_scale + 0.5))      # rounded half up
        end = int(np.floor(a2 * spatial_scale + 0.5))
        extent = max(end - start + 1, 1)
        ranges = []
        for i in range(pooled):
            lo = start + int(np.floor(i * extent / pooled))
            hi = start + int(np.ceil((i + 1) * extent / pooled))
            ranges.append((min(max(lo, 0), size), min(max(hi, 0), size)))
        return ranges

    rows, cols = axis(y1, y2, ph, H), axis(x1, x2, pw, W)
    out = np.zeros((ph, pw))
    cells = {}
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            cells[(i, j)] = (r0, r1, c0, c1)
            if r1 > r0 and c1 > c0:
                out[i, j] = fmap[r0:r1, c0:c1].max()
    return out, cells
