"""What `ask` returns: the answer and, from the trace, what DualFocus did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.chat_completions.protocol import DualFocusTrace


@dataclass
class StageTiming:
    ms: float
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class Gate:
    """Mode auto: whether the request zoomed, and why."""

    zoomed: bool
    why: str  # confident | unsure | box <outcome> | box covers most of the image
    confidence: float  # the macro answer's geometric-mean token probability
    threshold: float  # the threshold for the question's form
    multiple_choice: bool  # the question lists options: the server's choice threshold applied
    box_area: float | None  # the box's share of the image
    max_box_area: float
    box_aborted: bool  # (server flag --zoom-early-box) decided before the box pass ended, which was aborted


@dataclass
class AskResult:
    answer: str
    usage: Usage
    mode: str | None = None
    chosen: str | None = None  # macro | micro | same
    why: str | None = None
    macro_answer: str | None = None
    micro_answer: str | None = None
    box: tuple[int, int, int, int] | None = None  # the model's box, pixels of the original image
    box_text: str | None = None
    crop: tuple[int, int, int, int] | None = None  # the region the micro pass saw
    scores: dict[str, float] | None = None
    stages: dict[str, StageTiming] = field(default_factory=dict)
    gate: Gate | None = None  # mode auto only

    @classmethod
    def from_response(cls, response: Any) -> AskResult:
        """From the openai SDK's ChatCompletion; the trace is read with the server's own model of it."""
        usage = response.usage
        details = usage.prompt_tokens_details
        result = cls(
            answer=response.choices[0].message.content or "",
            usage=Usage(usage.prompt_tokens, (details.cached_tokens or 0) if details else 0, usage.completion_tokens),
        )
        raw = getattr(response, "dualfocus", None)
        if raw:
            t = DualFocusTrace.model_validate(raw)
            result.mode, result.chosen, result.why = t.mode, t.chosen, t.why
            result.macro_answer, result.micro_answer = t.macro_answer, t.micro_answer
            result.box = t.box.pixels if t.box else None
            result.box_text = t.box.text if t.box else None
            result.crop = t.crop.rect if t.crop else None
            result.scores = t.scores
            result.gate = Gate(**t.gate.model_dump()) if t.gate else None
            result.stages = {name: StageTiming(s.ms, s.prompt_tokens, s.cached_tokens) for name, s in t.stages.items()}
        return result
