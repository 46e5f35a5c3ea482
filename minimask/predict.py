"""Inference on image files: load, predict, map back, draw, cut out.

The model sees square ``S x S`` images (``S`` is the training image size,
stored in the checkpoint's metadata as ``"image_size"``). A photo of any
size and mode is brought to that form and the answers are brought back:

1. ``load_image``: read with Pillow, convert to RGB (greyscale, RGBA and
   palette images included), resize so the longer side is ``S`` (keeping
   the aspect ratio), and pad the bottom and right with zeros to ``S x S``.
2. ``predict_steps``: the model's own post-processing (score threshold,
   top-k per level, decoding, class-wise NMS, top-``n``), then the mask
   subnet on the kept boxes only. It returns every intermediate of the
   write-up's "Mask prediction" step: the ``K`` masks of each box, the one
   of the predicted class, and that mask pasted into the box.
3. ``predict_image``: boxes divided by the resize factors give boxes in the
   original pixels; each ``m x m`` mask of probabilities is pasted
   (bilinearly, ``minimask.masks.paste_mask``) into its box *at the original
   resolution* and thresholded at 0.5, so a large photo gets smooth mask
   edges rather than a nearest-neighbour blow-up of an ``S x S`` mask.

Then ``detections_to_json`` (boxes, class names, scores, masks as COCO RLE),
``save_overlay`` (a PNG with masks, boxes, classes and scores) and
``crop_instances`` (one RGBA cut-out per instance).

Coordinates follow the package: boxes ``(x1, y1, x2, y2)`` in continuous
pixels, pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``; a box crop holds
the pixels whose centre lies inside the box (``minimask.masks.box_mask``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from minimask.data.coco import image_to_rgb, mask_to_rle  # mask_to_rle: (H, W) bool -> {"size", "counts": str}
from minimask.masks import background_fraction, paste_masks

DEFAULT_IMAGE_SIZE = 128


def model_image_size(meta: dict | None) -> int:
    """The side ``S`` of the square images a checkpoint's model was trained
    on: ``meta["image_size"]`` when the checkpoint stores it, else 128."""
    size = (meta or {}).get("image_size", DEFAULT_IMAGE_SIZE)
    try:
        size = int(size)
    except (TypeError, ValueError):
        raise ValueError(f"checkpoint metadata has an invalid image_size {size!r}") from None
    if size < 8:
        raise ValueError(f"checkpoint metadata has an invalid image_size {size}")
    return size


def class_names_of(meta: dict | None, num_classes: int) -> list[str]:
    """Class names stored with the weights, or ``"class 0"``, ``"class 1"``, ...
    when the checkpoint has none (or the wrong number)."""
    names = list((meta or {}).get("class_names") or [])
    if len(names) != num_classes:
        names = [f"class {k}" for k in range(num_classes)]
    return [str(n) for n in names]


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` of an ``height x width`` image whose longer side is scaled
    to ``size`` (each side at least one pixel)."""
    scale = size / max(height, width)
    return (min(size, max(1, round(height * scale))), min(size, max(1, round(width * scale))))


def read_rgb(path) -> np.ndarray:
    """An image file as an ``(H, W, 3)`` uint8 RGB array, whatever its mode.

    The conversion is the one ``CocoDataset`` applies to training images,
    so a model sees the same pixels at training and at prediction time:
    greyscale is repeated over the three channels, 16-bit greyscale is
    scaled to 8 bits, palette images are looked up, and an alpha channel is
    dropped (the colour under a transparent pixel is kept as it is).
    Raises ValueError naming the file when it is missing or not an image
    Pillow can read.
    """
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"image {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"image {path!r} is a directory, not an image file")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = image_to_rgb(img, f"image {path!r}")
    except UnidentifiedImageError:
        raise ValueError(f"image {path!r} is not an image file Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path!r} is too large to read safely ({e})") from None
    except (OSError, SyntaxError) as e:  # truncated or damaged files
        raise ValueError(f"image {path!r} could not be read ({e})") from None
    except ValueError as e:
        if str(e).startswith(f"image {path!r}"):
            raise
        raise ValueError(f"image {path!r} could not be read ({e})") from None
    return rgb


