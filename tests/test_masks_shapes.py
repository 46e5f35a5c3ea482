"""Masks and synthetic bars: values computed independently of the code
under test (areas of rectangles, boxes of known masks, a polygon test for
pixel membership), properties, and refusals of bad input."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimask.data import rotated_bar_mask, thin_bars_image
from minimask.masks import background_fraction, box_mask, box_of_mask

# ---------------------------------------------------------------- rotated bars


@given(length=st.integers(1, 20), thickness=st.integers(1, 6),
       x0=st.integers(0, 10), y0=st.integers(0, 10), angle=st.sampled_from([0.0, 180.0]))
def test_axis_aligned_bar_area_is_length_times_thickness(length, thickness, x0, y0, angle):
    # edges on pixel boundaries: every pixel is wholly in or wholly out
    center = (x0 + length / 2, y0 + thickness / 2)
    mask = rotated_bar_mask(32, 32, center, length, thickness, angle)
    assert mask.sum() == length * thickness
    expected = np.zeros((32, 32), bool)
    expected[y0:y0 + thickness, x0:x0 + length] = True
    np.testing.assert_array_equal(mask, expected)


@given(length=st.integers(1, 20), thickness=st.integers(1, 6),
       x0=st.integers(0, 10), y0=st.integers(0, 10), angle=st.sampled_from([90.0, -90.0, 270.0]))
def test_vertical_bar_swaps_the_extents(length, thickness, x0, y0, angle):
    center = (x0 + thickness / 2, y0 + length / 2)
    mask = rotated_bar_mask(32, 32, center, length, thickness, angle)
    expected = np.zeros((32, 32), bool)
    expected[y0:y0 + length, x0:x0 + thickness] = True
    np.testing.assert_array_equal(mask, expected)


def _inside_polygon(px, py, corners):
    """Pixel centres strictly inside a convex polygon (corners in order),
    and those within 1e-9 of an edge (ambiguous, left out of the check)."""
    signs, near = [], np.zeros(px.shape, bool)
    for k in range(4):
        (ax, ay), (bx, by) = corners[k], corners[(k + 1) % 4]
        cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        edge = np.hypot(bx - ax, by - ay)
        near |= np.abs(cross) / edge < 1e-9
        signs.append(cross)
    signs = np.stack(signs)
    inside = np.all(signs > 0, axis=0) | np.all(signs < 0, axis=0)
    return inside, near


@given(cx=st.floats(8, 24), cy=st.floats(8, 24), length=st.floats(1, 20),
       thickness=st.floats(0.5, 6), angle=st.floats(-360, 360))
def test_rotated_bar_matches_a_polygon_test(cx, cy, length, thickness, angle):
    # the rectangle's corners, built from the on-screen direction of the axis
    a = np.deg2rad(angle)
    along = np.array([np.cos(a), -np.sin(a)]) * length / 2
    across = np.array([np.sin(a), np.cos(a)]) * thickness / 2
    c = np.array([cx, cy])
    corners = [c + along + across, c - along + across, c - along - across, c + along - across]
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    inside, near = _inside_polygon(xs, ys, corners)
    mask = rotated_bar_mask(32, 32, (cx, cy), length, thickness, angle)
    assert mask.shape == (32, 32) and mask.dtype == bool
    np.testing.assert_array_equal(mask[~near], inside[~near])


def test_bar_at_45_degrees_box_background_is_near_one_minus_area_ratio():
    length, thickness = 60.0, 4.0
    mask = rotated_bar_mask(96, 96, (48.0, 48.0), length, thickness, 45.0)
    # the rotated rectangle's bounding square has side (L + T) / sqrt(2)
    box_area = (length + thickness) ** 2 / 2
    expected = 1 - length * thickness / box_area        # 0.883
    fraction = background_fraction(mask, box_of_mask(mask))
    # pixelisation moves area and box by about a pixel row each
    assert abs(fraction - expected) < 0.02, (fraction, expected)
    # At 45 degrees the pixel-centre lattice aliases against a 4-px bar (212
    # pixels here, not 240), but averaged over sub-pixel shifts of the centre
    # the pixel count is an unbiased estimate of the area.
    # (pixel counts spread over about 212..255, so the mean of 200 shifts has
    # a standard error near 1.5 pixels; 2 % of the area is 4.8)
    shifts = np.random.default_rng(0).random((200, 2))
    areas = [rotated_bar_mask(96, 96, (48.0 + ox, 48.0 + oy), length, thickness, 45.0).sum()
             for ox, oy in shifts]
    assert abs(np.mean(areas) - length * thickness) < 0.02 * length * thickness, np.mean(areas)


def test_background_fraction_grows_with_the_angle_up_to_45():
    fractions = []
    for angle in [0.0, 10.0, 20.0, 30.0, 45.0]:
        mask = rotated_bar_mask(96, 96, (48.0, 48.0), 60.0, 4.0, angle)
        fractions.append(background_fraction(mask, box_of_mask(mask)))
    assert fractions[0] == 0.0
    assert all(b > a for a, b in zip(fractions, fractions[1:])), fractions


# ------------------------------------------------------- boxes and fractions


def test_box_of_known_rectangle():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:8] = True          # rows 2..4, columns 3..7
    np.testing.assert_array_equal(box_of_mask(mask), [3.0, 2.0, 8.0, 5.0])
    assert box_of_mask(mask).dtype == np.float64


def test_box_of_single_pixel_and_of_scattered_pixels():
    mask = np.zeros((6, 6), np.uint8)
    mask[4, 1] = 1
    np.testing.assert_array_equal(box_of_mask(mask), [1, 4, 2, 5])
    mask[0, 5] = 1
    np.testing.assert_array_equal(box_of_mask(mask), [1, 0, 6, 5])


@given(h=st.integers(1, 12), w=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_box_of_mask_is_tight_and_crops_the_whole_mask(h, w, seed):
    mask = np.random.default_rng(seed).random((h, w)) < 0.3
    mask[h // 2, w // 2] = True
    x1, y1, x2, y2 = box_of_mask(mask).astype(int)
    assert mask[y1:y2, x1:x2].sum() == mask.sum()          # holds every pixel
    assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()  # tight
    assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
    np.testing.assert_array_equal(box_mask((x1, y1, x2, y2), mask.shape)[y1:y2, x1:x2], True)
    assert box_mask((x1, y1, x2, y2), mask.shape).sum() == (x2 - x1) * (y2 - y1)


def test_background_fraction_of_a_full_box_is_zero():
    mask = np.zeros((8, 8), bool)
    mask[1:6, 2:4] = True
    assert background_fraction(mask, box_of_mask(mask)) == 0.0
    assert background_fraction(np.ones((5, 7), bool), (0, 0, 7, 5)) == 0.0


def test_background_fraction_counts_pixels():
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True                       # 4 object pixels
    assert background_fraction(mask, (2, 2, 6, 6)) == pytest.approx(1 - 4 / 16)
    assert background_fraction(mask, (5, 5, 8, 8)) == 1.0
    # a fractional box keeps the pixels whose centre is inside: columns 2..3
    assert background_fraction(mask, (1.6, 2.0, 3.9, 4.0)) == 0.0


def test_box_mask_clips_to_the_image():
    crop = box_mask((-3.0, -3.0, 2.0, 100.0), (4, 5))
    expected = np.zeros((4, 5), bool)
    expected[:, :2] = True
    np.testing.assert_array_equal(crop, expected)


# ------------------------------------------------------------- bars image


def test_thin_bars_image_shapes_and_determinism():
    image, masks = thin_bars_image(3, size=48, num_bars=4)
    assert image.shape == (3, 48, 48) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert len(masks) == 4
    again, masks_again = thin_bars_image(3, size=48, num_bars=4)
    np.testing.assert_array_equal(image, again)
    for a, b in zip(masks, masks_again):
        np.testing.assert_array_equal(a, b)
    other, _ = thin_bars_image(4, size=48, num_bars=4)
    assert not np.array_equal(image, other)


@given(seed=st.integers(0, 2**32 - 1))
def test_thin_bars_masks_are_disjoint_and_brighter_than_background(seed):
    image, masks = thin_bars_image(seed, size=(40, 56))
    assert image.shape == (3, 40, 56)
    assert all(m.shape == (40, 56) and m.dtype == bool for m in masks)
    total = np.sum(masks, axis=0)
    assert total.max() <= 1                      # later bars cover earlier
    objects = total > 0
    assert image[:, objects].mean() > image[:, ~objects].mean() + 0.1


def test_thin_bars_follow_the_given_angles():
    image, masks = thin_bars_image(0, size=64, angles=[0.0, 90.0])
    assert len(masks) == 2
    assert all(m.sum() > 0 for m in masks)
    # a horizontal bar 2-2.6 px thick spans at most 3 rows; a vertical one 3 columns
    x1, y1, x2, y2 = box_of_mask(masks[0])
    assert y2 - y1 <= 3 and x2 - x1 >= 0.45 * 64 - 2
    x1, y1, x2, y2 = box_of_mask(masks[1])
    assert x2 - x1 <= 3


def test_thin_bars_are_thin_and_mostly_background_in_their_box():
    for seed in range(5):
        _, masks = thin_bars_image(seed, size=64, angles=[45.0, 135.0, 30.0])
        for mask in masks:
            assert mask.sum() > 0
            assert background_fraction(mask, box_of_mask(mask)) > 0.5


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, match", [
    (lambda: box_of_mask(np.zeros((3, 3), bool)), "empty"),
    (lambda: box_of_mask(np.zeros((2, 3, 3), bool)), "mask must have 2 dimensions"),
    (lambda: box_of_mask(np.full((3, 3), 0.5)), "mask must be bool"),
    (lambda: background_fraction(np.ones((4, 4), bool), (2, 2, 1, 3)), "x2 > x1"),
    (lambda: background_fraction(np.ones((4, 4), bool), (0, 0, 2)), "box must be 4 numbers"),
    (lambda: background_fraction(np.ones((4, 4), bool), (0, 0, np.nan, 2)), "finite"),
    (lambda: background_fraction(np.ones((4, 4), bool), (10, 10, 12, 12)), "no pixel"),
    (lambda: background_fraction(np.ones(4, bool), (0, 0, 2, 2)), "mask must have 2 dimensions"),
    (lambda: rotated_bar_mask(8, 8, (4, 4), -1.0, 2.0, 0.0), "length"),
    (lambda: rotated_bar_mask(8, 8, (4, 4), 3.0, 0.0, 0.0), "thickness"),
    (lambda: rotated_bar_mask(8, 8, (4,), 3.0, 1.0, 0.0), "center"),
    (lambda: rotated_bar_mask(0, 8, (4, 4), 3.0, 1.0, 0.0), "height and width"),
    (lambda: rotated_bar_mask(8, 8, (4, 4), 3.0, 1.0, np.inf), "angle_deg"),
    (lambda: thin_bars_image(0, size=(4, 64)), "size"),
    (lambda: thin_bars_image(0, size=2.5), "size"),
    (lambda: thin_bars_image(0, num_bars=0), "num_bars"),
    (lambda: thin_bars_image(0, angles=[]), "angles"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------- architecture diagram


def test_draw_architecture_labels_every_part():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minimask.viz import draw_architecture

    fig, ax = plt.subplots()
    try:
        assert draw_architecture(ax) is ax
        texts = " ".join(t.get_text() for t in ax.texts)
        for label in ["C3", "C4", "C5", "P3", "P4", "P5", "P6", "P7", "x4",
                      "KA", "4A", "14x14\nx256", "28x28\nx K", "RoIAlign", "224"]:
            assert label in texts, f"{label!r} not drawn"
        assert len(ax.patches) > 20          # boxes and arrows
        assert not ax.axison
    finally:
        plt.close(fig)
    new_ax = draw_architecture()
    assert new_ax.figure is not fig
    plt.close(new_ax.figure)


# ---------------------------------------------------------------------------
# mask targets and pasting
# ---------------------------------------------------------------------------

from minimask.masks import mask_targets, paste_mask, paste_masks  # noqa: E402


def test_full_box_mask_pastes_to_the_full_box():
    box = np.array([10.0, 20.0, 30.0, 26.0])
    out = paste_masks(np.ones((1, 28, 28)), box[None], 40, 50)[0]
    expected = np.zeros((40, 50), bool)
    expected[20:26, 10:30] = True
    np.testing.assert_array_equal(out, expected)


def test_fractional_box_covers_pixels_whose_centres_are_inside():
    # centres 2.5 .. 7.5 lie in [2.4, 7.5] (edges inclusive), 4.5 .. 8.5 in [3.6, 9.4]
    out = paste_masks(np.ones((1, 28, 28)), np.array([[2.4, 3.6, 7.5, 9.4]]), 12, 12)[0]
    ys, xs = np.nonzero(out)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 7, 4, 8)


@given(seed=st.integers(0, 2**32 - 1))
def test_a_full_mask_pastes_to_exactly_the_box_crop(seed):
    rng = np.random.default_rng(seed)
    x1, y1 = rng.uniform(-5, 30, 2)
    x2, y2 = x1 + rng.uniform(0.5, 20), y1 + rng.uniform(0.5, 20)
    box = np.array([x1, y1, x2, y2])
    out = paste_masks(np.ones((1, 14, 14)), box[None], 32, 40)[0]
    np.testing.assert_array_equal(out, box_mask(box, (32, 40)))


def test_left_half_mask_pastes_to_left_half():
    mask = np.zeros((28, 28))
    mask[:, :14] = 1
    out = paste_masks(mask[None], np.array([[0.0, 0.0, 20.0, 10.0]]), 10, 20)[0]
    assert out[:, :10].all() and not out[:, 10:].any()


def test_paste_interpolates_linearly_inside():
    # a ramp along x stays a ramp once pasted at 2x scale
    mask = np.tile(np.arange(4.0), (4, 1)) / 3
    out = paste_mask(mask, [0, 0, 8, 8], 8, 8)
    # pixel centre j + 0.5 maps to u = (j + 0.5) / 8 * 4 - 0.5, clipped to [0, 3]
    u = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
    np.testing.assert_allclose(out[3], u / 3, rtol=1e-6)


def test_mask_targets_of_a_box_inside_the_object_are_all_ones():
    gt = np.zeros((1, 40, 40), bool)
    gt[0, 5:35, 8:30] = True
    t = mask_targets(gt, np.array([[10.0, 10.0, 25.0, 30.0]]), 28)
    assert t.shape == (1, 28, 28) and np.all(t == 1)
    # a RoI twice the object's width sees it in its left half
    t = mask_targets(gt, np.array([[8.0, 5.0, 52.0, 35.0]]), 28)
    assert np.all(t[0, :, :13] == 1) and np.all(t[0, :, 15:] == 0)


def test_paste_refuses_mismatched_counts():
    with pytest.raises(ValueError, match="one mask per box"):
        paste_masks(np.ones((2, 28, 28)), np.zeros((3, 4)), 10, 10)
