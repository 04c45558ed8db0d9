"""Run an evaluation set through a DualFocus server; write and score answers in the paper's formats.

Questions: JSON lines in LLaVA's evaluation format, `{"question_id", "image", "text"}`, options (if
any) as lines "A. ..." in the text, ground truth in `answers` (a list, VQA-style) or `answer`.
Answers: one JSON-lines file per mode in the reference's format, `{"question_id", "prompt", "text",
"answer_id", "model_id", "metadata"}`, which LLaVA's and the benchmarks' own converters read;
`metadata` holds what DualFocus did (the choice, both answers, the box) and the score.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from clients.python import AskResult, AsyncDualFocusClient, DualFocusError

from . import scoring

MODES = {
    "dualfocus": ("dualfocus",),
    "macro": ("macro",),
    "auto": ("auto",),
    "both": ("macro", "dualfocus"),
    "all": ("macro", "dualfocus", "auto"),
}
KIND_NAMES = {"vqa": "VQA", "multiple_choice": "multiple choice", "exact": "exact match"}


class EvalError(ValueError):
    """The evaluation set cannot be used as given."""


@dataclass
class Answer:
    question: dict
    mode: str
    result: AskResult | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return self.result.answer if self.result else ""

    @property
    def score(self) -> float | None:
        # A failed request scores 0 on a question with ground truth: accuracy stays over the whole set.
        return scoring.score(self.question, self.text)


def load_questions(path: Path, images: Path) -> list[dict]:
    """Read and check the whole file first, so a bad line or a wrong --images folder fails now,
    not after hours of requests."""
    questions, seen = [], set()
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            q = json.loads(line)
        except ValueError as e:
            raise EvalError(f"{where}: not JSON ({e})") from None
        missing = [k for k in ("question_id", "image", "text") if not isinstance(q, dict) or q.get(k) is None]
        if missing:
            raise EvalError(f"{where}: no {', '.join(missing)} (each line needs question_id, image, text)")
        if q["question_id"] in seen:
            raise EvalError(f"{where}: question_id {q['question_id']!r} appears twice")
        seen.add(q["question_id"])
        if not (images / q["image"]).is_file():
            raise EvalError(f"{where}: image {images / q['image']} not found (is --images the right folder?)")
        if scoring.question_kind(q) == "multiple_choice":
            options = scoring.parse_options(q["text"])
            if scoring.option_letter(str(q["answer"]), options) is None:
                raise EvalError(f"{where}: answer {q['answer']!r} is none of the options {', '.join(options)}")
        questions.append(q)
    if not questions:
        raise EvalError(f"{path} has no questions")
    return questions


async def ask_all(
    client: AsyncDualFocusClient,
    questions: list[dict],
    images: Path,
    modes: tuple[str, ...],
    concurrency: int = 8,
    max_tokens: int = 128,
    progress: bool = True,
    zoom_threshold: float | None = None,
    zoom_threshold_choice: float | None = None,
) -> dict[str, list[Answer]]:
    """Every question in every mode, at most `concurrency` requests in flight, in question order.
    Greedy decoding (the server's default), as the reference evaluates."""
    limit = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(questions) * len(modes), desc="eval", unit="answer", disable=not progress)

    async def one(question: dict, mode: str) -> Answer:
        async with limit:
            try:
                result = await client.ask(
                    images / question["image"],
                    question["text"],
                    mode=mode,
                    max_tokens=max_tokens,
                    zoom_threshold=zoom_threshold if mode == "auto" else None,
                    zoom_threshold_choice=zoom_threshold_choice if mode == "auto" else None,
                )
                return Answer(question, mode, result)
            except DualFocusError as e:
                return Answer(question, mode, error=str(e))
            finally:
                bar.update(1)

    try:
        # A question's modes are submitted one after the other, so the second finds the image
        # (system prompt and image tokens) in the server's prefix cache.
        answers = await asyncio.gather(*(one(q, mode) for q in questions for mode in modes))
    finally:
        bar.close()
    return {mode: [a for a in answers if a.mode == mode] for mode in modes}


def short_id() -> str:
    """A 22-character random id, like the shortuuid ids of the reference's answer files."""
    alphabet, n, out = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", uuid.uuid4().int, ""
    for _ in range(22):  # 57**22 > 2**128: every uuid fits, short ones padded
        n, digit = divmod(n, len(alphabet))
        out += alphabet[digit]
    return out


