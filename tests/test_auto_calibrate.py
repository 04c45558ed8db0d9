"""Mode auto's calibration: replaying thresholds from one eval, joining a sweep, the sweep's task load."""

import json
from pathlib import Path

import pytest
from PIL import Image

from loadtests import auto_calibrate, auto_sweep, scenes
from loadtests.auto_calibrate import CalibrationError, calibrate, configuration_table, load_run, main
from loadtests.report import section

ROOT = Path(__file__).resolve().parent.parent
MC = "What colour is the dot on the red sign?\nA. green\nB. blue\nAnswer with the option's letter."

# question_id: (kind, text, ground truth, macro mode's answer, dualfocus mode's answer, auto's gate at threshold 1)
# A gate: (confidence, zoomed, why, box_area); auto's text is dualfocus's answer if it zoomed, else macro's.
QUESTIONS = {
    0: ("detail", "What colour is the dot on the red sign?", "green", "blue", "green", (0.3, True, "unsure", 0.1)),
    1: ("detail_mc", MC, "A", "B", "A", (0.5, True, "unsure", 0.1)),
    # Unsure but the box covers most of the image: skipped at every threshold, dualfocus's gain lost.
    2: ("detail", "What colour is the dot on the blue sign?", "red", "white", "red",
        (0.2, False, "box covers most of the image", 0.8)),
    3: ("detail_mc", MC, "B", "B", "B", (0.9, True, "unsure", 0.05)),
    4: ("count", "How many signs are in the image?", "2", "2", "2", (0.95, True, "unsure", 0.2)),
    5: ("count", "How many signs are in the image?", "3", "3", "1", (0.6, True, "unsure", 0.2)),  # zoom hurts
    6: ("presence", "Is there a red sign in the image?", "yes", "Yes", "yes", (1.0, False, "confident", None)),
    7: ("presence", "Is there a blue sign in the image?", "no", "yes", "yes", (0.1, False, "box unparsed", None)),
}
# By hand: macro  detail 1/4 = 25%, global 3/4 = 75%, mix 4/8 = 50%;
#          dualfocus detail 4/4 = 100%, global 2/4 = 50%, mix 6/8 = 75%: gain 25 points (detail 75).


def write_eval(folder: Path, questions=QUESTIONS, failed=(), run_threshold=1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "questions.jsonl").open("w") as f:
        for qid, (kind, text, truth, *_) in questions.items():
            f.write(json.dumps({"question_id": qid, "image": f"scene-{qid}.png", "text": text, "answer": truth,
                                "kind": kind}) + "\n")
    for mode in ("macro", "dualfocus", "auto"):
        with (folder / f"answers-{mode}.jsonl").open("w") as f:
            for qid, (_, text, _, macro, dualfocus, (conf, zoomed, why, area)) in questions.items():
                meta: dict = {"mode": mode, "score": None}
                if mode == "macro":
                    answer = macro
                elif mode == "dualfocus":
                    answer = dualfocus
                    meta.update(macro_answer=macro, micro_answer=dualfocus)
                elif qid in failed:
                    answer, meta["error"] = "", "HTTP 500"
                else:
                    if conf >= run_threshold:  # a run at a lower threshold: confident there
                        zoomed, why = False, "confident"
                    answer = dualfocus if zoomed else macro
                    meta.update(macro_answer=macro, micro_answer=dualfocus if zoomed else None, gate={
                        "zoomed": zoomed, "why": why, "confidence": conf, "threshold": run_threshold,
                        "box_area": area, "max_box_area": 0.5, "box_aborted": why == "confident"})
                f.write(json.dumps({"question_id": qid, "prompt": text, "text": answer, "answer_id": "x",
                                    "model_id": "tiny-dualfocus", "metadata": meta}) + "\n")
    return folder


def rows_by_threshold(result):
    return {r["threshold"]: r for r in result["rows"]}


