"""Engine behaviour on the random tiny Llama: batching, preemption, sampling, stops, aborts, validation."""
import pytest

from rayprism.engine import EngineConfig, InvalidRequestError, LLMEngine, SamplingParams

from .helpers import generate

PROMPTS = [
    "The capital of France is",
    "Hi",
    "A much longer prompt that spans quite a few more tokens than the others do, on purpose",
    "def main():",
]
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return LLMEngine(EngineConfig(model=tiny_llama_dir, num_kv_blocks=64, max_model_len=128))


def tokens(results):
    return [r["token_ids"] for r in results.values()]


def test_batch_invariance(engine):
    alone = [generate(engine, [p], GREEDY)["0"]["token_ids"] for p in PROMPTS]
    assert tokens(generate(engine, PROMPTS, GREEDY)) == alone
    # Prompts joining while others are decoding (continuous batching) change nothing either, and they join
    # the decoding ones' steps (mixed steps): the last one, added at step 4, is done 20 steps later.
    steps_before = engine.stats()["num_steps"]
    assert tokens(generate(engine, PROMPTS, GREEDY, staggered=True)) == alone
    assert engine.stats()["num_steps"] - steps_before == len(PROMPTS) - 1 + GREEDY.max_tokens


def test_preemption_completes_every_request_with_the_same_tokens(tiny_llama_dir, engine):
    # 8 blocks x 16 slots: four sequences of ~30 tokens each cannot all stay resident.
    small = LLMEngine(EngineConfig(model=tiny_llama_dir, num_kv_blocks=8, max_model_len=64))
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    results = generate(small, PROMPTS, params)
    assert small.stats()["num_preemptions"] > 0
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 24 for r in results.values())
    assert tokens(results) == tokens(generate(engine, PROMPTS, params))
    stats = small.stats()
    assert (stats["num_running"], stats["num_waiting"], stats["kv_cache_usage"]) == (0, 0, 0.0)


def test_same_seed_same_tokens_whatever_the_batch(engine):
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = generate(engine, [PROMPTS[0]], seeded)["0"]["token_ids"]
    other = SamplingParams(max_tokens=16, temperature=0.8, seed=7, ignore_eos=True)
    batched = generate(engine, [PROMPTS[1], PROMPTS[0], PROMPTS[2]], [other, seeded, other])
    assert batched["1"]["token_ids"] == alone
    reseeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=99, ignore_eos=True)
    assert generate(engine, [PROMPTS[0]], reseeded)["0"]["token_ids"] != alone


def test_sampling_differs_from_greedy_and_respects_top_k(engine):
    greedy = generate(engine, [PROMPTS[0]], GREEDY)["0"]["token_ids"]
    top1 = SamplingParams(max_tokens=20, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    assert generate(engine, [PROMPTS[0]], top1)["0"]["token_ids"] == greedy
    tiny_p = SamplingParams(max_tokens=20, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True)
    assert generate(engine, [PROMPTS[0]], tiny_p)["0"]["token_ids"] == greedy
    min_p_1 = SamplingParams(max_tokens=20, temperature=1.5, min_p=1.0, seed=3, ignore_eos=True)
    assert generate(engine, [PROMPTS[0]], min_p_1)["0"]["token_ids"] == greedy
    hot = SamplingParams(max_tokens=20, temperature=1.5, seed=3, ignore_eos=True)
    assert generate(engine, [PROMPTS[0]], hot)["0"]["token_ids"] != greedy


def test_logprobs(engine):
    with_logprobs = SamplingParams(max_tokens=5, temperature=0, logprobs=3)
    results = generate(engine, PROMPTS[:2], [with_logprobs, SamplingParams(max_tokens=5, temperature=0)])
    assert results["1"]["logprobs"] == []  # not asked for
    result = results["0"]
    assert len(result["logprobs"]) == len(result["token_ids"])
    for token_id, entry in zip(result["token_ids"], result["logprobs"]):
        assert entry["token_id"] == token_id and len(entry["top"]) == 3
        assert entry["logprob"] == pytest.approx(max(entry["top"].values())) and entry["logprob"] < 0
        assert entry["top"][token_id] == pytest.approx(entry["logprob"])


def test_stop_string_is_trimmed_and_streamed_text_never_contains_it(engine):
    full = generate(engine, [PROMPTS[0]], GREEDY)["0"]
    stop = full["text"][len(full["text"]) // 2:][:3]
    assert stop.strip()
    outputs = []
    engine.add_request("s", PROMPTS[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))
    while engine.has_unfinished_requests():
        outputs += engine.step()
    text = "".join(o.new_text for o in outputs)
    assert text == full["text"][: full["text"].index(stop)]
    assert outputs[-1].finish_reason == "stop" and outputs[-1].finished


def test_stop_token_ids_and_max_tokens(engine):
    full = generate(engine, [PROMPTS[3]], GREEDY)["0"]
    assert full["finish_reason"] == "length" and len(full["token_ids"]) == 20
    stop_id = full["token_ids"][4]
    stopped = generate(engine, [PROMPTS[3]], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_id]))
    cut = full["token_ids"].index(stop_id) + 1
    assert stopped["0"]["token_ids"] == full["token_ids"][:cut] and stopped["0"]["finish_reason"] == "stop"


