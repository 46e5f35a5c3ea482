"""A ResNet in torchvision's layout with frozen batch norm, to hold pretrained weights.

The GroupNorm ResNet of ``backbone.py`` is minimask's own: trained from
scratch, any widths. This one follows torchvision's ``resnet18/34/50/101``
exactly, so that an ImageNet checkpoint fits it tensor for tensor:

    conv1 7x7/2 (no bias), bn1, ReLU, max-pool 3x3/2 pad 1      stride 4
    layer1 .. layer4: residual blocks; the first block of layer2-4 has
        stride 2 - in the 3x3 conv (ResNet "v1.5", torchvision and timm)
        and in the shortcut, ``downsample`` = 1x1 conv/s + bn
    basic block (18, 34):  conv1 3x3, bn1, ReLU, conv2 3x3, bn2
    bottleneck (50, 101):  conv1 1x1, bn1, ReLU, conv2 3x3, bn2, ReLU,
                           conv3 1x1 (x4 channels), bn3
    out = ReLU(branch(x) + shortcut(x))

Every ``bn`` is frozen batch norm (``minimask.layers.frozen_bn``). The
parameter names are torchvision's (``layer2.0.downsample.1.running_var``),
so importing is a renaming by prefix only. ``forward`` returns C3, C4, C5
(the outputs of layer2, layer3, layer4), as ``ResNet`` does.

Freezing (``trainable_stages``, torchvision's ``trainable_layers``): the
k last of [stem, layer1, layer2, layer3, layer4] train, the others keep
their imported values; the backward pass stops below the lowest trainable
stage, since nothing there needs a gradient.
"""
from __future__ import annotations

import numpy as np

from minimask.backend import current_backend
from minimask.layers import frozen_bn_backward, frozen_bn_forward, glue, relu_backward, relu_forward
from minimask.model.modules import Conv2d, MaxPool2d
from minimask.nn import Module, Parameter


