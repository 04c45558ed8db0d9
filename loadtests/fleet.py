"""N replicas of `dualfocus serve` behind the vLLM project's router (`vllm-router`), on this machine.

    python -m loadtests.fleet --replicas 2 --policy sticky_least_loaded  # make fleet
    python -m loadtests.fleet --replicas 2 --policy round_robin --port 8000 -- --kv-cache-gib 1
    python -m loadtests.fleet --replicas 1 --policy none                 # one replica, no router

Replicas listen on free loopback ports; once every /health is 200 the router starts in front of
them (its API on --port, its Prometheus metrics on --metrics-port), with the image-affinity
middleware that keys each image request by its image (--no-image-affinity: without it). Ctrl-C or SIGTERM stops the
router, then the replicas (each drains its in-flight requests), and exits. Arguments after `--`
are `dualfocus serve` flags for every replica. Logs: --logs (default loadtests/results/tmp/fleet/).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Self

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
# The one place the replica command is named (the CLI's module may move; keep it here only).
SERVE = [sys.executable, "-m", "clients", "serve"]
# The router, from the pinned `vllm-router` package beside this Python (its module rather than its
# console script, whose first line names the interpreter it was installed with).
ROUTER = [sys.executable, "-m", "vllm_router.launch_router"]
# The router's OnRequest middleware that gives an image request a session key made from its image
# (deploy/router/image_affinity.wat; loadtests/router_middleware.py builds it).
IMAGE_AFFINITY = ROOT / "deploy" / "router" / "image_affinity.wasm"
POLICIES = (
    "cache_aware", "round_robin", "power_of_two", "consistent_hash", "sticky_least_loaded", "random", "kv_aware"
)
# How the router watches the replicas: a dead one is out after HEALTH_FAILURES failed checks
# HEALTH_INTERVAL_S apart, and back in after two good ones (the router's default success threshold).
HEALTH_INTERVAL_S = 2
HEALTH_FAILURES = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exited(process: subprocess.Popen) -> bool:
    """Whether the process has exited, without reaping it (so stop_process can still end its group)."""
    return process.returncode is not None or bool(
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT))


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    """Until `url` answers 200; fails early if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if exited(process):
            raise RuntimeError(f"{process.args[:4]} exited; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s; see {log}")


