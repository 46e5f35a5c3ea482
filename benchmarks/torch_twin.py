"""minimask's RetinaMask written again in PyTorch, for benchmarks only.

The twin has minimask's layers in minimask's order, with parameters named
as minimask names them (``backbone.stem.layers.0.weight``,
``cls_head.tower.layers.3.bias``, ...), so ``model.state_dict()`` of a
minimask model loads into it with ``load_state_dict(strict=True)`` and a
missing or extra parameter is an error, not a silent difference.

What each piece is in PyTorch:

    ResNet with GroupNorm   nn.Conv2d (no bias) + nn.GroupNorm(eps=1e-5) + ReLU,
                            a 3x3/2 max-pool after the stem; basic or
                            bottleneck blocks, a 1x1 conv + GN shortcut where
                            the shape changes
    FPN P3-P7               1x1 laterals, nearest 2x upsampling cropped to the
                            lateral's size (minimask's rule for odd sides; not
                            ``interpolate(size=...)``, which maps pixels
                            differently), 3x3 smoothing, P6 from the smoothed
                            P5 (or from C5 with ``p6_input="c5"``), P7 from
                            relu(P6)
    P2 (roi_min_level = 2)  smooth2(lateral2(C2) + up2(t3)): C2 is the first
                            stage's output (stride 4), t3 the sum that P3 is
                            smoothed from (lateral3(C3) + up2(t4)). Only the
                            mask RoIs read P2; the dense heads keep P3-P7
    class / box subnets     shared over the levels; GroupNorm after each tower
                            conv when the config has ``head_norm``
    mask branch             ``torchvision.ops.roi_align`` per FPN level
                            (aligned=True, the config's sampling ratio,
                            spatial scale 1 / 2^k, average mode; levels from
                            P2 when the config has it, else from P3), a conv tower
                            without norm, a 2x2/2 transposed conv (or nearest
                            2x + 3x3 conv), ReLU, a 1x1 conv to K channels
    losses                  ``torchvision.ops.sigmoid_focal_loss`` times the
                            ignore weights, summed / max(1, num_pos); smooth L1
                            with beta on the positive anchors, summed /
                            max(1, num_pos); BCE-with-logits on each RoI's own
                            class channel, averaged over the RoIs' pixels;
                            eq. (2) adds them (the mask term times the config's
                            ``mask_loss_weight``)

Everything that is not the network - anchor matching, the mask RoIs (ground
truth plus matched detections), their FPN levels and their mask targets - is
computed once, by minimask, and handed to ``RetinaMaskTwin.loss`` as arrays
(see ``bench_torch_step.prepare``): a benchmark then times the same network
on both sides, nothing else. This module never imports minimask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align, sigmoid_focal_loss


def gn_groups(channels: int, preferred: int = 32) -> int:
    """minimask's rule: the largest group count <= 32 that divides ``channels``."""
    for g in range(min(preferred, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class Seq(nn.Module):
    """Like minimask's ``Sequential``: the children live in ``.layers``, so
    their parameters are named ``layers.<i>.<name>`` as in minimask."""

    def __init__(self, *modules):
        super().__init__()
        self.layers = nn.ModuleList(modules)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def conv_gn(c_in, c_out, k, stride, relu=True):
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False),
              nn.GroupNorm(gn_groups(c_out), c_out, eps=1e-5)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.branch = Seq(*conv_gn(c_in, c_out, 3, stride), *conv_gn(c_out, c_out, 3, 1, relu=False))
        self.shortcut = (Seq(*conv_gn(c_in, c_out, 1, stride, relu=False))
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.branch(x) + s, inplace=True)


class Bottleneck(BasicBlock):
    def __init__(self, c_in, c_out, stride, expansion=4):
        nn.Module.__init__(self)
        mid = c_out // expansion
        self.branch = Seq(*conv_gn(c_in, mid, 1, 1), *conv_gn(mid, mid, 3, stride),
                          *conv_gn(mid, c_out, 1, 1, relu=False))
        self.shortcut = (Seq(*conv_gn(c_in, c_out, 1, stride, relu=False))
                         if stride != 1 or c_in != c_out else None)


class ResNet(nn.Module):
    def __init__(self, stem_channels, stem_kernel, blocks, widths, block, with_c2=False):
        super().__init__()
        self.with_c2 = with_c2      # return C2 (stage 1's output) too, for P2
        Block = BasicBlock if block == "basic" else Bottleneck
        self.stem = Seq(*conv_gn(3, stem_channels, stem_kernel, 2), nn.MaxPool2d(3, 2, 1))
        stages, c_in = [], stem_channels
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            stages.append(Seq(Block(c_in, width, stride),
                              *[Block(width, width, 1) for _ in range(n - 1)]))
            c_in = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs if self.with_c2 else outs[1:]


def _up_to(x, like):
    """Nearest 2x, cropped to ``like``'s height and width (minimask's FPN)."""
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return up[:, :, :like.shape[2], :like.shape[3]]


class FPN(nn.Module):
    """in_channels: the widths of (C3, C4, C5), or of (C2, C3, C4, C5) for a
    pyramid that also builds P2 (minimask's ``FPN`` with four widths)."""

    def __init__(self, in_channels, channels, p6_input="p5"):
        super().__init__()
        in_channels = tuple(in_channels)
        if len(in_channels) not in (3, 4):
            raise ValueError(f"in_channels: the widths of C3..C5 or C2..C5, got {in_channels}")
        if p6_input not in ("p5", "c5"):
            raise ValueError(f"p6_input must be 'p5' or 'c5', got {p6_input!r}")
        self.with_p2 = len(in_channels) == 4
        self.p6_input = p6_input
        c3, c4, c5 = in_channels[-3:]
        self.lateral3 = nn.Conv2d(c3, channels, 1)
        self.lateral4 = nn.Conv2d(c4, channels, 1)
        self.lateral5 = nn.Conv2d(c5, channels, 1)
        self.smooth3 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.smooth4 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.smooth5 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.p6 = nn.Conv2d(c5 if p6_input == "c5" else channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)
        if self.with_p2:
            self.lateral2 = nn.Conv2d(in_channels[0], channels, 1)
            self.smooth2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, feats):
        """-> ([P3, P4, P5, P6, P7], P2 or None)."""
        C2 = None
        if self.with_p2:
            C2, *feats = feats
        C3, C4, C5 = feats
        l5 = self.lateral5(C5)
        t4 = self.lateral4(C4) + _up_to(l5, C4)
        t3 = self.lateral3(C3) + _up_to(t4, C3)
        P5 = self.smooth5(l5)
        P6 = self.p6(C5 if self.p6_input == "c5" else P5)
        P7 = self.p7(F.relu(P6))
        P2 = None
        if C2 is not None:      # t3, P3 before its smoothing conv, goes down to P2
            P2 = self.smooth2(self.lateral2(C2) + _up_to(t3, C2))
        return [self.smooth3(t3), self.smooth4(t4), P5, P6, P7], P2


