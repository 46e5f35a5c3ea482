"""IoU, NMS and the box coder."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimask.boxes import (BBOX_XFORM_CLIP, batched_nms, box_area, box_iou, clip_boxes, decode_boxes,
                            encode_boxes, nms, nms_numpy)
from tests.strategies import seeds


def random_boxes(rng, n, size=100.0, min_side=1.0):
    x1, y1 = rng.uniform(0, size, (2, n))
    w, h = rng.uniform(min_side, size / 2, (2, n))
    return np.stack([x1, y1, x1 + w, y1 + h], 1)


def test_iou_hand_computed():
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 2]], float)
    b = np.array([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]], float)
    iou = box_iou(a, b)
    # 5x5 overlap of two 10x10 boxes: 25 / (100 + 100 - 25)
    np.testing.assert_allclose(iou[0], [25 / 175, 1.0, 0.0])
    np.testing.assert_allclose(iou[1], [0.0, 4 / 100, 0.0])


def test_iou_of_zero_area_boxes_is_zero_not_nan():
    a = np.array([[3, 3, 3, 3]], float)
    assert box_iou(a, a)[0, 0] == 0.0


@given(seed=seeds())
def test_iou_is_symmetric_and_bounded(seed):
    rng = np.random.default_rng(seed)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    iou = box_iou(a, b)
    np.testing.assert_allclose(iou, box_iou(b, a).T, rtol=1e-12)
    assert np.all((iou >= 0) & (iou <= 1 + 1e-12))
    np.testing.assert_allclose(np.diag(box_iou(a, a)), 1.0)


@given(seed=seeds(), threshold=st.sampled_from([0.3, 0.5, 0.7]))
def test_nms_properties(seed, threshold):
    rng = np.random.default_rng(seed)
    n = rng.integers(0, 40)
    boxes = random_boxes(rng, n, size=60.0)
    scores = rng.random(n)
    keep = nms(boxes, scores, threshold)
    # sorted by score, no duplicates
    assert np.all(np.diff(scores[keep]) <= 0)
    assert len(set(keep.tolist())) == len(keep)
    # kept boxes overlap each other at most the threshold
    iou = box_iou(boxes[keep], boxes[keep])
    np.fill_diagonal(iou, 0)
    assert np.all(iou <= threshold)
    # every dropped box overlaps a kept box that scores at least as high
    dropped = np.setdiff1d(np.arange(n), keep)
    for d in dropped:
        over = box_iou(boxes[d:d + 1], boxes[keep])[0] > threshold
        assert np.any(over & (scores[keep] >= scores[d]))


@given(seed=seeds(), threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_nms_kernel_matches_the_numpy_reference(seed, threshold, dtype):
    # crowded boxes, copies of boxes and tied scores: the cases where the
    # greedy order and the exact IoU comparison matter
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    boxes = random_boxes(rng, n, size=40.0)
    boxes[rng.random(n) < 0.2] = boxes[0]
    scores = np.round(rng.random(n), 1)
    boxes, scores = boxes.astype(dtype), scores.astype(dtype)
    np.testing.assert_array_equal(nms(boxes, scores, threshold),
                                  nms_numpy(boxes, scores, threshold))


def test_nms_refuses_nan_scores():
    with pytest.raises(ValueError, match="scores"):
        nms(np.array([[0, 0, 1, 1.0]]), np.array([np.nan]), 0.5)


def test_nms_hand_case():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # box 3 (0.95) suppresses 0 (IoU 0.9) and 1 (IoU ~0.64); box 2 is apart.
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


@given(seed=seeds())
def test_batched_nms_never_suppresses_across_classes(seed):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 30, size=40.0)
    scores = rng.random(30)
    labels = rng.integers(0, 3, 30)
    keep = batched_nms(boxes, scores, labels, 0.5)
    assert np.all(np.diff(scores[keep]) <= 0)
    for label in range(3):
        idx = np.flatnonzero(labels == label)
        expected = idx[nms(boxes[idx], scores[idx], 0.5)]
        assert sorted(keep[labels[keep] == label].tolist()) == sorted(expected.tolist())


@given(seed=seeds(), weights=st.sampled_from([(1, 1, 1, 1), (10, 10, 5, 5)]))
def test_encode_decode_round_trip(seed, weights):
    rng = np.random.default_rng(seed)
    anchors, gt = random_boxes(rng, 20), random_boxes(rng, 20)
    deltas = encode_boxes(gt, anchors, weights)
    np.testing.assert_allclose(decode_boxes(deltas, anchors, weights), gt, rtol=1e-10, atol=1e-9)


def test_encode_hand_computed():
    anchor = np.array([[0.0, 0.0, 10.0, 20.0]])   # centre (5, 10), 10 x 20
    gt = np.array([[2.0, 4.0, 22.0, 24.0]])       # centre (12, 14), 20 x 20
    np.testing.assert_allclose(encode_boxes(gt, anchor)[0], [0.7, 0.2, math.log(2), 0.0])


def test_decode_clamps_large_log_sizes():
    anchor = np.array([[0.0, 0.0, 10.0, 10.0]])
    boxes = decode_boxes(np.array([[0.0, 0.0, 50.0, 50.0]]), anchor)
    side = 10 * math.exp(BBOX_XFORM_CLIP)
    np.testing.assert_allclose(boxes[0], [5 - side / 2, 5 - side / 2, 5 + side / 2, 5 + side / 2])
    assert np.all(np.isfinite(boxes))


def test_bad_boxes_are_refused():
    with pytest.raises(ValueError, match=r"a must have shape \(B, 4\)"):
        box_iou(np.zeros((3, 5)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="gt contains a box with zero"):
        encode_boxes(np.array([[0, 0, 0, 5.0]]), np.array([[0, 0, 4, 4.0]]))
    with pytest.raises(ValueError, match="NaN"):
        nms(np.array([[0, 0, np.nan, 1]]), np.array([1.0]), 0.5)
    with pytest.raises(ValueError, match="scores must have shape"):
        nms(np.zeros((2, 4)), np.zeros(3), 0.5)


def test_clip_boxes():
    out = clip_boxes(np.array([[-5.0, 3.0, 120.0, 90.0]]), height=80, width=100)
    np.testing.assert_array_equal(out, [[0, 3, 100, 80]])


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.float16])
def test_box_area_of_narrow_types_does_not_overflow(dtype):
    # issue 11: int8 [[0, 0, 100, 100]] gave 16 (10000 mod 256)
    boxes = np.array([[0, 0, 100, 100], [10, 20, 60, 120]], dtype=dtype)
    np.testing.assert_array_equal(box_area(boxes), [10_000, 5_000])
