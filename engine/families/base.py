"""What a model family decides: prompt templates, the box format and its coordinates.

The DualFocus program (engine/program.py) is the same for every family; it asks
an adapter for token ids and box geometry. Prompts are built as token ids, with
one placeholder token per image that vLLM expands to the image's tokens, and
each follow-up prompt is built by appending to the earlier prompt's ids and
the model's own reply ids: so it extends them token for token and vLLM's
prefix cache serves the shared part.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ..image_work import as_rgb
from ..query import Turn

# The reference's stage prompts (docs/method.md).
BOX_INSTRUCTION = "Please provide the bounding box coordinate of the region this question asks: {question}"
MICRO_INSTRUCTION = "Please combine the information from these two images and answer this question: {question}"
SCORING_INSTRUCTION = "{question}\nAnswer the question using a single word or phrase."


# A piece of a rendered prompt: text, or token ids put in as they are.
Piece = str | tuple[int, ...]


@dataclass(frozen=True)
class Prefix:
    """The conversation up to the question's text, as pieces (FamilyAdapter.conversation_prefix)."""

    pieces: list[Piece]
    turn_open: bool  # the question's user turn is open, its images in the pieces

    def ids(self, adapter: FamilyAdapter) -> list[int]:
        return adapter.encode_pieces(self.pieces)


@dataclass(frozen=True)
class ParsedBox:
    """A box as the model wrote it, mapped to the original image."""

    normalized: tuple[float, float, float, float]  # 0-1 of the original image
    pixels: tuple[float, float, float, float]  # pixels of the original image


class FamilyAdapter(ABC):
    """One per model family. Subclasses fill in the template and the box format."""

    name: str

    def __init__(self, tokenizer, image_processor_config: dict):
        self.tokenizer = tokenizer
        self.image_processor_config = image_processor_config

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def token_id(self, token: str) -> int:
        ids = self.encode(token)
        if len(ids) != 1:
            raise ValueError(f"{self.name}: {token!r} is not a single token in this tokenizer")
        return ids[0]

    # --- images ---------------------------------------------------------------------------
    def model_image(self, image: Image.Image) -> Image.Image:
        """The image as this family feeds it to the model (RGB; LLaVA pads it square)."""
        return as_rgb(image)

    # --- the family's chat template --------------------------------------------------------
    # A prompt is rendered as pieces: text, or literal token ids (an image's placeholder,
    # BOS, EOS). Adjacent text is tokenised as one run, so text between images is tokenised
    # in one piece, as LLaVA's tokenizer_image_token does.

    @abstractmethod
    def image_ids(self) -> tuple[int, ...]:
        """The placeholder vLLM expands to one image's tokens."""

    @abstractmethod
    def conversation_pieces(self, history: Sequence[Turn], question_images: int) -> list[Piece]:
        """System, earlier turns, and the question's user turn opened through its images
        (if it has none, the pieces end where its turn would begin)."""

    @abstractmethod
    def question_pieces(self, text: str, turn_open: bool) -> list[Piece]:
        """The question's text, closing its user turn and cueing the assistant; `turn_open`:
        the turn was opened (with its images) by conversation_pieces."""

    @abstractmethod
    def next_turn(self, text: str, with_image: bool) -> list[int]:
        """A further user turn after a closed assistant turn, ending where the assistant speaks."""

    @abstractmethod
    def close_reply(self, reply_ids: list[int]) -> list[int]:
        """The ids that follow the box prompt: the model's reply, closed as the template closes it."""

    def encode_pieces(self, pieces: Sequence[Piece]) -> list[int]:
        ids: list[int] = []
        text = ""
        for piece in pieces:
            if isinstance(piece, str):
                text += piece
                continue
            if text:
                ids += self.encode(text)
                text = ""
            ids += piece
        return ids + (self.encode(text) if text else [])

    # --- prompts of the passes -----------------------------------------------------------------
    def conversation_prefix(self, history: Sequence[Turn], question_images: int) -> Prefix:
        """What every pass of a request starts with, token for token: the whole conversation
        up to the question's text. In a conversation with an image it ends after an image or
        a special token (the question's turn opened through its images, or an earlier turn
        closed), so the passes' own text, tokenised after it, cannot merge into it."""
        return Prefix(self.conversation_pieces(history, question_images), question_images > 0)

    def prompt(self, prefix: Prefix, text: str) -> list[int]:
        """The conversation with `text` as the last user turn's text, ending where the assistant speaks."""
        return self.encode_pieces(prefix.pieces + self.question_pieces(text, prefix.turn_open))

    # What separates the assistant's cue from its reply ("ASSISTANT: B" in vicuna_v1).
    reply_prefix = ""

    def reply_ids(self, text: str) -> list[int]:
        """A text as the assistant's reply, for scoring (option texts)."""
        return self.encode(self.reply_prefix + text.strip())

    def box_prompt_suffix(self) -> list[int]:
        """Ids put after the assistant's cue in the box prompt (Qwen2-VL opens the box tag)."""
        return []

    def macro_prompt(self, prefix: Prefix, question: str) -> list[int]:
        return self.prompt(prefix, question)

    def box_prompt(self, prefix: Prefix, question: str) -> list[int]:
        return self.prompt(prefix, BOX_INSTRUCTION.format(question=question)) + self.box_prompt_suffix()

    def micro_prompt(self, box_prompt: list[int], box_reply: list[int], question: str) -> list[int]:
        turn = self.next_turn(MICRO_INSTRUCTION.format(question=question), True)
        return box_prompt + self.close_reply(box_reply) + turn

    def scoring_prompt(self, box_prompt: list[int], box_reply: list[int], question_stem: str) -> list[int]:
        turn = self.next_turn(SCORING_INSTRUCTION.format(question=question_stem), True)
        return box_prompt + self.close_reply(box_reply) + turn

    # --- boxes -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def box_regex(self) -> str:
        """The grammar the box reply is generated under, so it always parses."""

    def box_regex_for(self, width: int, height: int) -> str:
        """The box grammar for an image of width x height (a family whose coordinates depend on
        the image's size bounds them to it, so the box always lies in the image)."""
        return self.box_regex

    @abstractmethod
    def parse_box(self, text: str, width: int, height: int) -> ParsedBox | None:
        """The box in `text`, mapped to an original image of width x height; None if absent."""

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an assistant turn; stripped from candidate answers before scoring."""
        return [self.tokenizer.eos_token_id]

    def strip_stop(self, ids: list[int]) -> list[int]:
        return ids[:-1] if ids and ids[-1] in self.stop_token_ids else list(ids)
