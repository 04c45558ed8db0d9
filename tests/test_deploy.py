"""The deploy artefacts, checked offline (no cluster runs here; the image built and run is
tests/test_image.py, the monitoring live tests/test_monitoring.py): the image's entrypoint and
healthcheck, the compose file by the Compose tool and against the Compose specification,
Prometheus's config and alert rules (promtool), Grafana's dashboard, the Kubernetes manifests
against the Kubernetes schemas and each other, and, against a running server, that every metric
the dashboard, the alerts and the autoscaler use is one /metrics exports."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from clients.cli import build_parser

from .conftest import RunningServer, data_url, scene

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"  # vendored, with their sources: schemas/README.md
# The oldest and the newest Kubernetes release the manifests are checked against.
K8S_VERSIONS = ("1.29.0", "1.37.0")
# Kinds defined by CRDs, against their vendored schemas (tests/schemas/README.md).
CRD_SCHEMAS = {"ServiceMonitor": "servicemonitor_v1.json", "PrometheusRule": "prometheusrule_v1.json",
               "InferencePool": "inferencepool_v1.json", "HTTPRoute": "httproute_v1.json"}


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def promtool(*args: str) -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool is installed by `make test` (Debian's prometheus package)"
    out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def serve_args(flags: str):
    """`dualfocus serve` parsed with flags as the image's entrypoint passes them (split on spaces)."""
    return build_parser().parse_args(["serve", *flags.split()])


# --- the image ----------------------------------------------------------------------------------

def dockerfile(instruction: str) -> str:
    """The arguments of the Dockerfile's last INSTRUCTION, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [instruction]]
    assert found, f"no {instruction} in the Dockerfile"
    return found[-1]


def image_env() -> dict[str, str]:
    """The image's DUALFOCUS_* defaults (its ENV)."""
    pairs = (word.split("=", 1) for word in shlex.split(dockerfile("ENV")))
    return {k: v for k, v in pairs if k.startswith("DUALFOCUS_")}


def run_entrypoint(tmp_path: Path, env: dict[str, str], *args: str) -> list[str]:
    """The image's ENTRYPOINT with a stand-in `dualfocus` that prints its arguments, one a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "dualfocus"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    entrypoint = json.loads(dockerfile("ENTRYPOINT"))
    out = subprocess.run([*entrypoint, *args], env={"PATH": f"{bin_dir}:/usr/bin:/bin", **image_env(), **env},
                         cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_entrypoint_serves_the_model_and_flags_from_the_environment(tmp_path):
    assert run_entrypoint(tmp_path, {}) == ["serve", "--host", "0.0.0.0", "--port", "8000", "--model", "tiny-llava"]

    (tmp_path / "a.example").touch()  # a glob in the flags must reach the server as written
    env = {"DUALFOCUS_MODEL": "/models/llava", "DUALFOCUS_PORT": "9000",
           "DUALFOCUS_SERVE_FLAGS": "--max-model-len 8192  --allowed-image-domains *.example"}
    argv = run_entrypoint(tmp_path, env, "--api-key", "k")
    assert argv == ["serve", "--host", "0.0.0.0", "--port", "9000", "--model", "/models/llava",
                    "--max-model-len", "8192", "--allowed-image-domains", "*.example", "--api-key", "k"]
    args = build_parser().parse_args(argv)
    assert (args.port, args.model, args.max_model_len, args.api_key) == (9000, "/models/llava", 8192, "k")


@pytest.mark.parametrize("status", [200, 503])
def test_healthcheck_passes_only_when_health_is_200(status):
    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        command = dockerfile("HEALTHCHECK").split(" CMD ", 1)[1]
        # `python` is the image's venv Python; here, the test's.
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "DUALFOCUS_PORT": str(httpd.server_port)}
        out = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    finally:
        httpd.shutdown()
    assert seen == ["/health"]
    assert (out.returncode == 0) == (status == 200), out.stderr


def test_image_builds_like_make_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M), "CPU is the default variant"
    assert "DUALFOCUS_VARIANT=${VARIANT}" in text, "install.sh picks the variant from DUALFOCUS_VARIANT"
    assert "bash deploy/install.sh" in dockerfile("RUN"), "the same install, from the same pinned files, as make"
    assert dockerfile("USER") == "dualfocus"
    assert int(re.search(r"useradd .*--uid (\d+)", text).group(1)) != 0
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored), "a 5 GB venv must not go into the build context"


# --- every DUALFOCUS_SERVE_FLAGS the deploy files set is real, and termination outlasts the drain ---

def configmap_flags(overlay: str) -> str:
    path = K8S / "base/configmap.yaml" if overlay == "base" else K8S / "gpu/configmap-patch.yaml"
    return load_yaml(path)["data"]["DUALFOCUS_SERVE_FLAGS"]


def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def compose_env(service: dict) -> dict[str, str]:
    """The service's environment with ${VAR:-default} read as its default (nothing set)."""
    pairs = (item.split("=", 1) for item in service["environment"] if "=" in item)
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for k, v in pairs}


