"""OpenAI request parsing and response shapes (completions and chat completions), and vLLM's
/tokenize and /detokenize requests.

Requests are pydantic models of OpenAI's schema (and vLLM's extensions): every field a request may carry is
declared with a strict type (a bool is not an int, "1" is not a number; JSON integers are fine for numbers),
so that a bad value is a 400 naming it (`param`) and never an error deep in the engine. Value ranges are
SamplingParams.validate()'s (the Python API needs them too), checked once the request is parsed. Every field
either works or is refused: an unknown field is a 400 naming it; the few fields accepted without effect are
IGNORED_FIELDS (each logged once per process).

Responses are built as dicts on the serving path (completion(), choice(), envelope()): the pydantic response
models below describe the same shapes, and the tests validate every response against them; building a
streamed chunk through them costs more than the dict (bench/http_overhead.py measures both)."""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from rayprism.engine import InvalidRequestError, SamplingParams
from rayprism.engine.sampling import StructuredOutput

log = logging.getLogger(__name__)

MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 16, 1024, 256
# Checked before tokenising (megabytes cost seconds of CPU only to be refused): text averages about 4
# characters per token, so a prompt of more than this many per token of the context cannot fit it.
MAX_CHARS_PER_TOKEN = 64
MAX_TEMPLATE_KWARGS_CHARS = 16 * 1024
# apply_chat_template's own parameters: chat_template_kwargs may not override what the server passes or asks.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})

# Accepted and without effect here, each logged once per process (at WARNING, as vLLM does): field -> why.
IGNORED_FIELDS = {
    "user": "an end user's id, for OpenAI's abuse monitoring; nothing here reads it",
    "safety_identifier": "an end user's id, for OpenAI's abuse monitoring (user's successor); nothing here reads it",
    "store": "asks OpenAI to keep the completion for its dashboard; nothing is stored here",
    "metadata": "tags of a stored completion (store); nothing is stored here",
    "service_tier": "OpenAI's processing tiers; this server has one",
    "prompt_cache_key": "a routing hint for OpenAI's prompt cache; it changes no output",
    "stream_options.include_obfuscation": "OpenAI pads stream chunks against side channels; this server does not",
}
SUFFIX_REFUSED = ("not supported: inserting text before a suffix needs a fill-in-the-middle prompt template, "
                  "which the models served here do not have (vLLM refuses it too)")
_warned_ignored: set[str] = set()


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- requests: OpenAI's schema as pydantic models -------------------------------------------------------
def _error(message: str) -> PydanticCustomError:
    """A refusal of a validator: its answer is "'<field>': <message>"."""
    return PydanticCustomError("rayprism", message)


class _Request(BaseModel):
    """Strict types, no unknown fields (each is refused with a 400 naming it)."""
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str     # JSON text, as OpenAI sends it


class ToolCall(_Request):
    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(_Request):
    """A chat message. Keys beyond these are allowed and passed to the chat template, which may read them."""
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):
        if isinstance(content, list) and not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise _error("only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
        if content is not None and not isinstance(content, (str, list)):
            raise _error("must be a string or a list of text parts")
        return content

    def template_dict(self) -> dict:
        """What the chat template reads: the message as sent, its text parts joined, no content as ""."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {**self.model_dump(exclude_unset=True), "content": content or ""}


class StreamOptions(_Request):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None     # IGNORED_FIELDS


class JSONSchemaFormat(_Request):
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Request):
    """{"type": "text"} (plain generation, what SDKs send), {"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise _error("'json_schema' goes with type \"json_schema\", and only with it")
        return self


def _listify(value):
    return [value] if isinstance(value, str) else value


class SamplingRequest(_Request):
    """What completions and chat completions share. None means the default (SamplingParams' own)."""
    model: str | None = None    # the server checks it before parsing (a 404 names another model)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: Annotated[list[str] | None, BeforeValidator(_listify)] = None    # a string or a list of them
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None    # {"token id": bias}: JSON keys are strings
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool | None = None    # logprobs name tokens "token_id:<id>": exact ids for RL
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None    # a JSON schema, or its JSON text
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    # IGNORED_FIELDS
    user: str | None = None
    safety_identifier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, stop):
        if stop is not None and (len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop)):
            raise _error(f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias):
        """Range and vocabulary checks follow in the engine."""
        if bias is not None and not all(token.isdecimal() for token in bias):
            raise _error("must map token ids (strings of integers) to numbers")
        return bias

    @field_validator("guided_json")
    @classmethod
    def _json_schema_object(cls, schema):
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as err:
                raise _error(f"not valid JSON: {err}") from None
            if not isinstance(schema, dict):
                raise _error("must be a JSON schema: an object, or its JSON text")
        return schema


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""
    prompt: Annotated[str | list[int], BeforeValidator(lambda prompt: _one_prompt(prompt))]
    logprobs: int | None = None
    suffix: str | None = None
    echo: bool | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix):
        if suffix:
            raise _error(SUFFIX_REFUSED)
        return suffix