def test_the_replay_takes_the_macro_answer_where_the_gate_would_skip(tmp_path):
    # No choice thresholds: one threshold for both forms, as the gate had before it held multiple-choice
    # questions to their own (that replay: test_the_replay_holds_multiple_choice_questions_to_their_own_threshold).
    result = calibrate(load_run(write_eval(tmp_path / "eval")), [0, 0.3, 0.4, 0.5, 0.6, 0.7, 1])
    base = result["baselines"]
    assert base["macro"]["accuracy"] == {"detail": 25.0, "global": 75.0, "mix": 50.0}
    assert base["dualfocus"]["accuracy"] == {"detail": 100.0, "global": 50.0, "mix": 75.0}
    assert result["gain"] == {"detail": 75.0, "global": -25.0, "mix": 25.0}
    rows = rows_by_threshold(result)
    assert sorted(rows) == [0, 0.3, 0.4, 0.5, 0.6, 0.7, 1]
    # The recommendation is searched at every distinct confidence of a zoomed question too (0.9, 0.95):
    # where the decisions change.
    assert result["pairs_searched"] == 9

    def summary(t):
        r = rows[t]
        return r["accuracy"], r["zoomed"], {k: round(v, 3) for k, v in r["gain_kept"].items()}

    # Nothing zooms: the macro answers (the box-unparsed and box-area skips among them).
    assert summary(0) == ({"detail": 25.0, "global": 75.0, "mix": 50.0}, 0, {"mix": 0.0, "detail": 0.0})
    # A confidence exactly at the threshold skips: at 0.3 question 0 keeps its (wrong) macro answer.
    assert summary(0.3) == summary(0)
    assert summary(0.4) == ({"detail": 50.0, "global": 75.0, "mix": 62.5}, 1, {"mix": 0.5, "detail": 0.333})
    assert summary(0.5) == summary(0.4)  # question 1's confidence is 0.5: still skipped
    assert summary(0.6) == ({"detail": 75.0, "global": 75.0, "mix": 75.0}, 2, {"mix": 1.0, "detail": 0.667})
    assert summary(0.7) == ({"detail": 75.0, "global": 50.0, "mix": 62.5}, 3, {"mix": 0.5, "detail": 0.667})
    # Threshold 1 zooms all but the confident and the box skips: question 2 (box area 0.8, confidence
    # 0.2) never zooms, so its gain is lost (detail 75, dualfocus 100), and question 5's zoom hurts.
    assert summary(1) == ({"detail": 75.0, "global": 50.0, "mix": 62.5}, 5, {"mix": 0.5, "detail": 0.667})
    assert rows[1]["zoomed_share"] == 5 / 8 and rows[0.6]["zoomed_share"] == 2 / 8
    # The recommendation keeps the target share of the gain on the mix and on detail. At 95% none does:
    # question 2's gain is never kept (its box), so detail keeps at most 67%.
    assert result["recommended"] is None
    at_60 = calibrate(load_run(tmp_path / "eval"), [0, 0.4, 0.5, 0.6, 0.7, 1], target=0.6)
    assert at_60["recommended"]["threshold"] == 0.6  # 2 of 8 zoomed, from just above 0.5 up to 0.6
    assert auto_calibrate.recommendation(at_60).startswith(
        "recommended thresholds 0.6 (open-ended) and 0.6 (multiple choice): zooms 25% of questions")
    # At 50%, 0.4 keeps half the mix's gain but a third of detail's: still 0.6.
    assert calibrate(load_run(tmp_path / "eval"), [0, 0.4, 0.6, 1], target=0.5)["recommended"]["threshold"] == 0.6


def test_the_replay_holds_multiple_choice_questions_to_their_own_threshold(tmp_path):
    run = load_run(write_eval(tmp_path / "eval"))
    assert run.multiple_choice == {0: False, 1: True, 2: False, 3: True, 4: False, 5: False, 6: False, 7: False}
    result = calibrate(run, [0, 0.4, 1], choice_thresholds=[0, 0.6])
    rows = {(r["threshold"], r["choice_threshold"]): r for r in result["rows"]}
    assert sorted(rows) == [(0, 0), (0, 0.6), (0.4, 0), (0.4, 0.6), (1, 0), (1, 0.6)]
    # Question 1 (multiple choice, confidence 0.5, its gain) zooms at choice threshold 0.6 whatever the other.
    assert rows[(0, 0.6)]["zoomed"] == 1 and rows[(0, 0.6)]["accuracy"]["detail"] == 50.0
    # Question 0 (open, 0.3) zooms at 0.4; question 3 (multiple choice, 0.9) never below 0.9.
    assert rows[(0.4, 0)]["zoomed"] == 1 and rows[(0.4, 0.6)]["zoomed"] == 2
    assert rows[(0.4, 0.6)]["gain_kept"] == {"mix": 1.0, "detail": pytest.approx(2 / 3)}
    # At 1 the open-ended count question 5 zooms too, and its zoom hurts; the multiple-choice one stays out.
    assert rows[(1, 0)]["zoomed"] == 3 and rows[(1, 0)]["accuracy"]["global"] == 50.0
    # The smallest zoom share keeping 60% of the gain: questions 0 and 1 zoomed (searched at every confidence
    # too: at 0.3 and 0.5 they would count as confident), not question 5 (a zoom that hurts).
    best = calibrate(run, [0, 0.4, 1], target=0.6, choice_thresholds=[0, 0.6])["recommended"]
    assert (best["threshold"], best["choice_threshold"], best["zoomed"]) == (0.4, 0.6, 2)
    assert best["accuracy"] == {"detail": 75.0, "global": 75.0, "mix": 75.0}


