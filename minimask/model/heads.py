"""The two dense subnets and the mask subnet.

Class subnet   n x (conv3x3 + ReLU), conv3x3 -> A*K logits per location
Box subnet     n x (conv3x3 + ReLU), conv3x3 -> A*4 box deltas per location
    Both are shared by all FPN levels (the same weights run on P3..P7).
    RetinaNet's initialisation: every conv N(0, 0.01^2), biases 0, except
    the class logits' bias, -log((1 - pi) / pi) with pi = 0.01, so that at
    the start every anchor predicts "object" with probability 0.01 and the
    ~100k easy negatives do not swamp the first steps of the focal loss.

Mask subnet    n x (conv3x3 + ReLU) on the 14x14 RoI features, a 2x2
    stride-2 deconvolution + ReLU to 28x28, a 1x1 conv -> K mask logits.
    The write-up's footnote variant (Keras-MaskRCNN) replaces the
    deconvolution with nearest 2x upsampling + conv3x3 ("upsample").
"""
from __future__ import annotations

import math

import numpy as np

from minimask.layers import relu_backward, relu_forward, upsample_nearest2d_backward, upsample_nearest2d_forward
from minimask.model.modules import Conv2d, ConvTranspose2d, GroupNorm, ReLU, Sequential, gn_groups
from minimask.nn import Module


def _tower(channels, n_convs, rng, dtype, norm, init="normal", out_channels=None):
    """``n_convs`` x (conv3x3 [+ GN] + ReLU); the first conv maps ``channels``
    to ``out_channels`` (default: the same), the rest keep that width."""
    out_channels = channels if out_channels is None else out_channels
    layers = []
    for k in range(n_convs):
        c_in = channels if k == 0 else out_channels
        layers.append(Conv2d(c_in, out_channels, 3, 1, 1, rng=rng, init=init, std=0.01, dtype=dtype))
        if norm:
            layers.append(GroupNorm(gn_groups(out_channels), out_channels, dtype=dtype))
        layers.append(ReLU())
    return Sequential(*layers)


class DenseHead(Module):
    """A subnet run on every FPN level; ``forward(levels)`` returns, per
    level, a map of ``(N, A * out_per_anchor, H, W)``."""

    def __init__(self, channels, n_convs, num_anchors, out_per_anchor, *, rng, dtype,
                 norm=False, bias_value=0.0):
        self.tower = _tower(channels, n_convs, rng, dtype, norm)
        self.predict = Conv2d(channels, num_anchors * out_per_anchor, 3, 1, 1, rng=rng,
                              init="normal", std=0.01, bias_value=bias_value, dtype=dtype)

    def forward(self, levels):
        outs, caches = [], []
        for P in levels:
            h, tower_cache = self.tower.forward(P)
            out, pred_cache = self.predict.forward(h)
            outs.append(out)
            caches.append((tower_cache, pred_cache))
        return outs, caches

    def backward(self, douts, caches):
        dlevels = []
        for dout, (tower_cache, pred_cache) in zip(douts, caches):
            dh = self.predict.backward(dout, pred_cache)
            dlevels.append(self.tower.backward(dh, tower_cache))
        return dlevels


def class_prior_bias(prior: float = 0.01) -> float:
    """The class logits' initial bias, -log((1 - pi) / pi)."""
    return -math.log((1 - prior) / prior)


class MaskHead(Module):
    """RoI features (R, C, s, s) -> mask logits (R, K, 2s, 2s).

    ``width`` is the number of channels inside the head (default ``C``); a
    narrower head is cheaper, since its cost grows with the number of RoIs.
    With ``n_convs == 0`` the upsampling layer reads the RoI features."""

    def __init__(self, channels, n_convs, num_classes, *, rng, dtype, upsample="deconv",
                 width=None):
        if upsample not in ("deconv", "upsample"):
            raise ValueError(f"mask upsample must be 'deconv' or 'upsample', got {upsample!r}")
        width = channels if width is None else width
        self.tower = _tower(channels, n_convs, rng, dtype, norm=False, init="kaiming",
                            out_channels=width)
        c_up = width if n_convs else channels
        self.upsample = upsample
        if upsample == "deconv":
            self.up = ConvTranspose2d(c_up, width, 2, 2, rng=rng, dtype=dtype)
        else:
            self.up = Conv2d(c_up, width, 3, 1, 1, rng=rng, dtype=dtype)
        self.predict = Conv2d(width, num_classes, 1, rng=rng, init="normal", std=0.001,
                              dtype=dtype)

    def forward(self, x):
        h, tower_cache = self.tower.forward(x)
        if self.upsample == "deconv":
            u, up_cache = self.up.forward(h)
            nn_cache = None
        else:
            h2, nn_cache = upsample_nearest2d_forward(h, 2)
            u, up_cache = self.up.forward(h2)
        r, relu_cache = relu_forward(u)
        logits, pred_cache = self.predict.forward(r)
        return logits, (tower_cache, nn_cache, up_cache, relu_cache, pred_cache)

    def backward(self, dlogits, cache):
        tower_cache, nn_cache, up_cache, relu_cache, pred_cache = cache
        dr = self.predict.backward(dlogits, pred_cache)
        du = relu_backward(dr, relu_cache)
        dh = self.up.backward(du, up_cache)
        if nn_cache is not None:
            dh = upsample_nearest2d_backward(dh, nn_cache)
        return self.tower.backward(dh, tower_cache)
