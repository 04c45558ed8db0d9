"""The monitoring, live: a real Prometheus (Debian's `prometheus` package) with deploy/prometheus's
configuration and alert rules scrapes a real `dualfocus serve` under a short mixed load (DualFocus,
macro, streamed, bad images, a 429 at the in-flight limit). Then every PromQL expression of the
Grafana dashboard and of the alert rules is evaluated through Prometheus's HTTP API and must
return data: a panel that shows "No data" under load is a bug. Last, alerts fire when their
condition is made true: the 429 makes DualFocusQueueSaturated pending, stopping the server makes
DualFocusDown pending."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from .conftest import data_url, scene, start_server

pytestmark = [pytest.mark.server, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy/prometheus"
DASHBOARD = ROOT / "deploy/grafana/dashboards/dualfocus.json"
MODEL = "tiny-llava"
# Short intervals so that a one-minute load gives every rate() window its samples.
SCRAPE_S = 2
STEP_S = 2


def grafana_rate_interval(scrape_s: float, step_s: float) -> str:
    """Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval), where
    $__interval is the panel's step."""
    return f"{int(max(step_s + scrape_s, 4 * scrape_s))}s"


def grafana_expr(expr: str) -> str:
    """A dashboard query as Grafana sends it to Prometheus for a graph at STEP_S resolution."""
    expr = (expr.replace("$__rate_interval", grafana_rate_interval(SCRAPE_S, STEP_S))
            .replace("$__interval", f"{STEP_S}s"))
    assert "$" not in expr, f"a Grafana variable this test does not substitute: {expr}"
    return expr


_COMPARISON = re.compile(r"(==|!=|>=|<=|>(?!=)|<(?!=))(?!\s*bool\b)")


def with_bool(expr: str) -> str:
    """An alert expression with every comparison made a `bool` one: 0 or 1 for each series instead
    of only the series over the threshold, so it returns data whenever what it compares exists
    (label matchers, inside {}, are left alone)."""
    parts = re.split(r"(\{[^}]*\})", expr)
    return "".join(part if part.startswith("{") else _COMPARISON.sub(r"\1 bool", part) for part in parts)


def test_with_bool_rewrites_comparisons_not_matchers():
    expr = 'up{job="a",x!="b"} == 0 or rate(y{s=~"e.*"}[5m]) > 0.05 and z >= bool 1 or w < 2 * v <= 3'
    assert with_bool(expr) == ('up{job="a",x!="b"} == bool 0 or rate(y{s=~"e.*"}[5m]) > bool 0.05 '
                               'and z >= bool 1 or w < bool 2 * v <= bool 3')


def test_grafana_rate_interval_follows_grafana():
    assert grafana_rate_interval(15, 60) == "75s" and grafana_rate_interval(15, 5) == "60s"
    assert grafana_expr("rate(x[$__rate_interval])") == f"rate(x[{grafana_rate_interval(SCRAPE_S, STEP_S)}])"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_config(target: str, rules: Path) -> dict:
    """deploy/prometheus/prometheus.yml with the test's intervals, the rules by absolute path, and
    the `dualfocus` job scraping `target` instead of Docker's DNS name."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_S}s", evaluation_interval="1s")
    assert config["rule_files"] == ["alerts.yaml"]
    config["rule_files"] = [str(rules)]
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "dualfocus"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [target]}]
    return config


class Prometheus:
    def __init__(self, folder: Path, config: dict):
        exe = shutil.which("prometheus")
        assert exe, "prometheus is installed by `make test` (Debian's prometheus package)"
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(folder / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [exe, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait(lambda: httpx.get(self.url + "/-/ready", timeout=2).status_code == 200, 60, "ready")

    def wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, f"prometheus exited; see {self.log.name}"
            try:
                if condition():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"prometheus: not {what} within {timeout} s; see {self.log.name}")

    def api(self, path: str, **params) -> dict:
        r = httpx.get(self.url + "/api/v1/" + path, params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def target_health(self) -> list[str]:
        return [t["health"] for t in self.api("targets")["activeTargets"] if t["labels"]["job"] == "dualfocus"]

    def alert_state(self, name: str) -> str | None:
        states = [a["state"] for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]
        return states[0] if states else None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def image_message(text: str, image_url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def mixed_load(server, client: openai.OpenAI) -> None:
    """What a dashboard should show something for: DualFocus (with trace, streamed), macro, image
    refusals, a 429 at the in-flight limit (the server's limit is 1)."""
    for seed in range(2):
        image = scene(seed=seed)
        r = client.chat.completions.create(model=MODEL, messages=image_message("What colour is the square?",
                                                                                 data_url(image)),
                                           max_tokens=8, extra_body={"dualfocus": {"return_trace": True}})
        assert r.choices[0].message.content and r.dualfocus["box"]["text"], r
    stream = client.chat.completions.create(model=MODEL, messages=image_message("What is on the left?",
                                                                                  data_url(scene(seed=3))),
                                            max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    r = client.chat.completions.create(model=MODEL, messages=image_message("Describe it.", data_url(scene(seed=4))),
                                       max_tokens=8, extra_body={"dualfocus": {"mode": "macro"}})
    assert r.choices[0].message.content

    for bad_url, code in (("data:image/png;base64,not base64!", "image_bad_base64"),
                          ("data:image/png;base64,aGVsbG8gd29ybGQ=", "image_not_an_image")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=image_message("What?", bad_url), max_tokens=4)
        assert e.value.body["code"] == code

    # One request in flight (the limit), then a second one: 429.
    first_done = threading.Event()

    def long_request():
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count."}],
                                           max_tokens=200)
        finally:
            first_done.set()

    threading.Thread(target=long_request, daemon=True).start()
    deadline = time.time() + 60
    while server.value("dualfocus_inflight_requests") < 1:
        assert time.time() < deadline and not first_done.is_set(), "the long request never got in flight"
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi."}], max_tokens=4)
    assert e.value.body["code"] == "queue_full"
    assert first_done.wait(120)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("monitoring")
    server = start_server(folder, "--max-inflight-requests", "1", "--drain-seconds", "2")
    prometheus = None
    try:
        prometheus = Prometheus(folder, prometheus_config(f"127.0.0.1:{server.port}", PROMETHEUS_DIR / "alerts.yaml"))
        prometheus.wait(lambda: prometheus.target_health() == ["up"], 60, "scraping the server")
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        start = time.time()
        mixed_load(server, client)
        time.sleep(3 * SCRAPE_S)  # the last requests' counts scraped
        yield server, prometheus, start, time.time()
    finally:
        if prometheus is not None:
            prometheus.stop()
        if server.process.poll() is None:
            server.process.terminate()
            server.process.wait(timeout=60)


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(f"{panel['title']} [{target['refId']}]", target["expr"])
            for panel in board["panels"] for target in panel.get("targets", [])]


