"""Pictures of detections: boxes, instance masks, feature maps, anchors.

These are the drawing helpers of the detector chapters (6-8) and of the
command line's overlays (``minimask.predict``). They only draw: every number
they show (boxes, masks, scores, anchors) is computed by the package and
handed in, so a picture cannot disagree with the code that made it.

Conventions are those of the package: boxes are ``(x1, y1, x2, y2)`` in
continuous pixels with no ``+1``, pixel ``(i, j)`` covers
``[j, j + 1) x [i, i + 1)``. Images are drawn with ``extent=(0, W, H, 0)``
so a box edge at ``x1`` is drawn exactly on the pixel border it names.

matplotlib is imported inside the functions, so importing this module is
cheap.
"""
from __future__ import annotations

import numpy as np

# One colour per class (tab10 order), cycled when there are more classes.
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def class_color(label: int):
    """The colour used for class ``label`` (a hex string), stable across
    figures so a class keeps its colour from chapter to chapter."""
    return _TAB10[int(label) % len(_TAB10)]


def _image_hwc(image) -> np.ndarray:
    """``image`` as a float (H, W, 3) or (H, W) array in [0, 1] for imshow;
    accepts (3, H, W) (the package's layout), (H, W, 3) and (H, W)."""
    img = np.asarray(image, dtype=np.float64)
    # channels first is the package's layout, and wins when both fit (3x3x3)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise ValueError(f"image must be (3, H, W), (H, W, 3) or (H, W), got shape "
                         f"{np.shape(image)}")
    return np.clip(img, 0.0, 1.0)


def _new_axes(ax, size=(5, 5)):
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=size)
    return ax


def _caption(label, score, class_names):
    parts = []
    if label is not None:
        label = int(label)
        if class_names is not None and 0 <= label < len(class_names):
            parts.append(str(class_names[label]))
        else:
            parts.append(str(label))
    if score is not None:
        parts.append(f"{float(score):.2f}")
    return " ".join(parts)


def draw_boxes(ax, boxes, labels=None, scores=None, colors=None, class_names=None,
               linewidth=1.5, linestyle="-", fontsize=7, alpha=1.0):
    """Draw boxes (and a caption per box) on an Axes.

    Inputs:
    - ax: matplotlib Axes (an image already drawn with ``extent=(0, W, H, 0)``
      or any axes with y pointing down)
    - boxes: ``(D, 4)`` ``(x1, y1, x2, y2)`` in image pixels
    - labels: ``(D,)`` integer class ids or None; sets the colour and caption
    - scores: ``(D,)`` floats or None; written after the class name
    - colors: one colour for all boxes, a list of ``D`` colours, or None
      (class colours when labels are given, else white)
    - class_names: sequence of names indexed by label, or None (ids shown)
    Returns the Axes.
    """
    from matplotlib.colors import is_color_like, to_rgb
    from matplotlib.patches import Rectangle

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    D = len(boxes)
    labels = None if labels is None else np.asarray(labels).reshape(-1)
    scores = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    for name, arr in (("labels", labels), ("scores", scores)):
        if arr is not None and len(arr) != D:
            raise ValueError(f"{name} must have one entry per box ({D}), got {len(arr)}")
    if colors is None:
        colors = [class_color(l) for l in labels] if labels is not None else ["white"] * D
    elif is_color_like(colors):      # one colour for every box
        colors = [colors] * D
    if len(colors) != D:
        raise ValueError(f"colors must be one colour or one per box ({D}), got {len(colors)}")
    placed = []          # caption rectangles already drawn, (x, y_top, w, h) in data units
    for d in range(D):
        x1, y1, x2, y2 = boxes[d]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colors[d],
                               linewidth=linewidth, linestyle=linestyle, alpha=alpha))
        caption = _caption(None if labels is None else labels[d],
                           None if scores is None else scores[d], class_names)
        if caption:
            r, g, b = to_rgb(colors[d])
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.6 else "white"
            x, y = _caption_place(ax, boxes[d], caption, fontsize, placed)
            ax.text(x, y, caption, color=ink, fontsize=fontsize, va="top",
                    ha="left", bbox=dict(facecolor=colors[d], alpha=0.8, edgecolor="none",
                                         pad=1))
    return ax


