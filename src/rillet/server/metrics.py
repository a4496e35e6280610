"""Prometheus metrics for one app, in a registry of its own (tests build several apps)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sized
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class EngineStatsLike(Protocol):
    """The part of ``AsyncEngine.stats()`` the gauges read."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float

    @property
    def num_draft_tokens(self) -> Mapping[str, int]:
        """Speculative decoding, per proposer: draft tokens proposed (monotonic)."""

    @property
    def num_accepted_tokens(self) -> Mapping[str, int]:
        """Speculative decoding, per proposer: draft tokens accepted (monotonic)."""


class _SpeculationCollector(Collector):
    """The engine's speculation counters, as counters (the engine counts; a scrape reads)."""

    def __init__(self) -> None:
        self.drafts: Mapping[str, int] = {}
        self.accepted: Mapping[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, what, values in (
            ("rillet_spec_decode_draft_tokens", "Draft tokens proposed", self.drafts),
            (
                "rillet_spec_decode_accepted_tokens",
                "Draft tokens the model accepted",
                self.accepted,
            ),
        ):
            family = CounterMetricFamily(name, f"{what}, by proposer", labels=("proposer",))
            for proposer, value in sorted(values.items()):
                family.add_metric([proposer], value)
            yield family


class ServerMetrics:
    """Every series ``/metrics`` exposes.

    Engine gauges are read from ``engine.stats()`` at scrape time, so they are exact when
    scraped (a disconnect that aborted a request shows as ``rillet_requests_running 0``).
    Per-request series are fed by the request tracker as outputs arrive.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge(
            "rillet_requests_running", "Requests in the engine's running batch", registry=r
        )
        self.waiting = Gauge(
            "rillet_requests_waiting", "Requests queued in the engine scheduler", registry=r
        )
        self.kv_cache_usage = Gauge(
            "rillet_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r
        )
        self.engine_restarts = Gauge(
            "rillet_engine_restarts",
            "Times the engine core died and was brought back",
            registry=r,
        )
        self.in_flight = Gauge(
            "rillet_requests_in_flight",
            "Admitted generation requests (what --max-concurrent-requests limits)",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "rillet_time_to_first_token_seconds",
            "From arrival to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "rillet_inter_token_latency_seconds",
            "Gap between consecutive generated tokens of one request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "rillet_request_duration_seconds",
            "End-to-end latency of a generation request",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "rillet_request_queue_seconds",
            "From arrival until the engine first scheduled the request (admission, parsing, "
            "tokenization and the scheduler's waiting queue)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "rillet_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generated_tokens = Counter(
            "rillet_generated_tokens", "Tokens generated (streamed or returned)", registry=r
        )
        self.requests = Counter(
            "rillet_requests",
            "Generation requests by route and outcome (success, cancelled, or the error_type)",
            labelnames=("route", "outcome"),
            registry=r,
        )
        self._speculation = _SpeculationCollector()
        r.register(self._speculation)

    def watch_streams(self, streams: Sized) -> None:
        """Report ``len(streams)``, the resumable streams held, at scrape time."""
        Gauge(
            "rillet_resumable_streams",
            "Resumable streams held (read, or waiting for a resume)",
            registry=self.registry,
        ).set_function(lambda: len(streams))

    def render(self, stats: EngineStatsLike, num_in_flight: int, engine_restarts: int) -> bytes:
        """The Prometheus text exposition, with gauges refreshed from ``stats``."""
        self.engine_restarts.set(engine_restarts)
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.in_flight.set(num_in_flight)
        self._speculation.drafts = stats.num_draft_tokens
        self._speculation.accepted = stats.num_accepted_tokens
        return generate_latest(self.registry)