@pytest.mark.parametrize("flags", [configmap_flags("base"), configmap_flags("gpu"),
                                   compose_env(compose()["services"]["dualfocus"])["DUALFOCUS_SERVE_FLAGS"]])
def test_configured_serve_flags_are_serve_flags(flags):
    serve_args(flags)  # argparse exits (a test failure) on an unknown flag or a bad value


def test_serve_flags_in_the_deploy_docs_are_serve_flags():
    docs = (ROOT / "docs/deploy.md").read_text()
    examples = [flags for flags in re.findall(r'DUALFOCUS_SERVE_FLAGS[=:] ?"([^"]*)"', docs) if flags != "..."]
    assert len(examples) >= 3
    for flags in examples:
        serve_args(flags)


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)s", duration)
    assert m, f"write durations in seconds here: {duration!r}"
    return float(m.group(1))


def test_stop_grace_outlasts_the_drain():
    # On SIGTERM the server lets in-flight requests finish for --drain-seconds, then stops vLLM
    # (a few seconds): the orchestrator must wait for both before it kills.
    dep = load_yaml(K8S / "base/deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    for overlay in ("base", "gpu"):
        drain = serve_args(configmap_flags(overlay)).drain_seconds
        assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + 15, overlay

    service = compose()["services"]["dualfocus"]
    drain = serve_args(compose_env(service)["DUALFOCUS_SERVE_FLAGS"]).drain_seconds
    assert seconds(service["stop_grace_period"]) >= drain + 10


# --- compose --------------------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification():
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    errors = [f"{e.json_path}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(compose())]
    assert not errors


def test_compose_mounts_and_builds_what_the_repo_has():
    services = compose()["services"]
    assert {"dualfocus", "dualfocus-gpu", "prometheus", "grafana"} <= set(services)
    for name, variant in (("dualfocus", "cpu"), ("dualfocus-gpu", "gpu")):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / "Dockerfile").is_file()
        assert build["args"]["VARIANT"] == variant and services[name]["image"].endswith(":" + variant)
    gpu = services["dualfocus-gpu"]
    assert gpu["profiles"] == ["gpu"] and "dualfocus" in gpu["networks"]["default"]["aliases"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume
                mounts[target] = DEPLOY / source
    assert (mounts["/etc/prometheus"] / "prometheus.yml").is_file()
    assert (mounts["/etc/grafana/provisioning"] / "datasources").is_dir()
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/dualfocus.yaml")["providers"][0]
    assert mounts[provider["options"]["path"]] == DEPLOY / "grafana/dashboards"


def compose_tool() -> list[str]:
    """The real Compose: Docker's plugin (`docker compose`, v2) where installed, else the standalone
    docker-compose (Debian's, v1; `make test` installs it)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is installed by `make test` (Debian's docker-compose package)"
    return [exe]


@pytest.mark.parametrize("profile", ["default", "gpu"])
def test_compose_tool_accepts_the_file_and_resolves_it(profile, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUALFOCUS_", "MODELS_DIR"))}
    env["MODELS_DIR"] = str(tmp_path)  # a host folder of checkpoints
    args = ["--profile", "gpu"] if profile == "gpu" else []
    out = subprocess.run([*compose_tool(), "-p", "dualfocus", "-f", str(DEPLOY / "compose.yaml"), *args, "config"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    services = resolved["services"]
    assert {"dualfocus", "prometheus", "grafana"} <= set(services)
    if profile == "gpu":
        assert "dualfocus-gpu" in services
    service = services["dualfocus-gpu" if profile == "gpu" else "dualfocus"]
    assert Path(service["build"]["context"]) == ROOT  # relative to the file, not to where it runs
    assert service["environment"]["DUALFOCUS_MODEL"] == "tiny-llava"
    volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in service["volumes"]]
    assert any(v.startswith(f"{tmp_path}:/models") for v in volumes), volumes
    prometheus_volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}"
                          for v in services["prometheus"]["volumes"]]
    assert any(v.startswith(f"{DEPLOY / 'prometheus'}:/etc/prometheus") for v in prometheus_volumes), prometheus_volumes


# --- Prometheus -----------------------------------------------------------------------------------

ALERTS = {"DualFocusDown", "DualFocusErrorRatioHigh", "DualFocusQueueSaturated", "DualFocusLatencyP99High",
          "DualFocusPrefixCacheHitRatioLow"}


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(DEPLOY / "prometheus/alerts.yaml")["groups"] for rule in group["rules"]]


def test_prometheus_config_is_valid():
    out = promtool("check", "config", str(DEPLOY / "prometheus/prometheus.yml"))
    assert "SUCCESS" in out and "alerts.yaml" in out  # promtool also checked the rule file it loads


def test_alert_rules_are_valid_and_cover_the_issue():
    assert "SUCCESS: 5 rules found" in promtool("check", "rules", str(DEPLOY / "prometheus/alerts.yaml"))
    assert {rule["alert"] for rule in alert_rules()} == ALERTS
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"} and rule["annotations"]["summary"], rule["alert"]


def test_alert_unit_tests_pass():
    assert "SUCCESS" in promtool("test", "rules", str(DEPLOY / "prometheus/alerts_test.yaml"))


# --- Grafana --------------------------------------------------------------------------------------

def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana/dashboards/dualfocus.json").read_text())


def dashboard_targets() -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def test_dashboard_loads_and_every_query_parses(tmp_path):
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    provisioned = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert [d["type"] for d in provisioned if d.get("isDefault")] == ["prometheus"]
    for panel, target in dashboard_targets():
        assert panel["datasource"]["uid"] == target["datasource"]["uid"] == "${datasource}", panel["title"]
        assert target["expr"].strip(), panel["title"]
    # promtool parses PromQL only inside rule files: every query becomes a recording rule, with
    # Grafana's $__rate_interval as a plain range.
    rules = [{"record": f"dashboard:panel_{panel['id']}_{target['refId']}",
              "expr": target["expr"].replace("$__rate_interval", "5m")} for panel, target in dashboard_targets()]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", str(path))


def test_dashboard_shows_what_the_issue_asks_for():
    used = set().union(*(promql_metric_names(target["expr"]) for _, target in dashboard_targets()))
    assert {
        "dualfocus_requests_total",  # requests/s by mode and status, error ratio
        "dualfocus_request_seconds_bucket", "dualfocus_stage_seconds_bucket",  # latency overall, per stage
        "dualfocus_time_to_first_token_seconds_bucket",
        "dualfocus_queue_depth", "dualfocus_inflight_requests",
        "dualfocus_fusion_decisions_total", "dualfocus_box_outcomes_total",
        "dualfocus_zoom_decisions_total",  # mode auto: how often it zooms
        "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",  # prefix-cache hit ratio
        "vllm:kv_cache_usage_perc",
    } <= used


# --- Kubernetes -----------------------------------------------------------------------------------

def base_documents() -> list[dict]:
    return [doc for path in sorted((K8S / "base").glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in load_all(path)]


def kind(docs: list[dict], name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == name]
    return doc


def validate_k8s(doc: dict, version: str) -> None:
    """Built-in kinds strictly against the Kubernetes schemas (unknown fields are errors); the
    Prometheus Operator's and the Gateway API's kinds against their CRD schemas (tests/schemas)."""
    if doc["kind"] in CRD_SCHEMAS:
        schema = json.loads((SCHEMAS / CRD_SCHEMAS[doc["kind"]]).read_text())
        jsonschema.Draft7Validator(schema).validate(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest():
    listed = load_yaml(K8S / "base/kustomization.yaml")["resources"]
    assert sorted(listed) == sorted(p.name for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate(version):
    docs = base_documents()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                                         "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"}
    for doc in docs:
        validate_k8s(doc, version)


def test_k8s_validation_catches_a_misspelt_field():
    dep = kind(base_documents(), "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        validate_k8s(dep, K8S_VERSIONS[-1])
    monitor = kind(base_documents(), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        validate_k8s(monitor, K8S_VERSIONS[-1])


def kustomize(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (its built-in kustomize) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kustomize_builds_valid_manifests(overlay):
    docs = kustomize(overlay)
    assert len(docs) == len(base_documents())
    for doc in docs:
        for version in K8S_VERSIONS:
            validate_k8s(doc, version)
    container = kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    flags = kind(docs, "ConfigMap")["data"]["DUALFOCUS_SERVE_FLAGS"]
    if overlay == "gpu":
        assert container["image"].endswith(":gpu")
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
        assert serve_args(flags).kv_cache_gib is None, "on GPU the KV cache is vLLM's share of GPU memory"
    else:
        assert container["image"].endswith(":cpu") and "nvidia.com/gpu" not in container["resources"]["limits"]


def test_k8s_objects_are_wired_together():
    docs = base_documents()
    dep, svc, cm = kind(docs, "Deployment"), kind(docs, "Service"), kind(docs, "ConfigMap")
    hpa, pdb = kind(docs, "HorizontalPodAutoscaler"), kind(docs, "PodDisruptionBudget")
    monitor = kind(docs, "ServiceMonitor")
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (dep["spec"]["selector"]["matchLabels"], svc["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"

    [container] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(image_env()["DUALFOCUS_PORT"])}
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading may take minutes"
    assert container["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    uid = int(re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    assert pod["spec"]["securityContext"]["runAsUser"] == uid and pod["spec"]["securityContext"]["runAsNonRoot"]

    # Prometheus: the ServiceMonitor finds the Service, and its targets get job=<Service name>,
    # the job the alerts watch.
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in svc["spec"]["ports"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert all('job="dualfocus"' in rule["expr"] for rule in alert_rules() if "up{" in rule["expr"])
    assert svc["metadata"]["name"] == "dualfocus"
    assert kind(docs, "PrometheusRule")["spec"]["groups"] == load_yaml(DEPLOY / "prometheus/alerts.yaml")["groups"], \
        "deploy/k8s/base/prometheusrule.yaml must carry the groups of deploy/prometheus/alerts.yaml"

    # The HPA scales the Deployment on the metric the Prometheus adapter serves.
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert hpa["spec"]["scaleTargetRef"] == target
    [metric] = hpa["spec"]["metrics"]
    [rule] = load_yaml(K8S / "prometheus-adapter-values.yaml")["rules"]["custom"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"] == "dualfocus_queue_depth"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# --- metric names: what the dashboard, the alerts and the adapter ask for is what the server exports ---

# PromQL words that are neither metrics nor followed by "(" (functions and aggregations are).
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}
# Series Prometheus itself writes for every target, not the server.
PROMETHEUS_MADE = {"up"}
# Labels Prometheus (or the Prometheus Operator) attaches to every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    names = set()
    # An identifier not inside a number, a duration or a $variable...
    for m in re.finditer(r"(?<![\w:.$])[a-zA-Z_:][\w:]*", expr):
        # ... that is not a function or aggregation being called, nor a keyword.
        if not expr[m.end():].lstrip().startswith("(") and m.group() not in PROMQL_WORDS:
            names.add(m.group())
    return names


def promql_label_names(expr: str) -> set[tuple[str, str]]:
    """(metric, label) for every label matcher written on a metric name."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return {(metric, label) for metric, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr)
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)}


