"""Training examples, built with the serving code itself so that training and serving match.

Prompts come from the LLaVA adapter (engine/families/llava.py): the served box, macro, micro and
scoring prompts are token for token the trained ones. Crops come from engine/geometry.py's
plan_crop applied to the box the model is taught to name (jittered, as a served box would be off),
and images go through the adapter's pad-to-square and the checkpoint's own image processor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from engine.families.llava import LlavaAdapter
from engine.fusion import parse_question
from engine.geometry import plan_crop

from .model import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, IMAGE_TOKENS, image_processor
from .task import COLOUR_NAMES, TEST_SEED_BASE, Question, Scene, box_text, make_questions, make_scene, vary_rendering

# What one LM example teaches (weights: how often each is drawn).
SEQUENCE_KINDS = {"macro": 0.2, "box": 0.3, "micro": 0.25, "scoring": 0.25}
GRID = IMAGE_SIZE // 14
# The attention heads (layer, head) lm_step's attention loss steers. An answer is read by head 0 of the
# layers after the first. A box's four numbers are read by one head each (x1, y1, x2, y2), each from the
# patch of the sign that sets that edge, while the other three look at the first token (a sink): each
# head then copies one coordinate, so a number is a copy, not something an MLP must pick out of four.
ANSWER_HEADS = ((1, 0), (2, 0))
BOX_NUMBER_HEADS = ((1, 0), (1, 1), (2, 0), (2, 1))
SINK = 0


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # -100 where no loss
    images: list[Image.Image]  # model images (already padded square), in prompt order
    patch_words: list[torch.Tensor]  # per image: each patch's content word id (-100: none), see patch_words()
    patch_boxes: list[torch.Tensor]  # per image: (64, 4) the box of the sign each patch shows, 0-1 (-1: none)
    kind: str
    answer_at: int  # index of the first answer token (for accuracy), -1 if none
    box_at: int  # index of the first box token with a loss, -1 if none
    image_starts: list[int]  # index of each image's first token
    # Where each taught token is to be read: (position that predicts it, positions of the image tokens that
    # show what it needs, the (layer, head)s to look there); lm_step's attention loss steers those heads.
    focus: list[tuple[int, list[int], tuple[tuple[int, int], ...]]] = field(default_factory=list)


class ExampleMaker:
    def __init__(self, tokenizer, seed: int):
        self.adapter = LlavaAdapter(tokenizer, {"image_mean": image_processor().image_mean})
        self.eos = tokenizer.eos_token_id
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.rng = random.Random(seed)
        # The first token of each colour word as an answer says it (" red"): the image-word loss's targets.
        self.colour_word = [self.adapter.reply_ids(c)[0] for c in COLOUR_NAMES]
        self.numbers = {i for t, i in tokenizer.get_vocab().items() if len(t) == 2 and t.isdigit()}

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
        signs = [(s.colour, s.dot, s.rect, s.dot_rect) for s in scene.signs]
        full_words = self.patch_words(image, signs, dots=False)
        full_boxes = self._patch_targets(image, signs, dots=False)[3]
        no_boxes = torch.full_like(full_boxes, -1.0)
        # The signs the box is drawn around: the asked one, or (a global question) all of them.
        box_signs = [s for s in scene.signs if s.rect == q.asked_sign] or list(scene.signs)
        # What the question is about, on the full image: the asked sign (detail, and presence of a sign
        # that is there) or every sign (count, and presence of one that is not).
        # Where the answer is read on the full image (offsets into its image tokens; None: the sink token):
        # the asked sign (detail, and presence of a sign that is there); for a sign that is not there, the
        # sink, so "no" is "found nothing"; for a count, the sink and each sign's centre patch, so that even
        # attention leaves 1/(n+1) on the sink, and the count is how much of it is the sink.
        about = [s for s in scene.signs if q.asked_sign == s.rect or (q.kind == "presence" and f" {s.colour} " in q.text)]
        on_full: list[int | None]
        if q.kind == "count":
            on_full = [None] + sorted({patch_at(image.size, _centre(s.rect)) for s in scene.signs})
        elif not about:
            on_full = [None]
        else:
            on_full = sorted({k for s in about for k in patches_over(image.size, s.rect)})
        prefix = a.conversation_prefix([], 1)  # a new conversation with one image, as the server opens it
        if kind == "macro":
            ex = self._join([(a.macro_prompt(prefix, q.text), False), (a.reply_ids(q.answer) + [self.eos], True)],
                            [full], [full_words], [full_boxes], kind, answer_part=1)
            ex.focus.append((ex.answer_at - 1, _keys(ex.image_starts[0], on_full), ANSWER_HEADS))
            return ex
        stem = parse_question(q.text).stem
        box_prompt = a.box_prompt(prefix, stem)
        w, h = image.size
        exact_box = box_text(q.box, w, h)
        if kind == "box":
            ex = self._join([(box_prompt, False), (a.encode(exact_box) + [self.eos], True)], [full], [full_words],
                            [full_boxes], kind, box_part=1)
            self._focus_box(ex, image.size, box_signs)
            return ex
        served = self.served_box(q.box)
        plan = plan_crop(served, w, h)
        if not plan.usable:  # a jittered box can leave the image; fall back to the exact one
            served = tuple(float(v) for v in q.box)
            plan = plan_crop(served, w, h)
        crop = image.crop(plan.rect)
        x0, y0 = plan.rect[:2]
        crop_words = self.patch_words(crop, [(c, d, _shift(r, x0, y0), _shift(dr, x0, y0)) for c, d, r, dr in signs],
                                      dots=True)
        said = box_text(served, w, h)
        box_reply = a.close_reply(a.encode(said))
        if kind == "micro":
            turn = a.micro_prompt(box_prompt, box_reply, q.text)[len(box_prompt) + len(box_reply):]
            answer = a.reply_ids(q.answer) + [self.eos]
        else:
            turn = a.scoring_prompt(box_prompt, box_reply, stem)[len(box_prompt) + len(box_reply):]
            answer = a.reply_ids(q.scoring_answer)
        # The box reply is taught only when it is the true box (a jittered one only sets the scene).
        ex = self._join([(box_prompt, False), (box_reply, said == exact_box), (turn, False), (answer, True)],
                        [full, a.model_image(crop)], [full_words, crop_words], [full_boxes, no_boxes], kind,
                        answer_part=3, box_part=1 if said == exact_box else -1)
        if said == exact_box:
            self._focus_box(ex, image.size, box_signs)
        if q.asked_sign is not None:  # a detail question: the answer is the asked sign's dot, on the crop
            sign = next(s for s in scene.signs if s.rect == q.asked_sign)
            on_crop = patches_over(crop.size, _shift(sign.dot_rect, x0, y0))
            ex.focus.append((ex.answer_at - 1, [ex.image_starts[1] + k for k in on_crop], ANSWER_HEADS))
        else:
            ex.focus.append((ex.answer_at - 1, _keys(ex.image_starts[0], on_full), ANSWER_HEADS))
        return ex

    def _focus_box(self, ex: Example, size: tuple[int, int], box_signs) -> None:
        """Each of the box's four numbers is read by its own head (BOX_NUMBER_HEADS) off the full image's
        patch at the centre of the sign that sets that edge (the leftmost sign's for x1, ...)."""
        t, coordinate = ex.box_at, 0
        while t < len(ex.labels) and ex.labels[t] != -100 and ex.labels[t] != self.eos:
            if ex.ids[t] in self.numbers:
                pick = min if coordinate < 2 else max
                sign = pick(box_signs, key=lambda s: s.rect[coordinate])
                for i, head in enumerate(BOX_NUMBER_HEADS):
                    keys = [ex.image_starts[0] + patch_at(size, _centre(sign.rect))] if i == coordinate else [SINK]
                    ex.focus.append((t - 1, keys, (head,)))
                coordinate += 1
            t += 1
        assert coordinate == 4, "a box has four numbers"

    def patch_words(self, image: Image.Image, signs, dots: bool) -> torch.Tensor:
        """Each image token's content as a word the language model's head can say: the dot's colour word
        in the patch that holds the dot's centre (crops only), else the colour word of the sign covering
        the patch's centre (full images), else -100 (no target). Training the projected image tokens to say these
        (lm_step's image-word loss) gives the language model a short path from the image to an answer:
        answering becomes finding the right image token and copying its word."""
        _, colour, dot, _ = self._patch_targets(image, signs, dots=dots)
        words = torch.full((GRID * GRID,), -100, dtype=torch.long)
        if dots:  # on a crop only the dots speak, so that a dot's token is told apart from its sign's
            for k in range(GRID * GRID):
                if dot[k] > 0:
                    words[k] = self.colour_word[int(dot[k]) - 1]
            return words
        for c, _, r, _ in signs:  # a sign smaller than a patch may cover no patch's centre: its centre's patch
            words[patch_at(image.size, ((r[0] + r[2]) / 2, (r[1] + r[3]) / 2))] = self.colour_word[COLOUR_NAMES.index(c)]
        for k in range(GRID * GRID):
            if colour[k] > 0:
                words[k] = self.colour_word[int(colour[k]) - 1]
        return words

    def _join(self, parts, images, patch_words, patch_boxes, kind, answer_part=-1, box_part=-1) -> Example:
        ids: list[int] = []
        labels: list[int] = []
        starts = []
        image_starts = []
        for part, learn in parts:
            expanded: list[int] = []
            for t in part:  # vLLM expands each image placeholder to the image's tokens; so does training
                if t == self.image_id:
                    image_starts.append(len(ids) + len(expanded))
                expanded.extend([t] * IMAGE_TOKENS if t == self.image_id else [t])
            starts.append(len(ids))
            ids += expanded
            labels += expanded if learn else [-100] * len(expanded)
        return Example(ids, labels, images, patch_words, patch_boxes, kind, starts[answer_part] if answer_part >= 0 else -1,
                       starts[box_part] if box_part >= 0 else -1, image_starts)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([to_pixels(i) for i in images])

    # --- vision-tower examples (stage 1) --------------------------------------------------------
    def vision_examples(self) -> list[tuple[Image.Image, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """A scene's full image and a served-style crop of it, each with per-patch targets on the 8x8
        grid: the sign colour at the patch's centre (0: none), the dot colour whose centre is in the
        patch (0: none), and the covering sign's box (0-1 of the image's width and height) for regression."""
        scene, image = self.scene()
        signs = [(s.colour, s.dot, s.rect, s.dot_rect) for s in scene.signs]
        out = [self._patch_targets(image, signs, dots=False)]
        sign = self.rng.choice(scene.signs)
        plan = plan_crop(self.served_box(sign.rect), *image.size)
        if plan.usable:
            x0, y0 = plan.rect[:2]
            out.append(self._patch_targets(image.crop(plan.rect),
                                           [(c, d, _shift(r, x0, y0), _shift(dr, x0, y0)) for c, d, r, dr in signs],
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
                        # On 0-1 of the image's own width and height, as the box reply writes it: the
                        # numbers the language model says are then one linear read of a patch's features.
                        boxes[k] = torch.tensor([r[0] / w, r[1] / h, r[2] / w, r[3] / h])
                    dcx, dcy = (dr[0] + dr[2]) / 2 + ox, (dr[1] + dr[3]) / 2 + oy
                    if j * cell <= dcx < (j + 1) * cell and i * cell <= dcy < (i + 1) * cell:
                        dot[k] = COLOUR_NAMES.index(d) + 1
        for _, _, r, _ in signs:  # a sign smaller than a patch may cover no patch's centre: its centre's patch
            k = patch_at(image.size, ((r[0] + r[2]) / 2, (r[1] + r[3]) / 2))
            if boxes[k, 0] < 0 and 0 <= (r[0] + r[2]) / 2 < w and 0 <= (r[1] + r[3]) / 2 < h:
                boxes[k] = torch.tensor([r[0] / w, r[1] / h, r[2] / w, r[3] / h])
        if not dots:
            dot[:] = -100
        return self.adapter.model_image(image), colour, dot, boxes


def _square_cell(size: tuple[int, int]) -> tuple[float, float, float]:
    """(x offset, y offset, patch side) of the padded square a `size` image becomes, in its pixels."""
    w, h = size
    side = max(w, h)
    return (side - w) // 2, (side - h) // 2, side / GRID


def patch_at(size: tuple[int, int], point: tuple[float, float]) -> int:
    """The index (row-major on the 8x8 grid) of the patch that shows `point` of a `size` image."""
    ox, oy, cell = _square_cell(size)
    j = min(GRID - 1, max(0, int((point[0] + ox) // cell)))
    i = min(GRID - 1, max(0, int((point[1] + oy) // cell)))
    return i * GRID + j


def patches_over(size: tuple[int, int], rect) -> list[int]:
    """The patches a rectangle of a `size` image overlaps."""
    ox, oy, cell = _square_cell(size)
    j0, j1 = int((rect[0] + ox) // cell), int((rect[2] - 1 + ox) // cell)
    i0, i1 = int((rect[1] + oy) // cell), int((rect[3] - 1 + oy) // cell)
    return [i * GRID + j for i in range(max(0, i0), min(GRID - 1, i1) + 1) for j in range(max(0, j0), min(GRID - 1, j1) + 1)]


def _centre(r) -> tuple[float, float]:
    return (r[0] + r[2]) / 2, (r[1] + r[3]) / 2


def _keys(image_start: int, offsets: list[int | None]) -> list[int]:
    """Token positions of image-token offsets, None being the sink."""
    return [SINK if k is None else image_start + k for k in offsets]


def _shift(r, x0: int, y0: int) -> tuple[int, int, int, int]:
    return (r[0] - x0, r[1] - y0, r[2] - x0, r[3] - y0)


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
                batch["patch_words"] = torch.cat([w for e in examples for w in e.patch_words])
                batch["patch_boxes"] = torch.cat([b for e in examples for b in e.patch_boxes])
                batch["focus"] = [(i, q, keys, heads) for i, e in enumerate(examples) for q, keys, heads in e.focus]  # type: ignore[assignment]
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
