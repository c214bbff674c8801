"""OpenAI request parsing and response shapes (completions and chat completions), and vLLM's
/tokenize and /detokenize requests.

Every field a request may carry is checked here, type and range, so that a bad value is a 400 naming it
(`param`) and never an error deep in the engine. Unknown fields are ignored, as other OpenAI-compatible
servers do."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from rayprism.engine import InvalidRequestError, SamplingParams
from rayprism.engine.sampling import MAX_LOGPROBS

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


@dataclass
class ParsedRequest:
    chat: bool
    prompt: str | list[int] | None      # completions: text or token ids; chat: None until the template runs
    messages: list[dict] | None
    template_options: dict | None       # chat: apply_chat_template's keyword arguments
    params: SamplingParams
    max_tokens_given: bool
    stream: bool
    include_usage: bool
    logprobs: int | None
    id: str
    created: int


_NOT_SUPPORTED_UNLESS = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "tools": []}


def parse_request(body, *, chat: bool) -> ParsedRequest:
    """Validates a request body; raises APIError(400) naming the offending field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for key, neutral in _NOT_SUPPORTED_UNLESS.items():
        if body.get(key, neutral) not in (neutral, None):
            raise bad_request(f"'{key}' is not supported (only {neutral!r})", key)
    # SDKs send {"type": "text"}, which asks for nothing beyond plain generation.
    if _field(body, "response_format", dict, {}).get("type", "text") != "text":
        raise bad_request("'response_format': structured output is not supported yet (only {\"type\": \"text\"})",
                          "response_format")
    messages, prompt, template_options = None, None, None
    if chat:
        messages, template_options = _messages(body.get("messages")), _template_options(body)
        max_tokens = _field(body, "max_completion_tokens", int, None)
        max_tokens = max_tokens if max_tokens is not None else _field(body, "max_tokens", int, None)
        wants_logprobs = _field(body, "logprobs", bool, False)
        top_logprobs = _ranged(body, "top_logprobs", 0, MAX_LOGPROBS)
        if top_logprobs is not None and not wants_logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top_logprobs or 0) if wants_logprobs else None
    else:
        prompt = _prompt(body.get("prompt"))
        max_tokens = _field(body, "max_tokens", int, 16)
        logprobs = _ranged(body, "logprobs", 0, MAX_LOGPROBS)
    stream = _field(body, "stream", bool, False)
    stream_options = _field(body, "stream_options", dict, {})
    if stream_options and not stream:
        raise bad_request("'stream_options' needs 'stream': true", "stream_options")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options")
    min_tokens = _field(body, "min_tokens", int, 0)
    values = dict(
        # Chat's default is filled in once the prompt is known (min_tokens is checked against it again then).
        max_tokens=max_tokens if max_tokens is not None else max(1, min_tokens),
        temperature=_field(body, "temperature", (int, float), 1.0),
        top_p=_field(body, "top_p", (int, float), 1.0),
        top_k=_field(body, "top_k", int, 0),
        seed=_field(body, "seed", int, None),
        stop=_stop(body.get("stop")),
        stop_token_ids=_stop_token_ids(body.get("stop_token_ids")),
        ignore_eos=_field(body, "ignore_eos", bool, False),
        include_stop_str_in_output=_field(body, "include_stop_str_in_output", bool, False),
        skip_special_tokens=_field(body, "skip_special_tokens", bool, True),
        spaces_between_special_tokens=_field(body, "spaces_between_special_tokens", bool, True),
        logprobs=logprobs,
        repetition_penalty=_field(body, "repetition_penalty", (int, float), 1.0),
        presence_penalty=_field(body, "presence_penalty", (int, float), 0.0),
        frequency_penalty=_field(body, "frequency_penalty", (int, float), 0.0),
        min_p=_field(body, "min_p", (int, float), 0.0),
        min_tokens=min_tokens,
        logit_bias=_logit_bias(body.get("logit_bias")),
    )
    try:
        params = SamplingParams(**values)
        params.validate()
    except InvalidRequestError as err:
        raise bad_request(str(err), err.param) from None
    return ParsedRequest(chat=chat, prompt=prompt, messages=messages, template_options=template_options,
                         params=params,
                         max_tokens_given=max_tokens is not None, stream=stream,
                         include_usage=include_usage, logprobs=logprobs,
                         id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()))


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
    if chat:
        prompt, messages = None, _messages(body["messages"])
    else:
        prompt, messages = body.get("prompt"), None
        if not isinstance(prompt, str):
            raise bad_request("'prompt' (a string) or 'messages' is required", "prompt")
    return TokenizeRequest(chat=chat, prompt=prompt, messages=messages,
                           template_options=_template_options(body) if chat else None,
                           add_special_tokens=_field(body, "add_special_tokens", bool, not chat),
                           return_token_strs=_field(body, "return_token_strs", bool, False))


