"""Automatic prefix caching (issue #17 part 2): the block manager's content index alone (hash chaining, hits and
misses, LRU eviction, reference counts with forks, preemption, invalidation), then the engine on the real SmolLM2
(float32, CPU) with caching on against caching off: same tokens and logprobs, hits counted, weight loads
invalidating the cache, and the /metrics names."""
from __future__ import annotations

import pytest
import torch

from rayprism.engine import EngineConfig, LLMEngine, SamplingParams
from rayprism.engine.block_manager import BlockManager, chain_hash
from rayprism.engine.sampling import SamplingParams as Params
from rayprism.engine.scheduler import Scheduler
from rayprism.engine.sequence import Sequence, SequenceStatus

from .helpers import generate
from .test_scheduler import run_step

SIZE = 4  # tokens per block in the tables below


def seq_of(tokens: list[int], name: str = "s", **params) -> Sequence:
    return Sequence(name, tokens, Params(**params), arrival=0)


def admit(blocks: BlockManager, tokens: list[int], name: str = "s", **params) -> Sequence:
    """What the scheduler does for a waiting sequence that fits: its cached prefix, then blocks for the rest."""
    seq = seq_of(tokens, name, **params)
    cached = blocks.cached_prefix(seq)
    assert blocks.can_allocate(seq, len(seq), cached)
    blocks.allocate(seq, len(seq), cached)
    seq.num_computed_tokens = len(cached or ()) * SIZE
    return seq


def test_hashes_chain_over_the_whole_prefix():
    blocks = BlockManager(8, SIZE, enable_prefix_caching=True)
    a, b, c = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9]), seq_of([1, 2, 3, 4, 5, 6, 7, 8]), seq_of([9, 9, 9, 9, 5, 6, 7, 8])
    for seq in (a, b, c):
        blocks._hash_blocks(seq, len(seq) // SIZE)
    assert a.block_hashes == b.block_hashes and len(a.block_hashes) == 2  # full blocks only
    assert a.block_hashes[0] == chain_hash(b"", [1, 2, 3, 4])
    assert a.block_hashes[1] == chain_hash(a.block_hashes[0], [5, 6, 7, 8])
    # The same tokens after another prefix are another block.
    assert c.block_hashes[1] != a.block_hashes[1]


@pytest.mark.parametrize(
    "first, second, hit_blocks",
    [
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 11], 2),  # two full blocks shared
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 0, 7, 8, 9], 1),   # differs in the second block
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 2, 3, 4, 5, 6, 7, 8, 9], 0),   # differs in the first token
        # The same prompt again: its last token is computed (its logits), so its last full block is not taken.
        ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8], 1),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9], 2),
        ([1, 2, 3], [1, 2, 3], 0),                                             # no full block
    ],
)
def test_a_later_sequence_takes_the_cached_blocks_of_its_prefix(first, second, hit_blocks):
    blocks = BlockManager(16, SIZE, enable_prefix_caching=True)
    done = admit(blocks, first, "first")
    first_table = list(done.block_table)
    blocks.free(done)
    later = admit(blocks, second, "second")
    assert later.block_table[:hit_blocks] == first_table[:hit_blocks]
    assert later.num_computed_tokens == hit_blocks * SIZE
    assert (blocks.num_queried_tokens, blocks.num_hit_tokens) == (len(first) + len(second), hit_blocks * SIZE)
    assert all(blocks.ref_counts[b] == 1 for b in later.block_table)


def test_a_running_sequences_blocks_are_shared_and_reference_counted():
    blocks = BlockManager(16, SIZE, enable_prefix_caching=True)
    running = admit(blocks, list(range(10)), "running")
    other = admit(blocks, list(range(9)) + [99], "other")
    assert other.block_table[:2] == running.block_table[:2]
    assert [blocks.ref_counts[b] for b in running.block_table] == [2, 2, 1]
    blocks.free(running)
    assert [blocks.ref_counts[b] for b in other.block_table] == [1, 1, 1]
    blocks.free(other)
    assert len(blocks.free_blocks) == 16 and blocks.usage == 0
    assert len(blocks.cached) == 2  # the free full blocks are still findable


