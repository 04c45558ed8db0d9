"""Throughput of mode auto at several zoom thresholds, beside modes macro and dualfocus, against one
running server (each request sets its own threshold, so one server serves the whole sweep).

    python -m loadtests.auto_sweep --url http://127.0.0.1:8000 --thresholds 0,0.5,1 \\
        --concurrency 16 --requests 64 --rounds 2 --out loadtests/results/auto-sweep-DATE

Rounds interleave the configurations (macro, dualfocus, auto@t, ...; then again), each run on
synthetic scenes of its own seed, so every request's image is one the server has not seen and a
slow spell of a noisy machine falls on every configuration alike. Reported per configuration: the
median over rounds of requests/s, its ratio to macro and to dualfocus, and (mode auto) the share of
requests that zoomed and why the others did not. Accuracy needs a trained model and its task:
`dualfocus eval` on tiny-dualfocus (docs/performance.md, "Adaptive DualFocus (mode auto)").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

import openai

from . import scenes
from .loadgen import git_revision, machine, request_fn, run_load, summarize


def configurations(thresholds: list[float]) -> list[tuple[str, str, float | None]]:
    """(name, mode, threshold) per configuration."""
    return [("macro", "macro", None), ("dualfocus", "dualfocus", None)] + [
        (f"auto@{t:g}", "auto", t) for t in thresholds
    ]


def compare(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per configuration, from its runs' loadgen summaries: the median requests/s, its ratios to
    macro and to dualfocus, and for mode auto how often it zoomed and why not."""
    median = {name: statistics.median(r["requests_per_s"] for r in rs) for name, rs in runs.items()}
    table = {}
    for name, rs in runs.items():
        row = {"requests_per_s_median": round(median[name], 3),
               "vs_macro": round(median[name] / median["macro"], 3) if median["macro"] else None,
               "vs_dualfocus": round(median[name] / median["dualfocus"], 3) if median["dualfocus"] else None,
               "latency_p50_s_median": round(statistics.median(r["latency_s"].get("p50", 0) for r in rs), 3),
               "errors": sum(r["requests"] - r["ok"] for r in rs)}
        zooms = [r["zoom"] for r in rs if "zoom" in r]
        if zooms:
            total = sum(z["zoomed"] + z["skipped"] for z in zooms)
            why: dict[str, int] = {}
            for z in zooms:
                for k, v in z["why"].items():
                    why[k] = why.get(k, 0) + v
            row["zoomed_share"] = round(sum(z["zoomed"] for z in zooms) / total, 3) if total else None
            row["why"] = why
            row["box_aborted"] = sum(z["box_aborted"] for z in zooms)
        table[name] = row
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.auto_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server address (default: %(default)s)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--thresholds", default="0,0.5,1", help="comma-separated, 0-1 (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: %(default)s)")
    p.add_argument("--requests", type=int, default=64, help="per configuration and round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="default: %(default)s")
    p.add_argument("--max-tokens", type=int, default=16, help="default: %(default)s")
    p.add_argument("--out", type=Path, required=True, help="folder for one JSON per run and summary.json")
    args = p.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    if not thresholds or not all(0.0 <= t <= 1.0 for t in thresholds):
        p.error("--thresholds: numbers between 0 and 1")
    configs = configurations(thresholds)
    args.out.mkdir(parents=True, exist_ok=True)

    async def go() -> dict[str, list[dict]]:
        client = openai.AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key, max_retries=0,
                                    timeout=600)
        model = (await client.models.list()).data[0].id
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
        seed = 1000
        for round_ in range(args.rounds):
            for name, mode, threshold in configs:
                seed += 1
                send = request_fn("ours", client, model, mode, args.max_tokens, False, threshold)
                samples, wall = await run_load(send, scenes.synthetic(args.requests, seed=seed),
                                               concurrency=args.concurrency, requests=args.requests, progress=False)
                summary = summarize(samples, wall)
                (args.out / f"{name}-round{round_ + 1}.json").write_text(json.dumps(
                    {"config": name, "mode": mode, "zoom_threshold": threshold, "seed": seed, "summary": summary},
                    indent=2))
                runs[name].append(summary)
                print(f"round {round_ + 1} {name:<12} {summary['requests_per_s']:7.2f} req/s "
                      f"ok {summary['ok']}/{summary['requests']}", flush=True)
        await client.close()
        return runs

    runs = asyncio.run(go())
    table = compare(runs)
    result = {"command": " ".join(sys.argv), "git": git_revision(), "machine": machine(),
              "concurrency": args.concurrency, "requests": args.requests, "rounds": args.rounds,
              "max_tokens": args.max_tokens, "configurations": table}
    (args.out / "summary.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
