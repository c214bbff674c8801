"""OpenAI request parsing and response shapes (completions and chat completions)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from rayprism.engine import InvalidRequestError, SamplingParams


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ParsedRequest:
    chat: bool
    prompt: str | list[int] | None      # completions: text or token ids; chat: None until the template runs
    messages: list[dict] | None
    params: SamplingParams
    max_tokens_given: bool
    stream: bool
    include_usage: bool
    logprobs: int | None
    id: str
    created: int


_NOT_SUPPORTED_UNLESS = {"n": 1, "best_of": 1, "echo": False, "presence_penalty": 0, "frequency_penalty": 0,
                         "suffix": None, "logit_bias": None, "tools": None, "response_format": None}


def parse_request(body, *, chat: bool) -> ParsedRequest:
    """Validates a request body; raises APIError(400) naming the offending field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for key, neutral in _NOT_SUPPORTED_UNLESS.items():
        if body.get(key, neutral) not in (neutral, None):
            raise bad_request(f"'{key}' is not supported (only {neutral!r})", key)
    messages, prompt = None, None
    if chat:
        messages = _messages(body.get("messages"))
        max_tokens = _field(body, "max_completion_tokens", int, None)
        max_tokens = max_tokens if max_tokens is not None else _field(body, "max_tokens", int, None)
        logprobs = _field(body, "top_logprobs", int, 0) if _field(body, "logprobs", bool, False) else None
    else:
        prompt = _prompt(body.get("prompt"))
        max_tokens = _field(body, "max_tokens", int, 16)
        logprobs = _field(body, "logprobs", int, None)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    stream = _field(body, "stream", bool, False)
    stream_options = _field(body, "stream_options", dict, {}) or {}
    values = dict(
        max_tokens=max_tokens if max_tokens is not None else 1,   # chat default filled in once the prompt is known
        temperature=_field(body, "temperature", (int, float), 1.0),
        top_p=_field(body, "top_p", (int, float), 1.0),
        top_k=_field(body, "top_k", int, 0),
        seed=_field(body, "seed", int, None),
        stop=stop or [],
        stop_token_ids=_field(body, "stop_token_ids", list, []),
        ignore_eos=_field(body, "ignore_eos", bool, False),
        logprobs=logprobs,
    )
    try:
        params = SamplingParams(**values)
        params.validate()
    except InvalidRequestError as err:
        raise bad_request(str(err), err.param) from None
    return ParsedRequest(chat=chat, prompt=prompt, messages=messages, params=params,
                         max_tokens_given=max_tokens is not None, stream=stream,
                         include_usage=bool(stream_options.get("include_usage")), logprobs=logprobs,
                         id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()))


def _field(body: dict, key: str, types, default):
    value = body.get(key)
    if value is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise bad_request(f"'{key}' must be {names}, got {type(value).__name__}", key)
    return value


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
            "text_offset": []}


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
