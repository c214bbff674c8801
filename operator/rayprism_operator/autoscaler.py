"""Autoscaling on load (spec.autoscaling): how many replicas the load needs, as a pure function of metric samples.

The design, after what the ecosystem does: the operator's own loop reads each ready replica's /metrics, as KServe's
KPA and AIBrix's pod autoscaler read their pods, rather than rendering a HorizontalPodAutoscaler. An HPA (or a KEDA
ScaledObject) on vLLM's gauges needs a metrics pipeline (Prometheus and prometheus-adapter, or KEDA and a Prometheus
to query) that most clusters serving a model do not have; the replicas already serve the gauges, and the operator
already reaches every head pod (its admin API) and knows which replicas are ready, starting or draining. It writes
spec.replicas through the /scale subresource, as an HPA does, so that without spec.autoscaling the same /scale is
free for an HPA or a KEDA ScaledObject of the user's. Replicas it adds or removes go the planner's way: the
rollout's surge bounds, and a drain before removal.

The decision is the HPA's (pkg/controller/podautoscaler): for an AverageValue target, desired = ceil(sum of the
metric over the replicas / target), left alone within a 10% tolerance; replicas that report nothing (starting)
count as idle when that would scale up and as at target when it would scale down, so that neither a new replica
nor a missing sample moves the count; then stabilized over the windows of past recommendations (behavior's
stabilizationWindowSeconds: up to the lowest of the up-window, down to the highest of the down-window) and bounded
by minReplicas and maxReplicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families

from .api import Autoscaling

# spec.autoscaling.metric -> the gauge every replica's server exports (worker_image: rayprism.server.metrics)
METRIC_NAMES = {
    "requestsWaiting": "vllm:num_requests_waiting",
    "runningRequestsPerReplica": "vllm:num_requests_running",
    "kvCacheUsage": "vllm:kv_cache_usage_perc",
}
TOLERANCE = 0.1  # the HPA's default --horizontal-pod-autoscaler-tolerance


@dataclass(frozen=True)
class Recommendation:
    at: datetime
    replicas: int


@dataclass(frozen=True)
class Decision:
    replicas: int
    history: tuple[Recommendation, ...]  # kept for the next decision (the stabilization windows)
    recommended: int | None  # what the load alone asks for now, within the bounds (None: no replica reported)
    average: float | None  # the metric's average over the replicas that reported


def metric_value(exposition: str, metric: str) -> float | None:
    """The gauge for `metric` in a Prometheus text exposition, summed over its series (one per served model);
    None when the page lacks it or is no exposition."""
    name = METRIC_NAMES[metric]
    try:
        for family in text_string_to_metric_families(exposition):
            if family.name == name:
                return sum(sample.value for sample in family.samples)
    except ValueError:  # not an exposition (a proxy's error page, say): no sample
        return None
    return None


def recommend(samples: list[float], target: float, current: int) -> int | None:
    """Replicas for the load the ready replicas report (None when none reported), before bounds and windows."""
    if not samples:
        return None
    total, missing = sum(samples), max(0, current - len(samples))
    # Float sums such as 0.1 + 0.2 must not ask for a replica more.
    needed = lambda load: math.ceil(round(load / target, 9))  # noqa: E731
    if total > target * current:  # above target: replicas without a sample serve nothing yet
        return current if total / (target * max(current, 1)) <= 1 + TOLERANCE else needed(total)
    total += target * missing  # below: replicas without a sample count as at target
    return current if current and total / (target * current) >= 1 - TOLERANCE else needed(total)


def decide(autoscaling: Autoscaling, current: int, samples: list[float], history: tuple[Recommendation, ...],
           now: datetime) -> Decision:
    """spec.replicas for `current` replicas whose ready ones reported `samples`, given the recommendations of past
    decisions. With no history (a new deployment, or the operator restarted), the current count stands for the
    past: nothing changes until a window has passed."""
    def bounded(n: int) -> int:
        return max(autoscaling.min_replicas, min(autoscaling.max_replicas, n))

    up_window = timedelta(seconds=autoscaling.scale_up_stabilization_seconds)
    down_window = timedelta(seconds=autoscaling.scale_down_stabilization_seconds)
    history = history or (Recommendation(now, current),)
    raw = recommend(samples, autoscaling.target, current)
    average = sum(samples) / len(samples) if samples else None
    if raw is None:  # nothing to go by: only the bounds apply
        return Decision(bounded(current), history, None, average)
    recommended = bounded(raw)
    up = min([recommended, *(r.replicas for r in history if r.at > now - up_window)])
    down = max([recommended, *(r.replicas for r in history if r.at > now - down_window)])
    kept = tuple(r for r in history if r.at > now - max(up_window, down_window))
    return Decision(bounded(min(max(current, up), down)), (*kept, Recommendation(now, recommended)), recommended,
                    average)
