"""`make bench`: this service vs what a user would do instead, on one model and machine, in one run.

1. ours (dualfocus) vs DualFocus orchestrated by a client over stock vLLM's OpenAI server
2. ours: dualfocus vs macro (what the micro pass costs)
3. ours (macro) vs stock vLLM plain chat (what our front end costs)
4. ours (dualfocus) vs the reference's way (sequential transformers calls, loadtests/reference_hf.py)
5. prompt tokens computed per DualFocus question vs with no sharing

Writes loadtests/results/bench-<time>.json and docs/benchmarks.md; then the conversation
scenario (loadtests/conversation.py: docs/conversation-bench.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from engine.tiny import ensure_tiny

from . import conversation, scenes
from .loadgen import git_revision, machine, request_fn, run_load, summarize

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-llava"
# Where docs/benchmarks.md's section written by loadtests/fleet_bench.py begins.
FLEET_MARKER = "<!-- Many replicas: written by python -m loadtests.fleet_bench; make bench keeps it -->"
ALL_SYSTEMS = ("ours-dualfocus", "ours-macro", "stock-dualfocus", "stock-chat", "reference-hf")


def start(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"{cmd[:4]} not ready; see {log}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def measure(port: int, system: str, mode: str, levels: list[int], items, warmup, max_tokens: int) -> dict:
    async def go():
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                    timeout=600)
        send = request_fn(system, client, MODEL, mode, max_tokens, stream=False)
        await run_load(send, warmup, concurrency=2, requests=len(warmup), progress=False)
        out, start = {}, 0
        for c in levels:
            n = 8 + 4 * c
            # Images never seen before by this server: no request reads another's cached prefix.
            samples, wall = await run_load(send, items[start:start + n], concurrency=c, requests=n, progress=False)
            start += n
            out[str(c)] = summarize(samples, wall)
            s = out[str(c)]
            print(f"  {system:16s} {mode:9s} c={c:<3d} {s['requests_per_s']:6.2f} req/s  "
                  f"p50 {s['latency_s'].get('p50', float('nan')):.3f} s  errors {s['errors']}", flush=True)
        await client.close()
        return out

    return asyncio.run(go())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="1,4,8,16", help="concurrency levels (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16, help="default: %(default)s")
    p.add_argument("--reference-questions", type=int, default=16, help="default: %(default)s")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--report-only", type=Path, metavar="RESULTS.json",
                   help="only rewrite docs/benchmarks.md and its plot from an earlier run's results")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                   help="which to run, comma-separated (default: all; docs/benchmarks.md is rewritten only then): "
                        + ", ".join(ALL_SYSTEMS) + ", and with --baseline baseline-dualfocus, baseline-macro")
    p.add_argument("--baseline", metavar="COMMIT",
                   help="this service as it was at COMMIT of this repository, measured in the same run (A/B)")
    args = p.parse_args(argv)
    run_systems = set(args.systems.split(","))
    if args.baseline and not run_systems & {"baseline-dualfocus", "baseline-macro"}:
        run_systems |= {"baseline-dualfocus", "baseline-macro"}
    unknown = run_systems - set(ALL_SYSTEMS) - {"baseline-dualfocus", "baseline-macro"}
    if unknown or (not args.baseline and run_systems & {"baseline-dualfocus", "baseline-macro"}):
        p.error(f"--systems: unknown {sorted(unknown)} (baseline-* need --baseline)")
    if args.report_only:
        write_report(json.loads(args.report_only.read_text()), args.report_only.resolve())
        return 0
    levels = [int(x) for x in args.levels.split(",")]
    # Disjoint image sets: one for the DualFocus runs, one for the single-pass runs (they share a
    # server, and a macro-mode prompt equals a DualFocus macro pass's), and a few to warm up with.
    per_run = sum(8 + 4 * c for c in levels)
    pool = scenes.synthetic(2 * per_run + 8)
    dualfocus_items, single_items, warmup = pool[:per_run], pool[per_run:2 * per_run], pool[2 * per_run:]
    path = ensure_tiny(MODEL)
    logs = ROOT / "loadtests" / "results" / "tmp"
    logs.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m loadtests.bench", *(argv if argv is not None else sys.argv[1:])])
    results = {"command": f"make bench ({command})" if set(ALL_SYSTEMS) <= run_systems else command,
               "git": git_revision(), "machine": machine(), "model": MODEL, "max_tokens": args.max_tokens,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "systems": {}}

    items = {"dualfocus": dualfocus_items, "macro": single_items}
    servers = [("ours", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    for name, commit in servers:
        modes = [m for m in ("dualfocus", "macro") if f"{name}-{m}" in run_systems]
        if not modes:
            continue
        print(f"this service ({name})", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            src = export(commit, Path(tmp) / "src") if commit else None  # the repository's files at that commit
            env = {**os.environ, "PYTHONPATH": str(src)} if src else None
            if commit:
                results["baseline"] = {"git": git_short(commit)}
            server = start([*serve_command(src), "--port", str(args.port), "--model", MODEL,
                            "--max-inflight-requests", "256"], args.port, logs / f"{name}.log", env)
            try:
                for mode in modes:
                    results["systems"][f"{name}-{mode}"] = measure(args.port, "ours", mode, levels, items[mode],
                                                                   warmup, args.max_tokens)
                if name == "ours" and modes == ["dualfocus", "macro"]:
                    print("this service: conversations (loadtests/conversation.py)", flush=True)
                    conversation.run(args.port, conversations=8, concurrency=4, max_tokens=args.max_tokens,
                                     command=results["command"])
            finally:
                stop(server)

    stock_systems = [n for n in ("stock-dualfocus", "stock-chat") if n in run_systems]
    if stock_systems:
        print("stock vLLM OpenAI server", flush=True)
        stock = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(args.port),
                       "--model", str(path), "--served-model-name", MODEL, "--enforce-eager", "--max-model-len", "4096",
                       "--kv-cache-memory-bytes", str(4 << 30), "--limit-mm-per-prompt", '{"image": 2}',
                       "--enable-prefix-caching", "--enable-prompt-tokens-details"], args.port, logs / "stock.log")
        try:
            for name in stock_systems:
                mode = "dualfocus" if name == "stock-dualfocus" else "macro"
                results["systems"][name] = measure(args.port, name, mode, levels, items[mode], warmup, args.max_tokens)
        finally:
            stop(stock)

    if "reference-hf" in run_systems:
        print("reference: sequential transformers calls", flush=True)
        out = subprocess.run([sys.executable, "-m", "loadtests.reference_hf", "--questions",
                              str(args.reference_questions), "--max-tokens", str(args.max_tokens)],
                             capture_output=True, text=True, check=True)
        results["systems"]["reference-hf"] = json.loads(out.stdout)["summary"]

    stamp = time.strftime("%Y%m%d-%H%M%S")
    complete = set(ALL_SYSTEMS) <= run_systems
    out_path = ROOT / "loadtests" / "results" / f"bench-{'' if complete else 'partial-'}{stamp}.json"
    out_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {out_path}", flush=True)
    print_ratios(results)
    if complete:  # the report needs every system; a partial run leaves docs/benchmarks.md alone
        write_report(results, out_path)
    return 0


def print_ratios(results: dict) -> None:
    """Throughput of this service's macro mode (and the baseline's) over stock vLLM chat, per level."""
    s = results["systems"]
    if "stock-chat" not in s:
        return
    for name in ("ours-macro", "baseline-macro"):
        if name in s:
            ratios = ", ".join(f"c={c}: {s[name][c]['requests_per_s'] / s['stock-chat'][c]['requests_per_s']:.2f}"
                               for c in s[name])
            print(f"{name} / stock-chat throughput: {ratios}", flush=True)


def export(commit: str, folder: Path) -> Path:
    """The repository's files at `commit`, in `folder` (to serve a baseline from)."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def serve_command(src: Path | None) -> list[str]:
    """The command serving this checkout (src None) or an exported commit's files: `python -m clients
    serve`, or `python -m engine.cli serve` for commits from before the `dualfocus` command."""
    module = "clients" if src is None or (src / "clients" / "__main__.py").exists() else "engine.cli"
    return [sys.executable, "-m", module, "serve"]


