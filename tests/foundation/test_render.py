"""Rendering: topology, labels, ownership, the revision hash, and KubeRay's own schema."""

import functools
import subprocess

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from rayprism_operator import render
from rayprism_operator.api import parse_inference_deployment

from .conftest import REPO, with_changes

KUBERAY_CRD = REPO.parent / "shared" / "kuberay" / "ray.io_rayclusters.yaml"
OPTIONS = render.RenderOptions()


def _infd(manifest):
    infd = parse_inference_deployment(manifest)
    infd.metadata.uid = "0b9d-uid"
    return infd


def _hash(manifest) -> str:
    return render.revision_hash(_infd(manifest).spec, OPTIONS)


@pytest.mark.parametrize("tensor,pipeline,gpus,pods,gpus_per_pod", [
    (1, 1, 8, 1, 1),
    (2, 1, 8, 1, 2),
    (8, 1, 8, 1, 8),
    (2, 4, 8, 1, 8),
    (4, 4, 8, 2, 8),   # two nodes, each with two whole tensor groups
    (8, 2, 8, 2, 8),   # pipeline stages across nodes
    (2, 8, 4, 4, 4),
    (3, 1, 8, 1, 3),
    (2, 3, 8, 1, 6),
    (3, 2, 0, 1, 0),   # CPU: every rank in one worker pod
])
def test_topology(llama, tensor, pipeline, gpus, pods, gpus_per_pod):
    manifest = with_changes(llama, **{"spec.parallelism.tensor": tensor, "spec.parallelism.pipeline": pipeline,
                                      "spec.resources.gpusPerNode": gpus})
    infd = _infd(manifest)
    topo = render.topology(infd.spec)
    assert (topo.pods, topo.gpus_per_pod) == (pods, gpus_per_pod)
    assert topo.ranks == tensor * pipeline
    [group] = render.render_raycluster(infd, "abc", "x")["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == pods
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (str(gpus_per_pod) if gpus_per_pod else None)


def test_gpu_resource_name_is_used(llama):
    infd = _infd(with_changes(llama, **{"spec.resources.gpuResourceName": "amd.com/gpu"}))
    [group] = render.render_raycluster(infd, "abc", "x")["spec"]["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "2"


def test_every_object_is_labelled_and_owned(llama):
    infd = _infd(llama)
    objects = render.render_all(infd, OPTIONS)
    assert [o["kind"] for o in objects] == ["Secret", "Service", *["NetworkPolicy"] * 3, "RayCluster", "RayCluster"]
    for obj in objects:
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/name"] == "rayprism"
        assert meta["labels"]["rayprism.dev/deployment"] == "llama-3-1-8b"
        assert meta["ownerReferences"] == [{
            "apiVersion": "rayprism.dev/v1alpha1", "kind": "InferenceDeployment", "name": "llama-3-1-8b",
            "uid": "0b9d-uid", "controller": True, "blockOwnerDeletion": True,
        }]
    revision = render.revision_hash(infd.spec, OPTIONS)
    for cluster in (o for o in objects if o["kind"] == "RayCluster"):
        assert cluster["metadata"]["labels"]["rayprism.dev/revision"] == revision
        assert cluster["metadata"]["name"].startswith(f"llama-3-1-8b-{revision}-")
        head = cluster["spec"]["headGroupSpec"]["template"]
        assert head["metadata"]["labels"]["rayprism.dev/revision"] == revision


def test_head_runs_ray_then_the_server_without_gpus(llama):
    cluster = render.render_raycluster(_infd(llama), "abc", "x")
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = cluster["spec"]["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    script = container["args"][0]
    assert script.index("KUBERAY_GEN_RAY_START_CMD") < script.index("exec rayprism serve")
    assert "--tensor-parallel-size 2" in script and "--served-model-name meta-llama/Llama-3.1-8B-Instruct" in script
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"name": "http", "containerPort": 8000} in container["ports"]


@pytest.mark.parametrize("quantity,expected", [
    ("16Gi", 16 * 2**30), ("1.5Gi", 3 * 2**29), ("64Mi", 64 * 2**20), ("2Ki", 2048), ("1Ti", 2**40),
    ("10G", 10**10), ("500M", 5 * 10**8), ("3k", 3000), ("1T", 10**12), ("4096", 4096), ("1500m", 1),
])
def test_quantity_bytes(quantity, expected):
    assert render.quantity_bytes(quantity) == expected


@pytest.mark.parametrize("memory,shared,store", [
    ("128Gi", "16Gi", int(16 * 2**30 * 0.8)),   # the llama example: 80% of /dev/shm
    ("4Gi", "1Gi", 858993459),                    # the smollm2 example: 80% of 1Gi
    ("64G", "10G", 8 * 10**9),                    # decimal units
    ("1Gi", "16Gi", 322122547),                   # /dev/shm above memory: Ray's 30% of memory instead
    ("200Mi", "64Mi", 75 * 2**20),                # both smaller than the smallest store Ray accepts
])
def test_worker_object_store_fits_its_shared_memory(llama, memory, shared, store):
    infd = _infd(with_changes(llama, **{"spec.resources.memory": memory, "spec.resources.sharedMemory": shared}))
    cluster = render.render_raycluster(infd, "abc", "x")
    [group] = cluster["spec"]["workerGroupSpecs"]
    assert group["rayStartParams"]["object-store-memory"] == str(store)
    pod = group["template"]["spec"]
    [dshm] = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": shared}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    # The head runs no Ray workers (num-cpus 0): Ray sizes its store, no /dev/shm volume is rendered there.
    head = cluster["spec"]["headGroupSpec"]
    assert "object-store-memory" not in head["rayStartParams"]
    assert "/dev/shm" not in [m["mountPath"] for m in head["template"]["spec"]["containers"][0]["volumeMounts"]]


def _containers(cluster: dict) -> list[dict]:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]


@pytest.mark.parametrize("uri", ["hf://meta-llama/Llama-3.1-8B-Instruct", "s3://bucket/llama"])
def test_pods_meet_pod_security_restricted(llama, uri):
    """What Pod Security `restricted` checks of each pod KubeRay builds from the templates (the e2e suite
    runs them in a namespace that enforces it): non-root, the RuntimeDefault seccomp profile, and in every
    container, init containers included, no capabilities and no privilege escalation. Beyond it: a read-only
    root filesystem (KubeRay's wait-gcs-ready copies the Ray container's securityContext and mounts), every
    writable path a sized emptyDir requested as ephemeral-storage, and no service-account token."""
    infd = _infd(with_changes(llama, **{"spec.model.uri": uri, "spec.resources.cacheStorage": "30Gi",
                                        "spec.resources.tmpStorage": "2Gi"}))
    cluster = render.render_raycluster(infd, "abc", "x")
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        disks = {v["name"]: v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v and not v["emptyDir"].get("medium")}
        assert disks["cache"] == {"sizeLimit": "30Gi"} and disks["tmp"] == {"sizeLimit": "2Gi"}
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], container["name"]
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], container["name"]
        main = pod["containers"][0]
        assert {"name": "cache", "mountPath": render.CACHE_DIR} in main["volumeMounts"]
        assert main["resources"]["requests"]["ephemeral-storage"] == str(32 * 2**30)


