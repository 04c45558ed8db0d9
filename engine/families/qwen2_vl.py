"""Qwen2-VL and Qwen2.5-VL: ChatML turns, native-resolution images, their box formats."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ..query import Turn
from .base import FamilyAdapter, ParsedBox, Piece

SYSTEM = "You are a helpful assistant."
# ChatML as a Jinja chat template (tokenizer_config.json), for clients of the stock vLLM server.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_INT_0_1000 = r"(?:1000|[1-9][0-9]{0,2}|0)"
_INT_PIXELS = r"(?:0|[1-9][0-9]{0,4})"


def up_to(n: int) -> str:
    """A regex for the integers 0..n, written without leading zeros."""
    digits = str(n)
    alternatives = ["[0-9]" if length == 1 else f"[1-9][0-9]{{{length - 1}}}" for length in range(1, len(digits))]
    for i, ch in enumerate(digits):  # same length as n: a prefix of n, then a smaller digit, then any
        lowest = 1 if i == 0 and len(digits) > 1 else 0
        if int(ch) - 1 >= lowest:
            rest = len(digits) - i - 1
            alternatives.append(digits[:i] + f"[{lowest}-{int(ch) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    return "(?:" + "|".join([*alternatives, digits]) + ")"


class Qwen2VLAdapter(FamilyAdapter):
    """`<|box_start|>(x1,y1),(x2,y2)<|box_end|>`, integers on a 0-1000 grid of the original image.

    The box tags are special tokens, which grammars over text cannot emit: the box
    prompt ends with `<|box_start|>`, the reply is generated under a grammar for
    `(x1,y1),(x2,y2)`, and `<|box_end|>` closes it in the follow-up prompts.
    """

    name = "qwen2_vl"

    def image_ids(self) -> tuple[int, ...]:
        return (self.token_id("<|vision_start|>"), self.token_id("<|image_pad|>"), self.token_id("<|vision_end|>"))

    def conversation_pieces(self, history: Sequence[Turn], question_images: int) -> list[Piece]:
        # As Qwen's template: the default system message unless the conversation starts with one;
        # every message in its own <|im_start|>role ... <|im_end|> block, in order.
        pieces: list[Piece] = []
        if not history or history[0].role != "system":
            pieces.append(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
        for turn in history:
            if turn.role == "user":
                pieces += self._user_opening(len(turn.images)) + [f"{turn.text}<|im_end|>\n"]
            else:
                pieces.append(f"<|im_start|>{turn.role}\n{turn.text}<|im_end|>\n")
        return pieces + (self._user_opening(question_images) if question_images else [])

    def question_pieces(self, text: str, turn_open: bool) -> list[Piece]:
        closing = f"{text}<|im_end|>\n<|im_start|>assistant\n"
        return [closing] if turn_open else ["<|im_start|>user\n" + closing]

    def _user_opening(self, images: int) -> list[Piece]:
        return ["<|im_start|>user\n"] + [self.image_ids()] * images

    def next_turn(self, text: str, with_image: bool) -> list[int]:
        return self.encode_pieces(self._user_opening(int(with_image)) + self.question_pieces(text, True))

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.token_id("<|im_end|>"), self.token_id("<|endoftext|>")]

    def box_prompt_suffix(self) -> list[int]:
        return [self.token_id("<|box_start|>")]

    def close_reply(self, reply_ids: list[int]) -> list[int]:
        return self.strip_stop(reply_ids) + self.encode("<|box_end|><|im_end|>\n")

    @property
    def box_regex(self) -> str:
        n = _INT_0_1000
        return rf"\({n},{n}\),\({n},{n}\)"

    def parse_box(self, text: str, width: int, height: int) -> ParsedBox | None:
        m = re.search(r"\((\d+),(\d+)\),\((\d+),(\d+)\)", text)
        if not m:
            return None
        x1, y1, x2, y2 = (int(g) / 1000 for g in m.groups())
        return ParsedBox((x1, y1, x2, y2), (x1 * width, y1 * height, x2 * width, y2 * height))


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: JSON `[{"bbox_2d": [x1, y1, x2, y2]}]` in pixels of the RESIZED processor input."""

    name = "qwen2_5_vl"

    def box_prompt_suffix(self) -> list[int]:
        return []

    def close_reply(self, reply_ids: list[int]) -> list[int]:
        return self.strip_stop(reply_ids) + self.encode("<|im_end|>\n")

    @property
    def box_regex(self) -> str:
        n = _INT_PIXELS
        return rf'\[\{{"bbox_2d": \[{n}, {n}, {n}, {n}\]\}}\]'

    def box_regex_for(self, width: int, height: int) -> str:
        # Coordinates are pixels of the resized input: bounded by its size, the box lies in the image.
        rh, rw = self.resized_size(height, width)
        x, y = up_to(rw), up_to(rh)
        return rf'\[\{{"bbox_2d": \[{x}, {y}, {x}, {y}\]\}}\]'

    def parse_box(self, text: str, width: int, height: int) -> ParsedBox | None:
        m = re.search(r'"bbox_2d":\s*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\]', text)
        if not m:
            return None
        rh, rw = self.resized_size(height, width)
        x1, y1, x2, y2 = (int(g) for g in m.groups())
        normalized = (x1 / rw, y1 / rh, x2 / rw, y2 / rh)
        return ParsedBox(
            normalized, (normalized[0] * width, normalized[1] * height, normalized[2] * width, normalized[3] * height)
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The processor's input size (Qwen2.5-VL's smart_resize): multiples of 28 within the pixel budget."""
        cfg = self.image_processor_config
        factor = cfg.get("patch_size", 14) * cfg.get("merge_size", 2)
        min_pixels = cfg.get("min_pixels") or cfg.get("size", {}).get("shortest_edge", 56 * 56)
        max_pixels = cfg.get("max_pixels") or cfg.get("size", {}).get("longest_edge", 28 * 28 * 1280)
        h = max(factor, round(height / factor) * factor)
        w = max(factor, round(width / factor) * factor)
        if h * w > max_pixels:
            beta = math.sqrt(height * width / max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h = math.ceil(height * beta / factor) * factor
            w = math.ceil(width * beta / factor) * factor
        return h, w
