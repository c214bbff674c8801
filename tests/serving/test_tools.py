"""Tool calls without a server: request validation (each refusal names its field), the schemas the grammar
enforces, each format's parser whole and streamed in pieces of every size (the two agree), and the choice of
a model's parser."""
import json
import random
import typing

import jsonschema
import pytest

from rayprism.server.protocol import APIError
from rayprism.server.tools import (PARSER_CHOICES, PARSERS, assemble, finish_reason, guided_schema, parse_tools,
                                   reply_parser, select_parser, template_messages)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
           "required": ["city"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"],
        "additionalProperties": False}


def tool(name, parameters=None, **function):
    return {"type": "function", "function": {"name": name, **function,
                                             **({"parameters": parameters} if parameters is not None else {})}}


TOOLS = [tool("get_weather", WEATHER, description="Weather of a city"), tool("get_time", TIME)]
NAMED = {"type": "function", "function": {"name": "get_time"}}


# ---- validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tools, choice, parallel, param", [
    ({"a": 1}, None, None, "tools"),
    ([tool(f"f{i}") for i in range(129)], None, None, "tools"),
    (["get_weather"], None, None, "tools[0]"),
    ([TOOLS[0], {"type": "custom", "function": {"name": "x"}}], None, None, "tools[1].type"),
    ([TOOLS[0], {"type": "function"}], None, None, "tools[1].function"),
    ([TOOLS[0], {"type": "function", "function": {"description": "no name"}}], None, None, "tools[1].function.name"),
    ([TOOLS[0], tool("")], None, None, "tools[1].function.name"),
    ([TOOLS[0], tool(7)], None, None, "tools[1].function.name"),
    ([TOOLS[0], tool("x" * 65)], None, None, "tools[1].function.name"),
    ([TOOLS[0], tool("get_weather")], None, None, "tools[1].function.name"),   # a second get_weather
    ([tool("f", description=3)], None, None, "tools[0].function.description"),
    ([tool("f", parameters=["not", "a", "schema"])], None, None, "tools[0].function.parameters"),
    ([tool("f", strict="yes")], None, None, "tools[0].function.strict"),
    (TOOLS, "sometimes", None, "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "get_stock"}}, None, "tool_choice"),
    (TOOLS, {"type": "function", "name": "get_time"}, None, "tool_choice"),
    (TOOLS, {"type": "allowed_tools", "function": {"name": "get_time"}}, None, "tool_choice"),
    (TOOLS, ["auto"], None, "tool_choice"),
    (TOOLS, None, "false", "parallel_tool_calls"),
    (None, "auto", None, "tool_choice"),
    (None, "required", None, "tool_choice"),
    ([], NAMED, None, "tool_choice"),
])
def test_bad_tools_are_refused_naming_the_field(tools, choice, parallel, param):
    with pytest.raises(APIError) as error:
        parse_tools(tools, choice, parallel)
    assert (error.value.status, error.value.param) == (400, param)
    assert param in error.value.message


@pytest.mark.parametrize("tools, choice, parallel, expected", [
    (None, None, None, None),
    ([], "none", True, None),
    (TOOLS, None, None, ("auto", None, True)),            # OpenAI's default with tools
    (TOOLS, "none", None, ("none", None, True)),
    (TOOLS, "required", False, ("required", None, False)),
    (TOOLS, NAMED, None, ("function", "get_time", True)),
    ([tool("bare")], "auto", None, ("auto", None, True)),  # no description, no parameters
])
def test_good_tools(tools, choice, parallel, expected):
    req = parse_tools(tools, choice, parallel)
    assert (req and (req.choice, req.function, req.parallel)) == expected
    if req:
        assert req.tools == tools


# ---- the schemas the grammar enforces ----------------------------------------------------------------
def _valid(schema, instance) -> bool:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema).is_valid(instance)


def test_a_named_function_enforces_its_parameters():
    req = parse_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert guided_schema(req) == WEATHER
    assert guided_schema(parse_tools([tool("bare")], {"type": "function", "function": {"name": "bare"}})) == \
        {"type": "object", "properties": {}}
    assert guided_schema(parse_tools(TOOLS, "auto")) is None and guided_schema(parse_tools(TOOLS, "none")) is None


