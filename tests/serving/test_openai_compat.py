"""Conformance with vLLM's OpenAI server, parameter by parameter, with the official `openai` client against
`rayprism serve` on SmolLM2-135M-Instruct (real weights, CPU): each row of PARAMETERS asks for one parameter and
checks its effect against a request without it, not only the status. (include_stop_str_in_output,
skip_special_tokens, spaces_between_special_tokens, the chat template's options, text_offset and the metrics are
checked in test_server.py.)"""
from __future__ import annotations

import collections
import json
import re

import jsonschema
import openai
import pytest
import requests

from tests.serving.helpers import RayNodes, ServeProcess

pytestmark = pytest.mark.slow

MODEL = "smollm2"
PROMPT = "The three primary colors are"
CHAT = [{"role": "user", "content": "Say hi"}]
REPETITIVE = "List the numbers: 1, 2, 3,"   # greedy: " 4, 5, 6, 7, 8, 9, 10, 1..." (8 commas)


@pytest.fixture(scope="module")
def server():
    nodes = RayNodes(head_cpus=2)
    process = ServeProcess(["--model", "builtin://smollm2-135m-instruct", "--served-model-name", MODEL,
                            "--device", "cpu", "--max-num-seqs", "16", "--ray-address", nodes.address])
    yield process
    assert process.stop() == 0, process.log()
    nodes.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def complete(client, prompt=PROMPT, **fields):
    extra = {key: fields.pop(key) for key in list(fields) if key in EXTRA_BODY}
    return client.completions.create(model=MODEL, prompt=prompt, **{"max_tokens": 8, "temperature": 0, **fields},
                                     extra_body=extra or None)


def chat(client, messages=CHAT, **fields):
    extra = {key: fields.pop(key) for key in list(fields) if key in EXTRA_BODY}
    return client.chat.completions.create(model=MODEL, messages=messages,
                                          **{"max_tokens": 8, "temperature": 0, **fields}, extra_body=extra or None)


# vLLM's parameters beyond OpenAI's: the client sends them in extra_body.
EXTRA_BODY = {"top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
              "prompt_logprobs", "include_stop_str_in_output", "guided_json", "guided_regex", "guided_choice",
              "guided_grammar"}


def text(response) -> str:
    first = response.choices[0]
    return first.message.content if hasattr(first, "message") else first.text


def tokens_of(response) -> list[str]:
    return response.choices[0].logprobs.tokens


def most_repeated(response) -> int:
    return max(collections.Counter(tokens_of(response)).values())


# ---- one row per parameter: (id, check(client)) -------------------------------------------------------
def check_temperature(client):
    hot = [text(complete(client, temperature=1.5, max_tokens=12)) for _ in range(3)]
    assert len(set(hot)) > 1 and text(complete(client)) == text(complete(client))


def check_seed(client):
    seeded = lambda seed: text(complete(client, temperature=1.0, seed=seed, max_tokens=12))  # noqa: E731
    assert seeded(7) == seeded(7) != seeded(8)


def check_top_p(client):
    assert text(complete(client, temperature=1.5, top_p=1e-6, seed=1)) == text(complete(client))


def check_top_k(client):
    assert text(complete(client, temperature=1.5, top_k=1, seed=1)) == text(complete(client))


def check_min_p(client):
    assert text(complete(client, temperature=1.5, min_p=1.0, seed=1)) == text(complete(client))


def check_max_tokens(client):
    response = complete(client, max_tokens=5, ignore_eos=True)
    assert response.usage.completion_tokens == 5 and response.choices[0].finish_reason == "length"


def check_stop(client):
    full = text(complete(client, max_tokens=12))
    stop = full[4:7]
    response = complete(client, max_tokens=12, stop=[stop])
    assert text(response) == full[:full.index(stop)] and response.choices[0].finish_reason == "stop"


def check_stop_token_ids(client):
    [first] = token_ids(client, text(complete(client, max_tokens=1)))
    response = complete(client, stop_token_ids=[first], max_tokens=12)
    assert (text(response), response.usage.completion_tokens, response.choices[0].finish_reason) == ("", 1, "stop")


def token_ids(client, text: str, **fields) -> list[int]:
    url = str(client.base_url).removesuffix("/v1/")
    answer = requests.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False, **fields}, timeout=30)
    return answer.json()["tokens"]


def check_ignore_eos(client):
    ended = chat(client, max_tokens=60)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 60
    assert chat(client, max_tokens=60, ignore_eos=True).usage.completion_tokens == 60


def check_min_tokens(client):
    natural = chat(client, max_tokens=60).usage.completion_tokens
    held = chat(client, max_tokens=60, min_tokens=natural + 5)
    assert held.usage.completion_tokens >= natural + 5