def used_promql() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL expression the deploy files run."""
    used = [(f"dashboard panel {panel['title']!r}", target["expr"]) for panel, target in dashboard_targets()]
    used += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    for rule in load_yaml(K8S / "prometheus-adapter-values.yaml")["rules"]["custom"]:
        used.append(("adapter seriesQuery", rule["seriesQuery"]))
        series = promql_metric_names(rule["seriesQuery"]).pop()
        query = (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'pod="p"')
                 .replace("<<.GroupBy>>", "pod"))
        used.append(("adapter metricsQuery", query))
    return used


def test_promql_metric_names_finds_metrics_not_functions_labels_or_keywords():
    expr = ('histogram_quantile(0.99, sum by (le, stage) (rate(dualfocus_stage_seconds_bucket{stage!="a:b"}'
            '[$__rate_interval]))) / ignoring(x) vllm:kv_cache_usage_perc offset 5m > bool 1e3 '
            'and on(job) max_over_time(up{job="dualfocus"}[10m:1m])')
    assert promql_metric_names(expr) == {"dualfocus_stage_seconds_bucket", "vllm:kv_cache_usage_perc", "up"}
    assert promql_label_names(expr) == {("dualfocus_stage_seconds_bucket", "stage"), ("up", "job")}
    names = {name for _, e in used_promql() for name in promql_metric_names(e)}
    assert len(names) >= 15 and all(re.fullmatch(r"(dualfocus_|vllm:)\w+|up", n) for n in names), names


# Sample names each metric type puts in the exposition (the parser names counter families without _total).
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                   "summary": ("", "_sum", "_count")}


@pytest.mark.server
def test_every_metric_the_deploy_files_use_is_exported(server):
    # Labelled series appear once something has been counted under them: one DualFocus request
    # (box, macro, micro and fusion stages, a fusion decision, a box outcome, vLLM's passes).
    response = httpx.post(
        server.base_url + "/v1/chat/completions", timeout=120,
        headers={"Authorization": f"Bearer {RunningServer.API_KEY}"},
        json={"model": "tiny-llava", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What colour is the square?"},
            {"type": "image_url", "image_url": {"url": data_url(scene(seed=3))}}]}]})
    assert response.status_code == 200, response.text

    exported, labels = set(), {}
    for family in text_string_to_metric_families(httpx.get(server.base_url + "/metrics", timeout=10).text):
        exported.update(family.name + s for s in SAMPLE_SUFFIXES.get(family.type, ("",)))
        for sample in family.samples:
            exported.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)

    missing = [f"{name} (the endpoint picker, deploy/k8s/components/inference-pool)"
               for name in EPP_METRICS - exported]
    unknown_labels = []
    for where, expr in used_promql():
        missing += [f"{name} ({where})" for name in promql_metric_names(expr) - PROMETHEUS_MADE - exported]
        unknown_labels += [f"{metric}{{{label}}} ({where})" for metric, label in promql_label_names(expr)
                           if metric not in PROMETHEUS_MADE and label not in TARGET_LABELS
                           and label not in labels.get(metric, set())]
    assert not missing and not unknown_labels, {"not exported": missing, "labels not on the metric": unknown_labels}


# --- many replicas: vllm-router (compose profile fleet, deploy/k8s/router) and an InferencePool ---

def router_args(argv: list[str]):
    """Arguments as the installed vllm-router parses them (its own parser: an unknown flag exits)."""
    from vllm_router.launch_router import parse_router_args

    return parse_router_args(argv)


def component_documents(name: str) -> list[dict]:
    folder = K8S / "components" / name
    listed = load_yaml(folder / "kustomization.yaml")["resources"]
    assert sorted(listed) == sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    return [doc for file in listed for doc in load_all(folder / file)]


def named(docs: list[dict], kind_name: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind_name and d["metadata"]["name"] == name]
    return doc


def replica_pod() -> tuple[dict, dict]:
    """The base Deployment's pod labels and its container."""
    pod = kind(base_documents(), "Deployment")["spec"]["template"]
    return pod["metadata"]["labels"], pod["spec"]["containers"][0]


