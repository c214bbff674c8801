"""What the planner is told about a RayCluster, from KubeRay's status."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from rayprism_operator import api, planner, render
from rayprism_operator.observe import failure, is_ready, observe

from . import harness

NOW = datetime(2026, 1, 1, 2, tzinfo=timezone.utc)


def raycluster(head: str, ready_workers: int | None, desired_workers: int | None) -> dict:
    status = {"conditions": [{"type": "HeadPodReady", "status": head}]}
    # KubeRay omits zero counts (omitempty).
    if ready_workers:
        status["readyWorkerReplicas"] = ready_workers
    if desired_workers:
        status["desiredWorkerReplicas"] = desired_workers
    return {"metadata": {"name": "r"}, "status": status}


@pytest.mark.parametrize("head, ready_workers, desired_workers, ready", [
    ("True", 2, 2, True),
    ("True", 1, 2, False),
    ("True", 3, 2, True),  # a surplus worker pod still terminating is counted ready by KubeRay
    ("True", None, None, True),  # no workers wanted, none counted
    ("False", 2, 2, False),
])
def test_ready_needs_the_head_and_at_least_the_desired_workers(head, ready_workers, desired_workers, ready):
    assert is_ready(raycluster(head, ready_workers, desired_workers)) == ready


def _pod(name: str, **status) -> dict:
    return {"metadata": {"name": name}, "status": status}


@pytest.mark.parametrize("raycluster_conditions, pods, expected", [
    ([], [_pod("h", phase="Running")], None),
    ([{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreateHeadPod", "message": "forbidden: PodSecurity"}],
     [], ("FailedCreateHeadPod", "forbidden: PodSecurity")),
    ([], [_pod("w", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": "0/1 nodes are available"}])],
     ("Unschedulable", "pod w: 0/1 nodes are available")),
    ([], [_pod("h", containerStatuses=[{"name": "ray-head", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}])],
     ("ImagePullBackOff", "pod h container ray-head: Back-off pulling image")),
    # Starting is not failing.
    ([], [_pod("h", containerStatuses=[{"name": "ray-head", "state": {"waiting": {"reason": "ContainerCreating"}}}])],
     None),
], ids=["running", "kuberay-replica-failure", "unschedulable", "image-pull", "starting"])
def test_failure_names_kuberays_or_the_pods_reason(raycluster_conditions, pods, expected):
    assert failure({"status": {"conditions": raycluster_conditions}}, pods) == expected


# A replica that served: KubeRay set RayClusterProvisioned once every pod was ready (at PROVISIONED).
PROVISIONED = "2026-01-01T00:00:00Z"
T1, T2 = "2026-01-01T01:00:00Z", "2026-01-01T01:00:05Z"
SERVER_LOG = ("2026-01-01 01:00:04,001 INFO rayprism.server.cli: loading /models/m on 1 worker(s)...\n"
              "2026-01-01 01:00:05,002 ERROR rayprism.server.cli: could not load the model: revision v9 not found\n"
              "2026-01-01 01:00:05,003 INFO rayprism.server.cli: shutting down\n")


def served_once(ready: bool = False, workers: int = 1, annotations: dict | None = None, **meta) -> dict:
    conditions = [{"type": "RayClusterProvisioned", "status": "True", "reason": "AllPodRunningAndReadyFirstTime",
                   "lastTransitionTime": PROVISIONED},
                  {"type": "HeadPodReady", "status": str(ready), "lastTransitionTime": T1}]
    return {"metadata": {"name": "r", "annotations": annotations or {}, **meta},
            "status": {"conditions": conditions, "desiredWorkerReplicas": workers,
                       **({"readyWorkerReplicas": workers} if ready else {})}}


def pod(name: str, node_type: str, ready: bool = True, created: str = "2025-12-31T23:59:00Z",
        containers: list[dict] | None = None, **meta) -> dict:
    container = "ray-head" if node_type == "head" else "ray-worker"
    return {"metadata": {"name": name, "labels": {"ray.io/node-type": node_type}, "creationTimestamp": created, **meta},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}],
                       "containerStatuses": containers if containers is not None else [
                           {"name": container, "ready": ready, "restartCount": 0,
                            "state": {"running": {"startedAt": "2025-12-31T23:59:01Z"}}}]}}


def restarted(name: str, restarts: int, exit_code: int, message: str = "", state: dict | None = None) -> dict:
    terminated = {"exitCode": exit_code, "reason": "Error", "startedAt": T1, "finishedAt": T2,
                  **({"message": message} if message else {})}
    return {"name": name, "ready": False, "restartCount": restarts,
            "state": state or {"running": {"startedAt": T2}}, "lastState": {"terminated": terminated}}

# `ray start --block` once its raylet exited: no error line, so the last line is shown.
RAY_EXIT_LOG = "Some Ray subprocesses exited unexpectedly:\n  raylet [exit code=1]\nRemaining processes will be killed.\n"

CRASH_LOOP = {"waiting": {"reason": "CrashLoopBackOff",
                          "message": "back-off 40s restarting failed container=ray-head pod=r-head_ns(uid)"}}
HEALTHY = [pod("r-head", "head"), pod("r-worker-a", "worker")]


@pytest.mark.parametrize("raycluster, pods, served, expected", [
    (served_once(ready=True), HEALTHY, None, None),
    # A model rank SIGKILLed: the server rebuilds its engine, its head pod is unready meanwhile.
    (served_once(), [pod("r-head", "head", ready=False), pod("r-worker-a", "worker")],
     planner.WeightsReport("v1", "restarting", "a worker died: ActorDiedError", restarts=1),
     ("ReplicaUnhealthy", "pod r-head not ready; its server is restarting the model engine (restart 1): "
                          "a worker died: ActorDiedError")),
    (served_once(), [pod("r-head", "head", ready=False), pod("r-worker-a", "worker")],
     planner.WeightsReport("v1", "failed", "restarting the engine failed: out of memory", restarts=3),
     ("ReplicaUnhealthy", "pod r-head not ready; its server failed: restarting the engine failed: out of memory")),
    # The head's server killed: its container restarts and loads the model again; a signal leaves no reason.
    (served_once(), [pod("r-head", "head", ready=False, containers=[
        restarted("ray-head", 1, 137, "2026-01-01 01:00:04,001 INFO aiohttp.access: GET /health 200\n")]),
                     pod("r-worker-a", "worker")],
     planner.WeightsReport("v1", "loading", restarts=0),
     ("ReplicaUnhealthy", f"pod r-head container ray-head restarted (1 restart; last exit 137 (SIGKILL; Error at {T2})); "
                          "its server is loading the model")),
    # A container that just ended, before the kubelet restarts it.
    (served_once(), [pod("r-head", "head", ready=False, containers=[
        {"name": "ray-head", "ready": False, "restartCount": 0, "state": {"terminated": {
            "exitCode": 1, "reason": "Error", "finishedAt": T2, "message": SERVER_LOG}}}]), pod("r-worker-a", "worker")],
     None,
     ("ReplicaUnhealthy", f"pod r-head container ray-head terminated (0 restarts; exit 1 (Error at {T2}): "
                          "could not load the model: revision v9 not found)")),
    # A worker pod deleted: it goes, KubeRay's replacement starts.
    (served_once(workers=2), [pod("r-head", "head", ready=False), pod("r-worker-a", "worker"),
                              pod("r-worker-b", "worker", ready=False, deletionTimestamp=T1)], None,
     ("ReplicaUnhealthy", "1 of 2 worker pods; pod r-head not ready; pod r-worker-b terminating")),
    (served_once(), [pod("r-head", "head"), pod("r-worker-c", "worker", ready=False, created=T1, containers=[
        {"name": "ray-worker", "ready": False, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}])],
     None, ("ReplicaUnhealthy", f"pod r-worker-c not ready (created {T1}, after the replica was provisioned)")),
    # A head pod deleted: none for a moment; Ray's new GCS then makes the workers' raylets exit.
    (served_once(), [pod("r-worker-a", "worker", ready=False, containers=[restarted("ray-worker", 2, 1, RAY_EXIT_LOG)])],
     None, ("ReplicaUnhealthy", f"no head pod; pod r-worker-a container ray-worker restarted (2 restarts; last exit 1 "
                                f"(Error at {T2}): Remaining processes will be killed.)")),
    # Its head pod deleted, and the new one refused (e.g. a quota), or unschedulable.
    ({**served_once(), "status": {**served_once()["status"], "conditions": served_once()["status"]["conditions"] + [
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreateHeadPod", "message": "exceeded quota"}]}},
     [pod("r-worker-a", "worker", ready=False, containers=[restarted("ray-worker", 1, 168)])], None,
     ("ReplicaUnhealthy", "FailedCreateHeadPod: exceeded quota; no head pod; pod r-worker-a container ray-worker "
                          f"restarted (1 restart; last exit 168 (Error at {T2}))")),  # 128 + a signal with no name
    (served_once(), [pod("r-head", "head", ready=False, created=T1, containers=[]) | {"status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes are available"}]}},
                     pod("r-worker-a", "worker")], None,
     ("ReplicaUnhealthy", "pod r-head Unschedulable: 0/1 nodes are available")),
    # Weights gone after a restart: the server exits 1 on every start.
    (served_once(), [pod("r-head", "head", ready=False, containers=[restarted("ray-head", 5, 1, SERVER_LOG, CRASH_LOOP)]),
                     pod("r-worker-a", "worker")], None,
     ("ReplicaUnhealthy", "pod r-head container ray-head: back-off restarting failed container (5 restarts; last exit 1 "
                          f"(Error at {T2}): could not load the model: revision v9 not found)")),
    (served_once(), [pod("r-head", "head", ready=False, containers=[{"name": "ray-head", "ready": True}]),
                     pod("r-worker-a", "worker")], None,
     ("ReplicaUnhealthy", "pod r-head not ready")),
    # Unready on purpose: loading weights in place, or going away.
    (served_once(annotations={"rayprism.dev/weights-target": "v2"}), [pod("r-head", "head", ready=False)], None, None),
    (served_once(deletionTimestamp=T1), [pod("r-head", "head", ready=False, deletionTimestamp=T1)], None, None),
    # A replica that never served is told by its stuck pod, with why its container fails.
    ({"metadata": {"name": "r"}, "status": {"conditions": [{"type": "HeadPodReady", "status": "False"}]}},
     [pod("r-head", "head", ready=False, containers=[restarted("ray-head", 5, 1, SERVER_LOG, CRASH_LOOP)])], None,
     ("CrashLoopBackOff", "pod r-head container ray-head: back-off restarting failed container (5 restarts; last exit 1 "
                          f"(Error at {T2}): could not load the model: revision v9 not found)")),
], ids=["ready", "engine-restarting", "engine-failed", "head-server-killed", "head-server-exited",
        "worker-pod-deleted", "worker-pod-recreated", "head-pod-deleted", "head-pod-refused",
        "head-pod-unschedulable", "weights-gone", "unready-nothing-else-known",
        "loading-in-place", "terminating", "never-served-crash-loop"])
def test_a_replica_that_served_and_does_not_now_says_what_and_why(raycluster, pods, served, expected):
    assert failure(raycluster, pods, served) == expected


def test_what_the_server_says_of_its_engine_reaches_the_planner():
    report = planner.WeightsReport("v1", "ready", restarts=2)
    replica = observe(served_once(ready=True, annotations={"rayprism.dev/engine-restarts": "1"},
                                  creationTimestamp=PROVISIONED), NOW, pods=HEALTHY, served=report)
    assert (replica.engine_restarts, replica.engine_restarts_seen, replica.failure) == (2, 1, None)
    assert observe(served_once(ready=True), NOW, pods=HEALTHY).engine_restarts is None  # not asked


def test_the_ray_containers_put_their_log_tail_in_their_termination_message():
    infd = api.parse_inference_deployment(harness.deployment() | {"metadata": {"name": "demo", "namespace": "ns"}})
    spec = render.render_raycluster(infd, "rev", "abcde")["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        [container] = group["template"]["spec"]["containers"]
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
