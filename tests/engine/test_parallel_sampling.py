"""Several sequences per request (n, best_of) forked from one prefill, and prompt logprobs, on the random tiny
Llama. References: each forked sequence against the same sampling run alone (its own prefill, its own blocks);
prompt logprobs against transformers' logits of the whole prompt, log-softmaxed with plain torch."""
import re

import pytest
import torch

from rayprism.engine import EngineConfig, InvalidRequestError, LLMEngine, SamplingParams

from .helpers import generate

PROMPT = ("A prompt long enough to fill two blocks of sixteen tokens and part of a third one, on purpose: it goes on "
          "for a while, and then it stops right here")   # 34 tokens
SEED = 2**63 + 5   # a request's sequence i draws from (seed + i * 0x9E3779B97F4A7C15) mod 2**64


def child_seed(index: int) -> int:
    return (SEED + index * 0x9E3779B97F4A7C15) % 2**64


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return LLMEngine(EngineConfig(model=tiny_llama_dir, num_kv_blocks=64, max_model_len=128))


def sampled(max_tokens=12, **fields) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=40, seed=SEED, ignore_eos=True, **fields)


def sequences(results: dict, n: int) -> list[list[int]]:
    return [results["0" if i == 0 else f"0.{i}"]["token_ids"] for i in range(n)]


def test_each_forked_sequence_matches_its_own_run_alone(engine):
    forked = sequences(generate(engine, [PROMPT], sampled(n=4)), 4)
    alone = [generate(engine, [PROMPT], SamplingParams(**{**vars(sampled()), "seed": child_seed(i)}))["0"]["token_ids"]
             for i in range(4)]
    assert forked == alone
    assert len(set(map(tuple, forked))) == 4       # four different samples
    assert engine.stats()["kv_cache_usage"] == 0   # every shared block freed


def test_forked_sequences_share_the_prompt_blocks(engine):
    num_prompt_tokens = len(engine.tokenizer.encode(PROMPT))
    block_size = engine.config.block_size
    full, partial = divmod(num_prompt_tokens, block_size)
    assert full >= 2 and partial, "the prompt must end inside a block"
    engine.add_request("shared", PROMPT, sampled(max_tokens=4, n=4))
    engine.step()   # the prefill, and the fork
    blocks = engine.scheduler.block_manager
    in_use = blocks.num_blocks - len(blocks.free_blocks)
    # The parent's full blocks and its partial block, plus each child's copy of the partial block.
    assert in_use == full + 1 + 3
    assert len(engine.scheduler.running) == 4
    while engine.has_unfinished_requests():
        engine.step()
    assert len(blocks.free_blocks) == blocks.num_blocks


def test_greedy_n_gives_n_copies_of_the_greedy_output(engine):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = generate(engine, [PROMPT], greedy)["0"]["token_ids"]
    assert sequences(generate(engine, [PROMPT], SamplingParams(**{**vars(greedy), "n": 3})), 3) == [alone] * 3


def test_best_of_reports_each_sequences_cumulative_logprob(engine):
    results = generate(engine, [PROMPT], sampled(n=1, best_of=3))
    assert len(results) == 3   # the engine returns all; the server keeps the best n
    for i in range(3):
        result = results["0" if i == 0 else f"0.{i}"]
        assert result["logprobs"] == []   # not asked for: computed for the ranking only
        with_logprobs = generate(engine, [PROMPT], SamplingParams(**{**vars(sampled()), "seed": child_seed(i),
                                                                      "logprobs": 0}))["0"]
        assert with_logprobs["token_ids"] == result["token_ids"]
        assert result["cumulative_logprob"] == pytest.approx(sum(e["logprob"] for e in with_logprobs["logprobs"]))


def test_prompt_logprobs_match_transformers(engine, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    token_ids = engine.tokenizer.encode(PROMPT)
    result = generate(engine, [token_ids], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3, n=2))["0"]
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        logprobs = reference(torch.tensor([token_ids])).logits[0].float().log_softmax(-1)
    entries = result["prompt_logprobs"]
    assert len(entries) == len(token_ids) and entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        row = logprobs[position - 1]
        assert entry["token_id"] == token_ids[position]
        assert entry["logprob"] == pytest.approx(row[token_ids[position]].item(), abs=1e-4)
        assert entry["rank"] == (row > row[token_ids[position]]).sum().item() + 1
        top_values, top_ids = row.topk(3)
        assert list(entry["top"]) == top_ids.tolist()
        assert list(entry["top"].values()) == pytest.approx(top_values.tolist(), abs=1e-4)


