"""Throughput of mode auto at several zoom thresholds, beside modes macro and dualfocus, against one
running server (each request sets its own threshold, so one server serves the whole sweep). Each
threshold swept is for open-ended questions; multiple-choice ones get --choice-threshold (default: the
server's), or their own where the threshold is written T/C (`--thresholds 0.484/0,0.484/0.484`).

    python -m loadtests.auto_sweep --url http://127.0.0.1:8000 --thresholds 0,0.5,1 \\
        --concurrency 16 --requests 64 --rounds 2 --out loadtests/results/auto-sweep-DATE

Rounds interleave the configurations (macro, dualfocus, auto@t, ...; then again), each run on
images of its own seed, so every request's image is one the server has not seen and a slow spell of
a noisy machine falls on every configuration alike. The load is synthetic scenes (loadtests/scenes.py)
or, with --task N, N questions of the generated zoom-in task tiny-dualfocus is trained on (the test
set `dualfocus eval --generate N --seed S` writes: half detail, half global questions), a fresh test
set per configuration and round. Reported per configuration: the median over rounds of requests/s,
its ratio to macro and to dualfocus, and (mode auto) the share of requests that zoomed and why the
others did not. Accuracy comes from `dualfocus eval`; `python -m loadtests.auto_calibrate EVAL_DIR
--sweep OUT` joins the two (docs/performance.md, "Adaptive DualFocus (mode auto)").
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


def parse_thresholds(text: str) -> list[float]:
    """A --thresholds value: comma-separated zoom thresholds, 0-1; [] if it is not that."""
    try:
        thresholds = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        return []
    return thresholds if all(0.0 <= t <= 1.0 for t in thresholds) else []


def parse_configurations(text: str, choice: float | None) -> list[tuple[float, float | None]]:
    """A --thresholds value of the sweep: per auto configuration T (multiple-choice questions at `choice`)
    or T/C, each 0-1; [] if it is not that."""
    pairs: list[tuple[float, float | None]] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        open_, slash, closed = item.partition("/")
        numbers = parse_thresholds(open_) + (parse_thresholds(closed) if slash else [])
        if len(numbers) != (2 if slash else 1):
            return []
        pairs.append((numbers[0], numbers[1] if slash else choice))
    return pairs


Config = tuple[str, str, float | None, float | None]  # name, mode, threshold, choice threshold


def configurations(thresholds: list[tuple[float, float | None]]) -> list[Config]:
    """(name, mode, threshold, choice threshold) per configuration."""
    return [("macro", "macro", None, None), ("dualfocus", "dualfocus", None, None)] + [
        (f"auto@{t:g}" if c is None else f"auto@{t:g}/{c:g}", "auto", t, c) for t, c in thresholds
    ]


def schedule(configs: list[Config], rounds: int, first_seed: int) -> list[tuple]:
    """The runs in order, (round, name, mode, threshold, choice threshold, seed): rounds interleave the
    configurations, and every run has a seed (of its scenes or task test set) no other run has."""
    runs = []
    seed = first_seed
    for round_ in range(1, rounds + 1):
        for config in configs:
            seed += 1
            runs.append((round_, *config, seed))
    return runs


def load(seed: int, requests: int, task: bool) -> list[scenes.Item]:
    """One run's requests: `requests` synthetic scenes, or as many questions of the generated task."""
    return scenes.task(requests, seed) if task else scenes.synthetic(requests, seed=seed)


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
    p.add_argument("--thresholds", default="0,0.5,1",
                   help="comma-separated, 0-1, each T or T/C (C: for multiple-choice questions) (default: %(default)s)")
    p.add_argument("--choice-threshold", type=float, metavar="0-1",
                   help="every auto request's zoom_threshold_choice where --thresholds gives none "
                        "(default: the server's --zoom-threshold-choice)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: %(default)s)")
    p.add_argument("--requests", type=int, help="per configuration and round (default: 64, or N with --task)")
    p.add_argument("--task", type=int, metavar="N",
                   help="load: N questions of the generated zoom-in task per configuration and round (a multiple "
                        "of 4: kinds in turn detail, detail_mc, count, presence, so half detail, half global) "
                        "instead of synthetic scenes; for the throughput on the mix the eval scores")
    p.add_argument("--seed", type=int, default=1000,
                   help="runs use seeds SEED+1, SEED+2, ... (scene seeds, or --task's test-set seeds; keep them "
                        "clear of the eval's test set on the same server, default 0, so no image is cached) "
                        "(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="default: %(default)s")
    p.add_argument("--max-tokens", type=int, default=16, help="default: %(default)s")
    p.add_argument("--out", type=Path, required=True, help="folder for one JSON per run and summary.json")
    args = p.parse_args(argv)
    if args.choice_threshold is not None and not 0.0 <= args.choice_threshold <= 1.0:
        p.error("--choice-threshold: a number between 0 and 1")
    thresholds = parse_configurations(args.thresholds, args.choice_threshold)
    if not thresholds:
        p.error("--thresholds: comma-separated thresholds between 0 and 1, each T or T/C")
    if args.task is not None:
        if args.task < 4 or args.task % 4:
            p.error("--task: a positive multiple of 4 (kinds in turn: detail, detail_mc, count, presence), "
                    "so the load is half detail, half global questions")
        if args.requests is not None and args.requests != args.task:
            p.error("--task N sets the requests per configuration and round to N; leave --requests out")
        args.requests = args.task
    elif args.requests is None:
        args.requests = 64
    if args.requests < 1 or args.rounds < 1:
        p.error("--requests and --rounds: at least 1")
    configs = configurations(thresholds)
    load_name = f"task ({args.task} questions per run: half detail, half global)" if args.task else "synthetic scenes"
    args.out.mkdir(parents=True, exist_ok=True)

    async def go() -> dict[str, list[dict]]:
        client = openai.AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key, max_retries=0,
                                    timeout=600)
        model = (await client.models.list()).data[0].id
        runs: dict[str, list[dict]] = {name: [] for name, *_ in configs}
        for round_, name, mode, threshold, choice, seed in schedule(configs, args.rounds, args.seed):
            send = request_fn("ours", client, model, mode, args.max_tokens, False, threshold, choice)
            samples, wall = await run_load(send, load(seed, args.requests, args.task is not None),
                                           concurrency=args.concurrency, requests=args.requests, progress=False)
            summary = summarize(samples, wall)
            (args.out / f"{name.replace('/', '_')}-round{round_}.json").write_text(json.dumps(
                {"config": name, "mode": mode, "zoom_threshold": threshold, "zoom_threshold_choice": choice,
                 "seed": seed, "load": load_name,
                 "summary": summary}, indent=2))
            runs[name].append(summary)
            print(f"round {round_} {name:<12} {summary['requests_per_s']:7.2f} req/s "
                  f"ok {summary['ok']}/{summary['requests']}", flush=True)
        await client.close()
        return runs

    runs = asyncio.run(go())
    table = compare(runs)
    for name, _, threshold, choice in configs:
        table[name]["zoom_threshold"] = threshold  # exact, where the name has it to 6 digits
        if threshold is not None:
            table[name]["zoom_threshold_choice"] = choice  # None: the server's
    result = {"command": " ".join(sys.argv), "git": git_revision(), "machine": machine(), "load": load_name,
              "task": args.task, "concurrency": args.concurrency, "requests": args.requests, "rounds": args.rounds,
              "max_tokens": args.max_tokens, "configurations": table}
    (args.out / "summary.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