def test_a_box_area_skip_costs_its_gain_and_moves_the_recommendation(tmp_path):
    # Question 0 skipped for its box (the server's max box area) instead of zooming: at 0.4 auto keeps
    # no gain and at most half of it (question 1 zooming, 0.5 < t <= 0.6): nothing reaches 95%.
    questions = dict(QUESTIONS)
    kind, text, truth, macro, df, _ = questions[0]
    questions[0] = (kind, text, truth, macro, df, (0.3, False, "box covers most of the image", 0.7))
    result = calibrate(load_run(write_eval(tmp_path / "eval", questions)), [0, 0.4, 0.6, 1])
    rows = rows_by_threshold(result)
    assert rows[0.4]["zoomed"] == 0 and rows[0.4]["accuracy"]["mix"] == 50.0
    assert rows[0.6]["accuracy"]["mix"] == 62.5 and rows[0.6]["gain_kept"]["mix"] == 0.5
    assert rows[1]["zoomed"] == 4 and rows[1]["accuracy"]["mix"] == 50.0 and result["recommended"] is None
    # (0.6 keeps half the mix's gain and a third of detail's)
    assert calibrate(load_run(tmp_path / "eval"), [0, 0.4, 1], target=0.5)["recommended"] is None
    assert calibrate(load_run(tmp_path / "eval"), [0, 0.4, 1], target=0.3)["recommended"]["threshold"] == 0.6
    # Without the distinct confidences only the grid is searched, and 0.6 is not in it.
    grid_only = calibrate(load_run(tmp_path / "eval"), [0, 0.4, 1], with_confidences=False, target=0.3)
    assert [r["threshold"] for r in grid_only["rows"]] == [0, 0.4, 1] and grid_only["recommended"] is None


def test_no_recommendation_when_dualfocus_has_no_gain_or_none_keeps_enough(tmp_path):
    # Dualfocus's answers = macro's: no gain, gain kept n/a everywhere.
    same = {q: (*v[:4], v[3], v[5]) for q, v in QUESTIONS.items()}
    result = calibrate(load_run(write_eval(tmp_path / "same", same)), [0, 0.5, 1])
    assert result["gain"]["mix"] == 0 and result["recommended"] is None
    assert all(r["gain_kept"]["mix"] is None for r in result["rows"])
    assert auto_calibrate.recommendation(result).startswith("no recommendation: DualFocus has no accuracy gain")
    # DualFocus's gain comes from questions auto never zooms (box skips; a confidently wrong macro
    # answer): no threshold keeps 95% of it.
    questions = dict(QUESTIONS)
    questions[6] = (*QUESTIONS[6][:3], "no", "yes", (1.0, False, "confident", None))
    questions[1] = (*QUESTIONS[1][:5], (0.5, False, "box unparsed", None))
    questions[0] = (*QUESTIONS[0][:5], (0.3, False, "box outside", None))
    result = calibrate(load_run(write_eval(tmp_path / "none", questions)), [0, 0.5, 1])
    assert result["recommended"] is None
    assert auto_calibrate.recommendation(result).startswith("no threshold keeps 95% of DualFocus's gain")


