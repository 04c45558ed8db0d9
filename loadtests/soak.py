"""Overload soak (`make soak`): offer a server several times the rate it can sustain and check
that it stays up, refuses the excess politely, and keeps its memory and its latency bounded.

    python -m loadtests.soak                       # start a server, 4x for 120 s, write the results
    python -m loadtests.soak --factor 4 --duration 120 --max-inflight-requests 16
    python -m loadtests.soak -- --mm-processor-cache-gib 0.25    # after --: flags for dualfocus serve

1. Sustainable rate: closed loop at the server's in-flight limit, requests/s of completed ones.
   Every request in the run brings an image the server has not seen (no prefix-cache reuse).
2. Overload: Poisson arrivals at FACTOR x that rate for DURATION s, resident memory (RSS) of the
   server and its engine processes sampled every second.
3. Verdict: every request either completed or was refused with 429 + Retry-After; RSS in the last
   third of the run within 10% of the first third's; p99 latency of accepted requests within the
   bound (twice the time to work off a full in-flight queue at the sustainable rate, + 5 s);
   afterwards /health is 200 and nothing is left in flight.

Results: loadtests/results/soak-<time>.json (figures quoted in docs/reliability.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
from prometheus_client.parser import text_string_to_metric_families

from . import scenes
from .bench import ROOT, start, stop
from .loadgen import git_revision, machine, request_fn, run_load, summarize

MODEL = "tiny-llava"


async def sustainable_rate(send, items, concurrency: int) -> float:
    """Completed requests/s with the server's in-flight limit kept full."""
    samples, wall = await run_load(send, items, concurrency=concurrency, requests=len(items), progress=False)
    return sum(s.ok for s in samples) / wall


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children (vLLM's engine processes), in MB."""
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


async def overload(base_url: str, api_key: str, pid: int, *, factor: float, duration: float,
                   max_inflight: int, mode: str = "dualfocus", max_tokens: int = 16, progress: bool = True) -> dict:
    """Measure the sustainable rate, offer `factor` times it for `duration` s, and judge the run."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    plain = request_fn("ours", client, MODEL, mode, max_tokens, stream=False)
    missing_retry_after = 0

    async def send(item):
        nonlocal missing_retry_after
        try:
            return await plain(item)
        except openai.RateLimitError as e:
            missing_retry_after += "retry-after" not in e.response.headers
            raise

    # Every request brings an image the server has not seen: a repeated image would be served
    # from the prefix cache and make the load lighter than real traffic.
    items = scenes.synthetic(5 * max_inflight, seed=17)
    await run_load(send, items[:max_inflight], concurrency=max_inflight, requests=max_inflight,
                   progress=False)  # warm up
    rate = await sustainable_rate(send, items[max_inflight:], max_inflight)
    items = scenes.synthetic(int(factor * rate * duration * 1.2) + 1, seed=18)

    rss: list[tuple[float, float]] = []

    async def sample_rss():
        t0 = time.perf_counter()
        while True:
            rss.append((round(time.perf_counter() - t0, 1), round(rss_mb(pid), 1)))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_rss())
    samples, wall = await run_load(send, items, rate=factor * rate, duration=duration, progress=progress, seed=3)
    sampler.cancel()
    await client.close()

    idle = await asyncio.to_thread(wait_idle, base_url)
    health = httpx.get(base_url + "/health", timeout=10).status_code
    summary = summarize(samples, wall)
    refused = summary["errors"].get("http_429", 0)
    failed = {k: v for k, v in summary["errors"].items() if k != "http_429"}
    third = max(1, len(rss) // 3)
    first_third, last_third = max(m for _, m in rss[:third]), max(m for _, m in rss[-third:])
    latency_bound_s = 2 * max_inflight / rate + 5
    p99 = summary["latency_s"].get("p99", 0.0)
    checks = {
        "server_up_and_healthy_after": health == 200,
        "nothing_left_in_flight_after": idle,
        "every_request_completed_or_was_refused_with_429": not failed,
        "every_429_had_retry_after": missing_retry_after == 0,
        "some_requests_were_refused": refused > 0,
        "rss_last_third_within_10pct_of_first_third": last_third <= 1.10 * first_third,
        "accepted_latency_p99_within_bound": p99 <= latency_bound_s,
    }
    return {
        "mode": mode, "max_tokens": max_tokens, "max_inflight_requests": max_inflight,
        "sustainable_rate_per_s": round(rate, 3), "factor": factor, "offered_rate_per_s": round(factor * rate, 3),
        "duration_s": duration, "sent": len(samples), "completed": summary["ok"], "refused_429": refused,
        "failed": failed, "completed_per_s": round(summary["requests_per_s"], 3),
        "accepted_latency_s": summary["latency_s"], "latency_bound_s": round(latency_bound_s, 2),
        "rss_mb": {"start": rss[0][1], "max": max(m for _, m in rss), "end": rss[-1][1],
                   "max_first_third": first_third, "max_last_third": last_third, "series": rss},
        "checks": checks, "passed": all(checks.values()),
    }


# Series that are all zero once nothing is left in flight, here or in vLLM, and the KV cache
# holds no live block.
_IDLE_SERIES = ("dualfocus_inflight_requests", "vllm:num_requests_running", "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc")


def wait_idle(base_url: str, timeout: float = 60.0, poll_s: float = 0.5) -> bool:
    """True once the server at `base_url` is idle (see _IDLE_SERIES), False if not within `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        families = text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=10).text)
        if not any(s.value for f in families for s in f.samples if s.name in _IDLE_SERIES):
            return True
        time.sleep(poll_s)
    return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factor", type=float, default=4.0, help="offered / sustainable rate (default: %(default)s)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of overload (default: %(default)s)")
    p.add_argument("--max-inflight-requests", type=int, default=16,
                   help="the server's in-flight limit, beyond which it answers 429 (default: %(default)s)")
    p.add_argument("--mode", choices=["dualfocus", "macro"], default="dualfocus", help="default: %(default)s")
    p.add_argument("--out", type=Path, help="results JSON (default: loadtests/results/soak-<time>.json)")
    p.add_argument("serve_flags", nargs="*", help="further `dualfocus serve` flags (after --)")
    args = p.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = args.out or ROOT / "loadtests" / "results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".server.log")
    server = start([sys.executable, "-m", "clients", "serve", "--model", MODEL, "--port", str(port),
                    "--max-inflight-requests", str(args.max_inflight_requests), *args.serve_flags], port, log)
    try:
        result = asyncio.run(overload(f"http://127.0.0.1:{port}", "none", server.pid, factor=args.factor,
                                      duration=args.duration, max_inflight=args.max_inflight_requests,
                                      mode=args.mode))
    finally:
        stop(server)
    result["server_exit_code_after_sigterm"] = server.returncode
    result.update(command=" ".join(["python -m loadtests.soak", *(argv if argv is not None else sys.argv[1:])]),
                  git=git_revision(), machine=machine(), server_log=str(log.relative_to(ROOT)))
    out.write_text(json.dumps(result, indent=1))
    shown = {k: v for k, v in result.items() if k not in ("rss_mb", "machine")}
    print(json.dumps(shown, indent=1))
    print(f"RSS MB: start {result['rss_mb']['start']}, max {result['rss_mb']['max']}, end {result['rss_mb']['end']}")
    print(f"{'PASSED' if result['passed'] else 'FAILED'}; results in {out}")
    return 0 if result["passed"] and result["server_exit_code_after_sigterm"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
