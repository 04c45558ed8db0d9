"""The synthetic zoom-in task: signs with a small dot, and questions about them.

A scene is a muted background with a few muted clutter shapes and 1-3 signs: filled squares of
48-96 px, each in a different named colour, each with a filled dot of 10-16 px in its middle
third, in another named colour. At the model's 112 px input a 960 px scene shrinks 8.6x: a sign
is still 6-11 px (about a patch of 14 px), the dot 1-2 px, mixed into its sign's colour; on the
crop the served pipeline makes around a sign (box -> square -> +25 px each side, 98-146 px) the
dot is 8-18 px: resolvable. So detail questions need the zoom; global ones do not.

Question texts and names are fixed (other checks use them). Seeds: a scene is a pure function of
its seed; training draws seeds below TEST_SEED_BASE, test sets at or above it, so they never meet.
Only Pillow is needed here: the evaluation imports this module.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "orange": (245, 140, 20), "purple": (140, 60, 180), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)

DETAIL = "What colour is the dot on the {colour} sign?"
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
COUNT = "How many signs are in the image?"
PRESENCE = "Is there a {colour} sign in the image?"
# The kinds of question, in the order reports list them.
KINDS = ("detail", "detail_mc", "count", "presence")
GLOBAL_KINDS = ("count", "presence")

TEST_SEED_BASE = 1_000_000_000  # test scenes: seeds >= this; training scenes: below


@dataclass(frozen=True)
class Sign:
    colour: str
    dot: str
    rect: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive
    dot_rect: tuple[int, int, int, int]


@dataclass
class Scene:
    seed: int
    image: Image.Image
    signs: list[Sign] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def sign(self, colour: str) -> Sign:
        return next(s for s in self.signs if s.colour == colour)

    def signs_region(self) -> tuple[int, int, int, int]:
        """The rectangle that holds every sign: the box for a global question."""
        return (min(s.rect[0] for s in self.signs), min(s.rect[1] for s in self.signs),
                max(s.rect[2] for s in self.signs), max(s.rect[3] for s in self.signs))


@dataclass(frozen=True)
class Question:
    kind: str  # one of KINDS
    text: str
    answer: str  # the colour word, the option letter, "1"-"3", "yes"/"no"
    box: tuple[int, int, int, int]  # the region the question asks about, pixels of the scene
    asked_sign: tuple[int, int, int, int] | None = None  # detail questions: the asked sign
    answer_text: str | None = None  # multiple choice: the chosen option's text

    @property
    def scoring_answer(self) -> str:
        """The answer as the fusion step scores it (an option's text, not its letter)."""
        return self.answer_text or self.answer


def _muted(rng: random.Random, lo: int = 70, hi: int = 180, tint: int = 22) -> tuple[int, int, int]:
    """A greyish colour, far from every named colour."""
    base = rng.randint(lo, hi)
    return tuple(max(0, min(255, base + rng.randint(-tint, tint))) for _ in range(3))  # type: ignore[return-value]


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def make_scene(seed: int, n_signs: int | None = None) -> Scene:
    """The scene of `seed` (the same seed gives the same scene), rendered as a clean PNG-like image."""
    rng = random.Random(seed)
    width, height = rng.randint(480, 960), rng.randint(360, 720)
    image = Image.new("RGB", (width, height), _muted(rng, 90, 170, 18))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):  # clutter: muted rectangles and ellipses, under the signs
        w, h = rng.randint(20, 160), rng.randint(20, 160)
        x, y = rng.randint(-w // 2, width - w // 2), rng.randint(-h // 2, height - h // 2)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x, y, x + w, y + h), fill=_muted(rng, 50, 200, 25))
    n = n_signs or rng.randint(1, 3)
    colours = rng.sample(COLOUR_NAMES, n)
    signs: list[Sign] = []
    while len(signs) < n:
        side = rng.randint(48, 96)
        x, y = rng.randint(8, width - side - 8), rng.randint(8, height - side - 8)
        rect = (x, y, x + side, y + side)
        if any(_overlaps(rect, s.rect, 24) for s in signs):
            continue
        colour = colours[len(signs)]
        dot = rng.choice([c for c in COLOUR_NAMES if c != colour])
        d = rng.randint(10, 16)
        # The dot's centre lies in the sign's middle third.
        cx = x + side / 3 + rng.random() * side / 3
        cy = y + side / 3 + rng.random() * side / 3
        dot_rect = (round(cx - d / 2), round(cy - d / 2), round(cx - d / 2) + d, round(cy - d / 2) + d)
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=COLOURS[colour])
        draw.ellipse((dot_rect[0], dot_rect[1], dot_rect[2] - 1, dot_rect[3] - 1), fill=COLOURS[dot])
        signs.append(Sign(colour, dot, rect, dot_rect))
    return Scene(seed, image, signs)


def vary_rendering(image: Image.Image, rng: random.Random) -> Image.Image:
    """Training's rendering variation: slight blur and JPEG at varied quality, sometimes neither."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.9)))
    if rng.random() < 0.7:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=rng.randint(55, 95))
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return image


def make_questions(scene: Scene, rng: random.Random) -> list[Question]:
    """One question of each kind about `scene`."""
    region = scene.signs_region()
    sign = rng.choice(scene.signs)
    options = [sign.dot] + rng.sample([c for c in COLOUR_NAMES if c not in (sign.dot, sign.colour)], 3)
    rng.shuffle(options)
    letters = "ABCD"
    mc_text = (DETAIL.format(colour=sign.colour) + "".join(f"\n{letters[i]}. {o}" for i, o in enumerate(options))
               + MC_SUFFIX)
    present = {s.colour for s in scene.signs}
    asked = rng.choice(sorted(present)) if rng.random() < 0.5 else rng.choice(
        [c for c in COLOUR_NAMES if c not in present])
    return [
        Question("detail", DETAIL.format(colour=sign.colour), sign.dot, sign.rect, sign.rect),
        Question("detail_mc", mc_text, letters[options.index(sign.dot)], sign.rect, sign.rect, answer_text=sign.dot),
        Question("count", COUNT, str(len(scene.signs)), region),
        Question("presence", PRESENCE.format(colour=asked), "yes" if asked in present else "no", region),
    ]


def box_text(box: tuple[float, float, float, float], width: int, height: int) -> str:
    """A box in pixels as the LLaVA family writes it: [x1, y1, x2, y2] on 0-1 of width and height."""
    x1, y1, x2, y2 = box
    vals = [x1 / width, y1 / height, x2 / width, y2 / height]
    return "[" + ", ".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in vals) + "]"


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_test_set(n_questions: int, seed: int = 0) -> list[tuple[Scene, Question]]:
    """`n_questions` test questions (kinds in turn: detail, detail_mc, count, presence), one scene each.
    Scene seeds start at TEST_SEED_BASE + seed * 1_000_000, disjoint from training's."""
    out = []
    for i in range(n_questions):
        scene_seed = TEST_SEED_BASE + seed * 1_000_000 + i
        scene = make_scene(scene_seed)
        questions = make_questions(scene, random.Random(scene_seed))
        out.append((scene, questions[i % len(KINDS)]))
    return out