def test_failed_requests_score_as_wrong_and_a_partial_run_is_not_replayed_above_its_threshold(tmp_path):
    result = calibrate(load_run(write_eval(tmp_path / "failed", failed={5})), [0, 1])
    rows = rows_by_threshold(result)
    assert result["failed_auto_requests"] == 1
    assert rows[0]["accuracy"]["global"] == 50.0 and rows[1]["zoomed"] == 4  # question 5: neither right nor zoomed
    run = load_run(write_eval(tmp_path / "half", run_threshold=0.5))
    with pytest.raises(CalibrationError, match="above the run's 0.5"):
        calibrate(run, [0, 0.7])
    assert calibrate(run, [0, 0.5])["rows"][-1]["threshold"] == 0.5


def test_the_runs_own_threshold_keeps_its_decision_despite_the_rounded_confidence(tmp_path):
    run = load_run(write_eval(tmp_path / "eval"))
    auto = tmp_path / "eval" / "answers-auto.jsonl"
    records = [json.loads(line) for line in auto.read_text().splitlines()]
    # Question 4's confidence rounded to 1.0 in the trace, yet it zoomed at 1 (it was below 1).
    records[4]["metadata"]["gate"]["confidence"] = 1.0
    # Question 5's auto macro answer differs from mode macro's (another batch): counted, not hidden.
    records[5]["metadata"]["macro_answer"] = "4"
    auto.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = calibrate(load_run(tmp_path / "eval"), [0.99, 1])
    rows = rows_by_threshold(result)
    assert rows[1]["zoomed"] == 5 and rows[0.99]["zoomed"] == 4 and result["macro_answer_differs"] == 1
    assert calibrate(run, [0])["macro_answer_differs"] == 0


def test_an_eval_folder_without_mode_auto_or_with_other_questions_is_refused(tmp_path):
    folder = write_eval(tmp_path / "eval")
    (folder / "answers-auto.jsonl").unlink()
    with pytest.raises(CalibrationError, match="answers-auto.jsonl is missing"):
        load_run(folder)
    folder = write_eval(tmp_path / "other")
    lines = (folder / "answers-macro.jsonl").read_text().splitlines()
    (folder / "answers-macro.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(CalibrationError, match="other questions"):
        load_run(folder)
    assert main([str(folder)]) == 2


def sweep_summary(path: Path) -> Path:
    def config(rps, macro_rps=10.0, df_rps=4.0, **extra):
        return {"requests_per_s_median": rps, "vs_macro": round(rps / macro_rps, 3),
                "vs_dualfocus": round(rps / df_rps, 3), "latency_p50_s_median": 1.0, "errors": 0, **extra}

    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps({
        "command": "python -m loadtests.auto_sweep --task 64", "git": "abc1234", "machine": {"cpus": 2},
        "load": "task (64 questions per run: half detail, half global)", "concurrency": 16, "rounds": 2,
        "configurations": {
            "macro": config(10.0, zoom_threshold=None), "dualfocus": config(4.0, zoom_threshold=None),
            "auto@0.6": config(7.0, zoom_threshold=0.6, zoomed_share=0.3),
            # An older sweep's row: the threshold only in the name; 0.65 is not in the grid.
            "auto@0.65": config(5.0, zoomed_share=0.4),
        }}))
    return path


def test_the_sweep_joins_the_swept_thresholds_rows(tmp_path):
    run = load_run(write_eval(tmp_path / "eval"))
    sweep = auto_calibrate.load_sweep(sweep_summary(tmp_path / "sweep"))
    result = calibrate(run, [0, 0.6, 1], sweep=sweep)
    rows = rows_by_threshold(result)
    assert rows[0.6]["sweep"] == {"configuration": "auto@0.6", "requests_per_s_median": 7.0, "vs_macro": 0.7,
                                  "vs_dualfocus": 1.75, "measured_zoomed_share": 0.3}
    assert rows[0.65]["accuracy"]["mix"] == 62.5 and rows[0.65]["zoomed"] == 3
    assert rows[0.65]["sweep"]["vs_macro"] == 0.5
    assert "sweep" not in rows[1] and result["baselines"]["dualfocus"]["sweep"]["requests_per_s_median"] == 4.0
    table = configuration_table(result).splitlines()
    assert table[2] == "| macro | 25.0 | 75.0 | 50.0 | 0% | 0% | 10.00 | 1.00x | 2.50x |"
    assert table[3] == "| auto@0.6/0.6 | 75.0 | 75.0 | 75.0 | 100% | 25% (30% in the sweep) | 7.00 | 0.70x | 1.75x |"
    assert table[4] == "| auto@0.65/0.65 | 75.0 | 50.0 | 62.5 | 50% | 38% (40% in the sweep) | 5.00 | 0.50x | 1.25x |"
    assert table[5] == "| dualfocus | 100.0 | 50.0 | 75.0 | 100% | 100% | 4.00 | 0.40x | 1.00x |"
    text = "\n".join(table)
    assert "met by auto@0.6/0.6." in text and "load task (64 questions per run" in text