def _tower(channels, n_convs, norm, out_channels=None):
    out_channels = channels if out_channels is None else out_channels
    layers = []
    for k in range(n_convs):
        layers.append(nn.Conv2d(channels if k == 0 else out_channels, out_channels, 3, 1, 1))
        if norm:
            layers.append(nn.GroupNorm(gn_groups(out_channels), out_channels, eps=1e-5))
        layers.append(nn.ReLU(inplace=True))
    return Seq(*layers)


class DenseHead(nn.Module):
    def __init__(self, channels, n_convs, num_anchors, per_anchor, norm):
        super().__init__()
        self.tower = _tower(channels, n_convs, norm)
        self.predict = nn.Conv2d(channels, num_anchors * per_anchor, 3, 1, 1)
        self.per_anchor = per_anchor

    def forward(self, levels):
        """(N, H*W*A summed over the levels, per_anchor), minimask's anchor
        order (location-major, then anchor)."""
        outs = []
        for P in levels:
            o = self.predict(self.tower(P))
            N, AK, H, W = o.shape
            A = AK // self.per_anchor
            outs.append(o.view(N, A, self.per_anchor, H, W).permute(0, 3, 4, 1, 2)
                        .reshape(N, H * W * A, self.per_anchor))
        return torch.cat(outs, dim=1)


class MaskHead(nn.Module):
    def __init__(self, channels, n_convs, num_classes, upsample="deconv", width=None):
        super().__init__()
        width = channels if width is None else width
        self.tower = _tower(channels, n_convs, norm=False, out_channels=width)
        c_up = width if n_convs else channels
        self.upsample = upsample
        if upsample == "deconv":
            self.up = nn.ConvTranspose2d(c_up, width, 2, 2)
        else:
            self.up = nn.Conv2d(c_up, width, 3, 1, 1)
        self.predict = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        h = self.tower(x)
        if self.upsample != "deconv":
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.predict(F.relu(self.up(h), inplace=True))


