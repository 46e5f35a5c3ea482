"""COCO-format instance segmentation data: load, validate, export.

A COCO "instances" file is one JSON object with three lists::

    images:      {"id", "file_name", "height", "width"}
    categories:  {"id", "name"}
    annotations: {"id", "image_id", "category_id", "segmentation",
                  "bbox": [x, y, w, h], "area", "iscrowd"}

A segmentation is either a list of polygons ``[[x1, y1, x2, y2, ...], ...]``
or a run-length encoding (RLE) ``{"size": [H, W], "counts": ...}`` whose
counts are a list of ints (uncompressed) or a string (compressed).
pycocotools does the RLE and polygon work here; minimask does not redo it.

* ``CocoDataset(annotations, images_dir, image_size=128)`` - the same
  ``(image, target)`` items as ``ShapesDataset``, read from a COCO file;
* ``export_coco(dataset, out_dir)`` - writes any such dataset as PNGs plus
  a COCO file (``CocoDataset`` reads it back unchanged);
* ``coco_ground_truth(dataset)`` - the ground truth of a dataset as a COCO
  dict in ORIGINAL image pixels, for ``minimask.evaluate``.

Geometry. An image of size ``(H, W)`` is scaled by ``s = S / max(H, W)`` to
``(round(H s), round(W s))`` and padded with zeros at the bottom and the
right to ``S x S``, so a point ``(x, y)`` of the original lands at
``(x s, y s)`` and the top-left corner stays put. Each mask is rasterised
by pycocotools at the ORIGINAL size (a pixel belongs to a polygon when its
centre is inside, as ``minimask.masks`` counts pixels) and then resized
by area: a model-input pixel is in the mask when the original mask covers
at least half of its area (exact overlaps, not a sampled filter, so thin
objects do not break up the way nearest-neighbour sampling breaks them). Boxes come from the resized masks (their tightest
box, ``minimask.masks.box_of_mask``), not from ``bbox``: that way a box
always agrees with its mask, whatever the annotation tool rounded. An
instance whose mask is empty after resizing (a sliver thinner than half a
model pixel) is dropped, since it would have neither a mask nor a box.

Crowd regions (``iscrowd = 1``) mark groups of objects annotated as one
blob; they are not single instances, so ``CocoDataset`` leaves them out of
the training targets. The evaluation still sees them, as pycocotools
intends (detections on a crowd region are ignored, not counted as false).
Images with no annotations are kept, as negatives.

Validation happens when the file is opened, with one ``ValueError`` per
problem naming the file, the annotation (index and id) and the field.
Image files are checked when they are read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from minimask.masks import box_of_mask

__all__ = ["CocoDataset", "export_coco", "coco_ground_truth", "dataset_categories",
           "target_to_annotations", "mask_to_rle"]


# ----------------------------------------------------------------------------
# small helpers shared with minimask.evaluate
# ----------------------------------------------------------------------------

def _mask_utils():
    # imported lazily so that ``import minimask.data`` stays light
    from pycocotools import mask as mask_utils
    return mask_utils


def mask_to_rle(mask) -> dict:
    """Compressed COCO RLE of an (H, W) bool mask, with ``counts`` as str
    (JSON cannot hold bytes): ``{"size": [H, W], "counts": str}``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must have 2 dimensions (H, W), got shape {mask.shape}")
    rle = _mask_utils().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": rle["counts"].decode("ascii")}


# Images over Pillow's decompression-bomb limit are refused (Pillow raises
# at twice its MAX_IMAGE_PIXELS); so are JSON sizes and RLE sizes above it.
MAX_PIXELS = 2 * 89_478_485
# polygon coordinates beyond this are refused whatever the image's size
MAX_COORDINATE = 1e6


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
        and np.isfinite(v)


