"""What `ask` returns: the answer and, from the trace, what DualFocus did."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @classmethod
    def from_response(cls, response) -> "AskResult":
        usage = response.usage
        details = usage.prompt_tokens_details
        result = cls(
            answer=response.choices[0].message.content or "",
            usage=Usage(usage.prompt_tokens, (details.cached_tokens or 0) if details else 0, usage.completion_tokens),
        )
        trace = getattr(response, "dualfocus", None)
        if trace:
            box, crop = trace.get("box") or {}, trace.get("crop") or {}
            result.mode, result.chosen, result.why = trace["mode"], trace["chosen"], trace.get("why")
            result.macro_answer, result.micro_answer = trace["macro_answer"], trace.get("micro_answer")
            result.box = tuple(box["pixels"]) if box.get("pixels") else None
            result.box_text = box.get("text")
            result.crop = tuple(crop["rect"]) if crop.get("rect") else None
            result.scores = trace.get("scores")
            result.stages = {name: StageTiming(**s) for name, s in trace.get("stages", {}).items()}
        return result
