"""spec.scheduling on the real control plane (issue #20 part 3): with Volcano's PodGroup CRD installed (generated from
the Go module volcano.sh/apis, tests/schemas/) and KubeRay's operator restarted with --batch-scheduler=volcano, as
KubeRay's chart starts it with batchScheduler.name=volcano, KubeRay makes one PodGroup per replica whose minMember
is every pod of the replica (head and 3 workers), in the queue and at the priority of the spec, and hands every pod
to Volcano as a member of it. No Volcano scheduler runs: the pods stay Pending, which is what the test needs (a
gang is decided before any pod is bound). KubeRay is restarted without the flag afterwards, and the CRD removed.

This machine's control plane only: KubeRay runs here as a local process (e2e/controlplane/cluster.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e2e.endpoints import kubectl, wait_until
from e2e.marks import ON_THE_LOCAL_CONTROL_PLANE

pytestmark = ON_THE_LOCAL_CONTROL_PLANE

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "tests" / "schemas" / "scheduling.volcano.sh_podgroups.yaml"
CRD_NAME = "podgroups.scheduling.volcano.sh"
NAMESPACE = "rayprism-e2e-gang"
NAME = "gang"
PRIORITY_CLASS = "rayprism-e2e-inference-high"
QUEUE = "inference"
WORKERS = 3  # pipeline 3 on 1-GPU nodes: 3 worker pods per replica (never bound, so no GPU is needed)


def get(*args: str) -> dict:
    return json.loads(kubectl("-n", NAMESPACE, "get", *args, "-o", "json").stdout)


def restart_kuberay(*flags: str) -> None:
    subprocess.run([sys.executable, "-m", "e2e.controlplane.cluster", "restart-kuberay", *flags], cwd=REPO,
                   check=True, timeout=180)


@pytest.fixture(scope="module")
def volcano_kuberay():
    assert kubectl("get", "crd", CRD_NAME, check=False).returncode != 0, "the PodGroup CRD is installed already"
    kubectl("apply", "--server-side", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": PRIORITY_CLASS},
        "value": 100000, "description": "rayprism e2e: gang-scheduled inference"}))
    kubectl("create", "namespace", NAMESPACE, check=False)
    kubectl("label", "namespace", NAMESPACE, "--overwrite", "pod-security.kubernetes.io/enforce=restricted")
    restart_kuberay("--batch-scheduler", "volcano")
    try:
        yield
    finally:
        kubectl("-n", NAMESPACE, "delete", "infd", NAME, "--ignore-not-found", "--wait=true", "--timeout=120s",
                check=False)
        restart_kuberay()  # the rest of the suite runs on the default scheduler
        kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        kubectl("delete", "priorityclass", PRIORITY_CLASS, "--ignore-not-found", check=False)
        kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", "--wait=false", check=False)


@pytest.mark.timeout(300)
def test_kuberay_makes_a_podgroup_of_every_pod_of_each_replica(volcano_kuberay):
    started = time.monotonic()
    manifest = yaml.safe_load((REPO / "examples" / "smollm2-gang-scheduled.yaml").read_text())
    manifest["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    manifest["spec"]["pods"]["priorityClassName"] = PRIORITY_CLASS
    manifest["spec"]["resources"].update({"gpusPerNode": 1, "cpu": "250m", "memory": "2Gi", "headCpu": "100m",
                                          "headMemory": "1Gi"})
    manifest["spec"]["parallelism"] = {"tensor": 1, "pipeline": WORKERS}
    assert manifest["spec"]["scheduling"] == {"batchScheduler": "volcano", "queue": QUEUE}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def replicas_and_pods():
        clusters = get("rayclusters", "-l", f"rayprism.dev/deployment={NAME}")["items"]
        pods = get("pods", "-l", f"rayprism.dev/deployment={NAME}")["items"]
        groups = get("podgroups.scheduling.volcano.sh")["items"]
        if len(clusters) == 2 and len(pods) == 2 * (1 + WORKERS) and len(groups) == 2:
            return clusters, pods, groups
        return None

    clusters, pods, groups = wait_until(replicas_and_pods, 180, f"2 RayClusters, {2 * (1 + WORKERS)} pods, 2 PodGroups")
    by_owner = {g["metadata"]["ownerReferences"][0]["name"]: g for g in groups}
    assert set(by_owner) == {c["metadata"]["name"] for c in clusters}
    for cluster in clusters:
        name = cluster["metadata"]["name"]
        assert cluster["metadata"]["labels"]["ray.io/scheduler-name"] == "volcano"
        group = by_owner[name]
        members = [p for p in pods if p["metadata"]["labels"]["ray.io/cluster"] == name]
        print(f"{group['metadata']['name']}: minMember {group['spec']['minMember']}, queue {group['spec']['queue']}, "
              f"priority {group['spec'].get('priorityClassName')}, pods {len(members)}, "
              f"minResources {group['spec']['minResources']}")
        # minMember covers every pod of the replica: the head and each worker, nothing starts short of all.
        assert group["spec"]["minMember"] == len(members) == 1 + WORKERS
        assert group["spec"]["queue"] == QUEUE
        assert group["spec"]["priorityClassName"] == PRIORITY_CLASS
        assert group["metadata"]["name"] == f"ray-{name}-pg"
        for pod in members:
            assert pod["spec"]["schedulerName"] == "volcano"
            assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == group["metadata"]["name"]
            assert pod["metadata"]["labels"]["volcano.sh/queue-name"] == QUEUE
            assert pod["spec"]["priorityClassName"] == PRIORITY_CLASS
            assert pod["spec"]["priority"] == 100000
            assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")  # Volcano's to bind
    print(f"gang scheduling shown in {time.monotonic() - started:.0f}s")


@pytest.mark.parametrize("scheduling, message", [
    ({"queue": "q"}, "spec.scheduling: Invalid value: scheduling.queue needs scheduling.batchScheduler"),
    ({"batchScheduler": "kai-scheduler"}, "scheduling.queue is required with batchScheduler kai-scheduler"),
    ({"batchScheduler": "slurm"}, "spec.scheduling.batchScheduler: Unsupported value: \"slurm\""),
])
def test_the_api_server_refuses_invalid_scheduling_naming_the_field(scheduling, message):
    manifest = {"apiVersion": "rayprism.dev/v1alpha1", "kind": "InferenceDeployment",
                "metadata": {"name": "invalid", "namespace": "default"},
                "spec": {"model": {"name": "m", "uri": "hf://org/m"}, "scheduling": scheduling}}
    out = kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(manifest), check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr
