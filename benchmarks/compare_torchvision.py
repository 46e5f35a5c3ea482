"""minimask against torchvision, on the same weights, in float64.

Needs torch and torchvision (no download: every model starts from random
weights). Two jobs:

    # compare a full-size ResNet-50, retinanet_resnet50_fpn and _v2 (random
    # weights) with minimask: backbone C3-C5, FPN P3-P7, head outputs,
    # anchors and decoded boxes, relative error < 1e-6
    python benchmarks/compare_torchvision.py

    # write the small golden files tests/golden/ holds (narrow networks in
    # torchvision's exact naming, their inputs and torchvision's outputs),
    # which CI checks without torch
    python benchmarks/compare_torchvision.py --golden tests/golden

Run it with minimask on the path (PYTHONPATH=.) in an environment with torch.
The weights are rounded to float32 (as a real checkpoint holds them) and the
networks run in float64, so the two sides see identical numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

try:
    import torch
    import torchvision
    from torch import nn
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
except ImportError:
    sys.exit("compare_torchvision.py needs torch and torchvision (CI checks the committed "
             "golden files instead: tests/test_pretrained.py)")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minimask.anchors import flatten_head_output  # noqa: E402
from minimask.boxes import decode_boxes  # noqa: E402
from minimask.model import Config, RetinaMask  # noqa: E402
from minimask.model.config import TORCHVISION_RETINANET  # noqa: E402
from minimask.pretrained import checkpoint_kind, import_state  # noqa: E402

RETURN_LAYERS = {"layer2": "0", "layer3": "1", "layer4": "2"}


class NarrowResNet(ResNet):
    """torchvision's ResNet, every width divided by ``div`` - the same
    modules and parameter names, a fraction of the size."""

    def __init__(self, block, layers, div, num_classes=10):
        self._div = div
        super().__init__(block, layers, num_classes=num_classes, norm_layer=FrozenBatchNorm2d)
        stem = 64 // div
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = FrozenBatchNorm2d(stem)
        self.fc = nn.Linear(512 // div * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:
            self.inplanes = 64 // self._div
        return super()._make_layer(block, planes // self._div, blocks, stride, dilate)


def randomise(module: nn.Module, seed: int) -> None:
    """Random weights and batch-norm statistics (the defaults are the
    identity), rounded to float32 values, then the module in float64."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.dtype not in (torch.float32, torch.float64):
                continue
            if name.endswith("running_var"):
                v = 0.5 + torch.rand(t.shape, generator=g)
            elif name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
                v = 0.5 + torch.rand(t.shape, generator=g)
            elif t.ndim == 1:
                v = 0.1 * torch.randn(t.shape, generator=g)
            else:
                fan_in = t[0].numel()
                v = torch.randn(t.shape, generator=g) * (1.0 / fan_in) ** 0.5
            t.copy_(v.float().to(t.dtype))
    module.double().eval()


