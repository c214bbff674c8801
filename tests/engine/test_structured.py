"""Structured output (engine/structured.py): grammar-constrained sampling on SmolLM2-135M-Instruct, and the
sampler's mask on hand-made logits."""
import json
import pickle
import re

import jsonschema
import pytest
import torch

from rayprism.engine import EngineConfig, InvalidRequestError, LLMEngine, SamplingParams, StructuredOutput
from rayprism.engine.sampler import Sampler
from rayprism.engine.sequence import Sequence, SequenceStatus
from rayprism.engine.structured import apply_token_bitmask, pack_bits

from .helpers import generate

SEEDS = range(10)
# Bounded, so that every output completes within max_tokens: under ~130 tokens even where each character of its
# strings took 4 byte tokens; 45-70 as SmolLM2 writes it.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
}
JSON_MAX_TOKENS = 150


def structured(kind, value, param="guided"):
    return StructuredOutput(kind, value, param)


def chat(engine, text: str) -> str:
    """SmolLM2's chat format without its default system prompt: prefill dominates these tests on the CPU."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return LLMEngine(EngineConfig(model="builtin://smollm2-135m-instruct", dtype="float32", num_kv_blocks=128,
                                  max_model_len=256))


def sampled(engine, prompt, output, max_tokens, seeds=SEEDS, **kwargs):
    """One request per seed at temperature 1, all in one batch; returns the results."""
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, structured=output, **kwargs)
              for seed in seeds]
    return list(generate(engine, [prompt] * len(params), params).values())


def test_json_schema_outputs_validate_over_many_seeds(engine):
    results = sampled(engine, chat(engine, "Describe a person as JSON."),
                      structured("json_schema", PERSON, "response_format"), max_tokens=JSON_MAX_TOKENS)
    for r in results:
        assert r["finish_reason"] == "stop", r
        assert "\n" not in r["text"]
        jsonschema.validate(json.loads(r["text"]), PERSON)
    assert len({r["text"] for r in results}) > len(results) // 2  # sampled, not one forced output


def test_json_object_parses_as_an_object(engine):
    # Greedy: any object may be long, and sampled ones from this small model often are.
    prompts = [chat(engine, 'Return {"ok": true} as JSON.'),
               chat(engine, "A JSON object with the key a and the value 1.")]
    params = SamplingParams(max_tokens=24, temperature=0,
                            structured=structured("json_object", None, "response_format"))
    for r in generate(engine, prompts, params).values():
        assert r["finish_reason"] == "stop", r
        assert isinstance(json.loads(r["text"]), dict)


def test_regex_outputs_fullmatch(engine):
    pattern = r"(\+1 )?\(\d{3}\) \d{3}-\d{4}"
    results = sampled(engine, chat(engine, "Write a phone number."), structured("regex", pattern), max_tokens=24)
    for r in results:
        assert r["finish_reason"] == "stop", r
        assert re.fullmatch(pattern, r["text"]), r["text"]


def test_choice_outputs_one_of_the_choices(engine):
    choices = ["yes", "no", "it depends", 'say "maybe"']
    results = sampled(engine, chat(engine, "Is the sky blue?"), structured("choice", choices), max_tokens=10)
    assert {r["text"] for r in results} <= set(choices)
    assert all(r["finish_reason"] == "stop" for r in results)
    # The grammar's end is the output's end, EOS ignored or not.
    ignoring = sampled(engine, chat(engine, "Is the sky blue?"), structured("choice", choices), max_tokens=10,
                       seeds=range(3), ignore_eos=True)
    assert all(r["text"] in choices and r["finish_reason"] == "stop" for r in ignoring)


def test_grammar_outputs_follow_it(engine):
    grammar = r'''
root ::= greeting " " name punct
greeting ::= "Hello" | "Hi" | "Dear"
name ::= [A-Z] [a-z]{1,9}
punct ::= "!" | "."
'''
    results = sampled(engine, chat(engine, "Greet someone."), structured("grammar", grammar, "guided_grammar"),
                      max_tokens=16)
    for r in results:
        assert r["finish_reason"] == "stop", r
        assert re.fullmatch(r"(Hello|Hi|Dear) [A-Z][a-z]{1,9}[!.]", r["text"]), r["text"]


def test_unstructured_requests_in_the_batch_are_unchanged(engine):
    prompts = [chat(engine, "Name a fruit."), "The capital of France is", chat(engine, "Count to five.")]
    greedy = SamplingParams(max_tokens=16, temperature=0)
    alone = generate(engine, prompts[1:], greedy)
    output = structured("regex", r"[A-Z][a-z]{2,10}")
    mixed = generate(engine, prompts, [SamplingParams(max_tokens=16, temperature=0, structured=output), greedy, greedy])
    assert re.fullmatch(r"[A-Z][a-z]{2,10}", mixed["0"]["text"])
    assert [mixed["1"]["token_ids"], mixed["2"]["token_ids"]] == [alone["0"]["token_ids"], alone["1"]["token_ids"]]


def test_n_sequences_each_follow_the_grammar(engine):
    pattern = r"[a-z]{3,8}( [a-z]{3,8}){0,2}"
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=5, n=3, structured=structured("regex", pattern))
    results = generate(engine, [chat(engine, "Three words.")], params)
    assert len(results) == 3
    assert all(re.fullmatch(pattern, r["text"]) and r["finish_reason"] == "stop" for r in results.values())


@pytest.mark.parametrize("output, message", [
    (structured("json_schema", {"type": "nope"}, "response_format"), "nope"),
    (structured("json_schema", {"enum": {1, 2}}, "guided_json"), "not JSON serializable"),
    (structured("regex", "a(b", "guided_regex"), "parenthesis"),
    (structured("grammar", "root ::= missing", "guided_grammar"), "missing"),
    (structured("regex", ["a"], "guided_regex"), "regex must be a non-empty string"),
    (structured("choice", [], "guided_choice"), "non-empty list"),
    (structured("json_object", {"type": "object"}, "response_format"), "json_object must be None"),
    (structured("yaml", "a: b", "response_format"), "kind must be one of"),
])
def test_invalid_structured_output_is_refused_before_queueing(engine, output, message):
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("bad", "Hi", SamplingParams(structured=output))
    assert e.value.param == output.param and message in str(e.value)
    assert "bad" not in engine.requests and not engine.scheduler.waiting


def test_preempted_sequences_keep_their_grammar_state(tiny_llama_dir):
    # The random tiny Llama (fast; the grammar makes its output valid). 10 blocks x 16 slots: four sequences of
    # ~10 prompt and ~60 output tokens cannot all stay resident.
    def engine(num_kv_blocks):
        return LLMEngine(EngineConfig(model=tiny_llama_dir, num_kv_blocks=num_kv_blocks, max_model_len=160))
    small = engine(10)
    prompts = [f"Person number {i} as JSON:" for i in range(4)]
    params = SamplingParams(max_tokens=120, temperature=0, structured=structured("json_schema", PERSON))
    results = generate(small, prompts, params)
    assert small.stats()["num_preemptions"] > 0
    for r in results.values():
        assert r["finish_reason"] == "stop", r
        jsonschema.validate(json.loads(r["text"]), PERSON)
    assert results == generate(engine(64), prompts, params)  # the same tokens as without preemption


def test_abort_and_finish_free_the_matcher(engine):
    engine.add_request("a", "Hi", SamplingParams(max_tokens=50, structured=structured("regex", "[a-z]{1,40}")))
    seq = engine.requests["a"]
    engine.step()
    assert seq.matcher is not None
    engine.abort("a")
    assert seq.matcher is None
    while engine.has_unfinished_requests():
        engine.step()


def test_a_token_the_grammar_refuses_fails_that_request_only(engine):
    output = structured("regex", "[a-z]{1,10}")
    engine.add_request("broken", "Hi", SamplingParams(max_tokens=8, temperature=0, structured=output))
    engine.add_request("fine", "Hi", SamplingParams(max_tokens=8, temperature=0, structured=output))
    engine.requests["broken"].matcher.accept = lambda token_id: False
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o.finish_reason for o in engine.step() if o.finished})
    assert finished == {"broken": "error", "fine": "stop"}


def test_json_masks_never_allow_raw_control_characters(engine):
    # xgrammar 0.2.9 lets them into strings with a maxLength (mlc-ai/xgrammar#800): "name" has one.
    matcher = engine.grammars.matcher(structured("json_schema", PERSON))
    assert all(matcher.accept(t) for t in engine.tokenizer.encode('{"name": "Ab', add_special_tokens=False))
    bitmask = torch.zeros(1, (matcher.vocab_size + 31) // 32, dtype=torch.int32)
    matcher.fill(bitmask, 0)
    allowed = set(((bitmask[0, :, None] >> torch.arange(32)) & 1).flatten().nonzero().flatten().tolist())
    byte_level = engine.tokenizer.convert_tokens_to_ids  # byte-level BPE spells 0x01 "ā" and a tab "ĉ"
    assert byte_level("ā") not in allowed and byte_level("ĉ") not in allowed
    assert {byte_level("c"), byte_level('"')} <= allowed


def test_structured_output_pickles_and_needs_logits():
    params = SamplingParams(temperature=0, structured=structured("choice", ["a", "b"], "guided_choice"))
    assert pickle.loads(pickle.dumps(params)) == params
    assert params.needs_logits  # no greedy fast path: the grammar masks the logits


# --- the sampler's mask, on hand-made logits ---------------------------------------------------------------------

class FakeMatcher:
    """Allows a fixed set of tokens of a vocabulary of vocab_size (the tokenizer's)."""

    def __init__(self, allowed: list[int], vocab_size: int):
        self.allowed, self.vocab_size = allowed, vocab_size

    def fill(self, bitmask, row):
        bits = torch.zeros(bitmask.shape[1] * 32, dtype=torch.bool)
        bits[self.allowed] = True
        bitmask[row] = pack_bits(bits)


def seq_with(params, matcher=None, token_ids=(5, 6)):
    seq = Sequence(str(id(params)), list(token_ids), params, 0)
    seq.matcher = matcher
    return seq


def test_mask_matches_a_plain_torch_reference():
    vocab, tokenizer_vocab = 100, 90  # the logits padded past the tokenizer's 90 tokens
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    allowed = {0: [1, 31, 32, 33, 89, 95], 2: [0, 63, 64, 88]}  # 95: past the tokenizer, never allowed
    params = SamplingParams(temperature=1.0, structured=structured("regex", "x"))
    seqs = [seq_with(params, FakeMatcher(allowed[row], tokenizer_vocab)) if row in allowed
            else seq_with(SamplingParams(temperature=1.0)) for row in range(4)]
    expected = logits.clone()
    for row, tokens in allowed.items():
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[[t for t in tokens if t < tokenizer_vocab]] = True
        expected[row][~keep] = float("-inf")
    assert torch.equal(Sampler(torch.device("cpu"), seed=0)._process(logits, seqs, None), expected)
    # apply_token_bitmask alone, on rows given by index.
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    for i, row in enumerate(allowed):
        FakeMatcher(allowed[row], tokenizer_vocab).fill(bitmask, i)
    assert torch.equal(apply_token_bitmask(logits, bitmask, [0, 2], tokenizer_vocab), expected)
    # Sampling follows: only allowed tokens, greedy or not.
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, top_k=3, structured=structured("regex", "x"))
        seqs = [seq_with(params, FakeMatcher(allowed[0], tokenizer_vocab)) for _ in range(64)]
        tokens = Sampler(torch.device("cpu"), seed=1)(logits[:1].expand(64, -1), seqs)
        assert set(tokens.tolist()) <= {1, 31, 32, 33, 89}


