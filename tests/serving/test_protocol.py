"""Request parsing and response shapes without a server: each refusal is a 400 naming its field (table-driven),
what is accepted parses to what the server uses, and every response the server builds has the shape of the
pydantic response models (and of the openai SDK's types)."""
import logging

import openai.types
import openai.types.chat
import pytest

from rayprism.engine import SamplingParams
from rayprism.server import protocol
from rayprism.server.protocol import APIError, parse_detokenize, parse_request, parse_tokenize

MESSAGES = [{"role": "user", "content": "hi"}]


def parse(**fields):
    return parse_request({"model": "tiny", "prompt": "hi", **fields}, chat=False).params


def chat(**fields):
    return parse_request({"model": "tiny", "messages": MESSAGES, **fields}, chat=True)


def refused(call, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as error:
        call(*args, **kwargs)
    assert error.value.status == 400 and error.value.message
    return error.value


# ---- sampling fields: ranges are SamplingParams.validate()'s ----------------------------------------
@pytest.mark.parametrize("field, value", [("repetition_penalty", 0.01), ("repetition_penalty", 5),
                                          ("presence_penalty", -2), ("presence_penalty", 1.5),
                                          ("frequency_penalty", 2), ("frequency_penalty", -0.5),
                                          ("min_p", 0), ("min_p", 1), ("min_tokens", 0), ("min_tokens", 16),
                                          ("logit_bias", {})])
def test_logits_processor_fields_in_range(field, value):
    assert getattr(parse(**{field: value}), field) == value


@pytest.mark.parametrize("field, value", [("repetition_penalty", 0), ("repetition_penalty", -1),
                                          ("repetition_penalty", True), ("presence_penalty", 2.01),
                                          ("presence_penalty", "1"), ("frequency_penalty", -2.5),
                                          ("min_p", -0.1), ("min_p", 1.01), ("min_tokens", -1),
                                          ("min_tokens", 17), ("min_tokens", 1.0), ("logit_bias", []),
                                          ("logit_bias", {"5": 100.5}), ("logit_bias", {"-1": 1}),
                                          ("logit_bias", {"x": 1}), ("logit_bias", {"5": "1"}),
                                          ("logit_bias", {str(i): 1 for i in range(301)})])
def test_logits_processor_fields_out_of_range(field, value):
    assert refused(parse, **{field: value}).param == field


def test_logit_bias_keys_become_token_ids():
    assert parse(logit_bias={"5": 100, "49151": -2.5}).logit_bias == {5: 100, 49151: -2.5}


def test_chat_min_tokens_waits_for_the_default_max_tokens():
    """Chat's max_tokens defaults to what the context leaves once the prompt is known: not refused before."""
    assert chat(min_tokens=40).params.min_tokens == 40


def test_defaults_are_sampling_params_own():
    """Fields left out or null take SamplingParams' defaults (completions' max_tokens is OpenAI's 16)."""
    nulls = {field: None for field in ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                                       "ignore_eos", "logprobs", "logit_bias", "min_tokens", "stream")}
    assert parse() == parse(**nulls) == SamplingParams(max_tokens=16)


def test_accepted_values_parse_to_what_the_engine_uses():
    params = parse(temperature=0, top_p=1, stop="x", max_tokens=7, seed=-1, logprobs=3, stop_token_ids=[2])
    assert (params.temperature, params.top_p, params.stop, params.max_tokens, params.seed, params.logprobs,
            params.stop_token_ids) == (0, 1, ["x"], 7, -1, 3, [2])
    req = chat(max_tokens=5, max_completion_tokens=3, logprobs=True, top_logprobs=2)
    assert (req.params.max_tokens, req.max_tokens_given, req.logprobs, req.params.logprobs) == (3, True, 2, 2)
    assert chat(logprobs=True).logprobs == 0 and chat(logprobs=False).logprobs is None


