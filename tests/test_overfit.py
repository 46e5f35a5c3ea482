"""The tiny model learns one synthetic image: the end-to-end proof that the
forward, the losses and the hand-written backward fit together."""
import numpy as np

import minimask
from minimask.model import Config, RetinaMask
from minimask.nn import SGD
from minimask.train import clip_gradients

STEPS = 150


def one_image(size=64):
    """A disc (class 0) and a rectangle (class 1) on a noisy background."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 0.3, (1, 3, size, size)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    masks = np.zeros((2, size, size), bool)
    masks[0] = (xx - 20) ** 2 + (yy - 22) ** 2 <= 12 ** 2
    masks[1, 34:58, 36:56] = True
    image[0, 0][masks[0]] = 0.9
    image[0, 2][masks[1]] = 0.8
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return image, [{"boxes": np.array(boxes, float), "labels": np.array([0, 1]), "masks": masks}]


def test_tiny_model_overfits_one_image():
    image, targets = one_image()
    model = RetinaMask(Config.preset("tiny", num_classes=2))
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9)
    with minimask.using_backend("cpu"):
        history = []
        for step in range(STEPS):
            optimizer.lr = 0.01 * min(1.0, (step + 1) / 20)  # warm-up
            history.append(model.loss(image, targets)["total"])
            clip_gradients(model.parameters(), 10.0)
            optimizer.step()
        final = model.loss(image, targets)["total"]
        (det,) = model.predict(image)
    assert final < history[0] / 10, (history[0], final)
    gt_masks = targets[0]["masks"]
    for g, label in enumerate(targets[0]["labels"]):
        same_class = det["masks"][det["labels"] == label]
        assert len(same_class), f"no detection of class {label}"
        ious = [np.logical_and(d, gt_masks[g]).sum() / np.logical_or(d, gt_masks[g]).sum()
                for d in same_class]
        assert max(ious) > 0.8, (label, ious)
    # the top detection of each class sits on its object
    for g, label in enumerate(targets[0]["labels"]):
        top = det["boxes"][det["labels"] == label][0]
        assert np.abs(top - targets[0]["boxes"][g]).max() < 4, (top, targets[0]["boxes"][g])
