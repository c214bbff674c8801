"""Prometheus metrics of one server (own registry, so several servers can live in one process)."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict], in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rayprism_requests", "Finished HTTP requests to the OpenAI API",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("rayprism_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("rayprism_generation_tokens", "Generated tokens", registry=r)
        self.time_to_first_token = Histogram("rayprism_time_to_first_token_seconds",
                                             "Request arrival to first generated token", buckets=_LATENCY_BUCKETS,
                                             registry=r)
        self.inter_token_latency = Histogram("rayprism_inter_token_latency_seconds",
                                             "Time between generated tokens of a request",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("rayprism_request_latency_seconds", "Request arrival to last token",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        Gauge("rayprism_requests_in_flight", "Requests admitted by the server and not finished",
              registry=r).set_function(in_flight)
        for key, name, doc in (("num_running", "rayprism_requests_running", "Requests the engine is running"),
                               ("num_waiting", "rayprism_queue_depth", "Requests waiting in the engine's queue"),
                               ("kv_cache_usage", "rayprism_kv_cache_usage_ratio", "Used share of KV cache blocks"),
                               ("num_preemptions", "rayprism_preemptions", "Preemptions so far"),
                               ("num_steps", "rayprism_engine_steps", "Engine steps (forward passes) so far"),
                               ("num_prefill_steps", "rayprism_engine_prefill_steps",
                                "Engine steps that prefilled new requests (alone or with decodes)"),
                               ("num_aborted", "rayprism_aborted_requests", "Requests aborted so far")):
            Gauge(name, doc, registry=r).set_function(lambda key=key: float(engine_stats().get(key, 0)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
