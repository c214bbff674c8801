"""Remote rollout over HTTP (issue #19; NeMo-RL's HTTP backend, verl's STANDALONE mode): a trainer drives the
server's admin port (token-guarded) to pause and resume generation, sleep and wake the engine, join a gloo
weight-update group and broadcast new weights into it, and samples through /v1/completions with token ids in and
out (return_tokens_as_token_ids) and logprobs, with the real openai client; the server runs in process over a real
LLM (Ray, TP 2, CPU)."""
from __future__ import annotations

import asyncio
import tempfile
import threading

import openai
import pytest
import ray
from aiohttp.test_utils import TestClient, TestServer
from safetensors.torch import load_file

from rayprism import LLM, SamplingParams
from rayprism.executor.weight_sync import weight_update_group
from rayprism.server.app import Server
from tests.serving.helpers import free_port, reference_outputs

pytestmark = pytest.mark.slow

TOKEN = "rollout-token"
PROMPT_IDS = [1, 504, 3458, 282, 4649, 314] * 6   # two full KV blocks: cached, and dropped by weight updates
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoints):
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/rp"))
    llm = LLM(str(checkpoints["a"]), device="cpu", dtype="float32", tensor_parallel_size=2)
    yield llm
    llm.shutdown()
    ray.shutdown()


@pytest.fixture
async def ports(llm, checkpoints, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    server = Server(served_model_name="tiny", model_uri=str(checkpoints["a"]), revision=None, max_in_flight=8,
                    admin_token_file=str(token_file))
    server.set_llm(llm)
    async with TestClient(TestServer(server.app())) as openai_port, \
            TestClient(TestServer(server.admin_app())) as admin_port:
        yield openai.AsyncOpenAI(base_url=str(openai_port.make_url("/v1")), api_key="unused", max_retries=0), \
            admin_port


async def admin(admin_port, path: str, **body) -> dict:
    response = await admin_port.post(f"/admin/v1/{path}", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200, await response.text()
    return await response.json()


async def greedy_tokens(client) -> list[int]:
    """Token ids in; token ids (vLLM's return_tokens_as_token_ids) and their logprobs out."""
    completion = await client.completions.create(
        model="tiny", prompt=PROMPT_IDS, max_tokens=10, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 10 and all(lp <= 0 for lp in logprobs.token_logprobs)
    return [int(token.removeprefix("token_id:")) for token in logprobs.tokens]


def reference_tokens(folder) -> list[int]:
    return reference_outputs(folder, [PROMPT_IDS], GREEDY)[0][0]


async def test_admin_controls_need_the_token_and_name_bad_fields(ports):
    _, admin_port = ports
    assert (await admin_port.post("/admin/v1/pause")).status == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = await admin_port.post("/admin/v1/sleep", json={"level": "deep"}, headers=headers)
    assert response.status == 400 and (await response.json())["error"]["param"] == "level"
    response = await admin_port.post("/admin/v1/weight_update_group", json={"master_port": 1}, headers=headers)
    assert response.status == 400 and (await response.json())["error"]["param"] == "master_address"
    response = await admin_port.post("/admin/v1/wake_up", json={"tags": ["optimizer"]}, headers=headers)
    assert response.status == 400 and "tags" in (await response.json())["error"]["message"]


async def test_pause_holds_completions_until_resume(ports, checkpoints):
    client, admin_port = ports
    await admin(admin_port, "pause")
    completion = asyncio.create_task(greedy_tokens(client))
    await asyncio.sleep(1)
    assert not completion.done()
    await admin(admin_port, "resume")
    assert await asyncio.wait_for(completion, 30) == reference_tokens(checkpoints["a"])


async def test_reset_prefix_cache_forgets_cached_prompts(ports, llm):
    client, admin_port = ports

    async def hits_of_a_repeat() -> int:
        before = llm.stats()["prefix_cache_hits"]
        await greedy_tokens(client)
        return llm.stats()["prefix_cache_hits"] - before

    await greedy_tokens(client)
    assert await hits_of_a_repeat() >= 32
    await admin(admin_port, "reset_prefix_cache")
    assert await hits_of_a_repeat() == 0


async def test_a_trainer_pushes_weights_over_a_group_around_sleep(ports, llm, checkpoints):
    """NeMo-RL's sequence: init the group once; per step: sleep, wake the weights, broadcast, wake the KV cache."""
    client, admin_port = ports
    port, world_size = free_port(), 1 + llm.tensor_parallel_size
    trainer = {}
    joining = threading.Thread(target=lambda: trainer.update(
        group=weight_update_group("127.0.0.1", port, 0, world_size, "gloo", "http-sync")))
    joining.start()
    await admin(admin_port, "weight_update_group", master_address="127.0.0.1", master_port=port, rank_offset=1,
                world_size=world_size, backend="gloo", group_name="http-sync")
    joining.join()
    for revision in "ba":
        tensors = load_file(str(checkpoints[revision] / "model.safetensors"))
        await admin(admin_port, "sleep", level=2)
        await admin(admin_port, "wake_up", tags=["weights"])
        sender = threading.Thread(target=lambda: [trainer["group"].broadcast(t, 0).wait() for t in tensors.values()])
        sender.start()
        await admin(admin_port, "weights/update_from_group", names=list(tensors),
                    dtypes=[str(t.dtype) for t in tensors.values()], shapes=[list(t.shape) for t in tensors.values()])
        sender.join()
        await admin(admin_port, "wake_up", tags=["kv_cache"])
        assert await greedy_tokens(client) == reference_tokens(checkpoints[revision])
