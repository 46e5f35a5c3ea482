"""The model's configuration, with presets.

Every number of the pipeline lives here, with DESIGN.md's defaults, so a
checkpoint's JSON says exactly which model its weights belong to.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

PRESETS = {
    # For training on a 2-core CPU at 128-256 px: a narrow ResNet with one
    # basic block per stage, 64 FPN channels, two convs per subnet, anchors
    # half RetinaNet's size (objects here are 10-100 px). GroupNorm in the
    # dense heads (as RetinaMask-GN and FCOS) lets it train at a high
    # learning rate; the mask head is 32 channels wide and sees at most 8
    # RoIs per image, because its cost grows with the RoIs.
    # Issue 11's study (weights/README.md) chose two more things, for the
    # long thin bars:
    # - the mask RoIs are read from P2 (stride 4, built from C2 for the mask
    #   branch only, as RetinaMask's p2p7 variant): eq. (1) with canonical
    #   size 56 at level 2, clamped to P2..P3, sends every box with
    #   sqrt(w h) < 112 px to P2 and larger ones to P3 - at the default
    #   128 px that is all of them; a 5-px bar is then more than one feature
    #   cell wide;
    # - five anchor ratios, 0.2 to 5: 95 % of the bars have an anchor at
    #   IoU >= 0.5 (79 % with 0.5 / 1 / 2), at 15 anchors per position.
    "tiny": dict(stem_channels=16, stem_kernel=3, block="basic", blocks=(1, 1, 1, 1),
                 widths=(16, 32, 64, 128), fpn_channels=64, head_convs=2, mask_convs=2,
                 anchor_sizes=(16, 32, 64, 128, 256), anchor_ratios=(0.2, 0.5, 1.0, 2.0, 5.0),
                 head_norm=True, mask_channels=32, max_mask_rois=8,
                 canonical_size=56, canonical_level=2, roi_min_level=2, roi_max_level=3),
    "resnet18": dict(stem_channels=64, stem_kernel=7, block="basic", blocks=(2, 2, 2, 2),
                     widths=(64, 128, 256, 512), fpn_channels=256, head_convs=4, mask_convs=4),
    "resnet50": dict(stem_channels=64, stem_kernel=7, block="bottleneck", blocks=(3, 4, 6, 3),
                     widths=(256, 512, 1024, 2048), fpn_channels=256, head_convs=4,
                     mask_convs=4),
}

# --- issue 15: torchvision-layout ResNets with frozen batch norm, for
# pretrained (ImageNet or COCO RetinaNet) weights. Images are normalised as
# torchvision's ImageNet weights expect: RGB in [0, 1], minus the mean,
# divided by the standard deviation. trainable_stages=3: stem and layer1
# frozen, as torchvision's default trainable_layers for detection.
_IMAGENET = dict(pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225))
_TV_HEADS = dict(fpn_channels=256, head_convs=4, mask_convs=4, backbone="frozenbn",
                 stem_channels=64, stem_kernel=7, trainable_stages=3, **_IMAGENET)
PRESETS.update({
    "resnet18-frozenbn": dict(block="basic", blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512),
                              **_TV_HEADS),
    "resnet34-frozenbn": dict(block="basic", blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512),
                              **_TV_HEADS),
    "resnet50-frozenbn": dict(block="bottleneck", blocks=(3, 4, 6, 3),
                              widths=(256, 512, 1024, 2048), **_TV_HEADS),
    "resnet101-frozenbn": dict(block="bottleneck", blocks=(3, 4, 23, 3),
                               widths=(256, 512, 1024, 2048), **_TV_HEADS),
})

# What an imported torchvision RetinaNet (retinanet_resnet50_fpn) was
# trained with; minimask.pretrained writes these into the config of the
# checkpoint it makes.
TORCHVISION_RETINANET = dict(
    anchor_sizes=(32, 64, 128, 256, 512), anchor_offset=0.0, anchor_size_floor=True,
    anchor_round=True, anchor_stride_from_image=True, box_weights=(1.0, 1.0, 1.0, 1.0),
    p6_input="p5", head_norm=False, detections_per_image=300)


@dataclass
class Config:
    num_classes: int = 3
    preset_name: str = "custom"      # which preset it started from
    dtype: str = "float32"
    seed: int = 0
    # backbone
    stem_channels: int = 64
    stem_kernel: int = 7
    block: str = "basic"
    blocks: tuple = (2, 2, 2, 2)
    widths: tuple = (64, 128, 256, 512)
    # FPN and dense heads
    fpn_channels: int = 256
    head_convs: int = 4
    head_norm: bool = False
    class_prior: float = 0.01
    # anchors and matching (levels P3..P7, strides 8..128)
    strides: tuple = (8, 16, 32, 64, 128)
    anchor_sizes: tuple = (32, 64, 128, 256, 512)     # 4 x stride
    anchor_ratios: tuple = (0.5, 1.0, 2.0)
    anchor_scales: tuple = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    pos_iou: float = 0.5
    neg_iou: float = 0.4
    low_quality_matches: bool = True
    # a ground truth claims its best anchor(s) only when that IoU is at least
    # this (and above 0); RetinaMask ablates 0.0-0.4. 0.0: any overlap counts
    low_quality_iou: float = 0.0
    # losses
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_beta: float = 1 / 9
    self_adjusting_beta: bool = False
    mask_loss_weight: float = 1.0
    # post-processing
    score_thresh: float = 0.05
    topk_per_level: int = 1000
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    # mask branch
    mask_convs: int = 4
    mask_channels: int | None = None   # width of the mask head; None: fpn_channels
    mask_size: int = 28                # RoIAlign gives mask_size // 2
    mask_upsample: str = "deconv"      # or "upsample": nearest 2x + conv3x3
    roi_sampling_ratio: int = 2
    roi_mode: str = "avg"              # or "max", the write-up's description
    canonical_size: float = 224
    canonical_level: int = 4
    # the mask RoIs' levels; roi_min_level = 2 makes the FPN build a stride-4
    # P2 from C2 for the mask branch only (RetinaMask's p2p7), the dense
    # heads keep P3..P7
    roi_min_level: int = 3
    roi_max_level: int = 5
    mask_roi_iou: float = 0.5          # detections become mask RoIs at this IoU
    mask_rois_from_detections: bool = True
    max_mask_rois: int = 64            # per image, during training
    mask_threshold: float = 0.5

    # --- issue 15: pretrained backbones and imported RetinaNets --------
    # backbone: "gn" (minimask's GroupNorm ResNet) or "frozenbn"
    # (torchvision's layout and names, frozen batch norm, minimask.model.frozen_resnet)
    backbone: str = "gn"
    frozen_bn_eps: float = 1e-5
    trainable_stages: int = 5          # "frozenbn": the last k of stem, layer1..4 train
    # images: (x - mean) / std per channel, after the channel order is set;
    # the identity by default (minimask's own models see [0, 1] RGB)
    pixel_mean: tuple = (0.0, 0.0, 0.0)
    pixel_std: tuple = (1.0, 1.0, 1.0)
    channel_order: str = "RGB"         # "BGR" for weights trained on BGR (caffe-style)
    # anchor conventions; the defaults are minimask's, TORCHVISION_RETINANET torchvision's
    anchor_offset: float = 0.5         # centres at (i + offset) * stride; torchvision 0
    anchor_size_floor: bool = False    # scale * size floored to an integer (torchvision)
    anchor_round: bool = False         # anchor corners rounded to integers (torchvision)
    anchor_stride_from_image: bool = False   # stride = image side // map side (torchvision)
    box_weights: tuple = (1.0, 1.0, 1.0, 1.0)   # box coder weights (wx, wy, ww, wh)
    p6_input: str = "p5"               # P6 from the smoothed P5, or "c5" (torchvision v2)

    @staticmethod
    def preset_names():
        return sorted(PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "preset_name": name, **overrides}).validated()

    def validated(self) -> "Config":
        """Check every field's type and range (``FIELD_RULES``) and the
        fields that must agree with each other; raises ValueError naming
        the field, what it holds and what is expected."""
        for name, rule in FIELD_RULES.items():
            problem = rule(getattr(self, name))
            if problem:
                raise ValueError(f"config field {name!r} must be {problem}, got "
                                 f"{getattr(self, name)!r:.60}")
        if self.neg_iou > self.pos_iou:
            raise ValueError(f"config field 'neg_iou' ({self.neg_iou}) must not exceed "
                             f"'pos_iou' ({self.pos_iou})")
        if self.roi_min_level > self.roi_max_level:
            raise ValueError(f"config fields 'roi_min_level' ({self.roi_min_level}) and "
                             f"'roi_max_level' ({self.roi_max_level}) must give a range of "
                             f"levels within P2..P7")
        if not self.roi_min_level <= self.canonical_level <= self.roi_max_level:
            raise ValueError(f"config field 'canonical_level' ({self.canonical_level}) must "
                             f"lie within roi_min_level..roi_max_level")
        self._validate_pretrained_fields()
        return self

    def _validate_pretrained_fields(self) -> None:
        """What the issue-15 fields need beyond their own rules."""
        if self.backbone == "frozenbn" and self.stem_kernel != 7:
            raise ValueError("config field 'stem_kernel' must be 7 for the 'frozenbn' backbone "
                             f"(torchvision's 7x7 stem), got {self.stem_kernel}")

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_ratios) * len(self.anchor_scales)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of fields, got "
                             f"{type(d).__name__} {d!r:.40}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**values).validated()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ----------------------------------------------------------------------
# What each field may hold. A rule returns None when the value is fine,
# else what was expected ("an integer in [1, 4096]"). A new field gets a
# line here; fields without a line are not checked.
# ----------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo, hi=None, odd=False, even=False):
    def rule(v):
        ok = _is_int(v) and v >= lo and (hi is None or v <= hi) and not (odd and v % 2 == 0) \
            and not (even and v % 2)
        kind = "an odd" if odd else "an even" if even else "an"
        return None if ok else (f"{kind} integer in [{lo}, {hi}]" if hi is not None
                                else f"{kind} integer >= {lo}")
    return rule


def _real(lo, hi, lo_open=False, hi_open=False):
    def rule(v):
        ok = _is_real(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else (f"a number in {'(' if lo_open else '['}{lo:g}, "
                                f"{hi:g}{')' if hi_open else ']'}")
    return rule


def _choice(*options):
    return lambda v: None if isinstance(v, str) and v in options else f"one of {list(options)}"


def _bool(v):
    return None if isinstance(v, bool) else "true or false"


def _str(v):
    return None if isinstance(v, str) else "a string"


def _sequence(length, item_rule, what):
    def rule(v):
        ok = isinstance(v, (tuple, list)) and (length is None and len(v) >= 1 or len(v) == length) \
            and all(item_rule(x) is None for x in v)
        count = f"{length} " if length is not None else "one or more "
        return None if ok else f"{count}{what}"
    return rule


def _optional(rule):
    def optional(v):
        problem = rule(v)
        return None if v is None or problem is None else f"null or {problem}"
    return optional


def _fixed(value, why):
    return lambda v: None if isinstance(v, (tuple, list)) and tuple(v) == value else \
        f"{list(value)} ({why})"


MAX_WIDTH = 4096      # channels; ResNet-50's widest stage has 2048

FIELD_RULES = {
    "num_classes": _int(1, 100_000),
    "preset_name": _str,
    "dtype": _choice("float32", "float64"),
    "seed": _int(0),
    "stem_channels": _int(1, MAX_WIDTH),
    "stem_kernel": _int(1, 15, odd=True),
    "block": _choice("basic", "bottleneck"),
    "blocks": _sequence(4, _int(1, 64), "integers in [1, 64] (blocks per stage)"),
    "widths": _sequence(4, _int(1, MAX_WIDTH), f"integers in [1, {MAX_WIDTH}] (stage widths)"),
    "fpn_channels": _int(1, MAX_WIDTH),
    "head_convs": _int(0, 16),
    "head_norm": _bool,
    "class_prior": _real(0, 1, lo_open=True, hi_open=True),
    "strides": _fixed((8, 16, 32, 64, 128), "the strides of P3..P7, fixed by the backbone"),
    "anchor_sizes": _sequence(5, _real(1e-3, 1e5, lo_open=True),
                              "positive numbers (one anchor size per level P3..P7)"),
    "anchor_ratios": _sequence(None, _real(1e-3, 1e3), "numbers in [0.001, 1000]"),
    "anchor_scales": _sequence(None, _real(1e-3, 1e3), "numbers in [0.001, 1000]"),
    "pos_iou": _real(0, 1, lo_open=True),
    "neg_iou": _real(0, 1),
    "low_quality_matches": _bool,
    "low_quality_iou": _real(0, 1),
    "focal_alpha": _real(0, 1),
    "focal_gamma": _real(0, 10),
    "box_beta": _real(0, 1e3),
    "self_adjusting_beta": _bool,
    "mask_loss_weight": _real(0, 1e3),
    "score_thresh": _real(0, 1, hi_open=True),
    "topk_per_level": _int(1),
    "nms_thresh": _real(0, 1, lo_open=True),
    "detections_per_image": _int(1),
    "mask_convs": _int(0, 16),
    "mask_channels": _optional(_int(1, MAX_WIDTH)),
    "mask_size": _int(2, 256, even=True),
    "mask_upsample": _choice("deconv", "upsample"),
    "roi_sampling_ratio": _int(0, 16),
    "roi_mode": _choice("avg", "max"),
    "canonical_size": _real(0, 1e5, lo_open=True),
    "canonical_level": _int(2, 7),
    "roi_min_level": _int(2, 7),     # 2: P2, built for the mask RoIs only
    "roi_max_level": _int(3, 7),
    "mask_roi_iou": _real(0, 1),
    "mask_rois_from_detections": _bool,
    "max_mask_rois": _int(1),
    "mask_threshold": _real(0, 1, lo_open=True, hi_open=True),
    # issue 15: the torchvision-layout backbone and the conventions of imported weights
    "backbone": _choice("gn", "frozenbn"),
    "frozen_bn_eps": _real(0, 1),
    "trainable_stages": _int(0, 5),
    "pixel_mean": _sequence(3, _real(-1e4, 1e4), "numbers (one mean per channel)"),
    "pixel_std": _sequence(3, _real(0, 1e4, lo_open=True), "positive numbers (one per channel)"),
    "channel_order": _choice("RGB", "BGR"),
    "anchor_offset": _real(0, 1),
    "anchor_size_floor": _bool,
    "anchor_round": _bool,
    "anchor_stride_from_image": _bool,
    "box_weights": _sequence(4, _real(0, 1e4, lo_open=True), "positive numbers (wx, wy, ww, wh)"),
    "p6_input": _choice("p5", "c5"),
}
