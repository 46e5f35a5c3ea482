"""Feature pyramid: P3-P7 from C3-C5 (RetinaNet's variant), and optionally P2.

    P5 = lateral5(C5)
    P4 = lateral4(C4) + up2(P5)          then a 3x3 smoothing conv on each
    P3 = lateral3(C3) + up2(P4)
    P6 = conv3x3/2(P5)
    P7 = conv3x3/2(relu(P6))

With four input widths (C2..C5) the pyramid goes one level further down,
as RetinaMask's ``p2p7`` variant does for its mask branch:

    P2 = lateral2(C2) + up2(P3)          (the sum before P3's smoothing conv)

P2 has stride 4. Only the mask RoIs read it; the dense heads keep P3..P7.
Its two convolutions are drawn from a child of ``rng`` (``rng.spawn``), which
leaves ``rng``'s own stream untouched, so every other parameter starts the
same with or without P2.

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


def _child(rng):
    """An independent generator derived from ``rng`` without drawing from it."""
    try:
        return rng.spawn(1)[0]
    except (AttributeError, TypeError, ValueError):   # no seed sequence to spawn from
        return rng


class FPN(Module):
    def __init__(self, in_channels, channels, *, rng, dtype=np.float32, p6_input="p5"):
        """in_channels: the widths of (C3, C4, C5), or of (C2, C3, C4, C5)
        for a pyramid that also builds P2."""
        in_channels = tuple(in_channels)
        if len(in_channels) not in (3, 4):
            raise ValueError(f"in_channels must give the widths of C3..C5 (3) or C2..C5 (4), "
                             f"got {list(in_channels)}")
        self.with_p2 = len(in_channels) == 4
        c3, c4, c5 = in_channels[-3:]
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
        if self.with_p2:    # created last: the names and order above stay as they were
            kw2 = dict(rng=_child(rng), dtype=dtype)
            self.lateral2 = Conv2d(in_channels[0], channels, 1, **kw2)
            self.smooth2 = Conv2d(channels, channels, 3, 1, 1, **kw2)

    def forward(self, feats):
        """``[C3, C4, C5]`` -> ``([P3, P4, P5, P6, P7], cache)``; with P2,
        ``[C2, C3, C4, C5]`` -> ``([P2, P3, P4, P5, P6, P7], cache)``."""
        if self.with_p2:
            C2, *rest = feats
            P, cache = self._forward_p3p7(rest)
            t3 = cache[-1]
            l2, cl2 = self.lateral2.forward(C2)
            u3, cu3 = _up_to(t3, l2.shape)
            P2, cs2 = self.smooth2.forward(glue.add(l2, u3))
            return [P2] + P, (cache[:-1], (cl2, cu3, cs2))
        P, cache = self._forward_p3p7(feats)
        return P, cache[:-1]

    def _forward_p3p7(self, feats):
        """The P3..P7 pyramid; the cache's last item is t3, P3 before smoothing."""
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
        return [P3, P4, P5, P6, P7], (cl3, cl4, cl5, cu4, cu5, cs3, cs4, cs5, c6, cr6, c7, t3)

    def backward(self, dP, cache):
        """Gradients of [P3..P7] -> gradients of [C3, C4, C5]; with P2,
        gradients of [P2..P7] -> gradients of [C2, C3, C4, C5]."""
        if self.with_p2:
            cache, (cl2, cu3, cs2) = cache
            dt2 = self.smooth2.backward(dP[0], cs2)          # t2 = l2 + up(t3)
            dC = self._backward_p3p7(dP[1:], cache, _up_to_backward(dt2, cu3))
            return [self.lateral2.backward(dt2, cl2)] + dC
        return self._backward_p3p7(dP, cache)

    def _backward_p3p7(self, dP, cache, dt3_extra=None):
        """dt3_extra: what P2's top-down path sends back to t3 (or None)."""
        cl3, cl4, cl5, cu4, cu5, cs3, cs4, cs5, c6, cr6, c7 = cache
        dP3, dP4, dP5, dP6, dP7 = dP
        dP6 = glue.add(dP6, relu_backward(self.p7.backward(dP7, c7), cr6))
        dP6_in = self.p6.backward(dP6, c6)
        if self.p6_input == "p5":
            dP5 = glue.add(dP5, dP6_in)
        dl5 = self.smooth5.backward(dP5, cs5)
        dt4 = self.smooth4.backward(dP4, cs4)
        dt3 = self.smooth3.backward(dP3, cs3)
        if dt3_extra is not None:
            dt3 = glue.add(dt3, dt3_extra)
        dt4 = glue.add(dt4, _up_to_backward(dt3, cu4))      # t3 = l3 + up(t4)
        dl5 = glue.add(dl5, _up_to_backward(dt4, cu5))      # t4 = l4 + up(l5)
        dC3 = self.lateral3.backward(dt3, cl3)
        dC4 = self.lateral4.backward(dt4, cl4)
        dC5 = self.lateral5.backward(dl5, cl5)
        if self.p6_input == "c5":
            dC5 = glue.add(dC5, dP6_in)
        return [dC3, dC4, dC5]