def write_answers(answers: list[Answer], path: Path, model_id: str) -> None:
    with path.open("w") as f:
        for a in answers:
            r = a.result
            metadata: dict[str, Any] = {"mode": a.mode, "score": a.score}
            if r is None:
                metadata["error"] = a.error
            else:
                metadata.update(
                    chosen=r.chosen,
                    why=r.why,
                    macro_answer=r.macro_answer,
                    micro_answer=r.micro_answer,
                    box=r.box_text,
                    crop=list(r.crop) if r.crop else None,
                )
                if r.gate is not None:  # mode auto: with gate.confidence, any threshold can be replayed offline
                    metadata["gate"] = asdict(r.gate)
            f.write(
                json.dumps(
                    {
                        "question_id": a.question["question_id"],
                        "prompt": a.question["text"],
                        "text": a.text,
                        "answer_id": short_id(),
                        "model_id": model_id,
                        "metadata": metadata,
                    }
                )
                + "\n"
            )


def summarize(answers: list[Answer]) -> dict:
    """Accuracy (in %) over the questions with ground truth, overall and per kind; failures; and,
    for DualFocus, how often fusion kept the macro answer, took the micro one, or found them the same."""
    scored = [(scoring.question_kind(a.question), a.score) for a in answers if a.score is not None]
    by_kind = {}
    for kind in KIND_NAMES:
        values = [s for k, s in scored if k == kind]
        if values:
            by_kind[kind] = {"questions": len(values), "accuracy": 100 * sum(values) / len(values)}
    chosen = Counter(a.result.chosen for a in answers if a.result and a.result.mode == "dualfocus")
    gates = [a.result.gate for a in answers if a.result and a.result.gate]
    return {
        "questions": len(answers),
        "scored": len(scored),
        "accuracy": 100 * sum(s for _, s in scored) / len(scored) if scored else None,
        "by_kind": by_kind,
        "errors": sum(a.result is None for a in answers),
        "chosen": {k: chosen[k] for k in ("macro", "micro", "same") if chosen[k]},
        # Mode auto: how many answers zoomed (micro pass and fusion) of those the gate decided.
        **({"zoomed": sum(g.zoomed for g in gates), "gated": len(gates)} if gates else {}),
    }


def report(summaries: dict[str, dict]) -> str:
    """Macro and DualFocus side by side."""
    modes = list(summaries)

    def row(name: str, values: list[str], note: str = "") -> str:
        return f"{name:<28}" + "".join(f"{v:>12}" for v in values) + (f"   {note}" if note else "")

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    first = summaries[modes[0]]
    lines = [row("", modes)]
    note = f"% of {first['scored']} questions with ground truth" + (
        f", of {first['questions']}" if first["scored"] != first["questions"] else ""
    )
    if len(modes) == 2 and all(s["accuracy"] is not None for s in summaries.values()):
        note += f"; dualfocus - macro: {summaries['dualfocus']['accuracy'] - summaries['macro']['accuracy']:+.2f}"
    lines.append(row("accuracy", [pct(s["accuracy"]) for s in summaries.values()], note))
    for kind, name in KIND_NAMES.items():
        if kind in first["by_kind"]:
            lines.append(
                row(
                    f"  {name} accuracy",
                    [pct(s["by_kind"].get(kind, {}).get("accuracy")) for s in summaries.values()],
                    f"{first['by_kind'][kind]['questions']} questions",
                )
            )
    lines.append(row("failed requests", [str(s["errors"]) for s in summaries.values()]))
    if "dualfocus" in summaries:
        chosen, total = summaries["dualfocus"]["chosen"], sum(summaries["dualfocus"]["chosen"].values())
        parts = [f"{k} {chosen.get(k, 0)} ({100 * chosen.get(k, 0) / total:.0f}%)" for k in ("macro", "micro", "same")]
        lines.append(
            "dualfocus chose: "
            + (", ".join(parts) if total else "nothing (every request failed)")
            + "   (same: both passes gave the same answer)"
        )
    if summaries.get("auto", {}).get("gated"):
        auto = summaries["auto"]
        lines.append(f"auto zoomed: {auto['zoomed']} of {auto['gated']} ({100 * auto['zoomed'] / auto['gated']:.0f}%)")
    return "\n".join(lines)