def _one_prompt(prompt):
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]      # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise _error("only one prompt per request is supported")
    if not prompt and isinstance(prompt, (str, list)):
        raise _error("must not be empty")
    if not isinstance(prompt, (str, list)):
        raise _error("must be a non-empty string or a non-empty list of token ids")
    return prompt


class ChatTemplateFields(_Request):
    """apply_chat_template's keyword arguments (vLLM's): chat completions and /tokenize's chat form."""
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool | None = None      # default true
    continue_final_message: bool | None = None     # default false: the last message is continued (no end of turn)
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, extra):
        if extra is None:
            return extra
        if len(json.dumps(extra)) > MAX_TEMPLATE_KWARGS_CHARS:
            raise _error(f"must be at most {MAX_TEMPLATE_KWARGS_CHARS} characters of JSON")
        if reserved := sorted(_RESERVED_TEMPLATE_KWARGS & extra.keys()):
            raise _error(f"may not set {', '.join(reserved)} (apply_chat_template's own parameters)")
        return extra

    def template_options(self) -> dict:
        generation_prompt = self.add_generation_prompt is not False
        continue_final = self.continue_final_message is True
        if generation_prompt and continue_final:
            raise bad_request("'continue_final_message' and 'add_generation_prompt' cannot both be true",
                              "continue_final_message")
        return {**(self.chat_template_kwargs or {}), "add_generation_prompt": generation_prompt,
                "continue_final_message": continue_final}


class ChatCompletionRequest(ChatTemplateFields, SamplingRequest):
    """POST /v1/chat/completions."""
    max_completion_tokens: int | None = None     # OpenAI's successor of max_tokens; wins when both are given
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Their validation is server/tools.py's.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class TokenizeCompletionRequest(_Request):
    """vLLM's /tokenize with a prompt."""
    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = None     # default true
    return_token_strs: bool | None = None


class TokenizeChatRequest(ChatTemplateFields):
    """vLLM's /tokenize with messages (through the chat template)."""
    model: str | None = None
    add_special_tokens: bool | None = None     # default false: the template holds the special tokens it wants
    return_token_strs: bool | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


