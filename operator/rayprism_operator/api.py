"""The InferenceDeployment API: pydantic models that are the single source of truth for the CRD.

Every field carries its description (it becomes `kubectl explain` text), its default and bounds. Rules
that span several fields are written once, in `CROSS_FIELD_RULES`, as a CEL expression for the API
server and a Python predicate for everything that validates without one (the CLI, the operator).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

GROUP = "rayprism.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceDeployment"
PLURAL = "inferencedeployments"
SINGULAR = "inferencedeployment"
SHORT_NAMES = ["infd"]

# KubeRay's ValidateRayClusterMetadata (ray-operator/controllers/ray/utils) refuses a RayCluster whose name
# is longer than MaxRayClusterNameLength (63 minus "-serve-svc": 53 in every release read, up to 1.6.1) or
# not a DNS-1035 label, and then creates nothing. Replica RayClusters are named
# <name>-<10-char hash>-<5-char suffix> (render.replica_name), so the InferenceDeployment's name gets the rest.
KUBERAY_MAX_RAYCLUSTER_NAME_LENGTH = 53
REPLICA_NAME_SUFFIX_LENGTH = len("-0123456789-abcde")
MAX_NAME_LENGTH = KUBERAY_MAX_RAYCLUSTER_NAME_LENGTH - REPLICA_NAME_SUFFIX_LENGTH
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
SUPPORTED_URI_SCHEMES = ("hf", "s3", "pvc", "file", "builtin")
URI_PATTERN = r"^(hf|s3|pvc|file|builtin)://.+$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
# Labels the operator and KubeRay set on the pods, and select them by.
RESERVED_LABEL_PREFIXES = ("app.kubernetes.io/name", f"{GROUP}/", "ray.io/")


class SpecError(ValueError):
    """A manifest that is not a valid InferenceDeployment; the message names the field path."""


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, validate_default=True
    )


@dataclass(frozen=True)
class CrossFieldRule:
    """One rule over several fields: CEL for the API server, the same predicate in Python."""

    cel: str
    message: str
    check: Callable[[Any], bool]


def _fits_nodes(spec: "InferenceDeploymentSpec") -> bool:
    tensor, pipeline = spec.parallelism.tensor, spec.parallelism.pipeline
    gpus = spec.resources.gpus_per_node
    if gpus == 0:  # CPU-only replicas: every rank is a process in one worker pod
        return True
    total = tensor * pipeline
    return tensor <= gpus and (total <= gpus or (gpus % tensor == 0 and total % gpus == 0))


CROSS_FIELD_RULES: dict[str, list[CrossFieldRule]] = {
    # CEL at the root of the schema (the API server lets CEL read metadata.name only there), Python on
    # ObjectMeta.
    "metadata": [
        CrossFieldRule(
            cel=f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            message=f"metadata.name must be at most {MAX_NAME_LENGTH} characters: replica RayClusters are named "
            f"<name>-<10-character revision>-<5-character suffix>, and KubeRay refuses RayCluster names longer "
            f"than {KUBERAY_MAX_RAYCLUSTER_NAME_LENGTH} characters",
            check=lambda m: len(m.name) <= MAX_NAME_LENGTH,
        ),
        CrossFieldRule(
            cel="self.metadata.name.matches('" + DNS_1035_LABEL + "')",
            message="metadata.name must start with a letter and hold only lowercase letters, digits and '-' "
            "(a DNS-1035 label): KubeRay refuses other RayCluster names",
            check=lambda m: re.fullmatch(DNS_1035_LABEL, m.name) is not None,
        ),
    ],
    "spec": [
        CrossFieldRule(
            cel=(
                "self.resources.gpusPerNode == 0 || "
                "(self.parallelism.tensor <= self.resources.gpusPerNode && "
                "(self.parallelism.tensor * self.parallelism.pipeline <= self.resources.gpusPerNode || "
                "(self.resources.gpusPerNode % self.parallelism.tensor == 0 && "
                "(self.parallelism.tensor * self.parallelism.pipeline) % self.resources.gpusPerNode == 0)))"
            ),
            message=(
                "parallelism must fit resources.gpusPerNode: a tensor-parallel group never spans nodes "
                "(tensor <= gpusPerNode), and a replica larger than one node needs gpusPerNode to be a "
                "multiple of tensor and tensor x pipeline a multiple of gpusPerNode"
            ),
            check=_fits_nodes,
        ),
    ],
    "rollout": [
        CrossFieldRule(
            cel="self.maxSurge > 0 || self.maxUnavailable > 0",
            message="rollout.maxSurge and rollout.maxUnavailable must not both be 0",
            check=lambda r: r.max_surge > 0 or r.max_unavailable > 0,
        ),
    ],
    "pods": [
        CrossFieldRule(
            cel="!has(self.labels) || self.labels.all(k, !k.startsWith('app.kubernetes.io/name') && !k.startsWith('rayprism.dev/') && "
            "!k.startsWith('ray.io/'))",
            message="pods.labels must not set app.kubernetes.io/name, rayprism.dev/* or ray.io/*: the operator and "
            "KubeRay set those labels and select the pods by them",
            check=lambda p: not any(k.startswith(RESERVED_LABEL_PREFIXES) for k in p.labels),
        ),
        CrossFieldRule(
            cel="!has(self.labels) || self.labels.all(k, k.matches('" + LABEL_KEY + "'))",
            message="pods.labels: every key must be a label key: [prefix/]name, the name at most 63 letters, "
            "digits, '-', '_' and '.', the prefix a DNS subdomain",
            check=lambda p: all(re.fullmatch(LABEL_KEY, k) for k in p.labels),
        ),
    ],
    "scheduling": [
        CrossFieldRule(
            cel="!has(self.queue) || has(self.batchScheduler)",
            message="scheduling.queue needs scheduling.batchScheduler: the queue is the batch scheduler's "
            "(a Kueue LocalQueue goes in scheduling.kueueQueueName)",
            check=lambda s: s.queue is None or s.batch_scheduler is not None,
        ),
        CrossFieldRule(
            cel="!has(self.batchScheduler) || self.batchScheduler != 'kai-scheduler' || has(self.queue)",
            message="scheduling.queue is required with batchScheduler kai-scheduler: KAI schedules no pod "
            "without a queue",
            check=lambda s: s.batch_scheduler != "kai-scheduler" or s.queue is not None,
        ),
        CrossFieldRule(
            cel="!has(self.queue) || !has(self.batchScheduler) || self.batchScheduler != 'scheduler-plugins'",
            message="scheduling.queue is not supported with batchScheduler scheduler-plugins, which has no queues",
            check=lambda s: s.queue is None or s.batch_scheduler != "scheduler-plugins",
        ),
    ],
    "autoscaling": [
        CrossFieldRule(
            cel="self.minReplicas <= self.maxReplicas",
            message="autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
            check=lambda a: a.min_replicas <= a.max_replicas,
        ),
        CrossFieldRule(
            cel="self.metric != 'kvCacheUsage' || self.target <= 1.0",
            message="autoscaling.target of metric kvCacheUsage is a fraction of the KV cache: at most 1 (0.8 is 80%)",
            check=lambda a: a.metric != "kvCacheUsage" or a.target <= 1,
        ),
    ],
    "endpointPickerRef": [
        CrossFieldRule(
            cel="(has(self.kind) && self.kind != 'Service') || has(self.port)",
            message="router.inferencePool.endpointPickerRef.port is required when kind is Service (the default): "
            "the InferencePool API requires the picker Service's port",
            check=lambda r: r.kind != "Service" or r.port is not None,
        ),
    ],
    "model": [
        CrossFieldRule(
            cel="self.uri.matches('" + URI_PATTERN + "')",
            message="model.uri must use a supported scheme: hf://, s3://, pvc://, file:/// or builtin://",
            check=lambda m: re.match(URI_PATTERN, m.uri) is not None,
        ),
    ],
}


@dataclass(frozen=True)
class TransitionRule:
    """A rule over an update (CEL with oldSelf): only the API server sees both the old and the new object."""

    cel: str
    message: str


TRANSITION_RULES: dict[str, list[TransitionRule]] = {
    "model": [
        # A revision change must load other files. hf:// passes the revision to the hub and {revision}
        # names the folder; every other URI (s3://, pvc://, file://, builtin://) reads the same files
        # whatever the revision, and a reload of those would be reported as new weights. Refused rather
        # than fetched: nothing can tell whether files behind a path changed, and refusing is one rule
        # where fetching would be a sync in every server.
        TransitionRule(
            cel="self.uri != oldSelf.uri || self.uri.startsWith('hf://') || self.uri.contains('{revision}') || "
            "(has(self.revision) ? self.revision : '') == (has(oldSelf.revision) ? oldSelf.revision : '')",
            message="model.revision may change only where it selects the weights: an hf:// URI (the hub "
            "revision) or a URI holding {revision}. Other URIs load the same files whatever the revision: "
            "change model.uri instead, or put {revision} in it",
        ),
    ],
}


def rules_schema(section: str) -> dict:
    rules = [*CROSS_FIELD_RULES.get(section, []), *TRANSITION_RULES.get(section, [])]
    return {"x-kubernetes-validations": [{"rule": r.cel, "message": r.message} for r in rules]}


def _check_rules(section: str, obj: Any) -> Any:
    for rule in CROSS_FIELD_RULES[section]:
        if not rule.check(obj):
            raise ValueError(rule.message)
    return obj


class SecretReference(_Model):
    name: str = Field(
        description="Name of a Secret in the same namespace. Every key becomes an environment variable "
        "of the head and worker containers (for example HF_TOKEN, AWS_ACCESS_KEY_ID).",
        min_length=1,
        max_length=253,
    )


class ModelSpec(_Model):
    model_config = ConfigDict(json_schema_extra=rules_schema("model"))

    name: str = Field(
        description="Served model id: the `model` field clients send to the OpenAI API.",
        min_length=1,
        max_length=256,
    )
    uri: str = Field(
        description="Where the weights are: hf://org/name, s3://bucket/path, pvc://claim/path, "
        "file:///path or builtin://smollm2-135m-instruct. May contain {revision}, replaced by "
        "model.revision.",
        min_length=1,
        max_length=2048,
    )
    revision: str | None = Field(
        default=None,
        description="Version of the weights: the hub revision of an hf:// URI, or what replaces {revision} in "
        "the URI; it may change only with such a URI, or together with model.uri. With rollout.weightUpdate "
        "InPlace, changing it alone loads the new weights into the running replicas; with Rolling it "
        "replaces them.",
        min_length=1,
        max_length=256,
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weight and activation dtype; auto is bfloat16 on GPUs, float32 on CPUs."
    )
    credentials_secret_ref: SecretReference | None = Field(
        default=None, description="Secret with credentials for the model store (for example an HF token)."
    )
    tokenizer: str | None = Field(
        default=None,
        description="Tokenizer location (same URI schemes as uri); defaults to the model's own.",
        max_length=2048,
    )

    @model_validator(mode="after")
    def _rules(self) -> "ModelSpec":
        return _check_rules("model", self)


class Parallelism(_Model):
    tensor: int = Field(default=1, ge=1, le=64, description="Tensor-parallel size: GPUs that split each layer.")
    pipeline: int = Field(default=1, ge=1, le=64, description="Pipeline-parallel size: stages of layers.")


class Toleration(_Model):
    key: str | None = Field(default=None, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value the toleration matches.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated, in seconds."
    )


QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class Resources(_Model):
    gpus_per_node: int = Field(
        default=8,
        ge=0,
        le=16,
        description="GPUs on each node of the worker pool; a worker pod takes min(tensor x pipeline, "
        "gpusPerNode). 0 runs every rank on CPUs in one worker pod.",
    )
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu", description="Extended resource name of the GPUs.", min_length=1
    )
    cpu: str = Field(default="8", pattern=QUANTITY, description="CPU request and limit of each worker pod.")
    memory: str = Field(default="64Gi", pattern=QUANTITY, description="Memory request and limit of each worker pod.")
    head_cpu: str = Field(default="2", pattern=QUANTITY, description="CPU of the head pod (Ray head and API server).")
    head_memory: str = Field(default="8Gi", pattern=QUANTITY, description="Memory of the head pod.")
    shared_memory: str = Field(
        default="16Gi", pattern=QUANTITY,
        description="Size of /dev/shm in worker pods: Ray's object store takes 80% of it (at most 30% of memory), "
        "NCCL uses the rest.",
    )
    cache_storage: str = Field(
        default="40Gi", pattern=QUANTITY,
        description="Disk of each pod's cache (downloaded weights, compiled kernels): an emptyDir of this size, "
        "requested as ephemeral-storage. The root filesystem is read-only.",
    )
    tmp_storage: str = Field(
        default="8Gi", pattern=QUANTITY,
        description="Disk of each pod's /tmp, where Ray keeps its session (logs, sockets, spilled objects): an "
        "emptyDir of this size, requested as ephemeral-storage.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods must match.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of the pods.")


class Engine(_Model):
    max_model_len: int | None = Field(
        default=None, ge=16, description="Longest prompt plus output in tokens; default: the model's context length."
    )
    max_num_seqs: int = Field(default=256, ge=1, le=4096, description="Most sequences in one batch.")
    max_num_batched_tokens: int = Field(
        default=8192, ge=16, description="Token budget of one engine step (prefill plus decode)."
    )
    kv_cache_memory_fraction: float = Field(
        default=0.9, gt=0, le=0.99, description="Fraction of free GPU memory given to the paged KV cache."
    )
    enforce_eager: bool = Field(default=False, description="Disable CUDA graphs (slower decode, faster start).")
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse the KV cache of prompt prefixes that earlier requests computed (full "
        "blocks, content-addressed, LRU-evicted); a weights update invalidates it.",
    )
    quantization: Literal["none", "fp8"] = Field(
        default="none", description="fp8: FP8 (e4m3) weights, quantized at load from a bf16 checkpoint, or an FP8 "
        "checkpoint in the compressed-tensors layout as it is. About half the weight bytes: faster decode.",
    )
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        default="auto", description="auto: the KV cache in the model's dtype; fp8: in e4m3 (twice the tokens).",
    )
    max_queue_size: int = Field(
        default=1024, ge=1, description="Requests waiting beyond this get 429 instead of queueing without bound."
    )
    tool_call_parser: Literal["auto", "none", "hermes", "llama3_json"] = Field(
        default="auto",
        description="How the server finds tool calls in replies to tool_choice \"auto\" (the default when a request "
        "has tools): auto picks the model's format from its chat template (or model type); none refuses "
        "tool_choice \"auto\"; or a format: hermes (Qwen2.5, Qwen3, Hermes 2 Pro), llama3_json (Llama 3.1-3.3). "
        "tool_choice \"required\" and named functions need none (the grammar enforces them).",
    )


class Rollout(_Model):
    model_config = ConfigDict(json_schema_extra=rules_schema("rollout"))

    strategy: Literal["RollingUpdate", "Recreate"] = Field(
        default="RollingUpdate", description="How replicas of a new revision replace the old ones."
    )
    max_surge: int = Field(default=0, ge=0, description="Replicas allowed above spec.replicas during a rollout.")
    max_unavailable: int = Field(
        default=1, ge=0, description="Ready replicas that may be missing below spec.replicas during a rollout."
    )
    progress_deadline_seconds: int = Field(
        default=1800, ge=1, description="Seconds without progress before Progressing turns False."
    )
    weight_update: Literal["InPlace", "Rolling"] = Field(
        default="InPlace",
        description="InPlace loads a new model.revision into running replicas through their admin API; "
        "Rolling replaces replicas.",
    )
    weight_update_timeout_seconds: int = Field(
        default=900, ge=10, description="How long one replica may take to load new weights before it is replaced."
    )
    drain_seconds: int = Field(
        default=30, ge=0, le=3600,
        description="How long a replica that is removed, replaced or about to load new weights keeps serving the "
        "requests it has (streams included) after it left the Service's endpoints.",
    )

    @model_validator(mode="after")
    def _rules(self) -> "Rollout":
        return _check_rules("rollout", self)


class LabelSelectorRequirement(_Model):
    key: str = Field(min_length=1, description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[str] = Field(default_factory=list, description="Values for In and NotIn.")


class LabelSelector(_Model):
    match_labels: dict[str, str] = Field(default_factory=dict, description="Labels that must all match.")
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, description="Requirements that must all hold.")


class IPBlock(_Model):
    cidr: str = Field(min_length=1, description="An IP range, such as 10.0.0.0/8.")
    except_: list[str] = Field(default_factory=list, alias="except", description="Ranges within cidr to leave out.")


class NetworkPolicyPeer(_Model):
    """A source the OpenAI port admits, as in a NetworkPolicy's ingress `from`."""

    pod_selector: LabelSelector | None = Field(
        default=None, description="Pods (in namespaceSelector's namespaces, else in this one).")
    namespace_selector: LabelSelector | None = Field(default=None, description="Namespaces; {} is every namespace.")
    ip_block: IPBlock | None = Field(default=None, description="Addresses outside the cluster (load balancers).")


