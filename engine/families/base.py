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
from dataclasses import dataclass

from PIL import Image

# The reference's stage prompts (docs/method.md).
BOX_INSTRUCTION = "Please provide the bounding box coordinate of the region this question asks: {question}"
MICRO_INSTRUCTION = "Please combine the information from these two images and answer this question: {question}"
SCORING_INSTRUCTION = "{question}\nAnswer the question using a single word or phrase."


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
        return image.convert("RGB")

    # --- prompts (token ids, one placeholder per image) ------------------------------------
    @abstractmethod
    def first_turn(self, text: str, with_image: bool) -> list[int]:
        """A conversation's start through one user turn, ending where the assistant speaks."""

    @abstractmethod
    def next_turn(self, text: str, with_image: bool) -> list[int]:
        """A further user turn after a closed assistant turn, ending where the assistant speaks."""

    @abstractmethod
    def close_reply(self, reply_ids: list[int]) -> list[int]:
        """The ids that follow the box prompt: the model's reply, closed as the template closes it."""

    # What separates the assistant's cue from its reply ("ASSISTANT: B" in vicuna_v1).
    reply_prefix = ""

    def reply_ids(self, text: str) -> list[int]:
        """A text as the assistant's reply, for scoring (option texts)."""
        return self.encode(self.reply_prefix + text.strip())

    def box_prompt_suffix(self) -> list[int]:
        """Ids put after the assistant's cue in the box prompt (Qwen2-VL opens the box tag)."""
        return []

    def macro_prompt(self, question: str, with_image: bool = True) -> list[int]:
        return self.first_turn(question, with_image)

    def box_prompt(self, question: str) -> list[int]:
        return self.first_turn(BOX_INSTRUCTION.format(question=question), True) + self.box_prompt_suffix()

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

    @abstractmethod
    def parse_box(self, text: str, width: int, height: int) -> ParsedBox | None:
        """The box in `text`, mapped to an original image of width x height; None if absent."""

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an assistant turn; stripped from candidate answers before scoring."""
        return [self.tokenizer.eos_token_id]

    def strip_stop(self, ids: list[int]) -> list[int]:
        return ids[:-1] if ids and ids[-1] in self.stop_token_ids else list(ids)
