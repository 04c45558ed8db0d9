"""Training examples, built with the serving code itself so that training and serving match.

Prompts come from the LLaVA adapter (engine/families/llava.py): the served box, macro, micro and
scoring prompts are token for token the trained ones. Crops come from engine/geometry.py's
plan_crop applied to the box the model is taught to name (jittered, as a served box would be off),
and images go through the adapter's pad-to-square and the checkpoint's own image processor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine.families.llava import LlavaAdapter
from engine.fusion import parse_question
from engine.geometry import plan_crop

from .model import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, IMAGE_TOKENS, image_processor
from .task import COLOUR_NAMES, TEST_SEED_BASE, Question, Scene, box_text, make_questions, make_scene, vary_rendering

# What one LM example teaches (weights: how often each is drawn).
SEQUENCE_KINDS = {"macro": 0.25, "box": 0.15, "micro": 0.35, "scoring": 0.25}
GRID = IMAGE_SIZE // 14


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # -100 where no loss
    images: list[Image.Image]  # model images (already padded square), in prompt order
    kind: str
    answer_at: int  # index of the first answer token (for accuracy), -1 if none
    box_at: int  # index of the first box token with a loss, -1 if none


class ExampleMaker:
    def __init__(self, tokenizer, seed: int):
        self.adapter = LlavaAdapter(tokenizer, {"image_mean": image_processor().image_mean})
        self.eos = tokenizer.eos_token_id
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.rng = random.Random(seed)

    # --- scenes --------------------------------------------------------------------------------
    def scene(self) -> tuple[Scene, Image.Image]:
        scene = make_scene(self.rng.randrange(TEST_SEED_BASE))
        return scene, vary_rendering(scene.image, self.rng)

    def served_box(self, box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        """The box as a served model might name it: exact half the time, otherwise off by ~15% of its size."""
        if self.rng.random() < 0.5:
            return tuple(float(v) for v in box)  # type: ignore[return-value]
        w, h = box[2] - box[0], box[3] - box[1]
        return (box[0] + self.rng.gauss(0, 0.15 * w), box[1] + self.rng.gauss(0, 0.15 * h),
                box[2] + self.rng.gauss(0, 0.15 * w), box[3] + self.rng.gauss(0, 0.15 * h))

    def crop(self, image: Image.Image, box) -> Image.Image | None:
        plan = plan_crop(box, *image.size)
        return image.crop(plan.rect) if plan.usable else None

    # --- language-model examples ------------------------------------------------------------
    def examples(self) -> list[Example]:
        """Two examples (two of its questions, each as one kind of example) from one rendered scene:
        rendering costs more than a training step's share of an example."""
        scene, image = self.scene()
        out = []
        for q in self.rng.sample(make_questions(scene, self.rng), 2):
            kind = self.rng.choices(list(SEQUENCE_KINDS), weights=list(SEQUENCE_KINDS.values()))[0]
            out.append(self.example_for(scene, image, q, kind))
        return out

    def example_for(self, scene: Scene, image: Image.Image, q: Question, kind: str) -> Example:
        a = self.adapter
        full = a.model_image(image)
        if kind == "macro":
            return self._join([(a.macro_prompt(q.text), False), (a.reply_ids(q.answer) + [self.eos], True)],
                              [full], kind, answer_part=1)
        stem = parse_question(q.text).stem
        box_prompt = a.box_prompt(stem)
        w, h = image.size
        exact_box = box_text(q.box, w, h)
        if kind == "box":
            return self._join([(box_prompt, False), (a.encode(exact_box) + [self.eos], True)], [full], kind, box_part=1)
        served = self.served_box(q.box)
        crop = self.crop(image, served)
        if crop is None:  # a jittered box can leave the image; fall back to the exact one
            served, crop = tuple(float(v) for v in q.box), self.crop(image, q.box)
        said = box_text(served, w, h)
        box_reply = a.close_reply(a.encode(said))
        if kind == "micro":
            turn = a.micro_prompt(box_prompt, box_reply, q.text)[len(box_prompt) + len(box_reply):]
            answer = a.reply_ids(q.answer) + [self.eos]
        else:
            turn = a.scoring_prompt(box_prompt, box_reply, stem)[len(box_prompt) + len(box_reply):]
            answer = a.reply_ids(q.scoring_answer)
        # The box reply is taught only when it is the true box (a jittered one only sets the scene).
        return self._join([(box_prompt, False), (box_reply, said == exact_box), (turn, False), (answer, True)],
                          [full, a.model_image(crop)], kind, answer_part=3, box_part=1 if said == exact_box else -1)

    def _join(self, parts, images, kind, answer_part=-1, box_part=-1) -> Example:
        ids: list[int] = []
        labels: list[int] = []
        starts = []
        for part, learn in parts:
            expanded: list[int] = []
            for t in part:  # vLLM expands each image placeholder to the image's tokens; so does training
                expanded.extend([t] * IMAGE_TOKENS if t == self.image_id else [t])
            starts.append(len(ids))
            ids += expanded
            labels += expanded if learn else [-100] * len(expanded)
        return Example(ids, labels, images, kind, starts[answer_part] if answer_part >= 0 else -1,
                       starts[box_part] if box_part >= 0 else -1)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([to_pixels(i) for i in images])

    # --- vision-tower examples (stage 1) --------------------------------------------------------
    def vision_examples(self) -> list[tuple[Image.Image, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """A scene's full image and a served-style crop of it, each with per-patch targets on the 8x8
        grid: the sign colour at the patch's centre (0: none), the dot colour whose centre is in the
        patch (0: none), and the covering sign's box (0-1 of the padded square) for regression."""
        scene, image = self.scene()
        signs = [(s.colour, s.dot, s.rect, s.dot_rect) for s in scene.signs]
        out = [self._patch_targets(image, signs, dots=False)]
        sign = self.rng.choice(scene.signs)
        plan = plan_crop(self.served_box(sign.rect), *image.size)
        if plan.usable:
            x0, y0 = plan.rect[:2]
            shift = lambda r: (r[0] - x0, r[1] - y0, r[2] - x0, r[3] - y0)
            out.append(self._patch_targets(image.crop(plan.rect), [(c, d, shift(r), shift(dr)) for c, d, r, dr in signs],
                                           dots=True))
        return out

    def _patch_targets(self, image: Image.Image, signs, dots: bool
                       ) -> tuple[Image.Image, torch.Tensor, torch.Tensor, torch.Tensor]:
        # dots=False (full images): no dot targets (-100, ignored): at 112 px the dot is 1-2 px, and
        # teaching the tower to guess it there would only blur the premise the task is built on.
        w, h = image.size
        side = max(w, h)
        ox, oy = (side - w) // 2, (side - h) // 2
        colour = torch.zeros(GRID * GRID, dtype=torch.long)
        dot = torch.zeros(GRID * GRID, dtype=torch.long)
        boxes = torch.full((GRID * GRID, 4), -1.0)
        cell = side / GRID
        for i in range(GRID):
            for j in range(GRID):
                cx, cy = (j + 0.5) * cell - ox, (i + 0.5) * cell - oy
                k = i * GRID + j
                for c, d, r, dr in signs:
                    if r[0] <= cx < r[2] and r[1] <= cy < r[3]:
                        colour[k] = COLOUR_NAMES.index(c) + 1
                        boxes[k] = torch.tensor([(r[0] + ox) / side, (r[1] + oy) / side,
                                                 (r[2] + ox) / side, (r[3] + oy) / side])
                    dcx, dcy = (dr[0] + dr[2]) / 2 + ox, (dr[1] + dr[3]) / 2 + oy
                    if j * cell <= dcx < (j + 1) * cell and i * cell <= dcy < (i + 1) * cell:
                        dot[k] = COLOUR_NAMES.index(d) + 1
        if not dots:
            dot[:] = -100
        return self.adapter.model_image(image), colour, dot, boxes


def to_pixels(image: Image.Image) -> torch.Tensor:
    """What the checkpoint's CLIP image processor makes of a square model image: a bicubic resize to
    112 px (the processor's resize; with reducing_gap 3 PIL gives the same pixels, 3x faster) and CLIP's normalisation; its centre crop
    keeps all of a square. Done here directly because the processor is 10x slower."""
    small = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, reducing_gap=3.0)
    x = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - _MEAN) / _STD