class ServiceSpec(_Model):
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the OpenAI-compatible Service.")
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(default="ClusterIP", description="Service type.")
    allow_from: list[NetworkPolicyPeer] = Field(
        default_factory=list,
        description="Who may reach the OpenAI port (and /metrics on it), as NetworkPolicy peers; empty admits "
        "every source. Ray's ports are open only within a replica and the admin port only to the operator's "
        "namespace, whatever this says.",
    )


# Kubernetes objects passed through to the pods as written (affinity, topologySpreadConstraints): the API
# server checks them against the Pod schema when the RayCluster is created, and a refusal is reported
# in the Degraded condition with the field's path.
KubernetesObject = Annotated[dict[str, Any], WithJsonSchema(
    {"type": "object", "x-kubernetes-preserve-unknown-fields": True})]



class LocalObjectReference(_Model):
    name: str = Field(min_length=1, max_length=253, description="Name of an object in the same namespace.")


class PodOptions(_Model):
    model_config = ConfigDict(json_schema_extra=rules_schema("pods"))

    labels: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] = Field(
        default_factory=dict, max_length=64,
        description="Labels added to every model pod (not app.kubernetes.io/name, rayprism.dev/* or ray.io/*, "
        "which the operator and KubeRay set).",
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="Annotations added to every model pod.")
    priority_class_name: str | None = Field(default=None, max_length=253, description="PriorityClass of the pods.")
    affinity: KubernetesObject | None = Field(default=None, description="Affinity of the pods (core/v1 Affinity).")
    topology_spread_constraints: list[KubernetesObject] = Field(
        default_factory=list, description="How the pods spread over topology domains (core/v1 "
        "TopologySpreadConstraint).")
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Secrets for pulling the worker image.")
    service_account_name: str | None = Field(
        default=None, max_length=253, description="ServiceAccount of the pods; its token is not mounted.")
    runtime_class_name: str | None = Field(
        default=None, max_length=253, description="RuntimeClass of the pods (for example nvidia).")

    @model_validator(mode="after")
    def _rules(self) -> "PodOptions":
        return _check_rules("pods", self)


