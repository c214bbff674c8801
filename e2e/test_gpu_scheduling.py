"""GPUs are never held twice: a replica counts until its pods are gone, so the real scheduler never leaves a
new replica's pod Pending for a GPU that an old one still holds.

A Node with exactly one `nvidia.com/gpu` (run by our kubelet: only on this machine's control plane, where
RAYPRISM_E2E_LOCAL_KUBELET=1), tainted so that only this test's pods go there; a one-replica deployment
with one GPU per worker pod and `Recreate`; then a change that needs new pods. There is no GPU behind the
resource (the server on the head cannot start on CUDA here and restarts): what is measured is scheduling,
which only needs the pods to exist.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from e2e.endpoints import kubectl
from e2e.marks import ON_THE_LOCAL_CONTROL_PLANE

pytestmark = ON_THE_LOCAL_CONTROL_PLANE

REPO = Path(__file__).resolve().parents[1]
NODE, TAINT = "rayprism-e2e-gpu", "rayprism.dev/e2e-gpu"
NAMESPACE = "rayprism-e2e-gpu"
NAME = "gpus"
RESULTS: dict = {}


@pytest.fixture(scope="module")
def gpu_node():
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {
        "kubernetes.io/hostname": NODE, "rayprism.dev/local-kubelet": "true"}},
        "spec": {"taints": [{"key": TAINT, "value": "true", "effect": "NoSchedule"}]}}
    kubectl("apply", "-f", "-", input=json.dumps(node))
    capacity = {"cpu": "4", "memory": "16Gi", "pods": "20", "nvidia.com/gpu": "1", "ephemeral-storage": "20Gi"}
    kubectl("patch", "node", NODE, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"capacity": capacity, "allocatable": capacity}}))
    kubectl("create", "namespace", NAMESPACE, check=False)
    kubectl("label", "namespace", NAMESPACE, "--overwrite", "pod-security.kubernetes.io/enforce=restricted")
    kubectl("wait", "--for=condition=Ready", f"node/{NODE}", "--timeout=60s")
    yield
    kubectl("-n", NAMESPACE, "delete", "infd", NAME, "--ignore-not-found", "--wait=true", "--timeout=120s", check=False)
    kubectl("delete", "node", NODE, "--ignore-not-found")
    kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def pods() -> list[dict]:
    out = kubectl("-n", NAMESPACE, "get", "pods", "-l", f"rayprism.dev/deployment={NAME}", "-o", "json")
    return json.loads(out.stdout)["items"]


def unschedulable(pod: dict) -> str | None:
    for c in pod.get("status", {}).get("conditions", []):
        if c["type"] == "PodScheduled" and c["status"] == "False":
            return f"{pod['metadata']['name']}: {c.get('reason')}: {c.get('message')}"
    return None


def scheduled_workers() -> set[str]:
    return {p["metadata"]["name"] for p in pods() if p["metadata"]["labels"].get("ray.io/node-type") == "worker"
            and p["spec"].get("nodeName") == NODE and not p["metadata"].get("deletionTimestamp")}


@pytest.mark.timeout(600)
def test_a_replaced_replica_never_waits_for_gpus_an_old_one_holds(gpu_node):
    manifest = yaml.safe_load((REPO / "examples" / "smollm2.yaml").read_text())
    manifest["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    manifest["spec"]["resources"].update({
        "gpusPerNode": 1, "cpu": "500m", "memory": "2Gi", "headCpu": "100m", "headMemory": "1Gi",
        "nodeSelector": {"kubernetes.io/hostname": NODE},
        "tolerations": [{"key": TAINT, "operator": "Exists", "effect": "NoSchedule"}]})
    manifest["spec"]["rollout"] = {"strategy": "Recreate", "maxSurge": 0, "maxUnavailable": 1, "drainSeconds": 5}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    deadline = time.monotonic() + 180
    while not (first := scheduled_workers()):
        assert time.monotonic() < deadline, f"no worker pod scheduled on {NODE}: {[unschedulable(p) for p in pods()]}"
        time.sleep(0.5)

    kubectl("-n", NAMESPACE, "patch", "infd", NAME, "--type=merge", "-p",
            json.dumps({"spec": {"engine": {"maxNumSeqs": manifest["spec"]["engine"]["maxNumSeqs"] + 1}}}))
    pending: list[str] = []
    started, samples = time.monotonic(), 0
    while not (scheduled_workers() - first):
        samples += 1
        pending += [reason for p in pods() if (reason := unschedulable(p))]
        assert time.monotonic() - started < 300, "the new replica's worker pod was not scheduled in 5 minutes"
        time.sleep(0.5)
    RESULTS["gpu_recreate"] = {"seconds_to_new_worker": round(time.monotonic() - started, 1), "samples": samples,
                               "pending_for_gpus": len(set(pending))}
    print(f"GPU node with 1 nvidia.com/gpu, Recreate: {RESULTS['gpu_recreate']}")
    assert not pending, sorted(set(pending))[:3]