class FrozenBatchNorm2d(Module):
    """Batch norm with fixed statistics: four (C,) arrays, none trained.

    They are Parameters so that ``state_dict`` saves them and ``load``
    restores them; each is marked ``frozen``, and training leaves frozen
    parameters out of the optimiser."""

    def __init__(self, channels, *, eps=1e-5, dtype=np.float32):
        self.weight = _frozen(np.ones(channels, dtype=dtype))
        self.bias = _frozen(np.zeros(channels, dtype=dtype))
        self.running_mean = _frozen(np.zeros(channels, dtype=dtype))
        self.running_var = _frozen(np.ones(channels, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        return frozen_bn_forward(x, self.weight.value, self.bias.value, self.running_mean.value,
                                 self.running_var.value, self.eps)

    def backward(self, dout, cache):
        return frozen_bn_backward(dout, cache)


def _frozen(value):
    p = Parameter(value)
    p.frozen = True
    return p


def is_frozen(p: Parameter) -> bool:
    """True for a parameter training must leave alone."""
    return bool(p.frozen)


def trainable_parameters(module: Module) -> list[Parameter]:
    """The parameters an optimiser should update (frozen ones left out)."""
    return [p for p in module.parameters() if not is_frozen(p)]


class _Block(Module):
    """Shared forward/backward of both block types: the branch is the list
    of (conv, bn) pairs, with a ReLU after every pair but the last."""

    def _pairs(self):
        raise NotImplementedError

    def forward(self, x):
        pairs = self._pairs()
        h, caches = x, []
        for k, (conv, bn) in enumerate(pairs):
            h, cc = conv.forward(h)
            h, cb = bn.forward(h)
            cr = None
            if k < len(pairs) - 1:
                h, cr = relu_forward(h)
            caches.append((cc, cb, cr))
        if self.downsample is not None:
            s, cdc = self.downsample[0].forward(x)
            s, cdb = self.downsample[1].forward(s)
            short = (cdc, cdb)
        else:
            s, short = x, None
        out, relu_cache = relu_forward(glue.add(h, s))
        return out, (caches, short, relu_cache)

    def backward(self, dout, cache):
        caches, short, relu_cache = cache
        dsum = relu_backward(dout, relu_cache)
        dh = dsum
        for (conv, bn), (cc, cb, cr) in zip(reversed(self._pairs()), reversed(caches)):
            if cr is not None:
                dh = relu_backward(dh, cr)
            dh = conv.backward(bn.backward(dh, cb), cc)
        if self.downsample is not None:
            cdc, cdb = short
            return glue.add(dh, self.downsample[0].backward(self.downsample[1].backward(dsum, cdb), cdc))
        return glue.add(dh, dsum)


class TVBasicBlock(_Block):
    expansion = 1

    def __init__(self, c_in, planes, stride, *, rng, dtype, eps):
        kw = dict(bias=False, rng=rng, dtype=dtype)
        self.conv1 = Conv2d(c_in, planes, 3, stride, 1, **kw)
        self.bn1 = FrozenBatchNorm2d(planes, eps=eps, dtype=dtype)
        self.conv2 = Conv2d(planes, planes, 3, 1, 1, **kw)
        self.bn2 = FrozenBatchNorm2d(planes, eps=eps, dtype=dtype)
        self.downsample = _downsample(c_in, planes, stride, rng, dtype, eps)

    def _pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]


class TVBottleneck(_Block):
    expansion = 4

    def __init__(self, c_in, planes, stride, *, rng, dtype, eps):
        kw = dict(bias=False, rng=rng, dtype=dtype)
        out = planes * 4
        self.conv1 = Conv2d(c_in, planes, 1, 1, 0, **kw)
        self.bn1 = FrozenBatchNorm2d(planes, eps=eps, dtype=dtype)
        self.conv2 = Conv2d(planes, planes, 3, stride, 1, **kw)   # stride here: ResNet v1.5
        self.bn2 = FrozenBatchNorm2d(planes, eps=eps, dtype=dtype)
        self.conv3 = Conv2d(planes, out, 1, 1, 0, **kw)
        self.bn3 = FrozenBatchNorm2d(out, eps=eps, dtype=dtype)
        self.downsample = _downsample(c_in, out, stride, rng, dtype, eps)

    def _pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]


def _downsample(c_in, c_out, stride, rng, dtype, eps):
    if stride == 1 and c_in == c_out:
        return None
    # a list, so its parameters are named downsample.0.weight, downsample.1.* as torchvision's
    return [Conv2d(c_in, c_out, 1, stride, 0, bias=False, rng=rng, dtype=dtype),
            FrozenBatchNorm2d(c_out, eps=eps, dtype=dtype)]


STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")


