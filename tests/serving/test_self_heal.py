"""Engine restarts in place (issue #23): a rank process SIGKILLed under `rayprism serve` fails its requests,
takes the replica out of readiness while /live stays 200, and the server builds new workers on the same Ray
cluster with the weights revision it served last; past --engine-restarts the engine stays dead and /live fails.
SIGTERM during a restart stops cleanly. A new worker's start is held (STALL_FILE) so that the "restarting"
state can be looked at before it ends."""
from __future__ import annotations

import json
import signal
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from rayprism.executor.worker import POD_TERMINATING_FILE_ENV
from tests.serving.helpers import FAULTY_WORKERS_ENV, STALL_FILE, RayNodes, ServeProcess

pytestmark = pytest.mark.slow

MODEL = "tiny"
TOKEN = "heal-token"


@pytest.fixture(scope="module")
def cluster():
    nodes = RayNodes(head_cpus=2)
    yield nodes
    nodes.stop()


@pytest.fixture
def server(cluster, checkpoints):
    """At most one engine restart; its revision template serves checkpoints a and b."""
    template = str(checkpoints["a"]).replace("ckpt-a", "ckpt-{revision}")
    process = ServeProcess(["--model", template, "--model-revision", "a", "--served-model-name", MODEL,
                            "--device", "cpu", "--ray-address", cluster.address, "--unready-delay-seconds", "0.2",
                            "--engine-restarts", "1"],
                           env={**FAULTY_WORKERS_ENV, "RAYPRISM_ADMIN_TOKEN": TOKEN})
    yield process
    STALL_FILE.unlink(missing_ok=True)
    process.stop()


def admin(server, method: str = "GET", **kwargs) -> requests.Response:
    return requests.request(method, f"{server.admin_url}/admin/v1/weights", timeout=30,
                            headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)


