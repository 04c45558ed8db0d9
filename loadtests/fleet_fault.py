"""`make fleet-fault`: a replica killed under load behind vllm-router, then started again.

    python -m loadtests.fleet_fault                         # 2 replicas, sticky_least_loaded, 4 clients
    python -m loadtests.fleet_fault --policy cache_aware --kill-after 10 --after-return 15

Timeline: closed-loop DualFocus load on the fleet (every request on a new scene, with its
X-Session-ID); after --kill-after s, SIGKILL to replica 1 and its engine processes (a crash, not a
drain); at once it is started again on the same port (the router still lists that URL); once the
router counts it healthy again, --after-return s more of load, then stop.

Measured: requests that failed (and how: status and error body), the error window (first to last
failed request, and from the kill), how long until the router marked the replica unhealthy and
healthy again, requests each replica completed before the kill, while it was down and after it
came back. Results: loadtests/results/fleet-fault-<time>.json, quoted in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass

import httpx

from . import scenes
from .bench import ROOT
from .fleet import Fleet, metric, metric_samples
from .fleet_bench import MODEL, session_key
from .loadgen import git_revision, machine


@dataclass
class Outcome:
    start: float  # seconds since the load began
    end: float
    status: int | None  # None: no HTTP answer at all
    error: str | None = None  # the error body's message (or the transport error)
    content_type: str | None = None


async def load(url: str, stop: asyncio.Event, t0: float, concurrency: int, max_tokens: int,
               timeout_s: float) -> list[Outcome]:
    """Closed loop until `stop` is set; every request on a scene not sent before."""
    outcomes: list[Outcome] = []
    counter = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal counter
        while not stop.is_set():
            counter += 1
            item = scenes.synthetic(1, seed=50_000 + counter)[0]
            start = time.monotonic() - t0
            body = {"model": MODEL, "max_tokens": max_tokens, "dualfocus": {"mode": "dualfocus"},
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": item.image_url}},
                        {"type": "text", "text": item.question}]}]}
            try:
                r = await client.post(url + "/v1/chat/completions", json=body,
                                      headers={"X-Session-ID": session_key(item)})
                error = None
                if r.status_code != 200:
                    try:
                        error = str(r.json().get("error", r.text))[:300]
                    except ValueError:
                        error = r.text[:300]
                outcomes.append(Outcome(start, time.monotonic() - t0, r.status_code, error,
                                        r.headers.get("content-type")))
            except httpx.HTTPError as e:
                outcomes.append(Outcome(start, time.monotonic() - t0, None, f"{type(e).__name__}: {e}"[:300]))

    async with httpx.AsyncClient(timeout=timeout_s) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return outcomes


def worker_health(fleet: Fleet, url: str) -> float | None:
    try:
        samples = fleet.router_metrics()
    except httpx.HTTPError:
        return None
    return metric({k: v for k, v in samples.items() if dict(k[1]).get("worker") == url},
                  "vllm_router_worker_health")


def replica_requests(fleet: Fleet, index: int) -> float | None:
    try:
        return metric(metric_samples(fleet.members[index].url + "/metrics"), "dualfocus_requests_total")
    except httpx.HTTPError:
        return None


async def scenario(fleet: Fleet, args: argparse.Namespace) -> dict:
    victim = fleet.members[1]
    t0 = time.monotonic()
    stop = asyncio.Event()
    events: dict[str, float] = {}
    task = asyncio.create_task(load(fleet.url, stop, t0, args.concurrency, args.max_tokens, args.timeout))

    def now() -> float:
        return round(time.monotonic() - t0, 2)

    await asyncio.sleep(args.kill_after)
    served_before = [replica_requests(fleet, i) for i in range(len(fleet.members))]
    fleet.kill_replica(1)
    events["killed"] = now()
    fleet.respawn_replica(1)  # loads while the load goes on
    # The router's view of the victim, polled: out (health 0), then back (health 1).
    while worker_health(fleet, victim.url) != 0 and now() < events["killed"] + 120:
        await asyncio.sleep(0.25)
    events["router_marked_unhealthy"] = now()
    while not (await asyncio.to_thread(victim.healthy)) and now() < events["killed"] + 600:
        await asyncio.sleep(0.5)
    events["replica_healthy_again"] = now()
    served_while_down = [replica_requests(fleet, 0)]
    while worker_health(fleet, victim.url) != 1 and now() < events["killed"] + 660:
        await asyncio.sleep(0.25)
    events["router_marked_healthy"] = now()
    await asyncio.sleep(args.after_return)
    stop.set()
    outcomes = await task  # the requests in flight finish
    events["load_stopped"] = now()
    served_after = [replica_requests(fleet, i) for i in range(len(fleet.members))]

    failed = [o for o in outcomes if o.status != 200]
    by_kind: dict[str, int] = {}
    for o in failed:
        kind = f"http_{o.status}" if o.status else "no_response"
        by_kind[kind] = by_kind.get(kind, 0) + 1
    after_return = [o for o in outcomes if o.start >= events["router_marked_healthy"]]
    return {
        "events_s": events,
        "requests": len(outcomes), "completed": len(outcomes) - len(failed), "failed": len(failed),
        "failed_by_kind": by_kind,
        "failed_examples": sorted({(o.status, o.content_type, o.error) for o in failed}, key=str)[:5],
        "error_window_s": round(max(o.end for o in failed) - min(o.end for o in failed), 2) if failed else 0.0,
        "errors_from_kill_s": round(max(o.end for o in failed) - events["killed"], 2) if failed else 0.0,
        "failed_started_before_kill": sum(o.start < events["killed"] for o in failed),
        "router_detection_s": round(events["router_marked_unhealthy"] - events["killed"], 2),
        "replica_served_before_kill": served_before,
        "survivor_served_while_down": (served_while_down[0] or 0) - (served_before[0] or 0),
        "returned_replica_served_after_return": served_after[1],
        "failed_after_return": sum(o.status != 200 for o in after_return),
        "requests_after_return": len(after_return),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.fleet_fault", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="sticky_least_loaded", help="the router's policy (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, help="clients at once (default: %(default)s)")
    p.add_argument("--kill-after", type=float, default=10,
                   help="seconds of load before the kill (default: %(default)s)")
    p.add_argument("--after-return", type=float, default=15,
                   help="seconds of load once the router counts the replica healthy again (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8, help="default: %(default)s")
    p.add_argument("--timeout", type=float, default=120, help="client timeout per request, s (default: %(default)s)")
    args = p.parse_args(argv)
    fleet = Fleet(2, args.policy, MODEL, serve_flags=["--kv-cache-gib", "1"],
                  logs=ROOT / "loadtests" / "results" / "tmp" / "fleet-fault")
    with fleet:
        result = asyncio.run(scenario(fleet, args))
    result = {"command": "python -m loadtests.fleet_fault " + " ".join(sys.argv[1:] if argv is None else argv),
              "git": git_revision(), "machine": machine(), "policy": args.policy, "concurrency": args.concurrency,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **result}
    out = ROOT / "loadtests" / "results" / f"fleet-fault-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
