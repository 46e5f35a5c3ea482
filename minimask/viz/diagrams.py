"""Fig. 1 of the write-up, the RetinaMask architecture, drawn with matplotlib.

    ResNet (C3-C5) -> FPN (P3-P7) -> on every level: class subnet and box
    subnet (RetinaNet); boxes -> RoIs -> RoIAlign on the level eq. (1)
    picks -> mask subnet -> K masks of 28 x 28.

Only boxes, arrows and text: nothing here depends on the rest of minimask,
and the drawing is data (the lists below) rather than code.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

# colours of the parts: backbone, pyramid, RetinaNet heads, mask branch
_BACKBONE = "#9ecae1"
_PYRAMID = "#a1d99b"
_HEAD = "#fdd0a2"
_MASK = "#dadaeb"
_ROI = "#fcbba1"


def _block(ax, x, y, w, h, text, colour, fontsize=7.5, **kwargs):
    """A rounded box whose centre is (x, y), with its label inside."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                                boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=colour, edgecolor="0.25", linewidth=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, **kwargs)


def _arrow(ax, start, end, text=None, colour="0.2", style="-|>", offset=(0.0, 0.12),
           fontsize=7, connectionstyle="arc3", **text_kwargs):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=9,
                                 color=colour, linewidth=0.9,
                                 connectionstyle=connectionstyle, shrinkA=2, shrinkB=2))
    if text:
        mx = (start[0] + end[0]) / 2 + offset[0]
        my = (start[1] + end[1]) / 2 + offset[1]
        ax.text(mx, my, text, ha="center", va="bottom", fontsize=fontsize, **text_kwargs)


def _subnet(ax, y, colour, output, what):
    """One RetinaNet head (or the tail of the mask head): a row of feature
    maps joined by arrows, the first with the x4 conv stack."""
    xs = [8.4, 10.4, 12.6]
    _block(ax, xs[0], y, 1.5, 0.62, "W x H\nx 256", colour)
    _block(ax, xs[1], y, 1.5, 0.62, "W x H\nx 256", colour)
    _block(ax, xs[2], y, 1.6, 0.62, output, colour, fontweight="bold")
    _arrow(ax, (xs[0] + 0.78, y), (xs[1] - 0.78, y), "x4")
    _arrow(ax, (xs[1] + 0.78, y), (xs[2] - 0.83, y))
    ax.text(xs[2] + 0.95, y, what, ha="left", va="center", fontsize=7.5, style="italic")


