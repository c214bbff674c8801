"""The aiohttp applications of one replica.

The OpenAI port: /v1/models (and /v1/models/{id}), /v1/completions, /v1/chat/completions, /metrics, vLLM's
/tokenize, /detokenize and /version, and two probes:
  GET /health  readiness: 200 only while the model serves; 503 while it loads, while draining (before a
               weights load, on SIGTERM), while the engine restarts and once it is dead. The Service routes
               by it.
  GET /live    liveness: 200 while the process does its job, loading, draining and restarting a dead engine
               included. When the engine dies (a worker died or stopped answering, the step loop died) the
               server restarts it in place: new workers on the same Ray cluster, the weights revision it served
               last, a few seconds instead of a restart of every Ray process. /live answers 503 only once those
               restarts are used up (--engine-restarts within --engine-restart-window-seconds), so that the
               kubelet restarts the container.
The admin port (--admin-port) serves the weights API, /admin/v1/weights (GET, POST), and the remote-rollout
controls a trainer drives around its weight updates (ROLLOUT_CONTROLS: POST /admin/v1/pause, resume,
reset_prefix_cache, sleep, wake_up, weight_update_group, weights/update_from_group), behind a bearer token; the
OpenAI port answers them 404 like any unknown route.

Every error is answered in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, unknown routes
and methods included; every response carries an X-Request-Id, and an unexpected exception is logged under
that id and answered 500 with the id alone (no exception text: it can hold file paths and internals).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hmac
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from ray.exceptions import RayTaskError

from rayprism import __version__
from rayprism.engine import InvalidRequestError
from rayprism.executor import EngineDeadError
from rayprism.executor.ray_executor import node_alive
from rayprism.llm import RequestResult
from rayprism.engine.sampling import StructuredOutput
from rayprism.server import protocol, tools
from rayprism.server.metrics import Metrics
from rayprism.server.protocol import APIError, ParsedRequest, bad_request

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "RAYPRISM_ADMIN_TOKEN"
MAX_BODY_BYTES = 32 * 1024 * 1024
_HEALTH_TIMEOUT_S = 10
_RETRY_AFTER_S = 1
_RESTARTING_RETRY_AFTER_S = 5    # a restart takes seconds (new workers load the model)
_ENGINE_CHECK_INTERVAL_S = 0.5   # how often the server asks whether the executor found the engine dead
_FIRST_RESTART_BACKOFF_S = 2.0   # between failed restarts; doubles each time
# A stopping worker pod's Ray node leaves once its ranks stopped (its preStop hook ends, then its raylet):
# seconds, unless the pod is stuck.
_LEAVING_NODE_TIMEOUT_S = 120.0
# A lone surrogate can only enter a string through a JSON escape in this range; only then is the body checked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
REQUEST_ID = web.RequestKey("request_id", str)


@dataclass(frozen=True)
class RolloutControl:
    """An admin route that runs one LLM method with the JSON body's fields as its keyword arguments."""
    method: str
    required: dict[str, type] = field(default_factory=dict)
    optional: dict[str, type] = field(default_factory=dict)


# Remote rollout (issue #19; the shape of NeMo-RL's HTTP backend and verl's STANDALONE mode): a trainer pauses
# generation, joins the workers in a weight-update group, broadcasts new weights, resumes; or frees the GPU
# between rollouts with sleep/wake_up.
ROLLOUT_CONTROLS = {
    "pause": RolloutControl("pause"),
    "resume": RolloutControl("resume"),
    "reset_prefix_cache": RolloutControl("reset_prefix_cache"),
    "sleep": RolloutControl("sleep", optional={"level": int}),
    "wake_up": RolloutControl("wake_up", optional={"tags": list}),
    "weight_update_group": RolloutControl(
        "init_weight_update_group",
        {"master_address": str, "master_port": int, "rank_offset": int, "world_size": int},
        {"backend": str, "group_name": str}),
    "weights/update_from_group": RolloutControl("update_weights_from_distributed",
                                                {"names": list, "dtypes": list, "shapes": list}),
}