def narrow_retinanet(div=16, fpn=8, num_classes=3, layers=(1, 2, 1, 1)):
    body = NarrowResNet(Bottleneck, list(layers), div)
    widths = [64 // div * 4 * m for m in (1, 2, 4, 8)]
    backbone = BackboneWithFPN(body, RETURN_LAYERS, widths[1:], fpn,
                               extra_blocks=LastLevelP6P7(fpn, fpn))
    return RetinaNet(backbone, num_classes), widths


def state_of(module) -> dict[str, np.ndarray]:
    """The state dict as float32 NumPy arrays (what a checkpoint holds)."""
    return {k: v.detach().float().numpy().copy() for k, v in module.state_dict().items()
            if v.dtype.is_floating_point}


def minimask_config(widths, block, blocks, fpn, num_classes, retinanet, stem):
    extra = dict(TORCHVISION_RETINANET) if retinanet else {}
    return Config(num_classes=num_classes, dtype="float64", backbone="frozenbn", block=block,
                  blocks=tuple(blocks), widths=tuple(widths), stem_channels=stem, stem_kernel=7,
                  fpn_channels=fpn, head_convs=4, mask_convs=1, **extra).validated()


@torch.no_grad()
def torchvision_outputs(model: RetinaNet, x: np.ndarray) -> dict[str, np.ndarray]:
    """C3-C5, P3-P7, the heads' flattened outputs, anchors and decoded boxes."""
    xt = torch.from_numpy(x)
    C = model.backbone.body(xt)
    P = model.backbone.fpn(C)
    feats = list(P.values())
    head = model.head(feats)
    anchors = model.anchor_generator(ImageList(xt, [tuple(x.shape[2:])] * len(x)), feats)
    out = {f"C{3 + i}": v.numpy() for i, v in enumerate(C.values())}
    out.update({f"P{3 + i}": v.numpy() for i, v in enumerate(feats)})
    out["cls_logits"] = head["cls_logits"].numpy()
    out["bbox_regression"] = head["bbox_regression"].numpy()
    out["anchors"] = anchors[0].numpy()
    out["boxes"] = model.box_coder.decode_single(head["bbox_regression"][0], anchors[0]).numpy()
    return out


def minimask_outputs(model: RetinaMask, x: np.ndarray) -> dict[str, np.ndarray]:
    """The same quantities from minimask (no image normalisation: torchvision's
    transform is outside the modules compared)."""
    C, _ = model.backbone.forward(x)
    P, _ = model.fpn.forward(C)
    cls_maps, _ = model.cls_head.forward(P)
    box_maps, _ = model.box_head.forward(P)
    K = model.config.num_classes
    out = {f"C{3 + i}": c for i, c in enumerate(C)}
    out.update({f"P{3 + i}": p for i, p in enumerate(P)})
    out["cls_logits"] = np.concatenate([flatten_head_output(m, K) for m in cls_maps], 1)
    out["bbox_regression"] = np.concatenate([flatten_head_output(m, 4) for m in box_maps], 1)
    anchors = np.concatenate(model._anchors(P, x.shape[2:]))
    out["anchors"] = anchors
    out["boxes"] = decode_boxes(out["bbox_regression"][0], anchors, model.config.box_weights)
    return out


def compare(ref: dict, got: dict, keys=None, tol=1e-6) -> float:
    worst = 0.0
    for k in keys or ref:
        if k not in got:
            continue
        a, b = np.asarray(ref[k], np.float64), np.asarray(got[k], np.float64)
        if a.shape != b.shape:
            raise AssertionError(f"{k}: shape {b.shape} in minimask, {a.shape} in torchvision")
        err = float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))
        worst = max(worst, err)
        print(f"  {k:16s} {str(a.shape):22s} max |diff| / max |ref| = {err:.2e}"
              f"{'' if err < tol else '   <-- FAIL'}")
    return worst


def write_golden(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)

    # 1. a narrow retinanet in torchvision's detection naming
    model, widths = narrow_retinanet()
    randomise(model, seed=1)
    # inputs float32-valued (stored as float32, run in float64), like the weights;
    # odd map sizes: 5x7, 3x4, 2x2, 1x1, 1x1
    x = rng.random((1, 3, 40, 56)).astype(np.float32).astype(np.float64)
    ref = torchvision_outputs(model, x)
    save_file(state_of(model), os.path.join(out_dir, "retinanet_narrow.safetensors"))
    np.savez(os.path.join(out_dir, "retinanet_narrow_outputs.npz"), x=x.astype(np.float32),
             **ref)

    # 2. a narrow basic-block classification ResNet (torchvision/timm naming, with fc)
    body = NarrowResNet(BasicBlock, [1, 1, 1, 1], div=16)
    randomise(body, seed=2)
    x2 = rng.random((1, 3, 48, 40)).astype(np.float32).astype(np.float64)
    with torch.no_grad():
        from torchvision.models._utils import IntermediateLayerGetter
        C = IntermediateLayerGetter(body, RETURN_LAYERS)(torch.from_numpy(x2))
    save_file(state_of(body), os.path.join(out_dir, "resnet_basic_narrow.safetensors"))
    np.savez(os.path.join(out_dir, "resnet_basic_narrow_outputs.npz"), x=x2.astype(np.float32),
             **{f"C{3 + i}": v.numpy() for i, v in enumerate(C.values())})

    info = {"retinanet_narrow": dict(block="bottleneck", blocks=[1, 2, 1, 1], widths=widths,
                                     stem_channels=4, fpn_channels=8, num_classes=3),
            "resnet_basic_narrow": dict(block="basic", blocks=[1, 1, 1, 1],
                                        widths=[4, 8, 16, 32], stem_channels=4),
            "made_with": f"torch {torch.__version__}, torchvision {torchvision.__version__}"}
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump(info, f, indent=2)
    check_golden(out_dir)
    for name in sorted(os.listdir(out_dir)):
        print(f"  {name}: {os.path.getsize(os.path.join(out_dir, name)) / 1024:.0f} KB")


