"""COCO-format data: export -> load round trips, resize/pad geometry checked
against rectangles whose answer is known by hand, polygons and RLE (both
encodings) agreeing, image modes, negatives, crowds, and one ValueError per
kind of malformed file."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from minimask.data.coco import CocoDataset, coco_ground_truth, export_coco, mask_to_rle
from minimask.data.synthetic import CLASSES, ShapesDataset

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------- helpers

def rect_polygon(x1, y1, x2, y2):
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def rect_mask(H, W, x1, y1, x2, y2):
    m = np.zeros((H, W), bool)
    m[y1:y2, x1:x2] = True
    return m


def uncompressed_rle(mask):
    """Column-major run lengths starting with a run of zeros, written here
    without pycocotools so that the RLE path is tested against it."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def write_coco(tmp_path, images, annotations, categories=None, name="ann.json"):
    """images: list of (id, file_name, pil_image or None, (H, W) or None)."""
    (tmp_path / "img").mkdir(exist_ok=True)
    entries = []
    for image_id, file_name, pil, size in images:
        if pil is not None:
            pil.save(tmp_path / "img" / file_name)
        entry = {"id": image_id, "file_name": file_name}
        if size is not None:
            entry["height"], entry["width"] = size
        entries.append(entry)
    data = {"images": entries, "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "thing"}]}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path, tmp_path / "img"


def rgb_image(H, W, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), mode="RGB")


def ann(i, image_id, seg, category_id=1, **extra):
    return {"id": i, "image_id": image_id, "category_id": category_id,
            "segmentation": seg, **extra}


# ---------------------------------------------------------------- round trip


def test_shapes_export_round_trip(tmp_path):
    ds = ShapesDataset(seed=3, num_images=5, size=48)
    path = export_coco(ds, tmp_path / "out")
    assert path == str(tmp_path / "out" / "annotations.json")
    coco = CocoDataset(path, tmp_path / "out" / "images", image_size=48)
    assert len(coco) == 5
    assert coco.class_names == list(CLASSES) and coco.num_classes == 4
    assert coco.category_ids == [1, 2, 3, 4]
    total = 0
    for i in range(5):
        image, target = ds[i]
        image2, target2 = coco[i]
        assert coco.image_id(i) == ds.image_id(i) and coco.file_name(i) == ds.file_name(i)
        assert coco.scale(i) == 1.0 and coco.original_size(i) == (48, 48)
        assert image2.dtype == np.float32 and image2.shape == (3, 48, 48)
        # PNGs hold 8 bits: round(255 x) / 255 is within half a step of x
        assert np.abs(image2 - image).max() <= 0.5 / 255 + 1e-6
        np.testing.assert_array_equal(target2["masks"], target["masks"])
        np.testing.assert_array_equal(target2["labels"], target["labels"])
        np.testing.assert_array_equal(target2["boxes"], target["boxes"])
        assert target2["boxes"].dtype == np.float32 and target2["labels"].dtype == np.int64
        assert target2["masks"].dtype == bool
        total += len(target["labels"])
    assert total > 0


def test_export_json_is_coco(tmp_path):
    ds = ShapesDataset(seed=0, num_images=3, size=40)
    path = export_coco(ds, tmp_path, class_names=["a", "b", "c", "d"])
    data = json.loads(open(path).read())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
    assert [c["name"] for c in data["categories"]] == ["a", "b", "c", "d"]
    assert len(data["images"]) == 3
    for img in data["images"]:
        assert (img["height"], img["width"]) == (40, 40)
        assert Image.open(tmp_path / "images" / img["file_name"]).size == (40, 40)
    ids = [a["id"] for a in data["annotations"]]
    assert len(ids) == len(set(ids)) > 0
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for i in range(3):
        _, target = ds[i]
        anns = by_image.get(ds.image_id(i), [])
        assert len(anns) == len(target["labels"])
        for a, mask, label, box in zip(anns, target["masks"], target["labels"], target["boxes"]):
            assert isinstance(a["segmentation"]["counts"], str)
            assert a["segmentation"]["size"] == [40, 40]
            decoded = mask_utils.decode({"size": [40, 40],
                                         "counts": a["segmentation"]["counts"].encode()})
            np.testing.assert_array_equal(decoded.astype(bool), mask)
            assert a["area"] == mask.sum() and a["iscrowd"] == 0
            assert a["category_id"] == label + 1
            x1, y1, x2, y2 = box
            assert a["bbox"] == [x1, y1, x2 - x1, y2 - y1]


