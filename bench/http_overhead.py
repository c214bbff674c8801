"""What the HTTP layer costs our streamed completions: aiohttp (our server's) against FastAPI on uvicorn, and
what building one streamed chunk costs: today's dict + json.dumps against the pydantic response models.

    .venv/bin/python bench/http_overhead.py [--tokens 64] [--concurrency 64 256] [--seconds 5]

FastAPI and uvicorn are not dependencies of rayprism; for this benchmark only:
    .venv/bin/pip install fastapi 'uvicorn[standard]'     # [standard]: uvloop and httptools, as usually deployed
A server whose packages are missing is skipped (and said so).

The "chunk" part times, per chunk in µs, building and serialising one SSE chunk of a chat stream (and of a
completions stream, and of a chat stream with logprobs) the way app.py does, then through the pydantic models
of server/protocol.py (validated, and model_construct'ed without validation).

The "http" part serves the same tiny streaming endpoint, /v1/chat/completions, from each server in its own
process: the handler reads and parses the body with protocol.parse_request, then streams a fake engine's
tokens (no model: each token after one event-loop turn) as SSE chunks built by protocol.choice and
protocol.envelope and json.dumps, then "data: [DONE]", as app.py does. An aiohttp client in this process keeps
C streams going (C = --concurrency), each request after the last on its connection, for --seconds after a
warm-up. The client reads raw bytes and counts events, far cheaper than the server's work per chunk, so that
the server saturates a core (server_cpu_util near 1: the figures are the server's, not the client's).
Reported per run: streamed chunks/s and requests/s (what the client received), the server process's CPU per
request and per chunk, time to first chunk and request latency, and the machine's other busy CPUs (the
kernel's networking, and other users' work: the development machine is shared). The runs are interleaved over the servers,
--rounds times, and the summary takes each server's best round. The per-request overhead is measured with
1-token streams (one chunk and [DONE]); the cost of one more chunk is (cpu/request at T tokens - cpu/request
at 1 token) / (T - 1). "fastapi-uvicorn-asyncio" (plain uvicorn: h11, asyncio) runs when named in --servers.

Writes bench/results/http-overhead-<date>.json with machine, command, commit and date.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench"
SERVERS = {   # name -> (framework, event loop, HTTP parser), the packages it needs
    "aiohttp": (("aiohttp", "asyncio", "aiohttp's C parser (as served today)"), ["aiohttp"]),
    "aiohttp-uvloop": (("aiohttp", "uvloop", "aiohttp's C parser"), ["aiohttp", "uvloop"]),
    "fastapi-uvicorn": (("fastapi", "uvloop", "httptools (uvicorn[standard], as vLLM serves)"),
                        ["fastapi", "uvicorn", "uvloop", "httptools"]),
    "fastapi-uvicorn-asyncio": (("fastapi", "asyncio", "h11 (plain uvicorn)"), ["fastapi", "uvicorn"]),
}


def missing(packages: list[str]) -> list[str]:
    return [p for p in packages if importlib.util.find_spec(p) is None]


# ---- the served endpoint (the same for every server) ---------------------------------------------------
async def fake_engine(tokens: int):
    """A token per event-loop turn, as outputs arriving from the engine's task would."""
    for i in range(tokens):
        await asyncio.sleep(0)
        yield f" tok{i}", ("length" if i == tokens - 1 else None)


async def sse_chunks(req, tokens: int):
    """app.py's _stream: one chunk per output, then [DONE]."""
    from rayprism.server import protocol

    first = True
    async for text, finish_reason in fake_engine(tokens):
        choice = protocol.choice(req, text, finish_reason, None, delta=True, first=first)
        yield f"data: {json.dumps(protocol.envelope(req, MODEL, [choice], chunk=True))}\n\n".encode()
        first = False
    yield b"data: [DONE]\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def serve_aiohttp(port: int, uvloop: bool) -> None:
    from aiohttp import web

    from rayprism.server import protocol

    async def chat(request: web.Request) -> web.StreamResponse:
        req = protocol.parse_request(await request.json(), chat=True)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **SSE_HEADERS})
        try:
            await response.prepare(request)
            async for chunk in sse_chunks(req, req.params.max_tokens):
                await response.write(chunk)
        except ConnectionResetError:     # the client left (at the end of a run), as app.py handles it
            pass
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)    # as server/cli.py
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    if uvloop:
        import uvloop as loop_module
        loop_module.run(main())
    else:
        asyncio.run(main())


