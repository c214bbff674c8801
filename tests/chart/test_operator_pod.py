"""The operator pod's availability (PodDisruptionBudget, anti-affinity), images by digest, the admin-token key
and the install notes, rendered by helm template with no cluster."""

from __future__ import annotations

import base64
import re

import pytest
import yaml

from rayprism_operator.api import load_inference_deployment

from .test_chart import CHART, NAMESPACE, RELEASE, REPO, _one, _operator_container, _run, helm  # noqa: F401

DIGEST = "sha256:" + "0123456789abcdef" * 4
FULLNAME = f"{RELEASE}-rayprism"
KEY_DIR = "/etc/rayprism/admin-key"


@pytest.fixture
def template(helm, tmp_path):
    def template(values: dict | None = None, *extra: str) -> list[dict]:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values or {}))
        out = _run([helm, "template", RELEASE, CHART, "--namespace", NAMESPACE, "-f", path, *extra])
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    return template


def _pod(objects) -> dict:
    return _one(objects, "Deployment")["spec"]["template"]["spec"]


def _env(objects) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _operator_container(objects)["env"]}


# --- more than one operator pod: a PodDisruptionBudget and spreading over nodes ------------------------------

@pytest.mark.parametrize("replicas", [2, 3])
def test_peers_get_a_disruption_budget_and_spread_over_nodes(template, replicas):
    objects = template({"replicas": replicas})
    pdb = _one(objects, "PodDisruptionBudget")
    deployment = _one(objects, "Deployment")
    assert pdb["metadata"]["namespace"] == NAMESPACE
    # One pod at a time, whatever the count: the others stay to take over.
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    (term,) = _pod(objects)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"] == deployment["spec"]["selector"]
    assert set(_pod(objects)["affinity"]) == {"podAntiAffinity"}


def test_a_lone_operator_has_no_disruption_budget_nor_anti_affinity(template):
    objects = template()
    assert not [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert "affinity" not in _pod(objects)


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_users_affinity_replaces_the_default(template, replicas):
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}]}}}
    assert _pod(template({"replicas": replicas, "affinity": affinity}))["affinity"] == affinity


# --- images by digest ---------------------------------------------------------------------------------------

def test_images_by_tag_default_to_the_app_version(template):
    objects = template({"image": {"tag": "v2"}})
    assert _operator_container(objects)["image"] == "ghcr.io/rayprism/operator:v2"
    assert _env(objects)["RAYPRISM_DEFAULT_WORKER_IMAGE"] == "ghcr.io/rayprism/worker:0.1.0"


def test_a_digest_pins_each_image_and_the_tag_is_ignored(template):
    objects = template({"image": {"repository": "reg.example/op", "tag": "v2", "digest": DIGEST},
                        "defaultWorkerImage": {"repository": "reg.example/w", "tag": "v2", "digest": DIGEST}})
    assert _operator_container(objects)["image"] == f"reg.example/op@{DIGEST}"
    assert _env(objects)["RAYPRISM_DEFAULT_WORKER_IMAGE"] == f"reg.example/w@{DIGEST}"
    # Each digest on its own.
    objects = template({"defaultWorkerImage": {"digest": DIGEST}})
    assert _operator_container(objects)["image"] == "ghcr.io/rayprism/operator:0.1.0"
    assert _env(objects)["RAYPRISM_DEFAULT_WORKER_IMAGE"] == f"ghcr.io/rayprism/worker@{DIGEST}"


# --- the admin-token key ------------------------------------------------------------------------------------

def _key_volume(objects) -> tuple[dict, dict]:
    pod = _pod(objects)
    (mount,) = [m for m in _operator_container(objects)["volumeMounts"] if m["mountPath"] == KEY_DIR]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def test_the_chart_creates_a_random_admin_key_kept_on_uninstall(template):
    objects = template()
    secret = _one(objects, "Secret", f"{FULLNAME}-admin-key")
    assert secret["metadata"]["namespace"] == NAMESPACE
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert secret["immutable"] is True and set(secret["data"]) == {"key"}
    key = base64.b64decode(secret["data"]["key"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{64}", key)
    # Random per render where no Secret exists yet (helm template has no cluster to look one up in).
    assert template()[objects.index(secret)]["data"]["key"] != secret["data"]["key"]


def test_the_operator_reads_the_key_from_a_read_only_file_of_its_group(template):
    objects = template()
    mount, volume = _key_volume(objects)
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == f"{FULLNAME}-admin-key"
    assert volume["secret"]["items"] == [{"key": "key", "path": "key"}]
    assert volume["secret"]["defaultMode"] == 0o440
    # The kubelet gives secret volumes to the pod's fsGroup; the operator runs in that group.
    security = _pod(objects)["securityContext"]
    assert security["fsGroup"] == security["runAsGroup"]
    assert _env(objects)["RAYPRISM_ADMIN_KEY_FILE"] == f"{KEY_DIR}/key"


def test_an_existing_secret_replaces_the_charts_key(template):
    objects = template({"adminKey": {"existingSecret": "my-key"}})
    assert not [o for o in objects if o["kind"] == "Secret"]
    _, volume = _key_volume(objects)
    assert volume["secret"]["secretName"] == "my-key"
    assert _env(objects)["RAYPRISM_ADMIN_KEY_FILE"] == f"{KEY_DIR}/key"


def test_a_release_without_admin_key_values_gets_the_charts_key(helm):
    # What `helm upgrade --reuse-values` hands over from a release of a chart that had no adminKey.
    out = _run([helm, "template", RELEASE, CHART, "--set", "adminKey=null"])
    assert out.returncode == 0, out.stderr
    assert f"secretName: {FULLNAME}-admin-key" in out.stdout and "kind: Secret" in out.stdout


def test_the_key_needs_the_pods_fs_group(helm):
    out = _run([helm, "template", RELEASE, CHART, "--set", "podSecurityContext.fsGroup=null"])
    assert out.returncode != 0 and "podSecurityContext.fsGroup is required" in out.stderr


def test_upgrades_reuse_the_key_in_the_cluster():
    # helm template cannot run lookup against a cluster: check that the template looks the Secret up and
    # takes its key before drawing a new one.
    text = (CHART / "templates" / "admin-key-secret.yaml").read_text()
    assert '$key := dig "data" "key" "" (lookup "v1" "Secret" .Release.Namespace $name)' in text
    assert "key: {{ $key | default (randAlphaNum 64 | b64enc) }}" in text


# --- the notes ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def notes(helm) -> str:
    out = _run([helm, "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client"])
    assert out.returncode == 0, out.stderr
    return out.stdout.split("NOTES:", 1)[1]


def test_notes_point_at_nothing_in_the_repository(notes):
    assert not re.search(r"(examples|charts|crds)/", notes.replace("Helm never upgrades a chart's crds/", ""))
    assert "helm show crds" in notes


def test_notes_carry_the_example_inline(notes, tmp_path):
    manifest = re.search(r"apply -f - <<'EOF'\n(.*?)\n\s*EOF\n", notes, re.S).group(1)
    path = tmp_path / "llama.yaml"
    path.write_text(manifest)
    # Once defaulted, the same InferenceDeployment as examples/llama.yaml.
    assert load_inference_deployment(path) == load_inference_deployment(REPO / "examples" / "llama.yaml")
    assert "kubectl -n default wait --for=condition=Available infd/llama-3-1-8b" in notes
    assert "port-forward svc/llama-3-1-8b 8000:8000" in notes


def test_notes_name_the_admin_key_secret(notes):
    assert f"kubectl -n {NAMESPACE} delete secret {FULLNAME}-admin-key" in notes