@pytest.mark.parametrize("parallel, output, valid", [
    (True, [{"name": "get_weather", "parameters": {"city": "Paris"}}], True),
    (True, [{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}},
            {"name": "get_time", "parameters": {"zone": "CET"}}], True),
    (True, [], False),                                                          # at least one call
    (True, [{"name": "get_weather", "parameters": {"zone": "CET"}}], False),    # another function's arguments
    (True, [{"name": "get_time", "parameters": {"city": "Paris"}}], False),
    (True, [{"name": "get_stock", "parameters": {}}], False),                   # no such function
    (True, [{"name": "get_time"}], False),
    (True, [{"name": "get_time", "parameters": {"zone": "CET"}, "extra": 1}], False),
    (True, {"name": "get_time", "parameters": {"zone": "CET"}}, False),         # not an array
    (False, [{"name": "get_time", "parameters": {"zone": "CET"}}], True),
    (False, [{"name": "get_time", "parameters": {"zone": "CET"}}] * 2, False),  # parallel_tool_calls false: one
])
def test_required_enforces_calls_of_the_tools(parallel, output, valid):
    schema = guided_schema(parse_tools(TOOLS, "required", parallel))
    assert _valid(schema, output) is valid


def test_required_moves_defs_to_the_root_where_references_point():
    point = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    route = {"type": "object", "properties": {"start": {"$ref": "#/$defs/point"}}, "required": ["start"],
             "$defs": {"point": point}}
    legacy = {"type": "object", "properties": {"at": {"$ref": "#/definitions/spot"}},
              "definitions": {"spot": {"type": "string"}}}
    tools = [tool("route", route), tool("same", {**route}), tool("legacy", legacy)]
    schema = guided_schema(parse_tools(tools, "required"))
    assert schema["$defs"] == {"point": point} and schema["definitions"] == {"spot": {"type": "string"}}
    assert _valid(schema, [{"name": "route", "parameters": {"start": {"x": 1}}},
                           {"name": "legacy", "parameters": {"at": "here"}}])
    assert not _valid(schema, [{"name": "route", "parameters": {"start": {"x": "one"}}}])
    assert "$defs" in route     # the request's own schema is left as it was
    clash = [tool("a", route), tool("b", {**route, "$defs": {"point": {"type": "string"}}})]
    with pytest.raises(APIError) as error:
        guided_schema(parse_tools(clash, "required"))
    assert error.value.param == "tools" and "$defs/point" in error.value.message


# ---- replies: whole and streamed ---------------------------------------------------------------------
def _cuts(text: str):
    """The text in pieces: of each size 1..13, the whole, and random ones."""
    for size in [*range(1, 14), max(1, len(text))]:
        yield [text[i:i + size] for i in range(0, len(text), size)] or [""]
    rng = random.Random(len(text))
    for _ in range(10):
        points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


def _streamed(parser, pieces):
    stream, deltas = parser.stream(), []
    for piece in pieces:
        deltas += stream.feed(piece)
    deltas += stream.finish()
    return deltas, stream.called


def _check_deltas(deltas):
    """OpenAI's shapes: a call opens with index, id, type, name and arguments "", then argument fragments."""
    opened = []
    for delta in deltas:
        assert len(delta) == 1 and ("content" in delta or "tool_calls" in delta), delta
        if "content" in delta:
            assert delta["content"]
            continue
        [call] = delta["tool_calls"]
        if "id" in call:
            assert call["index"] == len(opened) and call["id"].startswith("call_") and call["type"] == "function"
            assert call["function"]["arguments"] == "" and call["function"]["name"]
            opened.append(call["id"])
        else:
            assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
            assert call["index"] == len(opened) - 1 and call["function"]["arguments"]


def _plain(calls):
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def _agrees(parser, text):
    """Whole and streamed however it is cut: the same content, calls and arguments; returns the whole's (with
    content ... when it is the text as it came: no call there)."""
    content, calls = parser.parse(text)
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    for pieces in _cuts(text):
        deltas, called = _streamed(parser, pieces)
        _check_deltas(deltas)
        streamed_content, streamed_calls = assemble(deltas)
        assert (streamed_content, _plain(streamed_calls)) == (content, _plain(calls)), pieces
        assert called == bool(calls)
    return (... if content == text and text else content), _plain(calls)


