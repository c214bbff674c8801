"""Prometheus metrics of one server (own registry, so several servers can live in one process).

Every observation is recorded once, under a rayprism_* name; `_VLLMNames` exports the same samples again
under vLLM's names, with a `model_name` label, for dashboards and routers built for vLLM. Of what the
Gateway API Inference Extension's model-server protocol (docs/proposals/003-model-server-protocol) has an
endpoint picker read, we serve TotalQueuedRequests (vllm:num_requests_waiting), TotalRunningRequests
(vllm:num_requests_running), KVCacheUtilization (vllm:kv_cache_usage_perc, 0..1) and the optional BlockSize
and NumGPUBlocks (vllm:cache_config_info's block_size and num_gpu_blocks labels); not the LoRA metrics
(vllm:lora_requests_info: we serve no LoRA adapters). The prefix cache's queries and hits (prompt tokens looked up,
and found cached) are counters: vllm:prefix_cache_queries and vllm:prefix_cache_hits, whose ratio routers read.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FINISH_REASONS = ("stop", "length", "abort", "error")

# engine stats key, rayprism name, vLLM name (or None), help
_ENGINE_GAUGES = (
    ("num_running", "rayprism_requests_running", "vllm:num_requests_running", "Requests the engine is running"),
    ("num_waiting", "rayprism_queue_depth", "vllm:num_requests_waiting", "Requests waiting in the engine's queue"),
    ("kv_cache_usage", "rayprism_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc", "Used share of KV cache blocks"),
    ("num_preemptions", "rayprism_preemptions", None, "Preemptions so far"),
    ("num_steps", "rayprism_engine_steps", None, "Engine steps (forward passes) so far"),
    ("num_prefill_steps", "rayprism_engine_prefill_steps", None,
     "Engine steps that prefilled new requests (alone or with decodes)"),
    ("num_aborted", "rayprism_aborted_requests", None, "Requests aborted so far"),
)
# engine stats key (a running total), rayprism name, vLLM name, help; exported as counters (<name>_total)
_ENGINE_COUNTERS = (
    ("prefix_cache_queries", "rayprism_prefix_cache_queries", "vllm:prefix_cache_queries",
     "Prompt tokens of admitted requests looked up in the prefix cache"),
    ("prefix_cache_hits", "rayprism_prefix_cache_hits", "vllm:prefix_cache_hits",
     "Prompt tokens found in the prefix cache (not computed)"),
)


class Metrics:
    def __init__(self, model_name: str, engine_stats: Callable[[], dict], in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rayprism_requests", "Finished HTTP requests to the OpenAI API",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("rayprism_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("rayprism_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("rayprism_finished_requests", "Requests that reached the engine, by how they ended",
                                ["finished_reason"], registry=r)
        for reason in FINISH_REASONS:   # exported at 0 before the first of each
            self.finished.labels(reason)
        self.engine_restarts = Counter("rayprism_engine_restarts",
                                       "Restarts of the engine (new workers) after it died, failed ones included",
                                       registry=r)
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
        r.register(_EngineGauges(model_name, engine_stats))
        r.register(_VLLMNames(model_name, {
            self.prompt_tokens: "vllm:prompt_tokens", self.generation_tokens: "vllm:generation_tokens",
            self.finished: "vllm:request_success", self.time_to_first_token: "vllm:time_to_first_token_seconds",
            self.inter_token_latency: "vllm:inter_token_latency_seconds",
            self.request_latency: "vllm:e2e_request_latency_seconds"}))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineGauges:
    """The engine's latest stats, read once per scrape, under both names (gauges, and the running totals as
    counters)."""

    def __init__(self, model_name: str, engine_stats: Callable[[], dict]):
        self.model_name, self.engine_stats = model_name, engine_stats

    def collect(self):
        stats = self.engine_stats()
        for key, name, vllm_name, doc in _ENGINE_GAUGES:
            value = float(stats.get(key, 0))
            yield GaugeMetricFamily(name, doc, value=value)
            if vllm_name:
                yield _gauge(vllm_name, doc, {"model_name": self.model_name}, value)
        for key, name, vllm_name, doc in _ENGINE_COUNTERS:
            value = float(stats.get(key, 0))
            yield CounterMetricFamily(name, doc, value=value)
            family = CounterMetricFamily(vllm_name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        if "block_size" in stats:   # known once the engine has reported
            yield _gauge("vllm:cache_config_info", "KV cache configuration (the labels; the value is 1)",
                         {"model_name": self.model_name, "block_size": str(stats["block_size"]),
                          "num_gpu_blocks": str(stats["num_kv_blocks"])}, 1)


def _gauge(name: str, doc: str, labels: dict, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class _VLLMNames:
    """Re-exports recorded metrics under vLLM's names (suffixes such as _total and _bucket kept), labelled with
    the served model name."""

    def __init__(self, model_name: str, names: dict):
        self.model_name, self.names = model_name, names

    def collect(self):
        for metric, name in self.names.items():
            for family in metric.collect():
                renamed = Metric(name, family.documentation, family.type)
                renamed.samples = [sample._replace(name=name + sample.name[len(family.name):],
                                                   labels={"model_name": self.model_name, **sample.labels})
                                   for sample in family.samples]
                yield renamed
