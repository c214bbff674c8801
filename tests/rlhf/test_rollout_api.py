"""What a trainer drives (issue #19), through Ray workers at tensor parallel 2 on the CPU: token ids in, token
ids, sampling logprobs and the finish reason out; aborts; pause/resume; sleep levels and wake_up by tag; weights
pushed from tensors in buckets, resharded like a checkpoint load."""
from __future__ import annotations

import asyncio
import tempfile
import threading
import time

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rayprism import LLM, SamplingParams
from tests.serving.helpers import reference_outputs

pytestmark = pytest.mark.slow

# Longer than two KV blocks (16 tokens): their prefixes are cached, so a weight update must drop them.
PROMPT_IDS = [[1, 504, 3458, 282, 4649, 314] * 6, [1, 33, 28, 216, 34, 28] * 6]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/rp"))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def llm(checkpoints):
    llm = LLM(str(checkpoints["a"]), device="cpu", dtype="float32", tensor_parallel_size=2)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def tensors(checkpoints) -> dict[str, dict[str, torch.Tensor]]:
    return {rev: load_file(str(folder / "model.safetensors")) for rev, folder in checkpoints.items()}


def greedy_tokens(llm) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(PROMPT_IDS, GREEDY)]


def sampling_distribution_logprobs(folder, prompt: list[int], tokens: list[int], temperature: float,
                                   top_k: int) -> torch.Tensor:
    """transformers' logprobs of `tokens` after `prompt`, under softmax(top-k of logits / temperature)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1] / temperature
    kth = logits.topk(top_k, dim=-1).values[:, -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_token_ids_in_sampling_logprobs_and_finish_reasons_out(llm, checkpoints):
    params = SamplingParams(max_tokens=12, temperature=7.0, top_k=40, seed=5, logprobs=0, ignore_eos=True)
    outputs = llm.generate(PROMPT_IDS, params)
    for prompt, out in zip(PROMPT_IDS, outputs):
        assert out.finish_reason == "length" and len(out.token_ids) == 12 == len(out.sampling_logprobs)
        expected = sampling_distribution_logprobs(checkpoints["a"], prompt, out.token_ids, 7.0, 40)
        torch.testing.assert_close(torch.tensor(out.sampling_logprobs), expected, atol=1e-4, rtol=0)
        # The model's own distribution is another one: top-k and the temperature change every logprob here.
        assert max(abs(a - b) for a, b in zip(out.model_logprobs, out.sampling_logprobs)) > 1e-2
    greedy = greedy_tokens(llm)
    [stopped] = llm.generate(PROMPT_IDS[0], SamplingParams(max_tokens=10, temperature=0,
                                                           stop_token_ids=[greedy[0][3]]))
    assert stopped.finish_reason == "stop" and stopped.token_ids == greedy[0][:4]


async def test_abort_one_request_returns_its_tokens_so_far(llm):
    stream = llm.generate_async(PROMPT_IDS[0], LONG, request_id="rollout-7")
    task = asyncio.create_task(anext(stream))
    await asyncio.sleep(1.0)
    llm.abort("rollout-7")
    [out] = [await asyncio.wait_for(task, 30)]
    assert out.finish_reason == "abort" and 0 < len(out.token_ids) < 500


def test_abort_all_ends_every_request(llm):
    results = {}
    rollout = threading.Thread(target=lambda: results.update(out=llm.generate(PROMPT_IDS, LONG)))
    rollout.start()
    time.sleep(1.5)
    llm.abort_all()
    rollout.join(30)
    assert not rollout.is_alive()
    assert [out.finish_reason for out in results["out"]] == ["abort", "abort"]
    assert llm.num_in_flight() == 0 and greedy_tokens(llm)   # the replica serves on


async def test_pause_holds_requests_until_resume(llm):
    expected = greedy_tokens(llm)
    llm.pause()
    task = asyncio.create_task(anext(llm.generate_async(PROMPT_IDS[0], GREEDY)))
    await asyncio.sleep(1)
    assert not task.done()
    llm.resume()
    assert (await asyncio.wait_for(task, 30)).token_ids == expected[0]


def test_sleep_level_2_then_verl_order_weights_update_kv(llm, tensors, checkpoints):
    expected_a = greedy_tokens(llm)
    llm.update_weights(tensors["b"].items())
    expected_b = greedy_tokens(llm)   # the prompts' cached KV blocks were computed with a's weights: not reused
    assert expected_b == [tokens for tokens, _ in reference_outputs(checkpoints["b"], PROMPT_IDS, GREEDY)]
    assert expected_b != expected_a
    llm.sleep(level=2)
    with pytest.raises(ValueError, match="weights awake first"):
        llm.wake_up(["kv_cache"])
    llm.wake_up(["weights"])
    # Small buckets: many Ray objects, each loaded by both ranks into their slices.
    llm.update_weights(tensors["a"].items(), bucket_bytes=1 << 20)
    llm.wake_up(["kv_cache"])
    assert greedy_tokens(llm) == expected_a


async def test_sleep_level_1_keeps_the_weights_and_requests_wait(llm):
    expected = greedy_tokens(llm)
    llm.sleep(level=1)
    task = asyncio.create_task(anext(llm.generate_async(PROMPT_IDS[1], GREEDY)))
    await asyncio.sleep(1)
    assert not task.done()
    llm.wake_up(["weights"])
    await asyncio.sleep(0.5)
    assert not task.done()   # the KV cache is still asleep
    llm.wake_up(["kv_cache"])
    assert (await asyncio.wait_for(task, 30)).token_ids == expected[1]


def test_bad_weight_updates_are_refused_by_name(llm, tensors):
    with pytest.raises(ValueError, match="bucket_bytes"):
        llm.update_weights(tensors["a"].items(), bucket_bytes=0)
    with pytest.raises(TypeError, match=r"\(name, torch.Tensor\)"):
        llm.update_weights([("model.norm.weight", [1.0, 2.0])])
    with pytest.raises(ray.exceptions.RayTaskError, match="model.no_such.weight"):
        llm.update_weights([("model.no_such.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="level must be 1 or 2"):
        llm.sleep(level=3)
    assert greedy_tokens(llm)   # still serving
