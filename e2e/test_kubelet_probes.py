"""Our kubelet's startup probe, as a kubelet's: the liveness and readiness probes wait until it passes, so a
container slow to start is not restarted by a liveness probe it cannot answer yet (the rendered heads rely
on it: Ray's start and the server's imports take half a minute on a loaded node); one that never starts is
restarted once the startup probe's failureThreshold runs out.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from e2e.endpoints import kubectl_binary
from e2e.marks import ON_THE_LOCAL_CONTROL_PLANE

pytestmark = ON_THE_LOCAL_CONTROL_PLANE

NAMESPACE = "rayprism-e2e-kubelet-probes"
PORT = 8080
# Listens only after 12 s: a liveness probe without the startup probe's wait kills it within 4 s.
SLOW_SERVER = f"sleep 12; exec python -m http.server {PORT} --bind 0.0.0.0 --directory /tmp"
PROBE = {"httpGet": {"path": "/", "port": PORT}, "periodSeconds": 2, "timeoutSeconds": 1}


def kubectl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([kubectl_binary(), *args], capture_output=True, text=True, input=input, timeout=120)
    assert not check or out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out


def pod(name: str, startup_failure_threshold: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": {
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "server", "image": "ghcr.io/rayprism/worker:0.1.0", "command": ["/bin/bash", "-c", SLOW_SERVER],
            "startupProbe": {**PROBE, "failureThreshold": startup_failure_threshold},
            "livenessProbe": {**PROBE, "failureThreshold": 2},
            "readinessProbe": {**PROBE, "failureThreshold": 1}}]}}


@pytest.fixture(scope="module")
def namespace():
    kubectl("create", "namespace", NAMESPACE, check=False)
    yield
    kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def status(name: str) -> dict:
    return json.loads(kubectl("-n", NAMESPACE, "get", "pod", name, "-o", "json").stdout)["status"]


@pytest.mark.timeout(180)
def test_liveness_waits_for_the_startup_probe(namespace):
    kubectl("apply", "-f", "-", input=json.dumps(pod("patient", startup_failure_threshold=15)))
    kubectl("-n", NAMESPACE, "wait", "--for=condition=Ready", "pod/patient", "--timeout=90s")
    [container] = status("patient")["containerStatuses"]
    assert container["started"] is True and container["restartCount"] == 0, container


@pytest.mark.timeout(180)
def test_a_container_that_never_starts_in_time_is_restarted(namespace):
    kubectl("apply", "-f", "-", input=json.dumps(pod("hasty", startup_failure_threshold=2)))
    deadline = time.monotonic() + 90
    while not (containers := status("hasty").get("containerStatuses")) or containers[0]["restartCount"] < 1:
        assert time.monotonic() < deadline, f"not restarted: {containers}"
        time.sleep(1)
    assert containers[0]["started"] is False
