"""Pretrained weights: a torchvision or timm checkpoint -> a minimask checkpoint.

    python -m minimask import-weights resnet50.safetensors --preset resnet50-frozenbn \\
        --num-classes 3 --out runs/r50.npz

What it reads
    * an ImageNet ResNet-18/34/50/101 in torchvision's naming
      (``conv1.weight``, ``bn1.running_var``, ``layer2.0.downsample.1.weight``,
      ``fc.*``) or timm's (the same names for ``resnet18/34/50/101``; timm's
      deep-stem variants ``resnet*d`` are refused by name);
    * a torchvision ``retinanet_resnet50_fpn`` (``backbone.body.*``,
      ``backbone.fpn.*``, ``head.*``): backbone, FPN and both dense heads.
      The FPN's 1x1 ``inner_blocks`` become ``lateral3..5``, its 3x3
      ``layer_blocks`` ``smooth3..5``, ``extra_blocks.p6/p7`` ``p6/p7``; the
      heads' 4 convs and ``cls_logits``/``bbox_reg`` the towers and
      ``predict`` convs. Both lay out their outputs as ``(N, A*K, H, W)``
      with channel ``a*K + k`` - the order ``flatten_head_output`` reads -
      so the tensors carry over unchanged. The config written with it takes
      torchvision's anchor and box-coder conventions
      (``minimask.model.config.TORCHVISION_RETINANET``);
    * a torchvision ``retinanet_resnet50_fpn_v2``: the same, with GroupNorm
      after each head conv (``head_norm``; those convs have no bias in the
      file, and a conv followed by a norm is exact with a zero bias) and P6
      computed from C5 (``p6_input="c5"``).

    from ``.safetensors`` with the ``safetensors`` package (NumPy only, no
    torch), from ``.pth``/``.pt``/``.bin`` with ``torch.load(weights_only=True)``
    where torch is installed, and from ``.npz``.

What it checks
    Every tensor of the file, in the file's order, must have a place in the
    preset's model with the same shape; the first that has not is named in
    the error. Every tensor the preset's backbone (and, for a RetinaNet,
    FPN and heads) needs must be in the file. A class head for another
    number of classes is left at its usual initialisation and the report
    says so (fine-tuning on a new dataset); v2's missing head-conv biases
    are set to zero.

What it writes
    A complete checkpoint of the preset - imported tensors set, the rest
    (FPN, heads, mask head for an ImageNet backbone; the mask head for a
    RetinaNet) initialised as ``RetinaMask(config)`` does - with the config
    in its metadata, so ``RetinaMask(config).load(W)``, ``train --weights W``
    and ``predict/evaluate/crop --weights W`` accept it.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from minimask.model.config import TORCHVISION_RETINANET, Config
from minimask.nn import load_npz

IGNORED_SUFFIXES = ("num_batches_tracked",)
IMPORT_IMAGE_SIZE = 512


# --------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------


def read_checkpoint(path) -> dict[str, np.ndarray]:
    """The tensors of a checkpoint file as NumPy arrays, by name, in the
    file's order. Raises ValueError naming the file for anything unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:  # pragma: no cover - safetensors is a requirement
            raise ValueError("reading .safetensors needs the 'safetensors' package "
                             "(pip install safetensors)") from None
        try:
            tensors = load_file(path)
        except Exception as e:  # SafetensorError, a bad header, a short file
            raise ValueError(f"checkpoint file {path!r} is not a readable safetensors file "
                             f"(truncated or corrupt: {' '.join(str(e).split())})") from None
    elif ext in (".pth", ".pt", ".bin", ".ckpt"):
        tensors = _read_torch(path)
    elif ext == ".npz":
        tensors, _ = load_npz(path)
    else:
        raise ValueError(f"checkpoint file {path!r}: unknown extension {ext!r}; expected "
                         f".safetensors, .pth/.pt/.bin (with torch installed) or .npz")
    if not tensors:
        raise ValueError(f"checkpoint file {path!r} holds no tensors")
    out = {}
    for name, value in tensors.items():
        value = np.asarray(value)
        if value.dtype.kind != "f":
            if any(name.endswith(s) for s in IGNORED_SUFFIXES):
                continue
            raise ValueError(f"checkpoint tensor {name!r} has dtype {value.dtype}; expected "
                             f"floating-point weights")
        out[name] = value
    return out


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading {path!r} (a PyTorch pickle) needs torch, which is not "
                         f"installed here. Install torch, or convert the file once where "
                         f"torch is installed to .safetensors (safetensors.torch.save_file) "
                         f"and import that - minimask reads safetensors without torch") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint file {path!r} could not be read by torch.load "
                         f"(truncated, corrupt or not a state dict: "
                         f"{' '.join(str(e).split())[:200]})") from None
    for key in ("state_dict", "model", "model_state_dict"):   # training checkpoints nest it
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint file {path!r} does not hold a state dict (a name -> "
                         f"tensor mapping), but a {type(obj).__name__}")
    return {k: v.detach().cpu().double().numpy().astype(_np_dtype(v)) for k, v in obj.items()
            if hasattr(v, "detach")}


