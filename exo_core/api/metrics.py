"""Prometheus metrics of one API app (its own registry, so several apps in a process do not clash)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class ApiMetrics:
    """Requests, tokens, time to first token, decode speed, errors and requests in flight."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "exo_api_requests",
            "HTTP requests answered, by route and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "exo_api_errors",
            "Errors sent to clients (as a status or inside a stream), by route and error type.",
            ["endpoint", "type"],
            registry=r,
        )
        self.prompt_tokens = Counter("exo_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter("exo_completion_tokens", "Tokens generated.", ["model"], registry=r)
        self.cached_prompt_tokens = Counter(
            "exo_cached_prompt_tokens", "Prompt tokens taken from the prefix cache.", ["model"], registry=r
        )
        self.time_to_first_token = Histogram(
            "exo_time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "exo_decode_tokens_per_second",
            "Tokens per second of each finished generation, after its first token.",
            ["model"],
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.active_requests = Gauge(
            "exo_api_active_requests", "Generation requests in progress.", registry=r
        )

    def count_replans(self, read: Callable[[], int]) -> None:
        """Report the node's count of re-plans (`exo_replans_total`), read at each scrape."""
        self.registry.register(
            _ReadCounter("exo_replans", "Re-plans of running requests after a stage failed.", read)
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReadCounter(Collector):
    """A counter kept elsewhere (the node counts; the registry only reports)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self.name = name
        self.documentation = documentation
        self.read = read

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())
