"""The model's configuration, with presets.

Every number of the pipeline lives here, with DESIGN.md's defaults, so a
checkpoint's JSON says exactly which model its weights belong to.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

PRESETS = {
    # For training on a 2-core CPU at 128-256 px: a narrow ResNet with one
    # basic block per stage, 64 FPN channels, two convs per subnet, anchors
    # half RetinaNet's size (objects here are 10-100 px), and a canonical
    # RoI size of 56 = 224 / 4 in eq. (1). What that does depends on the
    # image size (ground-truth RoIs of 200 shapes images, seed 1000): at
    # 256 px they spread over P3 / P4 / P5 as 52 / 41 / 7 %; at the default
    # 128 px, 96 % go to P3 and the rest to P4 (eq. (1) clamps at P3, the
    # finest level the model has). GroupNorm in the dense
    # heads (as RetinaMask-GN and FCOS) lets it train at a high learning
    # rate; the mask head is 32 channels wide and sees at most 8 RoIs per
    # image, because its cost grows with the RoIs (measured in weights/README.md).
    "tiny": dict(stem_channels=16, stem_kernel=3, block="basic", blocks=(1, 1, 1, 1),
                 widths=(16, 32, 64, 128), fpn_channels=64, head_convs=2, mask_convs=2,
                 anchor_sizes=(16, 32, 64, 128, 256), canonical_size=56, head_norm=True,
                 mask_channels=32, max_mask_rois=8),
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
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if len(self.blocks) != 4 or len(self.widths) != 4:
            raise ValueError("blocks and widths must give four stages")
        if len(self.strides) != 5 or len(self.anchor_sizes) != 5:
            raise ValueError("strides and anchor_sizes must give five levels (P3..P7)")
        if self.mask_size % 2:
            raise ValueError(f"mask_size must be even (RoIAlign gives half of it), got {self.mask_size}")
        if self.mask_channels is not None and self.mask_channels < 1:
            raise ValueError(f"mask_channels must be a positive width or None, got {self.mask_channels}")
        if not 3 <= self.roi_min_level <= self.roi_max_level <= 7:
            raise ValueError("mask RoI levels must lie within P3..P7")
        self._validate_pretrained_fields()
        return self

    def _validate_pretrained_fields(self) -> None:
        """Checks of the issue-15 fields (kept apart from the others)."""
        if self.backbone not in ("gn", "frozenbn"):
            raise ValueError(f"backbone must be 'gn' or 'frozenbn', got {self.backbone!r}")
        if isinstance(self.trainable_stages, bool) or not isinstance(self.trainable_stages, int) \
                or not 0 <= self.trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be an integer in 0..5, got "
                             f"{self.trainable_stages!r}")
        if self.backbone == "frozenbn" and self.stem_kernel != 7:
            raise ValueError("the 'frozenbn' backbone has torchvision's 7x7 stem; stem_kernel "
                             f"must be 7, got {self.stem_kernel}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ValueError("pixel_mean and pixel_std must give three values (one per channel)")
        if not all(s > 0 for s in self.pixel_std):
            raise ValueError(f"pixel_std must be positive, got {self.pixel_std}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if len(self.box_weights) != 4 or not all(w > 0 for w in self.box_weights):
            raise ValueError(f"box_weights must be four positive numbers, got {self.box_weights}")
        if self.p6_input not in ("p5", "c5"):
            raise ValueError(f"p6_input must be 'p5' or 'c5', got {self.p6_input!r}")

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_ratios) * len(self.anchor_scales)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**values).validated()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
