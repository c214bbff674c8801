"""Our kubelet's startup probe, as a kubelet's: the liveness and readiness probes wait until it passes, so a
container slow to start is not restarted by a liveness probe it cannot answer yet (the rendered heads rely
on it: Ray's start and the server's imports take half a minute on a loaded node); one that never starts is
restarted once the startup probe's failureThreshold runs out. And its restarts, as a kubelet's: a container
that fails its liveness probe and ignores SIGTERM is killed after the grace period (exit code 137); one that
exits with an error is restarted at once the first time, then after a back-off, and its terminated state
carries the exit code and (terminationMessagePolicy FallbackToLogsOnError) the end of its log.
"""

from __future__ import annotations

import json
import time

import pytest

from e2e.endpoints import kubectl
from e2e.marks import ON_THE_LOCAL_CONTROL_PLANE

pytestmark = ON_THE_LOCAL_CONTROL_PLANE

NAMESPACE = "rayprism-e2e-kubelet-probes"
PORT = 8080
# Listens only after 12 s: a liveness probe without the startup probe's wait kills it within 4 s.
SLOW_SERVER = f"sleep 12; exec python -m http.server {PORT} --bind 0.0.0.0 --directory /tmp"
PROBE = {"httpGet": {"path": "/", "port": PORT}, "periodSeconds": 2, "timeoutSeconds": 1}


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


def failing_pod(name: str, script: str, **container) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": {
        "terminationGracePeriodSeconds": 2,
        "containers": [{"name": "main", "image": "ghcr.io/rayprism/worker:0.1.0", "command": ["/bin/bash", "-c", script],
                        **container}]}}


def wait_for_restarts(name: str, count: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not (containers := status(name).get("containerStatuses")) or containers[0]["restartCount"] < count:
        assert time.monotonic() < deadline, f"{name}: not restarted {count} time(s) in {timeout}s: {containers}"
        time.sleep(0.5)
    return containers[0]


@pytest.mark.timeout(120)
def test_a_container_that_ignores_sigterm_after_a_failed_liveness_probe_is_killed(namespace):
    # Nothing listens on PORT: the liveness probe fails twice (4 s); SIGTERM is ignored; SIGKILL 2 s later.
    kubectl("apply", "-f", "-", input=json.dumps(failing_pod(
        "stubborn", "trap '' TERM; while true; do sleep 1; done",
        livenessProbe={**PROBE, "failureThreshold": 2})))
    container = wait_for_restarts("stubborn", 1, timeout=60)
    assert container["lastState"]["terminated"]["exitCode"] == 128 + 9, container


@pytest.mark.timeout(120)
def test_a_failed_container_restarts_at_once_then_backs_off_and_says_why(namespace):
    kubectl("apply", "-f", "-", input=json.dumps(failing_pod(
        "failing", "echo starting; echo 'could not load the model: revision v9 not found' >&2; exit 3",
        terminationMessagePolicy="FallbackToLogsOnError")))
    container = wait_for_restarts("failing", 1, timeout=30)   # the first restart comes at once
    deadline = time.monotonic() + 30
    while (state := container["state"]).get("waiting", {}).get("reason") != "CrashLoopBackOff":
        assert time.monotonic() < deadline, f"no back-off after the second exit: {container}"
        time.sleep(0.5)
        container = status("failing")["containerStatuses"][0]
    terminated = container["lastState"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error", terminated
    # This run's output only (the log file holds both runs).
    assert terminated["message"] == "starting\ncould not load the model: revision v9 not found", terminated
    assert container["restartCount"] == 1 and "10s" in state["waiting"]["message"], container
