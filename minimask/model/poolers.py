"""Multi-level RoIAlign: each RoI read from the FPN level eq. (1) picks.

    k = floor(k0 + log2(sqrt(w h) / canonical_size))   clamped to [k_min, k_max]

RoIs are grouped by level, each group pooled from its level with
``spatial_scale = 1 / 2^k``, and the results put back in the RoIs' original
order. The backward does the same in reverse: each group's gradient goes to
the level it was read from, so only those levels receive a mask gradient.
"""
from __future__ import annotations

import numpy as np

from minimask.anchors import fpn_level
from minimask.backend import current_backend
from minimask.layers import glue, roi_align_backward, roi_align_forward


class MultiLevelRoIAlign:
    def __init__(self, output_size=14, sampling_ratio=2, mode="avg", canonical_size=224,
                 canonical_level=4, min_level=3, max_level=5, first_level=3):
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.mode = mode
        self.canonical_size = canonical_size
        self.canonical_level = canonical_level
        self.min_level, self.max_level = min_level, max_level
        self.first_level = first_level  # the pyramid level of levels[0] (P3)

    def levels_of(self, boxes):
        if len(boxes) == 0:
            return np.zeros(0, dtype=np.int64)
        return fpn_level(boxes, k0=self.canonical_level, canonical_size=self.canonical_size,
                         k_min=self.min_level, k_max=self.max_level)

    def forward(self, levels, rois):
        """levels: [P3, P4, ...] (N, C, H, W); rois: (R, 5) [batch, x1, y1, x2, y2].
        Returns (R, C, s, s) and a cache. The RoIs are a small host array;
        the features and the result stay on the current backend's device."""
        be = current_backend()
        rois = be.to_host(rois)
        C = levels[0].shape[1]
        dtype = levels[0].dtype
        s = self.output_size
        out = be.zeros((len(rois), C, s, s), dtype)
        k = self.levels_of(rois[:, 1:])
        groups = []
        for level in np.unique(k):
            idx = np.flatnonzero(k == level)
            features = levels[level - self.first_level]
            pooled, cache = roi_align_forward(
                features, rois[idx].astype(dtype), s, 1.0 / 2 ** level,
                sampling_ratio=self.sampling_ratio, aligned=True, mode=self.mode)
            glue.put_rows(out, idx, pooled)
            groups.append((level, idx, cache))
        return out, (groups, [tuple(P.shape) for P in levels], dtype)

    def backward(self, dout, cache):
        """Gradient of each level's features (zeros where no RoI read it)."""
        groups, shapes, dtype = cache
        be = current_backend()
        dlevels = [None] * len(shapes)
        for level, idx, group_cache in groups:
            i = level - self.first_level
            d = roi_align_backward(glue.take_rows(dout, idx), group_cache)
            dlevels[i] = d if dlevels[i] is None else glue.add(dlevels[i], d)
        return [d if d is not None else be.zeros(shape, dtype)
                for d, shape in zip(dlevels, shapes)]