class Server:
    """Holds the LLM (None while it loads) and answers HTTP. `max_in_flight` bounds admitted requests;
    beyond it requests get 429 so memory stays bounded.

    Draining (before a weights load, and on SIGTERM): /health answers 503 at once, so the readiness probe
    takes the replica out of the Service's endpoints; requests keep being served meanwhile (clients with an
    older endpoint list still arrive) for `unready_delay_s`, then until none is in flight, at most
    `drain_s` in all.

    Restarting (keep_engine_alive): once the executor finds the engine dead, its requests fail (503), new ones
    get 503 with Retry-After, the dead LLM is shut down (its actors and placement group freed) and a new one is
    built on the weights served last; GET /admin/v1/weights says state "restarting" with the cause meanwhile.
    `weights["restarts"]` counts the attempts; once they are used up the state is "failed" and /live is 503.
    Moving (also keep_engine_alive): when a worker's pod is being stopped (its preStop hook marks it), the
    replica drains while that worker still serves, then restarts its engine as above once the worker's Ray node
    has gone, so nothing in flight fails."""

    def __init__(self, *, served_model_name: str, model_uri: str, revision: str | None, max_in_flight: int,
                 admin_token_file: str | None, drain_s: float = 30.0, unready_delay_s: float = 5.0,
                 tool_call_parser: str = "auto"):
        self.served_model_name = served_model_name
        self.llm = None
        self.tool_call_parser = tool_call_parser   # tools.select_parser's choice for tool_choice "auto"
        self._auto_tool_parsers: dict[int, tools.ToolParser | None] = {}   # by id(llm): its model's
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.drain_s, self.unready_delay_s = drain_s, unready_delay_s
        self.draining: str | None = None  # why /health says 503 while the model still serves
        self.admin_token_file = admin_token_file
        # GET /admin/v1/weights answers this; the operator reads these fields.
        self.weights = {"revision": revision, "uri": model_uri, "state": "loading", "error": None, "restarts": 0}
        self.engine_dead_for_good = False   # the engine died and may not be restarted again: /live is 503
        self.metrics = Metrics(served_model_name, lambda: self.llm.stats() if self.llm else {}, lambda: self.in_flight)
        self._weight_task: asyncio.Task | None = None
        self._restart_times: collections.deque[float] = collections.deque()

    def set_llm(self, llm) -> None:
        self.llm = llm
        self.weights.update(state="ready", error=None)

    def app(self) -> web.Application:
        """The OpenAI port."""
        return _application([
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model:.+}", self.model),   # a served name can hold slashes (org/name)
            web.post("/v1/completions", functools.partial(self.generate, chat=False)),
            web.post("/v1/chat/completions", functools.partial(self.generate, chat=True)),
            web.post("/tokenize", self.tokenize),
            web.post("/detokenize", self.detokenize),
            web.get("/version", self.version),
            web.get("/health", self.health),
            web.get("/live", self.live),
            web.get("/metrics", self.metrics_page),
        ])

    def admin_app(self) -> web.Application:
        """The admin port: kept off the OpenAI port so that only what reaches this port can try the token."""
        return _application([web.get("/admin/v1/weights", self.get_weights),
                             web.post("/admin/v1/weights", self.post_weights),
                             *(web.post(f"/admin/v1/{path}", functools.partial(self.rollout_control, control))
                               for path, control in ROLLOUT_CONTROLS.items())])

    # ---- OpenAI API --------------------------------------------------------------------------------
    def _card(self) -> dict:
        return {"id": self.served_model_name, "object": "model", "created": 0, "owned_by": "rayprism",
                "root": self.weights["uri"], "max_model_len": self.llm.max_model_len if self.llm else None}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._card()]})

    async def model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model != self.served_model_name:
            raise self._not_found(model)
        return web.json_response(self._card())

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        llm = self._ready_llm()
        self._check_model(body, required=False)   # vLLM's tokenize and detokenize default to the served model
        req = protocol.parse_tokenize(body)
        protocol.check_prompt_size(req, llm.max_model_len)
        tokenize = functools.partial(self._tokenize, llm, req, add_special_tokens=req.add_special_tokens)
        ids = await asyncio.get_running_loop().run_in_executor(None, tokenize)
        strs = llm.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return web.json_response({"count": len(ids), "max_model_len": llm.max_model_len, "tokens": ids,
                                  "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        llm = self._ready_llm()
        self._check_model(body, required=False)
        tokens = protocol.parse_detokenize(body, len(llm.tokenizer), llm.max_model_len)
        text = await asyncio.get_running_loop().run_in_executor(None, llm.tokenizer.decode, tokens)
        return web.json_response({"prompt": text})

    async def generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        endpoint = "chat/completions" if chat else "completions"
        status = 200
        try:
            body = await _json_body(request)
            llm = self._ready_llm()
            self._check_model(body)
            req = protocol.parse_request(body, chat=chat)
            tool_parser = self._prepare_tools(llm, req) if chat else None
            protocol.check_prompt_size(req, llm.max_model_len)
            tokenize = functools.partial(self._tokenize, llm, req, add_special_tokens=not req.chat)
            prompt_ids = await asyncio.get_running_loop().run_in_executor(None, tokenize)
            self._fit_context(llm, req, len(prompt_ids))
            if self.in_flight >= self.max_in_flight:
                raise APIError(429, f"the server is at its limit of {self.max_in_flight} requests in flight; "
                                    "retry later", type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(_RETRY_AFTER_S)})
            self.in_flight += 1
            self.metrics.prompt_tokens.inc(len(prompt_ids))
            try:
                respond = self._stream if req.stream else self._complete
                return await respond(request, llm, req, prompt_ids, tool_parser)
            finally:
                self.in_flight -= 1
        except _ClientGone as gone:
            status = 499     # nginx's "client closed request"
            return gone.response
        except asyncio.CancelledError:   # the client went away (aiohttp handler cancellation)
            status = 499
            raise
        except Exception as err:   # answered by _answer_errors
            status = err.status if isinstance(err, APIError) else 500
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    def _prepare_tools(self, llm, req: ParsedRequest) -> tools.ToolParser | None:
        """A chat request's tools: validated; rendered by the chat template (not with tool_choice "none"); for
        tool_choice "required" or a named function, the grammar the reply must follow. Returns the parser of the
        reply's calls (None without tools)."""
        tool_request = tools.parse_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        req.messages = tools.template_messages(req.messages)
        if tool_request is None:
            return None
        auto = self._auto_tool_parser(llm) if tool_request.choice == "auto" else None
        parser = tools.reply_parser(tool_request, auto)
        if tool_request.choice != "none":
            req.template_options["tools"] = tool_request.tools
        if (schema := tools.guided_schema(tool_request)) is not None:
            if req.params.structured is not None:
                raise bad_request(f"'tool_choice' {tool_request.choice!r} makes the reply a call; it cannot also "
                                  f"follow '{req.params.structured.param}'", "tool_choice")
            req.params.structured = StructuredOutput("json_schema", schema, "tool_choice")
        return parser

    def _auto_tool_parser(self, llm) -> tools.ToolParser | None:
        if id(llm) not in self._auto_tool_parsers:   # the tokenizer and config come from rank 0 once
            self._auto_tool_parsers = {id(llm): tools.select_parser(self.tool_call_parser, llm.tokenizer.chat_template,
                                                                    llm.model_type)}
        return self._auto_tool_parsers[id(llm)]

    def _ready_llm(self):
        if self.llm is None:
            self._raise_if_engine_down()
            raise APIError(503, "the model is still loading", type="service_unavailable", code="model_not_ready")
        return self.llm

    def _raise_if_engine_down(self) -> None:
        if self.engine_dead_for_good:
            raise APIError(503, f"this replica's engine has failed: {self.weights['error']}; retry on another "
                                "replica", type="service_unavailable", code="engine_unavailable")
        if self.weights["state"] == "restarting":
            raise APIError(503, f"this replica's engine is restarting after a failure ({self.weights['error']}); "
                                "retry later", type="service_unavailable", code="engine_restarting",
                           headers={"Retry-After": str(_RESTARTING_RETRY_AFTER_S)})

    def _check_model(self, body, required: bool = True) -> None:
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        model = body.get("model")
        if model is None and not required:
            return
        if not isinstance(model, str):
            raise bad_request("'model' is required (a string)", "model")
        if model != self.served_model_name:
            raise self._not_found(model)

    def _not_found(self, model: str) -> APIError:
        return APIError(404, f"the model '{model}' does not exist; this server serves '{self.served_model_name}'",
                        param="model", code="model_not_found")

    @staticmethod
    def _tokenize(llm, req: ParsedRequest | protocol.TokenizeRequest, *, add_special_tokens: bool) -> list[int]:
        """Chat requests go through the chat template, whose text holds the special tokens it wants (hence
        add_special_tokens False for chat, as in vLLM)."""
        tokenizer = llm.tokenizer
        if req.chat:
            try:
                text = tokenizer.apply_chat_template(req.messages, tokenize=False, **req.template_options)
            except Exception as err:  # noqa: BLE001 - the template rejected the conversation
                raise bad_request(f"'messages' do not fit the chat template: {err}", "messages") from None
            return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if isinstance(req.prompt, str):
            return tokenizer(req.prompt, add_special_tokens=add_special_tokens)["input_ids"]
        return req.prompt

    @staticmethod
    def _fit_context(llm, req: ParsedRequest, prompt_len: int) -> None:
        limit = llm.max_model_len
        if prompt_len >= limit:
            raise bad_request(f"the prompt has {prompt_len} tokens; this model's maximum context length is "
                              f"{limit} tokens", "messages" if req.chat else "prompt", "context_length_exceeded")
        if not req.max_tokens_given:
            req.params.max_tokens = limit - prompt_len
        elif prompt_len + req.params.max_tokens > limit:
            raise bad_request(f"the prompt ({prompt_len} tokens) plus max_tokens ({req.params.max_tokens}) exceed "
                              f"this model's maximum context length of {limit} tokens", "max_tokens",
                              "context_length_exceeded")

    async def _outputs(self, request, llm, req: ParsedRequest, prompt_ids: list[int]):
        """The request's RequestOutputs, timed into the metrics; engine errors become APIErrors (a stream that
        has begun can still report them). How it ended is counted once: its finish reason, "error", or "abort"
        when the client left before the end; not at all when the engine refused it as invalid (it never ran)."""
        arrival = last = time.monotonic()
        ended = "abort"
        generator = llm.generate_async(prompt_ids, req.params, stream=True)
        try:
            async with contextlib.aclosing(generator):
                while True:
                    try:
                        output = await anext(generator)
                    except StopAsyncIteration:
                        return
                    except Exception as err:  # noqa: BLE001
                        ended = None if isinstance(err, InvalidRequestError) else "error"
                        raise _engine_error(request, err) from None
                    now = time.monotonic()
                    if output.new_token_ids:
                        self.metrics.generation_tokens.inc(len(output.new_token_ids))
                    if output.new_token_ids and output.index == 0:   # latencies: of the first sequence (n > 1)
                        if output.num_output_tokens == len(output.new_token_ids):
                            self.metrics.time_to_first_token.observe(now - arrival)
                        else:
                            self.metrics.inter_token_latency.observe((now - last) / len(output.new_token_ids))
                        last = now
                    if output.finished:
                        ended = output.finish_reason
                        self.metrics.request_latency.observe(now - arrival)
                    yield output
        finally:
            if ended:
                self.metrics.finished.labels(ended).inc()

    def _logprobs(self, llm, req: ParsedRequest, entries) -> dict | None:
        if req.logprobs is None or entries is None:
            return None
        decode = _token_id_name if req.tokens_as_ids else _decoder(llm)
        return (protocol.chat_logprobs if req.chat else protocol.completion_logprobs)(entries, decode)

    @staticmethod
    def _echo(llm, req: ParsedRequest, prompt_ids: list[int], prompt_entries: list[dict | None] | None
              ) -> tuple[str, list[dict]]:
        """Completions' echo: the prompt's text, which each sequence's text starts with, and (with logprobs) its
        tokens' logprob entries, with their offsets in that text (as for the output's tokens)."""
        text = req.prompt if isinstance(req.prompt, str) else llm.tokenizer.decode(prompt_ids)
        entries, offset, decode = [], 0, _decoder(llm)
        with_logprobs = zip(prompt_ids, prompt_entries or ()) if req.logprobs is not None else ()
        for token_id, entry in with_logprobs:
            top = None if entry is None else dict(list(entry["top"].items())[:req.logprobs])
            entries.append({"token_id": token_id, "logprob": entry and entry["logprob"], "top": top,
                            "text_offset": offset})
            offset += len(decode(token_id))
        return text, entries

    @staticmethod
    def _after_echo(echo_text: str, entries: list[dict] | None) -> list[dict] | None:
        """The output's logprob entries with their offsets moved past the echoed prompt."""
        return entries and [{**entry, "text_offset": entry["text_offset"] + len(echo_text)} for entry in entries]

    async def _complete(self, request, llm, req: ParsedRequest, prompt_ids: list[int],
                        tool_parser: tools.ToolParser | None) -> web.Response:
        result = RequestResult(req.id)
        async for output in self._outputs(request, llm, req, prompt_ids):
            result.add(output)
        completion_tokens = sum(len(sequence.token_ids) for sequence in result.sequences.values())   # best_of's all
        sequences = result.best(req.params.n)
        prompt_entries = sequences[0].prompt_logprobs
        echo_text, echo_entries = self._echo(llm, req, prompt_ids, prompt_entries) if req.echo else ("", [])
        prompt_logprobs = (None if req.prompt_logprobs is None else
                           protocol.prompt_logprobs(prompt_entries, req.prompt_logprobs, _decoder(llm)))
        choices = []
        for sequence in sequences:
            entries = echo_entries + self._after_echo(echo_text, sequence.logprobs or [])
            logprobs = self._logprobs(llm, req, entries)
            if tool_parser is not None:
                content, calls = tool_parser.parse(sequence.text)
                message = {"content": content, **({"tool_calls": calls} if calls else {})}
                choices.append(protocol.tool_choice(sequence.index, message,
                                                    tools.finish_reason(sequence.finish_reason, bool(calls)),
                                                    logprobs, delta=False))
                continue
            choice = protocol.choice(req, sequence.index, echo_text + sequence.text, sequence.finish_reason,
                                     logprobs, delta=False)
            if prompt_logprobs is not None and not req.chat:
                choice["prompt_logprobs"] = prompt_logprobs
            choices.append(choice)
        usage = protocol.usage(len(prompt_ids), completion_tokens)
        body = protocol.envelope(req, self.served_model_name, choices, chunk=False, usage=usage)
        if prompt_logprobs is not None and req.chat:   # vLLM's place for chat: the response's
            body["prompt_logprobs"] = prompt_logprobs
        return web.json_response(body)

    async def _stream(self, request, llm, req: ParsedRequest, prompt_ids: list[int],
                      tool_parser: tools.ToolParser | None) -> web.StreamResponse:
        outputs = self._outputs(request, llm, req, prompt_ids)
        async with contextlib.aclosing(outputs):
            first = await anext(outputs)    # errors before the first token still get their HTTP status
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            await response.prepare(request)

            async def send(data) -> None:
                await response.write(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())

            output = first
            output_tokens: dict[int, int] = {}   # by sequence index: its first chunk is the one not counted yet
            tool_streams: dict[int, tools.ToolCallStream] = {}
            echo_text, echo_entries = "", []
            if req.echo:   # with logprobs, the first output (sequence 0's) brings the prompt's
                echo_text, echo_entries = self._echo(llm, req, prompt_ids, first.prompt_logprobs)
            try:
                while True:
                    is_first = output.index not in output_tokens
                    output_tokens[output.index] = output.num_output_tokens
                    text, entries = output.new_text, self._after_echo(echo_text, output.logprobs)
                    if is_first and req.echo:
                        text, entries = echo_text + text, echo_entries + (entries or [])
                    logprobs = self._logprobs(llm, req, entries)
                    if tool_parser is not None:
                        if is_first:
                            tool_streams[output.index] = tool_parser.stream()
                        choices = self._tool_deltas(tool_streams[output.index], output, logprobs, is_first)
                    else:
                        choices = [protocol.choice(req, output.index, text, output.finish_reason, logprobs,
                                                   delta=True, first=is_first)]
                    for choice in choices:
                        await send(protocol.envelope(req, self.served_model_name, [choice], chunk=True))
                    if output.finished:
                        break
                    output = await anext(outputs)
                if req.include_usage:
                    usage = protocol.usage(output.num_prompt_tokens, sum(output_tokens.values()))
                    await send(protocol.envelope(req, self.served_model_name, [], chunk=True, usage=usage))
                await send("[DONE]")
            except APIError as err:        # the replica failed mid-stream: tell the client, no [DONE]
                await send(err.body())
            except ConnectionResetError:   # leaving aclosing() aborts the request
                raise _ClientGone(response) from None
            return response

    @staticmethod
    def _tool_deltas(stream: tools.ToolCallStream, output, logprobs: dict | None, first: bool) -> list[dict]:
        """The chunks' choices of one output of a reply with tools: its content and tool-call deltas (the parser
        holds back text that may open a call), the first with the role and logprobs, the last with the finish
        reason; one empty delta when only those are left to say."""
        deltas = stream.feed(output.new_text)
        if output.finish_reason is not None:
            deltas += stream.finish()
        finish = tools.finish_reason(output.finish_reason, stream.called)
        if not deltas and (first or logprobs or finish):
            deltas = [{}]
        return [protocol.tool_choice(output.index, delta, finish if i == len(deltas) - 1 else None,
                                     logprobs if i == 0 else None, delta=True, first=first and i == 0)
                for i, delta in enumerate(deltas)]

    # ---- health and metrics ------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.llm is None:
            return web.json_response({"status": self.weights["state"], "error": self.weights["error"]}, status=503)
        if self.draining:
            return web.json_response({"status": "draining", "reason": self.draining}, status=503)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, self.llm.check_health),
                                   _HEALTH_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001
            return web.json_response({"status": "unhealthy", "error": first_line(err)}, status=503)
        return web.json_response({"status": "ok"})

    async def live(self, request: web.Request) -> web.Response:
        if self.engine_dead_for_good:
            return web.json_response({"status": "dead", "error": self.weights["error"]}, status=503)
        return web.json_response({"status": "alive"})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    # ---- admin weights API -------------------------------------------------------------------------
    def _authorize(self, request: web.Request) -> None:
        token = os.environ.get(ADMIN_TOKEN_ENV) or _read_token(self.admin_token_file)
        if not token:
            raise APIError(403, f"the admin API is disabled: no admin token configured (set {ADMIN_TOKEN_ENV} or "
                                "--admin-token-file)", type="permission_error")
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise APIError(401, "missing or wrong bearer token", type="authentication_error")

    async def get_weights(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return web.json_response(self.weights)

    async def post_weights(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("revision"), str) or not body["revision"]:
            raise bad_request("'revision' is required (a non-empty string)", "revision")
        uri = body.get("uri")
        if uri is not None and (not isinstance(uri, str) or not uri):
            raise bad_request("'uri' must be a non-empty string", "uri")
        if self.weights["state"] == "loading":
            raise APIError(409, "a weights load is already in progress", type="conflict")
        self._raise_if_engine_down()
        revision, uri = body["revision"], uri or self.weights["uri"]
        if self.weights["state"] == "ready" and (revision, uri) == (self.weights["revision"], self.weights["uri"]):
            return web.json_response({"revision": revision, "state": "ready"})
        self.weights.update(state="loading", error=None)
        self._weight_task = asyncio.create_task(self._load_weights(uri, revision))
        return web.json_response({"revision": revision, "state": "loading"}, status=202)

    async def rollout_control(self, control: RolloutControl, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await _json_body(request) if request.can_read_body else {}
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        fields = {**control.required, **control.optional}
        unknown = sorted(body.keys() - fields.keys())
        if unknown:
            raise bad_request(f"unknown field '{unknown[0]}'; this route takes {sorted(fields) or 'none'}", unknown[0])
        for name, kind in fields.items():
            if name not in body:
                if name in control.required:
                    raise bad_request(f"'{name}' is required ({kind.__name__})", name)
            elif not isinstance(body[name], kind) or isinstance(body[name], bool):
                raise bad_request(f"'{name}' must be {kind.__name__}, got {type(body[name]).__name__}", name)
        llm = self._ready_llm()
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(getattr(llm, control.method), **body))
        except (ValueError, TypeError) as err:   # the engine's refusal of these arguments (a RayTaskError is one)
            raise bad_request(first_line(err)) from None
        return web.json_response({"status": "ok"})

    async def drain(self, reason: str) -> float:
        """Leaves the endpoints and lets requests in flight finish (see the class); returns the seconds it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.draining = reason
        log.info("draining (%s): %d request(s) in flight", reason, self.in_flight)
        await asyncio.sleep(min(self.unready_delay_s, self.drain_s))
        while self.in_flight and loop.time() - started < self.drain_s:
            await asyncio.sleep(0.1)
        if self.in_flight:
            log.warning("drained for %.0fs; %d request(s) still in flight", self.drain_s, self.in_flight)
        return loop.time() - started

    async def _load_weights(self, uri: str, revision: str) -> None:
        llm = self.llm   # a restart may replace it meanwhile: this load was for this one
        try:
            # Requests running now finish on the weights they started with; new ones go to other replicas.
            await self.drain(f"loading weights {revision}")
            await asyncio.get_running_loop().run_in_executor(None, llm.update_weights, uri, revision)
        except Exception as err:  # noqa: BLE001 - reported through GET; the old weights keep serving
            log.exception("loading weights %s (revision %s) failed", uri, revision)
            if self.weights["state"] == "loading":   # else the engine died and its restart reports on it
                self.weights.update(state="failed", error=f"{type(err).__name__}: {err}")
        else:
            log.info("now serving weights %s (revision %s)", uri, revision)
            self.weights.update(state="ready", revision=revision, uri=uri, error=None)
        finally:
            self.draining = None

    # ---- engine restarts ---------------------------------------------------------------------------
    async def keep_engine_alive(self, build_llm, max_restarts: int, window_s: float) -> None:
        """Runs while the LLM serves; restarts it when it dies (see the class), at most max_restarts times in
        any window_s seconds. build_llm(uri, revision) builds a new LLM (blocking). Returns once it gave up."""
        while True:
            await asyncio.sleep(_ENGINE_CHECK_INTERVAL_S)
            try:
                self.llm.check_alive()
            except EngineDeadError as err:
                log.error("the engine died: %s", first_line(err))
                if not await self._restart_engine(first_line(err), build_llm, max_restarts, window_s):
                    return
                continue
            if (leaving := self.llm.worker_leaving()) and not self.draining:
                if not await self._move_engine(*leaving, build_llm, max_restarts, window_s):
                    return

    async def _move_engine(self, why: str, node_id: str, build_llm, max_restarts: int, window_s: float) -> bool:
        """A worker's pod is stopping (a node drain, a deleted pod): the replica leaves the endpoints and finishes
        its requests while that worker still serves, then its engine restarts once the worker's Ray node is gone
        (so that the new workers are not placed on it), on the pod that KubeRay creates instead."""
        log.warning("%s: draining, then restarting the engine without it", why)
        await self.drain(why)
        try:
            return await self._restart_engine(why, build_llm, max_restarts, window_s, leaving_node=node_id)
        finally:
            self.draining = None

    async def _wait_until_gone(self, node_id: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + _LEAVING_NODE_TIMEOUT_S
        while await loop.run_in_executor(None, node_alive, node_id):
            if time.monotonic() > deadline:
                log.warning("Ray node %s is still alive %.0fs after its workers stopped; restarting anyway",
                            node_id, _LEAVING_NODE_TIMEOUT_S)
                return
            await asyncio.sleep(0.5)

    async def _restart_engine(self, cause: str, build_llm, max_restarts: int, window_s: float,
                              leaving_node: str | None = None) -> bool:
        """True once a new LLM serves; False when the restarts are used up (the engine stays dead)."""
        loop = asyncio.get_running_loop()
        died_at = time.monotonic()
        dead, self.llm = self.llm, None
        restarting = self._begin_restart(cause, max_restarts, window_s)
        try:   # frees its GPUs and placement group for the new workers
            await _to_the_end(loop.run_in_executor(None, dead.shutdown))
        except Exception:  # noqa: BLE001 - a restart is still worth trying
            log.exception("shutting down the dead engine failed")
        if leaving_node and restarting:
            await self._wait_until_gone(leaving_node)
        backoff = _FIRST_RESTART_BACKOFF_S
        while restarting:
            build = loop.run_in_executor(None, build_llm, self.weights["uri"], self.weights["revision"])
            try:
                llm = await _to_the_end(build)
            except asyncio.CancelledError:   # stopping: the new workers must not outlive this process
                if build.exception() is None:
                    await _to_the_end(loop.run_in_executor(None, build.result().shutdown))
                raise
            except Exception as err:  # noqa: BLE001 - counted; tried again after the back-off
                cause = f"restarting the engine failed: {first_line(err)}"
                log.error("%s", cause)
                restarting = self._begin_restart(cause, max_restarts, window_s)
                if restarting:
                    await asyncio.sleep(backoff)
                    backoff *= 2
                continue
            self.set_llm(llm)
            log.info("serving again, %.1fs after the engine died", time.monotonic() - died_at)
            return True
        return False

    def _begin_restart(self, cause: str, max_restarts: int, window_s: float) -> bool:
        """Counts one more restart and reports "restarting" when the window allows it; else reports "failed"
        and leaves the engine dead (/live 503)."""
        while self._restart_times and time.monotonic() - self._restart_times[0] > window_s:
            self._restart_times.popleft()
        if len(self._restart_times) >= max_restarts:
            log.error("gave up restarting the engine (%d restart(s) within %.0fs are allowed); /live fails now so "
                      "that the container is restarted: %s", max_restarts, window_s, cause)
            self.weights.update(state="failed", error=cause)
            self.engine_dead_for_good = True
            return False
        self._restart_times.append(time.monotonic())
        self.weights.update(state="restarting", error=cause, restarts=self.weights["restarts"] + 1)
        self.metrics.engine_restarts.inc()
        log.warning("restarting the engine on %s (revision %s): restart %d of %d within %.0fs", self.weights["uri"],
                    self.weights["revision"], len(self._restart_times), max_restarts, window_s)
        return True


async def _to_the_end(future: asyncio.Future):
    """Awaits an executor future; when cancelled meanwhile, still waits for it (its thread cannot be stopped)
    before the cancellation goes on, so what it started can be cleaned up."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


class _ClientGone(Exception):
    def __init__(self, response: web.StreamResponse):
        super().__init__("the client disconnected")
        self.response = response


def _application(routes) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_answer_errors])
    app.add_routes(routes)
    app.on_response_prepare.append(_tag_request_id)
    return app


