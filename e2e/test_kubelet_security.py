"""Our kubelet runs a `readOnlyRootFilesystem` container as a runtime does: nothing outside its volumes is
writable (no implicit writable /tmp), an emptyDir at /tmp is. In a namespace that enforces Pod Security
`restricted`, with ephemeral-storage requests and limits, emptyDir sizeLimits and no service-account token.

Each pod runs one shell script once (restartPolicy Never): its phase says whether the script succeeded;
its log (a file of our kubelet's, hence this machine's control plane only) says why when it did not.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from e2e.controlplane.cluster import STATE
from e2e.endpoints import kubectl_binary
from e2e.marks import ON_THE_LOCAL_CONTROL_PLANE

pytestmark = ON_THE_LOCAL_CONTROL_PLANE

NAMESPACE = "rayprism-e2e-kubelet-security"
VOLUMES = {"tmp": "/tmp", "cache": "/var/cache/rayprism"}  # as the rendered pods mount them

# Every mount it sees is read-only but its volumes, /proc and /dev (findmnt); nothing outside its volumes
# takes a file: /, /etc, its home and working dir, the checkout standing for the image, the /tmp/ray of
# containers without a read-only root; no service-account token; its volumes take files.
CHECK_MOUNTS = r"""
findmnt -rn -o TARGET,OPTIONS
bad=0
for target in $(findmnt -rn -o TARGET,OPTIONS | awk '$2 ~ /(^|,)rw(,|$)/ {print $1}'); do
  case "$target" in
    /proc|/proc/*|/dev|/dev/*|/tmp|/var/cache/rayprism) ;;
    *) if mountpoint -q "$target"; then echo "writable mount: $target"; bad=1; fi ;;
  esac
done
for file in /rayprism-probe /etc/rayprism-probe "$HOME/rayprism-probe" "$PWD/rayprism-probe" \
    "$(dirname "$(command -v python)")/rayprism-probe" /etc/hosts; do
  if touch "$file" 2>/dev/null; then echo "wrote $file"; bad=1; fi
done
if [ -e /var/run/secrets/kubernetes.io/serviceaccount/token ]; then echo "a token is mounted"; bad=1; fi
touch /tmp/rayprism-probe /var/cache/rayprism/rayprism-probe || bad=1
exit $bad
"""

# name -> (read-only root, volumes, script, expected phase)
PODS = {
    "root-without-volume": (True, [], "touch /rayprism-probe", "Failed"),
    "tmp-without-volume": (True, [], "touch /tmp/rayprism-probe", "Failed"),
    "tmp-volume": (True, ["tmp"], "touch /tmp/rayprism-probe && mkdir /tmp/ray && touch /tmp/ray/probe",
                   "Succeeded"),
    "mounts": (True, ["tmp", "cache"], CHECK_MOUNTS, "Succeeded"),
    # Without a read-only root, today's behaviour: a writable /tmp/ray of the pod's own.
    "writable-root": (False, [], "touch /tmp/ray/rayprism-probe", "Succeeded"),
}


def kubectl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([kubectl_binary(), *args], capture_output=True, text=True, input=input, timeout=120)
    assert not check or out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out


def pod(name: str, read_only_root: bool, volumes: list[str], script: str) -> dict:
    """A pod that Pod Security `restricted` admits, with no service-account token and ephemeral-storage."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": {
        "restartPolicy": "Never", "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "check", "image": "ghcr.io/rayprism/worker:0.1.0", "command": ["/bin/bash", "-c", script],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": read_only_root},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi", "ephemeral-storage": "64Mi"},
                          "limits": {"memory": "128Mi", "ephemeral-storage": "1Gi"}},
            "volumeMounts": [{"name": v, "mountPath": VOLUMES[v]} for v in volumes]}],
        "volumes": [{"name": v, "emptyDir": {"sizeLimit": "512Mi"}} for v in volumes]}}


def container_log(uid: str) -> str:
    """The container's log, where our kubelet keeps it (it moves the file once the pod completed)."""
    for _ in range(10):
        for path in [*(STATE / "kubelet" / "logs").glob(f"*_{uid}/check.log"),
                     STATE / "kubelet" / "pods" / uid / "check.log"]:
            if path.exists():
                return path.read_text(errors="replace")
        time.sleep(0.5)
    return "(no log)"


@pytest.fixture(scope="module")
def completed() -> dict[str, dict]:
    """Every pod of PODS, once completed: name -> its object."""
    kubectl("create", "namespace", NAMESPACE, check=False)
    kubectl("label", "namespace", NAMESPACE, "--overwrite", "pod-security.kubernetes.io/enforce=restricted")
    objects = [pod(name, *spec[:3]) for name, spec in PODS.items()]
    # Refused with a message naming what it lacks if a spec does not meet `restricted`.
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    deadline = time.monotonic() + 120
    while True:
        items = json.loads(kubectl("-n", NAMESPACE, "get", "pods", "-o", "json").stdout)["items"]
        done = {p["metadata"]["name"]: p for p in items if p.get("status", {}).get("phase") in ("Succeeded", "Failed")}
        if len(done) == len(PODS):
            break
        assert time.monotonic() < deadline, f"pods not completed in 120 s: {sorted(set(PODS) - set(done))}"
        time.sleep(1)
    yield done
    kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", PODS)
def test_a_container_writes_where_its_root_filesystem_lets_it(completed, name):
    obj = completed[name]
    expected = PODS[name][3]
    log = container_log(obj["metadata"]["uid"])
    assert obj["status"]["phase"] == expected, f"{name}: {obj['status']['phase']}, not {expected}; its log:\n{log}"
    if expected == "Failed":
        assert "Read-only file system" in log, log


@pytest.mark.timeout(300)
def test_no_token_volume_where_the_pod_opts_out(completed):
    """The ServiceAccount admission plugin adds no kube-api-access volume; the kubelet runs the pod without."""
    for name, obj in completed.items():
        assert not any(v["name"].startswith("kube-api-access") for v in obj["spec"].get("volumes", [])), name
