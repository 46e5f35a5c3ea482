"""The RoIPool reference that chapter 3 draws against RoIAlign: its two
roundings, checked on a map whose values name their cells."""
import numpy as np
import pytest

from minimask.viz import roi_pool_reference


def test_roipool_rounds_the_roi_and_widens_the_bins():
    fmap = np.arange(64.0).reshape(8, 8)          # value = 8 * row + col
    # on the map (scale 1/8): x from 1.125 to 6.25 -> cells 1..6, y from 1.625 to 5.25 -> 2..5
    out, cells = roi_pool_reference(fmap, [9.0, 13.0, 50.0, 42.0], 2, spatial_scale=1 / 8)
    # 6 columns in 2 bins of 3, 4 rows in 2 bins of 2
    assert cells == {(0, 0): (2, 4, 1, 4), (0, 1): (2, 4, 4, 7),
                     (1, 0): (4, 6, 1, 4), (1, 1): (4, 6, 4, 7)}
    # the largest value of a bin is its bottom-right cell
    np.testing.assert_array_equal(out, [[8 * 3 + 3, 8 * 3 + 6], [8 * 5 + 3, 8 * 5 + 6]])


def test_roipool_bins_of_fractional_size_overlap_and_a_shift_below_half_a_cell_changes_nothing():
    fmap = np.tile(np.arange(16.0), (16, 1))      # F[y, x] = x
    # 7 cells wide (end inclusive: 2..9 -> 8 cells) in 3 bins: 8/3 cells each, widened to whole cells
    out, cells = roi_pool_reference(fmap, [2.0, 3.0, 9.0, 10.0], (1, 3))
    assert [cells[(0, j)][2:] for j in range(3)] == [(2, 5), (4, 8), (7, 10)]
    np.testing.assert_array_equal(out, [[4.0, 7.0, 9.0]])
    shifted, _ = roi_pool_reference(fmap, [2.49, 3.0, 9.49, 10.0], (1, 3))
    np.testing.assert_array_equal(shifted, out)


def test_roipool_outside_bins_are_zero_and_bad_input_is_refused():
    out, cells = roi_pool_reference(np.ones((4, 4)), [20.0, 20.0, 30.0, 30.0], 2)
    assert np.all(out == 0.0)
    with pytest.raises(ValueError, match="one channel"):
        roi_pool_reference(np.ones((2, 4, 4)), [0, 0, 2, 2], 2)