def prepare_image(rgb: np.ndarray, size: int):
    """``(H, W, 3)`` uint8 -> ``(model_input (3, S, S) float32 in [0, 1],
    scale)``: resized so the longer side is ``S``, padded with zeros at the
    bottom and right. ``scale = S / max(H, W)``."""
    from PIL import Image

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be an (H, W, 3) uint8 array, got shape {rgb.shape} "
                         f"dtype {rgb.dtype}")
    H, W = rgb.shape[:2]
    h, w = resized_shape(H, W, size)
    resized = rgb if (h, w) == (H, W) else np.asarray(
        Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
    model_input = np.zeros((3, size, size), dtype=np.float32)
    model_input[:, :h, :w] = resized.transpose(2, 0, 1).astype(np.float32) / 255.0
    return model_input, size / max(H, W)


def load_image(path, size: int = DEFAULT_IMAGE_SIZE):
    """Read an image file and prepare it for a model trained on ``S x S``
    images (``S = size``).

    Returns
    -------
    model_input : (3, S, S) float32 in [0, 1]; the image resized so that its
        longer side is ``S`` sits in the top-left corner, zeros elsewhere.
    original : (H, W, 3) uint8, the file's pixels in RGB.
    scale : float, ``S / max(H, W)``: model pixels per original pixel.
    """
    original = read_rgb(path)
    model_input, scale = prepare_image(original, size)
    return model_input, original, scale


def predict_steps(model, images, score_thresh: float | None = None,
                  max_detections: int | None = None) -> list[dict]:
    """The model's inference, keeping the intermediates of mask prediction.

    For each image, with ``D`` detections, ``K`` classes and ``m x m``
    masks:

    - ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,): the top-``n``
      detections after NMS, in the pixels of ``images``;
    - ``class_masks`` (D, K, m, m): sigmoid of the mask subnet's output, one
      mask per class, for the kept boxes only;
    - ``mask_probs`` (D, m, m): the mask of the predicted class,
      ``class_masks[d, labels[d]]``;
    - ``masks`` (D, H, W) bool: ``mask_probs`` resized into each box and
      thresholded - what ``model.predict`` returns.

    ``score_thresh`` and ``max_detections`` (the ``n`` of top-``n``) replace
    the model's settings for this call.
    """
    c = model.config
    saved = c.score_thresh, c.detections_per_image
    if score_thresh is not None:
        c.score_thresh = float(score_thresh)
    if max_detections is not None:
        c.detections_per_image = int(max_detections)
    try:
        results = model.predict(images, return_probabilities=True)
    finally:
        c.score_thresh, c.detections_per_image = saved
    return [{"boxes": np.asarray(r["boxes"], np.float64).reshape(-1, 4),
             "scores": np.asarray(r["scores"], np.float64),
             "labels": np.asarray(r["labels"], np.int64),
             "class_masks": r["class_masks"], "mask_probs": r["mask_probs"],
             "masks": r["masks"]} for r in results]


def predict_array(model, rgb: np.ndarray, size: int, score_thresh: float | None = None,
                  max_detections: int | None = None) -> dict:
    """Detections for one ``(H, W, 3)`` uint8 RGB image, in its own pixels.

    Returns a dict with
    - ``boxes`` (D, 4) float64, ``(x1, y1, x2, y2)`` in original pixels,
      clipped to the image;
    - ``scores`` (D,), ``labels`` (D,) int64 class ids;
    - ``masks`` (D, H, W) bool at the original resolution;
    - ``mask_probs`` (D, m, m), the predicted class's mask;
    - ``image`` the (H, W, 3) uint8 input, ``scale`` = ``S / max(H, W)``.

    A model box ``b`` on the ``S x S`` input maps back as
    ``x / s_x, y / s_y`` with ``s_x = w / W``, ``s_y = h / H`` (``h, w`` the
    resized size; equal to ``scale`` up to rounding). The mask is pasted
    into the unclipped box, so the part that falls outside the image is
    simply dropped, as it would be in the padded canvas.
    """
    rgb = np.asarray(rgb)
    model_input, scale = prepare_image(rgb, size)
    H, W = rgb.shape[:2]
    h, w = resized_shape(H, W, size)
    step = predict_steps(model, model_input[None], score_thresh, max_detections)[0]
    factors = np.array([w / W, h / H, w / W, h / H])
    boxes = step["boxes"] / factors
    masks = paste_masks(step["mask_probs"], boxes, H, W, model.config.mask_threshold)
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, W)
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, H)
    return {"boxes": clipped, "scores": step["scores"], "labels": step["labels"],
            "masks": masks, "mask_probs": step["mask_probs"], "image": rgb, "scale": scale}


