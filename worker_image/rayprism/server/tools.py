"""OpenAI tool calls: the request's tools, tool_choice and parallel_tool_calls; the JSON schema the grammar
enforces for tool_choice "required" or a named function; and the parsers that find the calls in a reply.

A reply carries calls in one of three ways:
  a named function  the grammar enforces that function's parameters schema: the whole output is its arguments;
  "required"        the grammar enforces a non-empty array of {"name", "parameters"} objects (`guided_schema`);
  "auto"            the model writes calls in its own format, found by that format's parser (`select_parser`):
                    "hermes" (Qwen2.5, Qwen3, Hermes 2 Pro): <tool_call>\\n{"name": ..., "arguments": {...}}\\n
                    </tool_call>, after free text, possibly several; "llama3_json" (Llama 3.1-3.3):
                    {"name": ..., "parameters": {...}}, maybe after <|python_tag|>, several separated by ";".

Every parser is a stream fed the reply's text deltas; parsing a whole reply is feeding it at once, so the
streamed and the whole results agree however the text is cut. A call begins once its name and the "{" of its
arguments are read (text that does not open a call that way is content, as it came); its arguments are then
the model's own text, passed on as it comes, as OpenAI does (not valid JSON when the output was cut short).
Whitespace just before a call, and at the end of a reply that made calls, is dropped.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from rayprism.server.protocol import bad_request

MAX_TOOLS = 128                 # OpenAI's limit
MAX_NAME_CHARS = 64             # OpenAI's limit on a function's name
MAX_HEADER_CHARS = 512          # {"name": "...", "arguments": { must open a call within this many characters
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
PYTHON_TAG = "<|python_tag|>"
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"


# ---- the request -------------------------------------------------------------------------------------
@dataclass
class ToolRequest:
    tools: list[dict]       # as the request gave them (validated): what the chat template renders
    choice: str             # "none", "auto", "required", or "function": the named `function` must be called
    function: str | None
    parallel: bool          # parallel_tool_calls

    @property
    def parameters(self) -> dict[str, dict]:
        """Each function's parameters schema, by name."""
        return {t["function"]["name"]: t["function"].get("parameters") or EMPTY_PARAMETERS for t in self.tools}


def parse_tools(tools, tool_choice=None, parallel_tool_calls=None) -> ToolRequest | None:
    """A chat request's tools, tool_choice and parallel_tool_calls (None: not given); None when it has no
    tools. Raises APIError(400) naming the field."""
    if tools is not None and not isinstance(tools, list):
        raise bad_request("'tools' must be a list", "tools")
    tools = tools or []
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"'tools': at most {MAX_TOOLS} tools", "tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        names.add(_function_name(tool, f"tools[{i}]", names))
    parallel = parallel_tool_calls
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    choice, function = tool_choice, None
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools and choice != "none":
        raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
    if isinstance(choice, dict):
        named = choice.get("function")
        function = named.get("name") if isinstance(named, dict) else None
        if choice.get("type") != "function" or not isinstance(function, str):
            raise bad_request("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                              "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        if function not in names:
            raise bad_request(f"'tool_choice' names {function!r}, which is not in 'tools'", "tool_choice")
        choice = "function"
    elif choice not in ("none", "auto", "required"):
        raise bad_request(f"'tool_choice' must be \"none\", \"auto\", \"required\" or a function, not {choice!r}",
                          "tool_choice")
    if not tools:
        return None
    return ToolRequest(tools=tools, choice=choice, function=function, parallel=parallel is not False)


def _function_name(tool, where: str, names: set[str]) -> str:
    """Checks one tool, {"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}."""
    if not isinstance(tool, dict):
        raise bad_request(f"'{where}' must be an object", where)
    if tool.get("type") != "function":
        raise bad_request(f"'{where}.type' must be \"function\"", f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise bad_request(f"'{where}.function' must be an object", f"{where}.function")
    name = function.get("name")
    if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS):
        raise bad_request(f"'{where}.function.name' must be a string of 1 to {MAX_NAME_CHARS} characters",
                          f"{where}.function.name")
    if name in names:
        raise bad_request(f"'{where}.function.name': {name!r} names another tool too", f"{where}.function.name")
    for key, kind, label in (("description", str, "a string"), ("parameters", dict, "an object (a JSON schema)"),
                             ("strict", bool, "a boolean")):
        if function.get(key) is not None and not isinstance(function[key], kind):
            raise bad_request(f"'{where}.function.{key}' must be {label}", f"{where}.function.{key}")
    return name


def guided_schema(req: ToolRequest) -> dict | None:
    """The JSON schema the grammar enforces: a named function's parameters (the output is its arguments);
    for "required", a non-empty array (of one call when parallel_tool_calls is false) of {"name", "parameters"}
    objects, each name with its own parameters; None for "auto" and "none".

    The functions' $defs (and definitions) move to the array schema's root, where their "#/$defs/..."
    references then point; two functions defining one name differently are a 400."""
    if req.choice == "function":
        return req.parameters[req.function]
    if req.choice != "required":
        return None
    root: dict = {"type": "array", "minItems": 1}
    if not req.parallel:
        root["maxItems"] = 1
    variants = []
    for name, schema in req.parameters.items():
        schema = dict(schema)
        for key in ("$defs", "definitions"):
            for def_name, definition in (schema.pop(key, None) or {}).items():
                if root.setdefault(key, {}).setdefault(def_name, definition) != definition:
                    raise bad_request(f"'tools': two functions define {key}/{def_name} differently", "tools")
        variants.append({"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                          "parameters": schema},
                         "required": ["name", "parameters"], "additionalProperties": False})
    root["items"] = {"anyOf": variants}
    return root


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates want them: an assistant's tool_calls arguments as objects (the templates
    write them with `tojson`), not the JSON text OpenAI clients send back."""
    def call(tool_call):
        function = tool_call.get("function") if isinstance(tool_call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("arguments"), str)):
            return tool_call
        try:
            return {**tool_call, "function": {**function, "arguments": json.loads(function["arguments"])}}
        except ValueError:
            return tool_call
    return [{**m, "tool_calls": [call(c) for c in m["tool_calls"]]} if isinstance(m.get("tool_calls"), list)
            else m for m in messages]


# ---- replies -----------------------------------------------------------------------------------------
class ToolParser:
    """Finds the calls in a reply: `parse` a whole one, or `stream()` one as it is generated."""

    def __init__(self, name: str, new_stream):
        self.name, self._new_stream = name, new_stream

    def stream(self) -> ToolCallStream:
        return self._new_stream()

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content or None, OpenAI tool_calls entries) of a whole reply."""
        stream = self.stream()
        return assemble([*stream.feed(text), *stream.finish()])