def test_ray_needs_its_token_and_keeps_its_dashboard_to_the_pod(llama):
    """KubeRay turns authOptions into RAY_AUTH_MODE/RAY_AUTH_TOKEN (from a Secret it generates) in every Ray
    container; the head publishes GCS, the server and its admin port, and no dashboard or Ray client port."""
    cluster = render.render_raycluster(_infd(llama), "abc", "x")
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    container = head["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"gcs-server": 6379, "http": 8000,
                                                                          "admin": 8001}
    assert "--admin-port 8001" in container["args"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "http"}
    # Liveness waits for the server to listen (minutes of Ray start and imports allowed), not for the model.
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/live", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_network_policies(llama):
    """Ray's ports admit only the replica's own pods; the OpenAI port whom spec.service.allowFrom names (all when
    empty); the admin port the operator's namespace. Checked against the Kubernetes schema; the API server
    of the e2e suite accepts them (no NetworkPolicy controller runs there to enforce them)."""
    allow = [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}, {"ipBlock": {"cidr": "10.0.0.0/8",
                                                                                     "except": ["10.1.0.0/16"]}}]
    infd = _infd(with_changes(llama, **{"spec.service.allowFrom": allow}))
    replica = render.render_replica_network_policy(infd, "llama-3-1-8b-abc-x")
    assert replica["metadata"]["name"] == "llama-3-1-8b-abc-x-ray"
    assert replica["spec"] == {"podSelector": {"matchLabels": {"ray.io/cluster": "llama-3-1-8b-abc-x"}},
                               "policyTypes": ["Ingress"],
                               "ingress": [{"from": [{"podSelector": {"matchLabels": {
                                   "ray.io/cluster": "llama-3-1-8b-abc-x"}}}]}]}
    serving = render.render_serving_network_policy(infd, "rayprism-system")
    assert serving["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert serving["spec"]["ingress"] == [
        {"ports": [{"protocol": "TCP", "port": 8000}], "from": allow},
        {"ports": [{"protocol": "TCP", "port": 8001}],
         "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "rayprism-system"}}}]}]
    open_to_all = render.render_serving_network_policy(_infd(llama), None)
    assert open_to_all["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000}]},
                                              {"ports": [{"protocol": "TCP", "port": 8001}]}]
    for policy in (replica, serving, open_to_all):
        kubernetes_validate.validate(policy, "1.33", strict=True)


def test_admin_token_is_derived_from_the_key_and_the_object(llama):
    infd = _infd(llama)
    token = render.admin_token(b"k" * 32, infd)
    assert token == render.admin_token(b"k" * 32, _infd(llama)) and len(token) == 64
    assert token != render.admin_token(b"j" * 32, infd)
    infd.metadata.uid = "another-uid"  # deleted and created again under the same name
    assert token != render.admin_token(b"k" * 32, infd)


POD_OPTIONS = {
    "spec.pods.labels": {"team": "search", "example.com/tier": "gold"},
    "spec.pods.annotations": {"example.com/owner": "search@example.com"},
    "spec.pods.priorityClassName": "inference-high",
    "spec.pods.affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu.model", "operator": "In", "values": ["H200"]}]}]}}},
    "spec.pods.topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                             "whenUnsatisfiable": "ScheduleAnyway",
                                             "labelSelector": {"matchLabels": {"rayprism.dev/deployment": "x"}}}],
    "spec.pods.imagePullSecrets": [{"name": "registry"}],
    "spec.pods.serviceAccountName": "inference",
    "spec.pods.runtimeClassName": "nvidia",
}


