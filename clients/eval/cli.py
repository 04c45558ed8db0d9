"""`dualfocus eval QUESTIONS.jsonl --images DIR --out DIR`: an evaluation set through a running server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from .harness import MODES, EvalError, ask_all, load_questions, report, summarize, write_answers


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="run an evaluation set (LLaVA's question format) through a running server and score it",
        description="Ask a running DualFocus server every question of an evaluation set in LLaVA's format "
        "(JSON lines: question_id, image, text; options as lines 'A. ...' in the text; ground truth in "
        "'answers', a list, VQA-style, or 'answer'), write one answer file per mode in the reference's "
        "format (question_id, prompt, text, answer_id, model_id, metadata) and print the accuracy of "
        "each mode side by side. Scoring: VQA accuracy for 'answers', option accuracy for 'answer' with "
        "options, normalised exact match otherwise; questions without ground truth are answered, not "
        "scored. See docs/paper.md for the paper's sets.",
    )
    p.add_argument(
        "questions", metavar="QUESTIONS.jsonl", type=Path, nargs="?", help="the evaluation set (not with --generate)"
    )
    p.add_argument("--images", type=Path, help="folder the questions' 'image' paths are relative to")
    p.add_argument(
        "--generate",
        type=int,
        metavar="N",
        help="instead of a file: N questions of the generated zoom-in task tiny-dualfocus is trained on "
        "(training/task.py; kinds in turn: detail, detail multiple-choice, count, presence), written "
        "to OUT/questions.jsonl and OUT/images/, with scene seeds disjoint from training's; also "
        "reports accuracy per kind, fusion's choices per kind and the box's IoU with the asked sign",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="with --generate: which test set (default: %(default)s, the one docs/paper.md reports)",
    )
    p.add_argument(
        "--mode",
        choices=list(MODES),
        default="both",
        help="dualfocus, macro (one plain pass), auto (zoom only when the macro answer is unsure), both (macro "
        "and dualfocus, for the comparison) or all three (default: %(default)s)",
    )
    p.add_argument(
        "--zoom-threshold",
        type=float,
        metavar="0-1",
        help="mode auto: zoom when the macro answer's confidence is below this (default: the server's); each "
        "answer's metadata.gate.confidence lets any other threshold be replayed from one run at 1",
    )
    p.add_argument(
        "--zoom-threshold-choice",
        type=float,
        metavar="0-1",
        help="mode auto: the same, for multiple-choice questions (default: the server's); 1 as well to calibrate",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="folder for answers-MODE.jsonl and summary.json (created if missing)"
    )
    p.add_argument(
        "--url",
        default=os.environ.get("DUALFOCUS_URL", "http://127.0.0.1:8000"),
        help="server address (default: $DUALFOCUS_URL or %(default)s)",
    )
    p.add_argument("--api-key", default=os.environ.get("DUALFOCUS_API_KEY"), help="default: $DUALFOCUS_API_KEY")
    p.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="requests in flight at once; keep it within the server's --max-inflight-requests (default: %(default)s)",
    )
    p.add_argument("--max-tokens", type=int, default=128, help="per answer, as the reference (default: %(default)s)")
    p.add_argument("--limit", type=int, help="only the first N questions (a quick check)")
    p.add_argument("--model-id", help="model_id written in the answer files (default: the served model's name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clients.python import AsyncDualFocusClient, DualFocusError

    if args.concurrency < 1:
        print("error: --concurrency must be at least 1", file=sys.stderr)
        return 2
    if (args.questions is None) == (args.generate is None):
        print("error: give either QUESTIONS.jsonl (with --images) or --generate N", file=sys.stderr)
        return 2
    if args.generate is not None:
        from .generated import write_test_set

        if args.generate < 1:
            print("error: --generate needs at least 1 question", file=sys.stderr)
            return 2
        args.questions = write_test_set(args.generate, args.seed, args.out)
        args.images = args.out / "images"
    elif args.images is None:
        print("error: --images is required with QUESTIONS.jsonl", file=sys.stderr)
        return 2
    try:
        questions = load_questions(args.questions, args.images)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    questions = questions[: args.limit] if args.limit else questions
    modes = MODES[args.mode]

    async def go():
        client = AsyncDualFocusClient(args.url, api_key=args.api_key)
        try:
            model = await client.model()  # fails fast on a wrong URL or key, before any question
            answers = await ask_all(
                client,
                questions,
                args.images,
                modes,
                args.concurrency,
                args.max_tokens,
                zoom_threshold=args.zoom_threshold,
                zoom_threshold_choice=args.zoom_threshold_choice,
            )
            return model, answers
        finally:
            await client.close()

    try:
        model, answers = asyncio.run(go())
    except DualFocusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for mode in modes:
        write_answers(answers[mode], args.out / f"answers-{mode}.jsonl", args.model_id or model)
        summaries[mode] = summarize(answers[mode])
    summary = {"questions_file": str(args.questions), "model": model, "modes": summaries}
    if args.generate is not None:
        from .generated import task_report, task_summary

        summary["task"] = task_summary(answers)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(report(summaries))
    if "task" in summary:
        print("\nthe generated zoom-in task (% correct)\n" + task_report(summary["task"]))
    print("answers: " + ", ".join(str(args.out / f"answers-{mode}.jsonl") for mode in modes))
    failed = sum(s["errors"] for s in summaries.values())
    if failed:
        errors = {a.error for mode in modes for a in answers[mode] if a.error}
        print(f"error: {failed} request(s) failed (scored as wrong), e.g.: {sorted(errors)[0]}", file=sys.stderr)
        return 1
    return 0