# The Gateway API Inference Extension's InferencePool (inference.networking.k8s.io/v1, from the Go module
# sigs.k8s.io/gateway-api-inference-extension, api/v1/inferencepool_types.go): its EndpointPickerRef as written
# there, so that a reference copied from its documentation works here unchanged.
class PortNumber(_Model):
    number: int = Field(ge=1, le=65535, description="Port number.")


class EndpointPickerRef(_Model):
    model_config = ConfigDict(json_schema_extra=rules_schema("endpointPickerRef"))

    group: str = Field(
        default="", max_length=253, pattern=r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="API group of the endpoint picker object; empty (the default) is the core group.")
    kind: str = Field(
        default="Service", min_length=1, max_length=63, pattern=r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$",
        description="Kind of the endpoint picker object; Service by default.")
    name: str = Field(min_length=1, max_length=253,
                      description="Name of the endpoint picker (EPP) object, in the InferenceDeployment's namespace.")
    port: PortNumber | None = Field(
        default=None, description="Port of the endpoint picker: the Service port (not its target port); "
        "required when kind is Service.")
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        default="FailClose", description="What the gateway does while the picker does not answer: FailClose "
        "(the default) drops the request, FailOpen sends it to an endpoint of its own choosing.")

    @model_validator(mode="after")
    def _rules(self) -> "EndpointPickerRef":
        return _check_rules("endpointPickerRef", self)