def _validate(model: type[_Request], body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise _refusal(err) from None


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null"}
# pydantic's words for JSON's types
_JSON_WORDS = (("a valid dictionary", "an object"), ("a valid list", "an array"), ("a valid string", "a string"),
               ("a valid integer", "an integer"), ("a valid number", "a number"), ("a valid boolean", "a boolean"))


def _refusal(err: ValidationError) -> APIError:
    """The first field the ValidationError names, as a 400. Of its errors (a union gives one per member) the
    deepest says most: it went furthest into the value."""
    errors = err.errors(include_url=False, include_context=False)
    param = _param(errors[0]["loc"])
    errors = [e for e in errors if _param(e["loc"]) == param]
    deepest = max(len(e["loc"]) for e in errors)
    errors = [e for e in errors if len(e["loc"]) == deepest]
    first, where = errors[0], _where(errors[0]["loc"])
    if first["type"] == "extra_forbidden":
        return bad_request(f"'{where}' is not a field this server knows (every field either works or is refused)",
                           param)
    if first["type"] == "missing":
        return bad_request(f"'{where}' is required", param)
    wants = []
    for e in errors:
        want = e["msg"].removeprefix("Input ").removeprefix("should be ")
        want = want.split(" or instance of ")[0].replace(" after validation", "")
        for words, json_words in _JSON_WORDS:
            want = want.replace(words, json_words)
        wants.append(want)
    message = " or ".join(dict.fromkeys(wants))
    if first["type"].endswith("_type"):
        message = f"must be {message}, got {_JSON_TYPES.get(type(first['input']), type(first['input']).__name__)}"
    elif first["type"] == "literal_error":
        message = f"must be {message}, got {json.dumps(first['input'])[:100]}"
    return bad_request(f"'{where}': {message}", param)


def _param(loc: tuple) -> str | None:
    """The field an error names: a top-level field (for an object-valued one, the field itself, not its keys),
    or within messages, "messages[i]" and "messages[i].<field>"."""
    if not loc:
        return None
    param = str(loc[0])
    if param == "messages" and len(loc) > 1 and isinstance(loc[1], int):
        param += f"[{loc[1]}]"
        if len(loc) > 2 and loc[2] in Message.model_fields:
            param += f".{loc[2]}"
    return param


def _where(loc: tuple) -> str:
    """The full path of an error, for its message: without the union members pydantic names (str, list[int])."""
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif not ("[" in item or "-" in item or item in ("str", "int", "float", "bool", "dict", "list")):
            path += f".{item}" if path else item
    return path


def _warn_ignored(request: BaseModel) -> None:
    for name, why in IGNORED_FIELDS.items():
        if name in _warned_ignored:
            continue
        holder, _, field = name.rpartition(".")
        holder = getattr(request, holder, None) if holder else request
        if holder is not None and field in holder.model_fields_set:
            _warned_ignored.add(name)
            log.warning("the request field '%s' is accepted and ignored: %s (logged once)", name, why)


# ---- parsing ----------------------------------------------------------------------------------------------
@dataclass
class ParsedRequest:
    chat: bool
    prompt: str | list[int] | None      # completions: text or token ids; chat: None until the template runs
    messages: list[dict] | None         # chat: Message.template_dict()s
    template_options: dict | None       # chat: apply_chat_template's keyword arguments
    params: SamplingParams
    max_tokens_given: bool
    stream: bool
    include_usage: bool
    logprobs: int | None
    id: str
    created: int
    n: int = 1
    best_of: int | None = None
    echo: bool = False                  # completions only
    prompt_logprobs: int | None = None
    tokens_as_ids: bool = False         # logprobs name each token "token_id:<id>", not by its text
    response_format: ResponseFormat | None = None
    guided_json: dict | None = None     # a JSON schema (sent as an object or as its JSON text)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    tools: list[dict] | None = None     # chat only, like the next two; validated by server/tools.py
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


# Whether a request asks for each kind of structured output (one at most per request).
_ASKS_STRUCTURED = {
    "response_format": lambda r: r.response_format is not None and r.response_format.type != "text",
    "guided_json": lambda r: r.guided_json is not None,
    "guided_regex": lambda r: r.guided_regex is not None,
    "guided_choice": lambda r: r.guided_choice is not None,
    "guided_grammar": lambda r: r.guided_grammar is not None,
}


def parse_request(body, *, chat: bool) -> ParsedRequest:
    """Validates a request body; raises APIError(400) naming the offending field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    request = _validate(ChatCompletionRequest if chat else CompletionRequest, body)
    _warn_ignored(request)
    messages, prompt, template_options = None, None, None
    if chat:
        messages, template_options = [m.template_dict() for m in request.messages], request.template_options()
        max_tokens = request.max_completion_tokens
        max_tokens = max_tokens if max_tokens is not None else request.max_tokens
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        prompt, logprobs = request.prompt, request.logprobs
        max_tokens = request.max_tokens if request.max_tokens is not None else 16
    stream = request.stream is True
    options = request.stream_options
    if options is not None and options.model_fields_set and not stream:
        raise bad_request("'stream_options' needs 'stream': true", "stream_options")
    min_tokens = request.min_tokens
    values = dict(
        # Chat's default is filled in once the prompt is known (min_tokens is checked against it again then).
        max_tokens=max_tokens if max_tokens is not None else max(1, min_tokens or 0),
        temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, min_p=request.min_p,
        seed=request.seed, stop=request.stop, stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos,
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens, logprobs=logprobs,
        repetition_penalty=request.repetition_penalty, presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty, min_tokens=min_tokens,
        logit_bias=None if request.logit_bias is None else {int(t): b for t, b in request.logit_bias.items()},
        n=request.n, best_of=request.best_of, prompt_logprobs=request.prompt_logprobs)
    parsed = ParsedRequest(
        chat=chat, prompt=prompt, messages=messages, template_options=template_options, params=SamplingParams(),
        max_tokens_given=max_tokens is not None, stream=stream,
        include_usage=stream and options is not None and options.include_usage is True, logprobs=logprobs,
        id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()),
        n=request.n if request.n is not None else 1, best_of=request.best_of,
        echo=not chat and request.echo is True, prompt_logprobs=request.prompt_logprobs,
        tokens_as_ids=request.return_tokens_as_token_ids is True, response_format=request.response_format, guided_json=request.guided_json,
        guided_regex=request.guided_regex, guided_choice=request.guided_choice, guided_grammar=request.guided_grammar,
        tools=request.tools if chat else None, tool_choice=request.tool_choice if chat else None,
        parallel_tool_calls=request.parallel_tool_calls if chat else None)
    if stream and parsed.best_of not in (None, parsed.n):
        raise bad_request("'best_of' greater than 'n' cannot be streamed: the best sequences are known only once "
                          "all have finished", "best_of")
    if stream and parsed.prompt_logprobs is not None:
        raise bad_request("'prompt_logprobs' cannot be streamed (they would all come in the first chunk): ask "
                          "without 'stream'", "prompt_logprobs")
    if parsed.echo and logprobs is not None:   # the echoed prompt's tokens come with their logprobs
        values["prompt_logprobs"] = max(logprobs, parsed.prompt_logprobs or 0)
    structured = [name for name, asks in _ASKS_STRUCTURED.items() if asks(parsed)]
    if len(structured) > 1:
        raise bad_request(f"one kind of structured output per request: {', '.join(structured)} were given",
                          structured[1])
    values["structured"] = structured_output(parsed)
    try:
        parsed.params = SamplingParams(**{name: value for name, value in values.items() if value is not None})
        parsed.params.validate()
    except InvalidRequestError as err:
        # Chat asks the number of top logprobs in top_logprobs ('logprobs' is a boolean there).
        if chat and err.param == "logprobs":
            raise bad_request(f"top_logprobs{str(err).removeprefix('logprobs')}", "top_logprobs") from None
        raise bad_request(str(err), err.param) from None
    return parsed


def structured_output(req: ParsedRequest) -> StructuredOutput | None:
    """The grammar a request's output must follow, if any: OpenAI's response_format (json_schema is enforced
    whether `strict` is set or not) or vLLM's guided_* fields (parse_request allows one of them)."""
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        return StructuredOutput("json_object", None, "response_format")
    if fmt is not None and fmt.type == "json_schema":
        return StructuredOutput("json_schema", fmt.json_schema.schema_, "response_format")
    for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if (value := getattr(req, name)) is not None:
            return StructuredOutput(kind, value, name)
    return None


def check_prompt_size(req: ParsedRequest | TokenizeRequest, max_model_len: int) -> None:
    """Refuses, before tokenising, a prompt too long for the context whatever the tokenizer."""
    if req.chat:
        if len(req.messages) > max_model_len:   # every message costs at least one token
            raise bad_request(f"{len(req.messages)} messages cannot fit the model's maximum context length of "
                              f"{max_model_len} tokens", "messages", "context_length_exceeded")
        chars = sum(len(value) for m in req.messages for value in m.values() if isinstance(value, str))
        param = "messages"
    else:
        chars, param = len(req.prompt) if isinstance(req.prompt, str) else 0, "prompt"
    if chars > max_model_len * MAX_CHARS_PER_TOKEN:
        raise bad_request(f"the prompt has {chars} characters, more than this model's maximum context length of "
                          f"{max_model_len} tokens can hold", param, "context_length_exceeded")


@dataclass
class TokenizeRequest:
    """vLLM's /tokenize: TokenizeCompletionRequest (prompt) or TokenizeChatRequest (messages)."""
    chat: bool
    prompt: str | None
    messages: list[dict] | None
    template_options: dict | None
    add_special_tokens: bool
    return_token_strs: bool


def parse_tokenize(body: dict) -> TokenizeRequest:
    chat = "messages" in body
    if not chat and "prompt" not in body:
        raise bad_request("'prompt' (a string) or 'messages' is required", "prompt")
    request = _validate(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)
    add_special_tokens = request.add_special_tokens if request.add_special_tokens is not None else not chat
    if chat:
        return TokenizeRequest(chat=True, prompt=None, messages=[m.template_dict() for m in request.messages],
                               template_options=request.template_options(), add_special_tokens=add_special_tokens,
                               return_token_strs=request.return_token_strs is True)
    return TokenizeRequest(chat=False, prompt=request.prompt, messages=None, template_options=None,
                           add_special_tokens=add_special_tokens, return_token_strs=request.return_token_strs is True)


def parse_detokenize(body: dict, vocab_size: int, max_tokens: int) -> list[int]:
    """vLLM's /detokenize: {"tokens": [...]}, at most a context's worth of ids the tokenizer knows."""
    refusal = bad_request(f"'tokens' must be a list of at most {max_tokens} token ids in [0, {vocab_size})", "tokens")
    try:
        tokens = _validate(DetokenizeRequest, body).tokens
    except APIError as err:
        raise refusal if err.param == "tokens" else err from None
    if len(tokens) > max_tokens or not all(0 <= t < vocab_size for t in tokens):
        raise refusal
    return tokens


# ---- responses ------------------------------------------------------------------------------------------
# Built as dicts (below): per streamed chunk, a pydantic model costs more than the dict and json.dumps
# (bench/http_overhead.py, "chunk" part). These models describe the same shapes; the tests validate every
# response against them.
FinishReason = Literal["stop", "length", "tool_calls"]


class _Response(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(_Response):
    logprob: float
    rank: int
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]   # vLLM's: per prompt token, the first None


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    prompt_logprobs: PromptLogprobs | None = None   # when asked (never in a stream)


class Completion(_Response):
    """A completion, and (with usage only on the last, when asked) each chunk of a streamed one."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class CompletionChunk(Completion):
    usage: Usage | None = None


class ChatTopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None


class FunctionCall(_Response):
    name: str
    arguments: str   # JSON text


class ToolCall(_Response):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Response):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None   # with tools, when the reply calls them


class ChatChoice(_Response):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None   # when asked


class FunctionCallDelta(_Response):
    name: str | None = None
    arguments: str


class ToolCallDelta(_Response):
    """A call's first delta has its id, type and name (arguments ""); the next ones add to its arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None     # only on the last chunk, when stream_options.include_usage asks


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Response):
    error: ErrorInfo


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: list[dict], decode) -> dict:
    """An echoed prompt's first token has no logprob: its entry's logprob and top are None."""
    return {"tokens": [decode(e["token_id"]) for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else {decode(t): lp for t, lp in e["top"].items()}
                             for e in entries],
            "text_offset": [e["text_offset"] for e in entries]}