def stop_process(process: subprocess.Popen | None, timeout_s: float = 60) -> None:
    """SIGTERM (the server drains, then stops its engine); after timeout_s, SIGKILL to the process
    group (its own session, see Fleet._spawn: vLLM's engine processes are in it)."""
    if process is None or process.returncode is not None:
        return  # never started, or already reaped (its group id may since belong to someone else)
    process.terminate()
    deadline = time.monotonic() + timeout_s
    # WNOWAIT: an exited leader stays unreaped, so its group id cannot have been reused below.
    while time.monotonic() < deadline and not exited(process):
        time.sleep(0.2)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    """A /metrics page as {(sample name, sorted labels): value}."""
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict[tuple[str, tuple], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


@dataclass
class Replica:
    port: int
    log: Path
    process: subprocess.Popen | None = None
    kv_events_port: int = 0  # where it publishes vLLM's KV-cache events (ZMQ); 0: it does not

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def prefix_cache(self) -> tuple[float, float]:
        """vLLM's prefix-cache counters on this replica: (hit tokens, queried tokens)."""
        samples = metric_samples(self.url + "/metrics")
        return metric(samples, "vllm:prefix_cache_hits_total"), metric(samples, "vllm:prefix_cache_queries_total")


@dataclass
class Fleet:
    """Replicas + router as subprocesses. `policy` "none": one replica and no router."""

    replicas: int = 2
    policy: str = "sticky_least_loaded"
    model: str = "tiny-llava"
    port: int = 0  # the router's (0: a free one)
    metrics_port: int = 0
    serve_flags: list[str] = field(default_factory=list)
    router_flags: list[str] = field(default_factory=list)
    kv_events: bool | None = None  # replicas publish KV-cache events (None: when the policy is kv_aware)
    image_affinity: bool = True  # the router keys image requests by their image (IMAGE_AFFINITY)
    logs: Path = ROOT / "loadtests" / "results" / "tmp" / "fleet"
    members: list[Replica] = field(default_factory=list)
    router: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        if self.policy not in (*POLICIES, "none"):
            raise ValueError(f"unknown policy {self.policy!r}; one of {', '.join(POLICIES)} or none")
        if self.policy == "none" and self.replicas != 1:
            raise ValueError("--policy none (no router) runs exactly one replica")
        self.port = self.port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self.logs.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """Where clients send requests: the router, or the lone replica without one."""
        return self.members[0].url if self.policy == "none" else f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> Self:
        from engine.tiny import BUILT_MODELS, ensure_tiny  # imports torch: not for --help

        if self.model in BUILT_MODELS:
            ensure_tiny(self.model)  # built once here: replicas building it at the same time collide
        try:
            # kv_aware needs the replicas' KV-cache events: each publishes on a port of its own.
            events = self.policy == "kv_aware" if self.kv_events is None else self.kv_events
            self.members = [Replica(free_port(), self.logs / f"replica-{i}.log",
                                    kv_events_port=free_port() if events else 0)
                            for i in range(self.replicas)]
            for replica in self.members:  # all load at once, then wait for each
                replica.log.write_text("")  # a restarted replica appends to its log
                self._spawn(replica)
            for replica in self.members:
                wait_http(replica.url + "/health", replica.process, replica.log)
            if self.policy != "none":
                self._start_router()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, replica: Replica) -> None:
        cmd = [*SERVE, "--host", "127.0.0.1", "--port", str(replica.port), "--model", self.model, *self.serve_flags]
        if replica.kv_events_port:
            cmd += ["--kv-events-config", json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                                                      "endpoint": f"tcp://127.0.0.1:{replica.kv_events_port}"})]
        # A session of its own: a Ctrl-C in the terminal reaches this launcher only, which then
        # stops the router before the replicas.
        replica.process = subprocess.Popen(cmd, stdout=replica.log.open("a"), stderr=subprocess.STDOUT,
                                           start_new_session=True)

    def _start_router(self) -> None:
        log = self.logs / "router.log"
        cmd = [*ROUTER, "--host", "127.0.0.1", "--port", str(self.port), "--policy", self.policy,
               "--worker-urls", *(r.url for r in self.members),
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port),
               "--health-check-endpoint", "/health", "--health-check-interval-secs", str(HEALTH_INTERVAL_S),
               "--health-failure-threshold", str(HEALTH_FAILURES), "--health-check-timeout-secs", "2",
               *self.router_flags]
        if self.image_affinity:
            cmd += ["--wasm-middleware", str(IMAGE_AFFINITY)]
        if self.policy == "kv_aware":
            if not all(r.kv_events_port for r in self.members):
                raise ValueError("kv_aware needs replicas started with KV events: start the fleet with it")
            from engine.config import EngineConfig

            for r in self.members:
                cmd += ["--kv-event-source", f"{r.url}=tcp://127.0.0.1:{r.kv_events_port}"]
            # The model's identity and block size (vLLM's default 16), which the router needs to
            # hash a request's tokens as the replicas hash their blocks.
            cmd += ["--kv-event-model", EngineConfig(model=self.model).resolve_model(), "--kv-event-block-size", "16"]
        self.router = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"http://127.0.0.1:{self.port}/v1/models", self.router, log, timeout_s=60)

    def restart_router(self, policy: str, router_flags: list[str] | None = None,
                       image_affinity: bool | None = None) -> None:
        """The same replicas behind a router with another policy (its prefix records start empty)."""
        stop_process(self.router, timeout_s=15)
        self.policy = policy
        self.router_flags = list(router_flags or [])
        if image_affinity is not None:
            self.image_affinity = image_affinity
        self._start_router()

    def router_metrics(self) -> dict[tuple[str, tuple], float]:
        return metric_samples(self.metrics_url)

    def kill_replica(self, index: int) -> None:
        """SIGKILL a replica and its engine processes (a crash, not a drain)."""
        process = self.members[index].process
        assert process is not None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def respawn_replica(self, index: int) -> None:
        """Start a replica again on its old port (the router still lists that URL); returns at once."""
        self._spawn(self.members[index])

    def restart_replica(self, index: int) -> None:
        """respawn_replica, then wait until its /health is 200."""
        replica = self.members[index]
        self.respawn_replica(index)
        assert replica.process is not None
        wait_http(replica.url + "/health", replica.process, replica.log)

    def stop(self) -> None:
        stop_process(self.router, timeout_s=15)
        for replica in self.members:
            stop_process(replica.process)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m loadtests.fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2, help="default: %(default)s")
    p.add_argument("--policy", choices=[*POLICIES, "none"], default="sticky_least_loaded",
                   help="the router's policy (docs/deploy.md, 'Which policy'); none: one replica, no router "
                        "(default: %(default)s)")
    p.add_argument("--model", default="tiny-llava", help="default: %(default)s")
    p.add_argument("--port", type=int, default=8000, help="the router's port (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=29000,
                   help="the router's Prometheus /metrics port (default: %(default)s)")
    p.add_argument("--router-flag", action="append", default=[], metavar="FLAG",
                   help="one more vllm-router argument, e.g. --router-flag=--cache-threshold=0.5 (repeatable)")
    p.add_argument("--no-image-affinity", action="store_true",
                   help="do not give image requests a session key made from their image (the router's "
                        "middleware deploy/router/image_affinity.wasm; docs/deploy.md, 'Many replicas')")
    p.add_argument("--logs", type=Path, default=ROOT / "loadtests" / "results" / "tmp" / "fleet",
                   help="replica and router logs (default: %(default)s)")
    args = p.parse_args(own)
    if args.replicas < 1:
        p.error("--replicas must be at least 1")
    if args.policy == "none" and args.replicas != 1:
        p.error("--policy none runs one replica without a router: --replicas 1")

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    fleet = Fleet(args.replicas, args.policy, args.model, args.port, args.metrics_port, serve_flags,
                  args.router_flag, image_affinity=not args.no_image_affinity, logs=args.logs)
    try:
        print(f"starting {args.replicas} replica(s) of {args.model} ...", flush=True)
        fleet.start()
        for i, replica in enumerate(fleet.members):
            print(f"replica {i}: {replica.url} (log {replica.log})", flush=True)
        if args.policy != "none":
            print(f"router ({args.policy}): {fleet.url}/v1  metrics: {fleet.metrics_url}", flush=True)
        print("ready; Ctrl-C stops everything", flush=True)
        while True:
            for i, replica in enumerate(fleet.members):
                if replica.process is not None and exited(replica.process):
                    stop_process(replica.process)  # its engine processes too
                    print(f"replica {i} exited with {replica.process.returncode}; the router routes around it",
                          flush=True)
                    replica.process = None
            if fleet.router is not None and exited(fleet.router):
                print("the router exited; stopping", flush=True)
                return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        fleet.stop()


if __name__ == "__main__":
    sys.exit(main())
