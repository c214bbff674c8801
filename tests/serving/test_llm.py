"""The LLM API through Ray workers (local Ray cluster, CPU, gloo): generation, streaming, aborts, weight
updates from disk and from a trainer, sleep/wake_up, named workers, shutdown and worker death."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import threading
import time

import pytest
import ray
from safetensors import safe_open

from rayprism.engine import InvalidRequestError, SamplingParams
from rayprism.executor import EngineDeadError
from rayprism.executor.weight_sync import weight_update_group
from rayprism.llm import LLM
from tests.serving.helpers import reference_outputs

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/rp"))
    yield
    ray.shutdown()


def reference_tokens(folder, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [tokens for tokens, _ in reference_outputs(folder, prompts, params)]


@pytest.fixture(scope="module")
def llm(checkpoints):
    template = str(checkpoints["a"]).replace("ckpt-a", "ckpt-{revision}")
    llm = LLM(template, revision="a", device="cpu")
    yield llm
    llm.shutdown()


def test_generate_matches_the_bare_engine(llm, checkpoints):
    results = llm.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == reference_tokens(checkpoints["a"])
    assert all(r.finish_reason == "length" and r.num_prompt_tokens > 0 and r.text for r in results)


async def test_n_and_best_of(llm):
    """Each prompt's n sequences come together; with best_of > n, the n of highest cumulative logprob, best first."""
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    results = llm.generate(PROMPTS, [SamplingParams(**{**vars(sampled), "n": 2}), sampled])
    assert [r.index for r in results] == [0, 1, 0] and results[0].token_ids != results[1].token_ids
    assert results[2].token_ids == llm.generate(PROMPTS[1], sampled)[0].token_ids
    best = [out async for out in llm.generate_async(PROMPTS[0], SamplingParams(**{**vars(sampled), "n": 2,
                                                                                  "best_of": 4}))]
    all_four = llm.generate(PROMPTS[0], SamplingParams(**{**vars(sampled), "n": 4}))
    assert [b.index for b in best] == [0, 1]
    assert best[0].cumulative_logprob >= best[1].cumulative_logprob
    assert {tuple(b.token_ids) for b in best} <= {tuple(a.token_ids) for a in all_four}


async def test_stream_increments_add_up_and_leaving_early_aborts(llm):
    [whole] = llm.generate(PROMPTS[0], GREEDY)
    pieces = [out async for out in llm.generate_async(PROMPTS[0], GREEDY, stream=True)]
    assert "".join(p.new_text for p in pieces) == whole.text
    assert sum((p.new_token_ids for p in pieces), []) == whole.token_ids
    assert pieces[-1].finished and not any(p.finished for p in pieces[:-1])

    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    aborted = llm.stats()["num_aborted"]
    async with contextlib.aclosing(llm.generate_async(PROMPTS[0], long, stream=True)) as stream:
        async for _ in stream:
            break                               # closing the stream aborts the request in the engine
    assert llm.num_in_flight() == 0
    deadline = time.monotonic() + 10
    while llm.stats()["num_aborted"] == aborted and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert llm.stats()["num_aborted"] == aborted + 1


def test_invalid_requests_name_the_parameter(llm):
    with pytest.raises(InvalidRequestError, match="temperature"):
        llm.generate("hi", SamplingParams(temperature=-1))
    with pytest.raises(InvalidRequestError) as err:      # rejected by the engine on rank 0
        llm.generate("hi " * 600, SamplingParams(max_tokens=4))
    assert "prompt" in str(err.value)
    assert llm.generate("hi", GREEDY)[0].finish_reason == "length"   # still serving


async def test_update_weights_while_streaming_loses_nothing(llm, checkpoints):
    expected_b = reference_tokens(checkpoints["b"])
    assert expected_b != reference_tokens(checkpoints["a"]), "the two checkpoints must disagree"
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def stream(prompt):
        return [out async for out in llm.generate_async(prompt, long, stream=True)]

    tasks = [asyncio.create_task(stream(p)) for p in PROMPTS * 3]
    while llm.stats().get("num_running", 0) == 0:
        await asyncio.sleep(0.05)
    await asyncio.to_thread(llm.update_weights, revision="b")
    for outputs in await asyncio.gather(*tasks):
        assert outputs[-1].finish_reason == "length" and outputs[-1].num_output_tokens == 60
    assert [r.token_ids for r in llm.generate(PROMPTS, GREEDY)] == expected_b
    assert llm.revision == "b"
    llm.update_weights(revision="a")
    assert [r.token_ids for r in llm.generate(PROMPTS, GREEDY)] == reference_tokens(checkpoints["a"])


