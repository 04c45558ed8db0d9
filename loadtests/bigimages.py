"""Big images beside small streams (`make bench-bigimages`): small streaming requests' time to first
token, quiet and while two clients send 35-megapixel JPEGs in turn, against this service and stock
vLLM's OpenAI server (same tiny-llava checkpoint), one after the other in one run.

    python -m loadtests.bigimages                         # both systems, write results and docs
    python -m loadtests.bigimages --small-requests 20 --big-modes dualfocus

Per system: warm up (small requests and one big image), then the quiet phase (small requests one
after another, nothing else), then the loaded phase (the same again while two big-image clients,
each in its own process, send a 35-megapixel JPEG, wait for the answer and send the next).
Small requests: a synthetic scene (640x480 and similar, PNG) the server has not seen, streamed,
macro mode for this service (a plain chat for stock vLLM), max_tokens 16; TTFT is the first
chunk with content. Big requests: distinct noisy 6830x5120 JPEGs (~4 MB each). This service is
measured once per --big-modes entry: its big requests in that mode (the small ones are always
macro mode: only they stream tokens).

Writes loadtests/results/bigimages-<time>.json and the big-images section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openai
from PIL import Image

from engine.config import cpu_dtype
from engine.tiny import ensure_tiny

from . import scenes, systems
from .bench import export, git_short, serve_command, start, stop
from .loadgen import git_revision, machine
from .report import replace_section

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-llava"
BIG_SIZE = (6830, 5120)  # 35.0 megapixels
BIG_QUESTION = "What is in the top left corner?"
# Both systems' KV cache: a few requests at a time need little, and the machine's memory is shared.
KV_CACHE_GIB = 1
BIG_CLIENT_MAX_REQUESTS = 200  # each big client stops after this many, whatever happens


def big_jpeg(seed: int, size: tuple[int, int] = BIG_SIZE) -> bytes:
    """A photo-like JPEG: smooth colour fields with grain, so it compresses like a photo (~4 MB)."""
    rng = np.random.default_rng(seed)
    w, h = size
    fields = Image.fromarray(rng.integers(0, 256, (h // 64, w // 64, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    grain = Image.fromarray(rng.integers(0, 48, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.blend(fields, grain, 0.2).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=600)


def _send_fn(system: str, client: openai.AsyncOpenAI, mode: str, stream: bool):
    if system == "ours":
        return lambda item: systems.ours(client, MODEL, item, mode, 16, stream)
    return lambda item: systems.stock_chat(client, MODEL, item, 16, stream)


def big_client(base_url: str, system: str, mode: str, paths: list[str], ready, stop_event, out) -> None:
    """One big-image client (its own process, so its JSON encoding does not slow the small client):
    sends the JPEGs in turn, one at a time, until told to stop."""
    items = [scenes.Item("data:image/jpeg;base64," + base64.b64encode(Path(p).read_bytes()).decode(), BIG_QUESTION,
                         *BIG_SIZE) for p in paths]

    async def go() -> list[dict]:
        client = _client(base_url)
        send = _send_fn(system, client, mode, stream=False)
        done = []
        ready.set()
        for i in range(BIG_CLIENT_MAX_REQUESTS):
            if stop_event.is_set():
                break
            t0 = time.perf_counter()
            try:
                sample = await send(items[i % len(items)])
                done.append({"ok": True, "latency_s": sample.latency_s})
            except openai.APIError as e:
                done.append({"ok": False, "latency_s": time.perf_counter() - t0, "error": type(e).__name__})
        await client.close()
        return done

    out.put(asyncio.run(go()))


async def small_requests(base_url: str, system: str, items: list[scenes.Item]) -> list[systems.Sample]:
    """Small streaming requests, one after another."""
    client = _client(base_url)
    send = _send_fn(system, client, "macro", stream=True)
    samples = []
    for item in items:
        t0 = time.perf_counter()
        try:
            samples.append(await send(item))
        except openai.APIError as e:
            samples.append(systems.Sample(False, time.perf_counter() - t0, error=type(e).__name__))
    await client.close()
    return samples


def ttft_summary(samples: list[systems.Sample]) -> dict:
    ttft = sorted(s.ttft_s for s in samples if s.ok and s.ttft_s is not None)
    return {"requests": len(samples), "ok": len(ttft),
            "ttft_p50_s": statistics.median(ttft) if ttft else None, "ttft_max_s": max(ttft) if ttft else None,
            "ttft_mean_s": statistics.mean(ttft) if ttft else None,
            "latency_p50_s": statistics.median(s.latency_s for s in samples if s.ok) if ttft else None}


def measure(base_url: str, system: str, big_mode: str, small: list[scenes.Item], big_paths: list[str],
            warmup: list[scenes.Item]) -> dict:
    n = len(small) // 2
    ctx = mp.get_context("spawn")
    # Warm up: a few small requests and one big image, so first-time costs are not in the figures.
    asyncio.run(small_requests(base_url, system, warmup))
    ready, stop_event, out = ctx.Event(), ctx.Event(), ctx.Queue()
    one = ctx.Process(target=big_client, args=(base_url, system, big_mode, big_paths[-1:], ready, stop_event, out))
    stop_event.set()  # it sends its one request, then stops
    one.start()
    out.get(timeout=600)
    one.join(60)

    # The machine's 1-minute load average around each phase: on a shared machine, how much else ran.
    load = {"before_quiet": os.getloadavg()[0]}
    quiet = asyncio.run(small_requests(base_url, system, small[:n]))
    load["after_quiet"] = os.getloadavg()[0]
    stop_event = ctx.Event()
    clients = []
    measured = big_paths[:-1]  # the last one warmed up
    for k in range(2):  # two clients, each with its own images (no cache hits between them)
        ready = ctx.Event()
        paths = measured[k::2]
        process = ctx.Process(target=big_client, args=(base_url, system, big_mode, paths, ready, stop_event, out))
        process.start()
        clients.append((process, ready))
    for _, ready in clients:
        if not ready.wait(300):
            raise RuntimeError("a big-image client did not start")
    time.sleep(1.0)  # both have a big image in flight
    t0 = time.perf_counter()
    loaded = asyncio.run(small_requests(base_url, system, small[n:]))
    loaded_s = time.perf_counter() - t0
    load["after_loaded"] = os.getloadavg()[0]
    stop_event.set()
    big = [row for _ in clients for row in out.get(timeout=600)]
    for process, _ in clients:
        process.join(60)
    big_ok = [r["latency_s"] for r in big if r["ok"]]
    result = {"quiet": ttft_summary(quiet), "loaded": ttft_summary(loaded),
              "big": {"requests": len(big), "ok": len(big_ok), "errors": [r["error"] for r in big if not r["ok"]],
                      "latency_p50_s": statistics.median(big_ok) if big_ok else None,
                      "during_loaded_phase_s": round(loaded_s, 3)},
              "load_average_1m": load}
    q, lo = result["quiet"], result["loaded"]
    print(f"  {system:5s} big={big_mode:9s} quiet TTFT p50/max {q['ttft_p50_s']:.3f}/{q['ttft_max_s']:.3f} s   "
          f"loaded {lo['ttft_p50_s']:.3f}/{lo['ttft_max_s']:.3f} s   big requests {len(big_ok)} ok of {len(big)}, "
          f"p50 {result['big']['latency_p50_s'] or float('nan'):.2f} s", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bigimages", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--small-requests", type=int, default=40,
                   help="small streaming requests per system, half quiet, half loaded (default: %(default)s)")
    p.add_argument("--big-images", type=int, default=8, help="distinct 35-megapixel JPEGs (default: %(default)s)")
    p.add_argument("--big-modes", default="dualfocus,macro",
                   help="this service's mode(s) for the big images, each measured (default: %(default)s)")
    p.add_argument("--systems", default="ours,stock", help="which of ours,stock to run (default: %(default)s)")
    p.add_argument("--baseline", metavar="COMMIT",
                   help="also measure this service as it was at COMMIT of this repository (e.g. before a change), "
                        "as baseline-big-<mode>")
    p.add_argument("--port", type=int, default=8710)
    p.add_argument("--no-docs", action="store_true", help="write the results JSON only, not docs/benchmarks.md")
    p.add_argument("--report-only", type=Path, metavar="RESULTS.json",
                   help="only rewrite the big-images section of docs/benchmarks.md from an earlier run")
    args = p.parse_args(argv)
    if args.report_only:
        write_section(json.loads(args.report_only.read_text()), args.report_only.resolve())
        return 0
    run_systems = args.systems.split(",")
    if not set(run_systems) <= {"ours", "stock"}:
        p.error("--systems: ours, stock or both")
    if args.small_requests < 2 or args.big_images < 3:
        p.error("at least 2 small requests and 3 big images (one to warm up, one per big client)")
    path = ensure_tiny(MODEL)
    base_url = f"http://127.0.0.1:{args.port}"
    warmup = scenes.synthetic(4, seed=11)
    logs = ROOT / "loadtests" / "results" / "tmp"
    logs.mkdir(parents=True, exist_ok=True)
    results = {"command": "python -m loadtests.bigimages " + " ".join(argv if argv is not None else sys.argv[1:]),
               "git": git_revision(), "machine": machine(), "model": MODEL, "big_size": list(BIG_SIZE),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "systems": {}}

    with tempfile.TemporaryDirectory(prefix="bigimages-") as tmp:
        print(f"making {args.big_images} {BIG_SIZE[0]}x{BIG_SIZE[1]} JPEGs", flush=True)
        big_paths = []
        for i in range(args.big_images):
            big_paths.append(str(Path(tmp) / f"big-{i}.jpg"))
            Path(big_paths[-1]).write_bytes(big_jpeg(seed=i))
        results["big_jpeg_mb"] = round(statistics.mean(Path(b).stat().st_size for b in big_paths) / 1e6, 2)
        # Stock vLLM gets the small images of this service's first mode run; each run's are new to its server.
        ours: list[tuple[str, Path | None]] = [("ours", None)] if "ours" in run_systems else []
        if args.baseline:
            ours.append(("baseline", export(args.baseline, Path(tmp) / "baseline")))
            results["baseline"] = {"git": git_short(args.baseline)}
        for name, src in ours:
            print(f"this service ({name})", flush=True)
            env = {**os.environ, "PYTHONPATH": str(src)} if src else None
            server = start([*serve_command(src), "--port", str(args.port), "--model", MODEL,
                            "--max-inflight-requests", "256", "--kv-cache-gib", str(KV_CACHE_GIB)], args.port,
                           logs / f"bigimages-{name}.log", env)
            try:
                for i, mode in enumerate(args.big_modes.split(",")):
                    small = scenes.synthetic(args.small_requests, seed=100 + i)
                    results["systems"][f"{name}-big-{mode}"] = measure(base_url, "ours", mode, small, big_paths,
                                                                       warmup)
            finally:
                stop(server)
        if "stock" in run_systems:
            print("stock vLLM OpenAI server", flush=True)
            server = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(args.port),
                            "--model", str(path), "--served-model-name", MODEL, "--enforce-eager",
                            "--max-model-len", "4096", "--kv-cache-memory-bytes", str(KV_CACHE_GIB << 30),
                            "--limit-mm-per-prompt", '{"image": 2}', "--enable-prefix-caching",
                            "--dtype", cpu_dtype("auto")],  # what ours computes in
                           args.port, logs / "bigimages-stock.log")
            try:
                small = scenes.synthetic(args.small_requests, seed=100)
                results["systems"]["stock"] = measure(base_url, "stock", "chat", small, big_paths, warmup)
            finally:
                stop(server)

    out_path = ROOT / "loadtests" / "results" / f"bigimages-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {out_path}", flush=True)
    if not args.no_docs:
        write_section(results, out_path)
    return 0


def section(r: dict, path) -> str:
    s = r["systems"]
    lines = [
        "## Small streams beside big images",
        "",
        f"Generated by `{r['command']}` at git `{r['git']}` on {r['machine']['platform']} "
        f"({r['machine']['cpus']} CPUs), {r['started']}. Raw figures: `{path}`.",
        "Small streaming requests (a 640x480-class PNG, max_tokens 16, one at a time) and their time to first "
        f"token: quiet, and while two clients send {r['big_size'][0]}x{r['big_size'][1]} JPEGs "
        f"(~{r.get('big_jpeg_mb', 4)} MB) in turn. Both systems measured one after the other in this run; "
        "read ratios, not absolute figures (the machine's load average, before the quiet phase / after it / "
        "after the loaded phase, says how much else ran on its 2 cores). Why: docs/performance.md.",
        *([f"`baseline-*`: this service as it was at git `{r['baseline']['git']}`, in the same run."]
          if "baseline" in r else []),
        "",
        "| system | quiet TTFT p50 / max (s) | loaded TTFT p50 / max (s) | big requests done | big p50 (s) "
        "| machine load average (1 min) |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in s.items():
        q, lo, b = v["quiet"], v["loaded"], v["big"]
        load = " / ".join(f"{x:.0f}" for x in v.get("load_average_1m", {}).values()) or "-"
        big_p50 = b["latency_p50_s"] or float("nan")
        lines.append(f"| {name} | {q['ttft_p50_s']:.3f} / {q['ttft_max_s']:.3f} | {lo['ttft_p50_s']:.3f} / "
                     f"{lo['ttft_max_s']:.3f} | {b['ok']} of {b['requests']} | {big_p50:.2f} | {load} |")
    if "stock" in s:
        stock = s["stock"]["loaded"]
        lines += ["", "| comparison (loaded phase) | target | p50 | max |", "|---|---|---|---|"]
        for name, v in s.items():
            if name != "stock":
                lo = v["loaded"]
                lines.append(f"| {name} / stock, small requests' TTFT | <= 2x | "
                             f"{lo['ttft_p50_s'] / stock['ttft_p50_s']:.2f}x | "
                             f"{lo['ttft_max_s'] / stock['ttft_max_s']:.2f}x |")
    return "\n".join(lines)


def write_section(results: dict, results_path: Path) -> None:
    """Write (or replace) the big-images section of docs/benchmarks.md; the other sections are kept."""
    doc = ROOT / "docs" / "benchmarks.md"
    replace_section(doc, "bigimages", section(results, results_path.relative_to(ROOT)))
    print(f"wrote the big-images section of {doc.relative_to(ROOT)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
