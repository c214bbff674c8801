"""Tensor parallel 2 with its ranks on two Ray nodes (`ray start --head` + `ray start --address` on this
machine) gives the same greedy tokens as tensor parallel 1 (the bare engine)."""
from __future__ import annotations

import time

import pytest
import ray

from rayprism.engine import SamplingParams
from rayprism.llm import LLM
from tests.serving.helpers import RayNodes, reference_outputs

pytestmark = pytest.mark.slow

PROMPTS = ["Tensor parallel ranks", "on two nodes agree"]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def two_nodes():
    nodes = RayNodes(head_cpus=1, worker_cpus=[1])
    ray.init(address=nodes.address)
    nodes.wait_for_nodes(2)
    yield nodes
    ray.shutdown()
    nodes.stop()


def test_tp2_across_two_nodes_matches_tp1(two_nodes, checkpoints):
    expected = [tokens for tokens, _ in reference_outputs(checkpoints["a"], PROMPTS, GREEDY)]
    with LLM(str(checkpoints["a"]), device="cpu", tensor_parallel_size=2, placement_strategy="STRICT_SPREAD") as llm:
        nodes = ray.get([w.node_id.remote() for w in llm._executor.workers])
        assert len(set(nodes)) == 2
        assert [r.token_ids for r in llm.generate(PROMPTS, GREEDY)] == expected
    deadline = time.monotonic() + 20       # the raylets report freed bundles asynchronously
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 2