def test_ten_weight_updates_keep_memory_flat(llm):
    llm.update_weights(revision="b")
    llm.update_weights(revision="a")      # warm both paths once
    before = llm.memory()[0]["rss_bytes"]
    for i in range(10):
        llm.update_weights(revision="ab"[i % 2])
    after = llm.memory()[0]["rss_bytes"]
    print(f"worker RSS before {before / 2**20:.1f} MiB, after 10 updates {after / 2**20:.1f} MiB")
    assert after - before < 32 * 2**20, (before, after)


def test_update_weights_from_a_trainer_broadcast(llm, checkpoints):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    world_size = 1 + llm.tensor_parallel_size
    joined = {}
    trainer = threading.Thread(target=lambda: joined.update(
        group=weight_update_group("127.0.0.1", port, 0, world_size, "gloo", "test-sync")))
    trainer.start()
    llm.init_weight_update_group("127.0.0.1", port, rank_offset=1, world_size=world_size, backend="gloo",
                                 group_name="test-sync")
    trainer.join()

    with safe_open(str(checkpoints["b"] / "model.safetensors"), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}

    def broadcast():
        for tensor in tensors.values():
            joined["group"].broadcast(tensor, 0).wait()

    sender = threading.Thread(target=broadcast)
    sender.start()
    llm.update_weights_from_distributed(list(tensors), [t.dtype for t in tensors.values()],
                                        [t.shape for t in tensors.values()])
    sender.join()
    assert [r.token_ids for r in llm.generate(PROMPTS, GREEDY)] == reference_tokens(checkpoints["b"])
    llm.update_weights(revision="a")


async def test_sleep_pauses_requests_until_wake_up(llm):
    [before] = llm.generate(PROMPTS[0], GREEDY)
    llm.sleep()
    task = asyncio.create_task(anext(llm.generate_async(PROMPTS[0], GREEDY)))
    await asyncio.sleep(1)
    assert not task.done()
    llm.wake_up()
    assert (await asyncio.wait_for(task, 30)).token_ids == before.token_ids


def test_named_workers_reconnect_and_shutdown_frees_everything(checkpoints):
    first = LLM(str(checkpoints["a"]), device="cpu", name="rp-test", namespace="rp-tests", detached=True)
    expected = first.generate(PROMPTS, GREEDY)
    first.disconnect()
    again = LLM.connect("rp-test", namespace="rp-tests")
    assert [r.token_ids for r in again.generate(PROMPTS, GREEDY)] == [r.token_ids for r in expected]
    pg_id = again._executor._owned_pg.id.hex()
    again.shutdown()
    with pytest.raises(ValueError):
        ray.get_actor("rp-test-rank0", namespace="rp-tests")
    assert ray.util.placement_group_table()[pg_id]["state"] == "REMOVED"


async def test_a_dead_worker_fails_requests_and_health_quickly(checkpoints):
    llm = LLM(str(checkpoints["a"]), device="cpu", tensor_parallel_size=2)
    try:
        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        stream = llm.generate_async(PROMPTS[0], long, stream=True)
        await anext(stream)
        ray.kill(llm._executor.workers[1])
        started = time.monotonic()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert time.monotonic() - started < 10
        with pytest.raises(EngineDeadError):
            llm.check_health()
        with pytest.raises(EngineDeadError):
            llm.generate("hi", GREEDY)
    finally:
        llm.shutdown()


def test_runs_in_a_given_placement_group_and_leaves_it(checkpoints):
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    shared = placement_group([{"CPU": 1}, {"CPU": 1}])     # e.g. a trainer's group
    ray.get(shared.ready())
    try:
        llm = LLM(str(checkpoints["a"]), device="cpu", placement_group=shared, bundle_indices=[1])
        assert llm.generate(PROMPTS, GREEDY)[0].finish_reason == "length"
        llm.shutdown()
        assert placement_group_table(shared)["state"] == "CREATED"    # not ours to remove
        with pytest.raises(ValueError, match="bundle_indices"):
            LLM(str(checkpoints["a"]), device="cpu", placement_group=shared, bundle_indices=[0, 1])
    finally:
        remove_placement_group(shared)