@web.middleware
async def _answer_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error in OpenAI's shape: APIErrors, aiohttp's own (unknown route, wrong method) and the rest."""
    request[REQUEST_ID] = uuid.uuid4().hex
    try:
        return await handler(request)
    except APIError as err:
        error = err
    except web.HTTPException as err:
        if err.status < 400:
            raise
        allow = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
        error = APIError(err.status, f"{err.reason}: {request.method} {request.path}",
                         code=err.reason.lower().replace(" ", "_"), headers=allow)
    except Exception:  # noqa: BLE001
        error = _internal_error(request)
    return web.json_response(error.body(), status=error.status, headers=error.headers)


async def _tag_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]


def _engine_error(request: web.Request, err: Exception) -> APIError:
    """Call in an except block: what a failure of the engine on a request answers."""
    if isinstance(err, InvalidRequestError):
        return bad_request(str(err), err.param)
    if isinstance(err, EngineDeadError):   # the executor logged why (it can hold a traceback)
        return APIError(503, "this replica's engine has failed; retry on another replica",
                        type="service_unavailable", code="engine_unavailable")
    return _internal_error(request)


def _internal_error(request: web.Request) -> APIError:
    """Call in an except block: the exception is logged under the request's id, the client gets the id only."""
    log.exception("request %s failed", request[REQUEST_ID])
    return APIError(500, f"internal server error (request id {request[REQUEST_ID]})", type="internal_error",
                    code="internal_error")


