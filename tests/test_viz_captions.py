"""Box captions are placed so that they do not cover each other."""
import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def _caption_boxes(ax):
    renderer = ax.figure.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in ax.texts]


def test_captions_of_overlapping_boxes_do_not_overlap():
    import matplotlib.pyplot as plt
    from minimask.viz.detection import overlay_masks
    image = np.full((3, 128, 128), 0.5)
    boxes = np.array([[40, 40, 90, 60], [42, 41, 92, 62], [45, 44, 88, 58], [0, 0, 30, 30],
                      [100, 2, 127, 20]], float)
    masks = np.zeros((len(boxes), 128, 128), bool)
    fig, ax = plt.subplots(figsize=(4, 4))
    overlay_masks(image, masks, boxes, labels=[0, 1, 2, 3, 0], scores=[0.9, 0.8, 0.7, 0.6, 0.5],
                  class_names=["circle", "square", "triangle", "bar"], ax=ax)
    fig.canvas.draw()
    extents = _caption_boxes(ax)
    assert len(extents) == len(boxes)
    for a in range(len(extents)):
        for b in range(a + 1, len(extents)):
            overlap_w = min(extents[a].x1, extents[b].x1) - max(extents[a].x0, extents[b].x0)
            overlap_h = min(extents[a].y1, extents[b].y1) - max(extents[a].y0, extents[b].y0)
            assert overlap_w <= 1 or overlap_h <= 1, (a, b, extents[a], extents[b])
    # every caption stays inside the axes (the box at the top edge gets its caption inside)
    frame = ax.get_window_extent()
    for e in extents:
        assert e.y1 <= frame.y1 + 2 and e.y0 >= frame.y0 - 2, (e, frame)
    plt.close(fig)
