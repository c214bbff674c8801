"""The chart with `watchNamespaces`: the operator gets a Role in each listed namespace and no cluster-wide
rights over InferenceDeployments, and the API server's RBAC authorizer holds it to that. Runs after
test_e2e.py (it re-installs the release with other values, then puts it back cluster-wide).

Needs the release installed by the runner (`rayprism` in `rayprism-system`, as e2e/controlplane/e2e.sh
and e2e/run.sh do) and helm (HELM, else on PATH).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from e2e.endpoints import helm_binary, kubectl_binary
from e2e.marks import ON_A_CLUSTER

pytestmark = ON_A_CLUSTER

REPO = Path(__file__).resolve().parents[1]
RELEASE, RELEASE_NAMESPACE = "rayprism", "rayprism-system"
SERVICE_ACCOUNT = f"system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}"
WATCHED, UNWATCHED = "rayprism-watched", "rayprism-unwatched"


def kubectl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([kubectl_binary(), *args], capture_output=True, text=True, input=input, timeout=120)
    assert not check or out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out


def helm_upgrade(*values: str) -> None:
    out = subprocess.run([helm_binary(), "upgrade", RELEASE, str(REPO / "charts" / "rayprism"), "-n", RELEASE_NAMESPACE,
                          "--reuse-values", *values, "--wait", "--timeout", "5m"],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr


def can_i(verb: str, resource: str, namespace: str | None) -> bool:
    """`resource` may name a subresource: inferencedeployments.rayprism.dev/status."""
    scope = ["-n", namespace] if namespace else ["-A"]
    resource, _, subresource = resource.partition("/")
    sub = ["--subresource", subresource] if subresource else []
    out = kubectl("auth", "can-i", verb, resource, *sub, "--as", SERVICE_ACCOUNT, *scope, check=False)
    return out.stdout.strip() == "yes"


def deployment(namespace: str) -> str:
    """A scaled-to-zero InferenceDeployment: the operator must still write its status, Service and Secret."""
    manifest = yaml.safe_load((REPO / "examples" / "smollm2.yaml").read_text())
    manifest["metadata"] = {"name": "scoped", "namespace": namespace}
    manifest["spec"]["replicas"] = 0
    return yaml.safe_dump(manifest)


def observed(namespace: str) -> int:
    out = kubectl("-n", namespace, "get", "infd", "scoped", "-o", "json")
    return (json.loads(out.stdout).get("status") or {}).get("observedGeneration", 0)


@pytest.fixture(scope="module")
def scoped_release():
    for namespace in (WATCHED, UNWATCHED):
        kubectl("create", "namespace", namespace, check=False)
        kubectl("label", "namespace", namespace, "--overwrite", "pod-security.kubernetes.io/enforce=restricted")
    helm_upgrade("--set", f"watchNamespaces[0]={WATCHED}")
    yield
    helm_upgrade("--set", "watchNamespaces=null")
    for namespace in (WATCHED, UNWATCHED):
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.mark.timeout(600)
def test_operator_acts_only_in_the_watched_namespace(scoped_release):
    # What the authorizer allows the operator's ServiceAccount, from the chart's Role and RoleBinding.
    assert can_i("patch", "inferencedeployments.rayprism.dev/status", WATCHED)
    assert not can_i("patch", "inferencedeployments.rayprism.dev", WATCHED)  # the status only
    assert can_i("create", "rayclusters.ray.io", WATCHED)
    assert not can_i("list", "inferencedeployments.rayprism.dev", None)
    assert not can_i("create", "rayclusters.ray.io", UNWATCHED)

    for namespace in (WATCHED, UNWATCHED):
        kubectl("apply", "-f", "-", input=deployment(namespace))
    deadline = time.monotonic() + 120
    while observed(WATCHED) < 1:
        assert time.monotonic() < deadline, "the operator did not reconcile the watched namespace's deployment"
        time.sleep(1)
    # Its children were created with the Role's rights; the other namespace was never touched.
    service = kubectl("-n", WATCHED, "get", "service", "scoped", "-o", "json")
    assert json.loads(service.stdout)["metadata"]["ownerReferences"][0]["name"] == "scoped"
    assert observed(UNWATCHED) == 0
    assert kubectl("-n", UNWATCHED, "get", "service", "scoped", check=False).returncode != 0