W = '{"city": "Paris", "unit": "c"}'
T = '{"zone": "CET"}'
NESTED = '{"q": {"a": [1, {"b": "}]{[\\"<tool_call>"}], "c": "<\\u00e9>"}, "emoji": "\U0001F600"}'

# (reply, content, calls): content ... is the reply as it came, no call in it
HERMES = [
    # Qwen2.5's own shape: the calls alone
    (f'<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>', None, [("get_weather", W)]),
    (f'<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>\n<tool_call>\n'
     f'{{"name": "get_time", "arguments": {T}}}\n</tool_call>\n', None, [("get_weather", W), ("get_time", T)]),
    (f'Let me look.\n\n<tool_call>\n{{"name": "get_time", "arguments": {T}}}\n</tool_call>',
     "Let me look.", [("get_time", T)]),
    (f'<tool_call>{{"name":"get_time","arguments":{T}}}</tool_call> Done: it was < 5 <tool',
     " Done: it was < 5 <tool", [("get_time", T)]),
    (f'<tool_call>\n{{"name": "search", "arguments": {NESTED}}}\n</tool_call>', None, [("search", NESTED)]),
    ('<tool_call>\n{"name": "f", "parameters": {}}\n</tool_call>', None, [("f", "{}")]),
    ('<tool_call>\n{"name": "a\\"b", "arguments": {"x": 1}}\n</tool_call>', None, [('a"b', '{"x": 1}')]),
    # no call
    ("The weather in Paris is mild.  \n", ..., []),
    ("a < b and <tool_calls> are not </tool_call>", ..., []),
    ("", None, []),
    # malformed: not a call, so content, as it came
    ("Hi <tool_call>\nnot json\n</tool_call>", ..., []),
    ('<tool_call>\n{"arguments": {}, "name": "f"}\n</tool_call>', ..., []),
    ('<tool_call>\n{"name": 5, "arguments": {}}\n</tool_call>', ..., []),
    ('<tool_call>\n{"name": "f", "arguments": "x=1"}\n</tool_call>', ..., []),
    ('<tool_call>\n{"name": "", "arguments": {}}</tool_call>', ..., []),
    ('<tool_call>\n{"name": "f\\q", "arguments": {}}</tool_call>', ..., []),
    ('<tool_call>\n{"nam', ..., []),                                    # cut before the call opened
    ('<tool_call>{' + " " * 600 + '"name": "f", "arguments": {}}</tool_call>', ..., []),   # opens too late
    ('<tool_call>\n{"name": "bad", "arguments": }</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>',
     '<tool_call>\n{"name": "bad", "arguments": }</tool_call>', [("g", "{}")]),
    # cut short after a call opened: its arguments as they came (OpenAI's finish_reason "length")
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', None, [("get_weather", '{"city": "Par')]),
    # arguments that never close end at the format's end marker, and the next call is found
    ('<tool_call>\n{"name": "f", "arguments": {"x": {}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}'
     '\n</tool_call>', None, [("f", '{"x": {}\n'), ("g", "{}")]),
]

LLAMA = [
    (f'{{"name": "get_weather", "parameters": {W}}}', None, [("get_weather", W)]),
    (f'<|python_tag|>{{"name": "get_weather", "parameters": {W}}}', None, [("get_weather", W)]),
    (f' \n{{"name": "get_weather", "arguments": {W}}}', None, [("get_weather", W)]),
    (f'{{"name": "get_weather", "parameters": {W}}}; {{"name": "get_time", "parameters": {T}}}', None,
     [("get_weather", W), ("get_time", T)]),
    (f'<|python_tag|>{{"name": "get_weather", "parameters": {W}}};<|python_tag|>{{"name": "get_time", '
     f'"parameters": {T}}}\n', None, [("get_weather", W), ("get_time", T)]),
    (f'I will check. <|python_tag|>{{"name": "get_time", "parameters": {T}}}', "I will check.", [("get_time", T)]),
    (f'{{"name": "search", "parameters": {NESTED}}}', None, [("search", NESTED)]),
    (f'{{"name": "get_time", "parameters": {T}, "id": 3}}', None, [("get_time", T)]),
    (f'{{"name": "get_time", "parameters": {T}}}\nThat is all.', "\nThat is all.", [("get_time", T)]),
    # no call: JSON that is not one, text, a { later on
    ('{"name": "Bob", "age": 3}', ..., []),
    ('{"city": "Paris"}', ..., []),
    ('Use {"name": "f", "parameters": {}} to call f.', ..., []),
    ("  ", ..., []),
    ('{"name": "f"', ..., []),
    ("<|python_tag|>brave_search.call(query=\"x\")", ..., []),       # Llama 3.1's built-in tools: not JSON
    (f'{{"name": "get_weather", "parameters": {W}}}; not a call', "; not a call", [("get_weather", W)]),
    ('{"name": "get_weather", "parameters": {"city": "Pa', None, [("get_weather", '{"city": "Pa')]),
]


@pytest.mark.parametrize("text, content, calls", HERMES)
def test_hermes(text, content, calls):
    assert _agrees(PARSERS["hermes"], text) == (content, calls)


@pytest.mark.parametrize("text, content, calls", LLAMA)
def test_llama3_json(text, content, calls):
    assert _agrees(PARSERS["llama3_json"], text) == (content, calls)


@pytest.mark.parametrize("name, text", [("hermes", t) for t, *_ in HERMES] + [("llama3_json", t) for t, *_ in LLAMA])
def test_every_cut_short_reply_agrees(name, text):
    """Every prefix of every reply (a generation stopped there) gives the same whole and streamed."""
    for end in range(len(text) + 1):
        content, calls = PARSERS[name].parse(text[:end])
        deltas, _ = _streamed(PARSERS[name], list(text[:end]))
        assert (assemble(deltas)[0], _plain(assemble(deltas)[1])) == (content, _plain(calls)), text[:end]


@pytest.mark.parametrize("name", PARSERS)
def test_garbage_does_not_crash(name):
    rng = random.Random(7)
    alphabet = ['{', '}', '[', ']', '"', '\\', ':', ',', ';', ' ', '\n', '<', '>', 'a', '1', '<tool_call>',
                '</tool_call>', '<|python_tag|>', '"name"', '"arguments"', '"parameters"']
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        content, calls = PARSERS[name].parse(text)
        deltas, _ = _streamed(PARSERS[name], list(text))
        assert (assemble(deltas)[0], _plain(assemble(deltas)[1])) == (content, _plain(calls))


def test_text_that_may_open_a_call_is_held_and_text_streams_as_it_comes():
    stream = PARSERS["hermes"].stream()
    assert stream.feed("It is") == [{"content": "It is"}]
    assert stream.feed(" <tool") == []               # " " and "<tool" may belong to a call
    assert stream.feed("s>") == [{"content": " <tools>"}]
    assert stream.feed("\n<tool_call>\n{\"name\": \"f\", ") == []
    opened, fragment = stream.feed('"arguments": {"x"')
    assert opened["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert fragment == {"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]}
    assert stream.feed("") == [] and stream.called
    llama = PARSERS["llama3_json"].stream()
    assert llama.feed("  ") == [] and llama.feed("Sure") == [{"content": "  Sure"}]


