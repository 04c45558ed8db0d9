"""`make bench`'s conversation scenario: three questions about one image, asked in turn.

A chat user asks about a picture, then follows up twice. Each later turn sends the whole
conversation again (the image, the earlier questions and answers), so its passes should read the
image's KV from the prefix cache. Measured on this service, against the same number of questions
asked as independent single-turn requests, each about an image the server has not seen:

- the share of prompt tokens served by the prefix cache in turns 1, 2 and 3 (first pass and all);
- questions answered per second, conversations vs independent requests, at the same concurrency.

Writes loadtests/results/conversation-<time>.json and docs/conversation-bench.md.
`python -m loadtests.conversation` runs it alone; `make bench` runs it after the main benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import openai

from . import scenes
from .loadgen import git_revision, machine

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-llava"
FOLLOW_UPS = ["And what colour is it?", "Is there anything else next to it?"]
TRACE = {"dualfocus": {"return_trace": True}}


async def conversation(client: openai.AsyncOpenAI, item: scenes.Item, max_tokens: int) -> list[dict]:
    """Three turns about one image; each turn's trace."""
    messages: list[dict] = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": item.image_url}}, {"type": "text", "text": item.question}]}]
    traces = []
    for follow_up in [None, *FOLLOW_UPS]:
        if follow_up is not None:
            messages.append({"role": "user", "content": follow_up})
        r = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                 extra_body=TRACE)
        traces.append(r.dualfocus)  # type: ignore[attr-defined]
        messages.append({"role": "assistant", "content": r.choices[0].message.content or ""})
    return traces


async def single(client: openai.AsyncOpenAI, item: scenes.Item, max_tokens: int) -> dict:
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": item.image_url}}, {"type": "text", "text": item.question}]}]
    r = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, extra_body=TRACE)
    return r.dualfocus  # type: ignore[attr-defined]


