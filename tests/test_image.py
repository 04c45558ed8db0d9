"""The image, built with `make docker` (the Dockerfile users build) and run, checked from outside:
/health turns 200 (and Docker's HEALTHCHECK calls it healthy), a DualFocus request through the
openai SDK answers with its trace, /metrics has the dualfocus_* series, the server runs as the
non-root user, SIGTERM lets an in-flight request finish and the container exits 0 within the stop
grace, and no layer holds the build's secrets (a pip configuration and a CA bundle, passed as
BuildKit secrets).

Needs a Docker engine: one already running, or Debian's docker.io, whose dockerd this module starts
(and stops after). Without one it is skipped with the reason. No image registry is reachable here,
so the base image is made locally (deploy/docker/base-image.sh, debootstrap). `make docker-test`
runs this file alone; `make test` runs it with the rest."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import data_url, scene

pytestmark = [pytest.mark.server, pytest.mark.timeout(3600)]  # the build alone may take half an hour

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "dualfocus-serve:cpu"
LOCAL_BASE = "dualfocus-local/python:3.11-bookworm"
# How dockerd runs on these machines: no systemd, no overlay mounts inside the sandbox, no iptables.
# Containers use the host's network (--network host), so builds and the server need no bridge.
DOCKERD_FLAGS = ("--storage-driver=vfs", "--iptables=false", "--bridge=none")
STOP_GRACE_S = 45  # docs/deploy.md's --stop-timeout; the server drains for --drain-seconds inside it
DRAIN_S = 20
# Written into the build's secret files; found in a layer, it means a secret was baked in. Fixed,
# not random, so that layers cached from an earlier build are checked for it too.
SECRET_MARKER = b"dualfocus-build-secret-4f7a1c"


# --- the engine -------------------------------------------------------------------------------------

def docker_cli() -> str | None:
    """A docker CLI that builds with BuildKit: one with the buildx plugin, or one older than 23
    (BuildKit built in, as Debian's docker.io has). Newer CLIs without buildx use the legacy
    builder, which has no secret mounts."""
    for cli in dict.fromkeys(filter(None, (shutil.which("docker"), "/usr/bin/docker"))):
        if not os.access(cli, os.X_OK):
            continue
        if subprocess.run([cli, "buildx", "version"], capture_output=True).returncode == 0:
            return cli
        out = subprocess.run([cli, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
        if re.match(r"(1\d|2[0-2])\.", out.stdout.strip()):
            return cli
    return None


def engine_up(cli: str) -> bool:
    return subprocess.run([cli, "info"], capture_output=True, timeout=30).returncode == 0


@contextlib.contextmanager
def docker_engine(folder: Path) -> Iterator[tuple[str, bool]]:
    """The docker CLI, with an engine running, and whether it was started here: the one that runs
    already, or a dockerd started here and stopped on exit. Skips the module with the reason when
    there can be none."""
    cli = docker_cli()
    if cli is None:
        pytest.skip("no docker CLI that builds with BuildKit (`make docker-tools` installs Debian's docker.io)")
    if engine_up(cli):
        yield cli, False
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.skip("no Docker engine: dockerd is not installed (`make docker-tools` installs Debian's docker.io)")
    if os.geteuid() != 0:
        pytest.skip("no Docker engine running, and starting dockerd needs root")
    log_path = folder / "dockerd.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([dockerd, *DOCKERD_FLAGS], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not engine_up(cli):
            if process.poll() is not None or time.time() > deadline:
                tail = log_path.read_text()[-2000:]
                pytest.skip(f"dockerd could not be started here ({DOCKERD_FLAGS}):\n{tail}")
            time.sleep(1)
        yield cli, True
    finally:
        process.send_signal(signal.SIGTERM)  # dockerd stops its containerd and containers with it
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the build ----------------------------------------------------------------------------------------

# pip settings that mean something inside the build: not certificates (the CA bundle is a secret of
# its own) and not this machine's local files (wheel folders, constraints, file:// indexes).
_LOCAL_ONLY = {"cert", "client-cert", "constraint", "constraints", "find-links", "requirement", "src", "cache-dir",
               "log", "target", "prefix", "root"}


def pip_settings() -> dict[str, str]:
    """This machine's pip configuration (its files, then PIP_* variables) as the build should see it."""
    settings = {}
    out = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "pip", "config", "list"],
                         capture_output=True, text=True)
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        settings[key.split(".", 1)[1]] = value.strip().strip("'\"")
    for key, value in os.environ.items():
        if key.startswith("PIP_") and key != "PIP_CONFIG_FILE":
            settings[key[4:].lower().replace("_", "-")] = value
    kept = {}
    for key, value in settings.items():
        values = [v for v in value.split() if not v.startswith(("/", "file:"))]
        if key not in _LOCAL_ONLY and values:
            kept[key] = " ".join(values)
    return kept