def _caption_place(ax, box, caption, fontsize, placed):
    """Where a box's caption goes: just above the box's top-left corner if
    that is free, else inside the box's top, else under the box, else further
    up - the first spot that overlaps no caption already placed and stays in
    the axes. Sizes are estimated from the font size and the axes' scale (in
    data units per screen pixel). Appends the chosen rectangle to ``placed``
    and returns the text's top-left corner."""
    x1, y1, x2, y2 = (float(v) for v in box)
    xlo, xhi = sorted(ax.get_xlim())
    ylo, yhi = sorted(ax.get_ylim())
    extent = ax.get_window_extent()
    per_px_x = (xhi - xlo) / max(extent.width, 1.0)
    per_px_y = (yhi - ylo) / max(extent.height, 1.0)
    pt = ax.figure.dpi / 72.0
    w = (0.62 * len(caption) * fontsize + 4) * pt * per_px_x
    h = (1.2 * fontsize + 2) * pt * per_px_y
    x = min(max(x1, xlo), max(xlo, xhi - w))

    def free(y):
        if y < ylo - 1e-9 or y + h > yhi + 1e-9:
            return False
        return all(x + w <= px or px + pw <= x or y + h <= py or py + ph <= y
                   for px, py, pw, ph in placed)

    candidates = [y1 - h, y1, y2, y1 - 2 * h, y2 + h, y1 + h, y1 - 3 * h, y2 + 2 * h]
    y = next((c for c in candidates if free(c)), None)
    if y is None:                       # crowded: the first spot inside the axes
        y = next((c for c in candidates if ylo <= c <= yhi - h), min(max(y1, ylo), yhi - h))
    placed.append((x, y, w, h))
    return x, y


def overlay_masks(image, masks, boxes=None, labels=None, scores=None, class_names=None,
                  ax=None, alpha=0.5, colors=None, title=None):
    """Draw an image with its instance masks tinted on top (and boxes).

    Inputs:
    - image: ``(3, H, W)`` or ``(H, W, 3)`` (or ``(H, W)``) float in [0, 1]
    - masks: ``(D, H, W)`` bool, one per instance (``D`` may be 0)
    - boxes: ``(D, 4)`` ``(x1, y1, x2, y2)`` in pixels, or None (no boxes)
    - labels: ``(D,)`` integer class ids, or None; pick each instance's colour
    - scores: ``(D,)`` floats, or None; written next to the class name
    - class_names: names indexed by label, or None (ids are written)
    - ax: Axes to draw into; a new figure when None
    - alpha: opacity of the mask tint; colors: one colour per instance
      (overrides the class colours)
    - title: optional Axes title
    Returns the Axes.

    Each masked pixel is blended as ``(1 - alpha) * image + alpha * colour``
    and the outline of every mask is drawn at full opacity, so overlapping
    instances stay readable.
    """
    from matplotlib.colors import is_color_like, to_rgb

    img = _image_hwc(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    H, W = img.shape[:2]
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or (len(masks) and masks.shape[1:] != (H, W)):
        raise ValueError(f"masks must be (D, {H}, {W}) to match the image, got shape "
                         f"{np.shape(masks)}")
    masks = masks.astype(bool)
    D = len(masks)
    labels = None if labels is None else np.asarray(labels).reshape(-1)
    if labels is not None and len(labels) != D:
        raise ValueError(f"labels must have one entry per mask ({D}), got {len(labels)}")
    if colors is None:
        colors = ([class_color(l) for l in labels] if labels is not None
                  else [class_color(d) for d in range(D)])
    elif is_color_like(colors):
        colors = [colors] * D
    if len(colors) != D:
        raise ValueError(f"colors must have one entry per mask ({D}), got {len(colors)}")

    shown = img.copy()
    for d in range(D):
        rgb = np.asarray(to_rgb(colors[d]))
        shown[masks[d]] = (1 - alpha) * shown[masks[d]] + alpha * rgb

    ax = _new_axes(ax)
    ax.imshow(shown, extent=(0, W, H, 0), interpolation="nearest")
    for d in range(D):
        if masks[d].any() and not masks[d].all():
            # contour of the 0/1 mask at 0.5, on pixel centres
            ax.contour(np.arange(W) + 0.5, np.arange(H) + 0.5, masks[d].astype(float),
                       levels=[0.5], colors=[colors[d]], linewidths=1.0)
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) != D:
            raise ValueError(f"boxes must have one row per mask ({D}), got {len(boxes)}")
        draw_boxes(ax, boxes, labels=labels, scores=scores, colors=colors,
                   class_names=class_names)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    return ax


