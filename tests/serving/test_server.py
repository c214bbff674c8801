"""`rayprism serve` (a subprocess on a `ray start` cluster) driven by the official openai client and raw HTTP:
completions and chat, streaming, the model card by id, vLLM's /tokenize and /detokenize, 64 concurrent
streams, errors (parameters, routes, bodies, a request failing in the engine), the bounded queue, client
disconnects, metrics (vLLM's names included), the admin weights API on its own port with a live weight update,
the probes, and a killed worker."""
from __future__ import annotations

import asyncio
import signal
import time

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from rayprism.engine import SamplingParams
from tests.serving.helpers import (FAULTY_SEED, FAULTY_WORKERS_ENV, STALL_FILE, RayNodes, ServeProcess,
                                  reference_outputs)

pytestmark = pytest.mark.slow

MODEL = "tiny"
TOKEN = "s3cret-token"
MAX_NUM_SEQS, MAX_QUEUE_SIZE = 16, 48        # at most 64 requests in flight


@pytest.fixture(scope="module")
def cluster():
    nodes = RayNodes(head_cpus=4)
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def server(cluster, checkpoints, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("admin") / "token"
    template = str(checkpoints["a"]).replace("ckpt-a", "ckpt-{revision}")
    process = ServeProcess(["--model", template, "--model-revision", "a", "--served-model-name", MODEL,
                            "--device", "cpu", "--max-num-seqs", str(MAX_NUM_SEQS),
                            "--max-queue-size", str(MAX_QUEUE_SIZE), "--ray-address", cluster.address,
                            "--admin-token-file", str(token_file), "--unready-delay-seconds", "0.5",
                            "--engine-restarts", "0"])   # a killed worker leaves it dead (test_self_heal restarts)
    process.token_file = token_file
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def greedy(max_tokens: int) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0, "extra_body": {"ignore_eos": True}}


def test_models_and_completions(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", **greedy(8))
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8 and whole.usage.total_tokens == whole.usage.prompt_tokens + 8
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", stream=True,
                                            stream_options={"include_usage": True}, **greedy(8)))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_completions(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, **greedy(6))
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **greedy(6)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    as_text = client.chat.completions.create(model=MODEL, messages=messages, response_format={"type": "text"},
                                             **greedy(6))
    assert as_text.choices[0].message.content == whole.choices[0].message.content


def test_model_by_id_tokenize_and_detokenize(server, client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    prompt, messages = "Once upon a time", [{"role": "user", "content": "Say hi"}]
    completion = client.completions.create(model=MODEL, prompt=prompt, **greedy(1))
    chat = client.chat.completions.create(model=MODEL, messages=messages, **greedy(1))
    tokenized = post(server, "/tokenize", {"model": MODEL, "prompt": prompt, "return_token_strs": True})
    assert tokenized["count"] == len(tokenized["tokens"]) == len(tokenized["token_strs"]) == \
        completion.usage.prompt_tokens
    assert tokenized["max_model_len"] == client.models.retrieve(MODEL).max_model_len
    assert post(server, "/detokenize", {"model": MODEL, "tokens": tokenized["tokens"]}) == {"prompt": prompt}
    chat_tokens = post(server, "/tokenize", {"messages": messages})     # model is optional, as in vLLM
    assert chat_tokens["count"] == chat.usage.prompt_tokens and chat_tokens["token_strs"] is None
    assert post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False})["count"] < \
        chat_tokens["count"]


def test_include_stop_str_in_output(client):
    full = client.completions.create(model=MODEL, prompt="Once upon a time", **greedy(16)).choices[0].text
    stop = full[len(full) // 2:][:3]
    cut = full.index(stop)
    for include, expected in ((False, full[:cut]), (True, full[:cut + len(stop)])):
        fields = {**greedy(16), "stop": [stop],
                  "extra_body": {"ignore_eos": True, "include_stop_str_in_output": include}}
        whole = client.completions.create(model=MODEL, prompt="Once upon a time", **fields)
        assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
        chunks = client.completions.create(model=MODEL, prompt="Once upon a time", stream=True, **fields)
        assert "".join(c.choices[0].text for c in chunks) == expected


def test_skip_special_tokens(client):
    """<|im_start|> (id 1) forced by logit_bias: a special token, not an end one, so only its text can change."""
    def text(**options) -> str:
        extra_body = {"ignore_eos": True, "logit_bias": {"1": 100}, **options}
        return client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0,
                                         extra_body=extra_body).choices[0].text
    assert text() == "" and text(skip_special_tokens=True) == ""
    assert text(skip_special_tokens=False) == "<|im_start|>" * 2
    # SmolLM2's is a fast tokenizer, which has no spaces to put between special tokens (vLLM's the same)
    assert text(skip_special_tokens=False, spaces_between_special_tokens=False) == "<|im_start|>" * 2