def serve_fastapi(port: int, uvloop: bool) -> None:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    from rayprism.server import protocol

    async def chat(request):
        req = protocol.parse_request(await request.json(), chat=True)
        return StreamingResponse(sse_chunks(req, req.params.max_tokens), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    chat.__annotations__ = {"request": Request}    # FastAPI's way to hand the raw request (no body model)
    app = FastAPI()
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                loop="uvloop" if uvloop else "asyncio", http="httptools" if uvloop else "h11")


def serve(name: str, port: int) -> None:
    (framework, loop, _), _ = SERVERS[name]
    (serve_aiohttp if framework == "aiohttp" else serve_fastapi)(port, loop == "uvloop")


# ---- the client ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinning(pin: bool) -> bool:
    return pin and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def start_server(name: str, port: int, pin: bool) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, __file__, "--serve", name, "--port", str(port)])
    if pinning(pin):
        os.sched_setaffinity(process.pid, {0})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the {name} server exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the {name} server did not listen within 60 s")


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def drive(url: str, server_pid: int, concurrency: int, tokens: int, warmup_s: float, seconds: float) -> dict:
    import aiohttp

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True}
    measuring = False
    done = {"requests": 0, "chunks": 0, "errors": 0}
    first_chunk_s, latency_s = [], []

    async def worker(session: aiohttp.ClientSession) -> None:
        """Counts events ("\n\n"-terminated) in raw reads: far cheaper than parsing lines, so that one client
        core can keep a server core busy."""
        while True:
            started, first, events, last = time.perf_counter(), None, 0, b""
            try:
                async with session.post(url, json=body) as response:
                    async for data in response.content.iter_any():
                        first = first or time.perf_counter()
                        new = (last[-1:] + data).count(b"\n\n")
                        events += new
                        done["chunks"] += measuring * new
                        last = data
            except aiohttp.ClientError:
                done["errors"] += 1
                continue
            if not last.endswith(b"data: [DONE]\n\n"):
                done["errors"] += measuring
            elif measuring:
                done["chunks"] -= 1     # [DONE] is no chunk
                done["requests"] += 1
                first_chunk_s.append(first - started)
                latency_s.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        await asyncio.sleep(warmup_s)
        measuring, cpu_before, started = True, cpu_seconds(server_pid), time.perf_counter()
        client_before, busy_before = time.process_time(), busy_seconds()
        await asyncio.sleep(seconds)
        measuring, cpu_used, elapsed = False, cpu_seconds(server_pid) - cpu_before, time.perf_counter() - started
        client_used, busy = time.process_time() - client_before, busy_seconds() - busy_before
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    def ms(values: list[float], q: float) -> float | None:
        return round(1000 * statistics.quantiles(values, n=100)[q - 1], 2) if len(values) >= 2 else None

    return {"concurrency": concurrency, "tokens": tokens, "seconds": round(elapsed, 2),
            "requests": done["requests"], "errors": done["errors"],
            "requests_per_s": round(done["requests"] / elapsed, 1), "chunks_per_s": round(done["chunks"] / elapsed),
            "server_cpu_util": round(cpu_used / elapsed, 3), "client_cpu_util": round(client_used / elapsed, 3),
            # the rest of the machine's busy CPUs: the kernel's networking, and other users' work
            "other_busy_cpus": round((busy - cpu_used - client_used) / elapsed, 2),
            "server_cpu_us_per_request": round(1e6 * cpu_used / max(done["requests"], 1), 1),
            "server_cpu_us_per_chunk": round(1e6 * cpu_used / max(done["chunks"], 1), 2),
            "first_chunk_ms_p50": ms(first_chunk_s, 50), "first_chunk_ms_p99": ms(first_chunk_s, 99),
            "latency_ms_p50": ms(latency_s, 50), "latency_ms_p99": ms(latency_s, 99)}


