"""Service metrics: vLLM's names and meanings, one interface, two backends.

`Metrics` holds the instruments; where they go is its backend's business:
- `PrometheusBackend` (uvicorn, one process): a private prometheus-client registry that the app
  serves at /metrics.
- `RayBackend` (Ray Serve): `ray.util.metrics`, recorded in whichever process does the work
  (ingress or model replica); each node's Ray metrics agent exports them for every replica at
  once, on its metrics export port. Ray names cannot hold ':' and Ray prefixes `ray_`, so
  `lvlm_fix:time_to_first_token_seconds` is exported as `ray_lvlm_fix_time_to_first_token_seconds`.

Every series carries `model_name`: the model id the request asked for (a preset, see
ServeConfig.presets). Meanings as vLLM's (`vllm:<name>` there is `lvlm_fix:<name>` here):
time to first token (streamed or not), inter-token latency (between decode steps), end-to-end
latency (arrival to the last byte, streams included), queue time (waiting for the model), prefill
and decode time (in the model), prompt and generated token counters, running and waiting gauges,
and finished requests by finish reason. Ours: extra forward rows per method, errors.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

PREFIX = "lvlm_fix:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Instrument(Protocol):
    def inc(self, value: float = 1, **labels: str) -> None: ...  # counters

    def observe(self, value: float, **labels: str) -> None: ...  # histograms

    def set(self, value: float, **labels: str) -> None: ...  # gauges


class Backend(Protocol):
    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Instrument: ...

    def histogram(
        self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> Instrument: ...

    def gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Instrument: ...

    def render(self) -> bytes | None:
        """The exposition text served at /metrics, or None where another process exports."""
        ...


class Metrics:
    def __init__(self, backend: Backend | None = None) -> None:
        self.backend = backend or PrometheusBackend()
        b, model = self.backend, ("model_name",)
        self.ttft = b.histogram(
            "time_to_first_token_seconds", "Arrival to the first token", model, LATENCY_BUCKETS
        )
        self.inter_token = b.histogram(
            "inter_token_latency_seconds", "Time between decode steps", model, LATENCY_BUCKETS
        )
        self.e2e = b.histogram(
            "e2e_request_latency_seconds",
            "Arrival to the last byte of the response",
            model,
            LATENCY_BUCKETS,
        )
        self.queue_time = b.histogram(
            "request_queue_time_seconds", "Time waiting for the model", model, LATENCY_BUCKETS
        )
        self.prefill_time = b.histogram(
            "request_prefill_time_seconds", "Model start to first token", model, LATENCY_BUCKETS
        )
        self.decode_time = b.histogram(
            "request_decode_time_seconds", "First token to last token", model, LATENCY_BUCKETS
        )
        self.prompt_tokens = b.counter("prompt_tokens", "Prompt tokens processed", model)
        self.generation_tokens = b.counter("generation_tokens", "Tokens generated", model)
        self.running = b.gauge("num_requests_running", "Requests in the model", model)
        self.waiting = b.gauge("num_requests_waiting", "Requests waiting for the model", model)
        self.success = b.counter(
            "request_success", "Finished requests", ("model_name", "finished_reason")
        )
        self.extra_forwards = b.counter(
            "extra_forward_rows", "Extra view rows run, per method", ("model_name", "method")
        )
        self.pruned_image_tokens = b.counter(
            "pruned_image_tokens",
            "Image tokens removed by token pruning, per method",
            ("model_name", "method"),
        )
        self.attention_path = b.counter(
            "attention_path_requests",
            "Finished requests by the attention paths that ran (fused, modifiers, sdpa)",
            ("model_name", "path"),
        )
        self.errors = b.counter(
            "request_errors", "Error responses by status", ("model_name", "code")
        )

    def render(self) -> bytes | None:
        return self.backend.render()


class Gauges:
    """Waiting and running counts of one process (an engine), kept here and set on the gauges:
    Ray's gauges only take values, and each process reports its own."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # counted from the engine's thread and event loops

    def add(self, state: str, model: str, delta: int) -> None:
        gauge = self.metrics.running if state == "running" else self.metrics.waiting
        with self._lock:
            key = (state, model)
            self.counts[key] = self.counts.get(key, 0) + delta
            gauge.set(self.counts[key], model_name=model)


# ---- backends ----------------------------------------------------------------------------------


class _Prometheus:
    def __init__(self, metric: Any) -> None:
        self.metric = metric

    def inc(self, value: float = 1, **labels: str) -> None:
        self.metric.labels(**labels).inc(value)

    def observe(self, value: float, **labels: str) -> None:
        self.metric.labels(**labels).observe(value)

    def set(self, value: float, **labels: str) -> None:
        self.metric.labels(**labels).set(value)


class PrometheusBackend:
    """A private registry (never prometheus-client's global one): one app's metrics."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()

    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Instrument:
        from prometheus_client import Counter

        return _Prometheus(Counter(PREFIX + name, doc, labels, registry=self.registry))

    def histogram(self, name, doc, labels, buckets) -> Instrument:
        from prometheus_client import Histogram

        metric = Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)
        return _Prometheus(metric)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Instrument:
        from prometheus_client import Gauge

        return _Prometheus(Gauge(PREFIX + name, doc, labels, registry=self.registry))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _Ray:
    def __init__(self, metric: Any, method: str) -> None:
        self.metric, self.method = metric, method

    def _record(self, value: float, labels: dict[str, str]) -> None:
        getattr(self.metric, self.method)(value, tags=labels)

    def inc(self, value: float = 1, **labels: str) -> None:
        self._record(value, labels)

    def observe(self, value: float, **labels: str) -> None:
        self._record(value, labels)

    def set(self, value: float, **labels: str) -> None:
        self._record(value, labels)


class RayBackend:
    """`ray.util.metrics` in the calling process; Ray's agents export them per node."""

    @staticmethod
    def _name(name: str) -> str:
        return (PREFIX + name).replace(":", "_")

    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Instrument:
        from ray.util.metrics import Counter

        # prometheus-client adds `_total` to counters; so does this, for the same names.
        return _Ray(Counter(self._name(name) + "_total", doc, tag_keys=labels), "inc")

    def histogram(self, name, doc, labels, buckets) -> Instrument:
        from ray.util.metrics import Histogram

        metric = Histogram(self._name(name), doc, boundaries=list(buckets), tag_keys=labels)
        return _Ray(metric, "observe")

    def gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Instrument:
        from ray.util.metrics import Gauge

        return _Ray(Gauge(self._name(name), doc, tag_keys=labels), "set")

    def render(self) -> None:
        return None