def test_export_of_a_plain_dataset_without_names(tmp_path):
    """Any (image, target) sequence exports; names and ids get defaults."""
    mask = rect_mask(10, 12, 2, 3, 7, 8)
    items = [(np.full((3, 10, 12), 0.5, np.float32),
              {"boxes": np.array([[2, 3, 7, 8]], np.float32), "labels": np.array([1]),
               "masks": mask[None]})]

    class Plain:
        num_classes = 2
        def __len__(self):
            return 1
        def __getitem__(self, i):
            return items[i]

    path = export_coco(Plain(), tmp_path)
    coco = CocoDataset(path, tmp_path / "images", image_size=12)
    assert coco.class_names == ["class_0", "class_1"] and coco.file_name(0) == "000000.png"
    assert coco.image_id(0) == 1 and coco.original_size(0) == (10, 12)
    image, target = coco[0]
    np.testing.assert_array_equal(target["masks"][0, :10], mask)
    assert not target["masks"][0, 10:].any()            # the padding rows
    np.testing.assert_array_equal(target["labels"], [1])
    np.testing.assert_array_equal(target["boxes"], [[2, 3, 7, 8]])
    assert np.allclose(image[:, :10], 128 / 255) and np.all(image[:, 10:] == 0)


def test_export_refuses_repeated_ids_and_names(tmp_path):
    ds = ShapesDataset(seed=0, num_images=2, size=32)
    ds.image_id = lambda i: 7
    with pytest.raises(ValueError, match="image_id 7 of image 1 is used by an earlier image"):
        export_coco(ds, tmp_path / "a")
    ds = ShapesDataset(seed=0, num_images=2, size=32)
    ds.file_name = lambda i: "same.png"
    with pytest.raises(ValueError, match="file_name 'same.png' of image 1 is used"):
        export_coco(ds, tmp_path / "b")


def test_coco_dataset_exports_back_to_itself(tmp_path):
    """A CocoDataset re-exported keeps its category ids and names."""
    path, images = write_coco(tmp_path, [(5, "a.png", rgb_image(16, 16), (16, 16))],
                              [ann(1, 5, rect_polygon(2, 2, 9, 7), category_id=7)],
                              categories=[{"id": 7, "name": "seven"}])
    coco = CocoDataset(path, images, image_size=16)
    out = export_coco(coco, tmp_path / "again")
    again = CocoDataset(out, tmp_path / "again" / "images", image_size=16)
    assert again.category_ids == [7] and again.class_names == ["seven"]
    np.testing.assert_array_equal(again[0][1]["masks"], coco[0][1]["masks"])
    np.testing.assert_array_equal(again[0][0], coco[0][0])


# ---------------------------------------------------------------- geometry


def test_downscaled_rectangle_lands_where_expected(tmp_path):
    # 100 wide x 40 high, S = 50: s = 1/2, content 20 x 50, padded below
    pixels = np.zeros((40, 100, 3), np.uint8)
    pixels[10:30, 20:60] = (200, 100, 50)
    path, images = write_coco(tmp_path, [(1, "wide.png", Image.fromarray(pixels), (40, 100))],
                              [ann(1, 1, rect_polygon(20, 10, 60, 30), bbox=[20, 10, 40, 20])])
    coco = CocoDataset(path, images, image_size=50)
    assert coco.scale(0) == 0.5 and coco.resized_size(0) == (20, 50)
    image, target = coco[0]
    np.testing.assert_array_equal(target["masks"][0], rect_mask(50, 50, 10, 5, 30, 15))
    np.testing.assert_array_equal(target["boxes"], [[10, 5, 30, 15]])
    np.testing.assert_allclose(image[:, 6:14, 11:29].reshape(3, -1).mean(1),
                               np.array([200, 100, 50]) / 255, atol=1e-6)
    assert np.all(image[:, 20:] == 0)                    # padding, bottom
    # bilinear downscaling (antialiased) blurs across the edge by a pixel
    assert np.all(image[:, :4] == 0) and np.all(image[:, :, :9] == 0)