@pytest.mark.parametrize("component", ["router", "inference-pool"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_fleet_manifests_validate(component, version):
    docs = component_documents(component)
    assert docs
    for doc in docs:
        validate_k8s(doc, version)


def test_crd_validation_catches_a_misspelt_field():
    pool = named(component_documents("inference-pool"), "InferencePool", "dualfocus")
    pool["spec"]["targetPort"] = pool["spec"].pop("targetPorts")
    with pytest.raises(jsonschema.ValidationError, match="targetPort"):
        validate_k8s(pool, K8S_VERSIONS[-1])
    route = named(component_documents("inference-pool"), "HTTPRoute", "dualfocus")
    route["spec"]["rules"][0]["backendRefs"][0]["kind"] = 7
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(route, K8S_VERSIONS[-1])


@pytest.mark.parametrize("overlay,component", [("router", "router"), ("inference-gateway", "inference-pool")])
def test_fleet_overlays_build(overlay, component):
    docs = kustomize(overlay)
    assert len(docs) == len(base_documents()) + len(component_documents(component))
    for doc in docs:
        for version in K8S_VERSIONS:
            validate_k8s(doc, version)


def assert_image_affinity(args) -> None:
    """The router loads the image-affinity middleware from the service's image (WORKDIR /app, the
    whole build context copied in), i.e. the committed component tests/test_router_middleware.py runs."""
    from loadtests.fleet import IMAGE_AFFINITY

    assert args.wasm_middleware == "/app/" + str(IMAGE_AFFINITY.relative_to(ROOT))
    assert IMAGE_AFFINITY.is_file()
    assert "WORKDIR /app" in (ROOT / "Dockerfile").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"deploy", "deploy/router", "*.wasm", "**/*.wasm"} & set(ignored)


def test_k8s_router_is_wired_to_the_replicas():
    docs = component_documents("router")
    labels, replica = replica_pod()
    dep, svc = named(docs, "Deployment", "dualfocus-router"), named(docs, "Service", "dualfocus-router")
    pod = dep["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["vllm-router"]
    assert container["image"].split(":")[0] == replica["image"].split(":")[0], "vllm-router is in the service's image"
    args = router_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # Service discovery finds the replica pods, not the router's own.
    assert args.service_discovery and args.selector
    assert args.selector.items() <= labels.items()
    assert not args.selector.items() <= pod["metadata"]["labels"].items()
    assert args.service_discovery_port == replica["ports"][0]["containerPort"]
    assert args.service_discovery_namespace == "$(POD_NAMESPACE)"
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in container["env"]
    assert args.health_check_endpoint == replica["readinessProbe"]["httpGet"]["path"] == "/health"
    assert args.policy in {"sticky_least_loaded", "consistent_hash", "cache_aware", "round_robin", "power_of_two"}
    assert_image_affinity(args)
    assert (args.host, args.port, args.prometheus_host, args.prometheus_port) == \
        ("0.0.0.0", ports["http"], "0.0.0.0", ports["metrics"])
    # The router waits for replicas as long as a replica may take to load (the replicas' startup probe).
    startup = replica["startupProbe"]
    assert args.worker_startup_timeout_secs >= startup["periodSeconds"] * startup["failureThreshold"]

    # Its service account may list and watch pods in its namespace, and only that.
    role, binding = named(docs, "Role", "dualfocus-router"), named(docs, "RoleBinding", "dualfocus-router")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["spec"]["serviceAccountName"]}]
    assert named(docs, "ServiceAccount", pod["spec"]["serviceAccountName"])

    # The Service reaches the router; the ServiceMonitor scrapes its metrics port.
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    monitor = named(docs, "ServiceMonitor", "dualfocus-router")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    base_monitor = kind(base_documents(), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == base_monitor["metadata"]["labels"]["release"]


def test_inference_pool_is_wired_to_the_replicas_and_the_picker():
    docs = component_documents("inference-pool")
    labels, replica = replica_pod()
    pool = named(docs, "InferencePool", "dualfocus")
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [replica["ports"][0]["containerPort"]]

    # The picker: its Service and port, its arguments naming this pool, its scoring config mounted.
    ref = pool["spec"]["endpointPickerRef"]
    svc = named(docs, "Service", ref["name"])
    [grpc] = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    epp = named(docs, "Deployment", ref["name"])
    [container] = epp["spec"]["template"]["spec"]["containers"]
    assert grpc["targetPort"] in {p["name"] for p in container["ports"]}
    assert svc["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])
    assert flags["pool-name"] == pool["metadata"]["name"]
    assert flags["pool-group"] == pool["apiVersion"].split("/")[0]
    [mount] = container["volumeMounts"]
    [volume] = epp["spec"]["template"]["spec"]["volumes"]
    assert volume["name"] == mount["name"] and flags["config-file"].startswith(mount["mountPath"] + "/")
    config_map = named(docs, "ConfigMap", volume["configMap"]["name"])
    config = yaml.safe_load(config_map["data"][flags["config-file"].rsplit("/", 1)[1]])
    plugins = {p["type"] for p in config["plugins"]}
    assert {"prefix-cache-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= plugins
    for profile in config["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= plugins

    # Its service account reads the pool and the pods.
    role = named(docs, "Role", "dualfocus-epp")
    granted = {(group, resource) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] if {"list", "watch"} <= set(rule["verbs"])}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted
    assert epp["spec"]["template"]["spec"]["serviceAccountName"] == \
        named(docs, "RoleBinding", "dualfocus-epp")["subjects"][0]["name"]

    # The route sends the Gateway's traffic to the pool.
    route = named(docs, "HTTPRoute", "dualfocus")
    [backend] = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert (backend["group"], backend["kind"], backend["name"]) == \
        (pool["apiVersion"].split("/")[0], pool["kind"], pool["metadata"]["name"])


# The series the endpoint picker reads from every replica's /metrics (the extension's model server
# protocol for vLLM); checked against a running server in test_every_metric_the_deploy_files_use_is_exported.
EPP_METRICS = {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
               "vllm:cache_config_info"}


def test_compose_fleet_profile_routes_to_its_replicas():
    services = compose()["services"]
    router = services["router"]
    assert router["profiles"] == ["fleet"] and router["entrypoint"] == ["vllm-router"]
    args = router_args(router["command"])
    replicas = [name for name in services if name.startswith("replica-")]
    assert len(replicas) >= 2
    port = int(image_env()["DUALFOCUS_PORT"])
    assert sorted(args.worker_urls) == sorted(f"http://{name}:{port}" for name in replicas)
    for name in replicas:
        service = services[name]
        assert service["profiles"] == ["fleet"] and service["image"] == router["image"]
        assert "ports" not in service, "replicas are reached through the router only"
        assert "dualfocus" in service["networks"]["default"]["aliases"], "scraped as job dualfocus"
        assert router["depends_on"][name] == {"condition": "service_healthy"}
        serve_args(compose_env(service)["DUALFOCUS_SERVE_FLAGS"])
    assert args.host == "0.0.0.0" and args.health_check_endpoint == "/health"
    assert_image_affinity(args)
    # The image's healthcheck asks DUALFOCUS_PORT/health: the router answers /health on that port.
    assert args.port == port and router["ports"] == [f"127.0.0.1:8080:{port}"]
    jobs = {job["job_name"]: job for job in load_yaml(DEPLOY / "prometheus/prometheus.yml")["scrape_configs"]}
    [sd] = jobs["vllm-router"]["dns_sd_configs"]
    assert sd["names"] == ["router"] and sd["port"] == args.prometheus_port and args.prometheus_host == "0.0.0.0"
