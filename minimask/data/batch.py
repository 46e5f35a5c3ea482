"""Training batches: which images a step sees, flipped or not, and which
part of them each data-parallel rank computes.

The batch of step ``t`` is drawn from ``(seed, t)`` alone, so every rank
draws the same batch without talking to the others, and a resumed run sees
the same batches as an uninterrupted one:

    images, targets = make_batch(dataset, step, settings)               # the whole batch
    images, targets = make_batch(dataset, step, settings, part=(k, n))  # rank k of n

``settings`` is anything with ``seed``, ``batch_size`` and ``hflip``
(``minimask.train.TrainSettings``).
"""
from __future__ import annotations

import numpy as np


def batch_parts(batch_size: int, n: int) -> list[np.ndarray]:
    """The positions in a batch that each of ``n`` ranks computes:
    contiguous, sizes differing by at most one, every rank at least one."""
    if not 1 <= n <= batch_size:
        raise ValueError(f"the number of ranks must lie in [1, batch size {batch_size}], got {n}")
    return np.array_split(np.arange(batch_size), n)


def hflip(image, target):
    """Mirror an image and its boxes and masks left to right."""
    W = image.shape[-1]
    boxes = target["boxes"].copy()
    if len(boxes):
        boxes[:, [0, 2]] = W - target["boxes"][:, [2, 0]]
    return image[..., ::-1].copy(), {"boxes": boxes, "labels": target["labels"],
                                     "masks": target["masks"][..., ::-1].copy()}


def make_batch(dataset, step: int, s, part: tuple[int, int] = (0, 1)):
    """The batch of ``step``: indices and flips drawn from (seed, step).

    ``part=(k, n)``: only the k-th of the n contiguous slices of it
    (``batch_parts``), what rank k of n computes."""
    rng = np.random.default_rng([s.seed, step])
    idx = rng.integers(0, len(dataset), s.batch_size)
    flips = rng.random(s.batch_size) < 0.5
    if part != (0, 1):
        mine = batch_parts(s.batch_size, part[1])[part[0]]
        idx, flips = idx[mine], flips[mine]
    images, targets = [], []
    for i, flip in zip(idx, flips):
        image, target = dataset[int(i)]
        if s.hflip and flip:
            image, target = hflip(image, target)
        images.append(image)
        targets.append(target)
    return np.stack(images), targets
