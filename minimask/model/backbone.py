"""ResNet with GroupNorm: the backbone that gives C3, C4, C5.

Stem (conv, GN, ReLU, 3x3/2 max-pool) to stride 4, then four stages of
residual blocks; stages 2-4 halve the resolution, so their outputs C3, C4,
C5 have strides 8, 16, 32 - the inputs of the FPN. With ``with_c2=True``
stage 1's output C2 (stride 4) is returned too, for an FPN that builds P2;
its gradient then adds to the one stage 2 sends back into stage 1.

A residual block computes ``relu(branch(x) + shortcut(x))``; its backward
sends the gradient after the ReLU down both paths and adds what comes back.
The adds run on the current backend (``minimask.layers.glue``), so on
"cuda" the activations never leave the GPU.
"""
from __future__ import annotations

import numpy as np

from minimask.backend import current_backend
from minimask.layers import glue, relu_backward, relu_forward
from minimask.model.modules import Conv2d, GroupNorm, MaxPool2d, ReLU, Sequential, gn_groups
from minimask.nn import Module


def _conv_gn(c_in, c_out, k, stride, rng, dtype, relu=True):
    layers = [Conv2d(c_in, c_out, k, stride, k // 2, bias=False, rng=rng, dtype=dtype),
              GroupNorm(gn_groups(c_out), c_out, dtype=dtype)]
    return layers + [ReLU()] if relu else layers


class BasicBlock(Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    def __init__(self, c_in, c_out, stride, *, rng, dtype):
        self.branch = Sequential(*_conv_gn(c_in, c_out, 3, stride, rng, dtype),
                                 *_conv_gn(c_out, c_out, 3, 1, rng, dtype, relu=False))
        self.shortcut = (Sequential(*_conv_gn(c_in, c_out, 1, stride, rng, dtype, relu=False))
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        y, branch_cache = self.branch.forward(x)
        if self.shortcut is not None:
            s, short_cache = self.shortcut.forward(x)
        else:
            s, short_cache = x, None
        out, relu_cache = relu_forward(glue.add(y, s))
        return out, (branch_cache, short_cache, relu_cache)

    def backward(self, dout, cache):
        branch_cache, short_cache, relu_cache = cache
        dsum = relu_backward(dout, relu_cache)
        dx = self.branch.backward(dsum, branch_cache)
        if self.shortcut is not None:
            return glue.add(dx, self.shortcut.backward(dsum, short_cache))
        return glue.add(dx, dsum)


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50 and deeper)."""

    def __init__(self, c_in, c_out, stride, *, rng, dtype, expansion=4):
        mid = c_out // expansion
        self.branch = Sequential(*_conv_gn(c_in, mid, 1, 1, rng, dtype),
                                 *_conv_gn(mid, mid, 3, stride, rng, dtype),
                                 *_conv_gn(mid, c_out, 1, 1, rng, dtype, relu=False))
        self.shortcut = (Sequential(*_conv_gn(c_in, c_out, 1, stride, rng, dtype, relu=False))
                         if stride != 1 or c_in != c_out else None)


class ResNet(Module):
    """``forward(images)`` -> ``([C3, C4, C5], cache)``, or ``([C2, C3, C4,
    C5], cache)`` with ``with_c2=True``.

    stem_channels, stem_kernel: the first convolution (7x7 in ResNet; the
    tiny preset uses 3x3). blocks, widths: per stage. block: "basic" or
    "bottleneck". ``out_channels``: the widths of the maps ``forward`` returns.
    """

    def __init__(self, *, stem_channels, stem_kernel, blocks, widths, block="basic",
                 rng, dtype=np.float32, with_c2=False):
        Block = BasicBlock if block == "basic" else Bottleneck
        self.stem = Sequential(*_conv_gn(3, stem_channels, stem_kernel, 2, rng, dtype),
                               MaxPool2d(3, 2, 1))
        self.stages = []
        c_in = stem_channels
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = [Block(c_in, width, stride, rng=rng, dtype=dtype)]
            stage += [Block(width, width, 1, rng=rng, dtype=dtype) for _ in range(n - 1)]
            self.stages.append(Sequential(*stage))
            c_in = width
        self.with_c2 = bool(with_c2)
        # channels of C3, C4, C5 (C2 first with_c2)
        self.out_channels = list(widths if self.with_c2 else widths[1:])

    def forward(self, x):
        x, stem_cache = self.stem.forward(x)
        outputs, caches = [], []
        for stage in self.stages:
            x, cache = stage.forward(x)
            outputs.append(x)
            caches.append(cache)
        first = 0 if self.with_c2 else 1
        return outputs[first:], (stem_cache, caches, [o.shape for o in outputs])

    def backward(self, dfeatures, cache, need_input_grad=True):
        """``dfeatures``: gradients of [C3, C4, C5] (of [C2, ..., C5]
        with_c2); returns d(images) (None when not ``need_input_grad``:
        training never needs it, and the stem convolution then skips it)."""
        stem_cache, caches, shapes = cache
        first = 0 if self.with_c2 else 1       # the stage whose output is dfeatures[0]
        dx = None
        for i in range(len(self.stages) - 1, -1, -1):
            d_here = dfeatures[i - first] if i >= first else None
            if dx is None:
                dx = d_here
            elif d_here is not None:
                dx = glue.add(dx, d_here)
            if dx is None:
                dx = current_backend().zeros(shapes[i], dfeatures[0].dtype)
            dx = self.stages[i].backward(dx, caches[i])
        return self.stem.backward(dx, stem_cache, need_dx=need_input_grad)