def _np_dtype(t):
    name = str(t.dtype)
    if "64" in name and "float" in name:
        return np.float64
    if "float" in name or "bfloat" in name:
        return np.float32
    return np.int64


# --------------------------------------------------------------------------
# naming: torchvision / timm -> minimask
# --------------------------------------------------------------------------


def checkpoint_kind(names) -> str:
    """``"retinanet"`` for a torchvision ``retinanet_resnet50_fpn``,
    ``"retinanet_v2"`` for ``retinanet_resnet50_fpn_v2`` (GroupNorm in the
    heads, P6 from C5), ``"resnet"`` for a classification ResNet
    (torchvision or timm)."""
    names = [_strip_wrapper(n) for n in names]
    if any(n.startswith("head.classification_head.") for n in names):
        if any(_HEAD_NORM.match(n) for n in names):
            return "retinanet_v2"
        return "retinanet"
    return "resnet"


def _strip_wrapper(name: str) -> str:
    # DataParallel / DistributedDataParallel save "module.<name>"
    return name[len("module."):] if name.startswith("module.") else name


_HEAD_CONV = re.compile(r"^head\.(classification|regression)_head\.conv\.(\d+)\.(?:(0)\.)?(weight|bias)$")
_HEAD_NORM = re.compile(r"^head\.(classification|regression)_head\.conv\.(\d+)\.1\.(weight|bias)$")
_FPN_BLOCK = re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d)\.(?:0\.)?(weight|bias)$")


def minimask_name(name: str, kind: str) -> str | None:
    """The minimask parameter a checkpoint tensor goes to; ``None`` for
    tensors that are deliberately left out (the ImageNet classifier ``fc``).
    Unknown names come back unchanged, prefixed, so the shape/name check
    reports them."""
    name = _strip_wrapper(name)
    if kind == "resnet":
        if name.startswith(("fc.", "head.fc.")):
            return None
        return "backbone." + name
    if name.startswith("backbone.body."):
        return "backbone." + name[len("backbone.body."):]
    m = _FPN_BLOCK.match(name)
    if m:
        which, level, what = m.groups()
        return f"fpn.{'lateral' if which == 'inner' else 'smooth'}{int(level) + 3}.{what}"
    for p in ("p6", "p7"):
        if name.startswith(f"backbone.fpn.extra_blocks.{p}."):
            return f"fpn.{p}." + name.rsplit(".", 1)[1]
    m = _HEAD_CONV.match(name)
    if m:
        head, index, new_layout, what = m.groups()
        # new torchvision: conv.k.0 (Conv2dNormActivation); old: conv.(2k) in a conv/ReLU Sequential
        k = int(index) if new_layout is not None else int(index) // 2
        prefix = "cls_head" if head == "classification" else "box_head"
        # minimask's tower: [conv, ReLU] per step, or [conv, GroupNorm, ReLU] with head_norm (v2)
        step = 3 if kind == "retinanet_v2" else 2
        return f"{prefix}.tower.layers.{step * k}.{what}"
    m = _HEAD_NORM.match(name)
    if m and kind == "retinanet_v2":
        head, index, what = m.groups()
        prefix = "cls_head" if head == "classification" else "box_head"
        return f"{prefix}.tower.layers.{3 * int(index) + 1}.{what}"
    if name.startswith("head.classification_head.cls_logits."):
        return "cls_head.predict." + name.rsplit(".", 1)[1]
    if name.startswith("head.regression_head.bbox_reg."):
        return "box_head.predict." + name.rsplit(".", 1)[1]
    return "?" + name


# --------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------


def config_for(preset: str, num_classes: int, kind: str, seed: int = 0) -> Config:
    """The config of the checkpoint an import writes: the preset, plus
    torchvision's conventions when the file is a RetinaNet."""
    if not preset.endswith("-frozenbn"):
        frozen = [n for n in Config.preset_names() if n.endswith("-frozenbn")]
        raise ValueError(f"preset {preset!r} has minimask's GroupNorm backbone, which no "
                         f"pretrained ResNet fits; choose one of {frozen}")
    extra = dict(TORCHVISION_RETINANET) if kind.startswith("retinanet") else {}
    if kind == "retinanet_v2":      # GroupNorm in the heads, P6 from C5
        extra.update(head_norm=True, p6_input="c5")
    return Config.preset(preset, num_classes=num_classes, seed=seed, **extra)


