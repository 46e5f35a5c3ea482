"""Writes tests/golden/fpn_p3_reference.npz: what a micro RetinaMask (the
default roi_min_level=3, no P2) computed BEFORE P2 existed, for
tests/test_p2_masks.py to hold the code to.

Made by running this file with the tree of commit 29a4033 (the last one
without P2) on the path, on the NumPy backend:

    git archive 29a4033 | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/golden/make_p3_reference.py tests/golden/fpn_p3_reference.npz

It imports only names that existed then. Stored: the sha256 of the initial
state_dict (names and bytes), the names in order, the four loss terms and
every parameter's gradient, for the GroupNorm and the frozen-BN backbones.
"""
import hashlib
import sys
import numpy as np
import minimask
from minimask.model import Config, RetinaMask

def micro(**kw):
    base = dict(stem_channels=4, stem_kernel=3, block="basic", blocks=(1, 1, 1, 1),
                widths=(4, 4, 4, 4), fpn_channels=4, head_convs=1, mask_convs=1,
                anchor_sizes=(8, 16, 32, 64, 128), canonical_size=16, mask_size=8,
                num_classes=2, dtype="float64", seed=3)
    base.update(kw)
    return Config(**base).validated()

def scene(size=64, seed=0):
    rng = np.random.default_rng(seed)
    s = size // 32
    image = rng.uniform(0, 0.2, (1, 3, size, size))
    masks = np.zeros((2, size, size), bool)
    masks[0, 4 * s:14 * s, 3 * s:20 * s] = True
    masks[1, 16 * s:30 * s, 18 * s:26 * s] = True
    image[0, 0][masks[0]] += 0.8
    image[0, 1][masks[1]] += 0.8
    boxes = np.array([[3, 4, 20, 14], [18, 16, 26, 30]], float) * s
    return image, [{"boxes": boxes, "labels": np.array([0, 1]), "masks": masks}]

VARIANTS = {"gn": dict(), "frozenbn": dict(backbone="frozenbn", stem_kernel=7, trainable_stages=4)}
out = {}
with minimask.using_backend("numpy"):
    for key, kw in VARIANTS.items():
        model = RetinaMask(micro(**kw))
        h = hashlib.sha256()
        for name, value in model.state_dict().items():
            h.update(name.encode()); h.update(np.ascontiguousarray(value).tobytes())
        out[f"{key}/init_sha256"] = np.array(h.hexdigest())
        out[f"{key}/names"] = np.array(list(model.state_dict()))
        images, targets = scene()
        losses = model.loss(images, targets)
        out[f"{key}/losses"] = np.array([losses[k] for k in ("cls", "box", "mask", "total")])
        for name, p in model.named_parameters():
            out[f"{key}/grad/{name}"] = p.grad
np.savez_compressed(sys.argv[1], **out)
print({k: v for k, v in out.items() if "losses" in k or "sha" in k})
