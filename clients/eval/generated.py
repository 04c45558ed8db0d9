"""The generated zoom-in task (training/task.py) as an evaluation set, and its report.

`dualfocus eval --generate N --out DIR` writes N test questions (scene seeds disjoint from
training's) as DIR/questions.jsonl + DIR/images/, in LLaVA's format with the task's extra fields
(`kind`, `box` the region asked about, `asked_sign` for detail questions), asks them in both modes
and reports, per kind of question, macro vs DualFocus accuracy, how often fusion chose each
answer, and the median IoU of the model's box with the asked sign.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from training.task import GLOBAL_KINDS, KINDS, iou, make_test_set

from .harness import Answer

KIND_TITLES = {
    "detail": "detail, open-ended",
    "detail_mc": "detail, multiple choice",
    "count": "global: count",
    "presence": "global: presence",
    "global": "global (count + presence)",
}


def write_test_set(n: int, seed: int, out: Path) -> Path:
    """Render the test set into `out`; returns the questions file. The same n and seed give the same files."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = out / "questions.jsonl"
    with path.open("w") as f:
        for i, (scene, q) in enumerate(make_test_set(n, seed)):
            name = f"scene-{scene.seed}.png"
            scene.image.save(images / name)
            f.write(
                json.dumps(
                    {
                        "question_id": i,
                        "image": name,
                        "text": q.text,
                        "answer": q.answer,
                        "kind": q.kind,
                        "box": list(q.box),
                        "asked_sign": list(q.asked_sign) if q.asked_sign else None,
                    }
                )
                + "\n"
            )
    return path


def task_summary(answers: dict[str, list[Answer]]) -> dict:
    """Per kind (and global = count + presence): accuracy per mode, DualFocus's choices; box IoU."""
    out: dict = {"kinds": {}}
    groups = {k: (k,) for k in KINDS} | {"global": GLOBAL_KINDS}
    for group, kinds in groups.items():
        entry: dict = {}
        for mode, mode_answers in answers.items():
            picked = [a for a in mode_answers if a.question.get("kind") in kinds]
            if not picked:
                continue
            entry["questions"] = len(picked)
            entry[mode] = 100 * sum(a.score or 0.0 for a in picked) / len(picked)
            if mode == "dualfocus":
                chosen = Counter(a.result.chosen for a in picked if a.result)
                entry["chosen"] = {k: chosen[k] for k in ("macro", "micro", "same")}
        if entry:
            out["kinds"][group] = entry
    ious = [
        iou(a.result.box, tuple(a.question["asked_sign"])) if a.result and a.result.box else 0.0
        for a in answers.get("dualfocus", [])
        if a.question.get("asked_sign")
    ]
    out["box_iou"] = {
        "questions": len(ious),
        "median": statistics.median(ious) if ious else None,
        "at_least_0.5": 100 * sum(v >= 0.5 for v in ious) / len(ious) if ious else None,
    }
    return out


def task_report(summary: dict) -> str:
    def row(*cells) -> str:
        return f"{cells[0]:<28}" + "".join(f"{c:>11}" for c in cells[1:-1]) + f"   {cells[-1]}"

    lines = [row("", "questions", "macro", "dualfocus", "gain", "fusion chose macro / micro / same")]
    for group, e in summary["kinds"].items():
        macro, df = e.get("macro"), e.get("dualfocus")
        chosen = e.get("chosen")
        lines.append(
            row(
                KIND_TITLES[group],
                str(e["questions"]),
                "n/a" if macro is None else f"{macro:.1f}",
                "n/a" if df is None else f"{df:.1f}",
                f"{df - macro:+.1f}" if macro is not None and df is not None else "n/a",
                " / ".join(str(chosen[k]) for k in ("macro", "micro", "same")) if chosen else "",
            )
        )
    box = summary["box_iou"]
    if box["median"] is not None:
        lines.append(
            f"box IoU with the asked sign (detail questions): median {box['median']:.2f}, "
            f">= 0.5 in {box['at_least_0.5']:.0f}% of {box['questions']}"
        )
    return "\n".join(lines)