@pytest.mark.parametrize("penalty", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                                     {"repetition_penalty": 2.0}])
def test_penalties_reduce_repetition(client, penalty):
    plain = complete(client, prompt=REPETITIVE, max_tokens=24, logprobs=0, ignore_eos=True)
    penalized = complete(client, prompt=REPETITIVE, max_tokens=24, logprobs=0, ignore_eos=True, **penalty)
    assert text(penalized) != text(plain) and most_repeated(penalized) < most_repeated(plain)


def check_logit_bias(client):
    [token] = token_ids(client, " banana")
    response = complete(client, logit_bias={str(token): 100}, max_tokens=4)
    assert text(response) == " banana" * 4


def check_logprobs(client):
    response = complete(client, logprobs=3, max_tokens=4)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and all(len(top) == 3 for top in logprobs.top_logprobs)
    assert all(lp == pytest.approx(max(top.values())) for lp, top in zip(logprobs.token_logprobs,
                                                                        logprobs.top_logprobs))   # greedy


def check_chat_logprobs(client):
    response = chat(client, logprobs=True, top_logprobs=2, max_tokens=4)
    content = response.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 2 for entry in content)
    assert "".join(entry.token for entry in content) == text(response)


def check_n(client):
    response = complete(client, n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    assert [c.index for c in response.choices] == [0, 1, 2] and len({c.text for c in response.choices}) == 3
    assert response.usage.completion_tokens == 30
    streamed = collections.defaultdict(str)
    for chunk in complete(client, n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[i] for i in range(3)] == [c.text for c in response.choices]


def check_chat_n(client):
    response = chat(client, n=2, temperature=1.0, seed=4, max_tokens=10)
    assert [c.index for c in response.choices] == [0, 1] and response.choices[0].message.content


def check_best_of(client):
    all_three = complete(client, n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, logprobs=0)
    best = complete(client, best_of=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    scores = {c.text: sum(c.logprobs.token_logprobs) for c in all_three.choices}
    assert [c.text for c in best.choices] == [max(scores, key=scores.get)]
    assert best.usage.completion_tokens == 18    # all three sequences were generated


def check_echo(client):
    plain = complete(client, max_tokens=4, logprobs=1)
    echoed = complete(client, max_tokens=4, logprobs=1, echo=True)
    prompt_tokens = echoed.usage.prompt_tokens
    assert text(echoed) == PROMPT + text(plain)
    logprobs = echoed.choices[0].logprobs
    assert len(logprobs.tokens) == prompt_tokens + 4 and logprobs.token_logprobs[0] is None
    # (equal up to the float error of a prefill that computes every prompt row's logits, not only the last)
    assert logprobs.token_logprobs[prompt_tokens:] == pytest.approx(plain.choices[0].logprobs.token_logprobs,
                                                                    abs=1e-4)
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert logprobs.text_offset[prompt_tokens] == len(PROMPT)
    streamed = "".join(c.choices[0].text for c in complete(client, max_tokens=4, echo=True, stream=True))
    assert streamed == text(echoed)


def check_prompt_logprobs(client):
    """vLLM's shape: per prompt token (the first: None), {token id: {logprob, rank, decoded_token}} for the prompt's
    token and the top ones; the prompt token's logprob is the one echo reports for it."""
    prompt_ids = token_ids(client, PROMPT, add_special_tokens=True)
    response = complete(client, max_tokens=1, prompt_logprobs=2, echo=True, logprobs=2)
    entries = response.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(prompt_ids) == response.usage.prompt_tokens and entries[0] is None
    echoed = response.choices[0].logprobs.token_logprobs
    for position, (token, entry) in enumerate(zip(prompt_ids[1:], entries[1:]), start=1):
        assert entry[str(token)]["logprob"] == pytest.approx(echoed[position])
        assert sorted(v["rank"] for key, v in entry.items() if key != str(token))[:2] == [1, 2] or \
            entry[str(token)]["rank"] <= 2


# ---- structured output: many samples (n sequences, each its own seeded stream) all valid ----------------
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colors"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "colors": {"type": "array", "maxItems": 3, "items": {"enum": ["red", "green", "blue"]}}}}
DESCRIBE = [{"role": "user", "content": "Describe a person as JSON."}]
SAMPLES = {"n": 12, "temperature": 1.0, "seed": 21}


def all_texts(response) -> list[str]:
    assert all(c.finish_reason == "stop" for c in response.choices), [c.finish_reason for c in response.choices]
    return [c.message.content if hasattr(c, "message") else c.text for c in response.choices]


def check_response_format_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for output in all_texts(chat(client, DESCRIBE, response_format=fmt, max_tokens=80, **SAMPLES)):
        jsonschema.validate(json.loads(output), PERSON)


def check_response_format_json_object(client):
    ask = [{"role": "user", "content": 'Give a JSON object with the key "color" and a color as its value.'}]
    response = chat(client, ask, response_format={"type": "json_object"}, max_tokens=60)
    assert isinstance(json.loads(all_texts(response)[0]), dict)


def check_guided_json(client):
    for output in all_texts(complete(client, "A person as JSON:", guided_json=PERSON, max_tokens=80, **SAMPLES)):
        jsonschema.validate(json.loads(output), PERSON)


def check_guided_regex(client):
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    outputs = all_texts(complete(client, "A phone number:", guided_regex=pattern, max_tokens=20, **SAMPLES))
    assert all(re.fullmatch(pattern, output) for output in outputs) and len(set(outputs)) > 1


def check_guided_choice(client):
    outputs = all_texts(chat(client, [{"role": "user", "content": "Pick a color"}],
                             guided_choice=["red", "green", "blue"], max_tokens=5, **SAMPLES))
    assert set(outputs) <= {"red", "green", "blue"}


def check_guided_grammar(client):
    grammar = 'root ::= answer ", because " reason "."\nanswer ::= "yes" | "no"\nreason ::= [a-z ]{3,30}'
    outputs = all_texts(complete(client, "Is the sky blue?", guided_grammar=grammar, max_tokens=40, **SAMPLES))
    assert all(re.fullmatch(r"(yes|no), because [a-z ]{3,30}\.", output) for output in outputs)


def check_structured_output_streamed(client):
    fields = dict(guided_json=PERSON, max_tokens=80, temperature=1.0, seed=3)
    whole = text(complete(client, "A person as JSON:", **fields))
    streamed = "".join(c.choices[0].text for c in complete(client, "A person as JSON:", stream=True, **fields))
    assert streamed == whole
    jsonschema.validate(json.loads(whole), PERSON)


PARAMETERS = [check_temperature, check_seed, check_top_p, check_top_k, check_min_p, check_max_tokens, check_stop,
              check_stop_token_ids, check_ignore_eos, check_min_tokens, check_logit_bias, check_logprobs,
              check_chat_logprobs, check_n, check_chat_n, check_best_of, check_echo, check_prompt_logprobs,
              check_response_format_json_schema, check_response_format_json_object, check_guided_json,
              check_guided_regex, check_guided_choice, check_guided_grammar, check_structured_output_streamed]


@pytest.mark.parametrize("check", PARAMETERS, ids=[c.__name__.removeprefix("check_") for c in PARAMETERS])
def test_parameter_has_its_effect(client, check):
    check(client)


@pytest.mark.parametrize("fields, param", [({"suffix": "x"}, "suffix"), ({"frobnicate": 1}, "frobnicate"),
                                           ({"best_of": 2, "stream": True}, "best_of"),
                                           ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
                                           ({"guided_regex": "(unclosed"}, "guided_regex"),
                                           ({"guided_json": {"type": "no-such-type"}}, "guided_json"),
                                           ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
                                           ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice")])
def test_refused_with_the_field_named(client, fields, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body=fields)
    assert error.value.body["param"] == param


def test_ignored_fields_are_accepted(client):
    assert text(complete(client, user="someone")) == text(complete(client))


# ---- tool calls --------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def streamed_reply(chunks) -> tuple[str | None, list[dict], str]:
    """What a client puts together from a streamed reply: content, tool calls, finish reason."""
    content, calls, finish = "", [], None
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or ():
            if call.id:
                calls.append({"id": call.id, "name": call.function.name, "arguments": call.function.arguments})
            else:
                calls[call.index]["arguments"] += call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return content or None, calls, finish


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(client, stream):
    """A named tool choice: the reply is a call whose arguments follow the function's schema; the tool's result
    goes back, and the model answers in words."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    fields = dict(tools=[WEATHER, TIME], tool_choice=named, max_tokens=40)
    if stream:
        content, calls, finish = streamed_reply(chat(client, ASK_WEATHER, stream=True, **fields))
        whole = chat(client, ASK_WEATHER, **fields).choices[0].message.tool_calls[0]
        assert calls[0]["arguments"] == whole.function.arguments
    else:
        message = chat(client, ASK_WEATHER, **fields).choices[0].message
        content, finish = message.content, "tool_calls"
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
    assert content is None and finish == "tool_calls" and len(calls) == 1 and calls[0]["name"] == "get_weather"
    arguments = json.loads(calls[0]["arguments"])
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    history = [*ASK_WEATHER,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": calls[0]["id"], "type": "function",
                    "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
               {"role": "tool", "tool_call_id": calls[0]["id"], "content": "Sunny, 21 degrees celsius"}]
    answer = chat(client, history, tools=[WEATHER, TIME], tool_choice="none", max_tokens=30)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice(client, parallel):
    response = chat(client, ASK_WEATHER, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel,
                    max_tokens=200, **SAMPLES)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for choice in response.choices:
        calls = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and calls and (parallel or len(calls) == 1)
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_auto_tool_choice_needs_a_parser(client):
    """SmolLM2's chat template renders no tools, so no tool-call format is known: "auto" is refused, naming the
    option that sets one."""
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, ASK_WEATHER, tools=[WEATHER])
    assert error.value.body["param"] == "tool_choice" and "--tool-call-parser" in error.value.body["message"]
