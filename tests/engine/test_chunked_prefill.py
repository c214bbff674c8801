"""Chunked prefill (issue #17 part 3): the scheduler's token budget by tables, attention over a context that starts
before the step's tokens, and the real SmolLM2 (float32, CPU) prefilling in small chunks against whole prompts."""
from __future__ import annotations

import pytest
import torch

from rayprism.engine import EngineConfig, InvalidRequestError, LLMEngine, SamplingParams
from rayprism.engine.attention import AttentionMetadata, prefill_attention
from rayprism.engine.block_manager import BlockManager
from rayprism.engine.scheduler import Scheduler
from rayprism.engine.sequence import Sequence

from .helpers import generate


def run_step(scheduler: Scheduler) -> list[tuple[str, int]]:
    """One schedule and what the engine then does; returns (name, tokens computed) per scheduled sequence."""
    seqs, _ = scheduler.schedule()
    scheduled = [(seq.request_id, seq.num_scheduled_tokens) for seq in seqs]
    for seq in seqs:
        samples = seq.samples
        seq.num_computed_tokens += seq.num_scheduled_tokens
        if samples:
            seq.token_ids.append(0)
    return scheduled


def test_decodes_first_then_chunks_fill_the_budget():
    scheduler = Scheduler(8, 10, BlockManager(64, 4), 128)
    for i in range(2):
        scheduler.add(Sequence(f"run{i}", [1, 2, 3], SamplingParams(), i))
    assert run_step(scheduler) == [("run0", 3), ("run1", 3)]
    scheduler.add(Sequence("long", list(range(20)), SamplingParams(), 2))
    scheduler.add(Sequence("short", [5, 6], SamplingParams(), 3))
    # 10 tokens a step: the two decodes, then 8 of the long prompt; "short" waits behind it.
    assert run_step(scheduler) == [("long", 8), ("run0", 1), ("run1", 1)]
    assert run_step(scheduler) == [("long", 8), ("run0", 1), ("run1", 1)]
    assert run_step(scheduler) == [("long", 4), ("short", 2), ("run0", 1), ("run1", 1)]  # its last chunk samples
    assert run_step(scheduler) == [("run0", 1), ("run1", 1), ("long", 1), ("short", 1)]


def test_forks_wait_for_the_last_chunk():
    scheduler = Scheduler(8, 6, BlockManager(64, 4), 128)
    parent = Sequence("n3", list(range(10)), SamplingParams(n=3), 0)
    scheduler.add(parent)
    assert run_step(scheduler) == [("n3", 6)] and len(parent) == 10   # no token sampled yet
    assert run_step(scheduler) == [("n3", 4)]
    # The seats of its two siblings were kept: only 5 more sequences get in.
    for i in range(8):
        scheduler.add(Sequence(f"s{i}", [1], SamplingParams(), i + 1))
    assert [name for name, _ in run_step(scheduler)] == ["s0", "s1", "s2", "s3", "s4", "n3"]