def test_generation_stops_at_max_model_len(tiny_llama_dir):
    short = LLMEngine(EngineConfig(model=tiny_llama_dir, num_kv_blocks=4, max_model_len=20))
    prompt = list(range(100, 115))
    result = generate(short, [prompt], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))["0"]
    assert result["finish_reason"] == "length" and len(prompt) + len(result["token_ids"]) == 20


def test_abort_running_and_waiting(engine):
    engine.add_request("a", PROMPTS[0], GREEDY)
    engine.add_request("b", PROMPTS[1], GREEDY)
    engine.step()
    engine.add_request("c", PROMPTS[2], GREEDY)
    engine.abort("a")
    engine.abort("c")
    engine.abort("never-added")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    finals = {o.request_id: o for o in outputs if o.finished}
    assert finals["a"].finish_reason == "abort" and finals["c"].finish_reason == "abort"
    assert finals["b"].finish_reason == "length" and finals["b"].num_output_tokens == 20
    assert not any(o.new_token_ids for o in outputs if o.request_id in "ac")
    assert engine.stats()["kv_cache_usage"] == 0.0


@pytest.mark.parametrize(
    "prompt, params, param",
    [
        ("", SamplingParams(), "prompt"),
        ([], SamplingParams(), "prompt"),
        ([10**9], SamplingParams(), "prompt"),
        ([5] * 129, SamplingParams(), "prompt"),  # max_model_len is 128
        ("hi", SamplingParams(max_tokens=0), "max_tokens"),
        ("hi", SamplingParams(max_tokens=-3), "max_tokens"),
        ("hi", SamplingParams(temperature=-0.5), "temperature"),
        ("hi", SamplingParams(top_p=0.0), "top_p"),
        ("hi", SamplingParams(top_p=1.5), "top_p"),
        ("hi", SamplingParams(top_k=-1), "top_k"),
        ("hi", SamplingParams(logprobs=100), "logprobs"),
        ("hi", SamplingParams(stop="x"), "stop"),
        ("hi", SamplingParams(stop=None), "stop"),
        ("hi", SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
        ("hi", SamplingParams(temperature=float("inf")), "temperature"),
        ("hi", SamplingParams(temperature=float("nan")), "temperature"),
        ("hi", SamplingParams(seed=2**64), "seed"),        # torch.Generator.manual_seed would raise
        ("hi", SamplingParams(seed=-(2**63) - 1), "seed"),
        ("hi", SamplingParams(repetition_penalty=0), "repetition_penalty"),
        ("hi", SamplingParams(repetition_penalty=float("inf")), "repetition_penalty"),
        ("hi", SamplingParams(presence_penalty=-2.5), "presence_penalty"),
        ("hi", SamplingParams(frequency_penalty=float("nan")), "frequency_penalty"),
        ("hi", SamplingParams(min_p=1.5), "min_p"),
        ("hi", SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
        ("hi", SamplingParams(logit_bias={49152: 1.0}), "logit_bias"),  # past the vocabulary
        ("hi", SamplingParams(logit_bias={5: -101}), "logit_bias"),
    ],
)
def test_bad_requests_rejected_before_the_model(engine, monkeypatch, prompt, params, param):
    monkeypatch.setattr(engine.runner, "execute_model", lambda batch: pytest.fail("reached the model"))
    with pytest.raises(InvalidRequestError, match=param) as error:
        engine.add_request("bad", prompt, params)
    assert error.value.param == param
    assert not engine.has_unfinished_requests()
    assert engine.step() == []


def test_duplicate_request_id_rejected(engine):
    engine.add_request("dup", "hi", GREEDY)
    with pytest.raises(InvalidRequestError, match="request_id"):
        engine.add_request("dup", "hello", GREEDY)
    engine.abort("dup")
    engine.step()


def test_sleep_and_wake_up_keep_requests(engine):
    expected = tokens(generate(engine, PROMPTS[:2], GREEDY))
    engine.add_request("0", PROMPTS[0], GREEDY)
    engine.add_request("1", PROMPTS[1], GREEDY)
    got = {"0": [], "1": []}
    for _ in range(3):
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    engine.sleep()
    assert engine.runner.kv_cache is None and engine.stats()["num_running"] == 0
    for out in engine.step():  # the tokens of the step that was in flight when sleep() came
        got[out.request_id] += out.new_token_ids
    assert engine.step() == [] and engine.stats()["num_waiting"] == 2  # paused, not lost
    engine.wake_up()
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert list(got.values()) == expected


def test_load_weights_and_update_from_tensors(tiny_llama_dir, tiny_qwen2_dir, tmp_path, smollm2_dir):
    from safetensors.torch import load_file

    from .helpers import save_random_model

    other = save_random_model(str(tmp_path / "other"), smollm2_dir, initializer_range=0.2)
    reference = tokens(generate(LLMEngine(EngineConfig(model=other, num_kv_blocks=16)), PROMPTS, GREEDY))
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, num_kv_blocks=16))
    assert tokens(generate(engine, PROMPTS, GREEDY)) != reference
    with pytest.raises(ValueError, match="does not fit the model"):
        engine.load_weights(tiny_qwen2_dir)  # refused before any weight is touched
    assert tokens(generate(engine, PROMPTS, GREEDY)) == tokens(generate(LLMEngine(engine.config), PROMPTS, GREEDY))
    engine.load_weights(other)
    assert tokens(generate(engine, PROMPTS, GREEDY)) == reference
    engine.load_weights(tiny_llama_dir)
    engine.update_weights_from_tensors(load_file(f"{other}/model.safetensors").items())
    assert tokens(generate(engine, PROMPTS, GREEDY)) == reference


