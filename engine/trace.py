"""What happened to one request: the record returned beside every answer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Mode = Literal["dualfocus", "macro"]
Chosen = Literal["macro", "micro", "same"]  # which answer DualFocus returned
STAGES = ("macro", "box", "micro", "fusion")


@dataclass
class StageStats:
    """One stage's cost: wall time from submission to finish, and its prompts' tokens."""

    ms: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: "StageStats") -> "StageStats":
        """Two passes' costs together (their times added: passes run one after the other)."""
        return StageStats(self.ms + other.ms, self.prompt_tokens + other.prompt_tokens,
                          self.cached_tokens + other.cached_tokens, self.completion_tokens + other.completion_tokens)


@dataclass
class BoxTrace:
    text: str  # the model's raw box reply
    normalized: tuple[float, float, float, float] | None  # 0-1 of the original image
    pixels: tuple[int, int, int, int] | None  # the box in pixels of the original image, sorted
    outcome: str  # ok | degenerate | outside | empty | unparsed


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
class Trace:
    mode: Mode
    chosen: Chosen
    why: str
    macro_answer: str
    micro_answer: str | None = None
    box: BoxTrace | None = None
    crop: CropTrace | None = None
    scores: dict[str, float] | None = None  # mean token NLL per candidate; lower wins
    stages: dict[str, StageStats] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class Result:
    answer: str
    finish_reason: str | None
    trace: Trace

    @property
    def usage(self) -> Usage:
        """Summed over every pass the request ran (what it cost the engine)."""
        s = self.trace.stages.values()
        return Usage(sum(x.prompt_tokens for x in s), sum(x.cached_tokens for x in s),
                     sum(x.completion_tokens for x in s))
