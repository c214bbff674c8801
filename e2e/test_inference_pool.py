"""spec.router.inferencePool on a real API server (issue #20 part 4): first without the InferencePool CRD (the
operator says so in Degraded and still builds the replicas), then with the CRD vendored from its Go module
(tests/schemas/, sigs.k8s.io/gateway-api-inference-extension v1.6.0) installed: the API server accepts the
operator's InferencePool (its schema and CEL rules), whose selector picks exactly the replicas' serving (head)
pods, the same as the Service, and the garbage collector removes it with the InferenceDeployment.

The pods need only exist (selection is by labels), so no replica has to become ready: two small replicas.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from e2e.endpoints import kubectl, wait_until
from e2e.marks import ON_A_CLUSTER

pytestmark = ON_A_CLUSTER

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "tests" / "schemas" / "inference.networking.k8s.io_inferencepools.yaml"
CRD_NAME = "inferencepools.inference.networking.k8s.io"
NAMESPACE = "rayprism-e2e-pool"
NAME = "pooled"


def get(*args: str) -> dict:
    return json.loads(kubectl("-n", NAMESPACE, "get", *args, "-o", "json").stdout)


def degraded() -> dict:
    conditions = get("infd", NAME).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "Degraded"), {})


def pod_names(selector: dict[str, str]) -> set[str]:
    labels = ",".join(f"{k}={v}" for k, v in selector.items())
    return {p["metadata"]["name"] for p in get("pods", "-l", labels)["items"] if not p["metadata"].get("deletionTimestamp")}


@pytest.fixture(scope="module")
def namespace():
    assert kubectl("get", "crd", CRD_NAME, check=False).returncode != 0, "the InferencePool CRD is installed already"
    kubectl("create", "namespace", NAMESPACE, check=False)
    kubectl("label", "namespace", NAMESPACE, "--overwrite", "pod-security.kubernetes.io/enforce=restricted")
    yield
    kubectl("-n", NAMESPACE, "delete", "infd", NAME, "--ignore-not-found", "--wait=true", "--timeout=120s", check=False)
    kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", "--wait=false", check=False)


@pytest.mark.timeout(600)
def test_the_inference_pool_is_accepted_and_selects_exactly_the_serving_pods(namespace):
    manifest = yaml.safe_load((REPO / "examples" / "smollm2-inference-pool.yaml").read_text())
    manifest["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    manifest["spec"]["replicas"] = 2
    manifest["spec"]["resources"].update({"cpu": "250m", "memory": "2Gi", "headCpu": "100m", "headMemory": "1Gi"})
    kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    # Without the CRD: Degraded names it, and the replicas are built all the same.
    reported = wait_until(lambda: degraded().get("reason") == "InferencePoolCRDMissing" and degraded(), 120,
                    "Degraded InferencePoolCRDMissing")
    assert reported["status"] == "True" and "inference.networking.k8s.io_inferencepools.yaml" in reported["message"]
    events = get("events", "--field-selector", f"involvedObject.name={NAME},reason=InferencePoolCRDMissing")
    assert [e["type"] for e in events["items"]] == ["Warning"]
    heads = {"rayprism.dev/deployment": NAME, "ray.io/node-type": "head"}
    workers = {"rayprism.dev/deployment": NAME, "ray.io/node-type": "worker"}
    wait_until(lambda: len(pod_names(heads)) == 2 and len(pod_names(workers)) == 2, 240, "2 head and 2 worker pods")

    # With the CRD: the operator's pool, as the API server stored it.
    kubectl("apply", "--server-side", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    pool = wait_until(lambda: kubectl("-n", NAMESPACE, "get", "inferencepool", NAME, "-o", "json", check=False).stdout,
                120, "the InferencePool")
    pool = json.loads(pool)
    infd = get("infd", NAME)
    assert pool["metadata"]["ownerReferences"] == [{
        "apiVersion": "rayprism.dev/v1alpha1", "kind": "InferenceDeployment", "name": NAME,
        "uid": infd["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {"group": "", "kind": "Service", "name": "smollm2-epp",
                                                 "port": {"number": 9002}, "failureMode": "FailClose"}
    assert pool["spec"]["appProtocol"] == "http"   # the CRD's default, written in by the API server
    service = get("service", NAME)
    assert pool["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    selected = pod_names(pool["spec"]["selector"]["matchLabels"])
    print("the pool selects:", sorted(selected))
    assert selected == pod_names(heads) and len(selected) == 2
    assert not selected & pod_names(workers)
    # Every head is its replica's: one per RayCluster.
    clusters = {p["metadata"]["labels"]["ray.io/cluster"] for p in get("pods", "-l", ",".join(
        f"{k}={v}" for k, v in heads.items()))["items"]}
    assert clusters == {c["metadata"]["name"] for c in get("rayclusters", "-l", f"rayprism.dev/deployment={NAME}")["items"]}
    wait_until(lambda: degraded().get("reason") != "InferencePoolCRDMissing", 60, "Degraded no longer about the CRD")

    # The garbage collector removes it with its owner.
    kubectl("-n", NAMESPACE, "delete", "infd", NAME, "--wait=true", "--timeout=180s")
    wait_until(lambda: not get("inferencepools")["items"], 120, "the InferencePool gone with its owner")
