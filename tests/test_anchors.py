"""Anchor generation, the head-output layout, and matching."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimask.anchors import (IGNORED, NEGATIVE, anchor_shapes, flatten_head_output,
                              generate_anchors, level_anchors, match_anchors, unflatten_head_grad)


def test_anchor_shapes_have_the_right_areas_and_ratios():
    wh = anchor_shapes(32)
    assert wh.shape == (9, 2)
    areas = wh[:, 0] * wh[:, 1]
    expected = [(32 * s) ** 2 for _ in range(3) for s in (1, 2 ** (1 / 3), 2 ** (2 / 3))]
    np.testing.assert_allclose(areas, expected, rtol=1e-12)
    np.testing.assert_allclose(wh[:, 1] / wh[:, 0], np.repeat([0.5, 1.0, 2.0], 3), rtol=1e-12)


def test_anchor_count_and_placement():
    anchors = level_anchors(3, 4, stride=8, size=32)
    assert anchors.shape == (3 * 4 * 9, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    # location (i, j) = (1, 2) is rows (1 * 4 + 2) * 9 ... + 8, centred at (2.5 * 8, 1.5 * 8)
    block = centres[(1 * 4 + 2) * 9:(1 * 4 + 2) * 9 + 9]
    np.testing.assert_allclose(block, np.tile([20.0, 12.0], (9, 1)))
    # the square anchor of scale 1 is exactly size x size
    sq = anchors[3]  # ratio 1, scale 1 at location (0, 0)
    np.testing.assert_allclose(sq, [4 - 16, 4 - 16, 4 + 16, 4 + 16])


def test_generate_anchors_totals_over_levels():
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    levels = generate_anchors(shapes, (8, 16, 32, 64, 128), (32, 64, 128, 256, 512))
    assert [len(a) for a in levels] == [9 * h * w for h, w in shapes]


def test_flatten_head_output_matches_anchor_order_and_round_trips(rng):
    N, A, K, H, W = 2, 9, 3, 4, 5
    out = rng.standard_normal((N, A * K, H, W))
    flat = flatten_head_output(out, K)
    assert flat.shape == (N, H * W * A, K)
    n, i, j, a, k = 1, 2, 3, 7, 1
    assert flat[n, (i * W + j) * A + a, k] == out[n, a * K + k, i, j]
    np.testing.assert_array_equal(unflatten_head_grad(flat, out.shape), out)


def test_matching_thresholds():
    anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 8.5], [0, 0, 10, 4.5], [50, 50, 60, 60.0]])
    gt = np.array([[0, 0, 10, 10.0]])
    m = match_anchors(anchors, gt, low_quality=False)
    # IoU 1.0 -> positive, 0.85 -> positive, 0.45 -> ignored, 0 -> negative
    assert m.tolist() == [0, 0, IGNORED, NEGATIVE]


def test_no_ground_truth_makes_every_anchor_negative():
    anchors = level_anchors(2, 2, 8, 32)
    assert np.all(match_anchors(anchors, np.zeros((0, 4))) == NEGATIVE)


def test_tiny_ground_truth_still_gets_its_best_anchor():
    anchors = level_anchors(8, 8, stride=8, size=32)
    gt = np.array([[30.0, 30.0, 33.0, 33.0]])  # 3x3 px: IoU with any anchor < 0.01
    m_strict = match_anchors(anchors, gt, low_quality=False)
    assert not np.any(m_strict >= 0)
    m = match_anchors(anchors, gt)
    from minimask.boxes import box_iou
    iou = box_iou(gt, anchors)[0]
    assert np.any(m == 0)
    assert np.all(iou[m == 0] == iou.max())


def test_matching_picks_the_best_ground_truth():
    anchors = np.array([[0, 0, 10, 10.0]])
    gt = np.array([[0, 0, 10, 9.0], [0, 0, 10, 10.0]])
    assert match_anchors(anchors, gt).tolist() == [1]


# --------------------------------------------------------------------------
# Low-quality matches must never take an anchor from a better object
# (issue 11): the rule of torchvision's Matcher and detectron2's Matcher.
# --------------------------------------------------------------------------

def _peers_matching(anchors, gt, pos_iou=0.5, neg_iou=0.4, low_quality_iou=0.0):
    """torchvision / detectron2's rule, written as loops over anchors:
    each anchor takes the object it overlaps most; below neg_iou it is
    negative, between the thresholds ignored; an anchor that is the best
    of some object (ties included, IoU > 0, and at least low_quality_iou:
    RetinaMask's floor on those claims) is a positive of the object it
    overlaps most."""
    from minimask.boxes import box_iou
    iou = box_iou(np.asarray(gt, float), np.asarray(anchors, float))
    G, A = iou.shape
    out = []
    for a in range(A):
        g_best = int(np.argmax(iou[:, a]))
        v = iou[g_best, a]
        label = g_best if v >= pos_iou else (IGNORED if v >= neg_iou else NEGATIVE)
        for g in range(G):
            best = iou[g].max()
            if best > 0 and best >= low_quality_iou and iou[g, a] == best:
                label = g_best
        out.append(label)
    return np.array(out)


def test_low_quality_claim_keeps_the_anchor_with_the_higher_iou():
    # the minimal case: object 1's best anchor is object 0's perfect match
    anchors = np.array([[0, 0, 10, 10.0]])
    gt = np.array([[0, 0, 10, 10.0], [0, 0, 10, 9.0]])
    assert match_anchors(anchors, gt).tolist() == [0]


def test_low_quality_claim_below_threshold_goes_to_the_best_object():
    # object 1 (a thin bar) has its best anchor at IoU 0.3 < 0.4, and that
    # anchor overlaps object 0 at 0.45: the anchor is re-admitted as a
    # positive, but of object 0
    anchors = np.array([[0, 0, 10, 10.0], [100, 100, 110, 110.0]])
    gt = np.array([[0, 0, 10, 4.5], [0, 7, 10, 10.0]])
    m = match_anchors(anchors, gt)
    assert m.tolist() == [0, NEGATIVE]
    np.testing.assert_array_equal(m, _peers_matching(anchors, gt))


def random_crowded_scene(seed):
    """(anchors, gt boxes) of one random scene: up to 7 boxes, some long and
    thin, and every third seed two identical boxes - duplicate boxes and boxes
    sharing an anchor exactly are the hard cases of matching."""
    rng = np.random.default_rng(seed)
    anchors = level_anchors(6, 6, stride=8, size=16)
    G = int(rng.integers(1, 8))
    xy = rng.uniform(0, 40, (G, 2))
    wh = rng.uniform(2, 30, (G, 2)) * rng.choice([0.2, 1.0, 5.0], (G, 1)) ** [1, -1]
    gt = np.concatenate([xy, xy + np.clip(wh, 1, 60)], 1)
    if G > 1 and seed % 3 == 0:
        gt[1] = gt[0]
    return anchors, gt


@given(st.integers(0, 10_000))
def test_matching_equals_the_peers_rule_on_random_crowded_scenes(seed):
    anchors, gt = random_crowded_scene(seed)
    np.testing.assert_array_equal(match_anchors(anchors, gt), _peers_matching(anchors, gt))


def test_generate_anchors_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError, match="one entry per level"):
        generate_anchors([(8, 8)], (8,), (32, 64))
    with pytest.raises(ValueError, match="one entry per level"):
        generate_anchors([(8, 8), (4, 4)], (8, 16), (32,))
    with pytest.raises(ValueError, match=r"feature_shapes\[0\]"):
        generate_anchors([(8,)], (8,), (32,))
