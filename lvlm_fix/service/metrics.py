"""Prometheus metrics of one app, on its own CollectorRegistry (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "lvlm_request_latency_seconds",
            "Request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lvlm_time_to_first_token_seconds",
            "Time to the first streamed piece",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_s = Histogram(
            "lvlm_tokens_per_second",
            "Generated tokens per second of one request",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000),
            registry=r,
        )
        self.batch_size = Histogram(
            "lvlm_batch_size",
            "Requests sharing one generate call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge(
            "lvlm_queue_depth", "Requests waiting for or inside the engine", registry=r
        )
        self.extra_forwards = Counter(
            "lvlm_extra_forward_rows",
            "Extra view rows run per method (x samples)",
            ["method"],
            registry=r,
        )
        self.errors = Counter("lvlm_errors", "Error responses by status code", ["code"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