def draw_architecture(ax=None):
    """Draw the RetinaMask architecture (the write-up's Fig. 1).

    Parameters
    ----------
    ax : a matplotlib ``Axes`` to draw on, or ``None`` for a new 13 x 7 inch
        figure.

    Returns
    -------
    The ``Axes``, with its frame and ticks turned off.

    The drawing shows the ResNet stages C3-C5 (strides 8, 16, 32), the FPN
    levels P3-P7 (256 channels each, P6 and P7 from extra stride-2 convs),
    the class subnet (four 3x3 conv + ReLU of ``W x H x 256``, then
    ``W x H x KA`` logits: ``K`` classes for each of ``A`` anchors) and the
    box subnet (``W x H x 4A`` deltas) run on every level, and the mask
    branch: each detected box is a RoI, sent to the level
    ``k = floor(k0 + log2(sqrt(w h) / 224))`` (eq. (1)), RoIAlign gives
    ``14 x 14 x 256``, four 3x3 convs, a 2x2 stride-2 deconvolution gives
    ``28 x 28 x 256`` and a 1x1 conv ``28 x 28 x K`` masks.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(13, 7))
    ax.set_xlim(-0.2, 15.6)
    ax.set_ylim(-0.3, 9.6)
    ax.set_aspect("equal")
    ax.axis("off")

    # the image and the backbone, bottom-up: higher stages are smaller maps
    _block(ax, 0.7, 0.9, 1.2, 1.0, "image\nH x W x 3", "white")
    stages = {3: (2.4, 2.0, 1.3), 4: (4.0, 1.6, 1.05), 5: (5.6, 1.25, 0.85)}
    previous = (0.7, 1.45)
    for level, (y, w, h) in stages.items():
        _block(ax, 2.2, y, w, h, f"C{level}\n/{2 ** level}", _BACKBONE)
        _arrow(ax, previous, (2.2, y - h / 2))
        previous = (2.2, y + h / 2)
    ax.text(2.2, 6.6, "ResNet", ha="center", fontsize=9, fontweight="bold")

    # the feature pyramid: laterals from C3-C5, top-down path, P6 and P7
    levels = {3: (2.4, 1.3), 4: (4.0, 1.05), 5: (5.6, 0.85), 6: (6.9, 0.7), 7: (8.0, 0.55)}
    px = 5.0
    for level, (y, size) in levels.items():
        _block(ax, px, y, size * 1.3, size, f"P{level}", _PYRAMID)
    for level in (3, 4, 5):
        y, _, h = stages[level]
        _arrow(ax, (2.2 + stages[level][1] / 2, y), (px - levels[level][1] * 0.65, y), "1x1")
    for upper, lower in ((5, 4), (4, 3)):
        _arrow(ax, (px + 0.05, levels[upper][0] - levels[upper][1] / 2),
               (px + 0.05, levels[lower][0] + levels[lower][1] / 2), colour="0.45")
        ax.text(px + 0.15, (levels[upper][0] + levels[lower][0]) / 2 + 0.1, "2x up",
                fontsize=6, color="0.35")
    _arrow(ax, (px - 0.3, levels[5][0] + levels[5][1] / 2),
           (px - 0.3, levels[6][0] - levels[6][1] / 2), colour="0.2")
    _arrow(ax, (px - 0.3, levels[6][0] + levels[6][1] / 2),
           (px - 0.3, levels[7][0] - levels[7][1] / 2), colour="0.2")
    ax.text(px - 0.5, 7.45, "3x3/s2", fontsize=6, ha="right", color="0.35")
    ax.text(px, 8.75, "FPN\nW x H x 256", ha="center", fontsize=8.5, fontweight="bold")

    # the two RetinaNet heads, shared by every pyramid level
    _subnet(ax, 7.5, _HEAD, "W x H\nx KA", "class subnet")
    _subnet(ax, 5.9, _HEAD, "W x H\nx 4A", "box subnet")
    bus_x = 6.5
    ax.plot([bus_x, bus_x], [levels[3][0], levels[7][0]], color="0.2", linewidth=0.9)
    for level, (y, size) in levels.items():
        ax.plot([px + size * 0.65, bus_x], [y, y], color="0.2", linewidth=0.9)
    _arrow(ax, (bus_x, 7.5), (8.4 - 0.78, 7.5))
    _arrow(ax, (bus_x, 5.9), (8.4 - 0.78, 5.9))
    ax.text(7.0, 8.55, "on each level P3-P7", fontsize=7.5, style="italic", ha="center")

    # the mask branch: detections become RoIs, RoIAlign on the level of eq. (1)
    roi_y, mask_y = 3.3, 1.3
    _block(ax, 9.6, roi_y, 3.1, 0.95,
           "RoIAlign\non P$_k$, $k=\\lfloor k_0+\\log_2(\\sqrt{wh}/224)\\rfloor$",
           _ROI, fontsize=7)
    _arrow(ax, (bus_x, 3.3), (9.6 - 1.57, roi_y), "level k, eq. (1)", offset=(0.0, 0.05))
    _arrow(ax, (13.4, 5.55), (10.2, roi_y + 0.5), "boxes (NMS) = RoIs",
           connectionstyle="arc3,rad=-0.15", offset=(0.7, -0.05))
    mask_xs = [7.2, 9.5, 12.0, 14.4]
    labels = ["14x14\nx256", "14x14\nx256", "28x28\nx256", "28x28\nx K"]
    for x, label in zip(mask_xs, labels):
        _block(ax, x, mask_y, 1.35, 0.72, label, _MASK,
               fontweight="bold" if label.endswith("K") else "normal")
    _arrow(ax, (9.6 - 0.6, roi_y - 0.5), (mask_xs[0] + 0.3, mask_y + 0.38))
    _arrow(ax, (mask_xs[0] + 0.7, mask_y), (mask_xs[1] - 0.7, mask_y), "x4")
    _arrow(ax, (mask_xs[1] + 0.7, mask_y), (mask_xs[2] - 0.7, mask_y), "2x2 deconv")
    _arrow(ax, (mask_xs[2] + 0.7, mask_y), (mask_xs[3] - 0.7, mask_y), "1x1")
    ax.text(mask_xs[3], mask_y - 0.6, "mask subnet (sigmoid)", fontsize=7.5,
            style="italic", ha="center", va="top")

    legend = [(_BACKBONE, "backbone"), (_PYRAMID, "feature pyramid"),
              (_HEAD, "RetinaNet heads"), (_ROI, "RoIAlign"), (_MASK, "mask head")]
    for i, (colour, name) in enumerate(legend):
        _block(ax, 11.2 + 0.0, 9.25 - 0.32 * i, 0.3, 0.2, "", colour)
        ax.text(11.45, 9.25 - 0.32 * i, name, fontsize=7, va="center")
    return ax
