"""Synthetic scenes with questions: shapes on a background, several image sizes."""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZES = [(640, 480), (800, 600), (1024, 768), (480, 640)]
QUESTIONS = ["What colour is the square?", "Where is the disc?", "How many shapes are there?",
             "What is in the top left corner?", "Which shape is the largest?", "What colour is the background?",
             "Is there a triangle?", "What is on the right side?"]


@dataclass
class Item:
    image_url: str  # a base64 data URL
    question: str
    width: int
    height: int
    kind: str | None = None  # the generated task's kind of question (training/task.py), if from it


def synthetic(n: int, seed: int = 0) -> list[Item]:
    """n distinct scenes (different images, so the prefix cache cannot share across questions)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        image = Image.new("RGB", (w, h), tuple(rng.randrange(60, 200) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randrange(2, 5)):
            x, y = rng.randrange(0, w - 60), rng.randrange(0, h - 60)
            s = rng.randrange(30, min(w, h) // 3)
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x, y, x + s, y + s), fill=colour)
        items.append(Item(to_data_url(image), QUESTIONS[i % len(QUESTIONS)], w, h))
    return items


def task(n: int, seed: int) -> list[Item]:
    """n questions of the generated zoom-in task tiny-dualfocus is trained on: the test set of `seed`
    that `dualfocus eval --generate n --seed SEED` writes (training/task.py; one scene each, kinds in
    turn: detail, detail_mc, count, presence). Each seed's scenes are its own, disjoint from training's."""
    from training.task import make_test_set

    return [
        Item(to_data_url(scene.image), q.text, *scene.image.size, kind=q.kind) for scene, q in make_test_set(n, seed)
    ]


def from_folder(folder: Path, questions_file: Path) -> list[Item]:
    """Images in a folder with a JSONL questions file: {"image": "name.jpg", "text": "question"} per line."""
    items = []
    for line in questions_file.read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            image = Image.open(folder / q["image"])
            items.append(Item(to_data_url(image), q.get("text") or q["question"], *image.size))
    return items


def to_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def from_data_url(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
