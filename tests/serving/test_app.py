"""The server's aiohttp apps in-process, before a model is loaded: the probes, the admin port's routes, the
model card by id and /version; /tokenize with a tokenizer alone: chat_template_kwargs reach the template; and
engine restarts whose new LLM fails to build (stand-in LLMs: a real one is test_self_heal's)."""
import asyncio
import time
from types import SimpleNamespace

from aiohttp.test_utils import TestClient, TestServer
from ray.exceptions import RayTaskError
from transformers import AutoTokenizer

import rayprism
from rayprism.executor import EngineDeadError
from rayprism.server.app import Server, first_line
from tests.serving.helpers import smollm2_folder


def loading_server() -> Server:
    return Server(served_model_name="tiny", model_uri="file:///nowhere", revision=None, max_in_flight=4,
                  admin_token_file=None)


async def test_loading_is_alive_but_not_ready():
    async with TestClient(TestServer(loading_server().app())) as client:
        assert (await client.get("/live")).status == 200
        health = await client.get("/health")
        assert health.status == 503 and (await health.json())["status"] == "loading"
        response = await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert response.status == 503 and (await response.json())["error"]["code"] == "model_not_ready"


async def test_admin_routes_live_on_the_admin_app_only():
    server = loading_server()
    async with TestClient(TestServer(server.app())) as openai_port, \
            TestClient(TestServer(server.admin_app())) as admin_port:
        assert (await openai_port.get("/admin/v1/weights")).status == 404
        response = await admin_port.get("/admin/v1/weights")    # reached: no token configured
        assert response.status == 403 and (await response.json())["error"]["type"] == "permission_error"
        assert (await admin_port.get("/live")).status == 404


async def test_model_card_by_id_and_version():
    server = Server(served_model_name="org/tiny", model_uri="file:///nowhere", revision=None, max_in_flight=4,
                    admin_token_file=None)
    async with TestClient(TestServer(server.app())) as client:
        card = await (await client.get("/v1/models/org/tiny")).json()
        assert card == (await (await client.get("/v1/models")).json())["data"][0]
        response = await client.get("/v1/models/gpt-4")
        error = (await response.json())["error"]
        assert response.status == 404 and (error["code"], error["param"]) == ("model_not_found", "model")
        assert await (await client.get("/version")).json() == {"version": rayprism.__version__}


async def test_chat_template_kwargs_reach_the_template():
    """SmolLM2's template reads no extra variable: this one does (/tokenize and chat share the tokenising)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    tokenizer.chat_template = "{{ greeting | default('none') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    server = loading_server()
    server.set_llm(SimpleNamespace(tokenizer=tokenizer, max_model_len=512))
    async with TestClient(TestServer(server.app())) as client:
        async def tokens(**fields):
            body = {"messages": [{"role": "user", "content": " there"}], **fields}
            return (await (await client.post("/tokenize", json=body)).json())["tokens"]
        assert await tokens() == tokenizer("none there", add_special_tokens=False)["input_ids"]
        assert await tokens(chat_template_kwargs={"greeting": "Hello"}) == \
            tokenizer("Hello there", add_special_tokens=False)["input_ids"]


class StandInLLM:
    def __init__(self, dead: bool):
        self.dead, self.shut_down = dead, False

    def check_alive(self) -> None:
        if self.dead:
            raise EngineDeadError("worker rank 0 died: killed\nits traceback")

    def shutdown(self) -> None:
        self.shut_down = True

    def stats(self) -> dict:
        return {}


def builder(outcomes: list):
    """build_llm(uri, revision): each call takes the next outcome, raising it if it is an exception."""
    calls = []

    def build(uri, revision):
        calls.append((time.monotonic(), uri, revision))
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    return build, calls


async def test_a_failed_restart_counts_and_is_retried_after_a_back_off():
    server, dead, healed = loading_server(), StandInLLM(dead=True), StandInLLM(dead=False)
    server.set_llm(dead)
    build, calls = builder([RuntimeError("no resources within 300s\ndetails"), healed])
    keeper = asyncio.create_task(server.keep_engine_alive(build, 2, 600))
    while server.llm is not healed:
        await asyncio.sleep(0.05)
    keeper.cancel()
    assert dead.shut_down and [c[1:] for c in calls] == [("file:///nowhere", None)] * 2
    assert calls[1][0] - calls[0][0] >= 2       # the back-off
    assert server.weights == {"revision": None, "uri": "file:///nowhere", "state": "ready", "error": None,
                              "restarts": 2}
    assert b"rayprism_engine_restarts_total 2.0" in server.metrics.render()


async def test_restarts_used_up_by_failed_builds_leave_the_engine_dead():
    server = loading_server()
    server.set_llm(StandInLLM(dead=True))
    build, calls = builder([RuntimeError("no resources within 300s\ndetails")])
    await asyncio.wait_for(server.keep_engine_alive(build, 1, 600), 10)   # returns once it gave up
    assert len(calls) == 1 and server.llm is None
    assert server.weights["state"] == "failed" and server.weights["restarts"] == 1
    assert server.weights["error"] == "restarting the engine failed: no resources within 300s"
    async with TestClient(TestServer(server.app())) as client:
        live = await client.get("/live")
        assert live.status == 503 and (await live.json())["status"] == "dead"
        response = await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert response.status == 503 and (await response.json())["error"]["code"] == "engine_unavailable"


async def test_no_restart_allowed_fails_at_once():
    server = loading_server()
    server.set_llm(StandInLLM(dead=True))
    build, calls = builder([])
    await asyncio.wait_for(server.keep_engine_alive(build, 0, 600), 10)
    assert not calls and server.engine_dead_for_good
    assert server.weights["error"] == "worker rank 0 died: killed" and server.weights["restarts"] == 0


def test_an_error_a_worker_raised_is_named_by_itself():
    """A model that cannot be loaded any more fails in the worker: the line the server logs last (the pod's
    termination message, which the operator shows) names that error, not Ray's actor call, pid and colours."""
    missing = FileNotFoundError(2, "No such file or directory", "/models/v3")
    raised = RayTaskError("RayGPUWorker.start", "Traceback (most recent call last):\n...", missing,
                          proctitle="ray::RayGPUWorker.start()", pid=7248, ip="10.214.0.6").as_instanceof_cause()
    assert str(raised).startswith("\x1b[36mray::RayGPUWorker.start()")
    assert first_line(raised) == "FileNotFoundError: [Errno 2] No such file or directory: '/models/v3'"
    assert first_line(EngineDeadError("worker rank 0 died: gone\ntraceback")) == "worker rank 0 died: gone"
