"""Synthetic shapes: an instance-segmentation dataset made from a seed.

Four classes - circle, square, triangle and a long thin bar at any angle
(the case where a box crop is mostly background). Every image is made from
``(seed, index)`` alone, so image 17 of seed 3 is the same on every
machine, and its masks are exact: a pixel belongs to an object when its
centre ``(j + 0.5, i + 0.5)`` lies inside the shape.

Objects are drawn in order, each occluding those before it; the masks keep
only what stays visible, and an object left with less than half of its area
visible is dropped (its pixels stay drawn, as background clutter would).
Backgrounds are a colour gradient with noise and, half the time, stripes.
"""
from __future__ import annotations

import numpy as np

from minimask.masks import box_of_mask

CLASSES = ("circle", "square", "triangle", "bar")


def pixel_centres(height: int, width: int):
    """(x, y) coordinates of every pixel centre, each (H, W)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return x + 0.5, y + 0.5


def convex_polygon_mask(height: int, width: int, vertices) -> np.ndarray:
    """Pixels whose centres lie inside a convex polygon, (H, W) bool.

    ``vertices`` (V, 2) of (x, y) in either winding order; a centre is
    inside when it is on the inner side of every edge.
    """
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 2 or len(v) < 3:
        raise ValueError(f"vertices must be (V, 2) with V >= 3, got shape {v.shape}")
    x, y = pixel_centres(height, width)
    area2 = np.sum(v[:, 0] * np.roll(v[:, 1], -1) - np.roll(v[:, 0], -1) * v[:, 1])
    sign = 1.0 if area2 > 0 else -1.0
    inside = np.ones((height, width), dtype=bool)
    for (x0, y0), (x1, y1) in zip(v, np.roll(v, -1, axis=0)):
        cross = (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)
        inside &= sign * cross >= 0
    return inside


def circle_mask(height: int, width: int, centre, radius: float) -> np.ndarray:
    x, y = pixel_centres(height, width)
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius ** 2


def rotated_rectangle(centre, length: float, thickness: float, angle_deg: float) -> np.ndarray:
    """The four corners (x, y) of a ``length x thickness`` rectangle whose
    long side points along ``angle_deg`` (counter-clockwise from +x, with y
    pointing down the image)."""
    a = np.deg2rad(angle_deg)
    u = np.array([np.cos(a), -np.sin(a)]) * length / 2
    v = np.array([np.sin(a), np.cos(a)]) * thickness / 2
    c = np.asarray(centre, dtype=np.float64)
    return np.array([c - u - v, c + u - v, c + u + v, c - u + v])


def _random_shape(rng, kind: str, size: int):
    """(mask, description) of one shape of class ``kind`` somewhere in a
    ``size x size`` image."""
    if kind == "bar":
        length = rng.uniform(0.35, 0.8) * size
        thickness = rng.uniform(0.025, 0.06) * size + 1.5
        angle = rng.uniform(0, 180)
        centre = rng.uniform(0.25 * size, 0.75 * size, 2)
        return convex_polygon_mask(size, size, rotated_rectangle(centre, length, thickness, angle))
    extent = rng.uniform(0.12, 0.3) * size            # about the object's diameter
    centre = rng.uniform(extent / 2, size - extent / 2, 2)
    if kind == "circle":
        return circle_mask(size, size, centre, extent / 2)
    if kind == "square":
        side = extent / np.sqrt(2) * rng.uniform(1.0, 1.3)
        return convex_polygon_mask(size, size, rotated_rectangle(centre, side, side, rng.uniform(0, 90)))
    # triangle: three corners at random angles around the centre
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.35, 0.35, 3)
    corners = centre + extent / 2 * np.stack([np.cos(angles), np.sin(angles)], 1)
    return convex_polygon_mask(size, size, corners)


def _background(rng, size: int) -> np.ndarray:
    base = rng.uniform(0.1, 0.9, 3)
    direction = rng.uniform(-0.3, 0.3, (3, 2))
    x, y = pixel_centres(size, size)
    img = base[:, None, None] + direction[:, 0, None, None] * x / size + direction[:, 1, None, None] * y / size
    if rng.random() < 0.5:  # stripes
        a = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        stripes = np.sin((x * np.cos(a) + y * np.sin(a)) * 2 * np.pi / period)
        img = img + rng.uniform(0.03, 0.12) * stripes[None]
    img = img + rng.normal(0, rng.uniform(0.01, 0.06), (3, size, size))
    return img


def make_image(seed: int, index: int, size: int = 128, max_objects: int = 4):
    """One image and its target: ``image`` (3, H, W) float32 in [0, 1] and
    ``{"boxes": (G, 4), "labels": (G,), "masks": (G, H, W) bool}``."""
    rng = np.random.default_rng([seed, index])
    image = _background(rng, size)
    n_objects = rng.integers(1, max_objects + 1)
    masks, labels, areas = [], [], []
    for _ in range(n_objects):
        label = int(rng.integers(len(CLASSES)))
        mask = _random_shape(rng, CLASSES[label], size)
        if mask.sum() < 12:
            continue
        colour = rng.uniform(0, 1, 3)
        # keep the object visibly different from the background under it
        under = image[:, mask].mean(axis=1)
        if np.abs(colour - under).max() < 0.35:
            colour = np.where(under > 0.5, under - 0.45, under + 0.45)
        shade = 1 + rng.normal(0, 0.04, (3, int(mask.sum())))
        image[:, mask] = colour[:, None] * shade
        for m in masks:            # the new object hides what it covers
            m &= ~mask
        masks.append(mask)
        labels.append(label)
        areas.append(int(mask.sum()))
    image = np.clip(image, 0, 1).astype(np.float32)
    visible = [(m, l) for m, l, a in zip(masks, labels, areas)
               if m.sum() >= max(12, 0.5 * a)]
    return image, _target(visible, size)


def _target(visible, size):
    if not visible:
        return {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                "masks": np.zeros((0, size, size), bool)}
    masks = np.stack([m for m, _ in visible])
    labels = np.array([l for _, l in visible], dtype=np.int64)
    boxes = np.stack([box_of_mask(m) for m in masks]).astype(np.float32)
    return {"boxes": boxes, "labels": labels, "masks": masks}




class ShapesDataset:
    """``num_images`` synthetic images of side ``size`` from ``seed``.

    ``dataset[i]`` -> ``(image (3, H, W) float32 in [0, 1], target)`` with
    target ``{"boxes": (G, 4) float32, "labels": (G,) int64, "masks": (G, H,
    W) bool}``. Images are made on demand (a few ms each) and not stored.
    """

    class_names = CLASSES
    num_classes = len(CLASSES)

    def __init__(self, seed: int = 0, num_images: int = 1000, size: int = 128,
                 max_objects: int = 4):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if size < 32:
            raise ValueError(f"size must be at least 32 pixels, got {size}")
        self.seed, self.num_images, self.size, self.max_objects = seed, num_images, size, max_objects

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return make_image(self.seed, index, self.size, self.max_objects)

    def image_id(self, index: int) -> int:
        return index + 1

    def file_name(self, index: int) -> str:
        return f"shapes_{self.seed}_{index:05d}.png"