def reply_parser(req: ToolRequest | None, auto: ToolParser | None) -> ToolParser | None:
    """The parser of a reply to req: None without tools or with tool_choice "none"; the model's own format's
    (`auto`, from select_parser) for "auto", a 400 when it has none; the grammar's for the others."""
    if req is None or req.choice == "none":
        return None
    if req.choice == "function":
        return ToolParser("function", lambda: _NamedStream(req.function))
    if req.choice == "required":
        return ToolParser("required", _RequiredStream)
    if auto is None:
        raise bad_request("tool_choice \"auto\" (the default with 'tools') is not available: the server knows no "
                          "tool call format for this model, or was told none; set its --tool-call-parser (the "
                          f"InferenceDeployment's engine.toolCallParser) to one of {', '.join(PARSERS)}, or ask for "
                          "tool_choice \"required\" or a named function", "tool_choice")
    return auto


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's finish_reason: "tool_calls" for a reply that made calls and stopped by itself."""
    return "tool_calls" if called and reason == "stop" else reason


def assemble(deltas: list[dict]) -> tuple[str | None, list[dict]]:
    """(content or None, tool_calls) that a client puts together from a stream's deltas."""
    content, calls = "", []
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", ()):
            if "id" in call:
                calls.append({"id": call["id"], "type": "function", "function": dict(call["function"])})
            else:
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    return content or None, calls


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """One reply's text deltas in (`feed`, then `finish`), OpenAI chat-chunk deltas out: {"content": text} and
    {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]} opening a call, then
    {"tool_calls": [{"index", "function": {"arguments": fragment}}]}. Text that may still open a call is held.

    A format says where calls open: wherever one of its `_markers` appears, and, at the start of the reply and
    right after a call, at a "{" after its `_leaders`; and where a call ends after its arguments (`_close`).
    """
    _markers: tuple[str, ...] = ()

    def __init__(self):
        self._buf = ""          # text not decided yet
        self._mode = "text"     # text, header (a call may be opening), arguments, closing (after its arguments)
        self._ws = ""           # trailing whitespace of the content: dropped if a call follows
        self._opener = ""       # what opened the header: content if no call follows after all
        self._calls = 0
        self._end = _JSONEnd()
        self._at_leader = self._leaders(first=True) is not None

    @property
    def called(self) -> bool:
        return self._calls > 0

    def feed(self, delta: str) -> list[dict]:
        self._buf += delta
        out: list[dict] = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[dict]:
        out: list[dict] = []
        while self._step(out, final=True):
            pass
        if self._ws and not self.called:
            out.append({"content": self._ws})
        self._buf = self._ws = ""
        return out

    def _leaders(self, first: bool) -> tuple[tuple[str, bool], ...] | None:
        """(literal, optional) pieces that may precede a call's "{" here; None: a call cannot start here."""
        return None

    def _close(self, text: str) -> tuple[int, bool]:
        """How much of text the call's end takes, and whether it ended."""
        end = self._end.feed(text)
        return (len(text), False) if end is None else (end, True)

    def _step(self, out: list[dict], final: bool) -> bool:
        """Decides what it can of the text held; False once it needs more."""
        buf = self._buf
        if self._mode == "text":
            found = self._find_opener(buf)
            if isinstance(found, tuple):
                (start, end), self._mode = found, "header"
                self._content(out, buf[:start])
                self._opener, self._buf = buf[start:end], buf[end:]
                return True
            end = len(buf) if final else found
            self._content(out, buf[:end])
            self._buf = buf[end:]
            return False
        if self._mode == "header":
            header = _header(buf[:MAX_HEADER_CHARS])
            if header is None and not final and len(buf) < MAX_HEADER_CHARS:
                return False
            if not header:      # no call after all: its opener was text
                self._mode, self._at_leader = "text", False
                self._content(out, self._opener)
                return True
            name, end = header
            out.append({"tool_calls": [{"index": self._calls, "id": new_call_id(), "type": "function",
                                        "function": {"name": name, "arguments": ""}}]})
            self._calls += 1
            self._ws, self._buf, self._mode, self._end = "", buf[end - 1:], "arguments", _JSONEnd()
            return True
        if self._mode == "arguments":
            end = self._end.feed(buf)
            taken = len(buf) if end is None else end
            if taken:
                out.append({"tool_calls": [{"index": self._calls - 1, "function": {"arguments": buf[:taken]}}]})
            self._buf = buf[taken:]
            if end is None:
                return False
            self._mode, self._end = "closing", _JSONEnd(depth=1)
            return True
        taken, ended = self._close(buf)
        self._buf = buf[taken:]
        if ended:
            self._mode, self._at_leader = "text", self._leaders(first=False) is not None
        return ended

    def _find_opener(self, text: str) -> tuple[int, int] | int:
        """(start, end) of what opens a call in text; or how much of text is content for sure."""
        if self._at_leader:
            brace = _leader_end(text, self._leaders(first=not self._calls))
            if brace is None:
                return 0
            if brace >= 0:
                return 0, brace
            self._at_leader = False
        found = [(i, len(m)) for m in self._markers if (i := text.find(m)) >= 0]
        if found:
            start, length = min(found)
            return start, start + length
        return len(text) - _marker_start_at_end(text, self._markers)

    def _content(self, out: list[dict], text: str) -> None:
        body = text.rstrip()
        if body:
            out.append({"content": self._ws + body})
            self._ws = ""
        self._ws += text[len(body):]


