"""`make fleet-bench`: the fleet's share of prompt tokens read from cache, and its throughput, by
router policy, with one replica alone as the reference; one run, one pair of replicas.

    python -m loadtests.fleet_bench                                   # the committed figures
    python -m loadtests.fleet_bench --policies round_robin,cache_aware --images 8 --questions 3
    python -m loadtests.fleet_bench --report-only loadtests/results/fleet-<time>.json

Workload: conversations about images. Each of --images synthetic scenes gets --questions questions,
asked one after the other (each after the previous answer and a pause of up to --think-s, as a user
reading the answers would); --concurrency clients run conversations at once, so they interleave. Every request
carries `X-Session-ID: <digest of its image>`, the key the session policies (consistent_hash,
sticky_least_loaded) place by, unless --no-session-key (clients as they are). The router runs the
image-affinity middleware (deploy/router/: it gives a keyless image request a key made from its
image) unless a policy is given as POLICY/no-affinity. Every run (policy x mode) gets scenes no
replica has seen.

Cached share: over the run, the sum across replicas of vLLM's prefix-cache hits over its queries
(vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total, prompt tokens of every pass).
Results: loadtests/results/fleet-<time>.json and the "Many replicas" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.metadata
import json
import random
import statistics
import sys
import time
from pathlib import Path

import openai

from . import scenes, systems
from .bench import ROOT
from .fleet import POLICIES, Fleet, metric, metric_samples
from .loadgen import git_revision, machine
from .report import replace_section

MODEL = "tiny-llava"


def session_key(item: scenes.Item) -> str:
    """The affinity key of a question: its image (the same bytes, the same key)."""
    return hashlib.sha256(item.image_url.encode()).hexdigest()[:32]


def conversations(n_images: int, n_questions: int, seed: int) -> list[list[scenes.Item]]:
    """n_images conversations of n_questions different questions about one scene each."""
    images = scenes.synthetic(n_images, seed=seed)
    return [[scenes.Item(img.image_url, scenes.QUESTIONS[(i + k) % len(scenes.QUESTIONS)], img.width, img.height)
             for k in range(n_questions)] for i, img in enumerate(images)]


async def run_conversations(url: str, convs: list[list[scenes.Item]], concurrency: int, mode: str,
                            max_tokens: int, think_s: float = 0.0, seed: int = 0,
                            session_keys: bool = True) -> tuple[list[systems.Sample], float]:
    """Each client takes the next conversation and asks its questions in order, pausing a random
    0..think_s between an answer and the next question (a user reading it)."""
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    queue = list(reversed(convs))
    samples: list[systems.Sample] = []

    async def ask(item: scenes.Item) -> systems.Sample:
        t0 = time.perf_counter()
        try:
            r = await client.chat.completions.create(
                model=MODEL, max_tokens=max_tokens, messages=[systems._user(item.question, item.image_url)],
                extra_headers={"X-Session-ID": session_key(item)} if session_keys else None,
                extra_body={"dualfocus": {"mode": mode, "return_trace": True}})
        except openai.APIError as e:
            return systems.Sample(False, time.perf_counter() - t0, error=type(e).__name__)
        u = r.usage
        return systems.Sample(True, time.perf_counter() - t0, None, u.completion_tokens, u.prompt_tokens,
                              u.prompt_tokens_details.cached_tokens or 0)

    async def client_loop() -> None:
        while queue:
            conversation = queue.pop()
            for k, item in enumerate(conversation):
                if k:
                    await asyncio.sleep(rng.uniform(0, think_s))
                samples.append(await ask(item))

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return samples, wall


def replica_counters(fleet: Fleet, indexes: list[int]) -> list[dict[str, float]]:
    out = []
    for i in indexes:
        samples = metric_samples(fleet.members[i].url + "/metrics")
        out.append({"hits": metric(samples, "vllm:prefix_cache_hits_total"),
                    "queries": metric(samples, "vllm:prefix_cache_queries_total"),
                    "requests": metric(samples, "dualfocus_requests_total")})
    return out


def router_counters(fleet: Fleet) -> dict[str, float]:
    """The router's own account of its choices (vllm_router_* series, by label set)."""
    wanted = ("vllm_router_policy_decisions_total", "vllm_router_prefix_routing_decisions_total",
              "vllm_router_kv_routing_inputs_total")
    return {name + json.dumps(dict(labels), sort_keys=True): value
            for (name, labels), value in fleet.router_metrics().items() if name in wanted}


NO_AFFINITY = "/no-affinity"  # a policy given as "sticky_least_loaded/no-affinity": without the middleware