def dataset_categories(dataset, class_names=None) -> tuple[list[str], list[int]]:
    """(class names, COCO category ids) of a dataset: a ``CocoDataset``
    keeps its own ids; any other dataset numbers its classes ``1..K`` (COCO
    reserves 0 for "no category"). Names come from ``class_names``, else
    ``dataset.class_names``, else ``class_0, class_1, ...`` for
    ``dataset.num_classes`` classes."""
    if class_names is None:
        class_names = getattr(dataset, "class_names", None)
    if class_names is None:
        k = getattr(dataset, "num_classes", None)
        if k is None:
            raise ValueError("class_names is needed: the dataset has neither class_names "
                             "nor num_classes")
        class_names = [f"class_{i}" for i in range(int(k))]
    class_names = [str(n) for n in class_names]
    ids = getattr(dataset, "category_ids", None)
    if ids is None or len(ids) != len(class_names):
        ids = list(range(1, len(class_names) + 1))
    return class_names, [int(i) for i in ids]


def _image_id(dataset, index: int) -> int:
    f = getattr(dataset, "image_id", None)
    return int(f(index)) if callable(f) else index + 1


def _file_name(dataset, index: int) -> str:
    f = getattr(dataset, "file_name", None)
    name = str(f(index)) if callable(f) else f"{index:06d}.png"
    return str(Path(name).with_suffix(".png"))


def target_to_annotations(target, image_id: int, category_ids, first_id: int = 1) -> list[dict]:
    """COCO annotations of one target ``{"labels" (G,), "masks" (G, H, W)}``.

    Each instance becomes ``{"id", "image_id", "category_id", "segmentation"
    (compressed RLE), "area" (mask pixels), "bbox" [x, y, w, h] (tight box
    of the mask, so it always agrees with the mask), "iscrowd": 0}``;
    annotation ids count up from ``first_id``. Empty masks are skipped.
    """
    mask_utils = _mask_utils()
    labels = np.asarray(target["labels"])
    masks = np.asarray(target["masks"]).astype(bool)
    anns = []
    for label, mask in zip(labels, masks):
        if not 0 <= int(label) < len(category_ids):
            raise ValueError(f"label {int(label)} of image {image_id} is outside the "
                             f"{len(category_ids)} classes")
        if not mask.any():
            continue
        rle = mask_to_rle(mask)
        x, y, w, h = (float(v) for v in mask_utils.toBbox({**rle, "counts": rle["counts"].encode()}))
        anns.append({"id": first_id + len(anns), "image_id": int(image_id),
                     "category_id": int(category_ids[int(label)]), "segmentation": rle,
                     "area": float(mask.sum()), "bbox": [x, y, w, h], "iscrowd": 0})
    return anns


def _coco_dict(images, annotations, class_names, category_ids) -> dict:
    return {"info": {"description": "written by minimask"},
            "images": images, "annotations": annotations,
            "categories": [{"id": int(c), "name": n, "supercategory": "object"}
                           for c, n in zip(category_ids, class_names)]}


def _float_image_to_uint8(image) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {image.shape}")
    return np.clip(np.rint(np.transpose(image, (1, 2, 0)) * 255.0), 0, 255).astype(np.uint8)