def test_free_blocks_without_a_hash_go_first_then_cached_ones_least_recently_used_first():
    blocks = BlockManager(6, SIZE, enable_prefix_caching=True)
    old = admit(blocks, [1] * 8 + [0], "old")        # blocks 0, 1 full, 2 partial
    new = admit(blocks, [2] * 8 + [0], "new")        # blocks 3, 4 full, 5 partial
    blocks.free(old)
    blocks.free(new)
    # The partial blocks first, then old's (freed first), last blocks of a sequence before its first ones.
    assert list(blocks.free_blocks) == [5, 2, 1, 0, 4, 3]
    taker = admit(blocks, [3] * 12, "taker")           # three blocks, no hit
    assert taker.block_table == [5, 2, 1]
    assert blocks.cached_prefix(seq_of([1] * 8 + [0])) == [0]       # old's second block was evicted
    assert blocks.cached_prefix(seq_of([2] * 8 + [0])) == [3, 4]    # new's are intact


def test_a_hit_on_a_free_block_counts_against_the_free_list():
    blocks = BlockManager(3, SIZE, enable_prefix_caching=True)
    blocks.free(admit(blocks, [1] * 8 + [5], "first"))  # 3 blocks, two of them cached
    seq = seq_of([1] * 8 + [6, 7, 8, 9, 10])            # hits 2 blocks, needs 2 more: 4 > 3
    cached = blocks.cached_prefix(seq)
    assert len(cached) == 2 and not blocks.can_allocate(seq, len(seq), cached)
    shorter = seq_of([1] * 8 + [6, 7])                  # hits 2, needs 1 more: fits
    assert blocks.can_allocate(shorter, len(shorter), blocks.cached_prefix(shorter))


def test_forks_share_the_cached_prompt_blocks():
    blocks = BlockManager(16, SIZE, enable_prefix_caching=True)
    parent = admit(blocks, list(range(10)), "parent", n=3)
    children = [parent.fork(i) for i in (1, 2)]
    copies = [blocks.fork(parent, child) for child in children]
    assert [c[0] for c in copies] == [parent.block_table[2]] * 2   # the partial block copied per child
    assert [blocks.ref_counts[b] for b in parent.block_table] == [3, 3, 1]
    assert all(child.block_hashes == parent.block_hashes[:2] for child in children)
    for seq in (parent, *children):
        blocks.free(seq)
    assert blocks.usage == 0 and all(count == 0 for count in blocks.ref_counts)
    assert len(admit(blocks, list(range(10)), "again").block_table) == 3
    assert blocks.num_hit_tokens == 8


def test_blocks_are_cached_once_their_pending_token_is_known():
    """A decode's input token may still be pending on the device: its block is offered to the cache a step later."""
    from rayprism.engine.sequence import PENDING

    blocks = BlockManager(8, SIZE, enable_prefix_caching=True)
    seq = admit(blocks, [1, 2, 3, 4, 5, 6, 7])
    seq.token_ids.append(PENDING)
    seq.num_pending = 1
    blocks.allocate(seq, 8)
    assert len(blocks.cached) == 1
    seq.token_ids[-1], seq.num_pending = 8, 0
    seq.token_ids.append(PENDING)
    seq.num_pending = 1
    blocks.allocate(seq, 9)
    assert len(blocks.cached) == 2
    assert blocks.cached_prefix(seq_of([1, 2, 3, 4, 5, 6, 7, 8, 0])) == seq.block_table[:2]


