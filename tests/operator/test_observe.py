"""What the planner is told about a RayCluster, from KubeRay's status."""

from __future__ import annotations

import pytest

from rayprism_operator.reconciler import is_ready


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
