"""The operator's autoscaling loop against kmock's emulator: it reads the gauge from each ready replica's /metrics
(a stand-in server on the OpenAI port of every head pod IP) and writes spec.replicas through the /scale
subresource, nothing else of the spec; the planner then adds or removes the replicas."""

from __future__ import annotations

import pytest
from aiohttp import web

from rayprism_operator import render

from .harness import IDEP_PATH, OperatorThread, deployment, wait_for

ADDRESSES = [f"127.0.9.{i}" for i in range(1, 6)]


class FakeServers:
    """/metrics of the replicas' servers, one loopback address per head pod IP; `running` is what each says."""

    def __init__(self) -> None:
        self.free = list(ADDRESSES)
        self.running: dict[str, float] = {}
        self._runner: web.AppRunner | None = None

    def start_replica(self, raycluster: dict) -> str:
        address = self.free.pop(0)
        self.running[address] = 0
        return address

    async def _metrics(self, request: web.Request) -> web.Response:
        value = self.running[request.transport.get_extra_info("sockname")[0]]
        return web.Response(text="# HELP vllm:num_requests_running Requests the engine is running\n"
                                 "# TYPE vllm:num_requests_running gauge\n"
                                 f'vllm:num_requests_running{{model_name="smol"}} {value}\n')

    async def __aenter__(self) -> "FakeServers":
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        for address in self.free:
            await web.TCPSite(self._runner, address, render.SERVER_PORT).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()


@pytest.fixture
async def autoscaled(k8s, kuberay, monkeypatch):
    monkeypatch.setenv("RAYPRISM_AUTOSCALE_SECONDS", "0.2")
    writes = []  # (subresource, body) of every write to the InferenceDeployment
    k8s.admission = lambda request: writes.append((request.subresource, request.data)) if (
        request.resource and request.resource.plural == "inferencedeployments"
        and request.method in ("PATCH", "PUT")) else None
    async with FakeServers() as servers:
        kuberay.assign_pod_ip = servers.start_replica
        op = OperatorThread()
        await op.start()
        try:
            yield servers, writes
        finally:
            await op.stop()


def spec_replicas(k8s) -> int:
    return k8s.deployment("demo")["spec"]["replicas"]


async def test_load_raises_and_idle_lowers_the_replicas_through_scale(k8s, autoscaled):
    servers, writes = autoscaled
    autoscaling = {"minReplicas": 1, "maxReplicas": 3, "metric": "runningRequestsPerReplica", "target": 2,
                   "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 0}
    await k8s.post(IDEP_PATH, json=deployment(replicas=1, autoscaling=autoscaling))
    await wait_for(lambda: len(k8s.replicas("demo")) == 1 and servers.running, what="the first replica")

    servers.running[ADDRESSES[0]] = 5  # ceil(5 / 2) = 3
    await wait_for(lambda: spec_replicas(k8s) == 3, what="spec.replicas 3 under load")
    # Seen ready by the operator (its status), so that all three report when the load goes.
    await wait_for(lambda: (k8s.deployment("demo").get("status") or {}).get("readyReplicas") == 3,
                   what="3 ready replicas")
    for address in ADDRESSES[:3]:
        servers.running[address] = 0
    await wait_for(lambda: spec_replicas(k8s) == 1, what="spec.replicas 1 when idle")
    await wait_for(lambda: len(k8s.replicas("demo")) == 1, what="the other replicas removed")

    assert [body["spec"] for subresource, body in writes if subresource == "scale"] == [{"replicas": 3},
                                                                                          {"replicas": 1}]
    # Nothing else of the spec is written: only /scale and /status.
    assert {subresource for subresource, _ in writes} <= {"scale", "status"}
    messages = [e["message"] for e in k8s.events("Autoscaled")]
    assert messages == ["Scaled from 1 to 3 replicas: runningRequestsPerReplica 5.00 per ready replica (1 reporting), "
                        "target 2",
                        "Scaled from 3 to 1 replicas: runningRequestsPerReplica 0.00 per ready replica (3 reporting), "
                        "target 2"]


async def test_without_autoscaling_the_operator_never_writes_scale(k8s, autoscaled):
    servers, writes = autoscaled
    await k8s.post(IDEP_PATH, json=deployment(replicas=1))
    await wait_for(lambda: len(k8s.replicas("demo")) == 1 and servers.running, what="the replica")
    servers.running[ADDRESSES[0]] = 50
    # kubectl scale, an HPA or KEDA drive /scale instead: the operator follows, and never writes it back.
    await k8s.patch(f"{IDEP_PATH}/demo/scale", json={"spec": {"replicas": 2}})
    await wait_for(lambda: len(k8s.replicas("demo")) == 2, what="2 replicas after the user's scale")
    assert spec_replicas(k8s) == 2
    assert [body["spec"] for subresource, body in writes if subresource == "scale"] == [{"replicas": 2}]
