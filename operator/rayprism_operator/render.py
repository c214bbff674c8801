"""Pure functions from an InferenceDeployment to the Kubernetes objects that serve it.

One function per object, in the manner of KubeRay's builders: no I/O, no clock, no randomness, so the
operator, `rayprism render` and the tests all see the same objects for the same input.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import shlex
from dataclasses import dataclass
from decimal import Decimal

from . import api
from .api import InferenceDeployment, InferenceDeploymentSpec

DEFAULT_WORKER_IMAGE = "ghcr.io/rayprism/worker:0.1.0"
RAY_VERSION = "2.60.0"
SERVER_PORT = 8000
ADMIN_PORT = 8001  # the admin API's own port: the user-facing Service does not expose it
GCS_PORT = 6379

LABEL_NAME = "app.kubernetes.io/name"
LABEL_DEPLOYMENT = f"{api.GROUP}/deployment"
LABEL_REVISION = f"{api.GROUP}/revision"
ANNOTATION_WEIGHTS_REVISION = f"{api.GROUP}/weights-revision"
KUBERAY_NODE_TYPE = "ray.io/node-type"
KUBERAY_OVERWRITE_CMD = "ray.io/overwrite-container-cmd"

ADMIN_TOKEN_DIR = "/etc/rayprism/admin"
ADMIN_TOKEN_KEY = "token"
CACHE_DIR = "/var/cache/rayprism"
TMP_DIR = "/tmp"  # Ray's session dir (/tmp/ray) is in it
# A worker pod's preStop hook creates it; the pod's ranks report it, and the head's server drains and moves
# the engine off that pod before the ranks go (worker_image: rayprism.executor.worker).
POD_TERMINATING_FILE = f"{TMP_DIR}/rayprism-pod-terminating"
MODELS_DIR = "/models"
WORKER_GROUP = "workers"
# Ray's object store in a worker pod: Ray's own default share of the pod's memory, but within this share
# of /dev/shm (left to itself Ray takes up to 95% of it, leaving NCCL too little), and never below the
# smallest store Ray accepts (its ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES).
OBJECT_STORE_SHM_FRACTION = Decimal("0.8")
OBJECT_STORE_MEMORY_FRACTION = Decimal("0.3")
OBJECT_STORE_MIN_BYTES = 75 * 2**20
# The open-files soft limit raised to the hard limit, whatever the runtime set it to: a fixed number can
# exceed the hard limit, and then `ulimit` fails.
RAISE_OPEN_FILES = 'ulimit -n "$(ulimit -Hn)"; '


@dataclass(frozen=True)
class RenderOptions:
    """Operator-wide settings (Helm values) that shape what is rendered."""

    default_image: str = DEFAULT_WORKER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    s3_sync_image: str = "amazon/aws-cli:2.22.35"
    # Where the operator runs: the only namespace the replicas' admin port admits (None: any, token only).
    operator_namespace: str | None = None


@dataclass(frozen=True)
class Topology:
    """How one replica's ranks map to worker pods."""

    ranks: int
    pods: int
    gpus_per_pod: int  # 0 on CPU-only replicas
    ranks_per_pod: int


_QUANTITY_UNITS = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                   "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity of the forms api.QUANTITY admits ("16Gi", "1.5G", "500M") in whole bytes."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    return int(Decimal(number) * _QUANTITY_UNITS[unit])


def object_store_bytes(spec: InferenceDeploymentSpec) -> int:
    """`ray start --object-store-memory` of the worker pods (see OBJECT_STORE_SHM_FRACTION)."""
    resources = spec.resources
    return max(OBJECT_STORE_MIN_BYTES, int(min(quantity_bytes(resources.shared_memory) * OBJECT_STORE_SHM_FRACTION,
                                               quantity_bytes(resources.memory) * OBJECT_STORE_MEMORY_FRACTION)))


def topology(spec: InferenceDeploymentSpec) -> Topology:
    ranks = spec.parallelism.tensor * spec.parallelism.pipeline
    gpus = spec.resources.gpus_per_node
    if gpus == 0:
        return Topology(ranks=ranks, pods=1, gpus_per_pod=0, ranks_per_pod=ranks)
    per_pod = min(ranks, gpus)
    return Topology(ranks=ranks, pods=math.ceil(ranks / per_pod), gpus_per_pod=per_pod, ranks_per_pod=per_pod)