def ca_bundle() -> Path | None:
    """The CA bundle pip uses here, when it is not its own (certifi's)."""
    candidates = [os.environ.get("PIP_CERT")]
    out = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "pip", "config", "get", "global.cert"],
                         capture_output=True, text=True)
    candidates += [out.stdout.strip() if out.returncode == 0 else None,
                   os.environ.get("REQUESTS_CA_BUNDLE"), os.environ.get("SSL_CERT_FILE")]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def build_secrets(folder: Path) -> list[str]:
    """`docker build` flags passing this machine's pip settings and CA bundle as build secrets,
    each file starting with SECRET_MARKER (a comment to pip and to OpenSSL's PEM reader)."""
    marker = "# " + SECRET_MARKER.decode() + "\n"
    pip_conf = folder / "pip.conf"
    pip_conf.write_text(marker + "[global]\n" + "".join(f"{k} = {v}\n" for k, v in pip_settings().items()))
    flags = ["--secret", f"id=pip.conf,src={pip_conf}"]
    bundle = ca_bundle()
    if bundle is not None:
        ca = folder / "ca.crt"
        ca.write_text(marker + bundle.read_text())
        flags += ["--secret", f"id=ca.crt,src={ca}"]
    return flags


def image_id(cli: str) -> str | None:
    out = subprocess.run([cli, "image", "inspect", "-f", "{{.Id}}", IMAGE], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def build_image(cli: str, folder: Path, own_engine: bool) -> float:
    """`make docker` on a local base image (made if missing); the seconds it took. The image it
    replaces is removed, and on an engine of our own the build cache this build did not use (on vfs
    each layer is a full copy: gigabytes each; the pip cache mount stays)."""
    env = {**os.environ, "DOCKER": cli}
    previous = image_id(cli)
    base = subprocess.run(["bash", str(ROOT / "deploy/docker/base-image.sh"), LOCAL_BASE], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert base.returncode == 0, base.stderr
    flags = ["--network", "host", "--progress", "plain", *build_secrets(folder)]
    t0 = time.monotonic()
    with open(folder / "build.log", "w") as log:
        built = subprocess.run(["make", "-C", str(ROOT), "docker", f"DOCKER={cli}", f"BASE_IMAGE={LOCAL_BASE}",
                                "DOCKER_BUILD_FLAGS=" + " ".join(flags)],
                               stdout=log, stderr=subprocess.STDOUT, env=env, timeout=3000)
    seconds = time.monotonic() - t0
    assert built.returncode == 0, (folder / "build.log").read_text()[-4000:]
    if previous is not None and previous != image_id(cli):
        subprocess.run([cli, "rmi", previous], capture_output=True, timeout=600)  # fails harmlessly if in use
    if own_engine:
        unused = f"until={int(seconds) + 600}s"  # not used by this build
        subprocess.run([cli, "builder", "prune", "-f", "--filter", "type=regular", "--filter", unused],
                       capture_output=True, timeout=600)
    return seconds


# --- the secret scan ----------------------------------------------------------------------------------

def find_marker(chunks: Iterable[bytes], marker: bytes = SECRET_MARKER) -> int:
    """Offset of the first `marker` in a byte stream given in chunks, or -1."""
    tail, offset = b"", 0
    for chunk in chunks:
        data = tail + chunk
        found = data.find(marker)
        if found >= 0:
            return offset - len(tail) + found
        tail = data[-(len(marker) - 1):]
        offset += len(chunk)
    return -1


def test_find_marker_finds_it_across_chunk_boundaries():
    stream = b"x" * 100 + SECRET_MARKER + b"y" * 10
    for size in (1, 7, 64, 1000):
        chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
        assert find_marker(chunks) == 100
    assert find_marker([b"a" * 50, SECRET_MARKER[:-1] + b"!"]) == -1


def saved_image(cli: str) -> Iterator[bytes]:
    """`docker save` of the image: every layer as an uncompressed tar, files deleted in later layers
    included."""
    process = subprocess.Popen([cli, "save", IMAGE], stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        while chunk := process.stdout.read(1 << 20):
            yield chunk
    finally:
        process.stdout.close()
        assert process.wait(timeout=600) == 0


# --- the container --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Container:
    def __init__(self, cli: str, port: int):
        self.cli, self.port = cli, port
        self.name = f"dualfocus-test-{os.getpid()}"
        self.base_url = f"http://127.0.0.1:{port}"
        flags = f"--kv-cache-gib 1 --drain-seconds {DRAIN_S}"
        # Minutes on vfs, which copies the whole image into the container's layer.
        self.docker("run", "-d", "--name", self.name, "--network", "host", "--shm-size", "2g",
                    "--stop-timeout", str(STOP_GRACE_S), "-e", f"DUALFOCUS_PORT={port}",
                    "-e", f"DUALFOCUS_SERVE_FLAGS={flags}", IMAGE, timeout=900)

    def docker(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run([self.cli, *args], capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"docker {' '.join(args)}: {out.stderr}"
        return out.stdout

    def state(self) -> dict:
        return json.loads(self.docker("inspect", "-f", "{{json .State}}", self.name))

    def logs(self) -> str:
        out = subprocess.run([self.cli, "logs", "--tail", "60", self.name], capture_output=True, text=True)
        return out.stdout + out.stderr

    def wait_ready(self, timeout: float) -> list[int]:
        """/health statuses until the first 200."""
        statuses: list[int] = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.state()["Running"], f"the container exited:\n{self.logs()}"
            try:
                statuses.append(httpx.get(self.base_url + "/health", timeout=3).status_code)
                if statuses[-1] == 200:
                    return statuses
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise AssertionError(f"/health not 200 within {timeout} s:\n{self.logs()}")

    def remove(self) -> None:
        subprocess.run([self.cli, "rm", "-f", self.name], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docker")
    with docker_engine(folder) as (cli, own_engine):
        yield cli, folder, own_engine


@pytest.fixture(scope="module")
def image(docker):
    cli, folder, own_engine = docker
    seconds = build_image(cli, folder, own_engine)
    size = int(subprocess.run([cli, "image", "inspect", "-f", "{{.Size}}", IMAGE], capture_output=True,
                              text=True, check=True).stdout)
    (folder / "image.json").write_text(json.dumps({"build_seconds": seconds, "size_bytes": size}))
    print(f"\nimage {IMAGE}: built in {seconds:.0f} s, {size / 1e9:.2f} GB")
    return cli


@pytest.fixture(scope="module")
def container(image):
    running = Container(image, free_port())
    try:
        running.health_statuses = running.wait_ready(900)
        yield running
    finally:
        running.remove()


def test_health_turns_200_and_docker_calls_it_healthy(container):
    assert container.health_statuses[-1] == 200
    # The image's own HEALTHCHECK (every 15 s) against the same /health.
    deadline = time.time() + 90
    while container.state()["Health"]["Status"] != "healthy":
        assert time.time() < deadline, container.state()["Health"]
        time.sleep(2)


def test_dualfocus_request_answers_with_its_trace(container):
    client = openai.OpenAI(base_url=container.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    image = scene(seed=5)
    r = client.chat.completions.create(
        model="tiny-llava", max_tokens=8, extra_body={"dualfocus": {"return_trace": True}},
        messages=[{"role": "user", "content": [{"type": "text", "text": "What colour is the square?"},
                                               {"type": "image_url", "image_url": {"url": data_url(image)}}]}])
    answer = r.choices[0].message.content
    trace = r.dualfocus
    assert answer and trace["mode"] == "dualfocus"
    assert answer == (trace["micro_answer"] if trace["chosen"] == "micro" else trace["macro_answer"])
    assert trace["box"]["text"] and len(trace["box"]["normalized"]) == 4
    assert {"macro", "box"} <= set(trace["stages"])
    assert r.usage.prompt_tokens_details.cached_tokens > 0  # the passes shared the image's KV


def test_metrics_count_the_request(container):
    text = httpx.get(container.base_url + "/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("dualfocus_requests_total", (("mode", "dualfocus"), ("status", "ok")))] == 1
    assert sum(v for (name, _), v in samples.items() if name == "dualfocus_fusion_decisions_total") == 1
    names = {name for name, _ in samples}
    assert {"dualfocus_stage_seconds_bucket", "dualfocus_inflight_requests", "dualfocus_queue_depth",
            "vllm:prefix_cache_hits_total", "vllm:kv_cache_usage_perc"} <= names


def test_server_runs_as_the_non_root_user(container):
    status = container.docker("exec", container.name, "cat", "/proc/1/status")
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    assert set(uids) == {"10001"}, status  # real, effective, saved, filesystem
    cmdline = container.docker("exec", container.name, "cat", "/proc/1/cmdline").split("\0")
    assert "serve" in cmdline and any(part.endswith("dualfocus") for part in cmdline), cmdline  # PID 1: the server
    assert container.docker("exec", container.name, "id", "-un").strip() == "dualfocus"


def test_sigterm_drains_and_the_container_exits_0(container):
    client = openai.OpenAI(base_url=container.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    result: dict = {}
    streaming = threading.Event()

    def in_flight():
        try:
            stream = client.chat.completions.create(model="tiny-llava", max_tokens=150, stream=True,
                                                    messages=[{"role": "user", "content": "Count to a hundred."}])
            chunks = []
            for chunk in stream:
                chunks.append(chunk)
                streaming.set()  # the first token is out: the request is in flight
            result["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            result["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        except Exception as e:  # reported by the assertions below
            result["error"] = repr(e)
        finally:
            streaming.set()

    thread = threading.Thread(target=in_flight)
    thread.start()
    assert streaming.wait(120) and thread.is_alive(), result
    t0 = time.monotonic()
    container.docker("stop", container.name, timeout=STOP_GRACE_S + 60)  # SIGTERM; SIGKILL after the grace
    stopped_in = time.monotonic() - t0
    thread.join(timeout=60)
    state = container.state()
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, container.logs())
    assert stopped_in < STOP_GRACE_S, f"took {stopped_in:.0f} s: killed at the grace, not drained"
    assert "error" not in result and result["text"] and result["finish"], result  # finished, not cut off


def test_no_layer_holds_a_build_secret(image):
    cli = image
    history = subprocess.run([cli, "history", "--no-trunc", IMAGE], capture_output=True, text=True, check=True)
    assert SECRET_MARKER.decode() not in history.stdout
    config = json.loads(subprocess.run([cli, "image", "inspect", IMAGE], capture_output=True, text=True,
                                       check=True).stdout)[0]["Config"]
    assert not [e for e in config["Env"] if e.startswith(("PIP_CERT", "PIP_CONFIG_FILE", "PIP_INDEX"))], config["Env"]
    layers = json.loads(subprocess.run([cli, "image", "inspect", "-f", "{{json .RootFS.Layers}}", IMAGE],
                                       capture_output=True, text=True, check=True).stdout)
    assert len(layers) >= 4  # base, system packages, dependencies, project: the scan below reads them all
    assert find_marker(saved_image(cli)) == -1, "a build secret is in a layer of the image"
