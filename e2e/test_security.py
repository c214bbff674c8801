"""Hardening on the real control plane: a replica serves in a namespace that enforces Pod Security
`restricted` with read-only root filesystems; Ray's ports refuse a pod without the replica's token; the
NetworkPolicies are what the operator renders and the API server accepts them (nothing enforces them
here: no network plugin runs); the admin API is on its own port, not the Service's; and the operator
used nothing its RBAC does not grant, and was never refused (the API server's audit log).

One InferenceDeployment of its own (examples/smollm2.yaml, CPU only) in its own namespace; run with -x.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from e2e.endpoints import direct_pod_network, kubectl_binary, kubectl_json, openai_base_urls
from e2e.marks import LOCAL_CONTROL_PLANE_ONLY, ON_A_CLUSTER
from rayprism_operator import api, render

pytestmark = ON_A_CLUSTER

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "rayprism-e2e-security"
NAME = "hardened"
OPERATOR_NAMESPACE = os.environ.get("RAYPRISM_E2E_OPERATOR_NAMESPACE", "rayprism-system")
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:rayprism"  # the chart's ServiceAccount
SMALL_RESOURCES = {"cpu": "600m", "memory": "3Gi", "headCpu": "200m", "headMemory": "1536Mi"}
ALLOW_FROM = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}}]


def kubectl(*args: str, input: str | None = None, check: bool = True, timeout: float = 120):
    out = subprocess.run([kubectl_binary(), *args], capture_output=True, text=True, input=input, timeout=timeout)
    assert not check or out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr.strip()}"
    return out


def manifest() -> dict:
    doc = yaml.safe_load((REPO / "examples" / "smollm2.yaml").read_text())
    doc["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    if os.environ.get("RAYPRISM_E2E_SMALL") == "1":
        doc["spec"]["resources"].update(SMALL_RESOURCES)
    doc["spec"]["service"] = {"allowFrom": ALLOW_FROM}
    doc["spec"]["pods"] = {"labels": {"team": "security-e2e"}, "annotations": {"example.com/owner": "e2e"}}
    return doc


@pytest.fixture(scope="module")
def deployment():
    kubectl("create", "namespace", NAMESPACE, check=False)
    kubectl("label", "namespace", NAMESPACE, "--overwrite", "pod-security.kubernetes.io/enforce=restricted")
    kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest()))
    kubectl("-n", NAMESPACE, "wait", "--for=condition=Available", f"infd/{NAME}", "--timeout=1200s", timeout=1260)
    yield kubectl_json(NAMESPACE, "get", "infd", NAME)
    kubectl("-n", NAMESPACE, "delete", "infd", NAME, "--ignore-not-found", "--wait=true", "--timeout=180s",
            check=False, timeout=240)
    kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def replica() -> dict:
    [raycluster] = kubectl_json(NAMESPACE, "get", "rayclusters", "-l", f"rayprism.dev/deployment={NAME}")["items"]
    return raycluster


def model_pods() -> list[dict]:
    return kubectl_json(NAMESPACE, "get", "pods", "-l", f"rayprism.dev/deployment={NAME}")["items"]


@pytest.mark.timeout(1500)
def test_serves_under_restricted_with_read_only_roots(deployment):
    labels = kubectl_json("default", "get", "namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    with openai_base_urls(NAMESPACE, NAME) as next_base_url:
        from openai import OpenAI

        with OpenAI(base_url=next_base_url(), api_key="unused", timeout=120, max_retries=0) as client:
            reply = client.chat.completions.create(model=manifest()["spec"]["model"]["name"], max_tokens=8,
                                                   messages=[{"role": "user", "content": "Hello!"}])
    assert reply.choices[0].message.content.strip()
    pods = model_pods()
    assert {p["metadata"]["labels"]["ray.io/node-type"] for p in pods} == {"head", "worker"}
    for pod in pods:
        spec = pod["spec"]
        assert pod["metadata"]["labels"]["team"] == "security-e2e"
        assert pod["metadata"]["annotations"]["example.com/owner"] == "e2e"
        assert spec["automountServiceAccountToken"] is False
        assert not any("serviceAccountToken" in str(v) for v in spec["volumes"]), "a token volume was mounted"
        # Every container, KubeRay's own wait-gcs-ready included, on a read-only root; the Ray container asks for
        # the disk its emptyDirs may fill (KubeRay gives wait-gcs-ready small resources of its own).
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]
        assert spec["containers"][0]["resources"]["requests"]["ephemeral-storage"]


PROBE = textwrap.dedent("""\
    # From a pod of the same namespace that does not hold the replica's token: what it can do to Ray.
    outcome=0
    expect() {  # expect refused|accepted WHAT COMMAND...
      want=$1 what=$2; shift 2
      if timeout 60 "$@" >/tmp/out 2>&1; then got=accepted; else got=refused; fi
      echo "$what: $got (expected $want): $(tail -c 300 /tmp/out | tr '\\n' ' ')"
      [ "$got" = "$want" ] || outcome=1
    }
    expect refused "GCS, no token" env RAY_AUTH_MODE=disabled ray health-check --address "$HEAD:6379"
    expect refused "GCS, a wrong token" env RAY_AUTH_MODE=token RAY_AUTH_TOKEN=not-the-token \\
      ray health-check --address "$HEAD:6379"
    expect refused "job submission, no token" env RAY_AUTH_MODE=disabled \\
      ray job submit --address "http://$HEAD:8265" --no-wait -- echo pwned
    expect refused "Ray client, a wrong token" env RAY_AUTH_MODE=token RAY_AUTH_TOKEN=not-the-token \\
      python -c "import ray; ray.init('ray://$HEAD:10001')"
    # The control: the same command with the replica's token (from KubeRay's Secret) is let in.
    expect accepted "GCS, the token" env RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$REPLICA_TOKEN" \\
      ray health-check --address "$HEAD:6379"
    exit $outcome
    """)


def probe_pod(head_ip: str, raycluster: dict) -> dict:
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray-probe", "namespace": NAMESPACE},
        "spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "probe", "image": head["image"], "command": ["/bin/bash", "-c", PROBE],
                "env": [{"name": "HEAD", "value": head_ip},
                        # KubeRay's Secret for the RayCluster (authOptions mode token), key auth_token.
                        {"name": "REPLICA_TOKEN", "valueFrom": {"secretKeyRef": {
                            "name": raycluster["metadata"]["name"], "key": "auth_token"}}}],
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                    "readOnlyRootFilesystem": True}}],
            "volumes": [{"name": "tmp", "emptyDir": {}}]}}


def pod_log(pod: dict) -> str:
    out = kubectl("-n", NAMESPACE, "logs", pod["metadata"]["name"], check=False)
    if out.returncode == 0:
        return out.stdout
    # This machine's kubelet has no logs API: it keeps each container's log under its state dir.
    return "\n".join(Path(f).read_text() for f in glob.glob(
        str(REPO / ".cluster" / "kubelet" / "pods" / pod["metadata"]["uid"] / "*.log")))


@pytest.mark.timeout(600)
def test_ray_ports_refuse_a_pod_without_the_token(deployment):
    raycluster = replica()
    head_ip = raycluster["status"]["head"]["podIP"]
    kubectl("apply", "-f", "-", input=json.dumps(probe_pod(head_ip, raycluster)))
    try:
        deadline = time.monotonic() + 420
        while (pod := kubectl_json(NAMESPACE, "get", "pod", "ray-probe"))["status"].get("phase") not in (
                "Succeeded", "Failed"):
            assert time.monotonic() < deadline, f"the probe pod did not finish: {pod['status']}"
            time.sleep(2)
        log = pod_log(pod)
        print(log)
        assert pod["status"]["phase"] == "Succeeded", log
    finally:
        kubectl("-n", NAMESPACE, "delete", "pod", "ray-probe", "--wait=false", check=False)


def test_network_policies_are_rendered_and_accepted(deployment):
    infd = api.parse_inference_deployment({k: deployment[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    stored = {p["metadata"]["name"]: p for p in kubectl_json(
        NAMESPACE, "get", "networkpolicies", "-l", f"rayprism.dev/deployment={NAME}")["items"]}
    name = replica()["metadata"]["name"]
    wanted = [render.render_serving_network_policy(infd, OPERATOR_NAMESPACE),
              render.render_replica_network_policy(infd, name)]
    assert sorted(stored) == sorted(p["metadata"]["name"] for p in wanted)
    for policy in wanted:  # as rendered, after the API server's defaulting
        assert stored[policy["metadata"]["name"]]["spec"] == policy["spec"]


def test_admin_api_is_on_its_own_port(deployment):
    service = kubectl_json(NAMESPACE, "get", "service", NAME)
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    if not direct_pod_network():
        pytest.skip("pod IPs are not routable from here")
    head_ip = replica()["status"]["head"]["podIP"]
    for port, expected in ((render.SERVER_PORT, 404), (render.ADMIN_PORT, 401)):
        try:
            urllib.request.urlopen(f"http://{head_ip}:{port}/admin/v1/weights", timeout=10)
            status = 200
        except urllib.error.HTTPError as e:
            status = e.code
        assert status == expected, f"/admin/v1/weights on port {port}: {status}"


@pytest.mark.timeout(300)
def test_a_typo_in_passed_through_pod_fields_is_named(deployment):
    """spec.pods.affinity passes through as written; the operator creates RayClusters with strict field
    validation, so a field the Pod schema lacks is an error naming it, in Degraded, not silently dropped."""
    typo = manifest()
    typo["metadata"]["name"] = "typo"
    typo["spec"]["pods"] = {"affinity": {"nodeAffinity": {"requiredDuringScheduling": {}}}}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(typo))
    try:
        kubectl("-n", NAMESPACE, "wait", "--for=jsonpath={.status.conditions[?(@.type=='Degraded')].reason}=ApplyFailed",
                "infd/typo", "--timeout=240s", timeout=270)
        degraded = next(c for c in kubectl_json(NAMESPACE, "get", "infd", "typo")["status"]["conditions"]
                        if c["type"] == "Degraded")
        assert "affinity.nodeAffinity.requiredDuringScheduling" in degraded["message"], degraded
        assert not kubectl_json(NAMESPACE, "get", "rayclusters", "-l", "rayprism.dev/deployment=typo")["items"]
    finally:
        kubectl("-n", NAMESPACE, "delete", "infd", "typo", "--ignore-not-found", "--wait=false", check=False)


@LOCAL_CONTROL_PLANE_ONLY  # reads the audit log of this machine's API server
def test_operator_used_only_what_it_is_granted(deployment):
    """Every call of the operator's ServiceAccount in the audit log (this suite's so far) was allowed, and
    RBAC refuses it what it must not do: read Secrets, create pods, touch other kinds."""
    from e2e.controlplane.audit import summarize

    used = summarize(OPERATOR_USER)
    assert used, f"no request of {OPERATOR_USER} in the audit log"
    # Peering (kopf.dev) is granted only while more than one operator pod runs (test_peering), so it is left
    # out here, with its keep-alive from operator pods still stopping after a chart change took peering and
    # its RBAC away, as test_peering's teardown does: refused until the pods exit, within their grace period.
    used = [u for u in used if u.call.api_group != "kopf.dev"]
    refused = [u.to_json() for u in used if u.forbidden]
    assert not refused, refused
    calls = {(u.call.verb, u.call.api_group, u.call.resource) for u in used if u.call.scope != "nonresource"}
    granted = {(verb, group, resource) for rule in kubectl_json("default", "get", "clusterrole", "rayprism")["rules"]
               for verb in rule["verbs"] for group in rule.get("apiGroups", []) for resource in rule["resources"]}
    assert calls <= granted, sorted(calls - granted)
    # What the suite so far never called (some grants serve what a run may not meet, e.g. a drifted Service).
    print("the operator's calls:", sorted(calls), "\ngranted, not called:", sorted(granted - calls))
    for verb, resource in (("get", "secrets"), ("list", "secrets"), ("watch", "secrets"), ("create", "pods"),
                           ("delete", "pods"), ("create", "deployments.apps"), ("update", "services")):
        out = kubectl("auth", "can-i", verb, resource, "-n", NAMESPACE, "--as", OPERATOR_USER, check=False)
        assert out.stdout.strip() == "no", f"the operator may {verb} {resource}"
    out = kubectl("auth", "can-i", "create", "secrets", "-n", NAMESPACE, "--as", OPERATOR_USER, check=False)
    assert out.stdout.strip() == "yes"