def image(spec: InferenceDeploymentSpec, options: RenderOptions) -> str:
    return spec.image or options.default_image


def revision_hash(spec: InferenceDeploymentSpec, options: RenderOptions) -> str:
    """Stable hash of everything that needs new pods.

    Left out: replicas, autoscaling, rollout settings, the Service, the router, and model.revision: each replica
    records the weights it serves (ANNOTATION_WEIGHTS_REVISION), and the planner loads or replaces by that, so
    that switching rollout.weightUpdate rolls nothing. Fields equal to their defaults are left out too, so a new
    optional field does not roll every replica.
    """
    fields = spec.model_dump(mode="json", by_alias=True, exclude_defaults=True,
                             exclude={"replicas": True, "autoscaling": True, "rollout": True, "service": True,
                                      "image": True, "router": True, "model": {"revision"}})
    fields["image"] = image(spec, options)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return digest[:10]


def replica_name(deployment: str, revision: str, suffix: str) -> str:
    return f"{deployment}-{revision}-{suffix}"


def selector_labels(deployment: str) -> dict[str, str]:
    return {LABEL_NAME: "rayprism", LABEL_DEPLOYMENT: deployment}


def labels(deployment: str, revision: str) -> dict[str, str]:
    return {**selector_labels(deployment), LABEL_REVISION: revision}


def serving_pod_labels(deployment: str) -> dict[str, str]:
    """The serving pods: every replica's head (KubeRay labels it ray.io/node-type=head; workers carry worker),
    of every revision. The Service, the serving NetworkPolicy and the InferencePool all select by these."""
    return {**selector_labels(deployment), KUBERAY_NODE_TYPE: "head"}


def head_pod_selector(deployment: str) -> str:
    """status.selector: the head pods of every replica (one per replica, for the HPA)."""
    return ",".join(f"{k}={v}" for k, v in serving_pod_labels(deployment).items())


def owner_reference(infd: InferenceDeployment) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": infd.metadata.name,
        "uid": infd.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def admin_secret_name(deployment: str) -> str:
    return f"{deployment}-admin"


def service_name(deployment: str) -> str:
    return deployment


def head_service_url(replica: str, namespace: str) -> str:
    """KubeRay's per-replica head Service, where the operator reaches the admin API."""
    return f"http://{replica}-head-svc.{namespace}.svc:{ADMIN_PORT}"


def endpoint_url(infd: InferenceDeployment) -> str:
    spec = infd.spec
    return f"http://{service_name(infd.metadata.name)}.{infd.metadata.namespace}.svc:{spec.service.port}/v1"


def served_model_uri(uri: str) -> str:
    """The URI as the pods see it: claims are mounted, S3 objects synced, the rest passed through."""
    scheme, _, rest = uri.partition("://")
    if scheme == "pvc":
        return f"file://{MODELS_DIR}/{rest}"
    if scheme == "s3":
        return f"file://{MODELS_DIR}/s3/{rest}"
    return uri


def serve_args(spec: InferenceDeploymentSpec) -> list[str]:
    """The `rayprism serve` flags for a spec: what the head pod runs and what `rayprism run` runs."""
    model, engine = spec.model, spec.engine
    args = [
        "--model", served_model_uri(model.uri),
        "--served-model-name", model.name,
        "--dtype", model.dtype,
        "--device", "cpu" if spec.resources.gpus_per_node == 0 else "cuda",
        "--tensor-parallel-size", str(spec.parallelism.tensor),
        "--pipeline-parallel-size", str(spec.parallelism.pipeline),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--max-num-batched-tokens", str(engine.max_num_batched_tokens),
        "--kv-cache-memory-fraction", str(engine.kv_cache_memory_fraction),
        "--max-queue-size", str(engine.max_queue_size),
        "--port", str(SERVER_PORT),
        "--admin-port", str(ADMIN_PORT),
        "--drain-seconds", str(spec.rollout.drain_seconds),
    ]
    if model.revision:
        args += ["--model-revision", model.revision]
    if model.tokenizer:
        args += ["--tokenizer", served_model_uri(model.tokenizer)]
    if engine.max_model_len:
        args += ["--max-model-len", str(engine.max_model_len)]
    if engine.enforce_eager:
        args.append("--enforce-eager")
    if not engine.enable_prefix_caching:
        args.append("--no-enable-prefix-caching")
    if engine.quantization != "none":
        args += ["--quantization", engine.quantization]
    if engine.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", engine.kv_cache_dtype]
    if engine.tool_call_parser != "auto":    # the server's default: unchanged commands for specs without it
        args += ["--tool-call-parser", engine.tool_call_parser]
    return args


