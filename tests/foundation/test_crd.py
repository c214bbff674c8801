"""The generated CRD: in sync with crds/, structural, complete, and its CEL rules agree with Python."""

import re

import celpy
import kubernetes_validate
import pytest
import yaml

from rayprism_operator import api, render
from rayprism_operator.crd import build_crd, crd_yaml

from .conftest import REPO, with_changes

CRD_FILE = REPO / "crds" / "rayprism.dev_inferencedeployments.yaml"


def _version() -> dict:
    return build_crd()["spec"]["versions"][0]


def _walk(node: dict, path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_crds_folder_is_the_generated_output():
    assert CRD_FILE.read_text() == crd_yaml(), "crds/ drifted from api.py: run `make crd`"


def test_schema_is_structural_and_described():
    root = _version()["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        assert "type" in node, f"{path or '<root>'} has no type"
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "$defs", "title", "const"):
            assert banned not in node, f"{path} carries {banned}"
        if path.count(".") >= 2 and path[-1] not in "]}":  # every field is explained for `kubectl explain`
            assert node.get("description"), f"{path} has no description"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node


def test_defaults_enums_and_bounds_carried_over():
    spec = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["replicas"]["default"] == 1 and spec["replicas"]["minimum"] == 0
    assert spec["rollout"]["properties"]["maxSurge"]["default"] == 0
    assert spec["rollout"]["properties"]["maxUnavailable"]["default"] == 1
    assert spec["rollout"]["properties"]["strategy"]["enum"] == ["RollingUpdate", "Recreate"]
    assert spec["rollout"]["properties"]["weightUpdate"]["enum"] == ["InPlace", "Rolling"]
    assert spec["resources"]["properties"]["gpuResourceName"]["default"] == "nvidia.com/gpu"
    # An omitted block defaults to its fields' defaults (the API server checks a default against the
    # block's CEL rules as written: rollout's rule reads maxSurge).
    assert spec["parallelism"]["default"] == {"tensor": 1, "pipeline": 1}
    assert spec["rollout"]["default"]["maxSurge"] == 0 and spec["rollout"]["default"]["maxUnavailable"] == 1
    assert spec["engine"]["properties"]["kvCacheMemoryFraction"]["maximum"] == 0.99


def test_subresources_and_printer_columns():
    version = _version()
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert version["subresources"]["status"] == {}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == ["Ready", "Desired", "Up-to-date", "TP", "PP", "Revision", "Age"]
    crd = build_crd()
    assert crd["spec"]["names"]["shortNames"] == ["infd"]
    assert crd["metadata"]["name"] == "inferencedeployments.rayprism.dev"


def test_crd_object_validates_against_kubernetes():
    # Raises ValidationError on any problem against the apiextensions.k8s.io/v1 schema.
    kubernetes_validate.validate(yaml.safe_load(crd_yaml()), "1.33", strict=True)


def _cel(rule: str, value, old=None) -> bool:
    env = celpy.Environment()
    bindings = {"self": celpy.json_to_cel(value)}
    if old is not None:
        bindings["oldSelf"] = celpy.json_to_cel(old)
    return bool(env.program(env.compile(rule)).evaluate(bindings))


def _rules_at(node: dict) -> list[dict]:
    return node.get("x-kubernetes-validations", [])


CASES = [
    {},
    {"spec.parallelism.tensor": 16},
    {"spec.parallelism.tensor": 3, "spec.parallelism.pipeline": 3},
    {"spec.parallelism.tensor": 4, "spec.parallelism.pipeline": 4},
    {"spec.parallelism.tensor": 2, "spec.parallelism.pipeline": 5},
    {"spec.resources.gpusPerNode": 0, "spec.parallelism.tensor": 3},
    {"spec.rollout.maxSurge": 0, "spec.rollout.maxUnavailable": 0},
    {"spec.rollout.maxSurge": 1, "spec.rollout.maxUnavailable": 0},
    {"spec.model.uri": "gs://bucket/m"},
    {"spec.model.uri": "pvc://models/llama"},
    {"spec.model.uri": "s3://bucket/llama/{revision}"},
    {"spec.pods.labels": {"team": "search", "example.com/tier": "gold"}},
    {"spec.pods.labels": {"ray.io/cluster": "other"}},
    {"spec.pods.labels": {"rayprism.dev/revision": "x"}},
    {"spec.pods.labels": {"app.kubernetes.io/name": "x"}},
    {"spec.pods.labels": {"app.kubernetes.io/part-of": "search"}},
    {"spec.pods.labels": {"-bad": "x"}},
    {"spec.pods.labels": {"Example.com/a": "x"}},
]


@pytest.mark.parametrize("changes", CASES, ids=[str(c) for c in CASES])
def test_cel_rules_agree_with_python(llama, changes):
    """The API server's verdict (CEL, on the defaulted object) equals the CLI's (pydantic)."""
    manifest = with_changes(llama, **changes)
    schema = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    try:
        api.parse_inference_deployment(manifest)
        python_ok = True
    except api.SpecError:
        python_ok = False
    # Apply defaults as the API server would, without running the Python rules.
    spec = manifest["spec"]
    defaulted = {
        **spec,
        "parallelism": {"tensor": 1, "pipeline": 1, **spec.get("parallelism", {})},
        "resources": {"gpusPerNode": 8, **spec.get("resources", {})},
        "rollout": {"maxSurge": 0, "maxUnavailable": 1, **spec.get("rollout", {})},
    }
    cel_ok = all(_cel(r["rule"], defaulted) for r in _rules_at(schema))
    cel_ok &= all(_cel(r["rule"], defaulted["model"]) for r in _rules_at(schema["properties"]["model"])
                  if "oldSelf" not in r["rule"])
    cel_ok &= all(_cel(r["rule"], defaulted["rollout"]) for r in _rules_at(schema["properties"]["rollout"]))
    cel_ok &= all(_cel(r["rule"], spec.get("pods", {})) for r in _rules_at(schema["properties"]["pods"]))
    assert cel_ok == python_ok


NAMES = ["demo", "a" * 36, "a" * 37, "llama-3-1-8b", "1llama", "Llama", "a.b", "a-", "a_b"]


@pytest.mark.parametrize("name", NAMES)
def test_name_rules_agree_with_python(llama, name):
    """Names KubeRay would refuse for the replica RayClusters are refused by the API server and the CLI alike."""
    rules = _rules_at(_version()["schema"]["openAPIV3Schema"])
    cel_ok = all(_cel(r["rule"], {"metadata": {"name": name}}) for r in rules)
    try:
        api.parse_inference_deployment(with_changes(llama, **{"metadata.name": name}))
        python_ok = True
    except api.SpecError:
        python_ok = False
    assert cel_ok == python_ok == (name in ("demo", "a" * 36, "llama-3-1-8b"))


def test_name_rules_say_the_limit():
    messages = [r["message"] for r in _rules_at(_version()["schema"]["openAPIV3Schema"])]
    assert any("at most 36 characters" in m and "53" in m for m in messages)
    assert any("start with a letter" in m for m in messages)


def test_the_longest_name_makes_replica_names_kuberay_accepts(llama):
    """KubeRay 1.5 to 1.7 refuse RayClusters named over 53 characters or not as DNS-1035 labels."""
    infd = api.parse_inference_deployment(with_changes(llama, **{"metadata.name": "a" * api.MAX_NAME_LENGTH}))
    name = render.render_raycluster(infd, render.revision_hash(infd.spec, render.RenderOptions()),
                                    "z" * 5)["metadata"]["name"]  # the reconciler draws 5-character suffixes
    assert len(name) == 53 and re.fullmatch(api.DNS_1035_LABEL, name)


def test_revision_must_not_be_empty(llama):
    revision = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["model"]["properties"][
        "revision"]
    assert revision["minLength"] == 1
    with pytest.raises(api.SpecError, match="spec.model.revision: String should have at least 1 character"):
        api.parse_inference_deployment(with_changes(llama, **{"spec.model.revision": ""}))


REVISION_CHANGES = [
    # (old uri, old revision, new uri, new revision, allowed)
    ("hf://org/m", "v1", "hf://org/m", "v2", True),  # the hub revision
    ("s3://bucket/m/{revision}", "v1", "s3://bucket/m/{revision}", "v2", True),
    ("file:///models/{revision}", "v1", "file:///models/{revision}", "v2", True),
    ("pvc://claim/m/{revision}", None, "pvc://claim/m/{revision}", "v2", True),
    ("s3://bucket/m", "v1", "s3://bucket/m", "v2", False),  # the same files whatever the revision
    ("pvc://claim/m", "v1", "pvc://claim/m", "v2", False),
    ("file:///models/m", "v1", "file:///models/m", "v2", False),
    ("builtin://smollm2-135m-instruct", "v1", "builtin://smollm2-135m-instruct", "v2", False),
    ("file:///models/m", None, "file:///models/m", "v1", False),
    ("file:///models/m", "v1", "file:///models/m", None, False),
    ("file:///models/m", "v1", "file:///models/m2", "v2", True),  # new files: a new path
    ("file:///models/m", "v1", "file:///models/m", "v1", True),
    ("s3://bucket/m", None, "s3://bucket/m", None, True),
]


@pytest.mark.parametrize("old_uri, old_revision, uri, revision, allowed", REVISION_CHANGES)
def test_revision_changes_only_where_it_selects_the_weights(old_uri, old_revision, uri, revision, allowed):
    model = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["model"]
    [rule] = [r for r in _rules_at(model) if "oldSelf" in r["rule"]]

    def model_of(uri, revision):
        return {"name": "m", "uri": uri, **({"revision": revision} if revision is not None else {})}

    assert _cel(rule["rule"], model_of(uri, revision), old=model_of(old_uri, old_revision)) == allowed
    assert "{revision}" in rule["message"] and "hf://" in rule["message"]


PICKERS = [
    {"name": "epp", "port": {"number": 9002}},
    {"name": "epp"},                                       # a Service needs its port
    {"name": "epp", "kind": "Service"},
    {"name": "epp", "kind": "Gateway", "group": "gateway.example.com"},
    {"name": "epp", "kind": "Gateway", "group": "gateway.example.com", "port": {"number": 1}},
]


@pytest.mark.parametrize("picker", PICKERS, ids=[str(p) for p in PICKERS])
def test_endpoint_picker_rule_agrees_with_python(llama, picker):
    """The InferencePool API's own rule (a Service picker needs its port), refused by our API server and CLI alike
    before the operator renders a pool the InferencePool CRD would refuse."""
    node = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["router"]["properties"][
        "inferencePool"]["properties"]["endpointPickerRef"]
    defaulted = {"kind": "Service", "group": "", "failureMode": "FailClose", **picker}
    cel_ok = all(_cel(r["rule"], defaulted) for r in _rules_at(node))
    try:
        api.parse_inference_deployment(with_changes(llama, **{"spec.router.inferencePool.endpointPickerRef": picker}))
        python_ok = True
    except api.SpecError:
        python_ok = False
    assert cel_ok == python_ok == ("port" in picker or picker.get("kind", "Service") != "Service")