def alert_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yaml").read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def finite_values(result: list[dict]) -> list[float]:
    return [float(v) for series in result for _, v in series.get("values", [series.get("value")])
            if not math.isnan(float(v))]


def test_every_dashboard_query_has_data_under_load(live):
    _, prometheus, start, end = live
    queries = dashboard_queries()
    assert len(queries) >= 20
    empty = []
    for where, expr in queries:
        data = prometheus.api("query_range", query=grafana_expr(expr), start=start, end=end, step=STEP_S)
        if not finite_values(data["result"]):
            empty.append(where)
    assert not empty, f"panels with no data under load: {empty}"


def test_dashboard_numbers_match_the_load(live):
    """Not only data: the counts are the load's (2 DualFocus + 1 streamed, 1 macro, 2 bad images, 1 429)."""
    _, prometheus, _, end = live

    def value(expr: str) -> float:
        [series] = prometheus.api("query", query=expr, time=end)["result"]
        return float(series["value"][1])

    assert value('sum(dualfocus_requests_total{mode="dualfocus",status="ok"})') == 3
    assert value('sum(dualfocus_requests_total{mode="macro",status="ok"})') == 2  # with the long text-only one
    assert value('sum(dualfocus_requests_total{status="error"})') == 0
    assert value('dualfocus_rejected_requests_total{reason="queue_full"}') == 1
    assert value('sum(dualfocus_image_errors_total{reason=~"bad_base64|not_an_image"})') == 2
    assert value("sum(dualfocus_fusion_decisions_total)") == 3
    assert value("sum(dualfocus_time_to_first_token_seconds_count)") == 1
    assert value("dualfocus_max_inflight_requests") == 1


def test_every_alert_expression_evaluates_on_live_series(live):
    _, prometheus, _, end = live
    empty = [name for name, expr in alert_exprs()
             if not prometheus.api("query", query=with_bool(expr), time=end)["result"]]
    assert not empty, f"alert expressions with nothing to compare under load: {empty}"


def test_alerts_fire_when_their_condition_holds(live):
    server, prometheus, _, _ = live
    # The 429 of the load: at the in-flight limit (`for: 5m`, so pending for now).
    prometheus.wait(lambda: prometheus.alert_state("DualFocusQueueSaturated") in ("pending", "firing"), 30,
                    "pending DualFocusQueueSaturated after a 429")
    assert prometheus.alert_state("DualFocusDown") is None
    server.process.terminate()
    assert server.process.wait(timeout=60) == 0
    prometheus.wait(lambda: prometheus.target_health() == ["down"], 30, "seeing the target down")
    prometheus.wait(lambda: prometheus.alert_state("DualFocusDown") in ("pending", "firing"), 30,
                    "pending DualFocusDown once the server stopped")
