"""The RL paths on one GPU (marked gpu; skipped without one): a trainer in this process shares the GPU with the
engine and pushes its weights through CUDA IPC handles, around sleep(level=2), and rayprism's logprobs of its
sampled tokens agree with the trainer's, in float32 (1e-3: TF32-free matmuls of other kernels) and in bf16
(the tolerance stated below)."""
from __future__ import annotations

import tempfile

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rayprism import LLM, SamplingParams
from tests.serving.helpers import smollm2_folder

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

PROMPT_IDS = [[1, 504, 3458, 282, 4649, 314] * 6, [1, 33, 28, 216, 34, 28, 216, 35, 28]]
ROLLOUT = SamplingParams(max_tokens=32, temperature=1.0, seed=0, logprobs=0, ignore_eos=True)
# bf16: the engine's and transformers' kernels round differently; a token's logprob differs by this much at most
# (to be confirmed on the first GPU run: bench/rlhf_bench.py reports the distribution).
BF16_MAX_ABS = 0.25
BF16_MEAN_ABS = 0.03


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/rp"))
    yield
    ray.shutdown()


def trainer(dtype: torch.dtype):
    """The trainer's model on this GPU, moved off the checkpoint (its first MLP zeroed) so a push shows."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=dtype).cuda().eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    return model


def logprob_gaps(llm, model) -> torch.Tensor:
    gaps = []
    with torch.no_grad():
        for prompt, out in zip(PROMPT_IDS, llm.generate(PROMPT_IDS, ROLLOUT)):
            logits = model(torch.tensor([prompt + out.token_ids], device="cuda")).logits[0, len(prompt) - 1: -1]
            expected = logits.float().log_softmax(-1).gather(-1, torch.tensor(out.token_ids, device="cuda")[:, None])
            gaps.append((torch.tensor(out.sampling_logprobs, device="cuda") - expected.squeeze(-1)).abs())
    return torch.cat(gaps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_colocated_push_through_cuda_ipc_around_sleep(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = trainer(dtype)
    llm = LLM(smollm2_folder(), device="cuda", dtype=str(dtype).removeprefix("torch."),
              kv_cache_memory_fraction=0.2)
    try:
        before = llm.memory()[0]["cuda_allocated_bytes"]
        llm.sleep(level=2)
        asleep = llm.memory()[0]["cuda_allocated_bytes"]
        assert asleep < before / 10, (before, asleep)
        llm.wake_up(["weights"])
        llm.update_weights(model.named_parameters(), bucket_bytes=32 << 20)   # CUDA IPC handles
        llm.wake_up(["kv_cache"])
        gaps = logprob_gaps(llm, model)
        print(f"{dtype}: max {gaps.max().item():.2e}, mean {gaps.mean().item():.2e}")
        if dtype == torch.float32:
            assert gaps.max().item() < 1e-3
            greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
            for prompt, out in zip(PROMPT_IDS, llm.generate(PROMPT_IDS, greedy)):
                reference = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=8,
                                           min_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
                assert out.token_ids == reference
        else:
            assert gaps.max().item() < BF16_MAX_ABS and gaps.mean().item() < BF16_MEAN_ABS
    finally:
        llm.shutdown()
