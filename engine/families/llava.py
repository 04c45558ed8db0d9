"""LLaVA-1.5 and the DualFocus-LLaVA checkpoints: vicuna_v1 turns, boxes on 0-1, pad-to-square."""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image

from ..image_work import as_rgb
from ..query import Turn
from .base import FamilyAdapter, ParsedBox, Piece

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The same conversation as a Jinja chat template (tokenizer_config.json), for clients of the stock
# vLLM server and the checkpoints engine/tiny.py and engine/convert_llava.py write.
CHAT_TEMPLATE = (
    # SYSTEM USER: {text} ASSISTANT: {reply}</s>USER: ... ASSISTANT:  (images first, as "<image>\n")
    "{% set system = 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' %}"
    "{{ system }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% set images = 0 %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('\n') %}"
    "{% set images = message['content'] | rejectattr('type', 'equalto', 'text') | list | length %}{% endif %}"
    "{% if message['role'] == 'user' %}{% if loop.first %} {% endif %}USER: {{ '<image>\n' * images }}{{ text }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ text }}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_NUMBER = r"(?:0\.\d{2}|1\.00)"
_FOUR_NUMBERS = re.compile(r"(\d+(?:\.\d+)?),\s*(\d+(?:\.\d+)?),\s*(\d+(?:\.\d+)?),\s*(\d+(?:\.\d+)?)")


class LlavaAdapter(FamilyAdapter):
    """`SYSTEM USER: <image>\\n{text} ASSISTANT: {reply}</s>USER: ...` as LLaVA's conv_vicuna_v1
    (several images in a turn: one `<image>` line each).

    Text around an image is tokenised in pieces split at `<image>`, as LLaVA's own
    tokenizer_image_token does, so ids match the reference's.
    """

    name = "llava"
    image_token = "<image>"
    reply_prefix = " "

    def model_image(self, image: Image.Image) -> Image.Image:
        # LLaVA-1.5's "pad" aspect mode: centre the image on a square filled with the
        # processor's mean colour, so nothing is cropped away by the CLIP processor.
        image = as_rgb(image)
        w, h = image.size
        if w == h:
            return image
        mean = self.image_processor_config.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
        square = Image.new("RGB", (max(w, h),) * 2, tuple(int(c * 255) for c in mean))
        square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        return square

    def image_ids(self) -> tuple[int, ...]:
        return (self.token_id(self.image_token),)

    def conversation_pieces(self, history: Sequence[Turn], question_images: int) -> list[Piece]:
        # vicuna_v1 has one system line: the request's system (and developer) messages, joined,
        # take the default's place.
        system = "\n".join(t.text for t in history if t.role == "system") or SYSTEM
        bos = (self.tokenizer.bos_token_id,) if self.tokenizer.bos_token_id is not None else ()
        pieces: list[Piece] = [bos, system + " "]
        for turn in history:
            if turn.role == "user":
                pieces += self._user_opening(len(turn.images)) + [("\n" if turn.images else "") + turn.text + " "]
            elif turn.role == "assistant":
                pieces += [f"ASSISTANT: {turn.text.strip()}", (self.tokenizer.eos_token_id,)]
        return pieces + (self._user_opening(question_images) if question_images else [])

    def question_pieces(self, text: str, turn_open: bool) -> list[Piece]:
        return [f"\n{text} ASSISTANT:" if turn_open else f"USER: {text} ASSISTANT:"]

    def _user_opening(self, images: int) -> list[Piece]:
        """`USER: ` and the turn's images, one per line."""
        pieces: list[Piece] = ["USER: "]
        for i in range(images):
            pieces += (["\n"] if i else []) + [self.image_ids()]
        return pieces

    def next_turn(self, text: str, with_image: bool) -> list[int]:
        if not with_image:
            return self.encode(f"USER: {text} ASSISTANT:")
        return self.encode("USER: ") + list(self.image_ids()) + self.encode(f"\n{text} ASSISTANT:")

    def close_reply(self, reply_ids: list[int]) -> list[int]:
        # The turn separator after an assistant reply is "</s>", the EOS the reply ends with.
        eos = self.tokenizer.eos_token_id
        return list(reply_ids) if reply_ids and reply_ids[-1] == eos else list(reply_ids) + [eos]

    @property
    def box_regex(self) -> str:
        return rf"\[{_NUMBER}, {_NUMBER}, {_NUMBER}, {_NUMBER}\]"

    def parse_box(self, text: str, width: int, height: int) -> ParsedBox | None:
        m = _FOUR_NUMBERS.search(text)
        if not m:
            return None
        x1, y1, x2, y2 = (float(g) for g in m.groups())
        # As the reference: 0-1 of the original image's width and height (it does not
        # undo the pad-to-square; DualFocus was trained that way).
        return ParsedBox((x1, y1, x2, y2), (x1 * width, y1 * height, x2 * width, y2 * height))