_MEAN = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGE_STD).view(3, 1, 1)


class Batches(torch.utils.data.IterableDataset):
    """An endless stream of ready batches, made in a DataLoader worker beside the training process."""

    def __init__(self, tokenizer, seed: int, batch: int, vision: bool):
        self.tokenizer, self.seed, self.batch, self.vision = tokenizer, seed, batch, vision

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        maker = ExampleMaker(self.tokenizer, self.seed * 1000 + (info.id if info else 0))
        while True:
            if self.vision:
                items = []
                while len(items) < self.batch:
                    items += maker.vision_examples()
                items = items[: self.batch]
                yield {"pixel_values": maker.pixels([i[0] for i in items]),
                       "colour": torch.stack([i[1] for i in items]), "dot": torch.stack([i[2] for i in items]),
                       "boxes": torch.stack([i[3] for i in items])}
            else:
                examples: list[Example] = []
                while len(examples) < self.batch:
                    examples += maker.examples()
                examples = examples[: self.batch]
                batch = collate(examples, self.tokenizer.pad_token_id)
                batch["pixel_values"] = maker.pixels([img for e in examples for img in e.images])
                batch["kinds"] = [e.kind for e in examples]  # type: ignore[assignment]
                batch["answer_at"] = torch.tensor([e.answer_at for e in examples])
                batch["box_at"] = torch.tensor([e.box_at for e in examples])
                yield batch


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
