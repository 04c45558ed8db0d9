"""Calibrate mode auto's zoom thresholds offline: accuracy at any thresholds from one evaluation.

    dualfocus eval --generate 400 --mode all --zoom-threshold 1 --zoom-threshold-choice 1 --out EVAL_DIR --url URL
    python -m loadtests.auto_sweep --task 64 --thresholds 0.3,0.5,0.7 --out SWEEP_DIR --url URL
    python -m loadtests.auto_calibrate EVAL_DIR --sweep SWEEP_DIR [--docs docs/performance.md]

The gate's confidence (the macro answer's geometric-mean token probability) does not depend on the
threshold, so an evaluation run at threshold 1 records, per question, the macro answer
(metadata.macro_answer), the fused answer (the auto answer's text when it zoomed) and
metadata.gate. At threshold t a question's auto answer is the fused one iff the run zoomed it and
its confidence < t; otherwise the macro answer (confidence >= t, or a skip the run recorded for
the box: unusable, or covering most of the image, which skips at any threshold). The gate holds a
multiple-choice question (one that lists options, engine/fusion.py) to its own threshold, so the
replay runs over pairs: t for open-ended questions (--thresholds), c for multiple-choice ones
(--choice-thresholds). Answers are scored with the eval's own scoring (clients/eval/scoring.py).

Reported per pair of thresholds: accuracy (in %) on detail questions (detail + detail_mc), global ones
(count + presence) and the mix (all), the share zoomed, and the share of DualFocus's gain over
macro kept (gain = dualfocus - macro accuracy of the same run's answer files; n/a when <= 0), on
the mix and on detail. The recommended threshold: the smallest share zoomed that keeps >= 95% of
the gain (--target-gain) on the mix and, where DualFocus gains there, on detail questions, searched
over every pair where a decision changes. With
--sweep, the throughput that auto_sweep measured per configuration joins the rows of the thresholds
it swept, and a table per configuration (macro, auto@t, dualfocus: accuracy and requests/s) is
printed, and with --docs written into the file's
`auto-calibration` section (between its `<!-- auto-calibration:start -->` / `:end` markers).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from clients.eval.scoring import score
from engine.fusion import parse_question
from training.task import GLOBAL_KINDS

from .auto_sweep import parse_thresholds
from .report import replace_section, section

DETAIL_KINDS = ("detail", "detail_mc")
GROUPS = {"detail": DETAIL_KINDS, "global": GLOBAL_KINDS, "mix": None}  # None: every question
DEFAULT_THRESHOLDS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"
DEFAULT_CHOICE_THRESHOLDS = "0,0.5,1"
SECTION = "auto-calibration"


class CalibrationError(ValueError):
    """The evaluation or sweep cannot be used as given."""


@dataclass
class Run:
    """One `dualfocus eval --mode all` folder: the questions and each mode's answer records by question_id."""

    folder: Path
    questions: dict
    answers: dict[str, dict]  # mode -> question_id -> the answer file's record
    multiple_choice: dict  # question_id -> whether the gate holds it to the choice threshold
    # Per form (multiple choice or not), the run's threshold: thresholds above it cannot be replayed.
    replayable_up_to: dict[bool, float]

    @property
    def auto(self) -> dict:
        return self.answers["auto"]