def import_state(model, tensors: dict, kind: str, source: str = "the checkpoint") -> dict:
    """Copy ``tensors`` (checkpoint names) into ``model``; returns a report
    ``{"imported": [...], "skipped": [...], "initialised": [...]}``.

    Raises ValueError for the first tensor (in file order) with no place in
    the model or the wrong shape, and for tensors the model needs that the
    file lacks."""
    own = dict(model.named_parameters())
    A, K = model.config.num_anchors, model.config.num_classes
    to_copy, skipped, new_class_head = {}, [], False
    what = f"preset {model.config.preset_name!r}"
    for name, value in tensors.items():
        if any(name.endswith(s) for s in IGNORED_SUFFIXES):
            continue
        target = minimask_name(name, kind)
        if target is None:
            skipped.append(name)
            continue
        if target not in own:
            hint = ""
            if re.match(r"^(module\.)?conv1\.\d", name):
                hint = (" (a deep-stem ResNet such as timm's resnet50d; only the plain 7x7 "
                        "stem is supported)")
            elif kind == "resnet" and name.startswith(("backbone.", "head.")):
                hint = " (a detection checkpoint other than torchvision's RetinaNet?)"
            raise ValueError(f"{source}: tensor {name!r} {tuple(value.shape)} has no place in "
                             f"{what}{hint}; is it the right preset?")
        if value.shape != own[target].value.shape:
            if target.startswith("cls_head.predict.") and value.shape[0] % A == 0:
                # a class head for another number of classes: keep ours, say so
                skipped.append(f"{name} ({value.shape[0] // A} classes; this model has {K}: "
                               f"left at its initial value)")
                new_class_head = True
                continue
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}, "
                             f"{what} expects {tuple(own[target].value.shape)} for {target!r}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{source}: tensor {name!r} contains NaN or infinity")
        to_copy[target] = value
    need = [n for n in own if n.startswith("backbone.")]
    zero_bias = []
    if kind.startswith("retinanet"):
        # a P2 for the masks (roi_min_level=2) is minimask's own: it starts
        # from its initial values, as the mask head does
        need += [n for n in own if n.startswith(("fpn.", "cls_head.", "box_head."))
                 and not n.startswith(("fpn.lateral2.", "fpn.smooth2."))
                 and not (new_class_head and n.startswith("cls_head.predict."))]
    if kind == "retinanet_v2":
        # v2's head convs feed a GroupNorm and carry no bias: ours is set to zero, exactly
        zero_bias = [n for n in need if re.match(r"^(cls|box)_head\.tower\.layers\.\d+\.bias$", n)
                     and n not in to_copy and n.replace(".bias", ".weight") in to_copy
                     and own[n.replace(".bias", ".weight")].value.ndim == 4]
        need = [n for n in need if n not in zero_bias]
    missing = [n for n in need if n not in to_copy]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensor(s) that {what} needs, the first "
                         f"{missing[0]!r}; is it a {_describe(model.config)}?")
    for target, value in to_copy.items():       # only once everything has been checked
        own[target].value[...] = value.astype(own[target].value.dtype)
    for target in zero_bias:
        own[target].value[...] = 0
    return {"imported": list(to_copy), "skipped": skipped, "zero_bias": zero_bias,
            "initialised": [n for n in own if n not in to_copy and n not in zero_bias]}


def _describe(c: Config) -> str:
    depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34 if c.block == "basic" else 50,
             (3, 4, 23, 3): 101}.get(tuple(c.blocks), "?")
    return f"ResNet-{depth} checkpoint"


def import_weights(path, preset: str, num_classes: int, out=None, seed: int = 0,
                   image_size: int = IMPORT_IMAGE_SIZE, dtype: str = "float32"):
    """Read ``path``, build ``preset`` for ``num_classes``, copy the
    checkpoint in and (with ``out``) write the minimask checkpoint.
    Returns ``(model, report)``."""
    from minimask.model import RetinaMask
    from minimask.nn import save_npz

    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    tensors = read_checkpoint(path)
    kind = checkpoint_kind(tensors)
    config = config_for(preset, int(num_classes), kind, seed)
    config = dataclasses.replace(config, dtype=dtype).validated()
    model = RetinaMask(config)
    report = import_state(model, tensors, kind, source=f"checkpoint {os.fspath(path)!r}")
    report["kind"] = kind
    if out is not None:
        meta = {"config": config.to_dict(), "image_size": int(image_size), "class_names": [],
                "imported_from": os.path.basename(os.fspath(path)), "imported_kind": kind,
                "imported_tensors": len(report["imported"])}
        save_npz(out, model.state_dict(), meta)
    return model, report


def set_trainable_stages(model, k: int) -> None:
    """Freeze all but the last ``k`` backbone stages of a ``frozenbn``
    model (stem, layer1..4; torchvision's ``trainable_layers``), and record
    it in the config so a checkpoint and a resumed run keep it."""
    if model.config.backbone != "frozenbn":
        raise ValueError("trainable stages apply to the pretrained ('frozenbn') backbones; "
                         f"this model's backbone is {model.config.backbone!r}")
    model.backbone.set_trainable_stages(k)
    model.config = dataclasses.replace(model.config, trainable_stages=int(k))