def _decoder(llm):
    """A token id's own text, as logprobs name tokens."""
    return lambda token_id: llm.tokenizer.decode([token_id])


def _token_id_name(token_id: int) -> str:
    """vLLM's name of a token under return_tokens_as_token_ids: an RL trainer reads back the exact ids."""
    return f"token_id:{token_id}"


def first_line(err: BaseException) -> str:
    """An error's first line: the executor's errors go on with a worker's traceback, not for clients. An error a
    worker raised (Ray's RayTaskError, whose text starts with the actor's call and pid) is named by itself."""
    if isinstance(err, RayTaskError) and err.cause is not None:
        cause = err.cause
        return f"{type(cause).__name__}: {str(cause).partition(chr(10))[0]}"
    return str(err).partition("\n")[0] or type(err).__name__


async def _json_body(request: web.Request):
    try:
        text = (await request.read()).decode()   # JSON is UTF-8 (RFC 8259), whatever the charset says
        body = json.loads(text)
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(body, ensure_ascii=False).encode()   # raises on a lone surrogate (a valid pair is fine)
        return body
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    except UnicodeEncodeError:
        raise bad_request("the request body holds a lone surrogate (\\ud800-\\udfff): not valid Unicode") from None
    except ValueError as err:   # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise bad_request(f"the request body is not valid JSON: {err}") from None


def _read_token(path: str | None) -> str | None:
    try:
        return Path(path).read_text().strip() if path else None
    except OSError:
        return None
