"""Modules: layers with parameters, wired to the layer functions.

A module's ``forward(x)`` returns ``(out, cache)`` and ``backward(dout,
cache)`` returns ``dx`` and *adds* the parameter gradients into each
``Parameter.grad``. Keeping the cache outside the module (rather than on
``self``) is what lets one module be applied several times per step - the
class and box subnets run on all five FPN levels with the same weights, and
each level's gradient simply accumulates.
"""
from __future__ import annotations

import math

import numpy as np

from minimask.layers import (conv2d_backward, conv2d_forward, conv_transpose2d_backward,
                             conv_transpose2d_forward, group_norm_backward, group_norm_forward,
                             max_pool2d_backward, max_pool2d_forward, relu_backward, relu_forward)
from minimask.nn import Module, Parameter


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class Conv2d(Module):
    """``conv2d`` with weight (F, C, kh, kw) and an optional bias.

    ``init="kaiming"`` draws N(0, 2 / fan_in) (He et al., for ReLU nets);
    ``init="normal"`` draws N(0, std^2) (RetinaNet's heads use std 0.01).
    """

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0, bias=True, *,
                 rng, init="kaiming", std=0.01, bias_value=0.0, dtype=np.float32):
        kh, kw = _pair(kernel_size)
        if init == "kaiming":
            std = math.sqrt(2.0 / (c_in * kh * kw))
        self.weight = Parameter((rng.standard_normal((c_out, c_in, kh, kw)) * std).astype(dtype))
        self.bias = Parameter(np.full(c_out, bias_value, dtype=dtype)) if bias else None
        self.stride, self.padding = stride, padding

    def forward(self, x):
        b = self.bias.value if self.bias is not None else None
        return conv2d_forward(x, self.weight.value, b, stride=self.stride, padding=self.padding)

    def backward(self, dout, cache, need_dx=True):
        dx, dw, db = conv2d_backward(dout, cache, need_dx)
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        return dx


class ConvTranspose2d(Module):
    """``conv_transpose2d`` with weight (C_in, C_out, kh, kw), as PyTorch."""

    def __init__(self, c_in, c_out, kernel_size=2, stride=2, *, rng, dtype=np.float32):
        kh, kw = _pair(kernel_size)
        std = math.sqrt(2.0 / (c_in * kh * kw / (stride * stride)))
        self.weight = Parameter((rng.standard_normal((c_in, c_out, kh, kw)) * std).astype(dtype))
        self.bias = Parameter(np.zeros(c_out, dtype=dtype))
        self.stride = stride

    def forward(self, x):
        return conv_transpose2d_forward(x, self.weight.value, self.bias.value, stride=self.stride)

    def backward(self, dout, cache):
        dx, dw, db = conv_transpose2d_backward(dout, cache)
        self.weight.accumulate(dw)
        self.bias.accumulate(db)
        return dx


class GroupNorm(Module):
    def __init__(self, num_groups, channels, *, dtype=np.float32):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.weight = Parameter(np.ones(channels, dtype=dtype))
        self.bias = Parameter(np.zeros(channels, dtype=dtype))

    def forward(self, x):
        return group_norm_forward(x, self.weight.value, self.bias.value, self.num_groups)

    def backward(self, dout, cache):
        dx, dgamma, dbeta = group_norm_backward(dout, cache)
        self.weight.accumulate(dgamma)
        self.bias.accumulate(dbeta)
        return dx


class ReLU(Module):
    def forward(self, x):
        return relu_forward(x)

    def backward(self, dout, cache):
        return relu_backward(dout, cache)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride, padding=0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return max_pool2d_forward(x, self.kernel_size, self.stride, self.padding)

    def backward(self, dout, cache):
        return max_pool2d_backward(dout, cache)


class Sequential(Module):
    """Modules applied in order; backward walks them in reverse."""

    def __init__(self, *modules):
        self.layers = list(modules)

    def forward(self, x):
        caches = []
        for layer in self.layers:
            x, cache = layer.forward(x)
            caches.append(cache)
        return x, caches

    def backward(self, dout, caches, need_dx=True):
        """``need_dx=False``: the input's gradient is not wanted (None is
        returned); the first layer skips it when it is a ``Conv2d``, and
        the others are not run when nothing below them trains."""
        for i in range(len(self.layers) - 1, -1, -1):
            layer, cache = self.layers[i], caches[i]
            if i == 0 and not need_dx:
                if isinstance(layer, Conv2d):
                    layer.backward(dout, cache, need_dx=False)
                elif layer.parameters():
                    layer.backward(dout, cache)
                return None
            dout = layer.backward(dout, cache)
        return dout


def gn_groups(channels: int, preferred: int = 32) -> int:
    """The largest group count <= ``preferred`` that divides ``channels``
    (32 for 256 channels, as RetinaMask-GN; fewer for the tiny preset)."""
    for g in range(min(preferred, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1
