"""values.schema.json refuses misspelt and mistyped values, accepts valid ones; the README lists every value.

helm itself validates (helm template and helm lint --strict), with no cluster and no network.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from .test_chart import CHART, NAMESPACE, RELEASE, _run, helm  # noqa: F401 (helm is a fixture)

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
DIGEST = "sha256:" + "0123456789abcdef" * 4

# --set arguments that must fail, and what helm's message must say (the field, and why).
REFUSED = [
    ("replicass=2", "at '': additional properties 'replicass' not allowed"),
    ("image.tagg=x", "at '/image': additional properties 'tagg' not allowed"),
    ("defaultWorkerImage.pullPolicy=Always", "at '/defaultWorkerImage': additional properties 'pullPolicy'"),
    ("monitoring.servers.podMonitor.enabeld=true", "at '/monitoring/servers/podMonitor': additional properties"),
    ("crds.upgradeJob.resources.limit.cpu=1", "at '/crds/upgradeJob/resources': additional properties 'limit'"),
    ("adminKey.secret=mine", "at '/adminKey': additional properties 'secret' not allowed"),
    ("replicas=two", "at '/replicas': got string, want integer"),
    ("replicas=0", "at '/replicas'"),
    ("logLevel=trace", "at '/logLevel'"),
    ("watchNamespaces={Team_A}", "at '/watchNamespaces/0'"),
    ("image.pullPolicy=Sometimes", "at '/image/pullPolicy': value must be one of"),
    ("image.digest=sha256:abc", "at '/image/digest'"),
    ("image.digest=md5:" + "0" * 64, "at '/image/digest'"),
    ("defaultWorkerImage.digest=" + DIGEST.upper(), "at '/defaultWorkerImage/digest'"),
    ("image.tag=v1@" + DIGEST, "at '/image/tag'"),
    ("imagePullSecrets[0].nam=regcred", "at '/imagePullSecrets/0'"),
    ("imagePullSecrets=regcred", "at '/imagePullSecrets': got string, want array"),
    ("tolerations[0].operator=Maybe", "at '/tolerations/0/operator': value must be one of"),
    ("tolerations[0].tolerationSeconds=soon", "at '/tolerations/0/tolerationSeconds'"),
    ("tolerations[0].keys=gpu", "at '/tolerations/0': additional properties 'keys'"),
    ("affinity.podAntiAffinity.preferred=x", "at '/affinity/podAntiAffinity': additional properties"),
    ("affinity.nodeAfinity.x=1", "at '/affinity': additional properties 'nodeAfinity'"),
    ("nodeSelector.gpu=1", "at '/nodeSelector/gpu': got number, want string"),
    ("podLabels.tier=true", "at '/podLabels/tier': got boolean, want string"),
    ("podSecurityContext.runAsUser=root", "at '/podSecurityContext/runAsUser': got string, want integer"),
    ("podSecurityContext.fsgroup=1000", "at '/podSecurityContext': additional properties 'fsgroup'"),
    ("podSecurityContext.seccompProfile.type=Default", "at '/podSecurityContext/seccompProfile/type'"),
    ("securityContext.readOnlyRootFilesystem=yes", "at '/securityContext/readOnlyRootFilesystem'"),
    ("securityContext.capabilities.drop=ALL", "at '/securityContext/capabilities/drop': got string, want array"),
    ("securityContext.privileges=true", "at '/securityContext': additional properties 'privileges'"),
    ("resources.requests.cpu=lots", "at '/resources/requests/cpu'"),
    ("resources.request.cpu=1", "at '/resources': additional properties 'request'"),
    ("liveness.port=70000", "at '/liveness/port'"),
    ("monitoring.operator.serviceMonitor.interval=often", "at '/monitoring/operator/serviceMonitor/interval'"),
    ("serviceAccount.create=maybe", "at '/serviceAccount/create': got string, want boolean"),
    ("adminKey.existingSecret=My_Key", "at '/adminKey/existingSecret'"),
]

# Values files that must pass: the Kubernetes shapes at their fullest, and the chart's own options.
ACCEPTED = {
    "digests": {"image": {"digest": DIGEST}, "defaultWorkerImage": {"digest": DIGEST, "tag": "0.2.0"}},
    "pull-secrets": {"imagePullSecrets": [{"name": "regcred"}], "image": {"pullPolicy": "Always"}},
    "scheduling": {
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"},
                        {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]},
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 10, "preference": {"matchFields": [
                        {"key": "metadata.name", "operator": "NotIn", "values": ["node-a"]}]}}],
            },
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "topology.kubernetes.io/zone", "matchLabelKeys": ["pod-template-hash"],
                 "labelSelector": {"matchExpressions": [
                     {"key": "app.kubernetes.io/name", "operator": "In", "values": ["rayprism"]}]}}]},
        },
        "priorityClassName": "system-cluster-critical",
        "podLabels": {"team": "ml"},
        "podAnnotations": {"example.com/owner": "ml-platform"},
    },
    "security": {
        "podSecurityContext": {"fsGroup": 2000, "fsGroupChangePolicy": "OnRootMismatch", "supplementalGroups": [3000],
                               "seccompProfile": {"type": "Localhost", "localhostProfile": "operator.json"},
                               "sysctls": [{"name": "net.ipv4.ip_local_port_range", "value": "1024 65535"}]},
        "securityContext": {"capabilities": {"drop": ["ALL"], "add": []}, "privileged": False,
                            "seLinuxOptions": {"level": "s0:c123,c456"}, "procMount": "Default"},
    },
    "resources": {"resources": {"requests": {"cpu": 0.5, "memory": "300Mi", "ephemeral-storage": "1Gi"},
                                "limits": {"cpu": "2", "memory": "1.5Gi"}},
                  "crds": {"upgradeJob": {"enabled": True, "resources": {"limits": {"memory": "128Mi"}}}}},
    "admin-key": {"adminKey": {"existingSecret": "rayprism-admin-key"}},
    # What a parent chart passes to each dependency.
    "subchart-globals": {"global": {"imageRegistry": "reg.example"}},
}


@pytest.mark.parametrize("setting, message", REFUSED, ids=[s for s, _ in REFUSED])
def test_misspelt_or_mistyped_values_fail_naming_the_field(helm, setting, message):
    for command in (["template", RELEASE], ["lint", "--strict"]):
        out = _run([helm, *command, CHART, "--namespace", NAMESPACE, "--set", setting])
        assert out.returncode != 0, f"helm {command[0]} accepted --set {setting}"
        assert message in out.stdout + out.stderr, out.stdout + out.stderr


@pytest.mark.parametrize("name", ACCEPTED)
def test_valid_values_pass(helm, tmp_path, name):
    values = tmp_path / f"{name}.yaml"
    values.write_text(yaml.safe_dump(ACCEPTED[name]))
    for command in (["template", RELEASE], ["lint", "--strict"]):
        out = _run([helm, *command, CHART, "--namespace", NAMESPACE, "-f", values])
        assert out.returncode == 0, out.stdout + out.stderr


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = SCHEMA["definitions"][schema["$ref"].removeprefix("#/definitions/")]
    return schema


def test_every_object_of_the_schema_allows_no_other_key():
    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, where
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}/{i}")
    walk(SCHEMA, "")


def _documented_values() -> dict[str, dict]:
    """{key path: its schema} of values.yaml: a chart-defined object's keys one by one, a Kubernetes shape
    (a $ref to the schema's definitions) or a list or map as a whole."""
    found = {}

    def walk(values: dict, schema: dict, prefix: str):
        for key, value in values.items():
            path, child = f"{prefix}{key}", schema["properties"][key]
            if isinstance(value, dict) and value and "$ref" not in child:
                walk(value, child, f"{path}.")
            else:
                found[path] = _resolve(child)
    walk(VALUES, SCHEMA, "")
    return found


def _readme_table() -> dict[str, str]:
    """{value: type} of the README's values table."""
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Values", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `([\w.]+)` \| ([^|]+) \|", section, re.M)}


def test_readme_lists_every_value_with_its_type():
    table, values = _readme_table(), _documented_values()
    assert sorted(set(values) - set(table)) == [], "values.yaml has values the README's table lacks"
    assert sorted(set(table) - set(values)) == [], "the README's table has values that values.yaml lacks"
    for path, schema in values.items():
        kind = schema.get("type", "string")  # an enum without a type is one of strings
        words = {"array": "list", "object": "object" if "properties" in schema else "map"}
        assert table[path].startswith(words.get(kind, kind)), f"{path}: README says {table[path]}, schema {kind}"
