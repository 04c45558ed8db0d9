"""The OpenAI chat completions request, as plain pydantic models (what this server accepts).

Responses are the openai SDK's own models (openai.types.chat), with the `dualfocus`
trace added as an extra field when asked for.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


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