class _HermesStream(ToolCallStream):
    _markers = (HERMES_START,)

    def _close(self, text):
        end = text.find(HERMES_END)
        if end >= 0:
            return end + len(HERMES_END), True
        return max(0, len(text) - len(HERMES_END) + 1), False


class _Llama3JsonStream(ToolCallStream):
    _markers = (PYTHON_TAG,)

    def _leaders(self, first):
        return (";", True), (PYTHON_TAG, True)


class _RequiredStream(ToolCallStream):
    """The grammar's [{"name": ..., "parameters": {...}}, ...]."""
    _ARRAY_GOES_ON = re.compile(r"[ \t\n\r]*([,\]])?")

    def __init__(self):
        self._array_ended = False
        super().__init__()

    def _leaders(self, first):
        return None if self._array_ended else (("[", False),) if first else ()

    def _close(self, text):
        taken = 0
        if self._end.depth:     # still in the call's object
            taken, ended = super()._close(text)
            if not ended:
                return taken, False
        goes_on = self._ARRAY_GOES_ON.match(text, taken)
        self._array_ended = goes_on.group(1) == "]"
        return goes_on.end(), bool(goes_on.group(1)) or goes_on.end() < len(text)


class _NamedStream:
    """A named function's reply: all of it is the arguments."""

    def __init__(self, name: str):
        self._name, self.called = name, False

    def feed(self, delta: str) -> list[dict]:
        out = []
        if not self.called:
            self.called = True
            out.append({"tool_calls": [{"index": 0, "id": new_call_id(), "type": "function",
                                        "function": {"name": self._name, "arguments": ""}}]})
        if delta:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
        return out

    def finish(self) -> list[dict]:
        return self.feed("")