def image_to_rgb(im, where: str = "image") -> np.ndarray:
    """A loaded Pillow image as ``(H, W, 3)`` uint8 RGB, whatever its mode:
    greyscale is repeated over the channels; 16-bit greyscale is scaled to
    8 bits (32-bit integer by its maximum); floating-point images (mode
    ``F``, e.g. a float32 TIFF) are read as [0, 1] when all values lie
    there, else as [0, 255], and refused when a value is NaN, infinite or
    outside [0, 255]; palette images are looked up; alpha is dropped.
    ``predict`` and ``CocoDataset`` both read images through it, so a model
    sees the same pixels at training and at prediction time."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") else max(float(grey.max()), 1.0)
        grey = np.clip(np.rint(grey / peak * 255), 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
    elif im.mode == "F":
        grey = np.asarray(im, dtype=np.float64)
        if grey.size and not np.all(np.isfinite(grey)):
            raise ValueError(f"{where} is a floating-point image with NaN or infinite pixels")
        low, high = (float(grey.min()), float(grey.max())) if grey.size else (0.0, 0.0)
        if low < 0 or high > 255:
            raise ValueError(f"{where} is a floating-point image with values in [{low:g}, "
                             f"{high:g}]; expected [0, 1] or [0, 255]")
        peak = 1.0 if high <= 1.0 else 255.0
        grey = np.clip(np.rint(grey / peak * 255), 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
    elif im.mode == "P" and "transparency" in im.info:
        rgb = np.asarray(im.convert("RGBA").convert("RGB"), dtype=np.uint8)
    elif im.mode == "RGB":
        rgb = np.asarray(im, dtype=np.uint8)     # no converted copy of a large photo
    else:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


# ----------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------

def export_coco(dataset, out_dir, class_names=None) -> str:
    """Write a dataset in COCO format.

    Parameters
    ----------
    dataset : anything with ``len`` and ``dataset[i] -> (image (3, H, W)
        float in [0, 1], target {"boxes", "labels" (G,) in 0..K-1, "masks"
        (G, H, W) bool})``, e.g. ``ShapesDataset``. Optional methods
        ``image_id(i)`` and ``file_name(i)`` name the images (else ``i + 1``
        and ``000000.png``, ...); the extension is always ``.png``.
    out_dir : folder to write into (created if missing).
    class_names : K names; default ``dataset.class_names``.

    Returns
    -------
    The path (str) of ``out_dir/annotations.json``. Images go to
    ``out_dir/images/`` as 8-bit RGB PNGs (``round(255 x)``). Annotations
    carry compressed RLE segmentations (counts as str), ``area`` = mask
    pixels, ``bbox`` = ``[x, y, w, h]`` of the mask's tight box and
    ``iscrowd = 0``; categories get ids ``1..K`` (or a ``CocoDataset``'s own).
    """
    from PIL import Image
    class_names, category_ids = dataset_categories(dataset, class_names)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, seen_ids, seen_names = [], [], set(), set()
    for i in range(len(dataset)):
        image, target = dataset[i]
        image_id, file_name = _image_id(dataset, i), _file_name(dataset, i)
        if image_id in seen_ids:
            raise ValueError(f"image_id {image_id} of image {i} is used by an earlier image")
        if file_name in seen_names:
            raise ValueError(f"file_name {file_name!r} of image {i} is used by an earlier image")
        seen_ids.add(image_id)
        seen_names.add(file_name)
        pixels = _float_image_to_uint8(image)
        Image.fromarray(pixels, mode="RGB").save(out_dir / "images" / file_name)
        H, W = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": H, "width": W})
        annotations += target_to_annotations(target, image_id, category_ids,
                                             first_id=len(annotations) + 1)
    path = out_dir / "annotations.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_coco_dict(images, annotations, class_names, category_ids)))
    os.replace(tmp, path)
    return str(path)


def coco_ground_truth(dataset, class_names=None) -> dict:
    """The ground truth of a dataset as a COCO dict, in original pixels.

    A ``CocoDataset`` gives its (validated) file, with the fields
    pycocotools' evaluation needs filled in where the file left them out
    (``area`` from the mask, ``iscrowd = 0``, ``bbox`` from the mask, image
    ``height``/``width``). Any other dataset is converted as ``export_coco``
    converts it, without writing images (this reads every item once).
    """
    if isinstance(dataset, CocoDataset):
        return dataset.ground_truth()
    class_names, category_ids = dataset_categories(dataset, class_names)
    images, annotations = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        image_id = _image_id(dataset, i)
        images.append({"id": image_id, "file_name": _file_name(dataset, i),
                       "height": int(image.shape[-2]), "width": int(image.shape[-1])})
        annotations += target_to_annotations(target, image_id, category_ids,
                                             first_id=len(annotations) + 1)
    return _coco_dict(images, annotations, class_names, category_ids)


# ----------------------------------------------------------------------------
# loading and validation
# ----------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"annotation file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {str(path)!r} cannot be read: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"annotation file {str(path)!r} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"annotation file {str(path)!r} nests too deeply to be read (a COCO "
                         f"file is a few levels deep)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a COCO file must hold a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r} (a COCO file needs 'images', "
                             "'annotations' and 'categories')")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    if not data["images"]:
        raise ValueError(f"{path}: 'images' is empty; a dataset needs at least one image")
    return data


def _check_images(path, images) -> dict:
    by_id = {}
    for i, img in enumerate(images):
        where = f"{path}: image {i}"
        if not isinstance(img, dict):
            raise ValueError(f"{where} must be an object, got {img!r}")
        for field in ("id", "file_name"):
            if field not in img:
                raise ValueError(f"{where}: missing field {field!r}")
        if isinstance(img["id"], bool) or not isinstance(img["id"], int):
            raise ValueError(f"{where}: field 'id' must be an integer, got {img['id']!r}")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise ValueError(f"{where} (id {img['id']}): field 'file_name' must be a "
                             f"non-empty string, got {img['file_name']!r}")
        for field in ("height", "width"):
            if field in img and not (isinstance(img[field], int) and not isinstance(img[field], bool)
                                     and img[field] > 0):
                raise ValueError(f"{where} (id {img['id']}): field {field!r} must be a "
                                 f"positive integer, got {img[field]!r}")
        if "height" in img and "width" in img and img["height"] * img["width"] > MAX_PIXELS:
            raise ValueError(f"{where} (id {img['id']}): height x width = {img['height']} x "
                             f"{img['width']} is over the limit of {MAX_PIXELS} pixels")
        if img["id"] in by_id:
            raise ValueError(f"{where}: field 'id' {img['id']} is used by an earlier image")
        by_id[img["id"]] = img
    return by_id


def _check_categories(path, categories) -> list:
    ids = {}
    for i, cat in enumerate(categories):
        where = f"{path}: category {i}"
        if not isinstance(cat, dict):
            raise ValueError(f"{where} must be an object, got {cat!r}")
        for field in ("id", "name"):
            if field not in cat:
                raise ValueError(f"{where}: missing field {field!r}")
        if isinstance(cat["id"], bool) or not isinstance(cat["id"], int):
            raise ValueError(f"{where}: field 'id' must be an integer, got {cat['id']!r}")
        if cat["id"] in ids:
            raise ValueError(f"{where}: field 'id' {cat['id']} is used by an earlier category")
        ids[cat["id"]] = str(cat["name"])
    if not ids:
        raise ValueError(f"{path}: 'categories' is empty; at least one category is needed")
    return sorted(ids.items())


def _check_polygon_extent(where: str, seg, height: int, width: int) -> None:
    """Every vertex within the image grown by its own size on each side
    (x in [-W, 2W], y in [-H, 2H]): pycocotools rasterises a polygon edge by
    edge at 5x resolution in 32-bit ints, so coordinates of 10^8 and more
    exhaust memory or crash it (exit 139)."""
    for k, poly in enumerate(seg):
        xs, ys = np.asarray(poly[0::2], np.float64), np.asarray(poly[1::2], np.float64)
        if xs.min() < -width or xs.max() > 2 * width or ys.min() < -height \
                or ys.max() > 2 * height:
            raise ValueError(f"{where}: field 'segmentation' polygon {k} reaches "
                             f"x in [{xs.min():g}, {xs.max():g}], y in [{ys.min():g}, "
                             f"{ys.max():g}], far outside the {width}x{height} (WxH) image "
                             f"(vertices must lie within x in [-{width}, {2 * width}], "
                             f"y in [-{height}, {2 * height}])")


def _rle_string_counts(counts: str) -> list[int] | str:
    """The run lengths of a compressed COCO RLE string (pycocotools'
    format: each count in 5-bit groups, characters 48..111, bit 0x20 =
    "more groups follow", bit 0x10 of the last group = sign, and from the
    third count on, each stored as the difference to the count two before),
    or a string saying why it is not one."""
    out, p, n = [], 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return "it ends in the middle of a count"
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return f"character {counts[p]!r} at position {p} is outside '0'..'o'"
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if k > 7:
                return f"a count at position {p} is too long"
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        if x < 0:
            return f"count {len(out)} is negative ({x})"
        out.append(x)
    return out


def _check_segmentation(where: str, seg, image) -> None:
    if isinstance(seg, list):
        if not seg:
            raise ValueError(f"{where}: field 'segmentation' is an empty polygon list")
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                raise ValueError(f"{where}: field 'segmentation' polygon {k} must be a list "
                                 f"of numbers [x1, y1, x2, y2, ...], got {poly!r:.80}")
            if any(abs(v) > MAX_COORDINATE for v in poly):
                raise ValueError(f"{where}: field 'segmentation' polygon {k} has a coordinate "
                                 f"beyond +-{MAX_COORDINATE:g} pixels "
                                 f"({max(poly, key=abs):g})")
            if len(poly) % 2:
                raise ValueError(f"{where}: field 'segmentation' polygon {k} has an odd "
                                 f"count of numbers ({len(poly)}); it needs (x, y) pairs")
            if len(poly) < 6:
                raise ValueError(f"{where}: field 'segmentation' polygon {k} has "
                                 f"{len(poly) // 2} points; a polygon needs at least 3")
        if image.get("height") and image.get("width"):
            _check_polygon_extent(where, seg, image["height"], image["width"])
        return
    if isinstance(seg, dict):
        if "size" not in seg or "counts" not in seg:
            raise ValueError(f"{where}: field 'segmentation' is an RLE without "
                             f"'size' and 'counts' (keys {sorted(seg)})")
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise ValueError(f"{where}: field 'segmentation' RLE 'size' must be [height, "
                             f"width], got {size!r}")
        if size[0] * size[1] > MAX_PIXELS:
            raise ValueError(f"{where}: field 'segmentation' RLE 'size' {size} is over the "
                             f"limit of {MAX_PIXELS} pixels")
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                raise ValueError(f"{where}: field 'segmentation' RLE 'counts' must be "
                                 "non-negative integers")
            if sum(counts) != size[0] * size[1]:
                raise ValueError(f"{where}: field 'segmentation' RLE 'counts' add up to "
                                 f"{sum(counts)}, not height x width = {size[0] * size[1]}")
        elif isinstance(counts, str):
            # pycocotools decodes a string whose counts fall short of H x W
            # from uninitialised memory: a different mask on every read
            runs = _rle_string_counts(counts)
            if isinstance(runs, str):
                raise ValueError(f"{where}: field 'segmentation' RLE 'counts' is not a valid "
                                 f"compressed RLE string: {runs}")
            if sum(runs) != size[0] * size[1]:
                raise ValueError(f"{where}: field 'segmentation' RLE 'counts' (a compressed "
                                 f"string) add up to {sum(runs)}, not height x width = "
                                 f"{size[0] * size[1]}")
        else:
            raise ValueError(f"{where}: field 'segmentation' RLE 'counts' must be a list "
                             f"of ints or a compressed string, got {type(counts).__name__}")
        expected = [image.get("height"), image.get("width")]
        if None not in expected and list(size) != expected:
            raise ValueError(f"{where}: field 'segmentation' RLE 'size' {size} does not "
                             f"match the image's [height, width] {expected}")
        return
    raise ValueError(f"{where}: field 'segmentation' must be a polygon list [[x1, y1, ...]] "
                     f"or an RLE dict {{'size', 'counts'}}, got {type(seg).__name__}")


def _check_annotations(path, annotations, images_by_id, category_ids) -> None:
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise ValueError(f"{path}: annotation {i} must be an object, got {ann!r:.80}")
        where = f"{path}: annotation {i} (id {ann.get('id', '?')})"
        for field in ("image_id", "category_id", "segmentation"):
            if field not in ann:
                raise ValueError(f"{where}: missing field {field!r}")
        for field in ("image_id", "category_id"):
            if isinstance(ann[field], bool) or not isinstance(ann[field], int):
                raise ValueError(f"{where}: field {field!r} must be an integer id, got "
                                 f"{ann[field]!r:.60}")
        if ann["image_id"] not in images_by_id:
            raise ValueError(f"{where}: field 'image_id' {ann['image_id']!r} is not the id "
                             "of any image in 'images'")
        if ann["category_id"] not in category_ids:
            raise ValueError(f"{where}: field 'category_id' {ann['category_id']!r} is not "
                             "the id of any category in 'categories'")
        if "bbox" in ann:
            bbox = ann["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise ValueError(f"{where}: field 'bbox' must be 4 numbers [x, y, width, "
                                 f"height], got {bbox!r}")
            if bbox[2] <= 0 or bbox[3] <= 0:
                raise ValueError(f"{where}: field 'bbox' must have positive width and "
                                 f"height, got {bbox!r}")
        if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
            raise ValueError(f"{where}: field 'area' must be a number >= 0 (the mask's "
                             f"pixels), got {ann['area']!r:.60}")
        image = images_by_id[ann["image_id"]]
        if image.get("height") and image.get("width"):
            _check_area_and_bbox(where, ann, image["height"], image["width"])
        if ann.get("iscrowd", 0) not in (0, 1):
            raise ValueError(f"{where}: field 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
        _check_segmentation(where, ann["segmentation"], images_by_id[ann["image_id"]])


def _check_area_and_bbox(where: str, ann, height: int, width: int) -> None:
    """``bbox`` inside the image (one pixel of slack for rounding) and
    ``area`` at most the image's pixels: evaluation scores boxes against
    ``bbox`` and sorts objects into small/medium/large by ``area``, so a
    wrong value would silently change the reported AP."""
    if "bbox" in ann:
        x, y, w, h = ann["bbox"]
        if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
            raise ValueError(f"{where}: field 'bbox' {ann['bbox']} [x, y, width, height] "
                             f"reaches outside the {width}x{height} (WxH) image")
    if "area" in ann and ann["area"] > height * width:
        raise ValueError(f"{where}: field 'area' {ann['area']:g} is more than the image's "
                         f"{height} x {width} = {height * width} pixels")


def _segmentation_to_mask(seg, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a (validated) polygon list or RLE."""
    mask_utils = _mask_utils()
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    if list(rle["size"]) != [height, width]:
        raise ValueError(f"RLE size {list(rle['size'])} does not match the image "
                         f"({height}, {width})")
    return mask_utils.decode(rle).astype(bool)


def _overlap_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in): the share of output pixel k's extent that input pixel
    i covers, along one axis. Output pixel k spans ``[k t, (k + 1) t)`` in
    input pixels, ``t = n_in / n_out``; each row sums to 1."""
    t = n_in / n_out
    lo = np.arange(n_out)[:, None] * t
    i = np.arange(n_in)[None, :]
    return np.clip(np.minimum(lo + t, i + 1) - np.maximum(lo, i), 0, None) / t


def _resize_mask(mask: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Resize a bool mask by area: an output pixel is set when the mask
    covers at least half of its area. The covered share is separable,
    ``cover = A_y @ mask @ A_x^T`` with the overlap matrices above."""
    if mask.shape == (new_h, new_w):
        return mask.copy()
    H, W = mask.shape
    cover = _overlap_matrix(new_h, H) @ mask.astype(np.float64) @ _overlap_matrix(new_w, W).T
    return cover >= 0.5 - 1e-9          # 1e-9: round-off of shares that are exactly 1/2


