"""eq. (1): the FPN level a RoI is read from."""
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from minimask.anchors import fpn_level


def squares(sides, x0=10.0, y0=-3.0):
    """Boxes of the given side lengths (sqrt(area) = side)."""
    sides = np.asarray(sides, dtype=np.float64)
    return np.stack([np.full_like(sides, x0), np.full_like(sides, y0),
                     x0 + sides, y0 + sides], axis=1)


def test_canonical_sizes_land_on_their_levels():
    # sqrt(area) = 112, 224, 448: log2 = -1, 0, 1 exactly -> k0 - 1, k0, k0 + 1
    k = fpn_level(squares([112, 224, 448]), k_min=2, k_max=6)
    np.testing.assert_array_equal(k, [3, 4, 5])
    assert k.dtype == np.int64 and k.shape == (3,)


def test_just_below_a_boundary_goes_one_level_down():
    # 1e-3 px below 112 / 224 / 448 is below the 1e-6 slack (224e-6 px at 224)
    k = fpn_level(squares([112 - 1e-3, 224 - 1e-3, 448 - 1e-3]), k_min=2, k_max=6)
    np.testing.assert_array_equal(k, [2, 3, 4])
    # ... while a side within the slack (1e-6 relative) stays on the level
    k = fpn_level(squares([224 * (1 - 1e-7), 224 * (1 - 1e-7) / 2]), k_min=2, k_max=6)
    np.testing.assert_array_equal(k, [4, 3])


def test_rectangles_use_the_geometric_mean_side():
    # 112 x 448 has sqrt(area) = 224: level 4, like a 224 x 224 square
    boxes = np.array([[0.0, 0.0, 112.0, 448.0], [5.0, 5.0, 5.0 + 448.0, 5.0 + 112.0]])
    np.testing.assert_array_equal(fpn_level(boxes), [4, 4])


def test_levels_are_clamped():
    k = fpn_level(squares([1.0, 20.0, 111.0, 900.0, 5000.0]))
    np.testing.assert_array_equal(k, [3, 3, 3, 5, 5])
    k = fpn_level(squares([1.0, 5000.0]), k0=5, k_min=3, k_max=7)
    np.testing.assert_array_equal(k, [3, 7])


def test_other_canonical_size_and_k0():
    k = fpn_level(squares([64.0, 128.0, 127.0]), k0=2, canonical_size=64, k_min=0, k_max=9)
    np.testing.assert_array_equal(k, [2, 3, 2])


@given(side=st.floats(0.5, 5000.0), k0=st.integers(2, 6))
def test_matches_the_equation(side, k0):
    value = k0 + math.log2(side / 224 + 1e-6)
    # a value within round-off of an integer may floor either way
    assume(abs(value - round(value)) > 1e-9)
    expected = math.floor(value)
    expected = min(max(expected, 2), 7)
    assert fpn_level(squares([side]), k0=k0, k_min=2, k_max=7)[0] == expected


def test_integer_boxes_and_empty_input():
    np.testing.assert_array_equal(fpn_level(np.array([[0, 0, 224, 224]])), [4])
    k = fpn_level(np.zeros((0, 4)))
    assert k.shape == (0,) and k.dtype == np.int64


@pytest.mark.parametrize("boxes,match", [
    (np.zeros((3,)), "boxes must have shape \\(B, 4\\)"),
    (np.zeros((2, 5)), "boxes must have shape \\(B, 4\\)"),
    (np.array([[0.0, 0.0, 0.0, 10.0]]), "positive width and height"),   # zero width
    (np.array([[0.0, 5.0, 10.0, 5.0]]), "positive width and height"),   # zero height
    (np.array([[3.0, 0.0, 1.0, 10.0]]), "positive width and height"),   # negative width
    (np.array([[0.0, 0.0, np.inf, 10.0]]), "NaN or infinite"),
    (np.array([["a", "b", "c", "d"]]), "real numbers"),
])
def test_bad_boxes_raise(boxes, match):
    with pytest.raises(ValueError, match=match):
        fpn_level(boxes)


def test_bad_level_range_raises():
    with pytest.raises(ValueError, match="k_min must be <= k_max"):
        fpn_level(squares([224.0]), k_min=5, k_max=3)
