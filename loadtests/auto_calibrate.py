"""Calibrate mode auto's zoom threshold offline: accuracy at any threshold from one evaluation.

    dualfocus eval --generate 400 --mode all --zoom-threshold 1 --out EVAL_DIR --url URL
    python -m loadtests.auto_sweep --task 64 --thresholds 0.3,0.5,0.7 --out SWEEP_DIR --url URL
    python -m loadtests.auto_calibrate EVAL_DIR --sweep SWEEP_DIR [--docs docs/performance.md]

The gate's confidence (the macro answer's geometric-mean token probability) does not depend on the
threshold, so an evaluation run at threshold 1 records, per question, the macro answer
(metadata.macro_answer), the fused answer (the auto answer's text when it zoomed) and
metadata.gate. At threshold t a question's auto answer is the fused one iff the run zoomed it and
its confidence < t; otherwise the macro answer (confidence >= t, or a skip the run recorded for
the box: unusable, or covering most of the image, which skips at any threshold). Answers are
scored with the eval's own scoring (clients/eval/scoring.py).

Reported per threshold: accuracy (in %) on detail questions (detail + detail_mc), global ones
(count + presence) and the mix (all), the share zoomed, and the share of DualFocus's gain over
macro kept (gain = dualfocus - macro accuracy of the same run's answer files; n/a when <= 0), on
the mix and on detail. The recommended threshold: the smallest share zoomed that keeps >= 95% of
the gain (--target-gain) on the mix and, where DualFocus gains there, on detail questions. With
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
from training.task import GLOBAL_KINDS

from .auto_sweep import parse_thresholds
from .report import replace_section, section

DETAIL_KINDS = ("detail", "detail_mc")
GROUPS = {"detail": DETAIL_KINDS, "global": GLOBAL_KINDS, "mix": None}  # None: every question
DEFAULT_THRESHOLDS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"
SECTION = "auto-calibration"


class CalibrationError(ValueError):
    """The evaluation or sweep cannot be used as given."""


@dataclass
class Run:
    """One `dualfocus eval --mode all` folder: the questions and each mode's answer records by question_id."""

    folder: Path
    questions: dict
    answers: dict[str, dict]  # mode -> question_id -> the answer file's record
    replayable_up_to: float  # the run's threshold: thresholds above it cannot be replayed

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
            raise CalibrationError(f"{path} is missing: run `dualfocus eval --mode all --zoom-threshold 1`")
        records = {r["question_id"]: r for r in read_jsonl(path)}
        if records.keys() != questions.keys():
            raise CalibrationError(f"{path} answers other questions than {folder / 'questions.jsonl'}")
        answers[mode] = records
    thresholds = set()
    for qid, r in answers["auto"].items():
        meta = r.get("metadata", {})
        if "error" in meta:
            continue
        gate = meta.get("gate")
        if gate is None or meta.get("macro_answer") is None:
            raise CalibrationError(f"answers-auto.jsonl, question {qid!r}: no metadata.gate / macro_answer")
        thresholds.add(gate["threshold"])
    if not thresholds:
        raise CalibrationError(f"{folder / 'answers-auto.jsonl'}: every request failed")
    return Run(folder, questions, answers, min(thresholds))


def auto_answer(record: dict, threshold: float) -> tuple[str, bool]:
    """A question's auto answer at `threshold` and whether it zoomed, from its answer at the run's
    threshold (>= `threshold`). A failed request answers "" (scored as wrong, as the eval does)."""
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
    out: dict[str, float | None] = {}
    for group, kinds in GROUPS.items():
        scores = [score(q, texts[qid]) for qid, q in questions.items() if kinds is None or q.get("kind") in kinds]
        scored = [s for s in scores if s is not None]
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


def replay(run: Run, threshold: float, base: dict[str, dict]) -> dict:
    """The row of one threshold: accuracies, share zoomed, gain kept."""
    if threshold > run.replayable_up_to:
        raise CalibrationError(
            f"threshold {threshold:g} is above the run's {run.replayable_up_to:g}: questions confident between "
            "the two have no zoomed answer (run the eval with --zoom-threshold 1)"
        )
    texts, zoomed = {}, 0
    for qid, record in run.auto.items():
        texts[qid], z = auto_answer(record, threshold)
        zoomed += z
    acc = accuracy(run.questions, texts)
    return {
        "threshold": threshold,
        "accuracy": acc,
        "zoomed": zoomed,
        "zoomed_share": zoomed / len(run.auto),
        "gain_kept": {
            group: gain_kept(acc[group], base["macro"][group], base["dualfocus"][group]) for group in ("mix", "detail")
        },
    }


