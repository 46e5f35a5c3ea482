"""Pictures: the RoIAlign sampling grid (and the RoIPool it replaced), the architecture, detections.

matplotlib is imported by the submodules only, so ``import minimask`` does
not pay for it.
"""
import importlib

_MODULE_OF = {
    "plot_roi_align_grid": "roi_align_grid",
    "roi_pool_reference": "roi_align_grid",
    "draw_architecture": "diagrams",
    "draw_ring_allreduce": "allreduce",
    **{name: "detection" for name in (
        "overlay_masks", "draw_boxes", "show_feature_maps", "show_image", "show_mask_grid",
        "draw_anchors", "draw_anchor_centres", "class_color")},
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'minimask.viz' has no attribute {name!r}")
    module = importlib.import_module(f"minimask.viz.{_MODULE_OF[name]}")
    return getattr(module, name)