def predict_image(model, path, size: int = DEFAULT_IMAGE_SIZE,
                  score_thresh: float | None = None, max_detections: int | None = None) -> dict:
    """``predict_array`` on an image file (see ``load_image`` for the
    preparation); the result also names the ``file``."""
    result = predict_array(model, read_rgb(path), size, score_thresh, max_detections)
    result["file"] = os.fspath(path)
    return result


def rle_to_mask(rle: dict) -> np.ndarray:
    """A mask back from ``mask_to_rle``'s JSON-ready RLE: (H, W) bool."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}
                             ).astype(bool)


def detections_to_json(detections: dict, class_names) -> dict:
    """One image's detections as plain JSON: the file, its size, and per
    instance the class name (and id), score, box in original pixels and the
    mask as RLE."""
    H, W = detections["image"].shape[:2]
    instances = []
    for box, score, label, mask in zip(detections["boxes"], detections["scores"],
                                       detections["labels"], detections["masks"]):
        instances.append({"label": str(class_names[int(label)]), "label_id": int(label),
                          "score": round(float(score), 6),
                          "box": [round(float(v), 3) for v in box],
                          "mask": mask_to_rle(mask)})
    return {"file": detections.get("file"), "width": int(W), "height": int(H),
            "instances": instances}


MAX_OVERLAY_SIDE = 1024


def save_overlay(image, detections: dict, path, class_names=None, title=None) -> Path:
    """Draw ``image`` (H, W, 3) uint8 with its detections (tinted masks and
    their outlines, boxes, class names and scores) and save it as a PNG at
    about the image's own resolution (at least 4 inches wide), at most
    ``MAX_OVERLAY_SIDE`` pixels on the longer side: a larger photo is drawn
    scaled down (masks nearest-neighbour), since drawing a 5000 x 5000
    overlay at full size takes several gigabytes in matplotlib."""
    # a bare Figure (no pyplot): nothing to close, no GUI backend chosen,
    # and a notebook's inline backend is left alone
    from matplotlib.figure import Figure

    from minimask.viz.detection import overlay_masks

    image = np.asarray(image)
    if max(image.shape[:2]) > MAX_OVERLAY_SIDE:
        image, detections = _scaled_down(image, detections, MAX_OVERLAY_SIDE)
    H, W = image.shape[:2]
    dpi = 100
    width_in = max(4.0, W / dpi)
    fig = Figure(figsize=(width_in, width_in * H / W + (0.3 if title else 0)), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, 1 if not title else 1 - 0.3 / (width_in * H / W + 0.3)])
    overlay_masks(image.astype(np.float32) / np.float32(255.0), detections["masks"],
                  boxes=detections["boxes"], labels=detections["labels"],
                  scores=detections["scores"], class_names=class_names, ax=ax, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _scaled_down(image, detections: dict, side: int):
    """The image resized so its longer side is ``side`` and its detections
    with it (boxes scaled, masks sampled nearest-neighbour at pixel centres)."""
    from PIL import Image

    H, W = image.shape[:2]
    h, w = resized_shape(H, W, side)
    small = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(int), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(int), W - 1)
    masks = np.asarray(detections["masks"])
    masks = masks[:, rows][:, :, cols] if len(masks) else np.zeros((0, h, w), bool)
    boxes = np.asarray(detections["boxes"], np.float64).reshape(-1, 4) * [w / W, h / H,
                                                                         w / W, h / H]
    return small, {**detections, "masks": masks, "boxes": boxes}


def crop_window(box, height: int, width: int):
    """Rows ``i0:i1`` and columns ``j0:j1`` of the pixels whose centre lies in
    ``box`` (the box crop of ``minimask.masks.box_mask``), clipped to the
    image; an empty window has ``i1 <= i0`` or ``j1 <= j0``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    j0, j1 = max(int(np.ceil(x1 - 0.5)), 0), min(int(np.floor(x2 - 0.5)) + 1, width)
    i0, i1 = max(int(np.ceil(y1 - 0.5)), 0), min(int(np.floor(y2 - 0.5)) + 1, height)
    return i0, i1, j0, j1