class InferencePoolOptions(_Model):
    endpoint_picker_ref: EndpointPickerRef = Field(
        description="The endpoint picker (EPP) the gateway asks which replica serves each request (by queue, "
        "KV-cache use and prefix).")


class Router(_Model):
    inference_pool: InferencePoolOptions | None = Field(
        default=None,
        description="When set, the operator creates an InferencePool (inference.networking.k8s.io/v1, the "
        "Gateway API Inference Extension) named like the InferenceDeployment, selecting the serving (head) pod "
        "of every replica on the OpenAI port, for an HTTPRoute to send traffic through the endpoint picker. "
        "The InferencePool CRD must be installed; while it is not, Degraded says so.")


class Autoscaling(_Model):
    model_config = ConfigDict(json_schema_extra=rules_schema("autoscaling"))

    min_replicas: int = Field(default=1, ge=1, le=1000, description="Fewest replicas the autoscaler keeps.")
    max_replicas: int = Field(ge=1, le=1000, description="Most replicas the autoscaler makes.")
    metric: Literal["requestsWaiting", "runningRequestsPerReplica", "kvCacheUsage"] = Field(
        description="What says a replica is saturated, read from each ready replica's /metrics: requestsWaiting "
        "(vllm:num_requests_waiting, requests queued for a batch slot), runningRequestsPerReplica "
        "(vllm:num_requests_running, requests in the running batch), kvCacheUsage (vllm:kv_cache_usage_perc, the "
        "used share of the KV cache, 0 to 1).")
    target: float = Field(
        gt=0, description="The metric's value per replica to hold: replicas = ceil(sum over the ready replicas / "
        "target), as the HorizontalPodAutoscaler's AverageValue target, left alone within 10%. kvCacheUsage: a "
        "fraction (0.8).")
    scale_up_stabilization_seconds: int = Field(
        default=0, ge=0, le=3600, description="Scale up only to the lowest recommendation of this many past seconds "
        "(the HPA's behavior.scaleUp.stabilizationWindowSeconds): a burst shorter than this adds nothing.")
    scale_down_stabilization_seconds: int = Field(
        default=300, ge=0, le=3600, description="Scale down only to the highest recommendation of this many past "
        "seconds (the HPA's behavior.scaleDown.stabilizationWindowSeconds): a lull shorter than this removes "
        "nothing. Removed replicas drain first (rollout.drainSeconds).")

    @model_validator(mode="after")
    def _rules(self) -> "Autoscaling":
        return _check_rules("autoscaling", self)