def test_upscaled_rectangle_lands_where_expected(tmp_path):
    # 10 wide x 20 high, S = 40: s = 2, content 40 x 20, padded on the right
    path, images = write_coco(tmp_path, [(3, "tall.png", rgb_image(20, 10), (20, 10))],
                              [ann(1, 3, rect_polygon(2, 1, 6, 5))])
    coco = CocoDataset(path, images, image_size=40)
    image, target = coco[0]
    assert coco.scale(0) == 2.0 and coco.resized_size(0) == (40, 20)
    np.testing.assert_array_equal(target["masks"][0], rect_mask(40, 40, 4, 2, 12, 10))
    np.testing.assert_array_equal(target["boxes"], [[4, 2, 12, 10]])
    assert np.all(image[:, :, 20:] == 0) and image[:, :, :20].max() > 0


def _covered_fraction(lo, hi, n, step):
    """Share of each of n target pixels (pixel k spans [k step, (k+1) step)
    in the original) that the interval [lo, hi) covers."""
    starts = np.arange(n) * step
    return np.clip(np.minimum(starts + step, hi) - np.maximum(starts, lo), 0, None) / step


@settings(max_examples=15)
@given(H=st.integers(6, 60), W=st.integers(6, 60), S=st.sampled_from([16, 24, 32]),
       data=st.data())
def test_rectangle_mask_is_the_half_covered_pixels(tmp_path_factory, H, W, S, data):
    """Any image size, any rectangle: a model pixel is in the resized mask
    exactly when the rectangle covers at least half of its area (computed
    here from interval overlaps), the mask stays in the content area, and
    the box is the scaled rectangle to within a pixel."""
    x1 = data.draw(st.integers(0, W - 4))
    x2 = data.draw(st.integers(x1 + 3, W))
    y1 = data.draw(st.integers(0, H - 4))
    y2 = data.draw(st.integers(y1 + 3, H))
    tmp = tmp_path_factory.mktemp("geo")
    path, images = write_coco(tmp, [(1, "x.png", rgb_image(H, W), (H, W))],
                              [ann(1, 1, rect_polygon(x1, y1, x2, y2))])
    coco = CocoDataset(path, images, image_size=S)
    s = S / max(H, W)
    assert coco.scale(0) == pytest.approx(s)
    h, w = coco.resized_size(0)
    assert max(h, w) == S and abs(h - H * s) <= 0.5 and abs(w - W * s) <= 0.5
    # the content is resized to exactly (h, w): per-axis steps H/h and W/w
    cover = np.outer(_covered_fraction(y1, y2, h, H / h), _covered_fraction(x1, x2, w, W / w))
    clear = np.abs(cover - 0.5) > 1e-6          # shares of exactly 1/2: round-off decides
    _, target = coco[0]
    if len(target["boxes"]) == 0:
        assert cover.max() < 0.5 + 1e-4
        return
    m = target["masks"][0]
    assert not m[h:].any() and not m[:, w:].any()
    np.testing.assert_array_equal(m[:h, :w][clear], (cover >= 0.5)[clear])
    np.testing.assert_allclose(target["boxes"][0], np.array([x1, y1, x2, y2]) * s, atol=1.0)


# ---------------------------------------------------------------- formats


