"""CUDA checks (marked gpu: skipped without a GPU; run on a GPU host)."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from rayprism.engine import EngineConfig, LLMEngine, SamplingParams

from .helpers import generate, prefill_logits
from .test_smollm2 import PROMPTS
from .test_tensor_parallel import assert_greedy_rows_unchanged, free_port, run_model, tp_worker

# bfloat16 keeps ~3 significant digits and our kernels sum in a different order than transformers':
# logits may differ by up to 2% + 0.3 (they range over about +-30), and greedy paths may part at a
# near-tie, so only the first 8 tokens must agree.
BF16_RTOL, BF16_ATOL, BF16_SAME_PREFIX = 0.02, 0.3, 8


@pytest.mark.gpu
def test_bf16_smollm2_close_to_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(model=smollm2_dir, device="cuda", dtype="bfloat16", num_kv_blocks=256))
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).cuda()
    ours = generate(engine, PROMPTS, SamplingParams(max_tokens=32, temperature=0))
    for i, prompt in enumerate(PROMPTS):
        ids = engine.tokenizer(prompt, return_tensors="pt").input_ids.cuda()
        expected_logits = reference(ids).logits[0, -1].float().cpu()
        torch.testing.assert_close(
            prefill_logits(engine, ids[0].tolist())[0], expected_logits, rtol=BF16_RTOL, atol=BF16_ATOL
        )
        expected = reference.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        assert ours[str(i)]["token_ids"][:BF16_SAME_PREFIX] == expected[:BF16_SAME_PREFIX], prompt


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_over_nccl_matches_tp1(tiny_llama_dir, tiny_qwen2_dir, tiny_qwen3_dir, tiny_mixtral_dir,
                                   tiny_qwen3_moe_dir, tmp_path):
    folders = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "qwen3": tiny_qwen3_dir, "mixtral": tiny_mixtral_dir,
               "qwen3_moe": tiny_qwen3_moe_dir}
    mp.spawn(tp_worker, args=(free_port(), folders, str(tmp_path), "cuda"), nprocs=2, join=True)
    for name, folder in folders.items():
        tp2 = torch.load(os.path.join(tmp_path, f"{name}.pt"))
        tp1 = run_model(LLMEngine(EngineConfig(model=folder, num_kv_blocks=32, device="cuda", dtype="float32")), folder)
        torch.testing.assert_close(tp2["logits"], tp1["logits"], rtol=1e-3, atol=1e-3)
        assert tp2["tokens"] == tp1["tokens"] == tp2["mixed_step_tokens"]
        assert_greedy_rows_unchanged(tp2["sampled_between"], tp1["tokens"])
        torch.testing.assert_close(tp2["updated_logits"], tp1["updated_logits"], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_kv_pool_sized_from_free_memory(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, device="cuda", kv_cache_memory_fraction=0.05))
    free, _ = torch.cuda.mem_get_info()
    assert engine.runner.num_kv_blocks > 1000 and engine.runner.kv_cache.numel() * 2 < free * 0.1
    result = generate(engine, ["Hello"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(result["0"]["token_ids"]) == 4


@pytest.mark.gpu
def test_logits_processors_through_decode_graphs_match_eager(tiny_llama_dir):
    """Penalties read pending tokens from the previous step's, on the device: the same tokens with the decode
    CUDA graphs as without, next to greedy rows (which then share sampled steps)."""
    def run(enforce_eager):
        engine = LLMEngine(EngineConfig(model=tiny_llama_dir, device="cuda", dtype="float32", num_kv_blocks=64,
                                        max_model_len=128, enforce_eager=enforce_eager))
        params = [SamplingParams(**{"max_tokens": 24, "temperature": 0, "ignore_eos": True, **extra}) for extra in (
            {"frequency_penalty": 2.0}, {"repetition_penalty": 1e6}, {}, {"logit_bias": {1234: 100}},
            {"presence_penalty": 2.0, "min_tokens": 4, "temperature": 1.0, "seed": 5})]
        return [r["token_ids"] for r in generate(engine, PROMPTS[:1] * 5, params, staggered=True).values()]
    graphs = run(False)
    assert graphs == run(True)
    assert len(set(graphs[0])) == len(graphs[0]) and len(set(graphs[1])) == len(graphs[1])
    assert graphs[3] == [1234] * 24