def show_image(ax, image, title=None):
    """Draw a ``(3, H, W)`` / ``(H, W, 3)`` / ``(H, W)`` image with pixel
    borders on integer coordinates (``extent=(0, W, H, 0)``); returns the Axes."""
    img = _image_hwc(image)
    H, W = img.shape[:2]
    ax.imshow(img, extent=(0, W, H, 0), interpolation="nearest",
              cmap="gray" if img.ndim == 2 else None)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    return ax


def show_feature_maps(features, names=None, channels=4, axes=None, cmap="viridis",
                      image_size=None):
    """A grid of feature maps: one row per level, ``channels`` maps per row.

    Inputs:
    - features: list of ``(C, H, W)`` or ``(1, C, H, W)`` arrays, one per
      level (e.g. ``[C3, C4, C5]`` or ``[P3, ..., P7]`` of one image)
    - names: one name per level (row titles), or None
    - channels: how many channels per level, or a list of channel indices;
      when an int, the channels with the largest spatial variance are drawn
      (the most structured ones, rather than the first few)
    - axes: a ``(levels, channels)`` array of Axes, or None (a new figure)
    - image_size: ``(H, W)`` of the input image; when given, each map is
      drawn on the image's pixel extent so levels line up
    Returns the ``(levels, channels)`` array of Axes.

    Each map is normalised on its own (its own colour range): the picture
    shows where a channel responds, not how strongly compared with others.
    """
    import matplotlib.pyplot as plt

    maps = []
    for f in features:
        f = np.asarray(f, dtype=np.float64)
        if f.ndim == 4:
            f = f[0]
        if f.ndim != 3:
            raise ValueError(f"each feature map must be (C, H, W) or (1, C, H, W), got shape "
                             f"{f.shape}")
        maps.append(f)
    if isinstance(channels, (int, np.integer)):
        picks = [np.argsort(-f.reshape(len(f), -1).var(axis=1))[:int(channels)] for f in maps]
    else:
        picks = [np.asarray(channels, dtype=int)] * len(maps)
    n_cols = max(len(p) for p in picks)
    if axes is None:
        _, axes = plt.subplots(len(maps), n_cols, figsize=(1.8 * n_cols, 1.8 * len(maps)),
                               squeeze=False)
    axes = np.asarray(axes).reshape(len(maps), n_cols)
    for row, (f, pick) in enumerate(zip(maps, picks)):
        C, h, w = f.shape
        extent = (0, image_size[1], image_size[0], 0) if image_size else (0, w, h, 0)
        for col in range(n_cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(pick):
                ax.axis("off")
                continue
            ax.imshow(f[pick[col]], cmap=cmap, extent=extent, interpolation="nearest")
            if col == 0:
                label = names[row] if names is not None else f"level {row}"
                ax.set_ylabel(f"{label}\n{h}x{w}", fontsize=8)
            ax.set_title(f"ch {int(pick[col])}", fontsize=7)
    return axes


def draw_anchors(ax, anchors, color="tab:orange", linewidth=0.8, alpha=1.0, linestyle="-"):
    """Draw anchor boxes ``(A, 4)`` as unfilled rectangles; returns the Axes.
    A thin wrapper on ``draw_boxes`` with no captions, kept for its name."""
    return draw_boxes(ax, anchors, colors=color, linewidth=linewidth, alpha=alpha,
                      linestyle=linestyle)


def draw_anchor_centres(ax, anchors, color="white", size=4, marker="."):
    """Mark the centre of every anchor ``(A, 4)``; returns the Axes."""
    anchors = np.asarray(anchors, dtype=np.float64).reshape(-1, 4)
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    ax.scatter(cx, cy, s=size, c=color, marker=marker, linewidths=0)
    return ax


def show_mask_grid(masks, titles=None, axes=None, cmap="gray", vmin=0.0, vmax=1.0):
    """Small ``m x m`` masks (targets or predicted probabilities) side by
    side. masks: ``(R, m, m)``; titles: one per mask or None. Returns the
    array of Axes (one per mask)."""
    import matplotlib.pyplot as plt

    masks = np.asarray(masks, dtype=np.float64)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (R, m, m), got shape {masks.shape}")
    R = len(masks)
    if axes is None:
        _, axes = plt.subplots(1, max(R, 1), figsize=(1.8 * max(R, 1), 2.0), squeeze=False)
    axes = np.asarray(axes).reshape(-1)
    for r in range(R):
        axes[r].imshow(masks[r], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[r].set_xticks([])
        axes[r].set_yticks([])
        if titles is not None:
            axes[r].set_title(titles[r], fontsize=8)
    return axes