# KubeRay's batch-scheduler plugins (ray-operator/controllers/ray/batchscheduler, the values of its
# --batch-scheduler flag): the scheduler is chosen for the whole KubeRay operator, not per RayCluster.
BATCH_SCHEDULERS = ("volcano", "yunikorn", "kai-scheduler", "scheduler-plugins")


class Scheduling(_Model):
    model_config = ConfigDict(json_schema_extra=rules_schema("scheduling"))

    batch_scheduler: Literal[BATCH_SCHEDULERS] | None = Field(
        default=None,
        description="The batch scheduler that gang-schedules each replica (head and workers together, or none of "
        "them): volcano, yunikorn, kai-scheduler or scheduler-plugins. It must be the one KubeRay's operator runs "
        "with (its --batch-scheduler flag, batchScheduler.name in KubeRay's chart), which sets every pod's "
        "schedulerName; this field makes the operator label each RayCluster for it (ray.io/scheduler-name, the "
        "queue, gang scheduling). The pods' priority is pods.priorityClassName, passed to Volcano's PodGroup too.")
    queue: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=LABEL_VALUE,
        description="The batch scheduler's queue for the replicas (volcano.sh/queue-name, yunikorn.apache.org/queue "
        "or kai.scheduler/queue on each RayCluster); required by kai-scheduler. Needs batchScheduler.")
    kueue_queue_name: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=LABEL_VALUE,
        description="A Kueue LocalQueue in this namespace (the kueue.x-k8s.io/queue-name label on each RayCluster): "
        "Kueue admits each replica whole, when its quota has room for all of its pods, and keeps it suspended "
        "until then.")

    @model_validator(mode="after")
    def _rules(self) -> "Scheduling":
        return _check_rules("scheduling", self)