def http_part(args) -> list[dict]:
    """Every server up at once; the runs interleaved over the servers, round after round, so that a burst of
    other load on the machine falls on all of them alike."""
    if pinning(args.pin):
        os.sched_setaffinity(0, {1})
    loop_runner = asyncio.run
    if importlib.util.find_spec("uvloop"):   # the same client for every server: the fastest one here
        import uvloop
        loop_runner = uvloop.run
    results, processes = [], {}
    try:
        for name in args.servers:
            if lacking := missing(SERVERS[name][1]):
                print(f"{name}: skipped, {', '.join(lacking)} not installed (see this script's docstring)")
                results.append({"server": name, "skipped": f"{', '.join(lacking)} not installed"})
                continue
            port = free_port()
            processes[name] = (port, start_server(name, port, args.pin))
        runs = [(c, args.tokens) for c in args.concurrency] + [(args.concurrency[0], 1)]
        for round_ in range(args.rounds):
            for concurrency, tokens in runs:
                for name, (port, process) in processes.items():
                    framework, loop, parser = SERVERS[name][0]
                    run = loop_runner(drive(f"http://127.0.0.1:{port}/v1/chat/completions", process.pid,
                                            concurrency, tokens, args.warmup, args.seconds))
                    run = {"server": name, "framework": framework, "loop": loop, "http_parser": parser,
                           "round": round_, **run}
                    print(json.dumps(run))
                    results.append(run)
    finally:
        for _, process in processes.values():
            process.terminate()
            process.wait(10)
    return results


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all processes, the kernel's included)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")   # less idle and iowait


def summary(http: list[dict], tokens: int) -> dict:
    """Per server and run shape, the best round (the most chunks/s, the least CPU per request: other load only
    ever lowers the one and raises the other), and from the best rounds the CPU of a request of one chunk
    and of each further chunk."""
    out = {}
    for name in dict.fromkeys(r["server"] for r in http if "skipped" not in r):
        runs = [r for r in http if r["server"] == name]
        shapes = {}
        for r in runs:
            key = f"{r['concurrency']} streams x {r['tokens']} tokens"
            best = shapes.setdefault(key, {"chunks_per_s": 0, "requests_per_s": 0,
                                           "server_cpu_us_per_request": float("inf")})
            best["chunks_per_s"] = max(best["chunks_per_s"], r["chunks_per_s"])
            best["requests_per_s"] = max(best["requests_per_s"], r["requests_per_s"])
            best["server_cpu_us_per_request"] = min(best["server_cpu_us_per_request"],
                                                    r["server_cpu_us_per_request"])
        one = min(r["server_cpu_us_per_request"] for r in runs if r["tokens"] == 1)
        many = min(r["server_cpu_us_per_request"] for r in runs if r["tokens"] == tokens)
        out[name] = {"best_rounds": shapes, "cpu_us_per_request_of_1_chunk": one,
                     "cpu_us_per_further_chunk": round((many - one) / (tokens - 1), 2)}
    return out