def test_pod_options_reach_every_pod(llama):
    infd = _infd(with_changes(llama, **POD_OPTIONS))
    cluster = render.render_raycluster(infd, "abc", "x")
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        template = group["template"]
        assert template["metadata"]["labels"]["team"] == "search"
        assert template["metadata"]["labels"]["rayprism.dev/revision"] == "abc"
        assert template["metadata"]["annotations"] == {"example.com/owner": "search@example.com"}
        pod = template["spec"]
        assert pod["priorityClassName"] == "inference-high" and pod["runtimeClassName"] == "nvidia"
        assert pod["affinity"] == POD_OPTIONS["spec.pods.affinity"]
        assert pod["topologySpreadConstraints"] == POD_OPTIONS["spec.pods.topologySpreadConstraints"]
        assert pod["imagePullSecrets"] == [{"name": "registry"}] and pod["serviceAccountName"] == "inference"
    assert _hash(with_changes(llama, **POD_OPTIONS)) != _hash(llama)  # new pods carry them


def test_ray_workers_keep_normal_priority(llama):
    for container in _containers(render.render_raycluster(_infd(llama), "abc", "x")):
        assert {"name": "RAY_worker_niceness", "value": "0"} in container["env"]


def test_a_stopping_worker_marks_the_file_its_ranks_report(llama, tmp_path, monkeypatch):
    """The preStop hook, run as rendered (no rank process here, so it does not wait), creates the file that the
    env tells the ranks to look for: the head's server then moves the engine off the pod (worker_image)."""
    assert render.POD_TERMINATING_FILE.startswith(f"{render.TMP_DIR}/")   # the pod's writable /tmp emptyDir
    monkeypatch.setattr(render, "POD_TERMINATING_FILE", str(tmp_path / "terminating"))
    raycluster = render.render_raycluster(_infd(llama), "abc", "x")
    [worker] = raycluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["RAYPRISM_POD_TERMINATING_FILE"] == str(tmp_path / "terminating")
    hook = worker["lifecycle"]["preStop"]["exec"]["command"]
    subprocess.run(hook, check=True, timeout=10)
    assert (tmp_path / "terminating").exists()


