"""Tensor parallel 2 over gloo (two spawned processes) against tensor parallel 1 in this process."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from rayprism.engine import EngineConfig, LLMEngine, ModelRunner, SamplingParams

from .helpers import exit_without_finalizing, generate, prefill_logits

PROMPTS = ["The capital of France is", "Hello", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16"]
PROBE_IDS = [1, 504, 3458, 282, 4649, 314, 1345, 30, 216, 17, 28, 34, 28, 35]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
# A sampled request between greedy ones: its steps gather logits to rank 0, the steps after it are greedy again.
SAMPLED_BETWEEN = [GREEDY, SamplingParams(max_tokens=4, temperature=0.8, seed=3, ignore_eos=True), GREEDY]
# Three sequences forked from one prefill (the partial prompt block copied on every rank), with prompt logprobs.
FORKED = SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=3, prompt_logprobs=2, ignore_eos=True)


def scaled_norms(folder: str) -> list[tuple[str, torch.Tensor]]:
    """An RLHF-style partial weight update: every norm weight (Qwen3's q/k norms too) and every tensor of expert 1
    of the mixtures of experts (into its rows of the stacked expert parameters) scaled by 1.5."""
    state = load_file(os.path.join(folder, "model.safetensors"))
    return [(name, t * 1.5) for name, t in state.items() if name.endswith("norm.weight") or ".experts.1." in name]


def run_model(engine: LLMEngine, folder: str) -> dict:
    result = {"logits": prefill_logits(engine, PROBE_IDS), "tokens": generate(engine, PROMPTS, GREEDY),
              "mixed_step_tokens": generate(engine, PROMPTS, GREEDY, staggered=True),
              "sampled_between": generate(engine, PROMPTS, SAMPLED_BETWEEN, staggered=True),
              "forked": generate(engine, PROMPTS[2:], FORKED)}
    engine.scheduler.max_num_batched_tokens = 8   # chunked prefill, after prefixes cached by the runs above
    result["chunked_tokens"] = generate(engine, PROMPTS, GREEDY, staggered=True)
    engine.scheduler.max_num_batched_tokens = engine.config.max_num_batched_tokens
    result["prefix_cache_hits"] = engine.stats()["prefix_cache_hits"]
    engine.update_weights_from_tensors(scaled_norms(folder))
    result["updated_logits"] = prefill_logits(engine, PROBE_IDS)
    return result


def assert_greedy_rows_unchanged(sampled_between: dict, greedy: dict) -> None:
    """The greedy requests of SAMPLED_BETWEEN got the tokens they get alone; the sampled one got its 4."""
    for request in ("0", "2"):
        assert sampled_between[request]["token_ids"] == greedy[request]["token_ids"], request
    assert len(sampled_between["1"]["token_ids"]) == 4


def tp_worker(rank: int, port: int, folders: dict, out_dir: str, device: str = "cpu") -> None:
    torch.set_num_threads(1)  # two processes share the two cores
    if device == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for name, folder in folders.items():
            config = EngineConfig(
                model=folder, tensor_parallel_size=2, num_kv_blocks=32, device=device, dtype="float32"
            )
            runner = ModelRunner(config, rank=rank, world_size=2)
            if rank > 0:
                runner.serve_forever()
                continue
            engine = LLMEngine(config, runner)
            result = run_model(engine, folder)
            try:  # a failed load is reported on rank 0 and leaves every rank serving
                engine.load_weights(os.path.join(out_dir, "no-such-model"))
            except FileNotFoundError as exc:
                result["load_error"] = str(exc)
            result["logits_after_failed_load"] = prefill_logits(engine, PROBE_IDS)
            torch.save(result, os.path.join(out_dir, f"{name}.pt"))
            engine.shutdown()
    finally:
        dist.destroy_process_group()
    exit_without_finalizing()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_dirs(tiny_llama_dir, tiny_qwen2_dir, tiny_qwen3_dir, tiny_mixtral_dir, tiny_qwen3_moe_dir) -> dict[str, str]:
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "qwen3": tiny_qwen3_dir, "mixtral": tiny_mixtral_dir,
            "qwen3_moe": tiny_qwen3_moe_dir}


@pytest.fixture(scope="module")
def tp2_results(tiny_dirs, tmp_path_factory):
    """Every tiny model in one pair of spawned ranks (a spawn costs seconds)."""
    out_dir = str(tmp_path_factory.mktemp("tp2"))
    mp.spawn(tp_worker, args=(free_port(), tiny_dirs, out_dir), nprocs=2, join=True)
    return {name: torch.load(os.path.join(out_dir, f"{name}.pt")) for name in tiny_dirs}


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mixtral", "qwen3_moe"])
def test_tp2_matches_tp1(name, tp2_results, tiny_dirs):
    folder = tiny_dirs[name]
    tp1 = run_model(LLMEngine(EngineConfig(model=folder, num_kv_blocks=32)), folder)
    tp2 = tp2_results[name]
    torch.testing.assert_close(tp2["logits"], tp1["logits"], rtol=1e-4, atol=1e-4)
    assert tp2["tokens"] == tp1["tokens"] == tp2["mixed_step_tokens"] == tp1["mixed_step_tokens"]
    assert tp2["chunked_tokens"] == tp1["chunked_tokens"] == tp1["tokens"]
    assert tp2["prefix_cache_hits"] == tp1["prefix_cache_hits"] > 0
    assert_greedy_rows_unchanged(tp2["sampled_between"], tp1["tokens"])
    assert [r["token_ids"] for r in tp2["forked"].values()] == [r["token_ids"] for r in tp1["forked"].values()]
    prompt_logprobs = [[entry and entry["logprob"] for entry in tp["forked"]["0"]["prompt_logprobs"]] for tp in (tp1, tp2)]
    assert prompt_logprobs[1] == pytest.approx(prompt_logprobs[0], abs=1e-4)
    torch.testing.assert_close(tp2["updated_logits"], tp1["updated_logits"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(tp1["updated_logits"], tp1["logits"])  # the update really changed the model
    assert "no-such-model" in tp2["load_error"]
    torch.testing.assert_close(tp2["logits_after_failed_load"], tp2["updated_logits"])


LLAMA31_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
}


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias-tied", "llama3.1-rope", "mistral", "qwen3", "mixtral",
                                     "qwen3-moe"])
def test_tp1_matches_transformers_logits(variant, tiny_dirs, smollm2_dir, tmp_path):
    """Our forward pass against transformers' for each architecture and rope flavour."""
    from transformers import AutoModelForCausalLM

    from .helpers import save_random_model

    folder = {
        "llama-gqa": lambda: tiny_dirs["llama"],
        "qwen2-bias-tied": lambda: tiny_dirs["qwen2"],
        "qwen3": lambda: tiny_dirs["qwen3"],
        "mixtral": lambda: tiny_dirs["mixtral"],
        "qwen3-moe": lambda: tiny_dirs["qwen3_moe"],
        "llama3.1-rope": lambda: save_random_model(str(tmp_path), smollm2_dir, rope_parameters=LLAMA31_ROPE),
        "mistral": lambda: save_random_model(str(tmp_path), smollm2_dir, "mistral", sliding_window=None),
    }[variant]()
    engine = LLMEngine(EngineConfig(model=folder, num_kv_blocks=32))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    probe = PROBE_IDS * 4  # 56 positions: past the 16 the llama3 scaling treats as original context
    expected = reference(torch.tensor([probe])).logits[0, -1]
    torch.testing.assert_close(prefill_logits(engine, probe)[0], expected, rtol=1e-4, atol=1e-4)
    assert engine.hf_config.architectures[0] == type(reference).__name__
