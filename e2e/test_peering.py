"""Two operator pods from the chart (`replicas: 2`, kopf peering): only one acts, and when it is deleted in
the middle of a rollout the other takes over and completes it.

Who acts is read from the operator pods' logs, which on this machine's control plane are files the kubelet
writes (no `kubectl logs` here): the test needs RAYPRISM_E2E_LOCAL_KUBELET=1 (make e2e).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from e2e.endpoints import kubectl_binary
from e2e.marks import ON_THE_LOCAL_CONTROL_PLANE
from e2e.test_watch_namespaces import helm_upgrade

pytestmark = ON_THE_LOCAL_CONTROL_PLANE

REPO = Path(__file__).resolve().parents[1]
RELEASE, RELEASE_NAMESPACE = "rayprism", "rayprism-system"
NAMESPACE = "rayprism-e2e-peering"
NAME = "peered"
KUBELET_PODS = REPO / ".cluster" / "kubelet" / "pods"
OPERATIONS = re.compile(r"(Resuming|Pausing) operations")
HANDLED = re.compile(rf"\[{NAMESPACE}/{NAME}\] Handler 'deployment_changed' (?:succeeded|is invoked)")


def kubectl(*args: str, input: str | None = None) -> dict | str:
    out = subprocess.run([kubectl_binary(), *args], capture_output=True, text=True, input=input, timeout=120)
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return json.loads(out.stdout) if "-o" in args and "json" in args else out.stdout


def operator_pods() -> list[dict]:
    pods = kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=operator", "-o", "json")
    return [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")
            and p.get("status", {}).get("phase") == "Running"]


def log(pod: dict) -> str:
    """The operator pod's log (a file the kubelet writes)."""
    path = KUBELET_PODS / pod["metadata"]["uid"] / "operator.log"
    return path.read_text(errors="replace") if path.exists() else ""


def resumed(pod: dict) -> bool:
    """Whether kopf last resumed this pod's operations (a peered pod starts paused)."""
    said = OPERATIONS.findall(log(pod))
    return bool(said) and said[-1] == "Resuming"


def settled(pods: list[dict]) -> bool:
    """Both pods registered in kopf's peering object, and only the one of highest priority resumed."""
    peering = kubectl("get", "clusterkopfpeering", RELEASE, "-o", "json").get("status") or {}
    priority = {p["metadata"]["name"]: max((int(v["priority"]) for k, v in peering.items()
                                            if f"@{p['metadata']['name']}/" in k), default=None) for p in pods}
    if len(pods) != 2 or None in priority.values():
        return False
    leader = max(pods, key=lambda p: priority[p["metadata"]["name"]])
    return all(resumed(p) == (p is leader) for p in pods)


def handled(pod: dict) -> int:
    """How often this operator pod handled the test's InferenceDeployment."""
    return len(HANDLED.findall(log(pod)))


def infd() -> dict:
    return kubectl("-n", NAMESPACE, "get", "infd", NAME, "-o", "json")


def progressing(status: dict) -> str:
    return next((c.get("reason", "") for c in status.get("conditions", []) if c["type"] == "Progressing"), "")


@pytest.fixture(scope="module")
def two_operators():
    subprocess.run([kubectl_binary(), "create", "namespace", NAMESPACE], capture_output=True)
    kubectl("label", "namespace", NAMESPACE, "--overwrite", "pod-security.kubernetes.io/enforce=restricted")
    helm_upgrade("--set", "replicas=2")
    # kopf starts a peered pod paused, resumes it when no peer of higher priority is alive, and pauses it
    # again when one appears: settled when both are in the peering object and only the highest is resumed
    # (a lone resumed pod is not enough: the other may not have registered yet).
    deadline = time.monotonic() + 120
    while not settled(operator_pods()):
        assert time.monotonic() < deadline, "two operator pods did not run and settle their peering"
        time.sleep(1)
    yield
    subprocess.run([kubectl_binary(), "-n", NAMESPACE, "delete", "infd", NAME, "--ignore-not-found",
                    "--wait=true", "--timeout=120s"], capture_output=True)
    helm_upgrade("--set", "replicas=1")
    subprocess.run([kubectl_binary(), "delete", "namespace", NAMESPACE, "--wait=false"], capture_output=True)


@pytest.mark.timeout(900)
def test_one_operator_acts_and_the_other_takes_over_mid_rollout(two_operators):
    manifest = yaml.safe_load((REPO / "examples" / "smollm2.yaml").read_text())
    manifest["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    manifest["spec"]["resources"].update({"cpu": "600m", "memory": "3Gi", "headCpu": "200m", "headMemory": "1536Mi"})
    manifest["spec"]["rollout"] = {"maxSurge": 1, "maxUnavailable": 0, "drainSeconds": 5}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    kubectl("-n", NAMESPACE, "wait", "--for=condition=Available", f"infd/{NAME}", "--timeout=600s")

    pods = operator_pods()
    counts = {p["metadata"]["name"]: handled(p) for p in pods}
    active = [p for p in pods if counts[p["metadata"]["name"]]]
    assert len(active) == 1, f"exactly one operator pod must act: {counts}"
    [leader] = active

    # A rollout (new pods: maxSurge 1 creates the new replica first); the leader goes while it runs.
    generation = kubectl("-n", NAMESPACE, "patch", "infd", NAME, "--type=merge", "-o", "json", "-p",
                         json.dumps({"spec": {"engine": {"maxNumSeqs": 17}}}))["metadata"]["generation"]
    deadline = time.monotonic() + 120
    while progressing(infd().get("status", {})) != "RolloutInProgress":
        assert time.monotonic() < deadline, "the rollout did not start"
        time.sleep(0.5)
    kubectl("-n", RELEASE_NAMESPACE, "delete", "pod", leader["metadata"]["name"], "--wait=false")

    deadline = time.monotonic() + 600
    while True:
        status = infd().get("status", {})
        if status.get("observedGeneration") == generation and progressing(status) == "NewRevisionAvailable":
            break
        assert time.monotonic() < deadline, f"the rollout did not complete after the leader went: {status}"
        time.sleep(1)
    # The standby, or the pod the ReplicaSet started instead of the leader (kopf's priorities decide).
    successors = [p for p in operator_pods() if p["metadata"]["uid"] != leader["metadata"]["uid"]]
    assert any(handled(p) for p in successors), "no other operator pod acted"
    replicas = kubectl("-n", NAMESPACE, "get", "rayclusters", "-l", f"rayprism.dev/deployment={NAME}", "-o", "json")
    names = {rc["metadata"]["name"] for rc in replicas["items"] if not rc["metadata"].get("deletionTimestamp")}
    assert len(names) == 1 and status["readyReplicas"] == 1 and status["updatedReplicas"] == 1, (names, status)
    assert status["updateRevision"] in next(iter(names))
