"""DualFocus's Prometheus series, one set per app in a registry of its own.

/metrics serves them beside prometheus_client's default registry, where the in-process vLLM
engine registers its vllm:* series. Every labelled series exists from the start at zero for
each label value it can take, so dashboards and alerts see it before the first event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from engine import EngineCounters, Result
from engine.trace import BOX_OUTCOMES, CHOICES, MODES, STAGES, ZOOM_DECISIONS

from .images import IMAGE_REFUSALS

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80)
REQUEST_STATUSES = ("ok", "error", "cancelled")
# 429 queue_full; 503 not_ready (loading) or engine_dead; 401 unauthorized.
REJECTION_REASONS = ("queue_full", "not_ready", "engine_dead", "unauthorized")


class ServerMetrics:
    def __init__(self, max_inflight_requests: int, engine_counters: Callable[[], EngineCounters | None]):
        """`engine_counters` reads the engine's own counts at scrape time (None before it has loaded)."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "dualfocus_requests", "Chat completion requests by mode and outcome", ["mode", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "dualfocus_request_seconds", "Request wall time", ["mode"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "dualfocus_stage_seconds", "Wall time of a DualFocus stage", ["stage"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "dualfocus_time_to_first_token_seconds",
            "Streamed requests: time from arrival to the first content chunk",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("dualfocus_inflight_requests", "Requests admitted and not finished", registry=r)
        self.max_inflight = Gauge(
            "dualfocus_max_inflight_requests", "The in-flight limit beyond which requests get 429", registry=r
        )
        self.rejected = Counter(
            "dualfocus_rejected_requests", "Requests refused before they ran, by reason", ["reason"], registry=r
        )
        self.queue_depth = Gauge(
            "dualfocus_queue_depth", "Admitted requests the engine has not started yet", registry=r
        )
        self.fusion = Counter("dualfocus_fusion_decisions", "Which answer DualFocus returned", ["chosen"], registry=r)
        self.box_outcomes = Counter(
            "dualfocus_box_outcomes", "What became of the box pass's box", ["outcome"], registry=r
        )
        self.zoom_decisions = Counter(
            "dualfocus_zoom_decisions",
            "Mode auto: whether the gate zoomed (micro pass and fusion) or kept the macro answer",
            ["decision"],
            registry=r,
        )
        self.prompt_tokens = Counter("dualfocus_prompt_tokens", "Prompt tokens by stage", ["stage"], registry=r)
        self.cached_tokens = Counter(
            "dualfocus_cached_prompt_tokens", "Prompt tokens served by the prefix cache", ["stage"], registry=r
        )
        self.image_errors = Counter("dualfocus_image_errors", "Images refused", ["reason"], registry=r)
        r.register(_EngineCounterCollector(engine_counters))

        self.max_inflight.set(max_inflight_requests)
        for mode in MODES:
            self.request_seconds.labels(mode)
            for status in REQUEST_STATUSES:
                self.requests.labels(mode, status)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
            self.prompt_tokens.labels(stage)
            self.cached_tokens.labels(stage)
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        for chosen in CHOICES:
            self.fusion.labels(chosen)
        for outcome in BOX_OUTCOMES:
            self.box_outcomes.labels(outcome)
        for decision in ZOOM_DECISIONS:
            self.zoom_decisions.labels(decision)
        for refusal in IMAGE_REFUSALS:
            self.image_errors.labels(refusal)

    def record_result(self, result: Result) -> None:
        t = result.trace
        if t.gate is not None:
            self.zoom_decisions.labels(t.gate.decision).inc()
        if t.box is not None:  # mode auto runs no box pass for a confident answer (or aborts it)
            self.box_outcomes.labels(t.box.outcome).inc()
        if t.mode == "dualfocus" or (t.gate is not None and t.gate.zoomed):  # answers that went through fusion
            self.fusion.labels(t.chosen).inc()
        for stage, stats in t.stages.items():
            self.stage_seconds.labels(stage).observe(stats.ms / 1000)
            self.prompt_tokens.labels(stage).inc(stats.prompt_tokens)
            self.cached_tokens.labels(stage).inc(stats.cached_tokens)

    def exposition(self) -> bytes:
        """The text /metrics serves: the process's default registry (vllm:*, process_*) and this app's."""
        return generate_latest(REGISTRY) + generate_latest(self.registry)


class _EngineCounterCollector(Collector):
    """Counts the engine keeps itself, read through the engine protocol at scrape time."""

    def __init__(self, counters: Callable[[], EngineCounters | None]):
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        c = self.counters() or EngineCounters()
        yield CounterMetricFamily(
            "dualfocus_pass_retries", "Engine passes run again after a retryable vLLM error", value=c.retries
        )
        yield CounterMetricFamily(
            "dualfocus_scoring_recomputes",
            "Scoring passes re-run without cache reads (the cache held the scored reply)",
            value=c.scoring_recomputes,
        )
