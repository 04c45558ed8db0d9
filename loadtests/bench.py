"""`make bench`: this service vs what a user would do instead, at two model shapes, in one run.

1. ours (dualfocus) vs DualFocus orchestrated by a client over stock vLLM's OpenAI server
2. ours: dualfocus vs macro (what the micro pass costs)
3. ours (macro) vs stock vLLM plain chat (what our front end costs)
4. ours (dualfocus) vs the reference's way (sequential transformers calls, loadtests/reference_hf.py)
5. prompt tokens computed per DualFocus question vs with no sharing
6. ours in mode auto (zooms only when the macro answer is not confident) vs macro and dualfocus, and
   how many of its questions zoomed; the questions cycle through detail and global ones

Shapes (--shapes): `tiny` is tiny-llava (random weights, 576 image tokens, a 2 M-parameter language
model: fixed per-request costs dominate where bf16 matmuls are fast); `compute` is bench-llava-576
(the same image tokens and a tiny vision tower, a 100 M-parameter language model whose prefill is most
of a request's time on a 2-core CPU; built on first use, engine/tiny.py). The compute shape runs few requests at low
concurrency and asks the reference way only a few questions (a minute or more each there):
about 20 minutes on a quiet 2-core machine, the tiny shape about 10.

    make bench                                                   # both shapes, every system
    python -m loadtests.bench --shapes compute                   # rewrite only the compute section
    python -m loadtests.bench --shapes tiny --systems ours-auto,ours-macro --levels 16
    python -m loadtests.bench --report-only loadtests/results/bench-<time>.json

Writes loadtests/results/bench-<time>.json and, per shape whose every system ran, its section of
docs/benchmarks.md (loadtests/report.py keeps the other sections); after the tiny shape, the
conversation scenario (loadtests/conversation.py: docs/conversation-bench.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from engine.config import cpu_dtype

from . import conversation, scenes
from .loadgen import git_revision, machine, request_fn, run_load, summarize
from .report import replace_section

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
ALL_SYSTEMS = ("ours-dualfocus", "ours-macro", "ours-auto", "stock-dualfocus", "stock-chat", "reference-hf")
# What a shape's section of docs/benchmarks.md needs; ours-auto is reported when it ran.
REPORTED_SYSTEMS = ("ours-dualfocus", "ours-macro", "stock-dualfocus", "stock-chat", "reference-hf")
BASELINE_SYSTEMS = ("baseline-dualfocus", "baseline-macro")
TARGETS = {"ours_vs_stock_dualfocus": 1.5, "ours_vs_stock_dualfocus_p50": 0.7, "dualfocus_vs_macro": 0.5,
           "macro_vs_stock_chat": 0.9, "ours_vs_reference": 5.0, "computed_vs_no_sharing": 0.4, "auto_vs_macro": 0.7}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    model: str
    levels: tuple[int, ...]  # closed-loop concurrency levels
    requests: tuple[int, int]  # per level: a + b x concurrency requests
    warmup: int  # requests per system before the measured ones
    reference_questions: int
    about: str  # for the report
    # For every server at this shape, ours and stock alike. vLLM's CPU engine keeps one core of two for the
    # API server by default: right when the front end's work is most of a request's, not when prefill is.
    server_env: dict[str, str] = dataclasses.field(default_factory=dict)

    def count(self, c: int) -> int:
        return self.requests[0] + self.requests[1] * c


SHAPES = {
    "tiny": Shape("tiny", "tiny-llava", (1, 4, 8, 16), (8, 4), 8, 16,
                  "on a CPU with fast bf16 matmuls a request's fixed costs (HTTP, Python, scheduling, image "
                  "handling) are most of its time; on an AVX2-only one its prefill already is (docs/performance.md)"),
    "compute": Shape("compute", "bench-llava-576", (1, 4), (2, 2), 2, 3,
                     "the language model's prefill is most of a request's time "
                     "(docs/performance.md, \"At a compute-bound shape\")",
                     {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),  # both cores compute, as the reference's torch does
}


# vLLM gives up on a model step after 300 s by default (the engine dies); on a 2-core machine shared with other
# work, a batch of compute-shape prefills has taken longer (seen in a smoke run beside a training job).
STEP_TIMEOUT = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "1800"}


def start(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server in a process group of its own (stop() ends the group: vLLM's engine-core and worker
    processes too) and wait until /health answers."""
    env = {**STEP_TIMEOUT, **(env or os.environ)}
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 600  # a 100M-parameter model on a loaded 2-core machine took over 300 s
    while time.time() < deadline:
        if process.poll() is not None:
            stop(process)
            raise RuntimeError(f"{cmd[:4]} exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop(process)
    raise RuntimeError(f"{cmd[:4]} not ready; see {log}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server (it drains and stops its engine), then SIGKILL to whatever is left of its group."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # the group is gone
        pass


def zoom_picks(n: int, share: float) -> list[bool]:
    """Which of n requests zoom under --zoom-share: round(share x n) of them, evenly spread."""
    return [int((i + 1) * share + 0.5) > int(i * share + 0.5) for i in range(n)]


def measure(port: int, system: str, mode: str, shape: Shape, levels: list[int], items, warmup, max_tokens: int,
            options: dict | None = None, zoom_share: float | None = None) -> dict:
    async def go():
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                    timeout=1800)
        if zoom_share is None:
            send = request_fn(system, client, shape.model, mode, max_tokens, stream=False, **(options or {}))
        else:  # a share of the items zooms (threshold 1), the rest do not (0)
            zooming = {id(item) for item, zooms in zip(items, zoom_picks(len(items), zoom_share), strict=True) if zooms}
            by_threshold = {t: request_fn(system, client, shape.model, mode, max_tokens, stream=False,
                                          zoom_threshold=t) for t in (0.0, 1.0)}

            def send(item):
                return by_threshold[1.0 if id(item) in zooming else 0.0](item)
        if mode == "auto":  # refused by a server without mode auto: reported as not run, not as errors
            try:
                await send(warmup[0])
            except openai.APIStatusError as e:
                await client.close()
                print(f"  {system:16s} {mode:9s} not run: the server refused it (HTTP {e.status_code})", flush=True)
                return {"not_run": f"the server refused mode auto: HTTP {e.status_code} {str(e)[:300]}"}
        await run_load(send, warmup, concurrency=2, requests=len(warmup), progress=False)
        out, start = {}, 0
        for c in levels:
            n = shape.count(c)
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
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--shapes", default="tiny,compute",
                   help="model shapes, comma-separated: tiny (tiny-llava), compute (bench-llava-576) "
                        "(default: %(default)s)")
    p.add_argument("--levels", help="concurrency levels for every shape (default: tiny "
                   + ",".join(map(str, SHAPES["tiny"].levels)) + "; compute "
                   + ",".join(map(str, SHAPES["compute"].levels)) + ")")
    p.add_argument("--requests", type=int, metavar="N",
                   help="requests per level and system (default: per shape, tiny "
                        + "{} + {} x concurrency, compute {} + {} x concurrency)".format(
                            *SHAPES["tiny"].requests, *SHAPES["compute"].requests))
    p.add_argument("--max-tokens", type=int, default=16, help="default: %(default)s")
    p.add_argument("--reference-questions", type=int,
                   help=f"questions for the reference way (default: tiny {SHAPES['tiny'].reference_questions}, "
                        f"compute {SHAPES['compute'].reference_questions})")
    p.add_argument("--zoom-threshold", type=float, help="ours-auto: the gate's threshold (default: the server's)")
    p.add_argument("--zoom-share", type=float, metavar="0-1",
                   help="ours-auto: make this share of its requests zoom (evenly spread; per-request threshold 1, "
                        "the rest 0, and the server's box-area limit lifted), as a trained model's unsure answers "
                        "would: random weights cannot say which answers are unsure")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--no-docs", action="store_true",
                   help="write the results JSON only, not docs/benchmarks.md (smoke runs, supplementary runs)")
    p.add_argument("--report-only", type=Path, metavar="RESULTS.json",
                   help="only rewrite docs/benchmarks.md's sections and plots from an earlier run's results")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                   help="which to run, comma-separated (default: all; a shape's section of docs/benchmarks.md is "
                        "rewritten only when " + ", ".join(REPORTED_SYSTEMS) + " ran): " + ", ".join(ALL_SYSTEMS)
                        + ", and with --baseline " + ", ".join(BASELINE_SYSTEMS))
    p.add_argument("--baseline", metavar="COMMIT",
                   help="this service as it was at COMMIT of this repository, measured in the same run (A/B)")
    args = p.parse_args(argv)
    if args.report_only:
        write_report(upgrade(json.loads(args.report_only.read_text())), args.report_only.resolve())
        return 0
    run_systems = set(args.systems.split(","))
    if args.baseline and not run_systems & set(BASELINE_SYSTEMS):
        run_systems |= set(BASELINE_SYSTEMS)
    unknown = run_systems - set(ALL_SYSTEMS) - set(BASELINE_SYSTEMS)
    if unknown or (not args.baseline and run_systems & set(BASELINE_SYSTEMS)):
        p.error(f"--systems: unknown {sorted(unknown)} (baseline-* need --baseline)")
    shape_names = args.shapes.split(",")
    if not shape_names or set(shape_names) - set(SHAPES):
        p.error(f"--shapes: one or more of {', '.join(SHAPES)}")
    command = " ".join(["python -m loadtests.bench", *(argv if argv is not None else sys.argv[1:])])
    results = {"command": "make bench" if argv is None and len(sys.argv) == 1 else command,
               "git": git_revision(), "machine": machine(), "max_tokens": args.max_tokens,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shapes": {}}
    if args.zoom_threshold is not None and args.zoom_share is not None:
        p.error("--zoom-threshold and --zoom-share: one or the other")
    if args.zoom_threshold is not None:
        results["zoom_threshold"] = args.zoom_threshold
    if args.zoom_share is not None:
        results["zoom_share"] = args.zoom_share
    if args.baseline:
        results["baseline"] = {"git": git_short(args.baseline)}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers it started
    complete = set(ALL_SYSTEMS) <= run_systems and set(SHAPES) <= set(shape_names)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_path = ROOT / "loadtests" / "results" / f"bench-{'' if complete else 'partial-'}{stamp}.json"

    def save() -> None:  # after every system: a run that fails or is stopped keeps what it measured
        out_path.write_text(json.dumps(results, indent=2))

    for name in shape_names:
        shape = SHAPES[name]
        levels = [int(x) for x in args.levels.split(",")] if args.levels else list(shape.levels)
        questions = args.reference_questions or shape.reference_questions
        if args.requests:
            shape = dataclasses.replace(shape, requests=(args.requests, 0))
        print(f"shape {name}: {shape.model}", flush=True)
        results["shapes"][name] = {}
        try:
            run_shape(shape, levels, questions, run_systems, args, results["command"], results["shapes"][name], save)
        finally:
            save()
    print(f"wrote {out_path}", flush=True)
    for name, r in results["shapes"].items():
        print(f"shape {name}: " + json.dumps(r["ratios"]), flush=True)
    if not args.no_docs:
        write_report(results, out_path)
    return 0


def run_shape(shape: Shape, levels: list[int], reference_questions: int, run_systems: set[str], args,
              command: str, out: dict, save) -> None:
    """Every selected system at one shape, into `out` (the shape's part of the results; save() after each)."""
    from engine.tiny import ensure_tiny

    path = ensure_tiny(shape.model)  # built here once, before any server starts (bench-llava-576: seconds)
    # Disjoint image sets, one per mode of this service (they share a server, and a macro-mode prompt equals
    # a DualFocus macro pass's), and a few to warm up with.
    per_run = sum(shape.count(c) for c in levels)
    pool = scenes.synthetic(3 * per_run + shape.warmup, seed=list(SHAPES).index(shape.name))
    items = {"dualfocus": pool[:per_run], "macro": pool[per_run:2 * per_run], "auto": pool[2 * per_run:3 * per_run]}
    warmup = pool[3 * per_run:]
    options = {"zoom_threshold": args.zoom_threshold} if args.zoom_threshold is not None else None
    logs = ROOT / "loadtests" / "results" / "tmp"
    logs.mkdir(parents=True, exist_ok=True)
    out.update({"model": shape.model, "levels": levels, "lm_parameters": lm_parameters(path),
                "server_env": shape.server_env,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_1m": {"start": os.getloadavg()[0]},
                "systems": {}})

    servers = [("ours", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    for name, commit in servers:
        modes = [m for m in ("dualfocus", "macro", "auto") if f"{name}-{m}" in run_systems]
        if not modes:
            continue
        print(f"this service ({name})", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            src = export(commit, Path(tmp) / "src") if commit else None  # the repository's files at that commit
            env = {**os.environ, **shape.server_env, **({"PYTHONPATH": str(src)} if src else {})}
            lift = ["--zoom-max-box-area", "1"] if args.zoom_share is not None else []  # random boxes are any size
            server = start([*serve_command(src), "--port", str(args.port), "--model", shape.model,
                            "--max-inflight-requests", "256", *lift],
                           args.port, logs / f"{name}-{shape.name}.log", env)
            try:
                for mode in modes:
                    out["systems"][f"{name}-{mode}"] = measure(args.port, "ours", mode, shape, levels, items[mode],
                                                               warmup, args.max_tokens,
                                                               options if mode == "auto" else None,
                                                               args.zoom_share if mode == "auto" else None)
                    save()
                if name == "ours" and shape.name == "tiny" and {"dualfocus", "macro"} <= set(modes):
                    print("this service: conversations (loadtests/conversation.py)", flush=True)
                    conversation.run(args.port, conversations=8, concurrency=4, max_tokens=args.max_tokens,
                                     command=command)
            finally:
                stop(server)

    stock_systems = [n for n in ("stock-dualfocus", "stock-chat") if n in run_systems]
    if stock_systems:
        print("stock vLLM OpenAI server", flush=True)
        stock = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(args.port),
                       "--model", str(path), "--served-model-name", shape.model, "--enforce-eager",
                       "--max-model-len", "4096", "--kv-cache-memory-bytes", str(4 << 30), "--limit-mm-per-prompt",
                       '{"image": 2}', "--enable-prefix-caching", "--enable-prompt-tokens-details",
                       "--dtype", cpu_dtype("auto")], args.port,
                      logs / f"stock-{shape.name}.log", {**os.environ, **shape.server_env})
        try:
            for name in stock_systems:
                mode = "dualfocus" if name == "stock-dualfocus" else "macro"
                out["systems"][name] = measure(args.port, name, mode, shape, levels, items[mode], warmup,
                                               args.max_tokens)
                save()
        finally:
            stop(stock)

    if "reference-hf" in run_systems:
        print(f"reference: sequential transformers calls, {reference_questions} questions", flush=True)
        ref = subprocess.run([sys.executable, "-m", "loadtests.reference_hf", "--model", shape.model, "--questions",
                              str(reference_questions), "--max-tokens", str(args.max_tokens)],
                             capture_output=True, text=True)
        if ref.returncode != 0:  # say why, with what was measured so far already saved
            raise SystemExit(f"loadtests.reference_hf failed (exit {ref.returncode}):\n{ref.stderr[-4000:]}")
        out["systems"]["reference-hf"] = json.loads(ref.stdout)["summary"]
    out["load_average_1m"]["end"] = os.getloadavg()[0]
    out["ratios"] = ratios(out["systems"])


def lm_parameters(path: Path) -> int:
    """Weights in the checkpoint's language model (from its safetensors header: no tensor is read)."""
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("language_model."))


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _rps(summary: dict) -> float:
    return summary["requests_per_s"]


def _div(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0 (a system with no successful request)."""
    return a / b if a is not None and b else None


def _p50(summary: dict) -> float | None:
    return summary["latency_s"].get("p50")


def ratios(s: dict) -> dict:
    """The comparisons of one shape's systems (None where a system did not run), at every level for (1) and at
    the highest level measured for the rest (the reference way runs one question at a time: any level)."""
    def ran(name: str) -> bool:
        return name in s and "not_run" not in s[name]

    def levels_of(name: str) -> list[str]:
        return list(s[name]) if ran(name) else []

    out: dict = {}
    levels = levels_of("ours-dualfocus")
    # The top level of ours-dualfocus, or of our other modes when a run left it out (`--systems`).
    top = next((lv[-1] for lv in map(levels_of, ("ours-dualfocus", "ours-macro", "ours-auto")) if lv), None)
    dualfocus_at_top = top is not None and top in levels
    out["top_level"] = top
    if ran("ours-dualfocus") and ran("stock-dualfocus"):
        out["ours_vs_stock_dualfocus"] = {
            c: {"throughput": _div(_rps(s["ours-dualfocus"][c]), _rps(s["stock-dualfocus"][c])),
                "p50": _div(_p50(s["ours-dualfocus"][c]), _p50(s["stock-dualfocus"][c]))}
            for c in levels if c in s["stock-dualfocus"]}

    def at_top(a: str, b: str) -> float | None:
        if top is None or not (ran(a) and ran(b)) or top not in s[a] or top not in s[b]:
            return None
        return _div(_rps(s[a][top]), _rps(s[b][top]))

    out["dualfocus_vs_macro"] = at_top("ours-dualfocus", "ours-macro")
    out["macro_vs_stock_chat"] = at_top("ours-macro", "stock-chat")
    out["auto_vs_macro"] = at_top("ours-auto", "ours-macro")
    out["auto_vs_dualfocus"] = at_top("ours-auto", "ours-dualfocus")
    out["ours_vs_reference"] = (_div(_rps(s["ours-dualfocus"][top]), _rps(s["reference-hf"]))
                                if dualfocus_at_top and ran("reference-hf") else None)
    if dualfocus_at_top:
        d = s["ours-dualfocus"][top]
        # No sharing: every pass computes its whole prompt (what the same passes cost with no prefix cache).
        out["computed_vs_no_sharing"] = _div(d["computed_prompt_tokens_per_request"], d["prompt_tokens_per_request"])
    if top is not None and ran("ours-auto") and top in s["ours-auto"]:
        a = s["ours-auto"][top]
        if "zoom" in a:  # the gate's decisions, from the traces
            decided = a["zoom"]["zoomed"] + a["zoom"]["skipped"]
            out["auto_zoom_share"] = a["zoom"]["zoomed"] / decided if decided else None
        else:  # a question zoomed when its trace has a micro stage
            out["auto_zoom_share"] = a.get("stages", {}).get("micro", {}).get("count", 0) / a["ok"] if a["ok"] else None
    return out


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


def upgrade(results: dict) -> dict:
    """Results written before the shapes (one model, `systems` at the top) in today's form."""
    if "shapes" in results:
        return results
    shape = {"model": results["model"], "levels": [int(c) for c in results["systems"]["ours-dualfocus"]],
             "started": results["started"], "systems": results["systems"]}
    shape["ratios"] = ratios(shape["systems"])
    return {**{k: v for k, v in results.items() if k not in ("model", "systems")}, "shapes": {"tiny": shape}}


def write_report(results: dict, results_path: Path) -> None:
    """Each shape's section of docs/benchmarks.md and its plot, for the shapes whose every reported system ran."""
    for name, r in results["shapes"].items():
        missing = [n for n in REPORTED_SYSTEMS if n not in r["systems"]]
        if missing:
            print(f"shape {name}: docs/benchmarks.md left as it was (not run: {', '.join(missing)})", flush=True)
            continue
        image = f"benchmarks{'' if name == 'tiny' else '-' + name}.png"
        plot(results, name, ROOT / "docs" / image)
        text = report(results, name, results_path.relative_to(ROOT), image)
        replace_section(DOC, f"bench-{name}", text)
        print(f"wrote the {name} shape's section of docs/benchmarks.md and docs/{image} from {results_path}",
              flush=True)


PLOTTED = ("ours-dualfocus", "ours-auto", "stock-dualfocus", "ours-macro", "stock-chat")


def plot(results: dict, shape: str, path: Path) -> None:
    """Throughput and median latency against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results["shapes"][shape]
    s = r["systems"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in (n for n in PLOTTED if n in s and "not_run" not in s[n]):
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
    fig.suptitle(f"{r['model']} on {results['machine']['cpus']} CPUs, git {results['git']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdict(value: float | None, target: float, at_least: bool = True, unit: str = "x") -> str:
    if value is None:
        return "no figure (a system did not run or had no successful request)"
    met = value >= target if at_least else value <= target
    return f"{value:.2f}{unit} ({'met' if met else 'missed'})"


def report(results: dict, shape: str, path, image: str) -> str:
    r = results["shapes"][shape]
    s, q = r["systems"], r["ratios"]
    spec = SHAPES.get(shape)
    levels = [str(c) for c in r["levels"]]
    top = q["top_level"]
    ran = [n for n in PLOTTED if n in s and "not_run" not in s[n]]

    def rps(name, c):
        return s[name][c]["requests_per_s"]

    def p50(name, c):
        return s[name][c]["latency_s"].get("p50", float("nan"))  # nan: no successful request

    params = f", a {r['lm_parameters'] / 1e6:.0f} M-parameter language model" if r.get("lm_parameters") else ""
    load = r.get("load_average_1m")
    title = "the tiny shape" if shape == "tiny" else "the compute-bound shape"
    ref = s["reference-hf"]
    lines = [
        f"## At {title}: {r['model']}", "",
        f"Generated by `{results['command']}` at git `{results['git']}` on {results['machine']['platform']} "
        f"({results['machine']['cpus']} CPUs), {r['started']}. Raw figures: `{path}`.",
        f"Model: {r['model']} (random weights, 576 image tokens per image{params}"
        + (f"; {spec.about}" if spec else "") + f"), max_tokens {results['max_tokens']}, closed loop, "
        + (f"{spec.requests[0]} + {spec.requests[1]} x concurrency" if spec else "8 + 4 x concurrency")
        + " requests per level, each on a synthetic scene the server has not seen (no prefix shared across "
        "requests); the questions cycle through detail and global ones. "
        + (f"Machine load average (1 min) at the start / end of this shape: {load['start']:.1f} / "
           f"{load['end']:.1f}. " if load and "end" in load else "")
        + (f"Merged: {results['merged']}. " if results.get("merged") else "")
        + (f"Servers' environment: {', '.join(f'{k}={v}' for k, v in r['server_env'].items())}. "
           if r.get("server_env") else "")
        + "One run; read ratios, not absolute figures. What the figures mean and where the time goes: "
        "docs/performance.md.",
        *([f"`baseline-*`: this service as it was at git `{results['baseline']['git']}`, in the same run."]
          if "baseline" in results else []), "",
        f"![throughput and latency against concurrency at {title}]({image})", "",
        "### Throughput (requests/s) and median latency (s) by concurrency", "",
        "| system | " + " | ".join(f"c={c} req/s | c={c} p50" for c in levels) + " |",
        "|---|" + "---|---|" * len(levels),
    ]
    for name in ran:
        lines.append(f"| {name} | " + " | ".join(f"{rps(name, c):.2f} | {p50(name, c):.3f}" if c in s[name]
                                                 else "- | -" for c in levels) + " |")
    lines.append(f"| reference-hf (sequential) | {ref['requests_per_s']:.3f} req/s, p50 {ref['latency_s']['p50']:.2f} "
                 f"s over {ref['requests']} questions, one at a time |" + " |" * (2 * len(levels) - 1))
    if "ours-auto" not in ran:
        why = s.get("ours-auto", {}).get("not_run", "not part of this run (--systems)")
        lines += ["", f"ours-auto (mode auto): not run: {why}."]
    lines += ["", "### Against the targets", "", "| comparison | target | measured |", "|---|---|---|"]
    for c, v in q.get("ours_vs_stock_dualfocus", {}).items():
        lines.append(f"| (1) ours / stock-orchestrated DualFocus, throughput, c={c} | >= 1.5x | "
                     f"{_verdict(v['throughput'], TARGETS['ours_vs_stock_dualfocus'])} |")
        lines.append(f"| (1) ours / stock-orchestrated DualFocus, p50 latency, c={c} | <= 0.7x | "
                     f"{_verdict(v['p50'], TARGETS['ours_vs_stock_dualfocus_p50'], at_least=False)} |")
    lines.append(f"| (2) ours dualfocus / ours macro, throughput, c={top} | >= 0.5 | "
                 f"{_verdict(q['dualfocus_vs_macro'], TARGETS['dualfocus_vs_macro'], unit='')} |")
    lines.append(f"| (3) ours macro / stock chat, throughput, c={top} | >= 0.9 | "
                 f"{_verdict(q['macro_vs_stock_chat'], TARGETS['macro_vs_stock_chat'], unit='')} |")
    lines.append(f"| (4) ours dualfocus (c={top}) / reference sequential, throughput | >= 5x | "
                 f"{_verdict(q['ours_vs_reference'], TARGETS['ours_vs_reference'])} |")
    if "computed_vs_no_sharing" in q:
        d = s["ours-dualfocus"][top]
        lines.append(f"| (5) prompt tokens computed / with no sharing, per DualFocus question | <= 0.4 | "
                     f"{_verdict(q['computed_vs_no_sharing'], TARGETS['computed_vs_no_sharing'], False, '')} "
                     f"({d['computed_prompt_tokens_per_request']:.0f} of {d['prompt_tokens_per_request']:.0f}) |")
    if "ours-auto" in ran:
        share = q.get("auto_zoom_share")
        # The target is on a mix that needs zooming; with none zoomed this is mode macro's cost, not a verdict.
        verdict = (_verdict(q["auto_vs_macro"], TARGETS["auto_vs_macro"], unit="") if share else
                   f"{q['auto_vs_macro']:.2f} (no verdict: no question zoomed, so not a mix; --zoom-share makes one)")
        lines.append(f"| (6) ours auto / ours macro, throughput, c={top} | >= 0.7 on a mix | {verdict} |")
        lines.append(f"| (6) ours auto / ours dualfocus, throughput, c={top}; questions zoomed | - | "
                     + (f"{q['auto_vs_dualfocus']:.2f}" if q["auto_vs_dualfocus"] is not None else "-") + "; "
                     + (f"{share:.0%}" if share is not None else "-") + " |")
    for name in ("ours-dualfocus", "ours-auto"):
        stages = s.get(name, {}).get(top, {}).get("stages") if name in ran else None
        if not stages:
            continue
        lines += ["", f"### Where a request's time goes ({name}, c={top})", "",
                  "From the traces: each stage's wall time from submission to finish (box and macro overlap; "
                  "micro follows the box; fusion is the two scoring prefills, side by side) and its prompt tokens "
                  "per request, computed and read from the prefix cache.", "",
                  "| stage | requests with it | p50 ms | prompt tokens computed | of | share from cache |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {stage} | {v['count']} | {v['ms_p50']:.1f} | "
                  + (f"{v['computed_tokens_mean']:.0f} | {v['prompt_tokens_mean']:.0f}" if "computed_tokens_mean" in v
                     else "- | -") + f" | {v['cached_ratio']:.2f} |" for stage, v in stages.items()]
        lines += ["", f"Answers chosen: {s[name][top].get('chosen')}."]
        if s[name][top].get("zoom"):
            z = s[name][top]["zoom"]
            lines.append(f"The gate: zoomed {z['zoomed']}, answered from the macro pass {z['skipped']} "
                         f"(why: {z['why']}), box pass aborted {z['box_aborted']}.")
    if shape == "tiny":
        lines += ["", "Conversations (three questions about one image, in turn, against independent requests): "
                  "[conversation-bench.md](conversation-bench.md)."]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