def confidences(run: Run) -> list[float]:
    """The thresholds at which the replayed decisions change: each distinct confidence of a question
    the run zoomed (at t = c that question skips, just above it zooms; all below the run's threshold)."""
    return sorted(
        {
            r["metadata"]["gate"]["confidence"]
            for r in run.auto.values()
            if "error" not in r["metadata"] and r["metadata"]["gate"]["zoomed"]
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
    """The row with the smallest share zoomed (then the smallest threshold) that keeps at least `target`
    of DualFocus's gain on the mix and, where DualFocus gains there, on detail questions; None if none
    does or there is no gain on the mix. Detail too, because on the mix a loss elsewhere (fusion on
    global questions) shrinks the gain that is to be kept: skipping most zooms could then pass the mix
    test while losing most of what zooming is for."""

    def keeps(r: dict, part: str) -> bool:
        return r["gain_kept"][part] is not None and r["gain_kept"][part] >= target - 1e-12

    keeping = [r for r in rows if keeps(r, "mix") and (r["gain_kept"]["detail"] is None or keeps(r, "detail"))]
    return min(keeping, key=lambda r: (r["zoomed_share"], r["threshold"])) if keeping else None


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


def swept_thresholds(sweep: dict) -> dict[float, str]:
    """threshold -> configuration name, for the sweep's auto configurations."""
    out = {}
    for name, row in sweep["configurations"].items():
        if name.startswith("auto@"):
            t = row.get("zoom_threshold")  # older sweeps: only in the name, to 6 digits
            out[float(t if t is not None else name.removeprefix("auto@"))] = name
    return out


def throughput(row: dict) -> dict:
    keys = ("requests_per_s_median", "vs_macro", "vs_dualfocus", "zoomed_share")
    return {("measured_zoomed_share" if k == "zoomed_share" else k): row.get(k) for k in keys if k in row}


def calibrate(
    run: Run, thresholds: list[float], with_confidences: bool = True, sweep: dict | None = None, target: float = 0.95
) -> dict:
    """The whole result: baselines, one row per threshold (the grid, every decision-changing confidence,
    the swept ones), the recommendation, and with a sweep its throughput joined and per configuration."""
    base = baselines(run)
    swept = swept_thresholds(sweep) if sweep else {}
    grid = set(thresholds)
    points = grid | set(swept) | (set(confidences(run)) if with_confidences else set())
    rows = []
    for t in sorted(points):
        row = replay(run, t, base)
        row["in_grid"] = t in grid
        if t in swept:
            row["sweep"] = {"configuration": swept[t], **throughput(sweep["configurations"][swept[t]])}
        rows.append(row)
    best = recommend(rows, target)
    result: dict = {
        "eval": str(run.folder),
        "questions": len(run.questions),
        "failed_auto_requests": sum("error" in r["metadata"] for r in run.auto.values()),
        "macro_answer_differs": macro_mismatches(run),
        "run_threshold": run.replayable_up_to,
        "baselines": {
            mode: {"accuracy": acc, **({"sweep": throughput(sweep["configurations"][mode])} if sweep else {})}
            for mode, acc in base.items()
        },
        "gain": {g: _diff(base["dualfocus"][g], base["macro"][g]) for g in GROUPS},
        "target_gain_kept": target,
        "rows": rows,
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
        "| threshold | detail % | global % | mix % | zoomed | gain kept (mix) | gain kept (detail) | req/s "
        "| vs macro | vs dualfocus |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if not (r["in_grid"] or "sweep" in r or r is best):
            continue
        s = r.get("sweep", {})
        acc = r["accuracy"]
        lines.append(
            f"| {r['threshold']:.6g}{' (recommended)' if r is best else ''} | {_pct(acc['detail'])} "
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
        f"recommended threshold {best['threshold']:.6g}: zooms {_share(best['zoomed_share'])} of questions and keeps "
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
            lines.append(row(f"auto@{r['threshold']:.6g}", r["accuracy"], r["gain_kept"]["mix"], zoomed, s))
    lines.append(row("dualfocus", base["dualfocus"]["accuracy"], kept("dualfocus"), "100%", base["dualfocus"]["sweep"]))
    meeting = [
        f"auto@{r['threshold']:.6g}"
        for r in result["rows"]
        if "sweep" in r
        and (r["gain_kept"]["mix"] or 0) >= result["target_gain_kept"] - 1e-12
        and (r["sweep"].get("vs_dualfocus") or 0) >= 1.5
    ]
    notes = [
        f"Accuracy: `{result['eval']}`, {result['questions']} questions, replayed from one run at zoom threshold "
        f"{result['run_threshold']:g} (`python -m loadtests.auto_calibrate`); zoomed: share of the eval's "
        "questions the replayed gate zooms. Throughput: median requests/s over the sweep's rounds, load "
        f"{sweep.get('load') or 'not recorded'}, concurrency {sweep.get('concurrency')}, {sweep.get('rounds')} "
        f"rounds, `{sweep.get('command')}` (git {sweep.get('git')}).",
        recommendation(result) + ".",
        "Issue 14's target (>= 95% of the gain on the mix and >= 1.5x dualfocus's throughput): "
        + (f"met by {', '.join(meeting)}." if meeting else "met by no swept threshold."),
    ]
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


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
        "--thresholds", default=DEFAULT_THRESHOLDS, help="comma-separated, 0-1, the rows printed (default: %(default)s)"
    )
    p.add_argument(
        "--confidences",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also replay at every distinct confidence of a zoomed question, where the decisions "
        "change (in the JSON and for the recommendation; default: %(default)s)",
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
    if not thresholds:
        p.error("--thresholds: comma-separated numbers between 0 and 1")
    if not 0.0 < args.target_gain <= 1.0:
        p.error("--target-gain: above 0, at most 1")
    if args.docs and not args.sweep:
        p.error("--docs needs --sweep (the table has the sweep's throughput)")
    try:
        run = load_run(args.eval_dir)
        sweep = load_sweep(args.sweep) if args.sweep else None
        result = calibrate(run, thresholds, args.confidences, sweep, args.target_gain)
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
