"""Data for minimask: synthetic images with known masks.

For now, thin rotated bars (``minimask.data.shapes``), the kind of object
where a mask beats a box. The full synthetic shapes dataset, COCO-format
datasets and transforms come in a later issue.
"""
from minimask.data.shapes import rotated_bar_mask, thin_bars_image

__all__ = ["rotated_bar_mask", "thin_bars_image"]
