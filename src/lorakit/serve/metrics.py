"""The server's Prometheus metrics (prometheus-client), one registry per server.

Label values come from the server's own lists only (configured tenants, registered adapters, the
base model's served name), never from what a client sent, so a client cannot grow the label
space. The access log writes one JSON line per request: who, which adapter, status, tokens and
latency; never a key or a prompt.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

access_log = logging.getLogger("lorakit.access")

# Latency buckets in seconds, from a token on a GPU to a long answer on a CPU.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, running, waiting, adapters_resident, adapter_bytes) -> None:
        """The four gauges read their values from these callables at each scrape."""
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("lorakit_num_requests_running", "Requests decoding in the batch", registry=r).set_function(running)
        Gauge("lorakit_num_requests_waiting", "Requests waiting for a row", registry=r).set_function(waiting)
        Gauge("lorakit_adapters_resident", "Adapters loaded in memory", registry=r).set_function(adapters_resident)
        Gauge("lorakit_adapter_memory_bytes", "Memory held by loaded adapters", registry=r).set_function(adapter_bytes)
        self.requests = Counter("lorakit_requests", "Completion requests answered", ["tenant", "adapter", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens processed", ["tenant", "adapter"],
                                     registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated", ["tenant", "adapter"],
                                         registry=r)
        self.adapter_loads = Counter("lorakit_adapter_loads", "Adapters loaded into memory (first loads and reloads)",
                                     registry=r)
        self.adapter_load_failures = Counter("lorakit_adapter_load_failures",
                                             "Adapter loads refused by the checks (see the server's log)", registry=r)
        self.duration = Histogram("lorakit_request_duration_seconds", "Time from request to its last byte",
                                  buckets=_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("lorakit_time_to_first_token_seconds",
                                             "Time from request to its first generated text", buckets=_BUCKETS,
                                             registry=r)

    def adapter_loaded(self, name: str, ms: float, error: Exception | None) -> None:
        (self.adapter_load_failures if error is not None else self.adapter_loads).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestRecord:
    """What one completion request did, for the metrics and the access log."""

    def __init__(self, metrics: Metrics, route: str) -> None:
        self.metrics, self.route = metrics, route
        self.start = time.monotonic()
        self.tenant, self.adapter = "-", "-"
        self.prompt_tokens = self.completion_tokens = 0
        self.first_token: float | None = None

    def saw_text(self) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
            self.metrics.time_to_first_token.observe(self.first_token - self.start)

    def finish(self, status: int) -> None:
        seconds = time.monotonic() - self.start
        m = self.metrics
        m.requests.labels(self.tenant, self.adapter, str(status)).inc()
        if self.prompt_tokens or self.completion_tokens:
            m.prompt_tokens.labels(self.tenant, self.adapter).inc(self.prompt_tokens)
            m.generation_tokens.labels(self.tenant, self.adapter).inc(self.completion_tokens)
        m.duration.observe(seconds)
        access_log.info(json.dumps({"route": self.route, "tenant": self.tenant, "adapter": self.adapter,
                                    "status": status, "prompt_tokens": self.prompt_tokens,
                                    "completion_tokens": self.completion_tokens,
                                    "latency_ms": round(1000 * seconds, 1)}))