def read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise CalibrationError(f"cannot read {path}: {e.strerror}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise CalibrationError(f"{path}, line {n}: not JSON ({e})") from None
    return records


def load_run(folder: Path) -> Run:
    """Read and check an eval folder: questions.jsonl and answers-{macro,dualfocus,auto}.jsonl, the
    same questions in each, every auto answer with its gate trace (or a recorded failure)."""
    questions = {q["question_id"]: q for q in read_jsonl(folder / "questions.jsonl")}
    if not questions:
        raise CalibrationError(f"{folder / 'questions.jsonl'} has no questions")
    answers = {}
    for mode in ("macro", "dualfocus", "auto"):
        path = folder / f"answers-{mode}.jsonl"
        if not path.exists():
            raise CalibrationError(
                f"{path} is missing: run `dualfocus eval --mode all --zoom-threshold 1 --zoom-threshold-choice 1`"
            )
        records = {r["question_id"]: r for r in read_jsonl(path)}
        if records.keys() != questions.keys():
            raise CalibrationError(f"{path} answers other questions than {folder / 'questions.jsonl'}")
        answers[mode] = records
    # The form as the engine sees it, from the question's text (a trace before the choice threshold has none).
    multiple_choice = {qid: parse_question(q["text"]).multiple_choice for qid, q in questions.items()}
    thresholds: dict[bool, set] = {False: set(), True: set()}
    for qid, r in answers["auto"].items():
        meta = r.get("metadata", {})
        if "error" in meta:
            continue
        gate = meta.get("gate")
        if gate is None or meta.get("macro_answer") is None:
            raise CalibrationError(f"answers-auto.jsonl, question {qid!r}: no metadata.gate / macro_answer")
        thresholds[multiple_choice[qid]].add(gate["threshold"])
    if not thresholds[False] | thresholds[True]:
        raise CalibrationError(f"{folder / 'answers-auto.jsonl'}: every request failed")
    # A form without questions (or with only failed ones) constrains nothing.
    return Run(
        folder, questions, answers, multiple_choice, {form: min(ts, default=1.0) for form, ts in thresholds.items()}
    )


def auto_answer(record: dict, threshold: float) -> tuple[str, bool]:
    """A question's auto answer at `threshold` (its form's) and whether it zoomed, from its answer at
    the run's threshold (>= `threshold`). A failed request answers "" (scored as wrong, as the eval does)."""
    meta = record["metadata"]
    if "error" in meta:
        return "", False
    gate = meta["gate"]
    # Not zoomed at the run's threshold: confident there (so here too), or a box skip (at any threshold).
    # At the run's own threshold its decision stands: the trace rounds the confidence to 6 digits, so
    # an answer of confidence 0.9999996 zoomed at 1 but is recorded as 1.0.
    zoomed = gate["zoomed"] and (gate["confidence"] < threshold or threshold >= gate["threshold"])
    return (record["text"] if zoomed else meta["macro_answer"]), zoomed


def accuracy(questions: dict, texts: dict) -> dict[str, float | None]:
    """Accuracy in % per group (detail, global, mix) over the questions with ground truth; None for a
    group without any (a set without the task's `kind`s has only the mix)."""
    return _accuracy(questions, {qid: score(q, texts[qid]) for qid, q in questions.items()})


def _accuracy(questions: dict, scores: dict) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for group, kinds in GROUPS.items():
        scored = [
            s
            for qid, q in questions.items()
            if (kinds is None or q.get("kind") in kinds) and (s := scores[qid]) is not None
        ]
        out[group] = 100 * sum(scored) / len(scored) if scored else None
    return out


def gain_kept(value: float | None, macro: float | None, dualfocus: float | None) -> float | None:
    """The share of DualFocus's gain over macro that `value` keeps; None when there is no gain."""
    if value is None or macro is None or dualfocus is None or dualfocus - macro <= 0:
        return None
    return (value - macro) / (dualfocus - macro)


def baselines(run: Run) -> dict[str, dict]:
    return {
        mode: accuracy(run.questions, {qid: r["text"] for qid, r in run.answers[mode].items()})
        for mode in ("macro", "dualfocus")
    }


class Replay:
    """Replays the gate at any pair of thresholds, each question's two possible answers scored once."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.base = baselines(run)
        self.macro_score, self.fused_score = {}, {}
        for qid, q in run.questions.items():
            record = run.auto[qid]
            self.macro_score[qid] = score(q, auto_answer(record, 0.0)[0])
            self.fused_score[qid] = score(q, record["text"]) if "error" not in record["metadata"] else 0

    def row(self, threshold: float, choice_threshold: float) -> dict:
        """The row of one pair (open-ended, multiple choice): accuracies, share zoomed, gain kept."""
        run = self.run
        for form, t, flag in (
            (False, threshold, "--zoom-threshold"),
            (True, choice_threshold, "--zoom-threshold-choice"),
        ):
            if t > run.replayable_up_to[form]:
                raise CalibrationError(
                    f"threshold {t:g} is above the run's {run.replayable_up_to[form]:g}"
                    f"{' for multiple-choice questions' if form else ''}: questions confident between the two "
                    f"have no zoomed answer (run the eval with {flag} 1)"
                )
        scores, zoomed = {}, 0
        for qid, record in run.auto.items():
            z = auto_answer(record, choice_threshold if run.multiple_choice[qid] else threshold)[1]
            scores[qid] = self.fused_score[qid] if z else self.macro_score[qid]
            zoomed += z
        acc = _accuracy(run.questions, scores)
        base = self.base
        return {
            "threshold": threshold,
            "choice_threshold": choice_threshold,
            "accuracy": acc,
            "zoomed": zoomed,
            "zoomed_share": zoomed / len(run.auto),
            "gain_kept": {g: gain_kept(acc[g], base["macro"][g], base["dualfocus"][g]) for g in ("mix", "detail")},
        }


def confidences(run: Run, multiple_choice: bool) -> list[float]:
    """The thresholds at which the replayed decisions of one form change: each distinct confidence of a
    question of that form the run zoomed (at t = c that question skips, just above it zooms)."""
    return sorted(
        {
            r["metadata"]["gate"]["confidence"]
            for qid, r in run.auto.items()
            if "error" not in r["metadata"]
            and r["metadata"]["gate"]["zoomed"]
            and run.multiple_choice[qid] == multiple_choice
        }
    )


def macro_mismatches(run: Run) -> int:
    """Questions whose macro answer in mode auto differs from mode macro's answer. Both are the same
    greedy pass, so it should be 0; if not (batch-dependent numerics), threshold 0 does not replay
    mode macro's accuracy exactly."""
    return sum(
        "error" not in r["metadata"] and r["metadata"]["macro_answer"] != run.answers["macro"][qid]["text"]
        for qid, r in run.auto.items()
    )


def recommend(rows: list[dict], target: float) -> dict | None:
    """The row with the smallest share zoomed (then the smallest thresholds) that keeps at least `target`
    of DualFocus's gain on the mix and, where DualFocus gains there, on detail questions; None if none
    does or there is no gain on the mix. Detail too, because on the mix a loss elsewhere (fusion on
    global questions) shrinks the gain that is to be kept: skipping most zooms could then pass the mix
    test while losing most of what zooming is for."""

    def keeps(r: dict, part: str) -> bool:
        return r["gain_kept"][part] is not None and r["gain_kept"][part] >= target - 1e-12

    keeping = [r for r in rows if keeps(r, "mix") and (r["gain_kept"]["detail"] is None or keeps(r, "detail"))]
    return min(keeping, key=lambda r: (r["zoomed_share"], r["threshold"], r["choice_threshold"])) if keeping else None


def load_sweep(path: Path) -> dict:
    """auto_sweep's summary.json (or its folder)."""
    file = path / "summary.json" if path.is_dir() else path
    try:
        sweep = json.loads(file.read_text())
    except OSError as e:
        raise CalibrationError(f"cannot read {file}: {e.strerror}") from None
    except ValueError as e:
        raise CalibrationError(f"{file}: not JSON ({e})") from None
    configs = sweep.get("configurations") if isinstance(sweep, dict) else None
    if not isinstance(configs, dict) or not {"macro", "dualfocus"} <= configs.keys():
        raise CalibrationError(f"{file}: not an auto_sweep summary (no configurations macro and dualfocus)")
    return sweep


def swept_thresholds(sweep: dict) -> dict[tuple[float, float], str]:
    """(threshold, choice threshold) -> configuration name, for the sweep's auto configurations."""
    out = {}
    for name, row in sweep["configurations"].items():
        if name.startswith("auto@"):
            t = row.get("zoom_threshold")  # older sweeps: only in the name, to 6 digits
            threshold = float(t if t is not None else name.removeprefix("auto@"))
            # Sweeps from before the choice threshold ran one threshold for both forms.
            choice = row.get("zoom_threshold_choice", threshold)
            if choice is None:
                raise CalibrationError(
                    f"the sweep's {name} ran at the server's choice threshold, which it did not record: "
                    "sweep with --choice-threshold"
                )
            out[(threshold, float(choice))] = name
    return out


def throughput(row: dict) -> dict:
    keys = ("requests_per_s_median", "vs_macro", "vs_dualfocus", "zoomed_share")
    return {("measured_zoomed_share" if k == "zoomed_share" else k): row.get(k) for k in keys if k in row}


def calibrate(
    run: Run,
    thresholds: list[float],
    with_confidences: bool = True,
    sweep: dict | None = None,
    target: float = 0.95,
    choice_thresholds: list[float] | None = None,
) -> dict:
    """The whole result: baselines; one row per pair of the grids (`choice_thresholds` None: one threshold
    for both forms, pairs (t, t)) and per swept pair; the recommendation, searched over those and, with
    `with_confidences`, over every pair where a decision changes; with a sweep its throughput joined."""
    replay = Replay(run)
    swept = swept_thresholds(sweep) if sweep else {}
    if choice_thresholds is None:
        shown = {(t, t) for t in thresholds} | set(swept)
        points = set(thresholds) | {t for pair in swept for t in pair}
        if with_confidences:
            points |= set(confidences(run, False)) | set(confidences(run, True))
        searched = shown | {(t, t) for t in points}
    else:
        shown = {(t, c) for t in thresholds for c in choice_thresholds} | set(swept)
        opens, closed = set(thresholds) | {t for t, _ in swept}, set(choice_thresholds) | {c for _, c in swept}
        if with_confidences:
            opens |= set(confidences(run, False))
            closed |= set(confidences(run, True))
        searched = shown | {(t, c) for t in opens for c in closed}
    rows = {pair: replay.row(*pair) for pair in sorted(searched)}
    best = recommend(list(rows.values()), target)
    shown_rows = []
    for pair in sorted(shown | ({(best["threshold"], best["choice_threshold"])} if best else set())):
        row = rows[pair]
        row["in_grid"] = pair[0] in thresholds and (
            pair[1] == pair[0] if choice_thresholds is None else pair[1] in choice_thresholds
        )
        if pair in swept:
            row["sweep"] = {"configuration": swept[pair], **throughput(sweep["configurations"][swept[pair]])}
        shown_rows.append(row)
    base = replay.base
    result: dict = {
        "eval": str(run.folder),
        "questions": len(run.questions),
        "failed_auto_requests": sum("error" in r["metadata"] for r in run.auto.values()),
        "macro_answer_differs": macro_mismatches(run),
        "run_threshold": run.replayable_up_to[False],
        "run_choice_threshold": run.replayable_up_to[True],
        "baselines": {
            mode: {"accuracy": acc, **({"sweep": throughput(sweep["configurations"][mode])} if sweep else {})}
            for mode, acc in base.items()
        },
        "gain": {g: _diff(base["dualfocus"][g], base["macro"][g]) for g in GROUPS},
        "target_gain_kept": target,
        "pairs_searched": len(rows),
        "rows": shown_rows,
        "recommended": best,
    }
    if sweep:
        result["sweep"] = {k: sweep.get(k) for k in ("command", "git", "machine", "load", "concurrency", "rounds")}
    return result


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# --- reports ---------------------------------------------------------------------------------------


def _pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _share(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def threshold_table(result: dict) -> str:
    """Markdown: the grid's rows, the swept ones and the recommended one."""
    best = result["recommended"]
    lines = [
        "| threshold | choice threshold | detail % | global % | mix % | zoomed | gain kept (mix) | gain kept (detail) "
        "| req/s | vs macro | vs dualfocus |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s = r.get("sweep", {})
        acc = r["accuracy"]
        lines.append(
            f"| {r['threshold']:.6g}{' (recommended)' if r is best else ''} | {r['choice_threshold']:.6g} "
            f"| {_pct(acc['detail'])} "
            f"| {_pct(acc['global'])} | {_pct(acc['mix'])} | {_share(r['zoomed_share'])} "
            f"| {_share(r['gain_kept']['mix'])} | {_share(r['gain_kept']['detail'])} "
            f"| {_pct(s.get('requests_per_s_median'), 2) if s else ''} | {_ratio(s.get('vs_macro')) if s else ''} "
            f"| {_ratio(s.get('vs_dualfocus')) if s else ''} |"
        )
    return "\n".join(lines)


def recommendation(result: dict) -> str:
    target = f"{100 * result['target_gain_kept']:.0f}%"
    gain = result["gain"]["mix"]
    if gain is None or gain <= 0:
        return f"no recommendation: DualFocus has no accuracy gain over macro on the mix ({_pct(gain)} points)"
    best = result["recommended"]
    if best is None:
        return (
            f"no threshold keeps {target} of DualFocus's gain over macro on the mix and on detail ({gain:+.1f} points)"
        )
    detail = best["gain_kept"]["detail"]
    return (
        f"recommended thresholds {best['threshold']:.6g} (open-ended) and {best['choice_threshold']:.6g} "
        f"(multiple choice): zooms {_share(best['zoomed_share'])} of questions and keeps "
        f"{_share(best['gain_kept']['mix'])} of DualFocus's gain on the mix ({gain:+.1f} points) and "
        f"{'n/a' if detail is None else _share(detail)} on detail (target {target} on both)"
    )


def configuration_table(result: dict) -> str:
    """Markdown for docs/performance.md: per configuration (macro, auto@t for each swept t, dualfocus)
    accuracy from the eval and throughput from the sweep, with where the figures come from."""
    base, sweep = result["baselines"], result.get("sweep")
    if sweep is None:
        raise CalibrationError("the configuration table needs --sweep")
    lines = [
        "| configuration | detail % | global % | mix % | gain kept (mix) | zoomed | req/s | vs macro | vs dualfocus |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, acc: dict, kept: float | None, zoomed: str, s: dict) -> str:
        return (
            f"| {name} | {_pct(acc['detail'])} | {_pct(acc['global'])} | {_pct(acc['mix'])} | {_share(kept)} "
            f"| {zoomed} | {_pct(s.get('requests_per_s_median'), 2)} | {_ratio(s.get('vs_macro'))} "
            f"| {_ratio(s.get('vs_dualfocus'))} |"
        )

    def kept(mode: str) -> float | None:
        return gain_kept(
            base[mode]["accuracy"]["mix"], base["macro"]["accuracy"]["mix"], base["dualfocus"]["accuracy"]["mix"]
        )

    lines.append(row("macro", base["macro"]["accuracy"], kept("macro"), "0%", base["macro"]["sweep"]))
    for r in result["rows"]:
        if "sweep" in r:
            s = r["sweep"]
            zoomed = _share(r["zoomed_share"])
            if s.get("measured_zoomed_share") is not None:
                zoomed += f" ({_share(s['measured_zoomed_share'])} in the sweep)"
            lines.append(row(_auto_name(r), r["accuracy"], r["gain_kept"]["mix"], zoomed, s))
    lines.append(row("dualfocus", base["dualfocus"]["accuracy"], kept("dualfocus"), "100%", base["dualfocus"]["sweep"]))
    meeting = [
        _auto_name(r)
        for r in result["rows"]
        if "sweep" in r
        and (r["gain_kept"]["mix"] or 0) >= result["target_gain_kept"] - 1e-12
        and (r["sweep"].get("vs_dualfocus") or 0) >= 1.5
    ]
    notes = [
        f"Accuracy: `{result['eval']}`, {result['questions']} questions, replayed from one run at zoom thresholds "
        f"{result['run_threshold']:g} / {result['run_choice_threshold']:g} (`python -m loadtests.auto_calibrate`); "
        "auto@t/c: threshold t for open-ended questions, c for multiple-choice ones; zoomed: share of the eval's "
        "questions the replayed gate zooms. Throughput: median requests/s over the sweep's rounds, load "
        f"{sweep.get('load') or 'not recorded'}, concurrency {sweep.get('concurrency')}, {sweep.get('rounds')} "
        f"rounds, `{sweep.get('command')}` (git {sweep.get('git')}).",
        recommendation(result) + ".",
        "Issue 14's target (>= 95% of the gain on the mix and >= 1.5x dualfocus's throughput): "
        + (f"met by {', '.join(meeting)}." if meeting else "met by no swept threshold."),
    ]
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def _auto_name(row: dict) -> str:
    return f"auto@{row['threshold']:.6g}/{row['choice_threshold']:.6g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.auto_calibrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "eval_dir",
        metavar="EVAL_DIR",
        type=Path,
        help="a `dualfocus eval --mode all --zoom-threshold 1 --out EVAL_DIR` folder",
    )
    p.add_argument(
        "--thresholds",
        default=DEFAULT_THRESHOLDS,
        help="open-ended questions' thresholds: comma-separated, 0-1, the rows printed (default: %(default)s)",
    )
    p.add_argument(
        "--choice-thresholds",
        default=DEFAULT_CHOICE_THRESHOLDS,
        help="multiple-choice questions' thresholds, the same way; every pair with --thresholds is a row; "
        "'same': one threshold for both forms (default: %(default)s)",
    )
    p.add_argument(
        "--confidences",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also replay at every distinct confidence of a zoomed question, where the decisions "
        "change (for the recommendation; default: %(default)s)",
    )
    p.add_argument(
        "--target-gain",
        type=float,
        default=0.95,
        help="share of DualFocus's gain on the mix the recommended threshold keeps (default: %(default)s)",
    )
    p.add_argument(
        "--sweep",
        type=Path,
        metavar="SWEEP_DIR_OR_JSON",
        help="an auto_sweep output folder (or its summary.json): joins its throughput",
    )
    p.add_argument("--out", type=Path, help="the JSON result (default: EVAL_DIR/calibration.json)")
    p.add_argument(
        "--docs",
        type=Path,
        metavar="MARKDOWN",
        help=f"with --sweep: write the configuration table into this file's {SECTION!r} section "
        "(it must have the markers, as docs/performance.md does)",
    )
    args = p.parse_args(argv)
    thresholds = parse_thresholds(args.thresholds)
    same = args.choice_thresholds == "same"
    choice_thresholds = None if same else parse_thresholds(args.choice_thresholds)
    if not thresholds or choice_thresholds == []:
        p.error("--thresholds, --choice-thresholds: comma-separated numbers between 0 and 1")
    if not 0.0 < args.target_gain <= 1.0:
        p.error("--target-gain: above 0, at most 1")
    if args.docs and not args.sweep:
        p.error("--docs needs --sweep (the table has the sweep's throughput)")
    try:
        run = load_run(args.eval_dir)
        sweep = load_sweep(args.sweep) if args.sweep else None
        result = calibrate(run, thresholds, args.confidences, sweep, args.target_gain, choice_thresholds)
        if args.docs and section(args.docs, SECTION) is None:
            raise CalibrationError(f"{args.docs} has no <!-- {SECTION}:start --> / :end markers")
    except CalibrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.eval_dir / "calibration.json"
    out.write_text(json.dumps(result, indent=1))
    base = result["baselines"]
    print(
        f"{result['questions']} questions; macro {_pct(base['macro']['accuracy']['mix'])}% / dualfocus "
        f"{_pct(base['dualfocus']['accuracy']['mix'])}% on the mix (detail {_pct(base['macro']['accuracy']['detail'])}"
        f" / {_pct(base['dualfocus']['accuracy']['detail'])}); auto replayed per threshold:\n"
    )
    print(threshold_table(result))
    print("\n" + recommendation(result))
    if result["macro_answer_differs"]:
        print(
            f"note: in {result['macro_answer_differs']} question(s) mode auto's macro answer differs from mode "
            "macro's (the same greedy pass; batch-dependent numerics), so threshold 0 is not exactly macro"
        )
    if result["failed_auto_requests"]:
        print(f"warning: {result['failed_auto_requests']} auto request(s) failed in the eval (scored as wrong)")
    if sweep:
        table = configuration_table(result)
        print("\n" + table)
        if args.docs:
            replace_section(args.docs, SECTION, table)
            print(f"\nwritten into {args.docs}, section {SECTION!r}")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