def test_polygon_and_both_rle_encodings_agree(tmp_path):
    H, W = 13, 17                                       # odd sizes
    truth = rect_mask(H, W, 3, 2, 11, 9) | rect_mask(H, W, 12, 10, 16, 13)
    poly = rect_polygon(3, 2, 11, 9) + rect_polygon(12, 10, 16, 13)   # two parts
    compressed = mask_to_rle(truth)
    assert isinstance(compressed["counts"], str)
    path, images = write_coco(
        tmp_path, [(1, "a.png", rgb_image(H, W), (H, W))],
        [ann(1, 1, poly), ann(2, 1, uncompressed_rle(truth)), ann(3, 1, compressed)])
    _, target = CocoDataset(path, images, image_size=W)[0]
    assert target["masks"].shape == (3, W, W)
    for m in target["masks"]:
        np.testing.assert_array_equal(m[:H], truth)
        assert not m[H:].any()
    np.testing.assert_array_equal(target["boxes"], [[3, 2, 16, 13]] * 3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_become_rgb(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    if mode == "L":
        grey = rgb[:, :, 0]
        pil, expected = Image.fromarray(grey, mode="L"), np.repeat(grey[:, :, None], 3, 2)
    elif mode == "RGBA":
        alpha = rng.integers(0, 256, (9, 7, 1), dtype=np.uint8)
        pil, expected = Image.fromarray(np.concatenate([rgb, alpha], 2), mode="RGBA"), rgb
    elif mode == "P":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        index = rng.integers(0, 256, (9, 7), dtype=np.uint8)
        pil = Image.fromarray(index, mode="P")
        pil.putpalette(palette.ravel().tolist())
        expected = palette[index]
    else:
        grey16 = rng.integers(0, 65536, (9, 7), dtype=np.uint16)
        pil = Image.fromarray(grey16)
        assert pil.mode.startswith("I;16")
        grey = np.rint(grey16 / 65535 * 255).astype(np.uint8)
        expected = np.repeat(grey[:, :, None], 3, 2)
    path, images = write_coco(tmp_path, [(1, "m.png", pil, None)], [])
    coco = CocoDataset(path, images, image_size=9)
    assert coco.original_size(0) == (9, 7)              # read from the file header
    image, _ = coco[0]
    assert image.shape == (3, 9, 9) and image.dtype == np.float32
    np.testing.assert_allclose(image[:, :, :7], np.transpose(expected, (2, 0, 1)) / 255,
                               atol=1e-7)
    assert np.all(image[:, :, 7:] == 0)


def test_negative_image_kept_and_crowd_skipped(tmp_path):
    path, images = write_coco(
        tmp_path,
        [(1, "neg.png", rgb_image(12, 12), (12, 12)), (2, "pos.png", rgb_image(12, 12, 1), (12, 12))],
        [ann(1, 2, rect_polygon(1, 1, 5, 5)),
         ann(2, 2, uncompressed_rle(rect_mask(12, 12, 6, 6, 12, 12)), iscrowd=1),
         ann(3, 2, rect_polygon(6, 1, 11, 4), iscrowd=0)])
    coco = CocoDataset(path, images, image_size=12)
    assert len(coco) == 2
    _, neg = coco[0]
    assert neg["boxes"].shape == (0, 4) and neg["labels"].shape == (0,)
    assert neg["masks"].shape == (0, 12, 12)
    assert neg["boxes"].dtype == np.float32 and neg["labels"].dtype == np.int64
    _, pos = coco[1]
    np.testing.assert_array_equal(pos["boxes"], [[1, 1, 5, 5], [6, 1, 11, 4]])
    # the ground truth for evaluation keeps the crowd region, flagged
    gt = coco_ground_truth(coco)
    assert [a["iscrowd"] for a in gt["annotations"]] == [1 * (a["id"] == 2) for a in gt["annotations"]]


def test_categories_ordered_by_id_and_labels_contiguous(tmp_path):
    cats = [{"id": 90, "name": "zebra"}, {"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}]
    path, images = write_coco(
        tmp_path, [(11, "a.png", rgb_image(16, 16), (16, 16))],
        [ann(1, 11, rect_polygon(0, 0, 4, 4), category_id=17),
         ann(2, 11, rect_polygon(5, 5, 9, 9), category_id=90),
         ann(3, 11, rect_polygon(10, 10, 14, 14), category_id=3)], categories=cats)
    coco = CocoDataset(path, images, image_size=16)
    assert coco.category_ids == [3, 17, 90]
    assert coco.class_names == ["cat", "dog", "zebra"] and coco.num_classes == 3
    np.testing.assert_array_equal(coco[0][1]["labels"], [1, 2, 0])
    assert coco.image_id(0) == 11 and coco.file_name(0) == "a.png"
    assert coco.image_path(0) == images / "a.png"
    with pytest.raises(IndexError):
        coco[1]


def test_instance_too_thin_after_resizing_is_dropped(tmp_path):
    # a 1-pixel line in a 200-pixel image at S = 20 covers a tenth of a pixel
    path, images = write_coco(tmp_path, [(1, "a.png", rgb_image(200, 200), (200, 200))],
                              [ann(1, 1, rect_polygon(50, 10, 51, 190)),
                               ann(2, 1, rect_polygon(100, 100, 160, 160))])
    _, target = CocoDataset(path, images, image_size=20)[0]
    np.testing.assert_array_equal(target["boxes"], [[10, 10, 16, 16]])
    assert target["masks"].shape == (1, 20, 20)


def test_ground_truth_fills_missing_fields(tmp_path):
    path, images = write_coco(tmp_path, [(1, "a.png", rgb_image(10, 14), None)],
                              [{"image_id": 1, "category_id": 1,
                                "segmentation": rect_polygon(2, 3, 6, 8)}])
    gt = CocoDataset(path, images, image_size=14).ground_truth()
    (a,) = gt["annotations"]
    assert a["area"] == 20 and a["bbox"] == [2, 3, 4, 5] and a["iscrowd"] == 0 and a["id"] == 1
    assert (gt["images"][0]["height"], gt["images"][0]["width"]) == (10, 14)


# ---------------------------------------------------------------- errors


def _good():
    return {"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
            "annotations": [{"id": 4, "image_id": 1, "category_id": 1,
                             "segmentation": rect_polygon(1, 1, 5, 5), "bbox": [1, 1, 4, 4]}],
            "categories": [{"id": 1, "name": "thing"}]}


def _set(path, value):
    def change(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return d
    return change


A = ("annotations", 0)
BAD_FILES = [
    (_set(("images",), KeyError), r"missing key 'images'"),
    (_set(("annotations",), KeyError), r"missing key 'annotations'"),
    (_set(("categories",), KeyError), r"missing key 'categories'"),
    (_set(("images",), {}), r"'images' must be a list"),
    (_set((*A, "image_id"), 99), r"annotation 0 \(id 4\): field 'image_id' 99 is not the id of any image"),
    (_set((*A, "category_id"), 2), r"annotation 0 \(id 4\): field 'category_id' 2 is not the id of any category"),
    (_set((*A, "bbox"), [1, 1, 4]), r"annotation 0 \(id 4\): field 'bbox' must be 4 numbers"),
    (_set((*A, "bbox"), [1, 1, "4", 4]), r"annotation 0 \(id 4\): field 'bbox' must be 4 numbers"),
    (_set((*A, "bbox"), [1, 1, 0, 4]), r"annotation 0 \(id 4\): field 'bbox' must have positive width and height"),
    (_set((*A, "bbox"), [1, 1, 4, -2]), r"annotation 0 \(id 4\): field 'bbox' must have positive width and height"),
    (_set((*A, "segmentation"), "a blob"), r"annotation 0 \(id 4\): field 'segmentation' must be a polygon list .* or an RLE dict"),
    (_set((*A, "segmentation"), 7), r"field 'segmentation' must be a polygon list"),
    (_set((*A, "segmentation"), [[1, 1, 5, 1]]), r"annotation 0 \(id 4\): field 'segmentation' polygon 0 has 2 points; a polygon needs at least 3"),
    (_set((*A, "segmentation"), [[1, 1, 5, 1, 5]]), r"polygon 0 has an odd count"),
    (_set((*A, "segmentation"), []), r"field 'segmentation' is an empty polygon list"),
    (_set((*A, "segmentation"), {"size": [8, 8]}), r"field 'segmentation' is an RLE without 'size' and 'counts'"),
    (_set((*A, "segmentation"), {"size": [8, 9], "counts": [72]}), r"RLE 'size' \[8, 9\] does not match"),
    (_set((*A, "segmentation"), {"size": [8, 8], "counts": [10, 3]}), r"RLE 'counts' add up to 13"),
    (_set((*A, "segmentation"), KeyError), r"annotation 0 \(id 4\): missing field 'segmentation'"),
    (_set((*A, "image_id"), KeyError), r"annotation 0 \(id 4\): missing field 'image_id'"),
    (_set(("images", 0, "file_name"), KeyError), r"image 0: missing field 'file_name'"),
    (_set(("categories", 0, "name"), KeyError), r"category 0: missing field 'name'"),
    (_set(("categories",), []), r"'categories' is empty"),
    # issue 10: hostile and careless inputs
    (_set((*A, "segmentation"), {"size": [8, 8], "counts": "<SHORT>"}),
     r"annotation 0 \(id 4\): field 'segmentation' RLE 'counts' \(a compressed string\) add up to 16, not height x width = 64"),
    (_set((*A, "segmentation"), {"size": [8, 8], "counts": ""}), r"add up to 0, not"),
    (_set((*A, "segmentation"), {"size": [8, 8], "counts": "zzzz"}),
     r"annotation 0 \(id 4\): field 'segmentation' RLE 'counts' is not a valid compressed RLE string: character 'z'"),
    (_set((*A, "segmentation"), {"size": [8, 8], "counts": "`"}), r"ends in the middle of a count"),
    (_set((*A, "segmentation"), {"size": [100000, 100000], "counts": "0"}), r"over the limit"),
    (_set((*A, "segmentation"), [[1, 1, 5e9, 1, 5, 5e11]]), r"polygon 0 has a coordinate beyond"),
    (_set((*A, "segmentation"), [[1, 1, 50, 1, 5, 5]]), r"polygon 0 reaches x in \[1, 50\].*far outside the 8x8"),
    (_set((*A, "area"), -1), r"annotation 0 \(id 4\): field 'area' must be a number >= 0"),
    (_set((*A, "area"), float("nan")), r"field 'area' must be a number >= 0"),
    (_set((*A, "area"), "16"), r"field 'area' must be a number >= 0"),
    (_set((*A, "area"), 65), r"field 'area' 65 is more than the image's 8 x 8 = 64 pixels"),
    (_set((*A, "bbox"), [1, 1, 40, 4]), r"field 'bbox' \[1, 1, 40, 4\] .* reaches outside the 8x8"),
    (_set((*A, "bbox"), [-5, 1, 4, 4]), r"field 'bbox' .* reaches outside"),
    (_set((*A, "image_id"), [1]), r"annotation 0 \(id 4\): field 'image_id' must be an integer id, got \[1\]"),
    (_set((*A, "category_id"), {}), r"field 'category_id' must be an integer id, got \{\}"),
    (_set(("images",), []), r"'images' is empty"),
    (_set(("images", 0, "height"), 10**8), r"image 0 \(id 1\): height x width = 100000000 x 8 is over"),
]


@pytest.mark.parametrize("change, message", BAD_FILES,
                         ids=[m[:40] for _, m in BAD_FILES])
def test_malformed_file_raises_one_clear_error(tmp_path, change, message):
    path = tmp_path / "bad.json"
    short = mask_to_rle(np.ones((4, 4), bool))["counts"]   # a valid string for 16 pixels
    path.write_text(json.dumps(change(_good())).replace("<SHORT>", short))
    with pytest.raises(ValueError, match=message) as info:
        CocoDataset(path, tmp_path)
    assert "bad.json" in str(info.value)                # names the file


def test_good_file_of_the_error_table_loads(tmp_path):
    """The base of BAD_FILES is valid: each error above comes from its one
    change."""
    path = tmp_path / "good.json"
    path.write_text(json.dumps(_good()))
    rgb_image(8, 8).save(tmp_path / "a.png")
    _, target = CocoDataset(path, tmp_path, image_size=8)[0]
    np.testing.assert_array_equal(target["boxes"], [[1, 1, 5, 5]])


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [}')
    with pytest.raises(ValueError, match=r"broken.json.* is not valid JSON"):
        CocoDataset(path, tmp_path)
    with pytest.raises(ValueError, match=r"nothere.json.* does not exist"):
        CocoDataset(tmp_path / "nothere.json", tmp_path)


def test_missing_and_corrupt_image_files(tmp_path):
    path = tmp_path / "ann.json"
    data = _good()
    data["images"].append({"id": 2, "file_name": "corrupt.png", "height": 8, "width": 8})
    data["images"].append({"id": 3, "file_name": "wrong_size.png", "height": 8, "width": 8})
    path.write_text(json.dumps(data))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rgb_image(9, 8).save(tmp_path / "wrong_size.png")
    coco = CocoDataset(path, tmp_path, image_size=8)     # files are checked when read
    with pytest.raises(ValueError, match=r"image file '.*a.png' \(image id 1\) does not exist"):
        coco[0]
    with pytest.raises(ValueError, match=r"image file '.*corrupt.png' \(image id 2\) cannot be read"):
        coco[1]
    with pytest.raises(ValueError, match=r"wrong_size.png' is 9x8 \(HxW\) but .* says 8x8"):
        coco[2]


def test_bad_image_size_argument(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(_good()))
    for bad in (0, 4, 12.5, True):
        with pytest.raises(ValueError, match="image_size"):
            CocoDataset(path, tmp_path, image_size=bad)


# ---------------------------------------------------------------- issue 10


def test_a_string_rle_that_adds_up_is_read_the_same_every_time(tmp_path):
    mask = rect_mask(8, 8, 1, 2, 6, 7)
    data = _good()
    data["annotations"][0]["segmentation"] = mask_to_rle(mask)
    data["annotations"][0].pop("bbox")
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(data))
    rgb_image(8, 8).save(tmp_path / "a.png")
    coco = CocoDataset(path, tmp_path, image_size=8)
    for _ in range(3):
        np.testing.assert_array_equal(coco[0][1]["masks"][0], mask)


def test_deeply_nested_json_is_one_clear_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match=r"deep.json.* nests too deeply"):
        CocoDataset(path, tmp_path)


def test_far_polygon_is_refused_when_the_size_comes_from_the_file(tmp_path):
    path, images = write_coco(tmp_path, [(1, "a.png", rgb_image(8, 8), None)],
                              [ann(3, 1, [[1, 1, 5, 1, 5, 4e5]])])
    coco = CocoDataset(path, images, image_size=8)     # no height/width in the JSON
    with pytest.raises(ValueError, match=r"ann.json: annotation \(id 3\): field 'segmentation' "
                                         r"polygon 0 reaches .* far outside the 8x8"):
        coco[0]
    with pytest.raises(ValueError, match=r"far outside"):
        coco.ground_truth()


def test_bbox_outside_the_image_is_refused_for_evaluation_too(tmp_path):
    path, images = write_coco(tmp_path, [(1, "a.png", rgb_image(8, 8), None)],
                              [ann(3, 1, rect_polygon(1, 1, 5, 5), bbox=[1, 1, 4, 40])])
    with pytest.raises(ValueError, match=r"annotation \(id 3\): field 'bbox' .* outside"):
        CocoDataset(path, images, image_size=8).ground_truth()


def test_image_over_the_decompression_bomb_limit(tmp_path, monkeypatch):
    from PIL import Image as PILImage
    path, images = write_coco(tmp_path, [(1, "a.png", rgb_image(16, 16), (16, 16))], [])
    coco = CocoDataset(path, images, image_size=16)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)   # 256 pixels > 2 x 100
    with pytest.raises(ValueError, match=r"a.png' \(image id 1\) is too large to read safely"):
        coco[0]


def test_float_tiff_in_0_1_is_not_read_as_black(tmp_path):
    grey = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    (tmp_path / "img").mkdir()
    Image.fromarray(grey, mode="F").save(tmp_path / "img" / "f.tif")
    path, images = write_coco(tmp_path, [(1, "f.tif", None, None)], [])
    image, _ = CocoDataset(path, images, image_size=8)[0]
    np.testing.assert_allclose(image[0], np.rint(grey * 255) / 255, atol=1e-6)
    np.testing.assert_array_equal(image[0], image[2])


def test_float_tiff_with_nan_is_refused(tmp_path):
    grey = np.full((8, 8), np.nan, dtype=np.float32)
    (tmp_path / "img").mkdir()
    Image.fromarray(grey, mode="F").save(tmp_path / "img" / "f.tif")
    path, images = write_coco(tmp_path, [(1, "f.tif", None, None)], [])
    with pytest.raises(ValueError, match=r"f.tif' \(image id 1\) is a floating-point image with NaN"):
        CocoDataset(path, images, image_size=8)[0]
