"""What the planner is told about a RayCluster, from KubeRay's status."""

from __future__ import annotations

import pytest

from rayprism_operator import api, render
from rayprism_operator.reconciler import failure, is_ready

from . import harness


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


def test_the_ray_containers_put_their_log_tail_in_their_termination_message():
    infd = api.parse_inference_deployment(harness.deployment() | {"metadata": {"name": "demo", "namespace": "ns"}})
    spec = render.render_raycluster(infd, "rev", "abcde")["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        [container] = group["template"]["spec"]["containers"]
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
