"""`rayprism serve`: start (or join) Ray, load one model replica, serve it over HTTP until SIGINT/SIGTERM."""
from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import time

from aiohttp import web

from rayprism.server.app import Server, first_line
from rayprism.server.tools import PARSER_CHOICES

log = logging.getLogger("rayprism.serve")

DEFAULT_ADMIN_TOKEN_FILE = "/etc/rayprism/admin/token"
_PROGRESS_EVERY_S = 5


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", required=True, help="model URI: path, file://, hf://org/name or builtin://...; may hold {revision}")
    add("--served-model-name", required=True, help="the name clients pass as 'model'")
    add("--model-revision", default=None, help="weights revision (fills {revision}; the hf revision for hf://)")
    add("--tokenizer", default=None, help="tokenizer URI (default: the model's)")
    add("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    add("--device", default="auto", choices=["auto", "cuda", "cpu"])
    add("--tensor-parallel-size", type=_positive_int, default=1)
    add("--pipeline-parallel-size", type=_positive_int, default=1)
    add("--max-model-len", type=_positive_int, default=None)
    add("--max-num-seqs", type=_positive_int, default=256)
    add("--max-num-batched-tokens", type=_positive_int, default=8192)
    add("--kv-cache-memory-fraction", type=float, default=0.9)
    add("--enforce-eager", action="store_true", help="no CUDA graphs")
    add("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
        help="do not reuse the KV blocks of prompt prefixes other requests computed (on by default)")
    add("--quantization", default=None, choices=["fp8"],
        help="fp8: e4m3 weights, quantized at load from a bf16 checkpoint, or an FP8 checkpoint as it is")
    add("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="auto: the model's dtype")
    add("--max-queue-size", type=_non_negative_int, default=1024,
        help="requests admitted beyond --max-num-seqs before answering 429")
    add("--tool-call-parser", default="auto", choices=PARSER_CHOICES,
        help="how tool calls are found in replies to tool_choice 'auto' (the default when a request has tools): "
             "'auto' picks the format from the chat template (or the model type), 'none' refuses tool_choice "
             "'auto' with a 400, or a format: hermes (Qwen2.5, Qwen3, Hermes), llama3_json (Llama 3.1-3.3). "
             "tool_choice 'required' and named functions work without one (the grammar enforces them)")
    add("--host", default="0.0.0.0")
    add("--port", type=int, default=8000, help="the OpenAI API, /health, /live and /metrics")
    add("--admin-port", type=int, default=8001,
        help="the admin weights API (/admin/v1/weights), and nothing else; 0: no admin API")
    add("--ray-address", default="auto",
        help="'auto' joins the Ray cluster of this node, 'local' starts one, or a Ray address (host:port)")
    add("--drain-seconds", type=_non_negative_float, default=30.0,
        help="on SIGTERM and before a weights load: stop reporting ready, then keep serving until no request "
             "is in flight, at most this long")
    add("--unready-delay-seconds", type=_non_negative_float, default=5.0,
        help="while draining, serve at least this long after /health turned 503, so the Service's endpoints "
             "drop the replica before it stops (the readiness probe's period times its failure threshold)")
    add("--admin-token-file", default=DEFAULT_ADMIN_TOKEN_FILE,
        help="bearer token file of the admin API (env RAYPRISM_ADMIN_TOKEN takes precedence)")
    add("--engine-restarts", type=_non_negative_int, default=3,
        help="when the engine dies (a worker died or stopped answering), restart it in this process: new workers "
             "on the same Ray cluster, with the weights revision served last; at most this many restarts (failed "
             "ones included) within --engine-restart-window-seconds, then /live fails so that the kubelet "
             "restarts the container; 0: never restart the engine in place")
    add("--engine-restart-window-seconds", type=_positive_float, default=600.0,
        help="the window in which --engine-restarts are counted")


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def serve(args: argparse.Namespace, on_ready=None) -> int:
    """Runs until SIGINT/SIGTERM; returns 0, or 1 when the model cannot be loaded.
    on_ready(url) is called once the model serves (`rayprism run` prints the endpoint)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(args, on_ready))


def _on_stop_signal(stop: asyncio.Event) -> None:
    # Ray's driver installs absl's failure signal handler, which on SIGTERM arms a 3-second alarm that
    # aborts the process (for crashes that hang): cancel it, the drain takes longer by design.
    signal.alarm(0)
    stop.set()


async def _serve(args: argparse.Namespace, on_ready) -> int:
    server = Server(served_model_name=args.served_model_name, model_uri=args.model, revision=args.model_revision,
                    max_in_flight=args.max_num_seqs + args.max_queue_size, admin_token_file=args.admin_token_file,
                    drain_s=args.drain_seconds, unready_delay_s=args.unready_delay_seconds,
                    tool_call_parser=args.tool_call_parser)
    # Cancel handlers whose client went away, so a disconnected request is aborted in the engine.
    runners = [web.AppRunner(server.app(), handler_cancellation=True, access_log=None)]
    if args.admin_port:
        runners.append(web.AppRunner(server.admin_app(), access_log=None))
    for runner, port in zip(runners, (args.port, args.admin_port)):
        await runner.setup()
        await web.TCPSite(runner, args.host, port).start()
    log.info("listening on http://%s:%d (health is 503 until the model is loaded), %s", args.host, args.port,
             f"admin API on port {args.admin_port}" if args.admin_port else "no admin API")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_stop_signal, stop)
    llm = None
    stopped = asyncio.ensure_future(stop.wait())
    keeper = None
    try:
        load = loop.run_in_executor(None, _load_llm, args, args.model, args.model_revision)
        while not (await asyncio.wait([load, stopped], timeout=_PROGRESS_EVERY_S,
                                      return_when=asyncio.FIRST_COMPLETED))[0]:
            log.info("loading %s on %d worker(s)...", args.model, args.tensor_parallel_size)
        if not load.done():   # interrupted while loading: let the load finish so its workers can be shut down
            log.info("interrupted while loading; stopping")
            llm = await _finish_load(load)
            return 0
        try:
            llm = load.result()
        except Exception as err:  # noqa: BLE001 - the process exits non-zero; the pod restarts
            log.info("the model's load failed", exc_info=err)
            log.error("could not load the model: %s", first_line(err))   # last: the pod's termination message
            return 1
        server.set_llm(llm)
        keeper = asyncio.create_task(server.keep_engine_alive(
            functools.partial(_load_llm, args), args.engine_restarts, args.engine_restart_window_seconds))
        log.info("serving '%s' (%s) at http://%s:%d/v1", args.served_model_name, args.model, args.host, args.port)
        if on_ready:
            on_ready(f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}")
        await stopped
        await _stop_task(keeper)   # no engine restart while stopping; one under way finishes and is shut down
        # SIGTERM (a scale-down, a replacement): leave the endpoints, finish what is in flight, then close.
        await server.drain("shutting down")
        return 0
    finally:
        log.info("shutting down")
        stopped.cancel()
        if keeper is not None:
            await _stop_task(keeper)
        for runner in runners:
            await runner.cleanup()
        if server.llm is not None:   # an engine restart may have replaced the first LLM
            llm = server.llm
        if llm is not None:
            await loop.run_in_executor(None, llm.shutdown)


async def _stop_task(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.wait([task])


async def _finish_load(load):
    try:
        return await load
    except Exception:  # noqa: BLE001 - nothing to shut down then
        return None


def _load_llm(args: argparse.Namespace, model: str, revision: str | None):
    """An LLM of model at revision with the other flags; its wait for Ray's resources is bounded by LLM's
    startup_timeout_s (a worker node that is being recreated may take a minute or two)."""
    import ray

    from rayprism.llm import LLM

    if not ray.is_initialized():
        ray.init(address=args.ray_address)
    started = time.monotonic()
    llm = LLM(model, revision=revision, tokenizer=args.tokenizer, dtype=args.dtype,
              device=args.device, tensor_parallel_size=args.tensor_parallel_size,
              pipeline_parallel_size=args.pipeline_parallel_size, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_fraction=args.kv_cache_memory_fraction, enforce_eager=args.enforce_eager,
              enable_prefix_caching=args.enable_prefix_caching, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype)
    llm.tokenizer  # noqa: B018 - fetch it now, not on the first request
    log.info("model loaded in %.1fs", time.monotonic() - started)
    return llm