def test_extreme_valid_parameters_sample(engine):
    """The ends of every accepted range: no overflow (top_k, seeds) and no NaN (tiny temperature)."""
    extremes = [SamplingParams(max_tokens=3, temperature=1e-30, top_k=10**30, seed=2**64 - 1),
                SamplingParams(max_tokens=3, temperature=1e6, top_p=1e-9, seed=-(2**63)),
                SamplingParams(max_tokens=3, temperature=1.0, seed=-1, logprobs=20)]
    results = generate(engine, ["hi"] * len(extremes), extremes)
    assert all(r["finish_reason"] in ("stop", "length") for r in results.values())


def test_a_request_that_fails_in_the_engine_ends_alone(engine, monkeypatch):
    """Per-request work raising (sampling setup, then detokenising) fails that request only."""
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    doomed = SamplingParams(max_tokens=8, temperature=1.0, seed=666, ignore_eos=True)
    expected = tokens(generate(engine, PROMPTS[:3], [GREEDY, seeded, seeded]))
    generator_for, decode = engine.sampler.generator_for, engine.tokenizer.decode

    def generator_failing_for_seed_666(seq):
        if seq.params.seed == 666:
            raise RuntimeError("injected sampling fault")
        return generator_for(seq)

    def decode_failing_on_token_666(ids, **kwargs):
        if 666 in ids:
            raise RuntimeError("injected detokenising fault")
        return decode(ids, **kwargs)

    monkeypatch.setattr(engine.sampler, "generator_for", generator_failing_for_seed_666)
    for staggered in (False, True):   # the doomed row last in a batch, then first (prefilled with the others)
        results = generate(engine, PROMPTS[:3] + ["doomed"], [GREEDY, seeded, seeded, doomed], staggered)
        assert [r["finish_reason"] for r in results.values()] == ["length"] * 3 + ["error"]
        assert tokens(results)[:3] == expected

    monkeypatch.setattr(engine.tokenizer, "decode", decode_failing_on_token_666)
    results = generate(engine, PROMPTS[:3] + [[5, 666, 7]], [GREEDY, seeded, seeded, GREEDY])
    assert [r["finish_reason"] for r in results.values()] == ["length"] * 3 + ["error"]
    assert tokens(results)[:3] == expected
    stats = engine.stats()
    assert (stats["num_running"], stats["num_waiting"], stats["kv_cache_usage"]) == (0, 0, 0.0)


def test_repetition_penalty_breaks_a_greedy_loop(engine):
    prompt = engine.tokenizer.encode(PROMPTS[0])
    looping = generate(engine, [PROMPTS[0]], GREEDY)["0"]["token_ids"]
    assert len(set(looping)) < len(looping)  # the random model repeats itself
    penalized = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=1e6)
    results = generate(engine, PROMPTS[:2], [penalized, GREEDY])
    out = results["0"]["token_ids"]
    assert len(set(out)) == len(out) and not set(out) & set(prompt)
    assert results["1"]["token_ids"] == generate(engine, [PROMPTS[1]], GREEDY)["0"]["token_ids"]


def test_frequency_and_presence_penalties_break_a_greedy_loop(engine):
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, **penalty)
        out = generate(engine, [PROMPTS[0]], params)["0"]["token_ids"]
        assert len(set(out)) == len(out), penalty


def test_min_tokens_holds_back_a_stop_token(engine):
    free = generate(engine, [PROMPTS[0]], GREEDY)["0"]["token_ids"]
    stop = free[2]
    stopped = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop])
    assert generate(engine, [PROMPTS[0]], stopped)["0"]["token_ids"] == free[:3]
    held = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop], min_tokens=8)
    out = generate(engine, [PROMPTS[0]], held)["0"]["token_ids"]
    assert len(out) > 8 and stop not in out[:8]


def test_logit_bias_forces_and_bans_tokens(engine):
    forced = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logit_bias={1234: 100})
    hot = SamplingParams(max_tokens=5, temperature=1.5, seed=3, ignore_eos=True, logit_bias={1234: 100})
    results = generate(engine, PROMPTS[:3], [forced, GREEDY, hot])
    assert results["0"]["token_ids"] == results["2"]["token_ids"] == [1234] * 5
    free = results["1"]["token_ids"]
    banned = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logit_bias={free[0]: -100})
    assert generate(engine, [PROMPTS[1]], banned)["0"]["token_ids"][0] != free[0]