def complete(server, prompt: str = "The weights are") -> requests.Response:
    return requests.post(f"{server.url}/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not {what} within {timeout_s}s"
        time.sleep(0.1)
    return result


def kill_the_worker(cluster) -> None:
    [worker] = cluster.worker_processes()
    worker.send_signal(signal.SIGKILL)


def restarting(server) -> dict | None:
    report = admin(server).json()
    return report if report["state"] == "restarting" else None


def test_a_killed_worker_is_replaced_then_given_up_on(server, cluster):
    assert admin(server).json()["restarts"] == 0
    answer_a = complete(server).json()["choices"][0]["text"]
    assert admin(server, "POST", json={"revision": "b"}).status_code == 202      # an in-place load first
    wait_until(lambda: admin(server).json()["state"] == "ready", 60, "loaded")
    answer_b = complete(server).json()["choices"][0]["text"]
    assert answer_b != answer_a

    stream = requests.post(f"{server.url}/v1/completions", stream=True, timeout=30, json={
        "model": MODEL, "prompt": "doomed", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
        "stream": True})
    events = (line.decode().removeprefix("data: ") for line in stream.iter_lines() if line)
    assert "choices" in json.loads(next(events))
    STALL_FILE.touch()     # the new worker waits before starting its engine
    kill_the_worker(cluster)
    killed = time.monotonic()
    *_, last = events      # the stream ends with an error event, not [DONE], and does not hang
    assert json.loads(last)["error"]["code"] == "engine_unavailable"
    assert time.monotonic() - killed < 10

    report = wait_until(lambda: restarting(server), 5, "restarting")
    assert report["restarts"] == 1 and "died" in report["error"] and report["revision"] == "b"
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 503
    assert requests.get(f"{server.url}/live", timeout=10).status_code == 200
    refused = complete(server)
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert refused.json()["error"]["code"] == "engine_restarting"
    load = admin(server, "POST", json={"revision": "a"})
    assert load.status_code == 503 and load.json()["error"]["type"] == "service_unavailable"
    STALL_FILE.unlink()

    wait_until(lambda: requests.get(f"{server.url}/health", timeout=10).status_code == 200, 60, "ready again")
    print(f"served again {time.monotonic() - killed:.1f}s after the kill")
    assert admin(server).json() == {"revision": "b", "uri": report["uri"], "state": "ready", "error": None,
                                    "restarts": 1}
    assert complete(server).json()["choices"][0]["text"] == answer_b     # the revision served last
    metrics = {s.name: s.value for f in text_string_to_metric_families(
        requests.get(f"{server.url}/metrics", timeout=10).text) for s in f.samples}
    assert metrics["rayprism_engine_restarts_total"] == 1
    assert "restart 1 of 1" in server.log() and "serving again" in server.log()

    kill_the_worker(cluster)     # the one restart allowed is used up: the engine stays dead
    wait_until(lambda: requests.get(f"{server.url}/live", timeout=10).status_code == 503, 10, "dead for good")
    live = requests.get(f"{server.url}/live", timeout=10).json()
    assert live["status"] == "dead" and "died" in live["error"]
    report = admin(server).json()
    assert (report["state"], report["restarts"]) == ("failed", 1) and "died" in report["error"]
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 503
    assert complete(server).json()["error"]["code"] == "engine_unavailable"
    assert "gave up restarting the engine" in server.log()
    wait_until(lambda: not cluster.worker_processes(), 10, "the dead workers gone")


def test_sigterm_during_a_restart_leaves_nothing_running(server, cluster):
    STALL_FILE.touch()
    kill_the_worker(cluster)
    wait_until(lambda: restarting(server), 10, "restarting")
    server.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    STALL_FILE.unlink()     # the restart under way finishes, and its workers are shut down
    assert server.process.wait(60) == 0, server.log()
    wait_until(lambda: not cluster.worker_processes(), 10, "no worker left")


def test_a_worker_whose_pod_stops_is_drained_then_replaced(checkpoints, tmp_path):
    """A worker pod being stopped (a node drain, a deleted pod) marks a file in its preStop hook: the replica
    leaves readiness at once, finishes the request in flight on that worker, then restarts its engine on the
    worker that takes its place once the old one's Ray node is gone (here: ray start processes as the pods)."""
    marker = tmp_path / "terminating"
    nodes = RayNodes(head_cpus=0)
    leaving = nodes.add_worker(1, env={POD_TERMINATING_FILE_ENV: str(marker)})
    process = ServeProcess(["--model", str(checkpoints["a"]), "--served-model-name", MODEL, "--device", "cpu",
                            "--ray-address", nodes.address, "--unready-delay-seconds", "0.5"],
                           env={"RAYPRISM_ADMIN_TOKEN": TOKEN})
    try:
        answer = complete(process).json()["choices"][0]["text"]
        stream = requests.post(f"{process.url}/v1/completions", stream=True, timeout=60, json={
            "model": MODEL, "prompt": "spared", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True})
        events = (line.decode().removeprefix("data: ") for line in stream.iter_lines() if line)
        assert "choices" in json.loads(next(events))
        marker.touch()   # the pod's preStop hook
        wait_until(lambda: requests.get(f"{process.url}/health", timeout=10).status_code == 503, 5, "unready")
        assert list(events)[-1] == "[DONE]"      # the request in flight finished on the leaving worker
        report = wait_until(lambda: restarting(process), 30, "restarting")
        assert "terminating" in report["error"] and report["restarts"] == 1
        assert requests.get(f"{process.url}/live", timeout=10).status_code == 200
        leaving.send_signal(signal.SIGTERM)      # the pod goes once its ranks stopped
        leaving.wait(60)
        nodes.add_worker(1)                      # and KubeRay's new pod joins
        wait_until(lambda: requests.get(f"{process.url}/health", timeout=10).status_code == 200, 120,
                   "serving on the new worker")
        assert complete(process).json()["choices"][0]["text"] == answer
        assert "draining, then restarting the engine without it" in process.log()
    finally:
        process.stop()
        nodes.stop()
