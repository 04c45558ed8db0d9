"""What one request asks of the engine: a conversation's last user turn (the question), its
images, everything said before it, and how to sample the answer.

DualFocus answers the question; the earlier turns — system and developer messages, user and
assistant turns and their images — are context that every pass of the request starts with
(docs/method.md, "Conversations").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from .gate import check_share
from .trace import Mode

Role = Literal["system", "user", "assistant"]


@dataclass
class Turn:
    """One message before the question. A developer message is a system turn."""

    role: Role
    text: str
    images: list[Image.Image] = field(default_factory=list)  # user turns only, shown before the text
    image_ids: list[str | None] = field(default_factory=list)  # see Query.image_ids

    def __post_init__(self) -> None:
        if self.images and self.role != "user":
            raise ValueError(f"a {self.role} turn cannot carry images")
        _check_ids(self.images, self.image_ids)


@dataclass
class Sampling:
    """The request's sampling parameters; they apply to the answer passes (the box is greedy)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as text, as OpenAI sends it) -> bias
    logprobs: int | None = None  # None: none; k: each answer token's logprob and the k most likely
    ignore_eos: bool = False  # go on past the end-of-sequence token, to max_tokens (vLLM's extension)
    # The answer's format (structured outputs): a JSON schema, or any JSON object.
    json_schema: dict | None = None
    json_object: bool = False


@dataclass
class Query:
    question: str  # the last user turn's text
    images: list[Image.Image] = field(default_factory=list)  # in the question's own turn
    mode: Mode = "dualfocus"  # what the client asked for
    sampling: Sampling = field(default_factory=Sampling)
    history: list[Turn] = field(default_factory=list)  # system messages and earlier turns, in order
    # Per image (or none at all): a digest of its file, if the caller has one. The content ids vLLM
    # caches images by are then derived from it, instead of hashing the decoded pixels (a second of
    # CPU for 35 megapixels). None: the pixels are hashed.
    image_ids: list[str | None] = field(default_factory=list)
    # Mode auto: zoom only below this confidence of the macro answer (engine/gate.py), 0-1, for an
    # open-ended question and for a multiple-choice one; None: the engine's --zoom-threshold(-choice).
    zoom_threshold: float | None = None
    zoom_threshold_choice: float | None = None

    def __post_init__(self) -> None:
        _check_ids(self.images, self.image_ids)
        for name in ("zoom_threshold", "zoom_threshold_choice"):
            if getattr(self, name) is not None:
                check_share(name, getattr(self, name))

    @property
    def all_images(self) -> list[Image.Image]:
        """Every image of the conversation, in order; the last is the one DualFocus zooms into."""
        return [image for turn in self.history for image in turn.images] + list(self.images)

    @property
    def all_image_ids(self) -> list[str | None]:
        """all_images' file digests, None where there is none."""
        return [i for turn in self.history for i in _ids(turn.images, turn.image_ids)] + _ids(
            self.images, self.image_ids
        )

    @property
    def runs_as(self) -> Mode:
        """What the engine runs: DualFocus needs an image to zoom into; without one, one plain pass."""
        return self.mode if self.all_images else "macro"


def _check_ids(images: list[Image.Image], ids: list[str | None]) -> None:
    if ids and len(ids) != len(images):
        raise ValueError(f"{len(ids)} image ids for {len(images)} images")


def _ids(images: list[Image.Image], ids: list[str | None]) -> list[str | None]:
    return list(ids) if ids else [None] * len(images)
