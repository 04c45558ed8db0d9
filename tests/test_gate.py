"""The zoom gate of mode auto (engine/gate.py): pure functions, no model."""

import math

import pytest

from engine.gate import ZoomGate, box_area, confidence


def test_confidence_is_the_geometric_mean_token_probability():
    assert confidence([math.log(0.5), math.log(0.5)]) == pytest.approx(0.5)
    assert confidence([math.log(0.9), math.log(0.1)]) == pytest.approx(0.3)  # sqrt(0.09)
    assert confidence([0.0]) == 1.0
    # It does not fall with the answer's length as a product of probabilities would.
    assert confidence([math.log(0.8)] * 20) == pytest.approx(0.8)
    assert confidence([]) == 0.0  # an empty answer: nothing to be confident about


def test_box_area_is_its_share_of_the_image_inside_it():
    assert box_area((0, 0, 640, 480), 640, 480) == 1.0
    assert box_area((0, 0, 320, 240), 640, 480) == 0.25
    assert box_area((-320, 0, 320, 480), 640, 480) == 0.5  # the part outside does not count
    assert box_area((10, 10, 10, 400), 640, 480) == 0.0


SMALL, LARGE = 0.1, 0.9


@pytest.mark.parametrize("threshold, conf, zoom, why", [
    (0.0, 0.0, False, "confident"),  # 0 never zooms, even on a hopeless answer
    (0.0, 0.4, False, "confident"),
    (1.0, 0.999, True, "unsure"),  # 1 zooms unless every token was certain
    (1.0, 1.0, False, "confident"),
    (0.5, 0.49, True, "unsure"),
    (0.5, 0.5, False, "confident"),  # at the threshold: confident
    (0.5, 0.8, False, "confident"),
])
def test_zoom_iff_confidence_is_below_the_threshold(threshold, conf, zoom, why):
    decision = ZoomGate(threshold, max_box_area=0.5).decide(conf, False, "ok", True, SMALL)
    assert (decision.zoom, decision.why) == (zoom, why)


@pytest.mark.parametrize("outcome, usable, area, why", [
    ("unparsed", False, None, "box unparsed"),
    ("outside", False, None, "box outside"),
    ("empty", False, 0.0, "box empty"),
    ("ok", True, LARGE, "box covers most of the image"),
])
def test_an_unsure_answer_still_keeps_the_macro_answer_when_the_box_gives_nothing_to_zoom_into(
        outcome, usable, area, why):
    decision = ZoomGate(1.0, max_box_area=0.5).decide(0.2, False, outcome, usable, area)
    assert not decision.zoom and decision.why == why


def test_a_confident_answer_needs_no_box_and_max_box_area_one_lifts_the_limit():
    assert ZoomGate(0.5).decide(0.9, False, "aborted", False, None).why == "confident"
    assert ZoomGate(0.5, max_box_area=1.0).decide(0.2, False, "ok", True, 1.0).zoom


def test_a_multiple_choice_answer_is_held_to_the_choice_threshold():
    gate = ZoomGate(threshold=0.5, choice_threshold=0.2)
    assert gate.threshold_for(True) == 0.2 and gate.threshold_for(False) == 0.5
    # 0.3: unsure as an open answer, confident as a letter (chance among four letters is 0.25).
    assert gate.decide(0.3, False, "ok", True, SMALL).zoom
    assert gate.decide(0.3, True, "ok", True, SMALL) == gate.decide(0.9, False, "ok", True, SMALL)
    assert not gate.decide(0.3, True, "ok", True, SMALL).zoom and gate.confident(0.3, True)
    assert gate.decide(0.1, True, "ok", True, SMALL).zoom


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_a_threshold_outside_0_to_1_is_refused(threshold):
    with pytest.raises(ValueError, match="between 0 and 1"):
        ZoomGate(threshold)
    with pytest.raises(ValueError, match="choice zoom threshold must be between 0 and 1"):
        ZoomGate(0.5, choice_threshold=threshold)


def test_the_engine_config_and_a_query_refuse_a_threshold_outside_0_to_1():
    from engine import EngineConfig, Query

    with pytest.raises(ValueError, match="zoom_threshold must be between 0 and 1"):
        EngineConfig(zoom_threshold=2.0)
    with pytest.raises(ValueError, match="zoom_threshold_choice must be between 0 and 1"):
        EngineConfig(zoom_threshold_choice=1.5)
    with pytest.raises(ValueError, match="zoom_threshold_choice must be between 0 and 1"):
        Query("q", zoom_threshold_choice=-0.5)
    with pytest.raises(ValueError, match="zoom_max_box_area must be between 0 and 1"):
        EngineConfig(zoom_max_box_area=-1.0)
    with pytest.raises(ValueError, match="zoom_threshold must be between 0 and 1"):
        Query("q", zoom_threshold=1.01)
    assert Query("q", mode="auto", zoom_threshold=0.0).zoom_threshold == 0.0