class _JSONEnd:
    """Where a JSON value opened by "{" (or already `depth` deep) ends, fed its text piece by piece. A "<" out
    of a string ends it too, before the "<": none can be there in JSON, it is the format's end marker."""

    def __init__(self, depth: int = 0):
        self.depth, self._in_string, self._escaped = depth, False, False

    def feed(self, text: str) -> int | None:
        for i, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
            elif char == "<":
                return i
        return None


_WS = re.compile(r"[ \t\n\r]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_STRING_START = re.compile(r'"(?:[^"\\]|\\.)*\\?', re.S)
_NAME = object()
# {"name": "...", "arguments": {   (or "parameters", as Llama 3 writes it)
_HEADER = ("{", '"name"', ":", _NAME, ",", ('"arguments"', '"parameters"'), ":", "{")


def _header(text: str) -> tuple[str, int] | None | bool:
    """(name, end) when text opens a call with _HEADER (end: just after its last "{"); None while it still
    may; False when it cannot."""
    pos, name = 0, None
    for expected in _HEADER:
        pos = _WS.match(text, pos).end()
        if pos == len(text):
            return None
        if expected is _NAME:
            string = _STRING.match(text, pos)
            if string is None:
                return None if _STRING_START.fullmatch(text, pos) else False
            try:
                name = json.loads(string.group())
            except ValueError:
                return False
            if not name:
                return False
            pos = string.end()
            continue
        options = (expected,) if isinstance(expected, str) else expected
        matched = next((o for o in options if text.startswith(o, pos)), None)
        if matched is None:
            return None if any(o.startswith(text[pos:]) for o in options) else False
        pos += len(matched)
    return name, pos


def _leader_end(text: str, leaders) -> int | None:
    """Where the "{" is when text opens with leaders, whitespace around them; None while undecided; -1 when
    text does not."""
    pos = _WS.match(text).end()
    for literal, optional in leaders:
        if text.startswith(literal, pos):
            pos = _WS.match(text, pos + len(literal)).end()
        elif literal.startswith(text[pos:]):
            return None
        elif not optional:
            return -1
    if pos == len(text):
        return None
    return pos if text[pos] == "{" else -1


def _marker_start_at_end(text: str, markers) -> int:
    """Length of the longest end of text that a marker starts with."""
    for length in range(min(len(text), max(map(len, markers), default=1) - 1), 0, -1):
        if any(m.startswith(text[-length:]) for m in markers):
            return length
    return 0


# ---- choosing the parser of a model ------------------------------------------------------------------
PARSERS = {"hermes": ToolParser("hermes", _HermesStream),
           "llama3_json": ToolParser("llama3_json", _Llama3JsonStream)}
PARSER_CHOICES = ("auto", "none", *PARSERS)     # --tool-call-parser, engine.toolCallParser
# When the chat template does not tell: the format of a model type's tool-calling models.
_BY_MODEL_TYPE = {"qwen2": "hermes", "qwen2_moe": "hermes", "qwen3": "hermes", "qwen3_moe": "hermes",
                  "llama": "llama3_json"}


def select_parser(name_or_auto: str, chat_template: str | dict | None, model_type: str | None) -> ToolParser | None:
    """The parser of tool_choice "auto" replies. A parser's name wins; "none" is none; "auto" reads the chat
    template: <tool_call> is hermes, <|python_tag|> or Llama 3's ipython role is llama3_json, a template that
    renders no tools has none; else the model type's. None: "auto" tool choice is not available.
    Raises ValueError for an unknown name."""
    if name_or_auto not in PARSER_CHOICES:
        raise ValueError(f"unknown tool call parser {name_or_auto!r}; known: {', '.join(PARSER_CHOICES)}")
    if name_or_auto != "auto":
        return PARSERS.get(name_or_auto)
    if isinstance(chat_template, dict):     # named templates (transformers' {"default": ..., "tool_use": ...})
        chat_template = "\n".join(chat_template.values())
    if chat_template is not None:
        if HERMES_START in chat_template:
            return PARSERS["hermes"]
        if PYTHON_TAG in chat_template or "ipython<|end_header_id|>" in chat_template:
            return PARSERS["llama3_json"]
        if "tools" not in chat_template:
            return None
    return PARSERS.get(_BY_MODEL_TYPE.get(model_type or ""))