def git_short(commit: str) -> str:
    return subprocess.check_output(["git", "rev-parse", "--short", commit], cwd=ROOT, text=True).strip()


def write_report(results: dict, results_path: Path) -> None:
    from .bigimages import kept_section  # (bigimages imports this module's start and stop)

    doc = ROOT / "docs" / "benchmarks.md"
    plot(results, ROOT / "docs" / "benchmarks.png")
    # Sections written by other runs are kept as they are: the big images (python -m loadtests.bigimages),
    # then the fleet (python -m loadtests.fleet_bench), which runs to the end of the file.
    big = kept_section(doc)
    fleet = "".join(doc.read_text().partition(FLEET_MARKER)[1:]) if doc.exists() else ""
    if big and big.strip() in fleet:  # (the big-images section was written after the fleet's)
        big = ""
    kept = "".join("\n" + section for section in (big, fleet) if section)
    doc.write_text(report(results, results_path.relative_to(ROOT)) + kept)
    print(f"wrote docs/benchmarks.md and docs/benchmarks.png from {results_path}", flush=True)


def plot(results: dict, path: Path) -> None:
    """Throughput and median latency against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["systems"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in ("ours-dualfocus", "stock-dualfocus", "ours-macro", "stock-chat"):
        levels = [int(c) for c in s[name]]
        style = "-" if name.startswith("ours") else "--"
        left.plot(levels, [s[name][str(c)]["requests_per_s"] for c in levels], style, marker="o", label=name)
        right.plot(levels, [s[name][str(c)]["latency_s"]["p50"] for c in levels], style, marker="o", label=name)
    ref = s["reference-hf"]
    left.axhline(ref["requests_per_s"], color="grey", linestyle=":", label="reference-hf (sequential)")
    right.axhline(ref["latency_s"]["p50"], color="grey", linestyle=":", label="reference-hf (sequential)")
    left.set(xlabel="concurrency", ylabel="requests/s", title="Throughput")
    right.set(xlabel="concurrency", ylabel="seconds", title="Median latency")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"{results['model']} on {results['machine']['cpus']} CPUs, git {results['git']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(r: dict, path) -> str:
    s = r["systems"]
    levels = list(s["ours-dualfocus"])

    def rps(name, c):
        return s[name][c]["requests_per_s"]

    def p50(name, c):
        return s[name][c]["latency_s"]["p50"]

    lines = [
        "# Benchmarks", "",
        f"Generated by `{r['command']}` at git `{r['git']}` on {r['machine']['platform']} "
        f"({r['machine']['cpus']} CPUs), {r['started']}. Raw figures: `{path}`.",
        f"Model: {r['model']} (random weights, 576 image tokens per image), max_tokens {r['max_tokens']}, "
        "closed loop, 8 + 4 x concurrency requests per level, each on a synthetic scene the server "
        "has not seen (no prefix shared across requests). "
        "One run; this machine is noisy, so read ratios, not absolute figures. "
        "What the figures mean, where the time goes and what would close the gaps: docs/performance.md.", "",
        "![throughput and latency against concurrency](benchmarks.png)", "",
        "## Throughput (requests/s) and median latency (s) by concurrency", "",
        "| system | " + " | ".join(f"c={c} req/s | c={c} p50" for c in levels) + " |",
        "|---|" + "---|---|" * len(levels),
    ]
    for name in ("ours-dualfocus", "stock-dualfocus", "ours-macro", "stock-chat"):
        lines.append(f"| {name} | " + " | ".join(f"{rps(name, c):.2f} | {p50(name, c):.3f}" for c in levels) + " |")
    ref = s["reference-hf"]
    lines += [f"| reference-hf (sequential) | {ref['requests_per_s']:.2f} req/s, p50 {ref['latency_s']['p50']:.3f} s "
              "at any concurrency |" + " |" * (2 * len(levels) - 1), "", "## Against the targets", "",
              "| comparison | target | measured |", "|---|---|---|"]
    for c in levels:
        lines.append(f"| (1) ours / stock-orchestrated DualFocus, throughput, c={c} | >= 1.5x | "
                     f"{rps('ours-dualfocus', c) / rps('stock-dualfocus', c):.2f}x |")
        lines.append(f"| (1) ours / stock-orchestrated DualFocus, p50 latency, c={c} | <= 0.7x | "
                     f"{p50('ours-dualfocus', c) / p50('stock-dualfocus', c):.2f}x |")
    top = levels[-1]
    lines.append(f"| (2) ours dualfocus / ours macro, throughput, c={top} | >= 0.5 | "
                 f"{rps('ours-dualfocus', top) / rps('ours-macro', top):.2f} |")
    lines.append(f"| (3) ours macro / stock chat, throughput, c={top} | >= 0.9 | "
                 f"{rps('ours-macro', top) / rps('stock-chat', top):.2f} |")
    lines.append(f"| (4) ours dualfocus (c={top}) / reference sequential, throughput | >= 5x | "
                 f"{rps('ours-dualfocus', top) / ref['requests_per_s']:.1f}x |")
    d = s["ours-dualfocus"][top]
    # No sharing: every pass computes its whole prompt (what the same passes cost with no prefix cache).
    ratio = d["computed_prompt_tokens_per_request"] / d["prompt_tokens_per_request"]
    lines.append(f"| (5) prompt tokens computed / with no sharing, per DualFocus question | <= 0.4 | "
                 f"{ratio:.2f} ({d['computed_prompt_tokens_per_request']:.0f} of "
                 f"{d['prompt_tokens_per_request']:.0f}) |")
    stages = d.get("stages", {})
    lines += ["", f"## Where a DualFocus request's time goes (ours, c={top})", "",
              "| stage | p50 ms | share of prompt tokens from cache |", "|---|---|---|"]
    lines += [f"| {name} | {v['ms_p50']:.1f} | {v['cached_ratio']:.2f} |" for name, v in stages.items()]
    lines += ["", f"Answers chosen: {d.get('chosen')}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
