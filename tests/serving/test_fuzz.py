"""Property-based fuzzing of a running `rayprism serve` over real HTTP: generated requests mix valid and invalid
fields across /v1/completions, /v1/chat/completions, /tokenize and /detokenize, with raw bodies and random
routes and methods besides.
Every answer must be a 2xx, or a 4xx in OpenAI's error shape: never a 5xx, never an error body that is not
JSON, never a stream that ends in an error. Afterwards the server still serves and is ready."""
from __future__ import annotations

import collections
import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving.helpers import RayNodes, ServeProcess

pytestmark = pytest.mark.slow

MODEL = "tiny"
NUM_REQUESTS = 2000
VOCAB_SIZE = 49152     # of helpers.make_checkpoint's model


@pytest.fixture(scope="module")
def server(checkpoints):
    cluster = RayNodes(head_cpus=2)
    process = ServeProcess(["--model", str(checkpoints["a"]), "--served-model-name", MODEL, "--device", "cpu",
                            "--ray-address", cluster.address])
    yield process
    assert process.stop() == 0, process.log()
    cluster.stop()


# ---- strategies: valid bodies with a few fields spoiled ---------------------------------------------
strings = st.text(max_size=12) | st.sampled_from(["\ud800", "a\udfff", "\ud83d\ude00", "\x00", "</s>", "{% x %}"])
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | strings   # floats: NaN, inf
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
                    max_leaves=6)


def no_long_generation(value) -> bool:
    """Junk max_tokens that would not be refused must stay small, or a valid request takes seconds."""
    return value is not None and not (type(value) is int and 3 < value < 10**4)


token_ids = st.lists(st.integers(-2, VOCAB_SIZE + 2), max_size=8)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]),
     "content": strings | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": strings}), max_size=2)},
    optional={"name": strings})
COMMON = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(0, 2 * VOCAB_SIZE),
    "seed": st.integers(-(2**63), 2**64 - 1) | st.sampled_from([-(2**63) - 1, 2**64, 2**64 - 1, -1, 0]),
    "stop": strings | st.lists(strings, max_size=4),
    "stop_token_ids": token_ids,
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1),
    "repetition_penalty": st.floats(0.01, 10),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "min_p": st.floats(0, 1),
    "min_tokens": st.integers(0, 3),
    "logit_bias": st.dictionaries(st.integers(-2, VOCAB_SIZE + 2).map(str), st.floats(-101, 101), max_size=4),
    "user": strings,
}
COMPLETIONS = {**COMMON, "prompt": strings | token_ids, "logprobs": st.integers(0, 20), "echo": st.just(False)}
CHAT = {**COMMON, "messages": st.lists(message, min_size=1, max_size=3), "max_completion_tokens": st.integers(1, 3),
        "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20), "add_generation_prompt": st.booleans(),
        "continue_final_message": st.booleans(), "chat_template_kwargs": st.dictionaries(strings, junk, max_size=3)}


@st.composite
def bodies(draw, fields: dict) -> bytes:
    fields = dict(fields)
    required = {"model": st.just(MODEL), "max_tokens": st.integers(1, 3)}
    required.update((key, fields.pop(key)) for key in ("prompt", "messages") if key in fields)
    body = draw(st.fixed_dictionaries(required, optional=fields))
    for key in draw(st.lists(st.sampled_from([*required, *fields]), max_size=3, unique=True)):
        body[key] = draw(junk.filter(no_long_generation) if "max" in key else junk)
    return json.dumps(body).encode()


TOKENIZER = {"model": st.just(MODEL), "prompt": strings, "messages": st.lists(message, min_size=1, max_size=3),
             "add_special_tokens": st.booleans(), "add_generation_prompt": st.booleans(),
             "continue_final_message": st.booleans(), "return_token_strs": st.booleans(), "tokens": token_ids,
             "chat_template_kwargs": st.dictionaries(strings, junk, max_size=3)}


@st.composite
def tokenizer_bodies(draw) -> bytes:
    """/tokenize and /detokenize bodies: any of their fields (model is optional there), up to two spoiled."""
    body = draw(st.fixed_dictionaries({}, optional=TOKENIZER))
    for key in draw(st.lists(st.sampled_from(list(TOKENIZER)), max_size=2, unique=True)):
        body[key] = draw(junk)
    return json.dumps(body).encode()


ENDPOINTS = ["/v1/completions", "/v1/chat/completions"]
TOKENIZER_ROUTES = ["/tokenize", "/detokenize"]
ROUTES = ENDPOINTS + TOKENIZER_ROUTES + ["/v1/models", f"/v1/models/{MODEL}", "/version", "/health", "/live",
                                         "/metrics", "/admin/v1/weights"]
raw_bodies = (junk.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=32)
              | st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth))
completion_requests = st.tuples(st.just("POST"), st.just(ENDPOINTS[0]), bodies(COMPLETIONS))
chat_requests = st.tuples(st.just("POST"), st.just(ENDPOINTS[1]), bodies(CHAT))
http_requests = st.one_of(   # branches are about equally likely: four in seven go to generation bodies
    completion_requests, completion_requests, chat_requests, chat_requests,
    st.tuples(st.just("POST"), st.sampled_from(TOKENIZER_ROUTES), tokenizer_bodies()),
    st.tuples(st.just("POST"), st.sampled_from(ENDPOINTS + TOKENIZER_ROUTES), raw_bodies),
    st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
              st.sampled_from(ROUTES) | st.from_regex(r"\A/[a-zA-Z0-9_./-]{0,24}\Z"), st.just(b"")))


# ---- the property ----------------------------------------------------------------------------------
def check(response: requests.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        assert response.status_code != 429 or response.headers["Retry-After"]
    elif response.headers.get("Content-Type", "").startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
        assert events[-1] == "[DONE]" and not any("error" in json.loads(e) for e in events[:-1]), response.text


def test_no_request_gets_a_5xx_and_the_server_still_serves(server):
    session = requests.Session()
    statuses = collections.Counter()

    @settings(max_examples=NUM_REQUESTS, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(http_requests)
    def one_request(request):
        method, path, body = request
        response = session.request(method, server.url + path, data=body, timeout=60,
                                   headers={"Content-Type": "application/json"})
        statuses[response.status_code] += 1
        check(response)

    one_request()
    print(f"fuzzed {statuses.total()} requests: {dict(sorted(statuses.items()))}")
    assert statuses.total() >= NUM_REQUESTS
    assert statuses[200] >= NUM_REQUESTS // 10     # a fair share did generate
    completion = session.post(f"{server.url}/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": "still there?", "max_tokens": 2, "ignore_eos": True})
    assert completion.json()["usage"]["completion_tokens"] == 2
    assert session.get(f"{server.url}/health", timeout=10).status_code == 200
    assert session.get(f"{server.url}/live", timeout=10).status_code == 200