class RetinaMaskTwin(nn.Module):
    """Built from minimask's config as a dict (``Config.to_dict()``)."""

    def __init__(self, config: dict):
        super().__init__()
        c = config
        self.config = dict(c)
        if c["roi_mode"] != "avg":
            raise ValueError("the twin has torchvision's RoIAlign, which averages: roi_mode must be 'avg'")
        if c.get("backbone", "gn") != "gn":
            raise ValueError(f"the twin has minimask's GroupNorm ResNet only: backbone must be "
                             f"'gn', got {c['backbone']!r}")
        # as minimask: a P2 (from C2) exists only when the mask RoIs may read it
        self.with_p2 = c["roi_min_level"] == 2
        self.first_level = 2 if self.with_p2 else 3     # the level of the pooler's maps[0]
        self.backbone = ResNet(c["stem_channels"], c["stem_kernel"], c["blocks"], c["widths"],
                               c["block"], with_c2=self.with_p2)
        C = c["fpn_channels"]
        self.fpn = FPN(c["widths"] if self.with_p2 else c["widths"][1:], C,
                       c.get("p6_input", "p5"))
        A = len(c["anchor_ratios"]) * len(c["anchor_scales"])    # Config.num_anchors
        K = c["num_classes"]
        self.cls_head = DenseHead(C, c["head_convs"], A, K, c["head_norm"])
        self.box_head = DenseHead(C, c["head_convs"], A, 4, c["head_norm"])
        self.mask_head = MaskHead(C, c["mask_convs"], K, c["mask_upsample"], c["mask_channels"])

    def pool(self, maps, rois, levels):
        """Multi-level RoIAlign: RoI r read from ``maps[levels[r] - first_level]``
        (maps: P2..P7 with P2, else P3..P7), at scale 1 / 2^level."""
        c = self.config
        s = c["mask_size"] // 2
        out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], s, s))
        for level in torch.unique(levels).tolist():
            if not 0 <= level - self.first_level < len(maps):
                raise ValueError(f"an RoI's level {level} is not among the pyramid's levels "
                                 f"{self.first_level}..{self.first_level + len(maps) - 1}")
            idx = torch.nonzero(levels == level).flatten()
            out[idx] = roi_align(maps[level - self.first_level], rois[idx], output_size=s,
                                 spatial_scale=1.0 / 2 ** level,
                                 sampling_ratio=c["roi_sampling_ratio"], aligned=True)
        return out

    def loss(self, images, prep):
        """Eq. (2) for one batch; ``prep`` holds the host-side targets as
        tensors (``as_tensors``). Returns (total, cls, box, mask)."""
        c = self.config
        P, P2 = self.fpn(self.backbone(images))
        logits = self.cls_head(P)
        deltas = self.box_head(P)
        num_pos = prep["num_pos"]
        l_cls = (sigmoid_focal_loss(logits, prep["cls_targets"], alpha=c["focal_alpha"],
                                    gamma=c["focal_gamma"], reduction="none")
                 * prep["weights"]).sum() / num_pos
        positive = prep["positive"]
        l_box = F.smooth_l1_loss(deltas[positive], prep["box_targets"][positive],
                                 reduction="sum", beta=prep["beta"]) / num_pos
        total = l_cls + l_box
        l_mask = torch.zeros((), dtype=images.dtype)
        if prep["rois"].shape[0]:
            maps = P if P2 is None else [P2] + P
            features = self.pool(maps, prep["rois"], prep["roi_levels"])
            mask_logits = self.mask_head(features)
            R = mask_logits.shape[0]
            chosen = mask_logits[torch.arange(R), prep["roi_labels"]]
            l_mask = F.binary_cross_entropy_with_logits(chosen, prep["mask_targets"])
            total = total + c["mask_loss_weight"] * l_mask
        return total, l_cls, l_box, l_mask


PREP_FLOAT = ("cls_targets", "weights", "box_targets", "rois", "mask_targets")


def as_tensors(prep: dict, dtype) -> dict:
    """NumPy arrays from ``bench_torch_step.prepare`` -> tensors (floats in
    ``dtype``; the positive mask as bool, labels and levels as int64)."""
    out = {k: torch.from_numpy(prep[k]).to(dtype) for k in PREP_FLOAT}
    out["positive"] = torch.from_numpy(prep["positive"]).bool()
    out["roi_labels"] = torch.from_numpy(prep["roi_labels"]).long()
    out["roi_levels"] = torch.from_numpy(prep["roi_levels"]).long()
    out["num_pos"] = float(prep["num_pos"])
    out["beta"] = float(prep["beta"])
    return out


def load_minimask_state(twin: nn.Module, state: dict, dtype) -> None:
    """Copy a minimask ``state_dict`` (name -> NumPy array) into the twin;
    strict: every name must exist on both sides with the same shape.
    Names in ``HOST_STATE`` are skipped: they hold host-side training state
    (the running statistics behind the smooth-L1 beta), not the network's;
    the twin gets the beta they give through ``prepare``."""
    twin.load_state_dict({k: torch.from_numpy(v).to(dtype) for k, v in state.items()
                          if k not in HOST_STATE}, strict=True)


HOST_STATE = ("beta_stats",)