def measure(fleet: Fleet, config: str, mode: str, args: argparse.Namespace, seed: int) -> dict:
    """One run: `config` is "single" (replica 0 alone, no router) or a router policy, with the
    image-affinity middleware unless it ends in NO_AFFINITY."""
    indexes = [0] if config == "single" else list(range(len(fleet.members)))
    url = fleet.members[0].url if config == "single" else fleet.url
    if config != "single":
        try:
            fleet.restart_router(config.removesuffix(NO_AFFINITY), image_affinity=not config.endswith(NO_AFFINITY))
        except RuntimeError as e:  # e.g. a policy that cannot start here: recorded, not fatal
            print(f"  {mode:9s} {config:16s} the router did not start: {e}", flush=True)
            return {"config": config, "mode": mode, "router_failed": str(e),
                    "router_log_tail": (fleet.logs / "router.log").read_text()[-3000:]}
    before, router_before = replica_counters(fleet, indexes), (router_counters(fleet) if config != "single" else {})
    convs = conversations(args.images, args.questions, seed)
    samples, wall = asyncio.run(run_conversations(url, convs, args.concurrency, mode, args.max_tokens,
                                                  args.think_s, seed, not args.no_session_key))
    after = replica_counters(fleet, indexes)
    delta = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    hits, queries = sum(d["hits"] for d in delta), sum(d["queries"] for d in delta)
    ok = [s for s in samples if s.ok]
    result = {
        "config": config, "mode": mode, "requests": len(samples), "ok": len(ok),
        "errors": sorted({s.error for s in samples if not s.ok}),
        "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3),
        "latency_p50_s": round(statistics.median(s.latency_s for s in ok), 3) if ok else None,
        "cached_share": round(hits / queries, 4) if queries else 0.0,
        "prefix_cache_hits": hits, "prefix_cache_queries": queries,
        "usage_cached_share": round(sum(s.cached_tokens for s in ok) / max(1, sum(s.prompt_tokens for s in ok)), 4),
        "requests_per_replica": [int(d["requests"]) for d in delta],
    }
    if config != "single":
        router_after = router_counters(fleet)
        result["router"] = {k: v - router_before.get(k, 0.0) for k, v in router_after.items()
                            if v - router_before.get(k, 0.0)}
    print(f"  {mode:9s} {config:16s} cached share {result['cached_share']:.3f}  {result['requests_per_s']:.2f} req/s  "
          f"per replica {result['requests_per_replica']}  errors {result['errors']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.fleet_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2, help="default: %(default)s")
    p.add_argument("--policies", default="round_robin,cache_aware,consistent_hash,sticky_least_loaded",
                   help="router policies to compare, besides one replica alone; POLICY/no-affinity: without "
                        "the image-affinity middleware (default: %(default)s)")
    p.add_argument("--modes", default="dualfocus,macro", help="request modes (default: %(default)s)")
    p.add_argument("--images", type=int, default=12, help="conversations, one image each (default: %(default)s)")
    p.add_argument("--questions", type=int, default=4, help="questions per image (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, help="clients at once (default: %(default)s)")
    p.add_argument("--think-s", type=float, default=2.0,
                   help="pause before a follow-up question, uniform in 0..THINK_S seconds (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8, help="default: %(default)s")
    p.add_argument("--no-session-key", action="store_true", help="send no X-Session-ID (clients that do not)")
    p.add_argument("--no-docs", action="store_true",
                   help="write the results JSON only, not docs/benchmarks.md (supplementary runs)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="per replica (default: %(default)s)")
    p.add_argument("--report-only", type=Path, metavar="RESULTS.json",
                   help="only rewrite the docs/benchmarks.md section from an earlier run's results")
    args = p.parse_args(argv)
    if args.report_only:
        write_report(json.loads(args.report_only.read_text()), args.report_only.resolve())
        return 0
    policies = [x for x in args.policies.split(",") if x]
    for policy in policies:
        if policy.removesuffix(NO_AFFINITY) not in POLICIES:
            p.error(f"unknown policy {policy!r}: one of {', '.join(POLICIES)}, optionally with {NO_AFFINITY}")
    results = {"command": "python -m loadtests.fleet_bench " + " ".join(sys.argv[1:] if argv is None else argv),
               "git": git_revision(), "machine": machine(), "model": MODEL, "replicas": args.replicas,
               "router_version": importlib.metadata.version("vllm-router"),
               "images": args.images, "questions_per_image": args.questions, "concurrency": args.concurrency,
               "max_tokens": args.max_tokens, "kv_cache_gib": args.kv_cache_gib, "think_s": args.think_s,
               "session_keys": not args.no_session_key, "image_affinity": "unless /no-affinity",
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": []}
    # The replicas publish KV events only when kv_aware is compared (it subscribes to them).
    fleet = Fleet(args.replicas, "round_robin", MODEL, serve_flags=["--kv-cache-gib", str(args.kv_cache_gib)],
                  kv_events=any(x.startswith("kv_aware") for x in policies),
                  logs=ROOT / "loadtests" / "results" / "tmp" / "fleet-bench")
    with fleet:
        # Warm up each replica on scenes of its own (first requests pay one-off costs).
        for i in range(len(fleet.members)):
            asyncio.run(run_conversations(fleet.members[i].url, conversations(2, 1, seed=900 + i), 2, "dualfocus",
                                          args.max_tokens))
        seed = 1000
        for mode in args.modes.split(","):
            for config in ["single", *policies]:
                seed += 1  # scenes no replica has seen yet
                results["runs"].append(measure(fleet, config, mode, args, seed))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "loadtests" / "results" / f"fleet-{stamp}.json"
    out.write_text(json.dumps(results, indent=2))
    if args.no_docs:
        print(f"wrote {out}", flush=True)
    else:
        write_report(results, out)
    return 0


def write_report(results: dict, path: Path) -> None:
    replace_section(ROOT / "docs" / "benchmarks.md", "fleet", report(results, path.relative_to(ROOT)))
    print(f"wrote the fleet section of docs/benchmarks.md from {path}", flush=True)


def report(r: dict, path: Path) -> str:
    runs = [run for run in r["runs"] if "router_failed" not in run]
    failed = [run for run in r["runs"] if "router_failed" in run]
    lines = [
        "", "## Many replicas behind vllm-router: cached share by policy", "",
        (f"Generated by `{r['command']}` at git `{r['git']}` on {r['machine']['platform']} "
         f"({r['machine']['cpus']} CPUs, shared with other work), {r['started']}. Raw figures: `{path}`."),
        (f"{r['replicas']} replicas of {r['model']} (--kv-cache-gib {r['kv_cache_gib']}) behind `vllm-router` "
        f"{r['router_version']}; {r['images']} conversations of {r['questions_per_image']} questions "
        f"about one synthetic scene each, asked in order with a pause of 0-{r['think_s']:g} s before each "
         f"follow-up, {r['concurrency']} clients at once, max_tokens {r['max_tokens']}; "
        + ("every request carries `X-Session-ID` = a digest of its image. " if r.get("session_keys", True)
           else "no request carries a session key (clients as they are). ")
        + ("The router runs the image-affinity middleware (deploy/router/: a keyless image request gets "
           "`X-Session-ID` = a hash of its image) except where a policy reads `/no-affinity`. "
           if "image_affinity" in r else "")
        + "\"single\" is replica 0 alone "
        "(no router) on the same workload. Cached share: prefix-cache hits / queries summed over the "
        "replicas (every pass's prompt tokens). One run; both replicas share 2 cores, so throughput "
        "figures say little about scaling."), "",
        "| mode | config | cached share | vs single | requests/s | p50 s | requests per replica | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in dict.fromkeys(run["mode"] for run in runs):
        single = next(run for run in runs if run["mode"] == mode and run["config"] == "single")
        for run in (x for x in runs if x["mode"] == mode):
            ratio = run["cached_share"] / single["cached_share"] if single["cached_share"] else float("nan")
            lines.append(f"| {mode} | {run['config']} | {run['cached_share']:.3f} | {ratio:.2f} | "
                         f"{run['requests_per_s']:.2f} | {run['latency_p50_s']} | "
                         f"{' / '.join(map(str, run['requests_per_replica']))} | {len(run['errors']) or 0} |")
    lines += [
        "", ("How to read it. In `dualfocus` mode most of a request's cached share comes from inside the "
        "request (the micro and scoring passes extend the box pass's prompt on the same replica), which "
        "any policy keeps; in `macro` mode a question's only reuse is an earlier question about its image "
        "on the same replica, so the share shows where the follow-ups landed."), "",
        "| target (issue 17) | mode | measured |", "|---|---|---|"]
    for mode in dict.fromkeys(run["mode"] for run in runs):
        single = next(run for run in runs if run["mode"] == mode and run["config"] == "single")
        for run in (x for x in runs if x["mode"] == mode and x["config"] != "single"):
            ratio = run["cached_share"] / single["cached_share"] if single["cached_share"] else float("nan")
            goal = "below single" if run["config"] == "round_robin" else ">= 0.9 x single"
            met = ratio < 1 if run["config"] == "round_robin" else ratio >= 0.9
            lopsided = " (one replica took every request)" if min(run["requests_per_replica"]) == 0 else ""
            lines.append(f"| {run['config']}: {goal} | {mode} | {ratio:.2f} x ({'met' if met else 'missed'})"
                         f"{lopsided} |")
    lines += ["", "What the router reported about its own choices (counter increases during each run):", ""]
    for run in runs:
        if run.get("router"):
            parts = ", ".join(f"`{k}` {v:g}" for k, v in sorted(run["router"].items())
                              if "prefix_routing" in k or "kv_routing" in k)
            lines.append(f"- {run['mode']} / {run['config']}: {parts or 'no prefix or KV routing decisions'}")
    lines += [f"- {run['mode']} / {run['config']}: the router did not start ({run['router_failed']})" for run in failed]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