def test_only_blocks_computed_by_the_step_are_cached():
    """A prompt prefilled in chunks offers the cache the full blocks its chunks have reached, not those of its lookup;
    and a sequence that a decode left ending on a block boundary still recomputes its last token."""
    blocks = BlockManager(8, SIZE, enable_prefix_caching=True)
    seq = seq_of(list(range(14)))
    assert blocks.cached_prefix(seq) == [] and len(seq.block_hashes) == 3
    blocks.allocate(seq, 6, [])                      # a first chunk of 6 tokens: one full block
    assert list(blocks.cached.values()) == seq.block_table[:1]
    blocks.allocate(seq, 12)                         # the next chunk reaches 12: three
    assert list(blocks.cached.values()) == seq.block_table[:3]
    seq.token_ids += [14, 15]                        # 16 tokens, 15 of them computed by a decode
    blocks.allocate(seq, 16)
    assert blocks.cached_prefix(seq_of(list(range(16)))) == seq.block_table[:3]


def test_caching_off_and_prompt_logprobs_look_nothing_up():
    off = BlockManager(8, SIZE)
    off.free(admit(off, list(range(9))))
    assert off.cached_prefix(seq_of(list(range(9)))) is None and not off.cached
    on = BlockManager(8, SIZE, enable_prefix_caching=True)
    on.free(admit(on, list(range(9))))
    wants_every_logit = admit(on, list(range(9)), prompt_logprobs=1)
    assert wants_every_logit.num_computed_tokens == 0 and on.num_hit_tokens == 0


def test_reset_forgets_every_cached_block():
    blocks = BlockManager(8, SIZE, enable_prefix_caching=True)
    blocks.free(admit(blocks, list(range(9))))
    blocks.reset_prefix_cache()
    assert blocks.cached_prefix(seq_of(list(range(9)))) == [] and not any(blocks.block_hashes)
    assert len(blocks.free_blocks) == 8


def test_a_preempted_sequence_is_recomputed_from_its_cached_blocks():
    # 4 blocks of 4: "old" and "new" take two each; old's 9th token needs a third and preempts new, whose full first
    # block stays cached, so its recompute starts after it.
    scheduler = Scheduler(8, 64, BlockManager(4, SIZE, enable_prefix_caching=True), 64)
    old, new = seq_of([1, 2, 3, 4, 5, 6], "old"), seq_of([7, 8, 9, 10, 11], "new")
    for seq in (old, new):
        scheduler.add(seq)

    def step():
        prefilled, decoded = run_step(scheduler)
        return prefilled + decoded

    for _ in range(3):
        assert step() == ["old", "new"]
    assert step() == ["old"]
    assert len(new) == 8 and new.block_table == []
    assert new.status is SequenceStatus.WAITING and scheduler.num_preemptions == 1
    hits = scheduler.block_manager.num_hit_tokens
    scheduler.running.remove(old)     # old finishes
    scheduler.block_manager.free(old)
    assert step() == ["new"]
    assert scheduler.block_manager.num_hit_tokens - hits == SIZE and new.num_scheduled_tokens == 8 - SIZE


# --- the engine on SmolLM2 --------------------------------------------------------------------------------------------
SHARED = ("You are a helpful assistant. Answer briefly and precisely, in plain English, without lists or "
          "markdown, and say when you do not know. Keep every answer to one sentence, check your facts twice, and "
          "never make up a name, a number or a date that you are not sure of. ")
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Name a prime number."]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)


def smollm2(enable_prefix_caching: bool, **fields) -> LLMEngine:
    return LLMEngine(EngineConfig(model="builtin://smollm2-135m-instruct", dtype="float32", num_kv_blocks=64,
                                  enable_prefix_caching=enable_prefix_caching, **fields))


@pytest.fixture(scope="module")
def engines():
    return smollm2(True), smollm2(False)


def run_each(engine: LLMEngine, prompts: list[str], params) -> list[dict]:
    """The prompts one after another (each one can hit what the ones before it left in the cache)."""
    return [generate(engine, [prompt], params)["0"] for prompt in prompts]


