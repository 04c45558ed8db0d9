"""What happened to one request: the record returned beside every answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from .fusion import Chosen

# dualfocus: always zoom (when the box allows); auto: zoom only when the gate says it pays
# (engine/gate.py); macro: one plain pass.
Mode = Literal["dualfocus", "auto", "macro"]
# engine/geometry.py's outcomes, and "unparsed" when the reply held no box.
BoxOutcome = Literal["ok", "degenerate", "outside", "empty", "unparsed"]
STAGES = ("macro", "box", "micro", "fusion")
# Every value a label can take, so counters can start at zero for each.
MODES: tuple[Mode, ...] = get_args(Mode)
CHOICES: tuple[Chosen, ...] = get_args(Chosen)
BOX_OUTCOMES: tuple[BoxOutcome, ...] = get_args(BoxOutcome)
ZoomDecision = Literal["zoom", "skip"]
ZOOM_DECISIONS: tuple[ZoomDecision, ...] = get_args(ZoomDecision)


@dataclass
class StageStats:
    """One stage's cost: wall time from submission to finish, and its prompts' tokens."""

    ms: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: StageStats) -> StageStats:
        """Two passes' costs together (their times added: passes run one after the other)."""
        return StageStats(
            self.ms + other.ms,
            self.prompt_tokens + other.prompt_tokens,
            self.cached_tokens + other.cached_tokens,
            self.completion_tokens + other.completion_tokens,
        )


@dataclass
class BoxTrace:
    text: str  # the model's raw box reply
    normalized: tuple[float, float, float, float] | None  # 0-1 of the original image
    pixels: tuple[int, int, int, int] | None  # the box in pixels of the original image, sorted
    outcome: BoxOutcome


@dataclass
class CropTrace:
    """The region the micro pass saw: the box squared, clipped and enlarged (x2, y2 exclusive)."""

    rect: tuple[int, int, int, int]

    @property
    def width(self) -> int:
        return self.rect[2] - self.rect[0]

    @property
    def height(self) -> int:
        return self.rect[3] - self.rect[1]


@dataclass
class GateTrace:
    """Mode auto: whether the request zoomed, and why (engine/gate.py)."""

    zoomed: bool
    why: str  # confident | unsure | box <outcome> | box covers most of the image
    confidence: float  # the macro answer's geometric-mean token probability
    threshold: float  # zoom only below this confidence: the gate's threshold for the question's form
    multiple_choice: bool  # the question has answer options: the gate's choice threshold applied
    box_area: float | None  # the box's share of the image; None without a box
    max_box_area: float  # zoom only into boxes covering at most this share
    box_aborted: bool  # with ZoomGate.early_box: the gate decided before the box pass ended, and aborted it

    @property
    def decision(self) -> ZoomDecision:
        return "zoom" if self.zoomed else "skip"


@dataclass
class Trace:
    mode: Mode
    chosen: Chosen
    why: str
    macro_answer: str
    micro_answer: str | None = None
    box: BoxTrace | None = None
    crop: CropTrace | None = None
    scores: dict[str, float] | None = None  # mean token NLL per candidate; lower wins
    # Which image the box and crop are on: its index among the conversation's images, in order.
    zoomed_image: int | None = None
    gate: GateTrace | None = None  # mode auto only
    stages: dict[str, StageStats] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class TokenLogprob:
    """One generated token: its text, its logprob, and the most likely tokens at its position."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


# Called with an answer's text so far and, if asked for, its token logprobs so far.
OnText = Callable[[str, list[TokenLogprob] | None], None]


@dataclass
class Result:
    answer: str
    finish_reason: str | None
    trace: Trace
    logprobs: list[TokenLogprob] | None = None  # the chosen answer's tokens, when asked for

    @property
    def usage(self) -> Usage:
        """Summed over every pass the request ran (what it cost the engine)."""
        s = self.trace.stages.values()
        return Usage(
            sum(x.prompt_tokens for x in s), sum(x.cached_tokens for x in s), sum(x.completion_tokens for x in s)
        )