@pytest.mark.parametrize("options", [{}, {"add_generation_prompt": False},
                                     {"add_generation_prompt": False, "continue_final_message": True}])
def test_chat_template_options(client, checkpoints, options):
    """The chat's prompt is the template rendered with these options: a completion of its token ids matches."""
    messages = [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": "Once upon a"}]
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["a"])
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, **{"add_generation_prompt": True, **options})
    assert rendered.endswith("Once upon a") == bool(options.get("continue_final_message"))
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    chat = client.chat.completions.create(model=MODEL, messages=messages,
                                          **{**greedy(6), "extra_body": {"ignore_eos": True, **options}})
    completion = client.completions.create(model=MODEL, prompt=prompt_ids, **greedy(6))
    assert chat.usage.prompt_tokens == len(prompt_ids)
    assert chat.choices[0].message.content == completion.choices[0].text


def post(server, path: str, body: dict) -> dict:
    response = requests.post(f"{server.url}{path}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_logprobs(client):
    completion = client.completions.create(model=MODEL, prompt="Hello", logprobs=2, **greedy(3))
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == 3 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) >= 1 for top in logprobs.top_logprobs)



@pytest.mark.parametrize("with_stop", [False, True])
def test_logprobs_text_offset(client, with_stop):
    """Each token's offset in the returned text, streamed or not; a stop string (the middle of the text) cuts
    the text short, and the offsets stay within it."""
    full = client.completions.create(model=MODEL, prompt="Once upon a time", logprobs=1, **greedy(12)).choices[0]
    stop = full.text[len(full.text) // 2:][:3] if with_stop else None
    for stream in (False, True):
        chunks = client.completions.create(model=MODEL, prompt="Once upon a time", logprobs=1, stop=stop,
                                           stream=stream, **greedy(12))
        chunks = list(chunks) if stream else [chunks]
        text = "".join(c.choices[0].text for c in chunks)
        offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
        assert text == (full.text[: full.text.index(stop)] if stop else full.text)
        assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(text)
        tokens = full.logprobs.tokens     # each token's own text, where its offset says (up to the stop)
        assert all(text[offset:].startswith(token) or offset + len(token) > len(text)
                   for offset, token in zip(offsets, tokens))
        # the stopped output's tokens are the full one's; only the last one's offset may be cut to the stop
        assert offsets[:-1] == full.logprobs.text_offset[: len(offsets) - 1]
        assert with_stop or len(offsets) == len(tokens)


async def test_64_concurrent_streams_all_complete_with_usage(server):
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Count with me"}]
    prompt_tokens = (await client.chat.completions.create(model=MODEL, messages=messages, **greedy(1))).usage.prompt_tokens

    async def stream(max_tokens):
        text, usage = "", None
        async for chunk in await client.chat.completions.create(
                model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True},
                **greedy(max_tokens)):
            text += "".join(c.delta.content or "" for c in chunk.choices)
            usage = chunk.usage or usage
        return max_tokens, usage

    for max_tokens, usage in await asyncio.gather(*(stream(4 + i % 13) for i in range(64))):
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, max_tokens)
    await client.close()