async def bounded(jobs, concurrency: int) -> tuple[list, float]:
    """Run the coroutine factories `jobs`, `concurrency` at a time; results in order, and the wall time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(job):
        async with gate:
            return await job()

    t0 = time.perf_counter()
    results = await asyncio.gather(*[one(job) for job in jobs])
    return results, time.perf_counter() - t0


def cached_share(traces: list[dict], first_pass_only: bool) -> float:
    """Share of prompt tokens served by the prefix cache: in the first pass (the box), or in all."""
    if first_pass_only:
        stages = [t["stages"]["box"] for t in traces]
    else:
        stages = [s for t in traces for s in t["stages"].values()]
    return sum(s["cached_tokens"] for s in stages) / sum(s["prompt_tokens"] for s in stages)


def measure(port: int, conversations: int, concurrency: int, max_tokens: int) -> dict:
    async def go() -> dict:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                    timeout=600)
        # Images never seen by this server; disjoint sets for the two runs and the warm-up.
        pool = scenes.synthetic(4 * conversations + 2, seed=12)
        talks, singles, warmup = pool[:conversations], pool[conversations:4 * conversations], pool[4 * conversations:]
        await bounded([lambda item=item: single(client, item, max_tokens) for item in warmup], concurrency)
        by_conversation, conv_wall = await bounded(
            [lambda item=item: conversation(client, item, max_tokens) for item in talks], concurrency)
        independent, single_wall = await bounded(
            [lambda item=item: single(client, item, max_tokens) for item in singles], concurrency)
        await client.close()
        turns = [[c[t] for c in by_conversation] for t in range(3)]
        return {
            "conversations": conversations, "concurrency": concurrency, "questions": 3 * conversations,
            "conversation": {"wall_s": conv_wall, "questions_per_s": 3 * conversations / conv_wall,
                             "per_turn": [{"turn": t + 1, "first_pass_cached_share": cached_share(ts, True),
                                           "cached_share": cached_share(ts, False),
                                           "box_ms_p50": statistics.median(x["stages"]["box"]["ms"] for x in ts)}
                                          for t, ts in enumerate(turns)]},
            "independent": {"wall_s": single_wall, "questions_per_s": len(singles) / single_wall,
                            "first_pass_cached_share": cached_share(independent, True),
                            "cached_share": cached_share(independent, False),
                            "box_ms_p50": statistics.median(x["stages"]["box"]["ms"] for x in independent)},
        }

    return asyncio.run(go())


def report(r: dict, path) -> str:
    c, s = r["conversation"], r["independent"]
    lines = [
        "# Conversation benchmark", "",
        f"Generated by `{r['command']}` at git `{r['git']}` on {r['machine']['platform']} "
        f"({r['machine']['cpus']} CPUs), {r['started']}. Raw figures: `{path}`.",
        f"Model: {r['model']} (random weights, 576 image tokens per image), max_tokens {r['max_tokens']}, DualFocus "
        f"mode. {r['conversations']} conversations of 3 questions about one image each (the question, then "
        f"{' / '.join(repr(q) for q in FOLLOW_UPS)}, each turn sending the whole conversation), "
        f"{r['concurrency']} conversations at a time; against {r['questions']} independent single-turn requests, "
        f"each about an image the server has not seen, {r['concurrency']} at a time. One run; read ratios.", "",
        "| | prompt tokens from the prefix cache, first pass (box) | all passes | box pass p50 ms |",
        "|---|---|---|---|",
    ]
    for t in c["per_turn"]:
        lines.append(f"| conversation, turn {t['turn']} | {t['first_pass_cached_share']:.2f} | {t['cached_share']:.2f} "
                     f"| {t['box_ms_p50']:.0f} |")
    lines += [f"| independent requests | {s['first_pass_cached_share']:.2f} | {s['cached_share']:.2f} "
              f"| {s['box_ms_p50']:.0f} |", "",
              "| | questions/s | wall s |", "|---|---|---|",
              f"| conversations (3 turns each) | {c['questions_per_s']:.2f} | {c['wall_s']:.1f} |",
              f"| independent single-turn requests | {s['questions_per_s']:.2f} | {s['wall_s']:.1f} |",
              f"| ratio | {c['questions_per_s'] / s['questions_per_s']:.2f}x | |", "",
              "A conversation's turns run one after the other (each needs the answer before), so at the same "
              "number of clients a conversation has fewer questions in flight than independent requests; its "
              "later turns are cheaper because the image (and the earlier turns) come from the prefix cache.", ""]
    return "\n".join(lines)


def run(port: int, conversations: int, concurrency: int, max_tokens: int, command: str) -> Path:
    results = {"command": command, "git": git_revision(), "machine": machine(), "model": MODEL,
               "max_tokens": max_tokens, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               **measure(port, conversations, concurrency, max_tokens)}
    out = ROOT / "loadtests" / "results" / f"conversation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    (ROOT / "docs" / "conversation-bench.md").write_text(report(results, out.relative_to(ROOT)))
    print(report(results, out.relative_to(ROOT)), flush=True)
    return out


def main(argv=None) -> int:
    from .bench import start, stop

    p = argparse.ArgumentParser(prog="python -m loadtests.conversation", description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=8, help="default: %(default)s")
    p.add_argument("--concurrency", type=int, default=4, help="default: %(default)s")
    p.add_argument("--max-tokens", type=int, default=16, help="default: %(default)s")
    p.add_argument("--port", type=int, default=8701)
    args = p.parse_args(argv)
    logs = ROOT / "loadtests" / "results" / "tmp"
    logs.mkdir(parents=True, exist_ok=True)
    server = start([sys.executable, "-m", "clients", "serve", "--port", str(args.port), "--model", MODEL,
                    "--max-inflight-requests", "256"], args.port, logs / "conversation.log")
    try:
        command = "python -m loadtests.conversation " + " ".join(argv if argv is not None else sys.argv[1:])
        run(args.port, args.conversations, args.concurrency, args.max_tokens, command.strip())
    finally:
        stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