class InferenceDeploymentSpec(_Model):
    model_config = ConfigDict(json_schema_extra=rules_schema("spec"))

    model: ModelSpec = Field(description="The model to serve.")
    replicas: int = Field(
        default=1, ge=0, le=1000, description="Number of model replicas (one RayCluster each); the /scale "
        "subresource's (kubectl scale, an HPA, KEDA). With autoscaling, the operator sets it.")
    parallelism: Parallelism = Field(default_factory=Parallelism, description="How one replica is split over GPUs.")
    resources: Resources = Field(default_factory=Resources, description="Node shape and pod resources.")
    engine: Engine = Field(default_factory=Engine, description="Inference engine settings.")
    rollout: Rollout = Field(default_factory=Rollout, description="How changes reach running replicas.")
    image: str | None = Field(
        default=None, description="Worker image override; default: the operator's configured worker image.", max_length=512
    )
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="The Service in front of all replicas.")
    pods: PodOptions = Field(
        default_factory=PodOptions, description="Scheduling and metadata of every model pod (head and workers).")
    router: Router = Field(
        default_factory=Router, description="What routes requests to the replicas besides the Service.")
    autoscaling: Autoscaling | None = Field(
        default=None, description="Replicas that follow the load: at most every few seconds the operator reads the "
        "metric from every ready replica's /metrics and sets spec.replicas through the /scale subresource. Without "
        "it, spec.replicas is yours (or an HPA's or KEDA's, through /scale).")
    scheduling: Scheduling = Field(
        default_factory=Scheduling, description="Gang scheduling and queueing of the replicas by a batch scheduler "
        "or Kueue. A change replaces the replicas (a PodGroup's queue is set when it is created).")

    @model_validator(mode="after")
    def _rules(self) -> "InferenceDeploymentSpec":
        return _check_rules("spec", self)


