"""The low-quality matching threshold (config.low_quality_iou, RetinaMask
ablates 0.0-0.4): an object's claim on its best anchor(s) counts only when
that best IoU is at least the threshold (and above 0, as before).

* hand-made cases: an object whose best anchor IoU is 0.3 claims it at 0.2
  and 0.3, not at 0.4; objects above pos_iou are untouched by it;
* at 0.0 the rule is today's (the peers' rule, tests/test_anchors.py) on
  random crowded scenes, and at other thresholds it equals that rule with
  the weak claims dropped, written as loops;
* RetinaMask.loss passes config.low_quality_iou to match_anchors;
* the config field: its rule, and old configs without it load with 0.0.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimask.anchors import IGNORED, NEGATIVE, level_anchors, match_anchors
from minimask.boxes import box_iou
from minimask.model import Config, RetinaMask
from tests.test_anchors import _peers_matching, random_crowded_scene
from tests.test_model import micro_config


def test_an_object_with_best_iou_0_3_claims_its_anchor_only_below_the_threshold():
    # anchor 10 x 10, object 10 x 3 inside it: IoU 30 / 100 = 0.3 exactly
    anchors = np.array([[0, 0, 10, 10.0], [50, 50, 60, 60.0]])
    gt = np.array([[0, 0, 10, 3.0]])
    assert box_iou(gt, anchors)[0, 0] == 0.3
    assert match_anchors(anchors, gt, low_quality=False).tolist() == [NEGATIVE, NEGATIVE]
    assert match_anchors(anchors, gt).tolist() == [0, NEGATIVE]                     # today: 0.0
    assert match_anchors(anchors, gt, low_quality_iou=0.2).tolist() == [0, NEGATIVE]
    assert match_anchors(anchors, gt, low_quality_iou=0.3).tolist() == [0, NEGATIVE]  # >= counts
    assert match_anchors(anchors, gt, low_quality_iou=0.4).tolist() == [NEGATIVE, NEGATIVE]
    # a claim refused leaves the anchor's own label: ignored between the thresholds
    gt = np.array([[0, 0, 10, 4.5]])                                            # IoU 0.45
    assert match_anchors(anchors, gt, low_quality_iou=0.46).tolist() == [IGNORED, NEGATIVE]
    assert match_anchors(anchors, gt, low_quality_iou=0.45).tolist() == [0, NEGATIVE]


def test_the_threshold_drops_only_the_weak_claims():
    # object 0 overlaps anchor 0 at 0.6 (a positive by pos_iou), object 1
    # overlaps anchor 1 at 0.3 (only its best-anchor claim makes it positive)
    anchors = np.array([[0, 0, 10, 10.0], [20, 0, 30, 10.0], [60, 60, 70, 70.0]])
    gt = np.array([[0, 0, 10, 6.0], [20, 0, 30, 3.0]])
    assert match_anchors(anchors, gt, low_quality_iou=0.0).tolist() == [0, 1, NEGATIVE]
    assert match_anchors(anchors, gt, low_quality_iou=0.4).tolist() == [0, NEGATIVE, NEGATIVE]
    assert match_anchors(anchors, gt, low_quality_iou=1.0).tolist() == [0, NEGATIVE, NEGATIVE]
    # and still never takes an anchor from an object with a higher IoU
    anchors = np.array([[0, 0, 10, 10.0]])
    gt = np.array([[0, 0, 10, 10.0], [0, 0, 10, 9.0]])
    for t in (0.0, 0.5, 0.95):
        assert match_anchors(anchors, gt, low_quality_iou=t).tolist() == [0]


@given(st.integers(0, 10_000))
def test_threshold_zero_is_todays_rule_on_random_scenes(seed):
    anchors, gt = random_crowded_scene(seed)
    m = match_anchors(anchors, gt, low_quality_iou=0.0)
    np.testing.assert_array_equal(m, match_anchors(anchors, gt))
    np.testing.assert_array_equal(m, _peers_matching(anchors, gt))


@given(st.integers(0, 10_000), st.sampled_from([0.1, 0.2, 0.3, 0.4]))
def test_a_threshold_equals_the_loop_reference_on_random_scenes(seed, t):
    anchors, gt = random_crowded_scene(seed)
    m = match_anchors(anchors, gt, low_quality_iou=t)
    np.testing.assert_array_equal(m, _peers_matching(anchors, gt, low_quality_iou=t))
    # a higher threshold never makes more positives
    assert np.count_nonzero(m >= 0) <= np.count_nonzero(match_anchors(anchors, gt) >= 0)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.3", None])
def test_match_anchors_refuses_a_bad_threshold(bad):
    with pytest.raises(ValueError, match=r"low_quality_iou must be a number in \[0, 1\]"):
        match_anchors(np.array([[0, 0, 10, 10.0]]), np.array([[0, 0, 10, 3.0]]),
                      low_quality_iou=bad)


def test_the_loss_uses_the_configs_threshold():
    """A 4 x 4 object on 64 px: its best anchor (8 x 8 at the finest level)
    overlaps it at IoU 16 / 64 = 0.25 at most, so only its best-anchor claim
    makes it a positive - kept at 0.2, refused at 0.3."""
    size = 64
    image = np.random.default_rng(0).uniform(0, 0.2, (1, 3, size, size))
    masks = np.zeros((1, size, size), bool)
    masks[0, 20:24, 20:24] = True
    target = [{"boxes": np.array([[20, 20, 24, 24.0]]), "labels": np.array([0]), "masks": masks}]
    counts = {}
    for t in (0.0, 0.2, 0.3):
        model = RetinaMask(micro_config(low_quality_iou=t, mask_rois_from_detections=False))
        assert model.config.low_quality_iou == t
        counts[t] = model.loss(image, target)["num_pos"]
    assert counts[0.0] == counts[0.2] > 0
    assert counts[0.3] == 0


def test_config_field_rule_and_old_configs():
    assert Config().low_quality_iou == 0.0
    assert Config.preset("tiny").low_quality_iou == 0.0
    assert Config.preset("tiny", low_quality_iou=0.4).low_quality_iou == 0.4
    for bad in (-0.1, 1.2, True, "0.2", float("inf")):
        with pytest.raises(ValueError, match=r"'low_quality_iou' must be a number in \[0, 1\]"):
            Config.preset("tiny", low_quality_iou=bad)
    # a checkpoint's config from before the field: loads with the default
    old = Config.preset("tiny").to_dict()
    del old["low_quality_iou"]
    assert Config.from_dict(old) == Config.preset("tiny")
    new = Config.preset("tiny", low_quality_iou=0.3)
    assert Config.from_dict(new.to_dict()) == new