def prompt_logprobs(entries: list[dict | None], k: int, decode) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token (the first: None), {token id: {logprob, rank, decoded_token}}
    for the prompt's token and the k most likely ones."""
    def entry(e):
        tops = {t: {"logprob": lp, "rank": rank, "decoded_token": decode(t)}
                for rank, (t, lp) in enumerate(list(e["top"].items())[:k], start=1)}
        return {str(e["token_id"]): {"logprob": e["logprob"], "rank": e["rank"], "decoded_token": decode(e["token_id"])},
                **{str(t): top for t, top in tops.items() if t != e["token_id"]}}
    return [e and entry(e) for e in entries]


def chat_logprobs(entries: list[dict], decode) -> dict:
    def token(token_id, logprob):
        text = decode(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**token(e["token_id"], e["logprob"]),
                         "top_logprobs": [token(t, lp) for t, lp in e["top"].items()]} for e in entries]}


def tool_choice(index: int, message: dict, finish_reason: str | None, logprobs: dict | None, *, delta: bool,
                first: bool = False) -> dict:
    """A chat choice whose message (or delta) the tool-call parser made: content and/or tool_calls."""
    if delta:
        return {"index": index, "delta": {"role": "assistant", **message} if first else message,
                "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": None, **message}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def choice(req: ParsedRequest, index: int, text: str, finish_reason: str | None, logprobs: dict | None, *,
           delta: bool, first: bool = False) -> dict:
    if not req.chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if delta:
        content = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def envelope(req: ParsedRequest, model: str, choices: list[dict], *, chunk: bool, usage: dict | None = None) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if req.chat else "text_completion"
    body = {"id": req.id, "object": kind, "created": req.created, "model": model, "choices": choices}
    if usage is not None or not chunk:
        body["usage"] = usage
    return body
