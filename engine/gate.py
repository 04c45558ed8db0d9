"""The zoom gate of mode auto: zoom only when it pays.

The gate reads signals the engine has for free, after the box and macro passes:

- the macro answer's confidence: the geometric-mean probability of its tokens,
  exp(mean token logprob), the stop token left out. It is the inverse of the answer's
  perplexity, the measure fusion already ranks answers by (engine/fusion.py), and unlike
  a product of probabilities it does not fall with the answer's length. The logprobs are
  vLLM's raw ones (before temperature and penalties): the model's own belief;
- whether the box parsed into a usable crop (engine/geometry.py);
- the box's share of the image: a box covering most of it zooms in on nearly the same
  picture, so the micro pass would see little the macro pass did not.

The request zooms (micro pass and fusion, as mode dualfocus) iff the answer is unsure
(confidence < threshold), the crop is usable, and the box is small enough. A multiple-choice
answer (a letter among the question's options) has a threshold of its own: its confidence is
on another scale than an open answer's (picking one of four letters at chance is 0.25, naming
one of thousands of words is not), and a model may gain from zooming on one form and not the
other. A confident answer needs no box, so the program runs the box pass only after an unsure
answer (or, with `early_box`, once the macro prompt is prefilled, aborting it when the answer is
confident).
Threshold 0 never zooms; threshold 1 zooms unless every token was certain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# The thresholds are calibrated on tiny-dualfocus's task (docs/performance.md, "Calibration"), served in
# float32 (engine/config.py, cpu_dtype): its micro pass never changes a multiple-choice letter, so zooming on
# one only costs (choice threshold 0), and below 0.484 on open answers auto zooms 40-42% of the questions and
# keeps 95-100% of DualFocus's gain on two test sets. Another model's confidences differ: calibrate it the
# same way. The box-area limit is not calibrated (a box of half the image magnifies only ~1.4x per side).
DEFAULT_THRESHOLD = 0.484
DEFAULT_CHOICE_THRESHOLD = 0.0
DEFAULT_MAX_BOX_AREA = 0.5


@dataclass(frozen=True)
class GateDecision:
    zoom: bool
    # confident | unsure | box <outcome> (unparsed, outside, empty) | box covers most of the image
    why: str


@dataclass(frozen=True)
class ZoomGate:
    threshold: float = DEFAULT_THRESHOLD  # zoom only below this confidence, 0-1
    choice_threshold: float = DEFAULT_CHOICE_THRESHOLD  # the same, for a multiple-choice question's answer
    max_box_area: float = DEFAULT_MAX_BOX_AREA  # zoom only into boxes covering at most this share of the image
    # Start the box pass once the macro prompt is prefilled (for a question whose threshold is above 0: a
    # threshold of 0 never zooms) and abort it when the answer is confident, rather than only after an unsure
    # answer: a zoom does not wait for the answer, but every such request pays the box's prefill and some
    # of its tokens.
    early_box: bool = False

    def __post_init__(self) -> None:
        check_share("zoom threshold", self.threshold)
        check_share("choice zoom threshold", self.choice_threshold)
        check_share("max box area", self.max_box_area)

    def threshold_for(self, multiple_choice: bool) -> float:
        return self.choice_threshold if multiple_choice else self.threshold

    def may_zoom(self, multiple_choice: bool) -> bool:
        """Whether any answer to a question of this form can zoom (threshold 0 never does)."""
        return self.threshold_for(multiple_choice) > 0

    def confident(self, confidence: float, multiple_choice: bool) -> bool:
        """Confident enough to keep the macro answer, whatever the box says."""
        return confidence >= self.threshold_for(multiple_choice)

    def decide(
        self, confidence: float, multiple_choice: bool, box_outcome: str, crop_usable: bool, box_area: float | None
    ) -> GateDecision:
        """Zoom or not, from the macro answer's confidence (and the question's form) and the box (its
        outcome, whether it gives a crop, its share of the image; the outcome is "not run" for a box pass
        not run or aborted)."""
        if self.confident(confidence, multiple_choice):
            return GateDecision(False, "confident")
        if not crop_usable or box_area is None:
            return GateDecision(False, f"box {box_outcome}")
        if box_area > self.max_box_area:
            return GateDecision(False, "box covers most of the image")
        return GateDecision(True, "unsure")


def confidence(token_logprobs: Sequence[float]) -> float:
    """The geometric-mean probability of an answer's tokens; 0 for an empty answer (nothing to
    be confident about)."""
    if not token_logprobs:
        return 0.0
    return math.exp(sum(token_logprobs) / len(token_logprobs))


def box_area(box: tuple[float, float, float, float], width: int, height: int) -> float:
    """The share of a width x height image a box (pixels, sorted) covers, the part outside left out."""
    x1, y1, x2, y2 = box
    inside_w = max(0.0, min(x2, width) - max(x1, 0.0))
    inside_h = max(0.0, min(y2, height) - max(y1, 0.0))
    return inside_w * inside_h / (width * height)


def check_share(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