def crop_instances(image, detections: dict, out_dir, stem: str, class_names=None) -> list[dict]:
    """Save every detected instance as an RGBA cut-out and measure what a
    box crop lets in that a mask crop does not.

    For instance ``d`` with box crop ``B`` (the pixels whose centre lies in
    its box) and predicted mask ``M`` (inside ``B`` by construction), the
    cut-out is the box-sized window of the original image with
    alpha = 255 on ``M`` and 0 elsewhere, saved as
    ``out_dir/{stem}_{d:02d}_{class}.png``.

    Returns one record per instance:
    - ``file``, ``class``, ``label``, ``score``, ``box`` (original pixels);
    - ``box_px = |B|``, ``mask_px = |M|``;
    - ``box_background = |B \\ M| / |B| = 1 - |M| / |B|``: the share of the
      box crop that is not the object (``masks.background_fraction``);
    - ``mask_background = 0``: a mask crop keeps only ``M``, so none of its
      pixels is background *by the predicted mask*;
    - ``box_share``, ``mask_share``: the fraction of the image's pixels each
      crop keeps, ``|B| / (H W)`` and ``|M| / (H W)``.
    An instance whose box holds no pixel centre gets ``file = None`` and no
    cut-out.
    """
    from PIL import Image

    image = np.asarray(image)
    H, W = image.shape[:2]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = class_names if class_names is not None else [str(k) for k in
                                                        range(int(np.max(detections["labels"], initial=0)) + 1)]
    records = []
    for d, (box, score, label, mask) in enumerate(zip(detections["boxes"], detections["scores"],
                                                      detections["labels"], detections["masks"])):
        name = str(names[int(label)])
        i0, i1, j0, j1 = crop_window(box, H, W)
        record = {"file": None, "class": name, "label": int(label), "score": float(score),
                  "box": [float(v) for v in box]}
        if i1 <= i0 or j1 <= j0:
            records.append({**record, "box_px": 0, "mask_px": 0, "box_background": None,
                            "mask_background": None, "box_share": 0.0, "mask_share": 0.0})
            continue
        alpha = mask[i0:i1, j0:j1]
        rgba = np.dstack([image[i0:i1, j0:j1], alpha.astype(np.uint8) * 255])
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)
        path = out_dir / f"{stem}_{d:02d}_{safe}.png"
        Image.fromarray(rgba, mode="RGBA").save(path)
        box_px, mask_px = (i1 - i0) * (j1 - j0), int(alpha.sum())
        records.append({**record, "file": str(path), "box_px": int(box_px), "mask_px": mask_px,
                        "box_background": background_fraction(mask, box),
                        "mask_background": 0.0,
                        "box_share": box_px / (H * W), "mask_share": mask_px / (H * W)})
    return records


def format_crop_line(record: dict) -> str:
    """One line per instance, ``key=value`` so it greps and parses easily."""
    if record["file"] is None:
        return (f"(no cut-out: box {record['box']} holds no pixel) class={record['class']} "
                f"score={record['score']:.3f}")
    return (f"{record['file']} class={record['class']} score={record['score']:.3f} "
            f"box_background={record['box_background']:.3f} "
            f"mask_background={record['mask_background']:.3f} "
            f"box_px={record['box_px']} mask_px={record['mask_px']} "
            f"box_share={record['box_share']:.4f} mask_share={record['mask_share']:.4f}")


def write_json(path, payload) -> Path:
    """Write ``payload`` as JSON through a temporary file and a rename; a
    failed write (a full disk) names the file."""
    from minimask.runs import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=1))
    return path


def save_examples(model, images, path, class_names=None, score_thresh: float = 0.5,
                  title: str = "predictions on fresh images") -> Path:
    """A row of model inputs (each ``(3, S, S)`` float in [0, 1]) with their
    predicted masks, boxes, classes and scores, saved as one PNG."""
    from matplotlib.figure import Figure

    from minimask.viz.detection import overlay_masks

    images = [np.asarray(im, dtype=np.float32) for im in images]
    n = max(len(images), 1)
    fig = Figure(figsize=(3.0 * n, 3.3))
    axes = fig.subplots(1, n, squeeze=False)[0]
    results = predict_steps(model, np.stack(images), score_thresh) if images else []
    for ax, image, det in zip(axes, images, results):
        overlay_masks(image, det["masks"], boxes=det["boxes"], labels=det["labels"],
                      scores=det["scores"], class_names=class_names, ax=ax,
                      title=f"{len(det['boxes'])} above {score_thresh:g}")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