def test_context_attention_matches_full_causal_attention():
    """Queries of a sequence's last positions, keys and values of its whole context read from the cache: the
    output rows of a full causal prefill of that sequence."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block_size = 4, 2, 8, 4
    k_cache = torch.randn(16, block_size, kv_heads, dim, generator=generator)
    v_cache = torch.randn(16, block_size, kv_heads, dim, generator=generator)
    tables = [[3, 7, 1], [0, 12, 5, 9]]
    context_lens, new_lens = [10, 13], [3, 13]   # the second one from position 0
    slots = torch.tensor([tables[i][p // block_size] * block_size + p % block_size
                          for i, n in enumerate(context_lens) for p in range(n)])
    q = torch.randn(sum(context_lens), heads, dim, generator=generator)
    full = []
    for i, n in enumerate(context_lens):
        part = slots[sum(context_lens[:i]): sum(context_lens[:i]) + n]
        k, v = (c.view(-1, kv_heads, dim)[part] for c in (k_cache, v_cache))
        qs = q[sum(context_lens[:i]): sum(context_lens[:i]) + n]
        meta = AttentionMetadata(slot_mapping=part, num_prefill_tokens=n, cu_seqlens=torch.tensor([0, n]),
                                 max_prefill_len=n)
        full.append(prefill_attention(qs, k, v, k_cache, v_cache, meta, dim ** -0.5)[n - new_lens[i]:])
    new_q = torch.cat([q[sum(context_lens[:i]) + n - new_lens[i]: sum(context_lens[:i]) + n]
                       for i, n in enumerate(context_lens)])
    meta = AttentionMetadata(slot_mapping=slots, num_prefill_tokens=len(new_q),
                             cu_seqlens=torch.tensor([0, new_lens[0], sum(new_lens)]), max_prefill_len=max(new_lens),
                             context_slots=slots, cu_context_lens=torch.tensor([0, 10, 23]), max_context_len=13)
    got = prefill_attention(new_q, None, None, k_cache, v_cache, meta, dim ** -0.5)
    torch.testing.assert_close(got, torch.cat(full))


# --- the engine on SmolLM2 --------------------------------------------------------------------------------------------
PROMPTS = ["The capital of France is",
           "Write one sentence about the sea, the wind and the ships that sail on it at night, far from any land.",
           "def add(a, b):\n    return a + b\n\n# a function that multiplies two numbers\ndef"]
GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=1)


def smollm2(enable_prefix_caching: bool = False, **fields) -> LLMEngine:
    return LLMEngine(EngineConfig(model="builtin://smollm2-135m-instruct", dtype="float32", num_kv_blocks=64,
                                  enable_prefix_caching=enable_prefix_caching, **fields))


@pytest.fixture(scope="module")
def engines():
    """Chunks of at most 7 tokens (less the decodes) against whole prompts in one step."""
    return smollm2(max_num_batched_tokens=7), smollm2()


def test_chunked_prompts_give_what_whole_prompts_give(engines):
    chunked, whole = engines
    assert max(len(chunked.tokenizer.encode(p)) for p in PROMPTS) > 3 * 7
    expected = generate(whole, PROMPTS, GREEDY)
    steps = chunked.stats()["num_steps"]
    for staggered in (False, True):   # staggered: chunks share their steps with the decodes of earlier requests
        got = generate(chunked, PROMPTS, GREEDY, staggered=staggered)
        for key, result in expected.items():
            assert got[key]["token_ids"] == result["token_ids"], (staggered, key)
            assert [e["logprob"] for e in got[key]["logprobs"]] == \
                pytest.approx([e["logprob"] for e in result["logprobs"]], abs=1e-4)
    assert chunked.stats()["num_steps"] - steps > 2 * len(PROMPTS)


def test_prompt_logprobs_and_forks_across_chunks(engines):
    chunked, whole = engines
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=7, n=2, prompt_logprobs=2, ignore_eos=True)
    got, expected = generate(chunked, PROMPTS[1:2], params), generate(whole, PROMPTS[1:2], params)
    assert {k: r["token_ids"] for k, r in got.items()} == {k: r["token_ids"] for k, r in expected.items()}
    ours, theirs = got["0"]["prompt_logprobs"], expected["0"]["prompt_logprobs"]
    assert len(ours) == len(theirs) == len(chunked.tokenizer.encode(PROMPTS[1])) and ours[0] is None
    for a, b in zip(ours[1:], theirs[1:]):
        assert a["token_id"] == b["token_id"] and a["rank"] == b["rank"] and list(a["top"]) == list(b["top"])
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def test_chunks_with_a_cached_prefix(engines):
    """Prefix caching and chunking together: a hit, then the rest of the prompt in chunks."""
    _, whole = engines
    engine = smollm2(enable_prefix_caching=True, max_num_batched_tokens=7)
    prompts = [PROMPTS[2], PROMPTS[2] + " subtract(a, b):"]
    got = [generate(engine, [p], GREEDY)["0"]["token_ids"] for p in prompts]
    assert engine.stats()["prefix_cache_hits"] > 0
    assert got == [generate(whole, [p], GREEDY)["0"]["token_ids"] for p in prompts]


def test_max_model_len_is_not_bounded_by_the_budget(engines):
    chunked, _ = engines
    assert chunked.max_model_len == 64 * 16 > chunked.config.max_num_batched_tokens
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        chunked.add_request("too-long", [5] * (chunked.max_model_len + 1), GREEDY)