# ---- building one chunk --------------------------------------------------------------------------------
def chunk_part(number: int, repeat: int) -> dict:
    from rayprism.server import protocol
    from rayprism.server.protocol import (ChatChunkChoice, ChatCompletionChunk, ChatLogprobs, ChatTokenLogprob,
                                          ChatTopLogprob, CompletionChoice, CompletionChunk, DeltaMessage)

    chat = protocol.parse_request({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, chat=True)
    completion = protocol.parse_request({"model": MODEL, "prompt": "hi"}, chat=False)
    text = " token"
    entries = [{"token_id": 7, "logprob": -0.25, "top": {7: -0.25, 8: -1.5, 9: -2.0, 10: -3.0, 11: -4.5},
                "text_offset": 3}]
    decode = lambda token_id: f" t{token_id}"   # noqa: E731

    def frame(data: str) -> bytes:
        return f"data: {data}\n\n".encode()

    def dict_chat(logprobs=None):
        choice = protocol.choice(chat, text, None, logprobs, delta=True)
        return frame(json.dumps(protocol.envelope(chat, MODEL, [choice], chunk=True)))

    def dict_completion():
        choice = protocol.choice(completion, text, None, None, delta=True)
        return frame(json.dumps(protocol.envelope(completion, MODEL, [choice], chunk=True)))

    def dict_chat_logprobs():
        return dict_chat(protocol.chat_logprobs(entries, decode))

    def model_chat(logprobs=None):
        chunk = ChatCompletionChunk(id=chat.id, object="chat.completion.chunk", created=chat.created, model=MODEL,
                                    choices=[ChatChunkChoice(index=0, delta=DeltaMessage(content=text),
                                                             logprobs=logprobs, finish_reason=None)])
        return frame(chunk.model_dump_json(exclude_unset=True))

    def model_completion():
        chunk = CompletionChunk(id=completion.id, object="text_completion", created=completion.created, model=MODEL,
                                choices=[CompletionChoice(index=0, text=text, logprobs=None, finish_reason=None)])
        return frame(chunk.model_dump_json(exclude_unset=True))

    def model_chat_logprobs():
        def top(token_id, logprob):
            token = decode(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
        logprobs = ChatLogprobs(content=[ChatTokenLogprob(**top(e["token_id"], e["logprob"]), top_logprobs=[
            ChatTopLogprob(**top(t, lp)) for t, lp in e["top"].items()]) for e in entries])
        return model_chat(logprobs)

    def constructed_chat():
        choice = ChatChunkChoice.model_construct(index=0, delta=DeltaMessage.model_construct(content=text),
                                                 logprobs=None, finish_reason=None)
        chunk = ChatCompletionChunk.model_construct(id=chat.id, object="chat.completion.chunk", created=chat.created,
                                                    model=MODEL, choices=[choice])
        return frame(chunk.model_dump_json(exclude_unset=True))

    def validated_dict_chat():
        choice = protocol.choice(chat, text, None, None, delta=True)
        chunk = ChatCompletionChunk.model_validate(protocol.envelope(chat, MODEL, [choice], chunk=True))
        return frame(chunk.model_dump_json(exclude_unset=True))

    parse_body = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "hi"}],
                  "max_tokens": 64, "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
    parse_us = round(1e6 * min(timeit.repeat(lambda: protocol.parse_request(parse_body, chat=True),
                                             number=number // 4, repeat=repeat)) / (number // 4), 2)
    print(f"parse_request of a chat request: {parse_us} µs")
    cases = {
        "chat chunk": {"dict + json.dumps (today)": dict_chat, "pydantic models, validated": model_chat,
                       "pydantic model_construct (no validation)": constructed_chat,
                       "dict, then model_validate + model_dump_json": validated_dict_chat},
        "completions chunk": {"dict + json.dumps (today)": dict_completion,
                              "pydantic models, validated": model_completion},
        "chat chunk with logprobs (top 5)": {"dict + json.dumps (today)": dict_chat_logprobs,
                                             "pydantic models, validated": model_chat_logprobs},
    }
    for functions in cases.values():      # the same JSON either way (whitespace aside)
        shapes = {name: json.loads(fn().removeprefix(b"data: ")) for name, fn in functions.items()}
        assert len({json.dumps(s, sort_keys=True) for s in shapes.values()}) == 1, shapes
    out = {}
    for case, functions in cases.items():
        out[case] = {name: round(1e6 * min(timeit.repeat(fn, number=number, repeat=repeat)) / number, 2)
                     for name, fn in functions.items()}
        print(case, json.dumps(out[case]))
    return {**out, "parse_request (once per request, not per chunk)": parse_us}


# ---- the record ----------------------------------------------------------------------------------------
def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({model}), {memory:.0f} GiB, {platform.system()} {platform.release()}"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("aiohttp", "pydantic", "fastapi", "starlette", "uvicorn", "uvloop", "httptools"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", nargs="+", default=["aiohttp", "aiohttp-uvloop", "fastapi-uvicorn"],
                        choices=list(SERVERS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--tokens", type=int, default=64, help="chunks per stream")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk-iterations", type=int, default=20000)
    parser.add_argument("--skip", choices=["chunk", "http"], action="append", default=[])
    parser.add_argument("--pin", action="store_true",
                        help="server on CPU 0, client on CPU 1 (on the 2-core development VM this halves both: "
                             "each waits for the other's wake-ups; unpinned, the server saturates its core)")
    parser.add_argument("--note", default=None, help="recorded as is (the conditions of the run, say)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--serve", choices=list(SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    chunk = None if "chunk" in args.skip else chunk_part(args.chunk_iterations, 5)
    http = [] if "http" in args.skip else http_part(args)
    date = datetime.date.today()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "worker_image/rayprism/server", "bench"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    record = {
        "what": "bench/http_overhead.py: per streamed chunk, building it as a dict vs through the pydantic "
                "response models (µs); and the same streaming endpoint (a fake engine, chunks shaped like ours) "
                "served by aiohttp and by FastAPI on uvicorn, under concurrent streams of an aiohttp client",
        "machine": machine(),
        "command": " ".join([Path(sys.executable).relative_to(ROOT).as_posix()
                             if Path(sys.executable).is_relative_to(ROOT) else sys.executable, *sys.argv]),
        "commit": commit + (" (with uncommitted changes to the server or bench)" if dirty else ""),
        "date": date.isoformat(),
        "versions": versions(),
        **({"note": args.note} if args.note else {}),
        "chunk_us": chunk,
        "http": http,
        "http_summary": summary(http, args.tokens) if http else None,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"http-overhead-{date:%Y%m%d}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
