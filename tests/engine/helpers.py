"""Tiny random-weight checkpoints and helpers shared by the engine tests."""
from __future__ import annotations

import os
import shutil
import sys

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def save_random_model(folder: str, tokenizer_dir: str, architecture: str = "llama", **overrides) -> str:
    """Save a random-weight transformers model (safetensors) plus the SmolLM2 tokenizer into `folder`."""
    import transformers

    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
              "qwen3_moe": "Qwen3Moe"}[architecture]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    fields = dict(
        vocab_size=49152,  # the SmolLM2 tokenizer's
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,  # sharper distributions than the default: greedy ties are unlikely
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=1,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    model = model_cls(config_cls(**fields)).float()
    with torch.no_grad():  # init leaves norms at 1 and biases at 0, which would hide loading mistakes
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), folder)
    return folder


def prefill_logits(engine, token_ids: list[int]) -> torch.Tensor:
    """Last-token logits of one prefill of `token_ids` through the engine's runner(s)."""
    from rayprism.engine.model_runner import Batch
    from rayprism.engine.sampling import SamplingParams
    from rayprism.engine.sequence import Sequence

    seq = Sequence("logits-probe", token_ids, SamplingParams(), arrival=0)
    seq.num_scheduled_tokens = len(token_ids)
    engine.scheduler.block_manager.allocate(seq)
    try:
        batch = Batch.from_sequences([seq], 1, engine.config.block_size)
        return engine.runner.call("execute_model", batch.pack()).float().cpu()
    finally:
        engine.scheduler.block_manager.free(seq)


def generate(engine, prompts, params, staggered: bool = False) -> dict[str, dict]:
    """Run requests to completion; returns {request_id: {"token_ids", "text", "finish_reason", "logprobs",
    "cumulative_logprob", "prompt_logprobs"}}, where a request's sequence of index i > 0 (n, best_of) is keyed
    "{request_id}.{i}". staggered: add one request per step, so later ones join the decoding ones' steps (mixed
    steps)."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    results = {}

    def step():
        for out in engine.step():
            key = out.request_id if out.index == 0 else f"{out.request_id}.{out.index}"
            r = results.setdefault(key, {"token_ids": [], "text": "", "finish_reason": None, "logprobs": []})
            r["token_ids"] += out.new_token_ids
            r["text"] += out.new_text
            r["logprobs"] += out.logprobs or []
            r["finish_reason"] = out.finish_reason
            r["cumulative_logprob"] = out.cumulative_logprob
            if out.prompt_logprobs is not None:
                r["prompt_logprobs"] = out.prompt_logprobs

    for i, (prompt, p) in enumerate(zip(prompts, params_list)):
        engine.add_request(str(i), prompt, p)
        results[str(i)] = {"token_ids": [], "text": "", "finish_reason": None, "logprobs": []}
        if staggered and i < len(prompts) - 1:
            step()
    while engine.has_unfinished_requests():
        step()
    return results


def reference_decode(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """Paged decode attention the slow, plain way: each sequence's context gathered and attended in float64."""
    outs = []
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    for i, length in enumerate(context_lens.tolist()):
        slots = [block_tables[i, t // block_size].item() * block_size + t % block_size for t in range(length)]
        k = k_cache.reshape(-1, *k_cache.shape[2:])[slots].double().repeat_interleave(group, dim=1)
        v = v_cache.reshape(-1, *v_cache.shape[2:])[slots].double().repeat_interleave(group, dim=1)
        weights = torch.einsum("hd,thd->ht", q[i].double(), k).mul(scale).softmax(-1)
        outs.append(torch.einsum("ht,thd->hd", weights, v))
    return torch.stack(outs)


def exit_without_finalizing() -> None:
    """End a spawned tensor-parallel worker that succeeded (process group destroyed, results saved) without the
    interpreter's finalization, where gloo's worker threads can still be tearing down: about one CPU run in 10
    lost a rank to SIGABRT ("terminate called without an active exception"; pytorch/pytorch#179291).
    bench/engine_bench.py's workers end the same way."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
