"""DualFocus's Prometheus series. They live in prometheus_client's default registry, beside
the vllm:* series the in-process engine registers there, so one /metrics serves both."""

from __future__ import annotations

from typing import get_args

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from engine.trace import STAGES, Chosen, Mode, Result

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80)

REQUESTS = Counter("dualfocus_requests", "Chat completion requests by mode and outcome", ["mode", "status"])
REQUEST_SECONDS = Histogram("dualfocus_request_seconds", "Request wall time", ["mode"], buckets=_LATENCY_BUCKETS)
STAGE_SECONDS = Histogram("dualfocus_stage_seconds", "Wall time of a DualFocus stage", ["stage"],
                          buckets=_LATENCY_BUCKETS)
TTFT = Histogram("dualfocus_time_to_first_token_seconds",
                 "Streamed requests: time from arrival to the first content chunk", buckets=_LATENCY_BUCKETS)
INFLIGHT = Gauge("dualfocus_inflight_requests", "Requests admitted and not finished")
MAX_INFLIGHT = Gauge("dualfocus_max_inflight_requests", "The in-flight limit beyond which requests get 429")
REJECTED = Counter("dualfocus_rejected_requests", "Requests refused before they ran, by reason",
                   ["reason"])  # queue_full (429), not_ready / engine_dead (503), unauthorized (401)
QUEUE_DEPTH = Gauge("dualfocus_queue_depth", "Admitted requests the engine has not started yet")
FUSION = Counter("dualfocus_fusion_decisions", "Which answer DualFocus returned", ["chosen"])
BOX_OUTCOMES = Counter("dualfocus_box_outcomes", "What became of the box pass's box", ["outcome"])
PROMPT_TOKENS = Counter("dualfocus_prompt_tokens", "Prompt tokens by stage", ["stage"])
CACHED_TOKENS = Counter("dualfocus_cached_prompt_tokens", "Prompt tokens served by the prefix cache", ["stage"])
IMAGE_ERRORS = Counter("dualfocus_image_errors", "Images refused", ["reason"])



class EngineCounters(Collector):
    """Counts the engine keeps itself, read at scrape time."""

    engine = None  # set once the engine has loaded

    def collect(self):
        e = self.engine
        yield CounterMetricFamily("dualfocus_pass_retries", "Engine passes run again after a retryable vLLM error",
                                  value=e.retries if e else 0)
        yield CounterMetricFamily("dualfocus_scoring_recomputes",
                                  "Scoring passes re-run without cache reads (the cache held the scored reply)",
                                  value=e.scoring_recomputes if e else 0)


ENGINE_COUNTERS = EngineCounters()
REGISTRY.register(ENGINE_COUNTERS)

# Every series exists from the start, at 0: a ratio or rate over a series that has not happened
# yet (no request has failed, no image was refused) is then 0 on the dashboard, not "No data".
for _reason in ("queue_full", "not_ready", "engine_dead", "unauthorized"):
    REJECTED.labels(_reason)
for _stage in STAGES:
    PROMPT_TOKENS.labels(_stage)
    CACHED_TOKENS.labels(_stage)
for _mode in get_args(Mode):
    REQUEST_SECONDS.labels(_mode)
    for _status in ("ok", "error", "cancelled"):
        REQUESTS.labels(_mode, _status)
for _chosen in get_args(Chosen):
    FUSION.labels(_chosen)
# server/images.py's refusal reasons (its _refuse calls).
for _reason in ("url", "too_large", "bad_base64", "not_found", "fetch", "host_not_allowed", "address_not_public",
                "empty", "too_many_pixels", "not_an_image", "format", "truncated"):
    IMAGE_ERRORS.labels(_reason)


def record_result(result: Result) -> None:
    t = result.trace
    if t.mode == "dualfocus":
        FUSION.labels(t.chosen).inc()
        if t.box is not None:
            BOX_OUTCOMES.labels(t.box.outcome).inc()
    for stage, stats in t.stages.items():
        STAGE_SECONDS.labels(stage).observe(stats.ms / 1000)
        PROMPT_TOKENS.labels(stage).inc(stats.prompt_tokens)
        CACHED_TOKENS.labels(stage).inc(stats.cached_tokens)
