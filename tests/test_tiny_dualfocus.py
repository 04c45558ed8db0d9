"""tiny-dualfocus, the trained default: the task is defined once, the checkpoint is the one committed, and
on a fixed 100-question slice through the real server DualFocus's gain over a single macro pass on
open-ended detail questions is at least the issue's +25 points (training/tiny-dualfocus/README.md), and
few answers fall outside the task's words."""

import hashlib
import json
import random
import subprocess
import sys
import time

import pytest

from engine.tiny import TRAINED_MODELS
from training.task import (
    COLOURS,
    DETAIL,
    KINDS,
    TEST_SEED_BASE,
    box_text,
    iou,
    make_questions,
    make_scene,
    make_test_set,
)

from .conftest import start_server

CHECKPOINT = TRAINED_MODELS["tiny-dualfocus"]

# The gains (DualFocus - macro, points) this test demands on the slice's 25 open-ended and 25
# multiple-choice detail questions. The committed checkpoint gains +48 and +0 there (+39 and +0 on
# 400 questions; training/tiny-dualfocus/README.md): it reads the dot off the crop but has not learned
# to map it to an option's letter. The detail margin is the (+25); a model or fusion that
# stops reading the crop gains ~0 and fails.
MIN_DETAIL_GAIN = 25.0
MIN_MULTIPLE_CHOICE_GAIN = -12.0
# Answers outside the task's words: the checkpoint's micro pass sometimes goes on with the box's
# tail (e.g. `02, 0]`): 11 of 100 open-ended detail answers on 400 questions, 0 elsewhere.
MAX_OFF_TASK_SHARE = 0.2
ALLOWED = {"detail": set(COLOURS), "detail_mc": set("ABCD"), "count": {"1", "2", "3"}, "presence": {"yes", "no"}}


def test_scenes_follow_the_task_definition():
    for seed in range(50):
        scene = make_scene(seed)
        w, h = scene.size
        assert 480 <= w <= 960 and 360 <= h <= 720 and 1 <= len(scene.signs) <= 3
        assert len({s.colour for s in scene.signs}) == len(scene.signs)
        for s in scene.signs:
            side = s.rect[2] - s.rect[0]
            assert side == s.rect[3] - s.rect[1] and 48 <= side <= 96 and s.dot != s.colour
            assert 10 <= s.dot_rect[2] - s.dot_rect[0] <= 16
            # the dot's centre in the sign's middle third, and drawn in its colour there
            cx, cy = (s.dot_rect[0] + s.dot_rect[2]) / 2, (s.dot_rect[1] + s.dot_rect[3]) / 2
            assert s.rect[0] + side / 3 - 1 <= cx <= s.rect[0] + 2 * side / 3 + 1
            assert scene.image.getpixel((int(cx), int(cy))) == COLOURS[s.dot]
            assert scene.image.getpixel((s.rect[0] + 2, s.rect[1] + 2)) == COLOURS[s.colour]
    assert make_scene(7).image.tobytes() == make_scene(7).image.tobytes()  # a scene is its seed


def test_questions_and_answers_are_the_scene_s():
    scene = make_scene(3)
    detail, mc, count, presence = make_questions(scene, random.Random(0))
    sign = next(s for s in scene.signs if detail.text == DETAIL.format(colour=s.colour))
    assert detail.answer == sign.dot and detail.box == sign.rect
    letter_line = next(line for line in mc.text.splitlines() if line.startswith(mc.answer + ". "))
    assert letter_line == f"{mc.answer}. {sign.dot}" and mc.text.endswith(
        "\nAnswer with the option's letter from the given choices directly.")
    assert count.answer == str(len(scene.signs)) and count.text == "How many signs are in the image?"
    assert presence.answer in ("yes", "no")
    w, h = scene.size
    assert box_text((0, 0, w, h), w, h) == "[0.00, 0.00, 1.00, 1.00]"
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_test_scenes_never_are_training_scenes():
    pairs = make_test_set(8)
    assert [q.kind for _, q in pairs] == list(KINDS) * 2
    assert all(scene.seed >= TEST_SEED_BASE for scene, _ in pairs)