def _volumes_and_mounts(spec: InferenceDeploymentSpec, admin_secret: str | None) -> tuple[list[dict], list[dict]]:
    """Volumes of a head pod (admin_secret given) or of a worker pod (None). The root filesystem is read-only:
    what a pod writes goes to these (see ephemeral_storage_bytes)."""
    resources = spec.resources
    volumes = [{"name": "cache", "emptyDir": {"sizeLimit": resources.cache_storage}},
               {"name": "tmp", "emptyDir": {"sizeLimit": resources.tmp_storage}}]
    mounts = [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": TMP_DIR}]
    if admin_secret:
        volumes.append({"name": "admin-token", "secret": {"secretName": admin_secret, "defaultMode": 0o440}})
        mounts.append({"name": "admin-token", "mountPath": ADMIN_TOKEN_DIR, "readOnly": True})
    else:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    for uri in filter(None, (spec.model.uri, spec.model.tokenizer)):
        scheme, _, rest = uri.partition("://")
        if scheme == "pvc":
            claim = rest.split("/", 1)[0]
            if not any(v["name"] == f"pvc-{claim}" for v in volumes):
                volumes.append({"name": f"pvc-{claim}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
                mounts.append({"name": f"pvc-{claim}", "mountPath": f"{MODELS_DIR}/{claim}", "readOnly": True})
        elif scheme == "s3" and not any(v["name"] == "s3-models" for v in volumes):
            volumes.append({"name": "s3-models", "emptyDir": {}})
            mounts.append({"name": "s3-models", "mountPath": f"{MODELS_DIR}/s3"})
    return volumes, mounts


def _s3_init_containers(spec: InferenceDeploymentSpec, options: RenderOptions) -> list[dict]:
    containers = []
    for i, uri in enumerate(u for u in (spec.model.uri, spec.model.tokenizer) if u and u.startswith("s3://")):
        resolved = uri.replace("{revision}", spec.model.revision or "")
        containers.append({
            "name": f"sync-model-{i}",
            "image": options.s3_sync_image,
            "command": ["aws", "s3", "sync", resolved, resolved.replace("s3://", f"{MODELS_DIR}/s3/", 1)],
            "env": [{"name": "HOME", "value": TMP_DIR}],  # the AWS CLI's ~/.aws cache, off the read-only root
            "envFrom": _env_from(spec),
            "volumeMounts": [{"name": "s3-models", "mountPath": f"{MODELS_DIR}/s3"},
                             {"name": "tmp", "mountPath": TMP_DIR}],
            "securityContext": CONTAINER_SECURITY,
        })
    return containers


def _env_from(spec: InferenceDeploymentSpec) -> list[dict]:
    ref = spec.model.credentials_secret_ref
    return [{"secretRef": {"name": ref.name}}] if ref else []


def _env() -> list[dict]:
    return [
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        # Ray renices its worker processes to 15; here they are the model ranks, the serving path itself.
        {"name": "RAY_worker_niceness", "value": "0"},
        {"name": "RAYPRISM_POD_TERMINATING_FILE", "value": POD_TERMINATING_FILE},
    ]


# KubeRay copies the Ray container's securityContext into the init container it adds (wait-gcs-ready).
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                      "readOnlyRootFilesystem": True}


def ephemeral_storage_bytes(spec: InferenceDeploymentSpec) -> int:
    """The pod's disk: its cache and /tmp emptyDirs (the root filesystem is read-only)."""
    return quantity_bytes(spec.resources.cache_storage) + quantity_bytes(spec.resources.tmp_storage)


def _pod_spec_common(spec: InferenceDeploymentSpec) -> dict:
    # Pod Security `restricted`: non-root, the runtime's default seccomp profile, and (CONTAINER_SECURITY)
    # no capabilities and no privilege escalation. Nothing in the pods talks to the API server: no token.
    out: dict = {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                     "seccompProfile": {"type": "RuntimeDefault"}},
                 "automountServiceAccountToken": False}
    resources, pods = spec.resources, spec.pods
    if resources.node_selector:
        out["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in resources.tolerations]
    for key, value in {"priorityClassName": pods.priority_class_name, "affinity": pods.affinity,
                       "topologySpreadConstraints": pods.topology_spread_constraints,
                       "imagePullSecrets": [r.model_dump() for r in pods.image_pull_secrets],
                       "serviceAccountName": pods.service_account_name,
                       "runtimeClassName": pods.runtime_class_name}.items():
        if value:
            out[key] = value
    return out


def _pod_metadata(infd: InferenceDeployment, revision: str) -> dict:
    """The pod template's metadata: the user's labels under the operator's (which select the pods)."""
    pods = infd.spec.pods
    metadata: dict = {"labels": {**pods.labels, **labels(infd.metadata.name, revision)}}
    if pods.annotations:
        metadata["annotations"] = dict(pods.annotations)
    return metadata


def head_command(spec: InferenceDeploymentSpec) -> str:
    # KubeRay puts its generated `ray start` (with --block) in KUBERAY_GEN_RAY_START_CMD when the
    # overwrite annotation is set; the head starts Ray in the background, then becomes the server.
    return (
        RAISE_OPEN_FILES
        + 'ray_start="${KUBERAY_GEN_RAY_START_CMD//--block/}"; '
        '/bin/bash -c "$ray_start" || exit 1; '
        "exec rayprism serve "
        + shlex.join([*serve_args(spec), "--ray-address", "auto", "--unready-delay-seconds", str(UNREADY_DELAY_S),
                      "--admin-token-file", f"{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}"])
    )


# A draining head fails its readiness probe within period x threshold; the EndpointSlice controller and the
# Service's clients need a moment more to drop it. The head serves that long before it stops or loads.
READINESS_PROBE = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 2, "timeoutSeconds": 3,
                   "failureThreshold": 2}
# /live fails only when the engine is dead (not while loading or draining): then the kubelet restarts the head.
LIVENESS_PROBE = {"httpGet": {"path": "/live", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5,
                  "failureThreshold": 3}
# Until the server listens (Ray's start and the imports: half a minute on a loaded node), liveness waits; the
# server listens before it loads the model, so the load's length does not count.
STARTUP_PROBE = {**LIVENESS_PROBE, "periodSeconds": 5, "failureThreshold": 120}
UNREADY_DELAY_S = READINESS_PROBE["periodSeconds"] * READINESS_PROBE["failureThreshold"] + 3


def termination_grace_seconds(spec: InferenceDeploymentSpec) -> int:
    """SIGKILL comes after the drain (the head's, and the workers' wait for it) with a margin for shutdown."""
    return spec.rollout.drain_seconds + UNREADY_DELAY_S + 15


# The worker image's model-rank actor (rayprism.executor.RayGPUWorker); Ray titles its processes
# "ray::RayGPUWorker...". The bracket keeps the hook's own command line from matching.
RANK_PROCESS_PATTERN = "ray::RayGPUWorke[r]"


def worker_pre_stop(spec: InferenceDeploymentSpec) -> dict:
    """Workers hold the model's ranks: a worker told to stop first says so (POD_TERMINATING_FILE, which its
    ranks report to the head's server: alone, as a deleted pod or a drained node, it makes the replica drain
    and move its engine to the pod KubeRay creates instead), then keeps Ray up while a rank actor still runs
    here, i.e. until its head's server has drained and shut the model down (at most the drain), so the
    requests in flight are not cut off under the head. Local processes, not the head's address: the head
    Service goes with the RayCluster, and its name stops resolving before the head is done."""
    wait = spec.rollout.drain_seconds + UNREADY_DELAY_S + 5
    # Only this pod's processes (those in its network namespace: in a container that is all of /proc).
    script = (f": > {POD_TERMINATING_FILE}; end=$((SECONDS + {wait})); me=$(readlink /proc/self/ns/net); "
              "ranks() { for p in /proc/[0-9]*; do [ \"$(readlink $p/ns/net 2>/dev/null)\" = \"$me\" ] && "
              f"grep -qs '{RANK_PROCESS_PATTERN}' $p/cmdline && return 0; done; return 1; }}; "
              "while (( SECONDS < end )) && ranks; do sleep 1; done")
    return {"exec": {"command": ["/bin/bash", "-c", script]}}


WORKER_COMMAND = RAISE_OPEN_FILES + 'exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"'


def _head_group(infd: InferenceDeployment, revision: str, options: RenderOptions) -> dict:
    spec = infd.spec
    volumes, mounts = _volumes_and_mounts(spec, admin_secret_name(infd.metadata.name))
    cpu, memory = spec.resources.head_cpu, spec.resources.head_memory
    container = {
        "name": "ray-head",
        "image": image(spec, options),
        "imagePullPolicy": options.image_pull_policy,
        "command": ["/bin/bash", "-c", "--"],
        "args": [head_command(spec)],
        "env": _env(),
        # KubeRay's head Service publishes these (and Ray's metrics port): no dashboard, no Ray client.
        "ports": [
            {"name": "gcs-server", "containerPort": GCS_PORT},
            {"name": "http", "containerPort": SERVER_PORT},
            {"name": "admin", "containerPort": ADMIN_PORT},
        ],
        "readinessProbe": READINESS_PROBE,
        "startupProbe": STARTUP_PROBE,
        # A failed container's log tail becomes its termination message: Degraded says why it failed.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "livenessProbe": LIVENESS_PROBE,
        "resources": {"requests": {"cpu": cpu, "memory": memory, "ephemeral-storage": str(ephemeral_storage_bytes(spec))},
                      "limits": {"cpu": cpu, "memory": memory}},
        "volumeMounts": mounts,
        "securityContext": CONTAINER_SECURITY,
    }
    if spec.model.credentials_secret_ref:
        container["envFrom"] = _env_from(spec)
    pod_spec = {**_pod_spec_common(spec), "containers": [container], "volumes": volumes,
                "terminationGracePeriodSeconds": termination_grace_seconds(spec)}
    if init := _s3_init_containers(spec, options):
        pod_spec["initContainers"] = init
    return {
        # No GPUs and no CPUs for Ray tasks on the head: every rank lands on a worker pod. The dashboard
        # (and its job API) only on the pod's loopback: nothing off the pod needs it (port-forward reaches it).
        "rayStartParams": {"dashboard-host": "127.0.0.1", "num-cpus": "0", "num-gpus": "0"},
        "template": {"metadata": _pod_metadata(infd, revision), "spec": pod_spec},
    }


def _worker_group(infd: InferenceDeployment, revision: str, options: RenderOptions) -> dict:
    spec = infd.spec
    topo = topology(spec)
    volumes, mounts = _volumes_and_mounts(spec, None)
    limits = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    start_params = {"object-store-memory": str(object_store_bytes(spec))}  # in the pod's /dev/shm volume
    if topo.gpus_per_pod:
        limits[spec.resources.gpu_resource_name] = str(topo.gpus_per_pod)
        start_params["num-gpus"] = str(topo.gpus_per_pod)
    container = {
        "name": "ray-worker",
        "image": image(spec, options),
        "imagePullPolicy": options.image_pull_policy,
        "command": ["/bin/bash", "-c", "--"],
        "args": [WORKER_COMMAND],
        "env": _env(),
        "lifecycle": {"preStop": worker_pre_stop(spec)},
        "terminationMessagePolicy": "FallbackToLogsOnError",  # as the head's
        "resources": {"requests": {**limits, "ephemeral-storage": str(ephemeral_storage_bytes(spec))},
                      "limits": limits},
        "volumeMounts": mounts,
        "securityContext": CONTAINER_SECURITY,
    }
    if spec.model.credentials_secret_ref:
        container["envFrom"] = _env_from(spec)
    pod_spec = {**_pod_spec_common(spec), "containers": [container], "volumes": volumes,
                "terminationGracePeriodSeconds": termination_grace_seconds(spec)}
    if init := _s3_init_containers(spec, options):
        pod_spec["initContainers"] = init
    return {
        "groupName": WORKER_GROUP,
        "replicas": topo.pods,
        "minReplicas": topo.pods,
        "maxReplicas": topo.pods,
        "rayStartParams": start_params,
        "template": {"metadata": _pod_metadata(infd, revision), "spec": pod_spec},
    }


# Labels on a RayCluster that KubeRay's batch-scheduler plugins read (ray-operator/controllers/ray/batchscheduler;
# utils/constant.go), and Kueue's RayCluster integration.
KUBERAY_SCHEDULER_NAME = "ray.io/scheduler-name"
KUBERAY_GANG_SCHEDULING = "ray.io/gang-scheduling-enabled"
KUBERAY_PRIORITY_CLASS = "ray.io/priority-class-name"
YUNIKORN_APP_ID = "yunikorn.apache.org/app-id"
QUEUE_LABELS = {"volcano": "volcano.sh/queue-name", "yunikorn": "yunikorn.apache.org/queue",
                "kai-scheduler": "kai.scheduler/queue"}
KUEUE_QUEUE_NAME = "kueue.x-k8s.io/queue-name"


def scheduling_labels(infd: InferenceDeployment, replica: str) -> dict[str, str]:
    """A replica's labels for the batch scheduler and Kueue (spec.scheduling). KubeRay's operator picks the batch
    scheduler by its --batch-scheduler flag; ray.io/scheduler-name is what KubeRay's documentation asks RayClusters
    to carry all the same. Volcano's plugin gangs every RayCluster (a PodGroup of head plus workers); YuniKorn's and
    scheduler-plugins' only those labelled ray.io/gang-scheduling-enabled."""
    scheduling, out = infd.spec.scheduling, {}
    if scheduler := scheduling.batch_scheduler:
        out[KUBERAY_SCHEDULER_NAME] = scheduler
        if scheduling.queue:
            out[QUEUE_LABELS[scheduler]] = scheduling.queue
        if scheduler in ("yunikorn", "scheduler-plugins"):
            out[KUBERAY_GANG_SCHEDULING] = "true"
        if scheduler == "yunikorn":
            out[YUNIKORN_APP_ID] = replica  # YuniKorn's application: one per replica, as its gang
        if scheduler == "volcano" and infd.spec.pods.priority_class_name:
            out[KUBERAY_PRIORITY_CLASS] = infd.spec.pods.priority_class_name  # the PodGroup's priority
    if scheduling.kueue_queue_name:
        out[KUEUE_QUEUE_NAME] = scheduling.kueue_queue_name
    return out


def render_raycluster(
    infd: InferenceDeployment, revision: str, suffix: str, options: RenderOptions = RenderOptions()
) -> dict:
    """One replica: a KubeRay RayCluster with a GPU-less head (Ray head + server) and a worker group."""
    name = infd.metadata.name
    replica = replica_name(name, revision, suffix)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {
            "name": replica,
            "namespace": infd.metadata.namespace,
            "labels": {**scheduling_labels(infd, replica), **labels(name, revision)},
            "annotations": {
                KUBERAY_OVERWRITE_CMD: "true",
                ANNOTATION_WEIGHTS_REVISION: infd.spec.model.revision or "",
            },
            "ownerReferences": [owner_reference(infd)],
        },
        "spec": {
            "rayVersion": RAY_VERSION,
            # Every Ray port (GCS, dashboard, client) needs the token KubeRay generates into a Secret of the
            # RayCluster's name and gives the Ray containers (RAY_AUTH_MODE, RAY_AUTH_TOKEN).
            "authOptions": {"mode": "token"},
            "enableInTreeAutoscaling": False,
            "headGroupSpec": _head_group(infd, revision, options),
            "workerGroupSpecs": [_worker_group(infd, revision, options)],
        },
    }


def render_service(infd: InferenceDeployment) -> dict:
    """The endpoint: every replica's head pod, once its readiness probe (/health) passes."""
    name = infd.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": infd.metadata.namespace,
            "labels": selector_labels(name),
            "ownerReferences": [owner_reference(infd)],
        },
        "spec": {
            "type": infd.spec.service.type,
            "selector": serving_pod_labels(name),
            "ports": [{"name": "http", "port": infd.spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"


def inference_pool_name(deployment: str) -> str:
    return deployment


def render_inference_pool(infd: InferenceDeployment) -> dict | None:
    """The Gateway API Inference Extension's InferencePool over the serving pods (None unless
    spec.router.inferencePool asks for one): a gateway's endpoint picker chooses among them by queue,
    KV-cache use and prefix. The pool lists pods, not the Service: its port is the pods' OpenAI port."""
    pool = infd.spec.router.inference_pool
    if pool is None:
        return None
    name = infd.metadata.name
    return {
        "apiVersion": INFERENCE_POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": {
            "name": inference_pool_name(name),
            "namespace": infd.metadata.namespace,
            "labels": selector_labels(name),
            "ownerReferences": [owner_reference(infd)],
        },
        "spec": {
            "selector": {"matchLabels": serving_pod_labels(name)},
            "targetPorts": [{"number": SERVER_PORT}],
            "endpointPickerRef": pool.endpoint_picker_ref.model_dump(by_alias=True, exclude_none=True),
        },
    }


def replica_network_policy_name(replica: str) -> str:
    return f"{replica}-ray"


def serving_network_policy_name(deployment: str) -> str:
    return f"{deployment}-serving"


def _network_policy(infd: InferenceDeployment, name: str, pod_selector: dict, ingress: list[dict]) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": infd.metadata.namespace,
                     "labels": selector_labels(infd.metadata.name), "ownerReferences": [owner_reference(infd)]},
        "spec": {"podSelector": {"matchLabels": pod_selector}, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def render_replica_network_policy(infd: InferenceDeployment, replica: str) -> dict:
    """Ray's ports (GCS, raylets, object managers, workers: most of them chosen at random) admit only the pods
    of the same replica, i.e. of the same RayCluster, which KubeRay labels ray.io/cluster."""
    members = {"ray.io/cluster": replica}
    return _network_policy(infd, replica_network_policy_name(replica), members, [{"from": [{"podSelector": {
        "matchLabels": members}}]}])


def render_serving_network_policy(infd: InferenceDeployment, operator_namespace: str | None) -> dict:
    """The head pods' server: the OpenAI port from spec.service.allowFrom (everyone when empty; and the operator's
    namespace with autoscaling), the admin port from the operator's namespace. Policies add up: with the
    replica's own, that is all a head admits."""
    allow_from = [peer.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
                  for peer in infd.spec.service.allow_from]
    operator = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}}}]
    if allow_from and infd.spec.autoscaling and operator_namespace:
        allow_from += operator  # the autoscaler reads /metrics, which is on the OpenAI port
    openai = {"ports": [{"protocol": "TCP", "port": SERVER_PORT}], **({"from": allow_from} if allow_from else {})}
    admin: dict = {"ports": [{"protocol": "TCP", "port": ADMIN_PORT}]}
    if operator_namespace:
        admin["from"] = operator
    heads = serving_pod_labels(infd.metadata.name)
    return _network_policy(infd, serving_network_policy_name(infd.metadata.name), heads, [openai, admin])


