"""The local cluster: the real operator, through the emulated API server, creates RayClusters whose
rendered head and worker pods run for real (real `ray start`, real `rayprism serve`, SmolLM2 on CPU);
any mismatch between what the operator renders and what the worker image runs fails here.

Pods are not given 127.0.0.x addresses on one loopback (the first idea): every head binds 0.0.0.0:8000
and Ray's ports, so a second replica would collide with the first, and changing the ports would mean
running something other than what was rendered. Each pod instead gets its own network namespace on a
bridge, as a CNI plugin does, and its own mount namespace with its volumes at the rendered paths, so the
rendered commands run unchanged (network.py, kubelet.py). What still differs from a cluster is listed in
kubelet.py and kuberay.py; the ones that matter here: there is no Service proxy, so requests go to the
ready head pods the Service selects (as kube-proxy would pick one), and the model URI is a file:// path
on this machine (examples/smollm2.yaml with its URI replaced by two revision folders).
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from openai import AsyncOpenAI

from tests.operator.harness import IDEP, IDEP_PATH, NS, RC, SECRETS, SERVICES

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "smollm2.yaml"


async def wait_until(predicate, kuberay, timeout: float, what: str) -> None:
    """Waits for `predicate`; fails at once, with the pods' logs, when a pod broke: a volume or env source
    could not be provided, or a container exited a second time (its restart did not help: what the image
    cannot run fails deterministically; one exit is tolerated, as a kubelet restarts it, because `ray
    start` may time out on a 2-core machine under load). Fails also at the timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        broken = [p for p in kuberay.pods() if p.failed or any(len(codes) >= 2 for codes in p.exits.values())]
        if broken or time.monotonic() > deadline:
            reason = "a pod broke" if broken else f"timed out after {timeout:.0f}s"
            raise AssertionError(f"{what}: {reason}\n{kuberay.describe()}")
        await asyncio.sleep(0.2)


def status(k8s) -> dict:
    return k8s.objects[IDEP, NS, "smollm2"].raw.get("status") or {}


def available(k8s, replicas: int) -> bool:
    s = status(k8s)
    conditions = {c["type"]: c["status"] for c in s.get("conditions", [])}
    return (conditions.get("Available") == "True" and conditions.get("Progressing") == "True"
            and s.get("readyReplicas") == replicas == s.get("updatedReplicas") == s.get("replicas"))


def endpoints(k8s, kuberay) -> list[str]:
    """What the Service routes to: ready pods its selector picks, at the pod port its targetPort names."""
    service = k8s.objects[SERVICES, NS, "smollm2"].raw["spec"]
    port = service["ports"][0]
    out = []
    for pod in kuberay.pods():
        if service["selector"].items() <= pod.labels.items() and pod.is_ready():
            container = pod.spec["containers"][0]
            target = next(p["containerPort"] for p in container["ports"] if p["name"] == port["targetPort"])
            out.append(f"http://{pod.ip}:{target}")
    return sorted(out)


def live_rayclusters(k8s) -> dict[str, str]:
    return {name: obj.raw["metadata"]["uid"] for (r, _, name), obj in k8s.objects.items()
            if r == RC and not obj.deleted}


async def chat(endpoint: str, content: str) -> str:
    async with AsyncOpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0) as client:
        response = await client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": content}],
            max_tokens=12, temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length")
    return response.choices[0].message.content