def check_golden(out_dir: str) -> None:
    """What CI does: import the golden checkpoints and compare."""
    from minimask.pretrained import read_checkpoint
    info = json.load(open(os.path.join(out_dir, "golden.json")))
    g = info["retinanet_narrow"]
    config = minimask_config(g["widths"], g["block"], g["blocks"], g["fpn_channels"],
                             g["num_classes"], True, g["stem_channels"])
    model = RetinaMask(config)
    tensors = read_checkpoint(os.path.join(out_dir, "retinanet_narrow.safetensors"))
    import_state(model, tensors, checkpoint_kind(tensors))
    ref = dict(np.load(os.path.join(out_dir, "retinanet_narrow_outputs.npz")))
    print("golden retinanet_narrow:")
    assert compare(ref, minimask_outputs(model, ref["x"].astype(np.float64))) < 1e-6


def compare_full(size=(128, 160)) -> None:
    from minimask.pretrained import import_weights
    from safetensors.numpy import save_file
    import tempfile
    rng = np.random.default_rng(0)
    x = rng.random((1, 3) + size)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"ResNet-50 (torchvision.models.resnet50, random weights), image {size}:")
        r50 = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        randomise(r50, seed=3)
        path = os.path.join(tmp, "resnet50.safetensors")
        save_file(state_of(r50), path)
        t = time.time()
        model, report = import_weights(path, "resnet50-frozenbn", 3, dtype="float64")
        print(f"  imported {len(report['imported'])} tensors ({time.time() - t:.1f} s), "
              f"skipped {report['skipped']}")
        from torchvision.models._utils import IntermediateLayerGetter
        with torch.no_grad():
            C = IntermediateLayerGetter(r50, RETURN_LAYERS)(torch.from_numpy(x))
        ref = {f"C{3 + i}": v.numpy() for i, v in enumerate(C.values())}
        got, _ = model.backbone.forward(x)
        worst = compare(ref, {f"C{3 + i}": c for i, c in enumerate(got)})

        print(f"retinanet_resnet50_fpn (random weights, 91 classes), image {size}:")
        rn = torchvision.models.detection.retinanet_resnet50_fpn(weights=None,
                                                                 weights_backbone=None)
        randomise(rn, seed=4)
        path = os.path.join(tmp, "retinanet.safetensors")
        save_file(state_of(rn), path)
        model, report = import_weights(path, "resnet50-frozenbn", 91, dtype="float64")
        print(f"  imported {len(report['imported'])} tensors; new: "
              f"{len(report['initialised'])} (the mask head)")
        ref = torchvision_outputs(rn, x)
        worst = max(worst, compare(ref, minimask_outputs(model, x)))

        print(f"retinanet_resnet50_fpn_v2 (random weights, 91 classes), image {size}:")
        rn2 = torchvision.models.detection.retinanet_resnet50_fpn_v2(weights=None,
                                                                     weights_backbone=None)
        randomise(rn2, seed=5)
        path = os.path.join(tmp, "retinanet_v2.safetensors")
        save_file(state_of(rn2), path)
        model, report = import_weights(path, "resnet50-frozenbn", 91, dtype="float64")
        print(f"  imported {len(report['imported'])} tensors ({report['kind']}); zero biases: "
              f"{len(report['zero_bias'])}; new: {len(report['initialised'])} (the mask head)")
        ref = torchvision_outputs(rn2, x)
        worst = max(worst, compare(ref, minimask_outputs(model, x)))
    print(f"worst relative error {worst:.2e}: {'PASS' if worst < 1e-6 else 'FAIL'}")
    if worst >= 1e-6:
        sys.exit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--golden", metavar="DIR", help="write the golden files to DIR")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.golden:
        write_golden(args.golden)
    else:
        compare_full(tuple(args.size))