def admin_token(key: bytes, infd: InferenceDeployment) -> str:
    """The replicas' admin bearer token, derived from the operator's key: the operator writes it into the admin
    Secret and never needs to read a Secret back. The uid makes a re-created InferenceDeployment's differ."""
    message = f"{infd.metadata.namespace}/{infd.metadata.name}/{infd.metadata.uid or ''}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def render_admin_secret(infd: InferenceDeployment, token: str) -> dict:
    """The bearer token the operator uses for the replicas' admin API (mounted into every head)."""
    name = infd.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": admin_secret_name(name),
            "namespace": infd.metadata.namespace,
            "labels": selector_labels(name),
            "ownerReferences": [owner_reference(infd)],
        },
        "stringData": {ADMIN_TOKEN_KEY: token},
    }


def render_all(infd: InferenceDeployment, options: RenderOptions = RenderOptions(),
               token: str = "<generated by the operator>") -> list[dict]:
    """Everything the operator creates for a new InferenceDeployment (replica suffixes by index)."""
    revision = revision_hash(infd.spec, options)
    replicas = [render_raycluster(infd, revision, f"r{i}", options) for i in range(infd.spec.replicas)]
    return [
        render_admin_secret(infd, token),
        render_service(infd),
        render_serving_network_policy(infd, options.operator_namespace),
        *(render_replica_network_policy(infd, r["metadata"]["name"]) for r in replicas),
        *replicas,
        *filter(None, [render_inference_pool(infd)]),
    ]
