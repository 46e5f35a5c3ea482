"""Feature pyramid: P3-P7 from C3-C5 (RetinaNet's variant).

    P5 = lateral5(C5)
    P4 = lateral4(C4) + up2(P5)          then a 3x3 smoothing conv on each
    P3 = lateral3(C3) + up2(P4)
    P6 = conv3x3/2(P5)
    P7 = conv3x3/2(relu(P6))

``up2`` is nearest-neighbour upsampling; when a map has an odd side the
doubled map is one row/column too big and is cropped to the lateral's size
(its backward pads the gradient back with zeros).

P6 is computed from the smoothed P5, as DESIGN.md's pipeline (and
torchvision's ``LastLevelP6P7`` when the channels match) does.
"""
from __future__ import annotations

import numpy as np

from minimask.layers import (glue, relu_backward, relu_forward, upsample_nearest2d_backward,
                             upsample_nearest2d_forward)
from minimask.model.modules import Conv2d
from minimask.nn import Module


def _up_to(x, shape):
    out, cache = upsample_nearest2d_forward(x, 2)
    H, W = shape[2], shape[3]
    if tuple(out.shape[2:]) != (H, W):
        return glue.crop_hw(out, H, W), (cache, tuple(out.shape))
    return out, (cache, tuple(out.shape))


def _up_to_backward(dout, cache):
    up_cache, full_shape = cache
    if tuple(dout.shape) != full_shape:
        dout = glue.pad_hw(dout, full_shape)
    return upsample_nearest2d_backward(dout, up_cache)


class FPN(Module):
    def __init__(self, in_channels, channels, *, rng, dtype=np.float32, p6_input="p5"):
        c3, c4, c5 = in_channels
        if p6_input not in ("p5", "c5"):
            raise ValueError(f"p6_input must be 'p5' or 'c5', got {p6_input!r}")
        # torchvision's LastLevelP6P7 reads P5 when its input width equals
        # the FPN's, C5 otherwise (retinanet_resnet50_fpn_v2)
        self.p6_input = p6_input
        kw = dict(rng=rng, dtype=dtype)
        self.lateral3 = Conv2d(c3, channels, 1, **kw)
        self.lateral4 = Conv2d(c4, channels, 1, **kw)
        self.lateral5 = Conv2d(c5, channels, 1, **kw)
        self.smooth3 = Conv2d(channels, channels, 3, 1, 1, **kw)
        self.smooth4 = Conv2d(channels, channels, 3, 1, 1, **kw)
        self.smooth5 = Conv2d(channels, channels, 3, 1, 1, **kw)
        self.p6 = Conv2d(c5 if p6_input == "c5" else channels, channels, 3, 2, 1, **kw)
        self.p7 = Conv2d(channels, channels, 3, 2, 1, **kw)
        self.channels = channels

    def forward(self, feats):
        """``[C3, C4, C5]`` -> ``([P3, P4, P5, P6, P7], cache)``."""
        C3, C4, C5 = feats
        l5, cl5 = self.lateral5.forward(C5)
        l4, cl4 = self.lateral4.forward(C4)
        l3, cl3 = self.lateral3.forward(C3)
        u5, cu5 = _up_to(l5, l4.shape)
        t4 = glue.add(l4, u5)
        u4, cu4 = _up_to(t4, l3.shape)
        t3 = glue.add(l3, u4)
        P3, cs3 = self.smooth3.forward(t3)
        P4, cs4 = self.smooth4.forward(t4)
        P5, cs5 = self.smooth5.forward(l5)
        P6, c6 = self.p6.forward(C5 if self.p6_input == "c5" else P5)
        r6, cr6 = relu_forward(P6)
        P7, c7 = self.p7.forward(r6)
        return [P3, P4, P5, P6, P7], (cl3, cl4, cl5, cu4, cu5, cs3, cs4, cs5, c6, cr6, c7)

    def backward(self, dP, cache):
        """Gradients of [P3..P7] -> gradients of [C3, C4, C5]."""
        cl3, cl4, cl5, cu4, cu5, cs3, cs4, cs5, c6, cr6, c7 = cache
        dP3, dP4, dP5, dP6, dP7 = dP
        dP6 = glue.add(dP6, relu_backward(self.p7.backward(dP7, c7), cr6))
        dP6_in = self.p6.backward(dP6, c6)
        if self.p6_input == "p5":
            dP5 = glue.add(dP5, dP6_in)
        dl5 = self.smooth5.backward(dP5, cs5)
        dt4 = self.smooth4.backward(dP4, cs4)
        dt3 = self.smooth3.backward(dP3, cs3)
        dt4 = glue.add(dt4, _up_to_backward(dt3, cu4))      # t3 = l3 + up(t4)
        dl5 = glue.add(dl5, _up_to_backward(dt4, cu5))      # t4 = l4 + up(l5)
        dC3 = self.lateral3.backward(dt3, cl3)
        dC4 = self.lateral4.backward(dt4, cl4)
        dC5 = self.lateral5.backward(dl5, cl5)
        if self.p6_input == "c5":
            dC5 = glue.add(dC5, dP6_in)
        return [dC3, dC4, dC5]
