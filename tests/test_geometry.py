"""Box post-processing against hand-worked cases of the reference's rules."""

import pytest

from engine.geometry import ENLARGE_PX, plan_crop


def test_interior_box_is_squared_enlarged_and_truncated():
    # 100x40 box centred at (200, 150) in 640x480: square side 100 -> (150, 100, 250, 200),
    # +25 px each side -> (125, 75, 275, 225).
    plan = plan_crop((150, 130, 250, 170), 640, 480)
    assert plan.outcome == "ok"
    assert plan.rect == (125, 75, 275, 225)


def test_fractional_coordinates_truncate_after_enlarging():
    plan = plan_crop((100.7, 100.2, 150.9, 150.4), 640, 480)
    # side 50.2, centre (125.8, 125.3): (100.7, 100.2, 150.9, 150.4) -> enlarged (75.7, 75.2, 175.9, 175.4)
    assert plan.rect == (75, 75, 175, 175)


def test_reversed_coordinates_are_the_same_region():
    assert plan_crop((250, 170, 150, 130), 640, 480) == plan_crop((150, 130, 250, 170), 640, 480)


def test_border_box_is_clipped_before_and_after_enlarging():
    # Square about the centre (20, 20) with side 40 is (0, 0, 40, 40); enlarged -> (-25, -25, 65, 65) -> clipped.
    plan = plan_crop((0, 10, 40, 30), 640, 480)
    assert plan.rect == (0, 0, 65, 65)


def test_box_at_far_corner_clips_to_last_pixel():
    plan = plan_crop((600, 440, 640, 480), 640, 480)
    # square (600, 440, 640, 480) -> clip (600, 440, 639, 479) -> enlarge (575, 415, 664, 504) -> clip
    assert plan.rect == (575, 415, 639, 479)


def test_zero_size_box_becomes_a_50px_crop():
    plan = plan_crop((320, 240, 320, 240), 640, 480)
    assert plan.outcome == "degenerate"
    assert plan.rect == (320 - ENLARGE_PX, 240 - ENLARGE_PX, 320 + ENLARGE_PX, 240 + ENLARGE_PX)


def test_box_partly_outside_is_clipped():
    plan = plan_crop((-100, -50, 100, 50), 640, 480)
    # centre (0, 0), side 200 -> (-100, -100, 100, 100) -> clip (0, 0, 100, 100) -> enlarge+clip (0, 0, 125, 125)
    assert plan.outcome == "ok"
    assert plan.rect == (0, 0, 125, 125)


def test_zero_width_box_on_the_right_edge_still_crops():
    # [1.00, 0.33, 1.00, 0.64] on 400x300: x1 = x2 = 400, the image's right edge.
    plan = plan_crop((400, 99, 400, 192), 400, 300)
    assert plan.outcome == "degenerate"
    # side 93 about (400, 145.5) -> (353.5, 99, 446.5, 192) -> clip (353.5, 99, 399, 192) -> enlarge, clip
    assert plan.rect == (328, 74, 399, 217)


@pytest.mark.parametrize("box", [(700, 10, 800, 50), (-80, -80, -10, -10), (10, 500, 50, 600)])
def test_box_wholly_outside_gives_no_crop(box):
    plan = plan_crop(box, 640, 480)
    assert plan.outcome == "outside"
    assert plan.rect is None and not plan.usable


def test_tiny_image_one_pixel_wide_has_no_usable_crop():
    plan = plan_crop((0, 0, 1, 1), 1, 1)
    assert plan.outcome == "empty" and not plan.usable


def test_tiny_image_crop_is_the_whole_image():
    assert plan_crop((2, 2, 4, 4), 8, 8).rect == (0, 0, 7, 7)


def test_huge_image_huge_box_is_the_image_less_the_last_row_and_column():
    w, h = 20000, 15000
    plan = plan_crop((0, 0, w, h), w, h)
    # square side 20000 about (10000, 7500) -> clipped to the image -> rows/cols up to w-1, h-1 (exclusive)
    assert plan.rect == (0, 0, w - 1, h - 1)


def test_non_positive_image_size_is_rejected():
    with pytest.raises(ValueError):
        plan_crop((0, 0, 1, 1), 0, 10)
