"""Prometheus metrics of the operator, served at /metrics on RAYPRISM_METRICS_PORT (the Helm chart's
ServiceMonitor scrapes it). Without that variable nothing is served."""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()
RECONCILES = Counter("rayprism_operator_reconciles", "Reconciles of InferenceDeployments, by result.",
                     ["result"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram("rayprism_operator_reconcile_seconds", "Duration of one reconcile.",
                              registry=REGISTRY)
DEPLOYMENTS = Gauge("rayprism_operator_deployments", "InferenceDeployments the operator is reconciling.",
                    registry=REGISTRY)
REPLICAS = Gauge("rayprism_operator_replicas", "Replicas (RayClusters) of an InferenceDeployment, by state.",
                 ["namespace", "deployment", "state"], registry=REGISTRY)
WEIGHT_UPDATES = Counter("rayprism_operator_weight_updates", "In-place weight loads, by result.",
                         ["result"], registry=REGISTRY)

REPLICA_STATES = {"total": "replicas", "ready": "readyReplicas", "updated": "updatedReplicas",
                  "available": "availableReplicas"}


def record_status(namespace: str, deployment: str, status: dict) -> None:
    for state, field in REPLICA_STATES.items():
        REPLICAS.labels(namespace, deployment, state).set(status.get(field) or 0)


def forget(namespace: str, deployment: str) -> None:
    for state in REPLICA_STATES:
        try:
            REPLICAS.remove(namespace, deployment, state)
        except KeyError:
            pass  # never recorded


async def serve() -> web.AppRunner | None:
    port = os.environ.get("RAYPRISM_METRICS_PORT")
    if not port:
        return None

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", int(port)).start()
    return runner