def _template_options(body: dict) -> dict:
    """apply_chat_template's keyword arguments: vLLM's add_generation_prompt, continue_final_message (the last
    message is continued: no generation prompt, no end of turn after it) and chat_template_kwargs."""
    generation_prompt = _field(body, "add_generation_prompt", bool, True)
    continue_final = _field(body, "continue_final_message", bool, False)
    if generation_prompt and continue_final:
        raise bad_request("'continue_final_message' and 'add_generation_prompt' cannot both be true",
                          "continue_final_message")
    extra = _field(body, "chat_template_kwargs", dict, {})
    if len(json.dumps(extra)) > MAX_TEMPLATE_KWARGS_CHARS:
        raise bad_request(f"'chat_template_kwargs' must be at most {MAX_TEMPLATE_KWARGS_CHARS} characters of JSON",
                          "chat_template_kwargs")
    if reserved := sorted(_RESERVED_TEMPLATE_KWARGS & extra.keys()):
        raise bad_request(f"'chat_template_kwargs' may not set {', '.join(reserved)}", "chat_template_kwargs")
    return {**extra, "add_generation_prompt": generation_prompt, "continue_final_message": continue_final}


def parse_detokenize(body: dict, vocab_size: int, max_tokens: int) -> list[int]:
    """vLLM's /detokenize: {"tokens": [...]}, at most a context's worth of ids the tokenizer knows."""
    tokens = body.get("tokens")
    if not (isinstance(tokens, list) and len(tokens) <= max_tokens
            and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in tokens)):
        raise bad_request(f"'tokens' must be a list of at most {max_tokens} token ids in [0, {vocab_size})",
                          "tokens")
    return tokens


def _field(body: dict, key: str, types, default):
    value = body.get(key)
    if value is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise bad_request(f"'{key}' must be {names}, got {type(value).__name__}", key)
    return value


def _ranged(body: dict, key: str, low: int, high: int) -> int | None:
    value = _field(body, key, int, None)
    if value is not None and not low <= value <= high:
        raise bad_request(f"'{key}' must be in [{low}, {high}], got {value}", key)
    return value


def _stop(stop) -> list[str]:
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad_request(f"'stop': at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters",
                          "stop")
    return stop


def _stop_token_ids(ids) -> list[int]:
    ids = [] if ids is None else ids
    if not (isinstance(ids, list) and len(ids) <= MAX_STOP_TOKEN_IDS
            and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise bad_request(f"'stop_token_ids' must be a list of at most {MAX_STOP_TOKEN_IDS} integers",
                          "stop_token_ids")
    return ids


def _logit_bias(bias) -> dict[int, float]:
    """OpenAI's {"token id": bias}: JSON keys are strings. Range and vocabulary checks follow in the engine."""
    bias = {} if bias is None else bias
    if not (isinstance(bias, dict) and all(isinstance(token, str) and token.isdecimal() for token in bias)
            and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in bias.values())):
        raise bad_request("'logit_bias' must map token ids (strings of integers) to numbers", "logit_bias")
    return {int(token): value for token, value in bias.items()}


def _prompt(prompt) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]      # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' must not be empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request("'prompt': only one prompt per request is supported", "prompt")
    raise bad_request("'prompt' must be a non-empty string or a non-empty list of token ids", "prompt")


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"'messages[{i}]' must be an object with a string 'role'", f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):   # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"'messages[{i}].content': only text parts are supported",
                                  f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        elif content is not None and not isinstance(content, str):
            raise bad_request(f"'messages[{i}].content' must be a string or a list of text parts",
                              f"messages[{i}].content")
        parsed.append({**message, "content": content or ""})
    return parsed


# ---- responses -------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: list[dict], decode) -> dict:
    return {"tokens": [decode(e["token_id"]) for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{decode(t): lp for t, lp in e["top"].items()} for e in entries],
            "text_offset": [e["text_offset"] for e in entries]}


def chat_logprobs(entries: list[dict], decode) -> dict:
    def token(token_id, logprob):
        text = decode(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**token(e["token_id"], e["logprob"]),
                         "top_logprobs": [token(t, lp) for t, lp in e["top"].items()]} for e in entries]}


def choice(req: ParsedRequest, text: str, finish_reason: str | None, logprobs: dict | None, *,
           delta: bool, first: bool = False) -> dict:
    if not req.chat:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if delta:
        content = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def envelope(req: ParsedRequest, model: str, choices: list[dict], *, chunk: bool, usage: dict | None = None) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if req.chat else "text_completion"
    body = {"id": req.id, "object": kind, "created": req.created, "model": model, "choices": choices}
    if usage is not None or not chunk:
        body["usage"] = usage
    return body