def same_results(got: list[dict], expected: list[dict]) -> None:
    for ours, theirs in zip(got, expected):
        assert ours["token_ids"] == theirs["token_ids"]
        for a, b in zip(ours["logprobs"], theirs["logprobs"]):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
            assert list(a["top"]) == list(b["top"])


def test_shared_prefix_hits_the_cache_and_changes_nothing(engines):
    on, off = engines
    prompts = [SHARED + question for question in QUESTIONS]
    stats = on.stats()
    results = run_each(on, prompts, GREEDY)
    num_shared_blocks = len(on.tokenizer.encode(SHARED)) // on.config.block_size
    assert num_shared_blocks >= 2
    hits = on.stats()["prefix_cache_hits"] - stats["prefix_cache_hits"]
    queries = on.stats()["prefix_cache_queries"] - stats["prefix_cache_queries"]
    # The second and third requests find the shared blocks (at least); the queries are every prompt's tokens.
    assert hits >= 2 * num_shared_blocks * on.config.block_size
    assert queries == sum(len(on.tokenizer.encode(p)) for p in prompts)
    same_results(results, run_each(off, prompts, GREEDY))
    assert off.stats()["prefix_cache_hits"] == off.stats()["prefix_cache_queries"] == 0


def test_batched_and_staggered_requests_with_a_cached_prefix(engines):
    on, off = engines
    prompts = [SHARED + question for question in QUESTIONS]
    generate(on, prompts[:1], GREEDY)  # the prefix cached before the batch comes
    expected = generate(off, prompts, GREEDY)
    for staggered in (False, True):
        results = generate(on, prompts, GREEDY, staggered=staggered)
        same_results(list(results.values()), list(expected.values()))


def test_prompt_logprobs_and_forks_with_a_cached_prefix(engines):
    on, off = engines
    prompt = SHARED + QUESTIONS[0]
    generate(on, [prompt], GREEDY)
    echo = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=1)
    hits = on.stats()["prefix_cache_hits"]
    got, expected = generate(on, [prompt], echo)["0"], generate(off, [prompt], echo)["0"]
    assert on.stats()["prefix_cache_hits"] == hits   # every prompt token's logits: nothing skipped
    assert len(got["prompt_logprobs"]) == len(on.tokenizer.encode(prompt))
    assert [e and e["logprob"] for e in got["prompt_logprobs"]] == \
        pytest.approx([e and e["logprob"] for e in expected["prompt_logprobs"]], abs=1e-4)
    forked = SamplingParams(max_tokens=5, temperature=1.0, seed=11, n=3, ignore_eos=True)
    got, expected = generate(on, [prompt], forked), generate(off, [prompt], forked)
    assert on.stats()["prefix_cache_hits"] > hits
    assert {k: r["token_ids"] for k, r in got.items()} == {k: r["token_ids"] for k, r in expected.items()}
    assert on.stats()["kv_cache_usage"] == 0


def test_every_weight_load_invalidates_the_cache(engines):
    """A prompt cached under the old weights is recomputed after update_weights_from_tensors or load_weights (the
    paths of the worker's update from a trainer and of a new revision), and gives what a fresh engine with the new
    weights gives."""
    on, _ = engines
    prompt = SHARED + QUESTIONS[1]
    generate(on, [prompt], GREEDY)
    scaled = [(name, param.detach().clone() * 1.25) for name, param in on.runner.model.named_parameters()
              if name.endswith("input_layernorm.weight")]
    assert scaled
    hits = on.stats()["prefix_cache_hits"]
    on.update_weights_from_tensors(scaled)
    updated = generate(on, [prompt], GREEDY)["0"]
    assert on.stats()["prefix_cache_hits"] == hits   # nothing computed before the update is reused
    generate(on, [prompt], GREEDY)
    assert on.stats()["prefix_cache_hits"] > hits    # what the new weights computed is
    on.load_weights(on.config.model)                 # back to the checkpoint: the cache is dropped again
    hits = on.stats()["prefix_cache_hits"]
    again = generate(on, [prompt], GREEDY)["0"]
    assert on.stats()["prefix_cache_hits"] == hits
    fresh = smollm2(False)
    assert again["token_ids"] == generate(fresh, [prompt], GREEDY)["0"]["token_ids"]
    fresh.update_weights_from_tensors(scaled)
    expected = generate(fresh, [prompt], GREEDY)["0"]["token_ids"]
    assert updated["token_ids"] == expected != again["token_ids"]