class TorchvisionResNet(Module):
    """``forward(images)`` -> ``([C3, C4, C5], cache)``, torchvision's layout
    (``([C2, C3, C4, C5], cache)`` with ``with_c2=True``: layer1's output too).

    stem_channels: width of conv1 (64 in every torchvision ResNet).
    blocks: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    widths: output channels per stage - (64, 128, 256, 512) for basic
    blocks, (256, 512, 1024, 2048) for bottlenecks (4 x the inner width).
    trainable_stages: 0..5, how many of the last stages train.
    """

    def __init__(self, *, stem_channels=64, blocks, widths, block="bottleneck", rng,
                 dtype=np.float32, eps=1e-5, trainable_stages=5, with_c2=False):
        Block = TVBottleneck if block == "bottleneck" else TVBasicBlock
        self.conv1 = Conv2d(3, stem_channels, 7, 2, 3, bias=False, rng=rng, dtype=dtype)
        self.bn1 = FrozenBatchNorm2d(stem_channels, eps=eps, dtype=dtype)
        self.maxpool = MaxPool2d(3, 2, 1)
        c_in = stem_channels
        for i, (n, width) in enumerate(zip(blocks, widths)):
            if width % Block.expansion:
                raise ValueError(f"stage {i + 1}: width {width} is not a multiple of the "
                                 f"{block} expansion {Block.expansion}")
            planes = width // Block.expansion
            stride = 1 if i == 0 else 2
            stage = [Block(c_in, planes, stride, rng=rng, dtype=dtype, eps=eps)]
            stage += [Block(width, planes, 1, rng=rng, dtype=dtype, eps=eps) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", stage)
            c_in = width
        self.with_c2 = bool(with_c2)
        self.out_channels = list(widths if self.with_c2 else widths[1:])
        self.trainable_stages = None
        self.set_trainable_stages(trainable_stages)

    def stages(self):
        """[stem, layer1, ..., layer4], each a list of modules."""
        return [[self.conv1, self.bn1]] + [getattr(self, f"layer{i}") for i in range(1, 5)]

    def set_trainable_stages(self, k: int) -> None:
        """Let the last ``k`` of the five stages train; freeze the rest.
        Frozen batch norm stays frozen whatever ``k`` is."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= 5:
            raise ValueError(f"trainable_stages must be an integer in 0..5 (as torchvision's "
                             f"trainable_layers), got {k!r}")
        self.trainable_stages = int(k)
        for i, stage in enumerate(self.stages()):
            train = i >= 5 - self.trainable_stages
            for module in stage:
                for name, p in module.named_parameters():
                    if _is_bn_param(module, name):
                        continue
                    p.frozen = not train

    def forward(self, x):
        h, c1 = self.conv1.forward(x)
        h, cb = self.bn1.forward(h)
        h, cr = relu_forward(h)
        h, cp = self.maxpool.forward(h)
        outputs, caches = [], []
        for i in range(1, 5):
            stage_caches = []
            for block in getattr(self, f"layer{i}"):
                h, c = block.forward(h)
                stage_caches.append(c)
            outputs.append(h)
            caches.append(stage_caches)
        first = 0 if self.with_c2 else 1
        return outputs[first:], ((c1, cb, cr, cp), caches, [o.shape for o in outputs])

    def backward(self, dfeatures, cache, need_input_grad=True):
        """``dfeatures``: gradients of [C3, C4, C5] (of [C2, ..., C5]
        with_c2: C2's adds to what layer2 sends into layer1's output). Returns d(images), or
        ``None`` when the stem is frozen (the pass stops at the lowest
        trainable stage: nothing below it needs a gradient) or when not
        ``need_input_grad`` (conv1 then skips it)."""
        (c1, cb, cr, cp), caches, shapes = cache
        lowest = 5 - self.trainable_stages          # index in STAGE_NAMES
        first = 1 if self.with_c2 else 2            # the layer whose output is dfeatures[0]
        dx = None
        for i in range(4, 0, -1):                   # layer4 .. layer1
            if i < lowest:
                return None
            d_here = dfeatures[i - first] if i >= first else None
            if dx is None:
                dx = d_here
            elif d_here is not None:
                dx = glue.add(dx, d_here)
            if dx is None:
                dx = current_backend().zeros(shapes[i - 1], dfeatures[0].dtype)
            for block, c in zip(reversed(getattr(self, f"layer{i}")), reversed(caches[i - 1])):
                dx = block.backward(dx, c)
        if lowest > 0:
            return None
        dx = self.maxpool.backward(dx, cp)
        dx = relu_backward(dx, cr)
        dx = self.bn1.backward(dx, cb)
        if not need_input_grad:
            self.conv1.backward(dx, c1, need_dx=False)
            return None
        return self.conv1.backward(dx, c1)


def _is_bn_param(module, name):
    """True when ``name`` (relative to ``module``) belongs to a frozen BN."""
    obj = module
    for part in name.split(".")[:-1]:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return isinstance(obj, FrozenBatchNorm2d)