# ---- the grammar's replies: "required" and a named function -----------------------------------------
REQUIRED = [
    (f'[{{"name": "get_weather", "parameters": {W}}}]', None, [("get_weather", W)]),
    (f'[ {{"name": "get_weather", "parameters": {W}}} ,\n {{"name": "get_time", "parameters": {T}}} ]\n', None,
     [("get_weather", W), ("get_time", T)]),
    (f'[{{"name":"get_time","parameters":{T}}},{{"name":"get_time","parameters":{T}}}]', None,
     [("get_time", T), ("get_time", T)]),
    ('[{"name": "get_weather", "parameters": {"city": "Pa', None, [("get_weather", '{"city": "Pa')]),
    ('[{"na', ..., []),
    ("", None, []),
]


@pytest.mark.parametrize("text, content, calls", REQUIRED)
def test_required_reply(text, content, calls):
    parser = reply_parser(parse_tools(TOOLS, "required"), None)
    assert _agrees(parser, text) == (content, calls)
    if calls and content is None and text.rstrip().endswith("]"):
        assert [(c["name"], json.dumps(c["parameters"])) for c in json.loads(text)] == calls


@pytest.mark.parametrize("text", [T, '{"zone": "C', ""])
def test_named_reply_is_the_arguments(text):
    parser = reply_parser(parse_tools(TOOLS, NAMED), None)
    assert _agrees(parser, text) == (None, [("get_time", text)])


