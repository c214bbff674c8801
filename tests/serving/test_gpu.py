"""On two CUDA GPUs: tensor parallel 2 over NCCL, sleep/wake_up releasing device memory, and a trainer on the
other GPU broadcasting new weights over a NCCL weight update group."""
from __future__ import annotations

import socket
import tempfile
import threading

import pytest
import ray
import torch
from safetensors.torch import load_file

from rayprism.engine import SamplingParams
from rayprism.executor.weight_sync import weight_update_group
from rayprism.llm import LLM

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/rp"))
    yield
    ray.shutdown()


def test_tp2_over_nccl_and_sleep_releases_gpu_memory(checkpoints):
    with LLM(str(checkpoints["a"]), device="cuda", tensor_parallel_size=2) as llm:
        expected = llm.generate(["Hello there"], GREEDY)[0].token_ids
        awake = [rank["cuda_allocated_bytes"] for rank in llm.memory()]
        llm.sleep()
        asleep = [rank["cuda_allocated_bytes"] for rank in llm.memory()]
        assert all(s < a / 10 for s, a in zip(asleep, awake)), (awake, asleep)
        llm.wake_up()
        assert llm.generate(["Hello there"], GREEDY)[0].token_ids == expected


def test_weights_from_a_trainer_over_nccl(checkpoints):
    with LLM(str(checkpoints["a"]), device="cuda", kv_cache_memory_fraction=0.3) as llm:
        llm.update_weights(str(checkpoints["b"]))
        expected_b = llm.generate(["Hello there"], GREEDY)[0].token_ids
        llm.update_weights(str(checkpoints["a"]))
        assert llm.generate(["Hello there"], GREEDY)[0].token_ids != expected_b

        worker_gpu = int(ray.get(llm._executor.workers[0].__ray_call__.remote(lambda _: ray.get_gpu_ids()))[0])
        trainer_device = torch.device("cuda", 1 - worker_gpu)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        trainer = {}

        def join():
            torch.cuda.set_device(trainer_device)
            trainer["group"] = weight_update_group("127.0.0.1", port, 0, 2, "nccl", "gpu-test")

        joining = threading.Thread(target=join)
        joining.start()
        llm.init_weight_update_group("127.0.0.1", port, rank_offset=1, world_size=2, backend="nccl",
                                     group_name="gpu-test")
        joining.join()
        tensors = {k: v.to(trainer_device) for k, v in load_file(str(checkpoints["b"] / "model.safetensors")).items()}

        def send():
            torch.cuda.set_device(trainer_device)
            for tensor in tensors.values():
                trainer["group"].broadcast(tensor, 0).wait()
            torch.cuda.synchronize(trainer_device)

        sending = threading.Thread(target=send)
        sending.start()
        llm.update_weights_from_distributed(list(tensors), [t.dtype for t in tensors.values()],
                                            [t.shape for t in tensors.values()])
        sending.join()
        assert llm.generate(["Hello there"], GREEDY)[0].token_ids == expected_b