@pytest.mark.parametrize("hard", [1024, 4096])
def test_commands_raise_open_files_to_whatever_hard_limit_there_is(llama, hard):
    """Run as rendered, up to the Ray start: no error and the soft limit at the hard one, even below 65536."""
    for container in _containers(render.render_raycluster(_infd(llama), "abc", "x")):
        script = container["args"][0]
        prefix = script[:script.index("ray_start=") if "ray_start=" in script else script.index("exec ")]
        result = subprocess.run(["bash", "-c", f"ulimit -Sn 256; ulimit -Hn {hard}; {prefix} ulimit -Sn"],
                                capture_output=True, text=True, timeout=10)
        assert (result.returncode, result.stderr, result.stdout) == (0, "", f"{hard}\n"), prefix


def test_service_selects_ready_heads_of_every_replica(llama):
    service = render.render_service(_infd(llama))
    assert service["spec"]["selector"] == {
        "app.kubernetes.io/name": "rayprism", "rayprism.dev/deployment": "llama-3-1-8b", "ray.io/node-type": "head"}
    assert "rayprism.dev/revision" not in service["spec"]["selector"]
    assert render.head_pod_selector("llama-3-1-8b") == \
        "app.kubernetes.io/name=rayprism,rayprism.dev/deployment=llama-3-1-8b,ray.io/node-type=head"