BAD_REQUESTS = [
    ("completions", b"{not json", 400, None),
    ("completions", [1, 2], 400, None),
    ("completions", {"prompt": "hi"}, 400, "model"),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": 12}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("completions", {"model": MODEL, "prompt": "hi", "stop": 5}, 400, "stop"),
    ("completions", {"model": MODEL, "prompt": "hi", "stop": ["x"] * 17}, 400, "stop"),
    ("completions", {"model": MODEL, "prompt": "hi", "stop": "x" * 1025}, 400, "stop"),
    ("completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": [1] * 257}, 400, "stop_token_ids"),
    ("completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("completions", {"model": MODEL, "prompt": "hi", "include_stop_str_in_output": 1}, 400,
     "include_stop_str_in_output"),
    ("completions", {"model": MODEL, "prompt": "hi", "skip_special_tokens": "no"}, 400, "skip_special_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "spaces_between_special_tokens": 0}, 400,
     "spaces_between_special_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "seed": 2**64}, 400, "seed"),      # killed the engine once
    ("completions", {"model": MODEL, "prompt": "hi", "seed": -(2**63) - 1}, 400, "seed"),
    ("completions", {"model": MODEL, "prompt": "hi", "seed": 1.5}, 400, "seed"),
    ("completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("completions", b'{"model": "tiny", "prompt": "hi", "temperature": Infinity}', 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_k": -1}, 400, "top_k"),
    ("completions", {"model": MODEL, "prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("completions", {"model": MODEL, "prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("completions", {"model": MODEL, "prompt": "hi", "min_p": 1.5}, 400, "min_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"49152": 1}}, 400, "logit_bias"),
    ("completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("completions", {"model": MODEL, "prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("completions", {"model": MODEL, "prompt": "hi", "repetition_penalty": "2"}, 400, "repetition_penalty"),
    ("completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("completions", {"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}},
     400, "stream_options"),
    ("completions", {"model": MODEL, "prompt": [5, -1]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": [5, 10**30]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": [5] * 600}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "\ud800"}, 400, None),         # a lone surrogate
    ("completions", b'{"model": "tiny", "prompt": "\\udfff"}', 400, None),
    ("completions", b"[" * 100_000 + b"]" * 100_000, 400, None),             # nested too deeply
    ("completions", b'{"model": "tiny", "prompt": "hi", "seed": 1' + b"0" * 5000 + b"}", 400, None),
    ("completions", b"\xff\xfe", 400, None),                                  # not UTF-8
    ("completions", {"model": MODEL, "prompt": "hi " * 600}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "continue_final_message": True}, 400, "continue_final_message"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "add_generation_prompt": "no"}, 400, "add_generation_prompt"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "chat_template_kwargs": {"tokenize": True}}, 400, "chat_template_kwargs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ("chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"model": MODEL, "messages": ["hi"]}, 400, "messages[0]"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     400, "top_logprobs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                          "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 513}, 400,
     "messages"),
    # every field either works or is refused; the fields not served yet are typed and range-checked
    ("completions", {"model": MODEL, "prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("completions", {"model": MODEL, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400,
     "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}, 400,
     "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "suffix": "}"}, 400, "suffix"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 2, "best_of": 1}, 400, "best_of"),
    ("completions", {"model": MODEL, "prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("completions", {"model": MODEL, "prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format"),
    ("completions", {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_schema"}}, 400,
     "response_format"),
    ("completions", {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_schema",
                                                                        "json_schema": {"schema": {}}}},
     400, "response_format"),
    ("completions", {"model": MODEL, "prompt": "hi", "guided_json": "{not json"}, 400, "guided_json"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": {}}, 400,
     "tools"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": 5}, 400,
     "tool_choice"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, 400,
     "logprobs"),
    ("/tokenize", [1], 400, None),
    ("/tokenize", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("/detokenize", {"tokens": [1], "frobnicate": 1}, 400, "frobnicate"),
    ("/tokenize", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/tokenize", {"model": 5, "prompt": "hi"}, 400, "model"),
    ("/tokenize", {"model": MODEL}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x" * (512 * 64 + 1)}, 400, "prompt"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/tokenize", {"prompt": "hi", "return_token_strs": 1}, 400, "return_token_strs"),
    ("/tokenize", {"messages": "hi"}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/detokenize", {"model": "gpt-4", "tokens": [1]}, 404, "model"),
    ("/detokenize", {"model": MODEL}, 400, "tokens"),
    ("/detokenize", {"tokens": "hi"}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [49152]}, 400, "tokens"),       # the tokenizer has 49,152 tokens
    ("/detokenize", {"tokens": [True]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1] * 513}, 400, "tokens"),     # more than a context's worth
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, endpoint, body, status, param):
    data = body if isinstance(body, bytes) else None
    path = endpoint if endpoint.startswith("/") else f"/v1/{endpoint}"   # vLLM's own routes are not under /v1
    response = requests.post(f"{server.url}{path}", data=data, json=None if data else body, timeout=30)
    assert_openai_error(response, status, param)


def assert_openai_error(response: requests.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert error["param"] == param and response.headers["X-Request-Id"]
    return error


@pytest.mark.parametrize("fields", [{"repetition_penalty": 1.3}, {"presence_penalty": -2, "frequency_penalty": 2},
                                    {"min_p": 0.5}, {"min_tokens": 3}, {"logit_bias": {"5": 100, "49151": -100}}])
def test_logits_processors_in_range_sample(client, fields):
    completion = client.completions.create(model=MODEL, prompt="processed", max_tokens=3, extra_body=fields)
    assert completion.usage.completion_tokens >= 1


@pytest.mark.parametrize("seed", [0, -1, -(2**63), 2**63, 2**64 - 1])
def test_every_seed_in_range_samples(client, seed):
    completion = client.completions.create(model=MODEL, prompt="seeded", max_tokens=2, seed=seed)
    assert completion.usage.completion_tokens >= 1


def test_probes_while_serving(server):
    assert requests.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{server.url}/live", timeout=10).json() == {"status": "alive"}


def test_unknown_routes_and_methods_are_openai_errors(server):
    assert_openai_error(requests.get(f"{server.url}/v1/nothing", timeout=10), 404)
    response = requests.get(f"{server.url}/v1/completions", timeout=10)
    assert_openai_error(response, 405)
    assert response.headers["Allow"] == "POST"
    assert requests.get(f"{server.url}/v1/models", timeout=10).headers["X-Request-Id"]


def test_huge_prompt_refused_before_tokenising(server):
    for endpoint, body in (("completions", {"prompt": "word " * 4_000_000}),
                           ("chat/completions", {"messages": [{"role": "user", "content": "word " * 4_000_000}]})):
        started = time.monotonic()
        response = requests.post(f"{server.url}/v1/{endpoint}", json={"model": MODEL, **body}, timeout=30)
        assert time.monotonic() - started < 2     # tokenising 20 MB took 15 s
        error = assert_openai_error(response, 400, "messages" if "chat" in endpoint else "prompt")
        assert error["code"] == "context_length_exceeded"


def test_body_too_large_and_still_serving(server, client):
    response = requests.post(f"{server.url}/v1/completions", data=b"x" * (33 * 2**20),
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert client.completions.create(model=MODEL, prompt="still", **greedy(2)).usage.completion_tokens == 2


async def test_full_queue_answers_429(server):
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def one():
        try:
            await client.completions.create(model=MODEL, prompt="queue", **greedy(100))
            return 200
        except openai.RateLimitError as err:
            assert err.body["code"] == "queue_full" and err.response.headers["Retry-After"] == "1"
            return 429

    statuses = await asyncio.gather(*(one() for _ in range(MAX_NUM_SEQS + MAX_QUEUE_SIZE + 16)))
    assert statuses.count(429) >= 8 and statuses.count(200) >= MAX_NUM_SEQS + MAX_QUEUE_SIZE - 8
    await client.close()


def metric(server, name: str, default: float | None = None) -> float:
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    if default is None:
        raise KeyError(name)
    return default


def test_client_disconnect_aborts_the_request(server):
    disconnected = 'rayprism_requests_total{endpoint="completions",status="499"}'
    before = metric(server, disconnected, default=0)
    aborted = metric(server, "rayprism_aborted_requests")
    vllm_aborted = scrape(server)["vllm:request_success"][ABORTED]
    response = requests.post(f"{server.url}/v1/completions", stream=True, timeout=30, json={
        "model": MODEL, "prompt": "go", "max_tokens": 480, "ignore_eos": True, "stream": True})
    next(response.iter_lines())
    response.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(server, "rayprism_aborted_requests") == aborted:
        time.sleep(0.1)
    assert metric(server, "rayprism_requests_in_flight") == 0
    assert metric(server, disconnected) == before + 1
    assert metric(server, "rayprism_aborted_requests") == aborted + 1    # the engine dropped it
    assert scrape(server)["vllm:request_success"][ABORTED] == vllm_aborted + 1


ABORTED = ("vllm:request_success_total", (("finished_reason", "abort"),))


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="metrics", **greedy(4))
    assert metric(server, 'rayprism_requests_total{endpoint="completions",status="200"}') >= 1
    assert metric(server, "rayprism_generation_tokens_total") >= 4
    assert metric(server, "rayprism_prompt_tokens_total") >= 1
    assert metric(server, "rayprism_time_to_first_token_seconds_count") >= 1
    assert metric(server, "rayprism_inter_token_latency_seconds_count") >= 3
    assert 0 <= metric(server, "rayprism_kv_cache_usage_ratio") <= 1
    assert metric(server, "rayprism_queue_depth") >= 0


def scrape(server) -> dict:
    """/metrics parsed as Prometheus parses it: {family name: {(sample name, labels other than model_name): value}},
    checking on the way that every vLLM sample is labelled with the served model name."""
    families = {}
    for family in text_string_to_metric_families(requests.get(f"{server.url}/metrics", timeout=10).text):
        samples = families.setdefault(family.name, {"type": family.type})
        for sample in family.samples:
            labels = dict(sample.labels)
            if family.name.startswith("vllm:"):
                assert labels.pop("model_name") == MODEL, sample
            samples[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return families


def test_vllm_metrics_count_what_the_responses_report(server, client):
    before = scrape(server)
    length = client.completions.create(model=MODEL, prompt="vLLM's names", **greedy(5))
    assert length.choices[0].text
    stop = client.completions.create(model=MODEL, prompt="vLLM's names", max_tokens=5, temperature=0,
                                     stop=[length.choices[0].text[0]])   # the greedy text again, stopped early
    assert (length.choices[0].finish_reason, stop.choices[0].finish_reason) == ("length", "stop")
    after = scrape(server)

    def moved(family: str, sample: str, **labels) -> float:
        key = (sample, tuple(sorted(labels.items())))
        return after[family][key] - before[family].get(key, 0)

    for name, kind in (("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:kv_cache_usage_perc", "gauge"), ("vllm:cache_config_info", "gauge"),
                       ("vllm:prompt_tokens", "counter"), ("vllm:generation_tokens", "counter"),
                       ("vllm:request_success", "counter"), ("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:inter_token_latency_seconds", "histogram"),
                       ("vllm:e2e_request_latency_seconds", "histogram")):
        assert after[name]["type"] == kind, name
    assert 0 <= after["vllm:kv_cache_usage_perc"][("vllm:kv_cache_usage_perc", ())] <= 1
    [(_, labels)] = [key for key in after["vllm:cache_config_info"] if key != "type"]
    assert dict(labels)["block_size"] == "16" and int(dict(labels)["num_gpu_blocks"]) > 0
    assert moved("vllm:prompt_tokens", "vllm:prompt_tokens_total") == \
        length.usage.prompt_tokens + stop.usage.prompt_tokens
    assert moved("vllm:generation_tokens", "vllm:generation_tokens_total") == \
        length.usage.completion_tokens + stop.usage.completion_tokens
    assert [moved("vllm:request_success", "vllm:request_success_total", finished_reason=reason)
            for reason in ("stop", "length", "abort", "error")] == [1, 1, 0, 0]
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert moved(f"vllm:{name}", f"vllm:{name}_count") == 2
        assert moved(f"vllm:{name}", f"vllm:{name}_bucket", le="+Inf") == 2
    assert moved("vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") >= 1
    # one observation, two names
    for rayprism, vllm in (("rayprism_prompt_tokens", "vllm:prompt_tokens"),
                           ("rayprism_request_latency_seconds", "vllm:e2e_request_latency_seconds")):
        assert sorted(after[rayprism].values(), key=str) == sorted(after[vllm].values(), key=str)


def admin(server, method: str, token: str | None = TOKEN, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{server.admin_url}/admin/v1/weights", headers=headers, timeout=30, **kwargs)


def test_admin_api_only_on_the_admin_port(server):
    for method in ("GET", "POST"):
        response = requests.request(method, f"{server.url}/admin/v1/weights", json={"revision": "b"}, timeout=10,
                                    headers={"Authorization": f"Bearer {TOKEN}"})
        assert_openai_error(response, 404)
    assert_openai_error(requests.get(f"{server.admin_url}/health", timeout=10), 404)
    assert_openai_error(requests.post(f"{server.admin_url}/v1/completions", json={}, timeout=10), 404)


def wait_for_weights(server, deadline_s: float = 60) -> dict:
    deadline = time.monotonic() + deadline_s
    while (state := admin(server, "GET").json())["state"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.2)
    return state


def test_admin_token_is_required(server):
    assert_openai_error(admin(server, "GET"), 403)          # no token configured yet
    server.token_file.write_text(TOKEN + "\n")
    assert_openai_error(admin(server, "GET", token=None), 401)
    assert_openai_error(admin(server, "GET", token="wrong"), 401)
    assert admin(server, "GET").json() == {"revision": "a", "uri": admin(server, "GET").json()["uri"],
                                           "state": "ready", "error": None, "restarts": 0}
    assert admin(server, "POST", json={"uri": "x"}).status_code == 400
    assert admin(server, "POST", json={"revision": "a"}).json() == {"revision": "a", "state": "ready"}


async def test_weight_update_while_streaming(server, checkpoints):
    prompt = "The weights are"
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    [(_, text_a)], [(_, text_b)] = (reference_outputs(checkpoints[r], [prompt], params) for r in "ab")
    assert text_a != text_b
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    before = await client.completions.create(model=MODEL, prompt=prompt, **greedy(8))
    assert before.choices[0].text == text_a

    async def stream():
        chunks = [c async for c in await client.completions.create(
            model=MODEL, prompt="streaming through an update", stream=True,
            stream_options={"include_usage": True}, **greedy(60))]
        return chunks[-1].usage.completion_tokens

    streams = [asyncio.create_task(stream()) for _ in range(8)]
    await asyncio.sleep(0.3)
    response = await asyncio.to_thread(admin, server, "POST", json={"revision": "b"})
    assert response.status_code == 202 and response.json() == {"revision": "b", "state": "loading"}
    # Draining before the load: out of the endpoints at once, while the streams it has run on.
    health = await asyncio.to_thread(requests.get, f"{server.url}/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert await asyncio.gather(*streams) == [60] * 8
    state = await asyncio.to_thread(wait_for_weights, server)
    assert (state["revision"], state["state"]) == ("b", "ready")
    after = await client.completions.create(model=MODEL, prompt=prompt, **greedy(8))
    assert after.choices[0].text == text_b

    assert admin(server, "POST", json={"revision": "missing"}).status_code == 202
    state = await asyncio.to_thread(wait_for_weights, server)
    assert state["state"] == "failed" and "missing" in state["error"]
    still = await client.completions.create(model=MODEL, prompt=prompt, **greedy(8))
    assert still.choices[0].text == text_b           # the old weights keep serving
    await client.close()


@pytest.fixture
def faulty_server(cluster, checkpoints):
    """Its worker fails sampling for requests seeded FAULTY_SEED."""
    process = ServeProcess(["--model", str(checkpoints["a"]), "--served-model-name", MODEL, "--device", "cpu",
                            "--ray-address", cluster.address], env=FAULTY_WORKERS_ENV)
    yield process
    process.stop()


async def test_a_request_failing_in_the_engine_fails_alone(faulty_server):
    url = faulty_server.url
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    async def stream(seed: int) -> int:
        chunks = [c async for c in await client.completions.create(
            model=MODEL, prompt="sampled", stream=True, stream_options={"include_usage": True}, seed=seed,
            max_tokens=400, temperature=1.0, extra_body={"ignore_eos": True})]
        return chunks[-1].usage.completion_tokens

    streams = [asyncio.create_task(stream(seed)) for seed in range(6)]
    await asyncio.sleep(0.3)      # the doomed requests join the streams' batch
    for streamed in (False, True):
        response = await asyncio.to_thread(requests.post, f"{url}/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "doomed", "seed": FAULTY_SEED, "temperature": 1.0, "stream": streamed})
        error = assert_openai_error(response, 500)
        request_id = response.headers["X-Request-Id"]
        assert error["code"] == "internal_error" and request_id in error["message"]
        assert "Traceback" not in response.text and "injected" not in response.text
        assert f"request {request_id} failed" in faulty_server.log()   # the details stay in the log
    assert not any(s.done() for s in streams)      # they shared the failing requests' steps
    assert await asyncio.gather(*streams) == [400] * 6
    for probe in ("health", "live"):
        assert (await asyncio.to_thread(requests.get, f"{url}/{probe}", timeout=10)).status_code == 200
    after = await client.completions.create(model=MODEL, prompt="after", seed=1, **greedy(4))
    assert after.usage.completion_tokens == 4
    await client.close()


async def test_a_worker_slow_to_answer_is_waited_for(faulty_server):
    """A rank that does not answer the driver for 12 s (a loaded machine: the health check's limit is 5 s) is
    not dead: the request streaming meanwhile finishes, and the replica is live and ready again after."""
    url = faulty_server.url
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = await client.completions.create(model=MODEL, prompt="slow", stream=True, max_tokens=64, temperature=0,
                                             extra_body={"ignore_eos": True})
    STALL_FILE.touch()
    try:
        await asyncio.sleep(12)
        assert (await asyncio.to_thread(requests.get, f"{url}/live", timeout=10)).status_code == 200
    finally:
        STALL_FILE.unlink()
    assert len("".join([c.choices[0].text async for c in stream if c.choices])) > 0
    assert "has not answered" in faulty_server.log() and "replica failed" not in faulty_server.log()
    for probe in ("health", "live"):
        assert (await asyncio.to_thread(requests.get, f"{url}/{probe}", timeout=10)).status_code == 200
    await client.close()


@pytest.fixture
def second_server(cluster, checkpoints):
    process = ServeProcess(["--model", str(checkpoints["a"]), "--served-model-name", MODEL, "--device", "cpu",
                            "--ray-address", cluster.address, "--unready-delay-seconds", "4", "--drain-seconds", "60"])
    yield process
    process.stop()


async def test_sigterm_drains_streams_then_exits(second_server):
    """A replica told to stop (scale-down, replacement) leaves the endpoints and finishes what it has. The
    drain lasts longer than 3 s on purpose: Ray's driver arms an abort 3 s after a SIGTERM."""
    client = openai.AsyncOpenAI(base_url=f"{second_server.url}/v1", api_key="unused", max_retries=0)

    async def stream() -> int:
        chunks = [c async for c in await client.completions.create(
            model=MODEL, prompt="draining", stream=True, stream_options={"include_usage": True}, **greedy(48))]
        return chunks[-1].usage.completion_tokens

    streams = [asyncio.create_task(stream()) for _ in range(4)]
    await asyncio.sleep(0.5)
    second_server.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    health = await asyncio.to_thread(requests.get, f"{second_server.url}/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    live = await asyncio.to_thread(requests.get, f"{second_server.url}/live", timeout=5)
    assert live.status_code == 200       # draining is alive: no restart
    # A request from a client whose endpoint list is not updated yet is still served.
    late = await client.completions.create(model=MODEL, prompt="late", **greedy(4))
    assert late.usage.completion_tokens == 4
    await asyncio.sleep(3.5)  # past Ray's 3-second abort: still up and serving
    later = await client.completions.create(model=MODEL, prompt="later", **greedy(4))
    assert later.usage.completion_tokens == 4
    assert await asyncio.gather(*streams) == [48] * 4
    assert await asyncio.to_thread(second_server.process.wait, 60) == 0
    await client.close()


def test_killed_worker_fails_requests_and_health(server, cluster, client):
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    stream = client.completions.create(model=MODEL, prompt="doomed", stream=True, **greedy(480))
    next(iter(stream))
    [worker] = cluster.worker_processes()
    worker.send_signal(signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 10
    while requests.get(f"{server.url}/health", timeout=15).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    while (live := requests.get(f"{server.url}/live", timeout=5)).status_code != 503:   # within 0.5 s
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert live.json()["status"] == "dead" and "died" in live.json()["error"]
    assert "Traceback" not in live.text
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=MODEL, prompt="after", **greedy(2))
    assert err.value.status_code == 503
