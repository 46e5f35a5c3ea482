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
                        sample=(0, 0, 0), show_values=True, mode="avg", cmap="Greys"):
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
    - show_values: write each bin's pooled value in the bin
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

    ax.scatter(xs.reshape(-1), ys.reshape(-1), s=18, color="tab:blue", zorder=3,
               label="sampling points")

    if show_values:
        rois = np.concatenate([[0.0], roi])[None]
        pooled, _ = roi_align_forward(fmap[None, None], rois, (ph, pw), spatial_scale,
                                      sampling_ratio, aligned, mode)
        pooled = np.asarray(pooled)[0, 0]
        for i in range(ph):
            for j in range(pw):
                # near the bottom edge of the bin, clear of the neighbour weights
                cx = x1 + (j + 0.5) * (x2 - x1) / pw
                cy = y1 + (i + 0.85) * (y2 - y1) / ph
                ax.text(cx, cy, f"{pooled[i, j]:.2f}", color="tab:red", ha="center",
                        va="center", fontsize=9, fontweight="bold",
                        bbox=dict(facecolor="white", alpha=0.7, edgecolor="none", pad=1))

    if show_neighbours and S:
        i, j, s = sample
        y, x = ys[i, j, s], xs[i, j, s]
        ax.scatter([x], [y], s=60, facecolor="none", edgecolor="tab:orange", linewidths=2,
                   zorder=4)
        for (row, col), weight in bilinear_neighbours(y, x, H, W):
            ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False,
                                   edgecolor="tab:orange", linewidth=1.5))
            ax.plot([x, col], [y, row], color="tab:orange", linewidth=0.8)
            ax.text(col, row, f"{weight:.2f}", color="tab:orange", ha="center",
                    va="center", fontsize=8)

    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_title(f"RoIAlign: {ph}x{pw} bins, {S} samples per bin")
    return ax