def test_prefix_cache_metrics_under_both_names(engines):
    from prometheus_client.parser import text_string_to_metric_families

    from rayprism.server.metrics import Metrics

    on, _ = engines
    generate(on, [SHARED + QUESTIONS[2]] * 2, GREEDY)
    stats = on.stats()
    assert 0 < stats["prefix_cache_hits"] <= stats["prefix_cache_queries"]
    families = {family.name: family for family in
                text_string_to_metric_families(Metrics("smol", on.stats, lambda: 0).render().decode())}
    for name, key in (("rayprism_prefix_cache_queries", "prefix_cache_queries"),
                      ("rayprism_prefix_cache_hits", "prefix_cache_hits"),
                      ("vllm:prefix_cache_queries", "prefix_cache_queries"),
                      ("vllm:prefix_cache_hits", "prefix_cache_hits")):
        assert families[name].type == "counter", name
        [sample] = families[name].samples
        assert sample.name == f"{name}_total" and sample.value == stats[key]
        if name.startswith("vllm:"):
            assert sample.labels == {"model_name": "smol"}


@pytest.mark.gpu
def test_gpu_shared_prefix_matches_caching_off():
    """bf16 on a GPU: the context read back from the cache through flash attention's bottom-right causal mask gives
    the tokens the full prefill gives (batched and staggered, so decode graphs and mixed steps are crossed)."""
    config = dict(model="builtin://smollm2-135m-instruct", device="cuda", num_kv_blocks=256)
    on = LLMEngine(EngineConfig(**config, enable_prefix_caching=True))
    off = LLMEngine(EngineConfig(**config, enable_prefix_caching=False))
    prompts = [SHARED * 4 + question for question in QUESTIONS]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    generate(on, prompts[:1], params)
    expected = generate(off, prompts, params)
    for staggered in (False, True):
        got = generate(on, prompts, params, staggered=staggered)
        assert [r["token_ids"] for r in got.values()] == [r["token_ids"] for r in expected.values()]
    assert on.stats()["prefix_cache_hits"] > 0


@pytest.mark.gpu
def test_gpu_varlen_prefill_with_context_matches_sdpa():
    """Queries of the last positions of each context (a chunk, or the tokens after a cached prefix) against
    float64 SDPA with the bottom-right causal mask."""
    from rayprism.engine.paged_attention import varlen_prefill_attention

    torch.manual_seed(0)
    q_lens, k_lens = [1, 100, 37, 512], [300, 100, 1000, 600]
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), 32, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(sum(k_lens), 8, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(sum(k_lens), 8, 128, dtype=torch.bfloat16, device="cuda")
    out = varlen_prefill_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), 128 ** -0.5)
    for i, (nq, nk) in enumerate(zip(q_lens, k_lens)):
        qs = q[cu_q[i]:cu_q[i + 1]].double().transpose(0, 1)
        ks, vs = (t[cu_k[i]:cu_k[i + 1]].double().transpose(0, 1).repeat_interleave(4, dim=0) for t in (k, v))
        mask = torch.ones(nq, nk, dtype=torch.bool, device="cuda").tril(nk - nq)
        expected = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=128 ** -0.5)
        got = out[cu_q[i]:cu_q[i + 1]].double().transpose(0, 1)
        assert (got - expected).norm() / expected.norm() < 1e-2, i
