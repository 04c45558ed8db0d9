"""The OpenAI chat completions request, as plain pydantic models (what this server accepts),
and the response: the openai SDK's own models (openai.types.chat) with the `dualfocus`
trace added when asked for.

The trace's models here are its wire format, published in the OpenAPI schema; the Python
client (clients/python/result.py) and the load generator (loadtests/) read traces with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from engine import Trace


class _Model(BaseModel):
    # Fields OpenAI defines that this server does not act on are accepted and ignored,
    # as OpenAI-compatible servers do; anything it acts on is validated strictly.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class DualFocusOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["dualfocus", "macro"] = "dualfocus"
    return_trace: bool = False


class ChatCompletionRequest(_Model):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # None: greedy, as the reference
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extension: the openai SDK sends it with extra_body={"dualfocus": {...}}.
    dualfocus: DualFocusOptions = Field(default_factory=DualFocusOptions)


# --- the trace: what DualFocus did for one request -----------------------------------------------

Box4 = tuple[float, float, float, float]
Rect = tuple[int, int, int, int]


class BoxTrace(BaseModel):
    text: str = Field(description="the box pass's raw reply")
    normalized: Box4 | None = Field(description="the box as 0-1 of the original image; null if none parsed")
    pixels: Rect | None = Field(description="the box in pixels of the original image (x1 <= x2, y1 <= y2)")
    outcome: Literal["ok", "degenerate", "outside", "empty", "unparsed"]


class CropTrace(BaseModel):
    width: int
    height: int
    rect: Rect = Field(description="the region the micro pass saw, pixels of the original image (x2, y2 exclusive)")


class StageTrace(BaseModel):
    ms: float = Field(description="wall time from submission to finish")
    prompt_tokens: int
    cached_tokens: int = Field(description="prompt tokens served by the prefix cache")


class DualFocusTrace(BaseModel):
    """The `dualfocus` field of a response (or of a stream's last chunk) with return_trace."""

    mode: Literal["dualfocus", "macro"]
    chosen: Literal["macro", "micro", "same"]
    why: str
    macro_answer: str
    micro_answer: str | None
    box: BoxTrace | None
    crop: CropTrace | None
    scores: dict[str, float] | None = Field(description="mean token NLL per candidate answer; lower wins")
    stages: dict[str, StageTrace] = Field(description="per stage: macro, box, micro, fusion (those that ran)")

    @classmethod
    def of(cls, t: Trace) -> DualFocusTrace:
        """The wire form of the engine's trace (engine/trace.py)."""
        return cls(
            mode=t.mode,
            chosen=t.chosen,
            why=t.why,
            macro_answer=t.macro_answer,
            micro_answer=t.micro_answer,
            box=None
            if t.box is None
            else BoxTrace(text=t.box.text, normalized=t.box.normalized, pixels=t.box.pixels, outcome=t.box.outcome),
            crop=None if t.crop is None else CropTrace(width=t.crop.width, height=t.crop.height, rect=t.crop.rect),
            scores=t.scores,
            stages={
                name: StageTrace(ms=round(s.ms, 3), prompt_tokens=s.prompt_tokens, cached_tokens=s.cached_tokens)
                for name, s in t.stages.items()
            },
        )


class ChatCompletionResponse(ChatCompletion):
    dualfocus: DualFocusTrace | None = Field(default=None, description="with dualfocus.return_trace only")


class ChatCompletionStreamChunk(ChatCompletionChunk):
    dualfocus: DualFocusTrace | None = Field(default=None, description="on the last chunk, with return_trace only")