def test_batches_without_structured_rows_are_untouched():
    logits = torch.randn(2, 50)
    seqs = [seq_with(SamplingParams(temperature=1.0)), seq_with(SamplingParams(temperature=0))]
    assert Sampler(torch.device("cpu"), seed=0)._process(logits, seqs, None) is logits
    # An ended sequence's row is not masked (its matcher is gone; its token is dropped).
    ended = seq_with(SamplingParams(structured=structured("regex", "x")))
    ended.status = SequenceStatus.FINISHED
    assert torch.equal(Sampler(torch.device("cpu"), seed=0)._process(logits[:1], [ended], None), logits[:1])


def test_the_grammar_ends_the_output_even_before_min_tokens():
    eos = 7
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0, min_tokens=5, structured=structured("regex", "x"))
    ends = seq_with(params, FakeMatcher([eos], 20))        # complete: only EOS allowed
    goes_on = seq_with(params, FakeMatcher([eos, 3], 20))  # EOS held back, 3 allowed
    processed = Sampler(torch.device("cpu"), seed=0, eos_token_ids={eos})._process(logits, [ends, goes_on], None)
    assert processed[0].isfinite().nonzero().flatten().tolist() == [eos]
    assert processed[1].isfinite().nonzero().flatten().tolist() == [3]
