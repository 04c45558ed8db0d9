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


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Model):
    """A part of a message's content. Only `text` and `image_url` parts are served (and an
    assistant's `refusal`); any other type (input_audio, file, ...) is refused with a 400
    naming it (chat_completions/messages.py)."""

    type: str
    text: str | None = None
    image_url: ImageURL | None = None
    refusal: str | None = None


class Message(_Model):
    # tool and function messages are refused with a clear 400 (this server calls no tools).
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # a participant's name: accepted, not shown to the model (as vLLM's templates)
    tool_calls: list[dict] | None = None  # refused when not empty
    function_call: dict | None = None  # refused


class JSONSchemaFormat(_Model):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "answer"
    schema_: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_Model):
    include_usage: bool = False


Mode = Literal["dualfocus", "auto", "macro"]


# A zoom threshold a request may set: a confidence, 0-1 (None: the server's).
ZoomThreshold = Annotated[float | None, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class DualFocusOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Mode | None = Field(
        default=None,
        description="dualfocus: always zoom; auto: zoom only when the macro answer is unsure; macro: one pass. "
        "Default: the server's --default-mode (dualfocus unless set)",
    )
    zoom_threshold: ZoomThreshold = Field(
        default=None,
        description="mode auto: zoom when the macro answer's confidence is below this (0 never zooms, 1 nearly "
        "always); default: the server's --zoom-threshold",
    )
    zoom_threshold_choice: ZoomThreshold = Field(
        default=None,
        description="mode auto: zoom_threshold for a multiple-choice question; default: the server's "
        "--zoom-threshold-choice",
    )
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
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # vLLM's extension, as its OpenAI server takes it: generate past the end-of-sequence token, up to
    # max_tokens (load tools such as `vllm bench serve --ignore-eos` use it for fixed output lengths).
    ignore_eos: bool = False
    # Refused when they ask for something (chat_completions/messages.py says why).
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    web_search_options: dict | None = None
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


class GateTrace(BaseModel):
    """Mode auto: whether the request zoomed (micro pass and fusion), and why."""

    zoomed: bool
    why: str = Field(description="confident | unsure | box <outcome> | box covers most of the image")
    confidence: float = Field(description="the macro answer's geometric-mean token probability, 0-1")
    threshold: float = Field(description="zoom only below this confidence (the threshold for the question's form)")
    multiple_choice: bool = Field(description="the question lists answer options: the choice threshold applied")
    box_area: float | None = Field(description="the box's share of the image; null without a box")
    max_box_area: float = Field(description="zoom only into boxes covering at most this share of the image")
    box_aborted: bool = Field(
        description="with the server's --zoom-early-box: the gate decided before the box pass ended, and aborted it"
    )


class DualFocusTrace(BaseModel):
    """The `dualfocus` field of a response (or of a stream's last chunk) with return_trace."""

    mode: Mode
    chosen: Literal["macro", "micro", "same"]
    why: str
    macro_answer: str
    micro_answer: str | None
    box: BoxTrace | None
    crop: CropTrace | None
    scores: dict[str, float] | None = Field(description="mean token NLL per candidate answer; lower wins")
    zoomed_image: int | None = Field(
        default=None, description="which of the conversation's images (0-based, in order) the box and crop are on"
    )
    gate: GateTrace | None = Field(default=None, description="mode auto only: the zoom gate's decision")
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
            zoomed_image=t.zoomed_image,
            gate=None
            if t.gate is None
            else GateTrace(
                zoomed=t.gate.zoomed,
                why=t.gate.why,
                confidence=t.gate.confidence,
                threshold=t.gate.threshold,
                multiple_choice=t.gate.multiple_choice,
                box_area=t.gate.box_area,
                max_box_area=t.gate.max_box_area,
                box_aborted=t.gate.box_aborted,
            ),
            stages={
                name: StageTrace(ms=round(s.ms, 3), prompt_tokens=s.prompt_tokens, cached_tokens=s.cached_tokens)
                for name, s in t.stages.items()
            },
        )


class ChatCompletionResponse(ChatCompletion):
    dualfocus: DualFocusTrace | None = Field(default=None, description="with dualfocus.return_trace only")


class ChatCompletionStreamChunk(ChatCompletionChunk):
    dualfocus: DualFocusTrace | None = Field(default=None, description="on the last chunk, with return_trace only")
