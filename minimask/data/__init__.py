"""Data for minimask.

* ``minimask.data.synthetic`` - the synthetic shapes dataset (circles,
  squares, triangles and long thin bars, exact masks, made from a seed);
* ``minimask.data.shapes`` - thin rotated bars for chapter 1;
* ``minimask.data.coco`` - COCO-format datasets (annotation JSON + images);
* ``minimask.data.batch`` - the batch of each training step (and each
  data-parallel rank's part of it).
"""
from minimask.data.shapes import rotated_bar_mask, thin_bars_image
from minimask.data.synthetic import CLASSES, ShapesDataset, make_image

__all__ = ["CLASSES", "ShapesDataset", "make_image", "rotated_bar_mask", "thin_bars_image"]