# ---- refusals: each a 400 naming its field ----------------------------------------------------------
# (chat, fields, param): fields join a valid request's.
REFUSED = [
    # unknown fields, and fields of the other endpoint
    (False, {"frobnicate": 1}, "frobnicate"),
    (False, {"messages": MESSAGES}, "messages"),
    (True, {"prompt": "hi"}, "prompt"),
    (True, {"echo": True}, "echo"),
    (True, {"suffix": ""}, "suffix"),
    (False, {"top_logprobs": 2}, "top_logprobs"),
    (False, {"use_beam_search": False}, "use_beam_search"),
    (False, {"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    # strict types: a bool is not an int, "1" is not a number, 1.0 is not an int
    (False, {"max_tokens": True}, "max_tokens"),
    (False, {"max_tokens": 2.0}, "max_tokens"),
    (False, {"temperature": "1"}, "temperature"),
    (False, {"top_k": False}, "top_k"),
    (False, {"seed": "7"}, "seed"),
    (False, {"logprobs": True}, "logprobs"),
    (True, {"logprobs": 1}, "logprobs"),
    (True, {"top_logprobs": True, "logprobs": True}, "top_logprobs"),
    (False, {"stream": "true"}, "stream"),
    (False, {"ignore_eos": 1}, "ignore_eos"),
    (False, {"stop": 5}, "stop"),
    (False, {"stop": ["a", 5]}, "stop"),
    (False, {"stop": [""]}, "stop"),
    (False, {"stop": ["x"] * 17}, "stop"),
    (False, {"stop_token_ids": [1.5]}, "stop_token_ids"),
    (False, {"stop_token_ids": [1] * 257}, "stop_token_ids"),
    (False, {"stream_options": {"include_usage": True}}, "stream_options"),
    (False, {"stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
    (False, {"stream": True, "stream_options": []}, "stream_options"),
    # ranges: SamplingParams.validate()'s
    (False, {"max_tokens": 0}, "max_tokens"),
    (False, {"temperature": float("nan")}, "temperature"),
    (False, {"seed": 2**64}, "seed"),
    (False, {"logprobs": 21}, "logprobs"),
    (True, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (True, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    (True, {"top_logprobs": 2}, "top_logprobs"),
    (True, {"top_logprobs": 2, "logprobs": False}, "top_logprobs"),
    # prompts
    (False, {"prompt": ""}, "prompt"),
    (False, {"prompt": []}, "prompt"),
    (False, {"prompt": 12}, "prompt"),
    (False, {"prompt": None}, "prompt"),
    (False, {"prompt": ["a", "b"]}, "prompt"),
    (False, {"prompt": [[1], [2]]}, "prompt"),
    (False, {"prompt": [5, True]}, "prompt"),
    (False, {"prompt": [5, "x"]}, "prompt"),
    # suffix: no fill-in-the-middle template
    (False, {"suffix": "}"}, "suffix"),
    (False, {"suffix": 5}, "suffix"),
    # the fields not wired yet: typed, their ranges checked once wired (n >= 1, best_of >= n, 0..20)
    (False, {"n": 0}, "n"),
    (False, {"n": -1}, "n"),
    (False, {"n": True}, "n"),
    (False, {"n": 2, "best_of": 1}, "best_of"),
    (False, {"best_of": 0}, "best_of"),
    (False, {"best_of": "2"}, "best_of"),
    (False, {"prompt_logprobs": 21}, "prompt_logprobs"),
    (False, {"prompt_logprobs": -1}, "prompt_logprobs"),
    (False, {"prompt_logprobs": True}, "prompt_logprobs"),
    (False, {"echo": "yes"}, "echo"),
    (False, {"response_format": "text"}, "response_format"),
    (False, {"response_format": {}}, "response_format"),
    (False, {"response_format": {"type": "xml"}}, "response_format"),
    (False, {"response_format": {"type": "json_schema"}}, "response_format"),
    (False, {"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    (False, {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
    (False, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    (False, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
     "response_format"),
    (False, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "x": 1}}},
     "response_format"),
    (False, {"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
    (False, {"response_format": {"type": "text", "strict": True}}, "response_format"),
    (False, {"guided_json": "{not json"}, "guided_json"),
    (False, {"guided_json": "[1, 2]"}, "guided_json"),
    (False, {"guided_json": 5}, "guided_json"),
    (False, {"guided_regex": ["a"]}, "guided_regex"),
    (False, {"guided_choice": "a"}, "guided_choice"),
    (False, {"guided_choice": []}, "guided_choice"),
    (False, {"guided_choice": ["a", 1]}, "guided_choice"),
    (False, {"guided_grammar": 1}, "guided_grammar"),
    (True, {"tools": {"type": "function"}}, "tools"),
    (True, {"tools": ["f"]}, "tools"),
    (True, {"tool_choice": 5}, "tool_choice"),
    (True, {"tool_choice": ["auto"]}, "tool_choice"),
    (True, {"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    # the ignored fields still have their types
    (False, {"user": 5}, "user"),
    (True, {"metadata": {"a": 1}}, "metadata"),
    (True, {"store": "yes"}, "store"),
    # messages
    (True, {"messages": "hi"}, "messages"),
    (True, {"messages": []}, "messages"),
    (True, {"messages": ["hi"]}, "messages[0]"),
    (True, {"messages": [{"content": "hi"}]}, "messages[0].role"),
    (True, {"messages": [{"role": 1, "content": "hi"}]}, "messages[0].role"),
    (True, {"messages": [*MESSAGES, {"role": "user", "content": 3}]}, "messages[1].content"),
    (True, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    (True, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content"),
    (True, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content"),
    (True, {"messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages[0].name"),
    (True, {"messages": [{"role": "tool", "content": "1", "tool_call_id": 7}]}, "messages[0].tool_call_id"),
    (True, {"messages": [{"role": "assistant", "tool_calls": {"id": "a"}}]}, "messages[0].tool_calls"),
    (True, {"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                                               "function": {"name": "f", "arguments": {}}}]}]},
     "messages[0].tool_calls"),
    # the chat template's options
    (True, {"add_generation_prompt": 1}, "add_generation_prompt"),
    (True, {"continue_final_message": "yes"}, "continue_final_message"),
    (True, {"continue_final_message": True}, "continue_final_message"),
    (True, {"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    (True, {"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    (True, {"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    (True, {"chat_template_kwargs": {"x": "y" * 16384}}, "chat_template_kwargs"),
]


@pytest.mark.parametrize("chat_, fields, param", REFUSED)
def test_refused_naming_the_field(chat_, fields, param):
    base = {"model": "tiny", **({"messages": MESSAGES} if chat_ else {"prompt": "hi"})}
    assert refused(parse_request, {**base, **fields}, chat=chat_).param == param


# Values that ask for nothing (what SDKs and frameworks send by default): accepted.
ASKS_NOTHING = [(False, {"n": 1}), (False, {"n": None}), (False, {"best_of": 1}), (False, {"n": 1, "best_of": 1}),
                (False, {"echo": False}), (False, {"prompt_logprobs": None}), (False, {"suffix": ""}),
                (False, {"suffix": None}), (False, {"response_format": {"type": "text"}}),
                (True, {"response_format": {"type": "text"}}), (True, {"tools": []}), (True, {"tools": None}),
                (True, {"tool_choice": "none"}), (True, {"parallel_tool_calls": True}),
                (True, {"parallel_tool_calls": False}), (False, {"stream_options": {}}),
                (False, {"stream_options": None}), (False, {"temperature": 1}), (False, {"top_p": 1}),
                (True, {"messages": [{"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                                     {"role": "tool", "content": "3", "tool_call_id": "c1"}, *MESSAGES]})]


@pytest.mark.parametrize("chat_, fields", ASKS_NOTHING)
def test_accepted(chat_, fields):
    base = {"model": "tiny", **({"messages": MESSAGES} if chat_ else {"prompt": "hi"})}
    parse_request({**base, **fields}, chat=chat_)


def test_fields_parse_typed():
    """ParsedRequest's fields, typed."""
    req = parse_request({"model": "tiny", "prompt": "hi", "echo": True, "guided_json": '{"type": "object"}'},
                        chat=False)
    assert (req.echo, req.guided_json) == (True, {"type": "object"})
    req = parse_request({"model": "tiny", "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "object"}, "strict": True}}}, chat=False)
    assert (req.response_format.type, req.response_format.json_schema.name, req.response_format.json_schema.schema_,
            req.response_format.json_schema.strict) == ("json_schema", "a", {"type": "object"}, True)
    tools = [{"type": "function", "function": {"name": "f"}}]
    req = chat(guided_regex="a+", tools=tools, tool_choice={"type": "function", "function": {"name": "f"}},
               parallel_tool_calls=False)
    assert (req.guided_regex, req.tools, req.tool_choice, req.parallel_tool_calls) == (
        "a+", tools, {"type": "function", "function": {"name": "f"}}, False)
    assert chat(guided_choice=["x", "y"]).guided_choice == ["x", "y"]
    assert chat(guided_grammar="g").guided_grammar == "g"
    assert (chat().n, chat().best_of, chat().echo, chat().prompt_logprobs, chat().tools) == (1, None, False, None,
                                                                                            None)


@pytest.mark.parametrize("fields, param", [({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
                                           ({"response_format": {"type": "json_object"}, "guided_json": {}},
                                            "guided_json")])
def test_one_kind_of_structured_output(fields, param):
    assert refused(chat, **fields).param == param


@pytest.mark.parametrize("fields, param", [({"n": 0}, "n"), ({"n": 2, "best_of": 1}, "best_of"),
                                           ({"prompt_logprobs": 21}, "prompt_logprobs")])
def test_sampling_fields_ranges_are_the_engines(fields, param):
    assert refused(parse, **fields).param == param
    assert parse(n=2, best_of=3, prompt_logprobs=1).best_of == 3


def test_ignored_fields_are_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(protocol, "_warned_ignored", set())
    with caplog.at_level(logging.WARNING, logger=protocol.__name__):
        for _ in range(3):
            chat(user="u", store=False, metadata={"a": "b"}, service_tier="auto", safety_identifier="s",
                 prompt_cache_key="k", stream=True, stream_options={"include_usage": True,
                                                                    "include_obfuscation": False})
    logged = sorted(record.getMessage().split("'")[1] for record in caplog.records)
    assert logged == sorted(protocol.IGNORED_FIELDS)


# ---- chat messages and the template's options ---------------------------------------------------------
def test_messages_reach_the_template_as_sent():
    """Keys beyond OpenAI's are kept (templates read them); text parts are joined; no content is ""."""
    req = chat(messages=[{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                         {"role": "user", "content": "hi", "name": "bob", "documents": [1]},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}])
    assert req.messages == [{"role": "system", "content": "ab"},
                            {"role": "user", "content": "hi", "name": "bob", "documents": [1]},
                            {"role": "assistant", "content": "", "tool_calls": [
                                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]


def test_chat_template_options():
    assert chat().template_options == {"add_generation_prompt": True, "continue_final_message": False}
    options = chat(add_generation_prompt=False, continue_final_message=True, chat_template_kwargs={"x": [1]})
    assert options.template_options == {"x": [1], "add_generation_prompt": False, "continue_final_message": True}


# ---- /tokenize and /detokenize --------------------------------------------------------------------------
def test_tokenize_requests():
    req = parse_tokenize({"prompt": "hi"})
    assert (req.chat, req.prompt, req.add_special_tokens, req.return_token_strs) == (False, "hi", True, False)
    req = parse_tokenize({"model": "tiny", "messages": MESSAGES, "continue_final_message": True,
                          "add_generation_prompt": False, "return_token_strs": True})
    assert (req.chat, req.messages, req.add_special_tokens, req.return_token_strs) == (True, MESSAGES, False, True)
    assert req.template_options == {"add_generation_prompt": False, "continue_final_message": True}


@pytest.mark.parametrize("body, param", [({}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": ["a"]}, "prompt"),
                                         ({"prompt": "hi", "add_special_tokens": "yes"}, "add_special_tokens"),
                                         ({"prompt": "hi", "return_token_strs": 1}, "return_token_strs"),
                                         ({"prompt": "hi", "frobnicate": 1}, "frobnicate"),
                                         ({"prompt": "hi", "messages": "x"}, "messages"),
                                         ({"messages": "hi"}, "messages"),
                                         ({"messages": [{"content": "hi"}]}, "messages[0].role"),
                                         ({"messages": MESSAGES, "continue_final_message": True},
                                          "continue_final_message"),
                                         ({"messages": MESSAGES, "chat_template_kwargs": {"tools": []}},
                                          "chat_template_kwargs")])
def test_tokenize_refused(body, param):
    assert refused(parse_tokenize, body).param == param


@pytest.mark.parametrize("body, param", [({}, "tokens"), ({"tokens": "hi"}, "tokens"), ({"tokens": [-1]}, "tokens"),
                                         ({"tokens": [100]}, "tokens"), ({"tokens": [True]}, "tokens"),
                                         ({"tokens": [1] * 11}, "tokens"), ({"tokens": [1], "x": 1}, "x")])
def test_detokenize_refused(body, param):
    assert refused(parse_detokenize, body, 100, 10).param == param


def test_detokenize_request():
    assert parse_detokenize({"model": "tiny", "tokens": [0, 99]}, 100, 10) == [0, 99]


# ---- response shapes: what the server builds against the response models ---------------------------
def logprob_entries():
    return [{"token_id": 5, "logprob": -0.5, "top": {5: -0.5, 6: -1.5}, "text_offset": 0},
            {"token_id": 7, "logprob": -0.25, "top": {7: -0.25}, "text_offset": 1}]


def exact(model, body: dict) -> None:
    """The body validates against the model and has no key beyond it (nor lacks one the model requires)."""
    assert model.model_validate(body).model_dump(exclude_unset=True) == body


def decode(token_id: int) -> str:
    return chr(ord("a") + token_id % 26)


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_completion_responses_have_the_models_shape(with_logprobs):
    req = parse_request({"model": "tiny", "prompt": "hi", **({"logprobs": 2} if with_logprobs else {})}, chat=False)
    logprobs = protocol.completion_logprobs(logprob_entries(), decode) if with_logprobs else None
    full = protocol.envelope(req, "tiny", [protocol.choice(req, 0, "ab", "length", logprobs, delta=False)], chunk=False,
                             usage=protocol.usage(3, 2))
    chunks = [protocol.envelope(req, "tiny", [protocol.choice(req, 0, "a", None, logprobs, delta=True, first=True)],
                                chunk=True),
              protocol.envelope(req, "tiny", [protocol.choice(req, 0, "b", "stop", logprobs, delta=True)], chunk=True),
              protocol.envelope(req, "tiny", [], chunk=True, usage=protocol.usage(3, 2))]
    exact(protocol.Completion, full)
    openai.types.Completion.model_validate(full)
    for chunk in chunks:     # not the SDK's Completion: its finish_reason may not be null, as in a stream it is
        exact(protocol.CompletionChunk, chunk)
    assert "usage" not in chunks[0] and chunks[2]["usage"]["total_tokens"] == 5


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_chat_responses_have_the_models_shape(with_logprobs):
    req = chat(**({"logprobs": True, "top_logprobs": 2} if with_logprobs else {}))
    logprobs = protocol.chat_logprobs(logprob_entries(), decode) if with_logprobs else None
    full = protocol.envelope(req, "tiny", [protocol.choice(req, 0, "ab", "stop", logprobs, delta=False)], chunk=False,
                             usage=protocol.usage(3, 2))
    chunks = [protocol.envelope(req, "tiny", [protocol.choice(req, 0, "a", None, logprobs, delta=True, first=True)],
                                chunk=True),
              protocol.envelope(req, "tiny", [protocol.choice(req, 0, "b", None, logprobs, delta=True)], chunk=True),
              protocol.envelope(req, "tiny", [protocol.choice(req, 0, "", "length", None, delta=True)], chunk=True),
              protocol.envelope(req, "tiny", [], chunk=True, usage=protocol.usage(3, 2))]
    exact(protocol.ChatCompletion, full)
    openai.types.chat.ChatCompletion.model_validate(full)
    for chunk in chunks:
        exact(protocol.ChatCompletionChunk, chunk)
        openai.types.chat.ChatCompletionChunk.model_validate(chunk)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert chunks[2]["choices"][0]["delta"] == {}


def test_error_bodies_have_the_models_shape():
    exact(protocol.ErrorResponse, refused(parse, temperature="hot").body())
    exact(protocol.ErrorResponse, APIError(503, "loading", type="service_unavailable", code="model_not_ready").body())


def test_tool_call_responses_have_the_models_shape():
    req = chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required")
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    full = protocol.envelope(req, "tiny", [protocol.tool_choice(0, {"content": None, "tool_calls": [call]},
                                                                "tool_calls", None, delta=False)],
                             chunk=False, usage=protocol.usage(3, 2))
    deltas = [{"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "f", "arguments": ""}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}, {}]
    chunks = [protocol.envelope(req, "tiny", [protocol.tool_choice(0, delta, "tool_calls" if i == 2 else None, None,
                                                                   delta=True, first=i == 0)], chunk=True)
              for i, delta in enumerate(deltas)]
    exact(protocol.ChatCompletion, full)
    openai.types.chat.ChatCompletion.model_validate(full)
    for chunk in chunks:
        exact(protocol.ChatCompletionChunk, chunk)
        openai.types.chat.ChatCompletionChunk.model_validate(chunk)