@pytest.mark.parametrize("uri,mounted,served", [
    ("pvc://models/llama/v1", "/models/models", "file:///models/models/llama/v1"),
    ("s3://bucket/llama", "/models/s3", "file:///models/s3/bucket/llama"),
])
def test_model_stores_are_mounted(llama, uri, mounted, served):
    cluster = render.render_raycluster(_infd(with_changes(llama, **{"spec.model.uri": uri})), "abc", "x")
    for group in (cluster["spec"]["headGroupSpec"], cluster["spec"]["workerGroupSpecs"][0]):
        pod = group["template"]["spec"]
        assert mounted in [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    assert f"--model {served}" in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["args"][0]


HASH_KEEPING = [
    {"spec.replicas": 7},
    {"spec.rollout.maxSurge": 3},
    {"spec.rollout.strategy": "Recreate"},
    {"spec.service.port": 9000},
    {"spec.service.allowFrom": [{"namespaceSelector": {}}]},
    {"spec.model.revision": "new-weights"},          # InPlace: weights load into running replicas
    {"spec.engine.maxNumSeqs": 256},                  # written out, equal to the default
    {"spec.engine.toolCallParser": "auto"},           # the default: the server's too
    {"spec.rollout.weightUpdate": "Rolling"},         # switching how weights update rolls nothing
    # Rolling: the planner replaces replicas by their weights annotation, not by the hash.
    {"spec.rollout.weightUpdate": "Rolling", "spec.model.revision": "new-weights"},
]
HASH_CHANGING = [
    {"spec.parallelism.tensor": 4},
    {"spec.parallelism.pipeline": 2},
    {"spec.image": "example.com/worker:2"},
    {"spec.engine.maxNumSeqs": 128},
    {"spec.engine.toolCallParser": "hermes"},
    {"spec.resources.memory": "256Gi"},
    {"spec.model.uri": "hf://meta-llama/Llama-3.1-70B-Instruct"},
]


@pytest.mark.parametrize("changes", HASH_KEEPING, ids=[str(c) for c in HASH_KEEPING])
def test_changes_that_keep_the_revision(llama, changes):
    assert _hash(with_changes(llama, **changes)) == _hash(llama)


@pytest.mark.parametrize("changes", HASH_CHANGING, ids=[str(c) for c in HASH_CHANGING])
def test_changes_that_need_new_pods(llama, changes):
    assert _hash(with_changes(llama, **changes)) != _hash(llama)


def test_hash_is_stable_and_label_safe(llama):
    assert _hash(llama) == _hash(llama)
    assert len(_hash(llama)) == 10 and _hash(llama).isalnum()
    assert render.revision_hash(_infd(llama).spec, render.RenderOptions(default_image="other:1")) != _hash(llama)


@pytest.mark.parametrize("parser, flags", [
    (None, []),
    ("auto", []),       # the server's default: the command stays as it was before the field
    ("none", ["--tool-call-parser", "none"]),
    ("hermes", ["--tool-call-parser", "hermes"]),
    ("llama3_json", ["--tool-call-parser", "llama3_json"]),
])
def test_tool_call_parser_reaches_the_server(llama, parser, flags):
    infd = _infd(with_changes(llama, **({"spec.engine.toolCallParser": parser} if parser else {})))
    args = render.serve_args(infd.spec)
    assert args[args.index("--tool-call-parser"):][:2] == flags if flags else "--tool-call-parser" not in args
    head = render.render_raycluster(infd, "abc", "x")["spec"]["headGroupSpec"]["template"]["spec"]
    assert " ".join(flags) in head["containers"][0]["args"][0]


@functools.cache
def _kuberay_schema() -> dict:
    crd = yaml.load(KUBERAY_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _unknown_fields(obj, schema, path=""):
    """Structural schemas prune unknown fields silently: find them instead."""
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key not in schema["properties"]:
                if not schema.get("x-kubernetes-preserve-unknown-fields"):
                    yield f"{path}.{key}"
            else:
                yield from _unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            yield from _unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, value in enumerate(obj):
            yield from _unknown_fields(value, schema["items"], f"{path}[{i}]")


@pytest.mark.skipif(not KUBERAY_CRD.exists(), reason="KubeRay's RayCluster CRD is not beside the repo")
@pytest.mark.parametrize("example,changes", [
    ("llama", {}),
    ("smollm2", {}),
    ("llama", {"spec.model.uri": "pvc://models/llama", "spec.parallelism.tensor": 8, "spec.parallelism.pipeline": 2,
               "spec.resources.tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
               "spec.resources.nodeSelector": {"pool": "h100"}}),
    ("llama", {"spec.model.uri": "s3://bucket/llama/{revision}"}),
    ("llama", POD_OPTIONS),
])
def test_rayclusters_validate_against_kuberay_crd(request, example, changes):
    infd = _infd(with_changes(request.getfixturevalue(example), **changes))
    schema = _kuberay_schema()
    for cluster in (o for o in render.render_all(infd, OPTIONS) if o["kind"] == "RayCluster"):
        jsonschema.validate(cluster, schema)
        assert list(_unknown_fields(cluster, schema)) == []


# The InferencePool CRD, vendored from its Go module (the file's header says which version and file).
INFERENCE_POOL_CRD = REPO / "tests" / "schemas" / "inference.networking.k8s.io_inferencepools.yaml"
PICKER = {"name": "llama-epp", "port": {"number": 9002}}
POOL_CASES = [
    # (changes, endpointPickerRef as rendered: the CRD's defaults written out)
    ({"spec.router.inferencePool.endpointPickerRef": PICKER},
     {"group": "", "kind": "Service", "name": "llama-epp", "port": {"number": 9002}, "failureMode": "FailClose"}),
    ({"spec.router.inferencePool.endpointPickerRef": {**PICKER, "failureMode": "FailOpen"},
      "spec.service.port": 9000, "spec.replicas": 3},
     {"group": "", "kind": "Service", "name": "llama-epp", "port": {"number": 9002}, "failureMode": "FailOpen"}),
    ({"spec.router.inferencePool.endpointPickerRef": {"name": "picker", "kind": "Gateway",
                                                       "group": "gateway.example.com"},
      "spec.pods.labels": {"team": "search"}},
     {"group": "gateway.example.com", "kind": "Gateway", "name": "picker", "failureMode": "FailClose"}),
]


@functools.cache
def _inference_pool_schema() -> dict:
    crd = yaml.safe_load(INFERENCE_POOL_CRD.read_text())
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == ("inference.networking.k8s.io", "InferencePool")
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _cel_rules(obj, schema, path="self"):
    """(path, rule, message, value) of every x-kubernetes-validations rule of the schema that obj reaches."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule["rule"], rule["message"], obj
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key in schema["properties"]:
                yield from _cel_rules(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, value in enumerate(obj):
            yield from _cel_rules(value, schema["items"], f"{path}[{i}]")


@pytest.mark.parametrize("changes,picker", POOL_CASES, ids=[str(c) for c, _ in POOL_CASES])
def test_inference_pool_selects_the_services_pods_on_the_openai_port(llama, changes, picker):
    """The pool holds exactly the Service's pods (every replica's head, of any revision: never a worker, whose
    ray.io/node-type is worker), on the pods' OpenAI port (not the Service's port), with the spec's picker, owned
    like every other child; and the real v1 CRD's schema (structure, and its CEL rules) accepts it."""
    infd = _infd(with_changes(llama, **changes))
    objects = render.render_all(infd, OPTIONS)
    [pool] = [o for o in objects if o["kind"] == "InferencePool"]
    [service] = [o for o in objects if o["kind"] == "Service"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["name"] == "llama-3-1-8b" and pool["metadata"]["namespace"] == infd.metadata.namespace
    assert pool["metadata"]["ownerReferences"] == service["metadata"]["ownerReferences"] == [
        render.owner_reference(infd)]
    assert pool["metadata"]["labels"] == render.selector_labels("llama-3-1-8b")
    assert pool["spec"]["selector"] == {"matchLabels": service["spec"]["selector"]}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == picker
    # Which pods the selector matches: the heads' template labels plus KubeRay's node type.
    selector = pool["spec"]["selector"]["matchLabels"]
    for cluster in (o for o in objects if o["kind"] == "RayCluster"):
        head = cluster["spec"]["headGroupSpec"]["template"]
        assert selector.items() <= {**head["metadata"]["labels"], "ray.io/node-type": "head"}.items()
        assert {"name": "http", "containerPort": 8000} in head["spec"]["containers"][0]["ports"]
        for group in cluster["spec"]["workerGroupSpecs"]:
            labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
            assert not selector.items() <= labels.items()
    schema = _inference_pool_schema()
    jsonschema.validate(pool, schema)
    assert list(_unknown_fields(pool, schema)) == []
    for path, rule, message, value in _cel_rules(pool, schema):
        env = celpy.Environment()
        assert env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(value)}), (path, message)


def test_no_inference_pool_unless_asked(llama):
    infd = _infd(llama)
    assert render.render_inference_pool(infd) is None
    assert "InferencePool" not in [o["kind"] for o in render.render_all(infd, OPTIONS)]


def test_the_inference_pool_rolls_no_replica(llama):
    assert _hash(with_changes(llama, **{"spec.router.inferencePool.endpointPickerRef": PICKER})) == _hash(llama)