def test_which_parser_replies():
    hermes = PARSERS["hermes"]
    assert reply_parser(None, hermes) is None and reply_parser(parse_tools(TOOLS, "none"), hermes) is None
    assert reply_parser(parse_tools(TOOLS), hermes) is hermes
    assert reply_parser(parse_tools(TOOLS, "required"), None).name == "required"
    with pytest.raises(APIError) as error:
        reply_parser(parse_tools(TOOLS, "auto"), None)
    assert error.value.param == "tool_choice" and "--tool-call-parser" in error.value.message
    assert "engine.toolCallParser" in error.value.message and "hermes" in error.value.message


@pytest.mark.parametrize("reason, called, expected", [
    ("stop", True, "tool_calls"), ("stop", False, "stop"), ("length", True, "length"), (None, True, None)])
def test_finish_reason(reason, called, expected):
    assert finish_reason(reason, called) == expected


def test_templates_get_arguments_as_objects():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "2"}]
    converted = template_messages(messages)
    assert converted[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert converted[1]["tool_calls"][1] == messages[1]["tool_calls"][1]
    assert converted[0] == messages[0] and converted[2] == messages[2]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'   # the request is left alone


# ---- choosing a model's parser -----------------------------------------------------------------------
QWEN25 = ('{%- if tools %}...For each function call, return a json object with function name and arguments within '
          '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
          '<args-json-object>}\\n</tool_call>...{%- endif %}')
LLAMA31 = ('{%- if tools is not none %}...{{- "<|python_tag|>" + tool_call.name + ".call(" }}...'
           '{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}')
LLAMA32 = ('{%- if tools is not none %}...{{- \'{"name": "\' + tool_call.name + \'", \' }}...'
           '{%- elif message.role == "tool" or message.role == "ipython" %}'
           '{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}')
LLAMA30 = "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>{% endfor %}"
TOOLISH = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.mark.parametrize("choice, template, model_type, expected", [
    ("auto", QWEN25, "qwen2", "hermes"),
    ("auto", LLAMA31, "llama", "llama3_json"),
    ("auto", LLAMA32, "llama", "llama3_json"),
    ("auto", QWEN25.replace("Qwen", "") + LLAMA30, "llama", "hermes"),        # e.g. Hermes 3 on Llama 3.1
    ("auto", {"default": LLAMA30, "tool_use": QWEN25}, "llama", "hermes"),  # named templates
    ("auto", LLAMA30, "llama", None),          # Llama 3.0: its template renders no tools
    ("auto", TOOLISH, "qwen3", "hermes"),      # tools but no known marker: the model type's format
    ("auto", TOOLISH, "gpt2", None),
    ("auto", None, "qwen2", "hermes"),
    ("auto", None, "llama", "llama3_json"),
    ("auto", None, None, None),
    ("none", QWEN25, "qwen2", None),
    ("hermes", LLAMA31, "llama", "hermes"),     # a name wins
    ("llama3_json", None, None, "llama3_json"),
])
def test_select_parser(choice, template, model_type, expected):
    parser = select_parser(choice, template, model_type)
    assert (parser and parser.name) == expected


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(ValueError, match="auto, none, hermes, llama3_json"):
        select_parser("mistral", None, None)


def test_the_flag_and_the_crd_know_the_same_parsers():
    import argparse

    from rayprism.server.cli import add_serve_arguments
    from rayprism_operator.api import Engine

    assert typing.get_args(Engine.model_fields["tool_call_parser"].annotation) == PARSER_CHOICES
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    base = ["--model", "m", "--served-model-name", "m"]
    assert parser.parse_args(base).tool_call_parser == "auto"
    assert parser.parse_args([*base, "--tool-call-parser", "hermes"]).tool_call_parser == "hermes"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--tool-call-parser", "mistral"])