class StreamingClient:
    """Keeps streaming chat completions, round-robin over the Service's current endpoints (one stream at
    a time per worker task); every failed request is recorded with its endpoint and error."""

    def __init__(self, k8s, kuberay, concurrency: int = 2):
        self.k8s, self.kuberay = k8s, kuberay
        self.done: list[tuple[float, float, str]] = []  # (start, end, endpoint)
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(concurrency)]

    async def _loop(self, index: int) -> None:
        async with AsyncOpenAI(base_url="http://unused/v1", api_key="unused", max_retries=0, timeout=120) as client:
            turn = index
            while not self._stop.is_set():
                targets = endpoints(self.k8s, self.kuberay)
                endpoint = targets[turn % len(targets)]
                turn += 1
                start = time.monotonic()
                try:
                    stream = await client.with_options(base_url=f"{endpoint}/v1").chat.completions.create(
                        model="smollm2-135m-instruct", stream=True, max_tokens=8, temperature=0,
                        messages=[{"role": "user", "content": f"Count to {turn}."}])
                    chunks, finish = 0, None
                    async for chunk in stream:
                        chunks += bool(chunk.choices and chunk.choices[0].delta.content)
                        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
                    if not chunks or finish not in ("stop", "length"):
                        raise AssertionError(f"{chunks} content chunks, finish_reason {finish}")
                    self.done.append((start, time.monotonic(), endpoint))
                except Exception as e:  # noqa: BLE001 - every failure counts, whatever its kind
                    self.failures.append(f"{endpoint}: {e!r}")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie has: only init's reaping is left)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def processes(kuberay, pod) -> list[tuple[list[str], int]]:
    """(argv, niceness) of the pod's processes."""
    out = []
    for pid in kuberay.network.pids(pod.netns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        out.append((argv, nice))
    return out


def check_worker_pods_run_ray_as_rendered(k8s, kuberay) -> None:
    """Ray's object store sits in the worker pod's /dev/shm at the rendered size (not in /tmp, where Ray
    puts it when /dev/shm is too small), and the model ranks keep normal priority (Ray renices workers)."""
    workers = [p for p in kuberay.pods() if p.labels["ray.io/node-type"] == "worker"]
    assert workers
    for pod in workers:
        [group] = k8s.objects[RC, NS, pod.labels["ray.io/cluster"]].raw["spec"]["workerGroupSpecs"]
        running_processes = processes(kuberay, pod)
        [raylet] = [argv for argv, _ in running_processes if argv[0].endswith("/raylet")]
        assert f"--object_store_memory={group['rayStartParams']['object-store-memory']}" in raylet, raylet
        assert "--plasma_directory=/dev/shm" in raylet, raylet
        ranks = [nice for argv, nice in running_processes if argv[0].startswith("ray::RayGPUWorker")]
        assert ranks and set(ranks) == {0}, (pod.name, ranks)


async def weights(endpoint: str, token: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{endpoint}/admin/v1/weights", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, await r.text()
            return await r.json()


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_smollm2_deployment_runs_scales_updates_weights_in_place_and_deletes(
        k8s, local_kuberay, operator, model_revisions):
    kuberay = local_kuberay
    deployment = yaml.safe_load(EXAMPLE.read_text())
    deployment["spec"]["model"]["uri"] = model_revisions
    assert deployment["spec"]["model"]["revision"] == "v1"
    assert deployment["spec"]["rollout"]["weightUpdate"] == "InPlace"

    # Apply -> the operator creates a RayCluster -> its pods start Ray and the server -> Available.
    response = await k8s.post(IDEP_PATH, json=deployment)
    assert response.status == 200, await response.text()
    await wait_until(lambda: available(k8s, 1), kuberay, 300, "one replica available")
    [endpoint] = endpoints(k8s, kuberay)
    assert (await chat(endpoint, "What is the capital of France?")).strip()

    # Scale to 2: a second RayCluster, its own pods and addresses.
    response = await k8s.patch(f"{IDEP_PATH}/smollm2", json={"spec": {"replicas": 2}})
    assert response.status == 200, await response.text()
    await wait_until(lambda: available(k8s, 2) and len(endpoints(k8s, kuberay)) == 2, kuberay, 300,
                     "two replicas available")
    replicas = live_rayclusters(k8s)
    assert len(replicas) == 2
    assert status(k8s)["weightsRevision"] == "v1"
    check_worker_pods_run_ray_as_rendered(k8s, kuberay)
    question = "Name a colour."
    [v1_answer] = {await chat(endpoint, question) for endpoint in endpoints(k8s, kuberay)}  # greedy: equal

    # In-place weight update to v2 under a steady stream of requests.
    client = StreamingClient(k8s, kuberay)
    await wait_until(lambda: len(client.done) >= 2, kuberay, 60, "streaming before the update")
    update_started = time.monotonic()
    response = await k8s.patch(f"{IDEP_PATH}/smollm2", json={"spec": {"model": {"revision": "v2"}}})
    assert response.status == 200, await response.text()
    await wait_until(lambda: status(k8s).get("weightsRevision") == "v2" and available(k8s, 2), kuberay, 300,
                     "weights revision v2 on both replicas")
    update_done = time.monotonic()
    assert live_rayclusters(k8s) == replicas, (
        f"an in-place update must keep the RayClusters; events: {[e.get('message') for e in k8s.events()]}")
    await wait_until(lambda: sum(start > update_done for start, _, _ in client.done) >= 2, kuberay, 60,
                     "streaming after the update")
    await client.stop()
    assert client.failures == [], client.failures
    during = [d for d in client.done if d[0] < update_done and d[1] > update_started]
    assert {endpoint for _, _, endpoint in during} == set(endpoints(k8s, kuberay)), (
        f"each replica must serve requests while the weights roll: {during}")
    token = base64.b64decode(k8s.objects[SECRETS, NS, "smollm2-admin"].raw["data"]["token"]).decode()
    v2_answers = set()
    for endpoint in endpoints(k8s, kuberay):
        served = await weights(endpoint, token)
        assert served["revision"] == "v2" and served["state"] == "ready", served
        assert served["uri"] == model_revisions
        v2_answers.add(await chat(endpoint, question))
    assert len(v2_answers) == 1 and v1_answer not in v2_answers, (v1_answer, v2_answers)

    # Delete -> the RayClusters go, and with them every process of their pods and the pods' namespaces.
    pods = kuberay.pods()
    pids = {pid for pod in pods for pid in local_kuberay.network.pids(pod.netns)}
    assert len(pids) > 10, pids  # Ray's GCS, raylets, dashboards, the server and the model actors
    response = await k8s.delete(f"{IDEP_PATH}/smollm2")
    assert response.status == 200, await response.text()
    await wait_until(lambda: not live_rayclusters(k8s) and not kuberay.clusters and not kuberay.busy(), kuberay,
                     120, "the RayClusters and their pods gone")
    still_running = [pid for pid in pids if running(pid)]
    assert not still_running, still_running
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(pod.netns in netns for pod in pods), netns
    assert not any(pod.root.exists() for pod in pods)


@pytest.mark.slow
async def test_a_head_command_the_server_rejects_fails_the_local_cluster(k8s, local_kuberay, model_revisions):
    """The harness's point: what the image cannot run fails here. The rendered replica of the example,
    with one flag `rayprism serve` does not have, is created without the operator; Ray starts, the server
    exits, is restarted, exits again, and the wait fails with the server's own error from the head pod's log."""
    from rayprism_operator import api, render

    deployment = yaml.safe_load(EXAMPLE.read_text())
    deployment["spec"]["model"]["uri"] = model_revisions
    deployment["metadata"].update(namespace=NS, uid="0f1e2d3c")
    infd = api.InferenceDeployment.model_validate(deployment)
    secret, _service, raycluster = render.render_all(infd, token="t0k3n")
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["args"] = [head["args"][0] + " --no-such-flag"]
    for path, body in (("/api/v1/namespaces/default/secrets", secret),
                       ("/apis/ray.io/v1/namespaces/default/rayclusters", raycluster)):
        response = await k8s.post(path, json=body)
        assert response.status == 200, await response.text()
    with pytest.raises(AssertionError, match="a pod broke") as failure:
        await wait_until(lambda: bool(live_rayclusters(k8s)) and all(
            (k8s.objects[RC, NS, n].raw.get("status") or {}).get("state") == "ready" for n in live_rayclusters(k8s)),
            local_kuberay, 240, "the replica ready")
    assert "unrecognized arguments: --no-such-flag" in str(failure.value)
    assert (k8s.objects[RC, NS, raycluster["metadata"]["name"]].raw["status"]["conditions"][0]["status"]
            == "False")