class Condition(_Model):
    type: str = Field(description="Available, Ready, Progressing or Degraded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word saying why.")
    message: str = Field(default="", description="What happened, for people.")
    last_transition_time: str | None = Field(default=None, description="When status last changed (RFC 3339).")
    last_update_time: str | None = Field(
        default=None, description="When status or reason last changed (RFC 3339); for Progressing, when the "
        "rollout in progress began.")
    observed_generation: int | None = Field(default=None, description="The spec generation this was computed from.")


class InferenceDeploymentStatus(_Model):
    observed_generation: int | None = Field(default=None, description="Last spec generation the operator acted on.")
    replicas: int = Field(default=0, description="RayClusters that exist, of every revision.")
    ready_replicas: int = Field(default=0, description="Replicas whose head and workers are ready.")
    updated_replicas: int = Field(default=0, description="Replicas of the update revision.")
    available_replicas: int = Field(default=0, description="Ready replicas of the update revision serving its weights.")
    current_revision: str | None = Field(default=None, description="Revision hash the serving replicas mostly run.")
    update_revision: str | None = Field(default=None, description="Revision hash of the current spec.")
    weights_revision: str | None = Field(default=None, description="model.revision every ready replica has loaded.")
    selector: str | None = Field(default=None, description="Label selector of the head pods (for the scale subresource).")
    endpoint: str | None = Field(default=None, description="URL of the OpenAI-compatible endpoint.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Available: the endpoint can serve: at least max(1, replicas - rollout.maxUnavailable) "
        "replicas are ready and not loading weights. Ready: every one of spec.replicas replicas is "
        "ready on the update revision with model.revision loaded, and no other replica is left. Progressing: "
        "False with ProgressDeadlineExceeded when a rollout made no progress for "
        "rollout.progressDeadlineSeconds. Degraded: True when something needs attention (failed weight loads, "
        "an invalid spec, a change of the operator's that the API server refused); while the spec is invalid "
        "Available and Ready are Unknown and Progressing is False.",
    )


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads; everything else passes through."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _rules(self) -> "ObjectMeta":
        return _check_rules("metadata", self)


class InferenceDeployment(_Model):
    api_version: Literal["rayprism.dev/v1alpha1"] = Field(alias="apiVersion", description="rayprism.dev/v1alpha1")
    kind: Literal["InferenceDeployment"] = Field(description="InferenceDeployment")
    metadata: ObjectMeta
    spec: InferenceDeploymentSpec
    status: InferenceDeploymentStatus | None = None


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem: the field path as written in YAML, then what is expected."""
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in (*([prefix] if prefix else []), *item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{path or '<root>'}: {message}")
    return "\n".join(lines)


def parse_inference_deployment(obj: Any) -> InferenceDeployment:
    """Validate a decoded manifest; raises SpecError naming every bad field."""
    if not isinstance(obj, dict):
        raise SpecError(f"<root>: expected a mapping (an InferenceDeployment manifest), got {type(obj).__name__}")
    try:
        return InferenceDeployment.model_validate(obj)
    except ValidationError as e:
        raise SpecError(format_validation_error(e)) from None


def parse_spec(spec: Any) -> InferenceDeploymentSpec:
    """Validate a bare spec (what the operator receives from kopf)."""
    try:
        return InferenceDeploymentSpec.model_validate(spec)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, prefix="spec")) from None


def load_inference_deployment(path: str | Path) -> InferenceDeployment:
    """Read a YAML file holding one InferenceDeployment; raises SpecError with a clear message."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if len(docs) != 1:
        raise SpecError(f"{path}: expected exactly one YAML document, found {len(docs)}")
    return parse_inference_deployment(docs[0])