def test_prompt_logprobs_next_to_other_prefills(engine):
    """A batch where one prefilled sequence wants every prompt row and the others only their last: the tokens
    of every request are those it gets alone."""
    prompts = ["Hello there", PROMPT, "def main():"]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = [generate(engine, [p], greedy)["0"]["token_ids"] for p in prompts]
    mixed = generate(engine, prompts, [greedy, SamplingParams(**{**vars(greedy), "prompt_logprobs": 0}), greedy])
    assert [mixed[str(i)]["token_ids"] for i in range(3)] == alone
    assert len(mixed["1"]["prompt_logprobs"]) == len(engine.tokenizer.encode(PROMPT))


def test_forked_sequences_survive_preemption(tiny_llama_dir, engine):
    # 10 blocks of 16 slots: four forks of a 34-token prompt growing to 34 + 60 tokens cannot stay resident.
    small = LLMEngine(EngineConfig(model=tiny_llama_dir, num_kv_blocks=10, max_model_len=128))
    params = sampled(max_tokens=60, n=4)
    results = sequences(generate(small, [PROMPT], params), 4)
    assert small.stats()["num_preemptions"] > 0
    assert results == sequences(generate(engine, [PROMPT], params), 4)
    assert small.stats()["kv_cache_usage"] == 0


def test_abort_ends_every_sequence_and_frees_the_blocks(engine):
    engine.add_request("gone", PROMPT, sampled(max_tokens=50, n=3))
    engine.step()
    engine.step()
    engine.abort("gone")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert sorted(o.index for o in outputs if o.finish_reason == "abort") == [0, 1, 2]
    assert engine.stats()["kv_cache_usage"] == 0 and not engine.requests


@pytest.mark.parametrize("fields, param", [({"n": 0}, "n"), ({"n": 129}, "n"), ({"n": 2, "best_of": 1}, "best_of"),
                                           ({"n": True}, "n"), ({"prompt_logprobs": 21}, "prompt_logprobs")])
def test_bad_values_are_refused(engine, fields, param):
    with pytest.raises(InvalidRequestError) as error:
        engine.add_request("bad", PROMPT, SamplingParams(**fields))
    assert error.value.param == param


def test_more_sequences_than_can_run_at_once_are_refused(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, num_kv_blocks=4, max_num_seqs=4, max_model_len=64))
    with pytest.raises(InvalidRequestError, match="max_num_seqs=4") as error:
        engine.add_request("many", PROMPT, SamplingParams(n=2, best_of=5))
    assert error.value.param == "best_of"
    with pytest.raises(InvalidRequestError, match="do not fit the KV cache"):
        engine.add_request("big", PROMPT, SamplingParams(n=4))   # 3 blocks + 3 copies of the partial one > 4


@pytest.mark.gpu
def test_forks_and_grammars_on_cuda(tiny_llama_dir):
    """On the device: the partial prompt block copied by the model runner, the forks decoded through the CUDA
    graphs, each as it is alone; a grammar's mask applied on the device, next to unconstrained rows."""
    from rayprism.engine.sampling import StructuredOutput

    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, device="cuda", dtype="float32", num_kv_blocks=64,
                                    max_model_len=128))
    forked = sequences(generate(engine, [PROMPT], sampled(n=4)), 4)
    alone = [generate(engine, [PROMPT], SamplingParams(**{**vars(sampled()), "seed": child_seed(i)}))["0"]["token_ids"]
             for i in range(4)]
    assert forked == alone
    regex = SamplingParams(max_tokens=8, temperature=1.0, seed=2, n=3,
                           structured=StructuredOutput("regex", r"[0-9]{3}-[a-z]{2}", "guided_regex"))
    results = generate(engine, [PROMPT, PROMPT], [regex, sampled()])
    for key in ("0", "0.1", "0.2"):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", results[key]["text"]) and results[key]["finish_reason"] == "stop"
    assert results["1"]["token_ids"] == alone[0]