class CocoDataset:
    """A COCO instances file and its image folder as a minimask dataset.

    Parameters
    ----------
    annotations : path of the COCO JSON file.
    images_dir : folder the images' ``file_name`` entries are relative to.
    image_size : S, the side of the square model input (default 128).

    ``dataset[i]`` -> ``(image, target)``:

    * ``image`` (3, S, S) float32 in [0, 1]: the RGB image (greyscale, RGBA
      and palette images converted) scaled by ``s = S / max(H, W)`` and
      zero-padded at the bottom and right;
    * ``target["masks"]`` (G, S, S) bool, rasterised at the original size
      and resized (area >= 1/2, see the module docstring);
    * ``target["boxes"]`` (G, 4) float32 ``(x1, y1, x2, y2)``, the tight
      box of each resized mask, in model-input pixels;
    * ``target["labels"]`` (G,) int64 in ``0..K-1``: the index of the
      category in ``category_ids`` (categories sorted by COCO id).

    Crowd annotations are skipped; images without annotations give G = 0.
    Per image: ``scale(i)`` (s), ``original_size(i)`` ((H, W)),
    ``image_id(i)``, ``file_name(i)``, ``image_path(i)``. Per dataset:
    ``num_classes``, ``class_names``, ``category_ids``.

    Raises ValueError when the file is malformed (at construction) and
    when an image file is missing or unreadable (when read).
    """

    def __init__(self, annotations, images_dir, image_size: int = 128):
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
                or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        self.annotations_path = Path(annotations)
        self.images_dir = Path(images_dir)
        self.image_size = int(image_size)
        data = _read_json(self.annotations_path)
        path = self.annotations_path
        self._images_by_id = _check_images(path, data["images"])
        categories = _check_categories(path, data["categories"])
        self.category_ids = [c for c, _ in categories]
        self.class_names = [n for _, n in categories]
        self.num_classes = len(categories)
        self._label_of = {c: k for k, c in enumerate(self.category_ids)}
        _check_annotations(path, data["annotations"], self._images_by_id, self._label_of)
        self._data = data
        self._images = list(data["images"])
        self._anns = {img["id"]: [] for img in self._images}
        for ann in data["annotations"]:
            self._anns[ann["image_id"]].append(ann)
        self._sizes = {}

    # -- per-image facts ---------------------------------------------------
    def __len__(self) -> int:
        return len(self._images)

    def _check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return index % len(self)

    def image_id(self, index: int) -> int:
        return int(self._images[self._check_index(index)]["id"])

    def file_name(self, index: int) -> str:
        return self._images[self._check_index(index)]["file_name"]

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.file_name(index)

    def original_size(self, index: int) -> tuple[int, int]:
        """(H, W) of the image file: from the JSON when it says, else read
        from the file's header."""
        index = self._check_index(index)
        img = self._images[index]
        if "height" in img and "width" in img:
            return int(img["height"]), int(img["width"])
        if index not in self._sizes:
            with self._open(index) as im:
                self._sizes[index] = (im.height, im.width)
        return self._sizes[index]

    def scale(self, index: int) -> float:
        """s = S / max(H, W): original pixels -> model-input pixels."""
        return self.image_size / max(self.original_size(index))

    def resized_size(self, index: int) -> tuple[int, int]:
        """(h, w) of the image content inside the padded S x S input."""
        H, W = self.original_size(index)
        s = self.scale(index)
        return (min(self.image_size, max(1, round(H * s))),
                min(self.image_size, max(1, round(W * s))))

    # -- reading -------------------------------------------------------------
    def _where(self, index: int) -> str:
        return f"image file {str(self.image_path(index))!r} (image id {self.image_id(index)})"

    def _open(self, index: int):
        from PIL import Image, UnidentifiedImageError
        path = self.image_path(index)
        where = self._where(index)
        try:
            im = Image.open(path)
            im.load()
        except FileNotFoundError:
            raise ValueError(f"{where} does not exist") from None
        except Image.DecompressionBombError as e:
            raise ValueError(f"{where} is too large to read safely ({e})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{where} cannot be read as an image: {e}") from None
        return im

    def _read_rgb(self, index: int) -> np.ndarray:
        """The image as (H, W, 3) uint8, whatever its mode."""
        im = self._open(index)
        with im:
            rgb = image_to_rgb(im, self._where(index))
        H, W = self.original_size(index)
        if rgb.shape[:2] != (H, W):
            raise ValueError(f"image file {str(self.image_path(index))!r} is "
                             f"{rgb.shape[0]}x{rgb.shape[1]} (HxW) but "
                             f"{self.annotations_path} says {H}x{W}")
        return rgb

    def __getitem__(self, index: int):
        from PIL import Image
        index = self._check_index(index)
        S = self.image_size
        rgb = self._read_rgb(index)
        H, W = rgb.shape[:2]
        h, w = self.resized_size(index)
        if (h, w) != (H, W):
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
        image = np.zeros((3, S, S), dtype=np.float32)
        image[:, :h, :w] = np.transpose(rgb, (2, 0, 1)).astype(np.float32) / 255.0

        masks, labels = [], []
        for ann in self._anns[self.image_id(index)]:
            if ann.get("iscrowd", 0) == 1:
                continue
            self._check_against_size(ann, H, W)
            small = _resize_mask(_segmentation_to_mask(ann["segmentation"], H, W), h, w)
            if not small.any():
                continue
            full = np.zeros((S, S), dtype=bool)
            full[:h, :w] = small
            masks.append(full)
            labels.append(self._label_of[ann["category_id"]])
        if masks:
            masks = np.stack(masks)
            boxes = np.stack([box_of_mask(m) for m in masks]).astype(np.float32)
        else:
            masks = np.zeros((0, S, S), dtype=bool)
            boxes = np.zeros((0, 4), dtype=np.float32)
        return image, {"boxes": boxes, "labels": np.asarray(labels, dtype=np.int64),
                       "masks": masks}

    def _check_against_size(self, ann, H: int, W: int) -> None:
        """The checks that need the image's size, for images whose size the
        JSON leaves out (known only once the file is read)."""
        where = f"{self.annotations_path}: annotation (id {ann.get('id', '?')})"
        if isinstance(ann["segmentation"], list):
            _check_polygon_extent(where, ann["segmentation"], H, W)
        _check_area_and_bbox(where, ann, H, W)

    # -- for evaluation --------------------------------------------------------
    def ground_truth(self) -> dict:
        """The file's content, ready for pycocotools' COCO/COCOeval: image
        sizes, annotation ids, ``iscrowd``, ``area`` and ``bbox`` filled in
        where the file left them out (area and bbox from the mask)."""
        mask_utils = _mask_utils()
        images = []
        for i, img in enumerate(self._images):
            H, W = self.original_size(i)
            images.append({**img, "height": H, "width": W})
        sizes = {img["id"]: (img["height"], img["width"]) for img in images}
        used_ids = {a["id"] for a in self._data["annotations"] if isinstance(a.get("id"), int)}
        next_id = max(used_ids, default=0) + 1
        annotations, seen = [], set()
        for ann in self._data["annotations"]:
            ann = dict(ann)
            if not isinstance(ann.get("id"), int) or ann["id"] in seen:
                ann["id"], next_id = next_id, next_id + 1
            seen.add(ann["id"])
            ann.setdefault("iscrowd", 0)
            self._check_against_size(ann, *sizes[ann["image_id"]])
            if "area" not in ann or "bbox" not in ann:
                H, W = sizes[ann["image_id"]]
                mask = _segmentation_to_mask(ann["segmentation"], H, W)
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                ann.setdefault("area", float(mask.sum()))
                ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
            annotations.append(ann)
        return _coco_dict(images, annotations, self.class_names, self.category_ids)