def test_the_committed_checkpoint_is_the_one_its_readme_names():
    readme = (CHECKPOINT / "README.md").read_text()
    digest = hashlib.sha256((CHECKPOINT / "model.safetensors").read_bytes()).hexdigest()
    assert digest in readme
    assert (CHECKPOINT / "model.safetensors").stat().st_size < 30 * 2**20


@pytest.mark.server
def test_dualfocus_detail_gain_on_the_trained_model_and_answers_the_task_allows(tmp_path):
    server = start_server(tmp_path, "--model", "tiny-dualfocus")
    try:
        t0 = time.monotonic()
        out = tmp_path / "eval"
        run = subprocess.run([sys.executable, "-m", "clients", "eval", "--generate", "100", "--seed", "0",
                              "--out", str(out), "--url", server.base_url, "--concurrency", "8"],
                             capture_output=True, text=True, timeout=600, check=False)
        elapsed = time.monotonic() - t0
    finally:
        server.process.terminate()
        server.process.wait(timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    task = json.loads((out / "summary.json").read_text())["task"]
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    detail, mc = task["kinds"]["detail"], task["kinds"]["detail_mc"]
    print(run.stdout, f"\n{elapsed:.0f} s")
    assert detail["dualfocus"] >= detail["macro"] + MIN_DETAIL_GAIN, run.stdout
    assert mc["dualfocus"] >= mc["macro"] + MIN_MULTIPLE_CHOICE_GAIN, run.stdout
    off_task = []
    for line in (out / "answers-dualfocus.jsonl").read_text().splitlines():
        answer = json.loads(line)
        kind = next(q["kind"] for q in questions if q["question_id"] == answer["question_id"])
        if answer["text"].strip() not in ALLOWED[kind]:
            off_task.append(answer["text"])
        assert answer["metadata"]["box"] is not None and answer["metadata"]["crop"] is not None, answer
    assert len(off_task) <= MAX_OFF_TASK_SHARE * len(questions), off_task
    assert elapsed < 120 * 2  # the 2 minutes, with room for a busy machine


def test_training_examples_teach_the_served_prompts_and_point_at_image_tokens():
    from training.data import IMAGE_TOKENS, SINK, ExampleMaker
    from training.model import build_tokenizer

    tokenizer = build_tokenizer()
    maker = ExampleMaker(tokenizer, seed=5)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    system = maker.adapter.conversation_prefix([], 1).ids(maker.adapter)
    kinds = set()
    for _ in range(12):
        for e in maker.examples():
            kinds.add(e.kind)
            # the served conversation's opening, then one block of image tokens per image
            assert e.ids[: len(system) - 1] == system[:-1] and len(e.image_starts) == len(e.images)
            for start in e.image_starts:
                assert e.ids[start : start + IMAGE_TOKENS] == [image_id] * IMAGE_TOKENS
            image_positions = {s + k for s in e.image_starts for k in range(IMAGE_TOKENS)}
            assert e.focus, e.kind
            for q, keys, heads in e.focus:  # each focus is read where a taught token is predicted, from image
                assert e.labels[q + 1] != -100 and keys and heads  # tokens (or, a box head not reading, the sink)
                assert set(keys) <= image_positions | {SINK}
            box_reads = [(q, keys[0]) for q, keys, _ in e.focus if keys != [SINK] and q + 1 != e.answer_at]
            if e.box_at >= 0:  # a taught box: four numbers, each read by its own head from one image token
                assert len(box_reads) == 4 and all(k in image_positions for _, k in box_reads)
            words = {maker.colour_word[i] for i in range(len(COLOURS))}
            for w in e.patch_words:
                assert set(w[w != -100].tolist()) <= words
            if e.kind in ("micro", "scoring") and "dot" in tokenizer.decode(e.ids[-30:]):
                # a detail answer is read off the crop (the second image), where its dot's word is
                q, keys, _ = e.focus[-1]
                assert q == e.answer_at - 1 and min(keys) >= e.image_starts[1]
                crop_words = e.patch_words[1][[k - e.image_starts[1] for k in keys]].tolist()
                assert e.ids[e.answer_at] in crop_words or e.ids[e.answer_at] not in words
    assert kinds == {"macro", "box", "micro", "scoring"}
