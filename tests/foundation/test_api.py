"""The InferenceDeployment models: defaults, bounds and cross-field rules, with errors naming the field."""

import pytest

from rayprism_operator.api import SpecError, parse_inference_deployment

from .conftest import with_changes


def test_examples_are_valid(llama, smollm2):
    infd = parse_inference_deployment(llama)
    assert infd.spec.parallelism.tensor == 2 and infd.spec.replicas == 2
    assert infd.spec.resources.gpus_per_node == 8
    small = parse_inference_deployment(smollm2)
    assert small.spec.model.uri == "builtin://smollm2-135m-instruct"


def test_defaults_fill_in(llama):
    minimal = {"apiVersion": llama["apiVersion"], "kind": llama["kind"], "metadata": {"name": "m"},
               "spec": {"model": {"name": "m", "uri": "hf://org/m"}}}
    spec = parse_inference_deployment(minimal).spec
    assert spec.replicas == 1
    assert (spec.parallelism.tensor, spec.parallelism.pipeline) == (1, 1)
    assert spec.resources.gpu_resource_name == "nvidia.com/gpu"
    assert spec.rollout.strategy == "RollingUpdate"
    assert (spec.rollout.max_surge, spec.rollout.max_unavailable) == (0, 1)
    assert spec.rollout.weight_update == "InPlace"
    assert spec.service.port == 8000


BAD = [
    ({"spec.replicas": "two"}, "spec.replicas: Input should be a valid integer"),
    ({"spec.replicas": -1}, "spec.replicas: Input should be greater than or equal to 0"),
    ({"spec.parallelism.tensor": 0}, "spec.parallelism.tensor: Input should be greater than or equal to 1"),
    ({"spec.parallelism.tensr": 2}, "spec.parallelism.tensr: unknown field"),
    ({"spec.colour": "blue"}, "spec.colour: unknown field"),
    ({"spec.model.uri": "gs://bucket/m"}, "spec.model: model.uri must use a supported scheme"),
    ({"spec.model.dtype": "int3"}, "spec.model.dtype: Input should be 'auto', 'bfloat16', 'float16' or 'float32'"),
    ({"spec.parallelism.tensor": 16}, "spec: parallelism must fit resources.gpusPerNode"),
    ({"spec.parallelism.tensor": 3, "spec.parallelism.pipeline": 3}, "spec: parallelism must fit"),
    ({"spec.rollout.maxSurge": 0, "spec.rollout.maxUnavailable": 0},
     "spec.rollout: rollout.maxSurge and rollout.maxUnavailable must not both be 0"),
    ({"spec.rollout.strategy": "BlueGreen"}, "spec.rollout.strategy: Input should be 'RollingUpdate' or 'Recreate'"),
    ({"spec.engine.kvCacheMemoryFraction": 1.5}, "spec.engine.kvCacheMemoryFraction: Input should be less than"),
    ({"spec.resources.memory": "lots"}, "spec.resources.memory: String should match pattern"),
    ({"metadata.name": "x" * 37}, "metadata: metadata.name must be at most 36 characters"),
    ({"metadata.name": "Bad_Name"}, "metadata: metadata.name must start with a letter"),
    ({"metadata.name": "8b-llama"}, "metadata: metadata.name must start with a letter"),
    ({"spec.model.revision": ""}, "spec.model.revision: String should have at least 1 character"),
    ({"kind": "Deployment"}, "kind: Input should be 'InferenceDeployment'"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m.split(":")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_specs_name_the_field(llama, changes, message):
    with pytest.raises(SpecError) as info:
        parse_inference_deployment(with_changes(llama, **changes))
    assert message in str(info.value)


def test_missing_required_field(llama):
    del llama["spec"]["model"]["uri"]
    with pytest.raises(SpecError, match=r"spec\.model\.uri: Field required"):
        parse_inference_deployment(llama)


def test_not_a_mapping():
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_inference_deployment(["a", "list"])


@pytest.mark.parametrize("tensor,pipeline,gpus,fits", [
    (1, 1, 8, True), (2, 1, 8, True), (8, 1, 8, True), (2, 4, 8, True), (8, 2, 8, True), (4, 4, 8, True),
    (16, 1, 8, False),   # a tensor-parallel group would span nodes
    (3, 3, 8, False),    # 9 GPUs: pods could not hold whole tensor groups
    (2, 5, 8, False),    # 10 GPUs: not a whole number of 8-GPU pods
    (3, 1, 8, True), (3, 2, 8, True), (3, 3, 0, True),  # gpusPerNode 0: CPU ranks
])
def test_topology_rule(llama, tensor, pipeline, gpus, fits):
    manifest = with_changes(llama, **{"spec.parallelism.tensor": tensor, "spec.parallelism.pipeline": pipeline,
                                      "spec.resources.gpusPerNode": gpus})
    if fits:
        parse_inference_deployment(manifest)
    else:
        with pytest.raises(SpecError, match="parallelism must fit"):
            parse_inference_deployment(manifest)