def test_the_command_writes_json_and_the_docs_section_between_its_markers(tmp_path, capsys):
    folder, sweep = write_eval(tmp_path / "eval"), sweep_summary(tmp_path / "sweep")
    doc = tmp_path / "performance.md"
    doc.write_text("# Perf\n\n<!-- auto-calibration:start -->\nplaceholder\n<!-- auto-calibration:end -->\n\ntail\n")
    assert main([str(folder), "--sweep", str(sweep / "summary.json"), "--docs", str(doc), "--target-gain", "0.6",
                 "--choice-thresholds", "same"]) == 0
    out = capsys.readouterr().out
    assert "| 0.6 (recommended) | 0.6 | 75.0 | 75.0 | 75.0 | 25% | 100% | 67% | 7.00 | 0.70x | 1.75x |" in out
    saved = json.loads((folder / "calibration.json").read_text())
    assert saved["recommended"]["threshold"] == 0.6 and saved["sweep"]["git"] == "abc1234"
    written = section(doc, "auto-calibration")
    assert "placeholder" not in written and "| auto@0.6/0.6 | 75.0 |" in written and doc.read_text().endswith("tail\n")
    # A file without the markers is left alone, with a clear error.
    bare = tmp_path / "bare.md"
    bare.write_text("# Nothing here\n")
    assert main([str(folder), "--sweep", str(sweep), "--docs", str(bare)]) == 2
    assert bare.read_text() == "# Nothing here\n" and "no <!-- auto-calibration:start -->" in capsys.readouterr().err


def test_performance_md_has_the_calibration_markers_in_the_mode_auto_section():
    text = (ROOT / "docs" / "performance.md").read_text()
    auto = text.split("## Adaptive DualFocus (mode auto)", 1)[1].split("\n## ", 1)[0]
    assert auto.count("<!-- auto-calibration:start -->") == 1 and auto.count("<!-- auto-calibration:end -->") == 1
    assert text.count("<!-- auto-calibration:start -->") == 1


def test_the_sweeps_task_load_is_the_eval_test_set_half_detail_half_global(tmp_path):
    from clients.eval.generated import write_test_set

    items = auto_sweep.load(1001, 8, task=True)
    assert [i.kind for i in items] == ["detail", "detail_mc", "count", "presence"] * 2
    questions = [json.loads(line) for line in write_test_set(8, 1001, tmp_path).read_text().splitlines()]
    assert [i.question for i in items] == [q["text"] for q in questions]
    for item, q in zip(items, questions, strict=True):
        on_disk = Image.open(tmp_path / "images" / q["image"]).convert("RGB")
        assert (item.width, item.height) == on_disk.size
        assert scenes.from_data_url(item.image_url).tobytes() == on_disk.tobytes()
    # Every run its own seed, so no run's image is one the server has cached from another.
    runs = auto_sweep.schedule(auto_sweep.configurations([(0.5, None), (1, 0)]), rounds=2, first_seed=1000)
    seeds = [seed for *_, seed in runs]
    assert len(runs) == 8 and seeds == list(range(1001, 1009))
    other = auto_sweep.load(1002, 8, task=True)
    assert not {i.image_url for i in items} & {i.image_url for i in other}
    # Without --task: the synthetic scenes of before, same seeds.
    assert [i.image_url for i in auto_sweep.load(1001, 4, task=False)] == [
        i.image_url for i in scenes.synthetic(4, seed=1001)
    ]


@pytest.mark.parametrize("argv", [["--task", "6"], ["--task", "8", "--requests", "16"], ["--thresholds", "x"]])
def test_the_sweep_refuses_a_task_load_that_is_not_half_detail(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        auto_sweep.main([*argv, "--out", str(tmp_path)])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
