"""`dualfocus eval`: scoring proven on hand-written answers, and the harness end to end against the
session server on a synthetic set with known answers."""

import json
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from clients.eval import normalize_answer, option_letter, parse_options, score, vqa_accuracy
from clients.eval.harness import Answer, report, summarize

from .conftest import RunningServer

# --- answer normalisation and VQA accuracy ------------------------------------------------------------


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"), ("two dogs.", "2 dogs"), ("None", "0"), ("ten", "10"),  # number words
    ("The red car", "red car"), ("a cat", "cat"), ("an apple", "apple"),  # articles
    ("Yes!", "yes"), ("yes?", "yes"), ("(red)", "red"), ('"stop"', "stop"),  # punctuation next to nothing
    ("coca-cola", "coca cola"), ("red/white", "red white"),  # ... inside a word: a space
    ("red - white", "red white"),  # ... beside a space: dropped
    ("1,000", "1000"), ("3.5", "3.5"), ("end.", "end"), ("U.S.A.", "usa"),  # commas and periods
    ("dont", "don't"), ("isnt", "isn't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("yall", "y'all"), ("im", "im"),  # contractions, and the official table's capitalised "Im" never matching
    ("man's hat", "man 's hat"), ("  Big\tDog\n", "big dog"),
])
def test_answers_are_normalised_as_the_vqa_evaluators_do(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_is_min_matches_over_3_averaged_over_leave_one_out_annotators():
    ten = lambda n, a="red": [a] * n + ["blue"] * (10 - n)  # noqa: E731
    assert vqa_accuracy("red", ten(10)) == 1.0
    assert vqa_accuracy("red", ten(4)) == 1.0  # 3 others agree whoever is left out
    assert vqa_accuracy("red", ten(3)) == pytest.approx(0.9)  # 3 subsets of 9 hold 2 matches, 7 hold 3
    assert vqa_accuracy("red", ten(2)) == pytest.approx(0.6)  # (2 x 1/3 + 8 x 2/3) / 10
    assert vqa_accuracy("red", ten(1)) == pytest.approx(0.3)  # (0 + 9 x 1/3) / 10
    assert vqa_accuracy("green", ten(5)) == 0.0
    assert vqa_accuracy("The Red.", ten(10)) == 1.0  # normalised on both sides
    assert vqa_accuracy("two", ["2"] * 10) == 1.0 and vqa_accuracy("2", ["two"] * 10) == 1.0
    assert vqa_accuracy("red", ["Red"]) == 1.0 and vqa_accuracy("blue", ["red"]) == 0.0  # one answer: exact


SEED_STYLE = ("What colour is the square?\nA. red\nB. blue\nC. green\nD. yellow\n"
              "Answer with the option's letter from the given choices directly.")


def test_options_are_read_from_the_question_text():
    assert parse_options(SEED_STYLE) == {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    assert parse_options("Which?\n(A) left\n(B) right") == {"A": "left", "B": "right"}
    assert parse_options("What is it?\nReference OCR token: A. B.") == {}  # one line is not a choice
    assert parse_options("Where?\nB. left\nC. right") == {}  # must start at A


@pytest.mark.parametrize("prediction, letter", [
    ("A", "A"), ("A.", "A"), ("(A)", "A"), ("A. red", "A"), ("A red", "A"), ("a", "A"), (" B\n", "B"),
    ("red", "A"), ("Yellow.", "D"),  # an option's text in full
    ("E", None), ("a red one", None), ("The answer is B", None), ("", None), ("reddish", None),
])
def test_the_predicted_option_letter(prediction, letter):
    assert option_letter(prediction, parse_options(SEED_STYLE)) == letter


def test_score_picks_the_kind_from_the_ground_truth():
    mc = {"question_id": 1, "text": SEED_STYLE, "answer": "A"}
    assert score(mc, "A") == 1.0 and score(mc, "red") == 1.0 and score(mc, "B") == 0.0 and score(mc, "") == 0.0
    assert score({**mc, "answer": "red"}, "A") == 1.0  # ground truth given as the option's text (GQA-MCQ)
    vqa = {"question_id": 2, "text": "What does the sign say?", "answers": ["stop"] * 3 + ["halt"] * 7}
    assert score(vqa, "Stop.") == pytest.approx(0.9) and score(vqa, "halt") == 1.0 and score(vqa, "go") == 0.0
    exact = {"question_id": 3, "text": "How many shapes?", "answer": "two"}
    assert score(exact, "2") == 1.0 and score(exact, "3") == 0.0
    assert score({"question_id": 4, "text": "What?"}, "anything") is None  # no ground truth: not scored
    with pytest.raises(ValueError, match="none of its options"):
        score({**mc, "answer": "purple"}, "A")


class FakeResult:
    def __init__(self, answer, mode="dualfocus", chosen="macro", gate=None):
        self.answer, self.mode, self.chosen, self.gate = answer, mode, chosen, gate


def test_summary_and_report_put_the_modes_side_by_side():
    mc = {"question_id": 1, "text": SEED_STYLE, "answer": "A"}
    vqa = {"question_id": 2, "text": "Sign?", "answers": ["stop"] * 10}
    none = {"question_id": 3, "text": "Unscored?"}
    macro = [Answer(mc, "macro", FakeResult("B", "macro")), Answer(vqa, "macro", FakeResult("stop", "macro")),
             Answer(none, "macro", FakeResult("x", "macro"))]
    dualfocus = [Answer(mc, "dualfocus", FakeResult("A", chosen="micro")),
                 Answer(vqa, "dualfocus", error="server unreachable"),
                 Answer(none, "dualfocus", FakeResult("y", chosen="same"))]
    summaries = {"macro": summarize(macro), "dualfocus": summarize(dualfocus)}
    assert summaries["macro"]["accuracy"] == 50.0 and summaries["dualfocus"]["accuracy"] == 50.0
    assert summaries["dualfocus"]["by_kind"] == {"vqa": {"questions": 1, "accuracy": 0.0},
                                                 "multiple_choice": {"questions": 1, "accuracy": 100.0}}
    assert summaries["dualfocus"]["errors"] == 1 and summaries["macro"]["errors"] == 0
    assert summaries["dualfocus"]["chosen"] == {"micro": 1, "same": 1} and summaries["macro"]["chosen"] == {}
    text = report(summaries)
    lines = text.splitlines()
    assert lines[0].split() == ["macro", "dualfocus"]
    accuracy = next(line for line in lines if line.startswith("accuracy"))
    assert accuracy.split()[1:3] == ["50.00", "50.00"] and "of 2 questions with ground truth, of 3" in accuracy
    assert "dualfocus - macro: +0.00" in accuracy
    assert any(line.split()[:4] == ["multiple", "choice", "accuracy", "0.00"] and "100.00" in line for line in lines)
    assert "dualfocus chose: macro 0 (0%), micro 1 (50%), same 1 (50%)" in text


# --- end to end against the session server --------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (230, 210, 40)}


def synthetic_set(folder):
    """Eight scenes with known answers: four open-ended (10 human answers each, VQA-style, with
    some disagreement as real annotators have) and four multiple choice (SEED-style)."""
    (folder / "images").mkdir(parents=True)
    questions = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (320 + 32 * i, 240), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        draw.rectangle((40 + 20 * i, 50, 150 + 20 * i, 160), fill=rgb)
        draw.ellipse((200, 120, 260, 180), fill=(255, 255, 255))
        image.save(folder / "images" / f"scene{i}.png")
        questions.append({"question_id": f"vqa-{i}", "image": f"scene{i}.png",
                          "text": "What colour is the square?\nAnswer the question using a single word or phrase.",
                          "answers": [name] * 8 + ["dark " + name, "unsure"]})
        options = list(COLOURS)
        questions.append({"question_id": 100 + i, "image": f"scene{i}.png",
                          "text": "What colour is the square?\n"
                                  + "\n".join(f"{chr(65 + k)}. {c}" for k, c in enumerate(options))
                                  + "\nAnswer with the option's letter from the given choices directly.",
                          "answer": chr(65 + i), "category": "colour"})
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path, questions


def run_eval(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "clients", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.server
def test_eval_end_to_end_writes_reference_answer_files_and_scores_them(server, tmp_path):
    path, questions = synthetic_set(tmp_path)
    out = run_eval(path, "--images", tmp_path / "images", "--mode", "both", "--url", server.base_url,
                   "--api-key", RunningServer.API_KEY, "--out", tmp_path / "out", "--concurrency", "3",
                   "--max-tokens", "6")
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    by_id = {q["question_id"]: q for q in questions}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == "tiny-llava" and set(summary["modes"]) == {"macro", "dualfocus"}
    for mode in ("macro", "dualfocus"):
        rows = [json.loads(line) for line in (tmp_path / "out" / f"answers-{mode}.jsonl").read_text().splitlines()]
        # The reference's answer format, one line per question, in question order.
        assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
        for r in rows:
            assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
            assert r["prompt"] == by_id[r["question_id"]]["text"] and r["model_id"] == "tiny-llava"
            assert len(r["answer_id"]) == 22 and r["metadata"]["mode"] == mode
            # Each recorded score is the scorer's verdict on the answer written next to it.
            assert r["metadata"]["score"] == score(by_id[r["question_id"]], r["text"])
            if mode == "dualfocus":
                m = r["metadata"]
                assert m["chosen"] in ("macro", "micro", "same") and m["box"].startswith("[")
                assert r["text"] == (m["micro_answer"] if m["chosen"] == "micro" else m["macro_answer"])
        assert len({r["answer_id"] for r in rows}) == len(rows)
        # The summary's accuracy is the mean of those scores.
        s = summary["modes"][mode]
        assert s["questions"] == s["scored"] == 8 and s["errors"] == 0
        assert s["accuracy"] == pytest.approx(100 * sum(r["metadata"]["score"] for r in rows) / 8)
        assert s["by_kind"]["vqa"]["questions"] == 4 and s["by_kind"]["multiple_choice"]["questions"] == 4
    chosen = summary["modes"]["dualfocus"]["chosen"]
    assert sum(chosen.values()) == 8

    # Printed: the two modes side by side, and how often DualFocus chose each answer.
    lines = out.stdout.splitlines()
    accuracy = next(line for line in lines if line.startswith("accuracy"))
    values = accuracy.split()[1:3]
    assert values == [f"{summary['modes'][m]['accuracy']:.2f}" for m in ("macro", "dualfocus")]
    assert next(line for line in lines if line.startswith("dualfocus chose:")).count("(") == 4
    assert "eval" in out.stderr and "16/16" in out.stderr  # the progress bar, on stderr


@pytest.mark.server
def test_eval_one_mode_and_a_limit_and_right_answers_score(server, tmp_path):
    path, questions = synthetic_set(tmp_path)
    common = ("--images", tmp_path / "images", "--mode", "macro", "--url", server.base_url,
              "--api-key", RunningServer.API_KEY, "--concurrency", "1", "--max-tokens", "4")
    out = run_eval(path, *common, "--out", tmp_path / "out", "--limit", "3", "--model-id", "my-model")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["answers-macro.jsonl", "summary.json"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "answers-macro.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {r["model_id"] for r in rows} == {"my-model"}
    assert all(r["metadata"]["chosen"] == "macro" and r["metadata"]["micro_answer"] is None for r in rows)
    assert out.stdout.splitlines()[0].split() == ["macro"] and "dualfocus chose" not in out.stdout

    # The random model's answers are gibberish; make them the ground truth (greedy: the same answers
    # again) and the harness must score every one right, through the whole path.
    known = tmp_path / "known.jsonl"
    known.write_text(
        "".join(json.dumps({**q, "answers": [r["text"]] * 10}) + "\n" for q, r in zip(questions[:3], rows, strict=True))
    )
    out = run_eval(known, *common, "--out", tmp_path / "out2")
    assert out.returncode == 0, out.stderr
    assert next(line for line in out.stdout.splitlines() if line.startswith("accuracy")).split()[1] == "100.00"


def test_eval_says_clearly_what_is_wrong_with_its_input(tmp_path):
    path, questions = synthetic_set(tmp_path)
    common = ("--out", tmp_path / "out", "--url", "http://127.0.0.1:9")
    out = run_eval(path, "--images", tmp_path, *common)
    assert out.returncode == 2 and "image " in out.stderr and "not found (is --images the right folder?)" in out.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "image": "scene0.png"}) + "\n")
    out = run_eval(bad, "--images", tmp_path / "images", *common)
    assert out.returncode == 2 and "line 1: no text" in out.stderr
    bad.write_text(json.dumps({**questions[1], "answer": "Z"}) + "\n")
    out = run_eval(bad, "--images", tmp_path / "images", *common)
    assert out.returncode == 2 and "answer 'Z' is none of the options A, B, C, D" in out.stderr
    out = run_eval(path, "--images", tmp_path / "images", *common)
    assert out.returncode == 1 and "cannot reach the DualFocus server" in out.stderr
    assert not (tmp_path / "out").exists()  # nothing written when nothing was asked


def test_mode_auto_is_summarised_with_how_often_it_zoomed_and_its_gate_is_written(tmp_path):
    from clients.eval.harness import write_answers
    from clients.python.result import AskResult, Gate, Usage

    mc = {"question_id": 1, "text": SEED_STYLE, "answer": "A"}
    vqa = {"question_id": 2, "text": "Sign?", "answers": ["stop"] * 10}
    zoomed = Gate(True, "unsure", 0.3, 0.4, True, 0.1, 0.5, False)  # the multiple-choice question: its own threshold
    kept = Gate(False, "confident", 0.9, 0.5, False, None, 0.5, True)
    auto = [Answer(mc, "auto", AskResult("A", Usage(1, 0, 1), mode="auto", chosen="micro", gate=zoomed)),
            Answer(vqa, "auto", AskResult("go", Usage(1, 0, 1), mode="auto", chosen="macro", gate=kept))]
    summary = summarize(auto)
    assert summary["accuracy"] == 50.0 and (summary["zoomed"], summary["gated"]) == (1, 2)
    assert "auto zoomed: 1 of 2 (50%)" in report({"auto": summary})
    write_answers(auto, tmp_path / "answers-auto.jsonl", "m")
    rows = [json.loads(line) for line in (tmp_path / "answers-auto.jsonl").read_text().splitlines()]
    assert rows[1]["metadata"]["gate"] == {"zoomed": False, "why": "confident", "confidence": 0.9, "threshold": 0.5,
                                           "multiple_choice": False, "box_area": None, "max_box_area": 0.5,
                                           "box_aborted": True}
    assert rows[0]["metadata"]["gate"]["multiple_choice"] and rows[0]["metadata"]["gate"]["threshold"] == 0.4
    assert "zoomed" not in summarize([Answer(mc, "macro", FakeResult("A", "macro"))])
