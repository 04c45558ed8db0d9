"""An async load generator for OpenAI-compatible chat endpoints.

    python -m loadtests.loadgen --url http://127.0.0.1:8000 --system ours --mode dualfocus \\
        --concurrency 8 --requests 64 --out result.json
    python -m loadtests.loadgen --url http://127.0.0.1:8001 --system stock-chat --rate 4 --duration 30

Closed loop (--concurrency: that many requests always in flight) or open loop (--rate:
Poisson arrivals per second). Images: synthetic scenes (default) or --images DIR --questions
FILE.jsonl. Results as JSON: requests/s, output tokens/s, latency and TTFT percentiles, errors by
type, and (from this service's traces) per-stage ms and cached-token ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai
from tqdm import tqdm

from . import scenes, systems

SYSTEMS = ("ours", "stock-chat", "stock-dualfocus")


def request_fn(system: str, client, model: str, mode: str, max_tokens: int, stream: bool,
               zoom_threshold: float | None = None, zoom_threshold_choice: float | None = None):
    if system == "ours":
        return lambda item: systems.ours(client, model, item, mode, max_tokens, stream, zoom_threshold,
                                         zoom_threshold_choice)
    if system == "stock-chat":
        return lambda item: systems.stock_chat(client, model, item, max_tokens, stream)
    if system == "stock-dualfocus":
        return lambda item: systems.stock_dualfocus(client, model, item, max_tokens)
    raise ValueError(f"unknown system {system!r}; one of {', '.join(SYSTEMS)}")


async def run_load(send, items, *, concurrency: int | None = None, rate: float | None = None,
                   requests: int | None = None, duration: float | None = None, progress: bool = True,
                   seed: int = 0) -> tuple[list[systems.Sample], float]:
    """Send requests closed- or open-loop; bounded by count and by time. Returns samples and wall time."""
    total = requests or (None if duration else 32)
    deadline = time.perf_counter() + duration if duration else None
    samples: list[systems.Sample] = []
    bar = tqdm(total=total, disable=not progress, desc="requests")
    sent = 0

    def more() -> bool:
        return (total is None or sent < total) and (deadline is None or time.perf_counter() < deadline)

    async def one(item):
        t0 = time.perf_counter()
        try:
            samples.append(await send(item))
        except openai.APIStatusError as e:
            samples.append(systems.Sample(False, time.perf_counter() - t0, error=f"http_{e.status_code}"))
        except (openai.APIError, ValueError, KeyError) as e:
            samples.append(systems.Sample(False, time.perf_counter() - t0, error=type(e).__name__))
        bar.update(1)

    t_start = time.perf_counter()
    if rate:  # open loop: Poisson arrivals
        rng = random.Random(seed)
        tasks = []
        while more():
            tasks.append(asyncio.create_task(one(items[sent % len(items)])))
            sent += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    else:  # closed loop: `concurrency` workers
        async def worker():
            nonlocal sent
            while more():
                item = items[sent % len(items)]
                sent += 1
                await one(item)

        await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
    bar.close()
    return samples, time.perf_counter() - t_start


def summarize(samples: list[systems.Sample], wall_s: float) -> dict:
    ok = [s for s in samples if s.ok]
    lat = sorted(s.latency_s for s in ok)
    ttft = sorted(s.ttft_s for s in ok if s.ttft_s is not None)
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.error] = errors.get(s.error, 0) + 1
    out = {
        "requests": len(samples), "ok": len(ok), "errors": errors, "wall_s": round(wall_s, 3),
        "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
        "output_tokens_per_s": sum(s.output_tokens for s in ok) / wall_s if wall_s else 0.0,
        "latency_s": _percentiles(lat), "ttft_s": _percentiles(ttft) if ttft else None,
        "prompt_tokens_per_request": statistics.mean(s.prompt_tokens for s in ok) if ok else 0,
        "computed_prompt_tokens_per_request": (
            statistics.mean(s.prompt_tokens - s.cached_tokens for s in ok) if ok else 0
        ),
    }
    traces = [s.trace for s in ok if s.trace]
    if traces:
        stages = {}
        for name in ("macro", "box", "micro", "fusion"):
            rows = [t.stages[name] for t in traces if name in t.stages]
            if rows:
                prompt = sum(r.prompt_tokens for r in rows)
                stages[name] = {"ms_p50": statistics.median(r.ms for r in rows), "count": len(rows),
                                "cached_ratio": sum(r.cached_tokens for r in rows) / prompt if prompt else 0.0,
                                "prompt_tokens_mean": prompt / len(rows),
                                "computed_tokens_mean": (prompt - sum(r.cached_tokens for r in rows)) / len(rows)}
        out["stages"] = stages
        out["chosen"] = {c: sum(t.chosen == c for t in traces) for c in ("macro", "micro", "same")}
        gates = [t.gate for t in traces if t.gate]
        if gates:  # mode auto: how often it zoomed, why not, and how often the box pass was aborted
            out["zoom"] = {"zoomed": sum(g.zoomed for g in gates), "skipped": sum(not g.zoomed for g in gates),
                           "why": {why: sum(g.why == why for g in gates) for why in sorted({g.why for g in gates})},
                           "box_aborted": sum(g.box_aborted for g in gates)}
    return out


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}

    def pct(p):
        return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "mean": statistics.mean(values)}


def machine() -> dict:
    import os

    import torch

    # The vector extension decides the CPU's dtype (engine/config.py, cpu_dtype): float32 below AVX-512.
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def git_revision() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server address (default: %(default)s)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--model", help="model name (default: the server's first)")
    p.add_argument("--system", choices=SYSTEMS, default="ours", help="what a request is (default: %(default)s)")
    p.add_argument("--mode", choices=["dualfocus", "auto", "macro"], default="dualfocus", help="for --system ours")
    p.add_argument("--zoom-threshold", type=float, help="with --mode auto: each request's (default: the server's)")
    p.add_argument("--zoom-threshold-choice", type=float,
                   help="with --mode auto: each multiple-choice request's (default: the server's)")
    p.add_argument("--stream", action="store_true", help="stream responses (TTFT is measured then)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight (default 1)")
    g.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("--requests", type=int, help="how many requests (default 32 unless --duration)")
    p.add_argument("--duration", type=float, help="stop sending after this many seconds")
    p.add_argument("--max-tokens", type=int, default=16, help="default: %(default)s")
    p.add_argument("--scenes", type=int, default=64, help="distinct synthetic scenes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which synthetic scenes (default: %(default)s)")
    p.add_argument("--images", type=Path, help="folder of images (with --questions)")
    p.add_argument("--questions", type=Path, help="JSONL: {\"image\": NAME, \"text\": QUESTION} per line")
    p.add_argument("--out", type=Path, help="write the JSON result here (default: print it)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if bool(args.images) != bool(args.questions):
        p.error("--images and --questions go together")
    if args.images:
        items = scenes.from_folder(args.images, args.questions)
    else:
        items = scenes.synthetic(args.scenes, seed=args.seed)

    async def go():
        client = openai.AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key, max_retries=0,
                                    timeout=600)
        model = args.model or (await client.models.list()).data[0].id
        send = request_fn(args.system, client, model, args.mode, args.max_tokens, args.stream, args.zoom_threshold,
                          args.zoom_threshold_choice)
        samples, wall = await run_load(send, items, concurrency=args.concurrency, rate=args.rate,
                                       requests=args.requests, duration=args.duration,
                                       progress=not args.no_progress)
        await client.close()
        return samples, wall

    samples, wall = asyncio.run(go())
    result = {"command": " ".join(sys.argv), "git": git_revision(), "machine": machine(),
              "system": args.system, "mode": args.mode, "zoom_threshold": args.zoom_threshold,
              "zoom_threshold_choice": args.zoom_threshold_choice,
              "concurrency": args.concurrency, "rate": args.rate,
              "stream": args.stream, "summary": summarize(samples, wall)}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
