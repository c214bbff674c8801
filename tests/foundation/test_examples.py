"""Every manifest in examples/: a valid InferenceDeployment whose RayClusters take one GPU per rank (and pass KubeRay's
schema where it is beside the repo), sized for its model: the bf16 weights fit the GPUs with room for the KV
cache, and the pod's cache holds the download."""
import jsonschema
import pytest
import yaml

from rayprism_operator import render
from rayprism_operator.api import parse_inference_deployment

from .conftest import EXAMPLES
from .test_render import KUBERAY_CRD, _inference_pool_schema, _kuberay_schema, _unknown_fields

# example -> (hub model, bytes of its bf16 safetensors)
GPU_EXAMPLES = {
    "llama.yaml": ("hf://meta-llama/Llama-3.1-8B-Instruct", 16.1e9),
    "qwen3.yaml": ("hf://Qwen/Qwen3-8B", 16.4e9),
    "qwen3-moe.yaml": ("hf://Qwen/Qwen3-30B-A3B", 61.1e9),
    "mixtral.yaml": ("hf://mistralai/Mixtral-8x7B-Instruct-v0.1", 93.4e9),
}
GPU_BYTES = 80e9  # the examples are sized for 80 GB cards (H100, A100 80GB)


def load(name: str):
    infd = parse_inference_deployment(yaml.safe_load((EXAMPLES / name).read_text()))
    infd.metadata.uid = "0b9d-uid"
    return infd


@pytest.mark.parametrize("name", sorted(path.name for path in EXAMPLES.glob("*.yaml")))
def test_every_example_renders_rayclusters_with_a_gpu_per_rank(name):
    infd = load(name)
    ranks = infd.spec.parallelism.tensor * infd.spec.parallelism.pipeline
    gpus = infd.spec.resources.gpus_per_node
    clusters = [o for o in render.render_all(infd, render.RenderOptions()) if o["kind"] == "RayCluster"]
    assert clusters
    for cluster in clusters:
        [group] = cluster["spec"]["workerGroupSpecs"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == (str(min(ranks, gpus)) if gpus else None)
        assert group["replicas"] * min(ranks, gpus or ranks) == ranks
        if KUBERAY_CRD.exists():
            jsonschema.validate(cluster, _kuberay_schema())
            assert list(_unknown_fields(cluster, _kuberay_schema())) == []


def test_every_gpu_example_is_sized_here():
    gpu_examples = {path.name for path in EXAMPLES.glob("*.yaml") if load(path.name).spec.resources.gpus_per_node}
    assert gpu_examples == set(GPU_EXAMPLES)


@pytest.mark.parametrize("name", sorted(GPU_EXAMPLES))
def test_weights_fit_the_gpus_and_the_cache(name):
    uri, weight_bytes = GPU_EXAMPLES[name]
    spec = load(name).spec
    assert spec.model.uri == uri and spec.model.dtype == "bfloat16"
    ranks = spec.parallelism.tensor * spec.parallelism.pipeline
    # each rank's share of the weights leaves at least a third of its GPU to the KV cache and activations
    assert weight_bytes / ranks <= GPU_BYTES * 2 / 3, f"{weight_bytes / ranks / 1e9:.1f} GB per GPU"
    # each pod downloads the whole checkpoint into its cache volume, next to the compiled kernels
    assert render.quantity_bytes(spec.resources.cache_storage) >= 1.15 * weight_bytes


def test_the_inference_pool_example_renders_a_pool_the_crd_accepts():
    infd = load("smollm2-inference-pool.yaml")
    [pool] = [o for o in render.render_all(infd, render.RenderOptions()) if o["kind"] == "InferencePool"]
    assert pool["spec"]["endpointPickerRef"]["name"] == "smollm2-epp"
    jsonschema.validate(pool, _inference_pool_schema())
    assert list(_unknown_fields(pool, _inference_pool_schema())) == []
