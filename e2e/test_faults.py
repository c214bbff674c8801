"""Faults on this machine's real control plane: two replicas under continuous load, one fault at a time.

Each fault is injected into one replica (or the operator, or the API server) while clients keep sending
completions through the Service's ready endpoints (as kube-proxy would route them). For each fault the test
measures when the faulty replica left the ready endpoints and when it served again, and counts requests:
those to the other replica must all succeed; those in flight on the faulty one may fail, with an error,
never by hanging until the client's timeout. The InferenceDeployment's Events must say what happened to
which replica and that it recovered.

  1. a model rank process SIGKILLed in a worker pod     (the head's server rebuilds its engine)
  2. the head's server process SIGKILLed                (the kubelet restarts the head container)
  3. a worker pod deleted                                (KubeRay recreates it; the server rebuilds its engine)
  4. a head pod deleted                                  (KubeRay recreates it; the workers rejoin)
  5. the operator pod deleted in the middle of a rolling replacement, then of an in-place weights update
  6. the API server stopped for 30 s in the middle of an in-place weights update, and started again
  7. a head pod recreated when its weights revision no longer exists: reported, the other replica serves

Killing a process in a pod and stopping the API server need this machine's control plane (make e2e): the
pods are processes here (found by the HOME our kubelet gives each pod), and cluster.py starts
and stops the components. What it measured is in RESULTS["faults"] and printed (pytest -rP).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from e2e.endpoints import ReadyEndpoints, kubectl_binary, kubectl_json
from e2e.marks import ON_THE_LOCAL_CONTROL_PLANE
from e2e.traffic import Traffic

pytestmark = ON_THE_LOCAL_CONTROL_PLANE

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "rayprism-e2e-faults"
NAME = "faulty"
MODEL = "smollm2-135m-instruct"
MODEL_URI = os.environ.get("RAYPRISM_E2E_MODEL_URI", "")  # file://.../{revision}, with v1 and v2 (make e2e)
SELECTOR = f"rayprism.dev/deployment={NAME}"
SERVER_PORT = 8000
CLIENT_TIMEOUT_S = 60  # a request on the faulty replica must fail before this, not hang
RANK_PROCESS = b"ray::RayGPUWorker"
KUBELET_PODS = REPO / ".cluster" / "kubelet" / "pods"
RESULTS: dict = {"faults": []}


def kubectl(*args: str, input: str | None = None, timeout: float = 60) -> str:
    out = subprocess.run([kubectl_binary(), "-n", NAMESPACE, *args], input=input, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr.strip()}"
    return out.stdout


def infd() -> dict:
    return kubectl_json(NAMESPACE, "get", "infd", NAME)


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or () if c["type"] == type_), {})


def replicas() -> list[dict]:
    """The RayClusters of the deployment that are not going away, oldest first."""
    items = kubectl_json(NAMESPACE, "get", "rayclusters", "-l", SELECTOR)["items"]
    return sorted((r for r in items if not r["metadata"].get("deletionTimestamp")),
                  key=lambda r: (r["metadata"]["creationTimestamp"], r["metadata"]["name"]))


def pods(replica: str, node_type: str) -> list[dict]:
    items = kubectl_json(NAMESPACE, "get", "pods", "-l", f"ray.io/cluster={replica},ray.io/node-type={node_type}")
    return [p for p in items["items"] if not p["metadata"].get("deletionTimestamp")]


def head_ip(replica: str) -> str | None:
    heads = pods(replica, "head")
    return heads[0].get("status", {}).get("podIP") if heads else None


def ready_ips() -> set[str]:
    """The pod IPs of the Service's ready endpoints (EndpointSlices), as kube-proxy would route."""
    slices = kubectl_json(NAMESPACE, "get", "endpointslices", "-l", f"kubernetes.io/service-name={NAME}")["items"]
    return {ip for s in slices for e in s.get("endpoints") or () if (e.get("conditions") or {}).get("ready")
            for ip in e["addresses"]}


def processes_of_pod(pod: dict, marker: bytes) -> list[int]:
    """PIDs of the pod's processes whose command line holds marker (our kubelet gives each pod's processes
    a HOME under the pod's own directory, named by its uid)."""
    home = f"HOME={KUBELET_PODS / pod['metadata']['uid']}/home".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes() and home in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def kill(pod: dict, marker: bytes) -> None:
    pids = processes_of_pod(pod, marker)
    assert pids, f"no process {marker!r} in pod {pod['metadata']['name']}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def base_url(ip: str) -> str:
    return f"http://{ip}:{SERVER_PORT}/v1"


def complete(base_url: str, timeout: float = CLIENT_TIMEOUT_S, max_tokens: int = 32) -> None:
    """A streamed completion with the openai client; raises unless it finishes."""
    from openai import OpenAI

    with OpenAI(base_url=base_url, api_key="unused", timeout=timeout, max_retries=0) as client:
        stream = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=max_tokens, temperature=0,
                                           stream=True)
        finish = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
    if finish not in (["stop"], ["length"]):
        raise RuntimeError(f"the stream ended without finishing: {finish}")


@contextmanager
def traffic() -> Iterator[Traffic]:
    """Three clients streaming completions, each to the next ready endpoint (re-read every 0.5 s)."""
    endpoints = ReadyEndpoints(NAMESPACE, NAME, "http", refresh_s=0.5)
    with Traffic(lambda: f"http://{endpoints.next()}/v1", complete, clients=3) as sent:
        yield sent


def events(since: str) -> list[dict]:
    """The InferenceDeployment's Events at or after `since` (an RFC 3339 time), oldest first."""
    items = kubectl_json(NAMESPACE, "get", "events", "--field-selector",
                         f"involvedObject.kind=InferenceDeployment,involvedObject.name={NAME}")["items"]
    stamp = lambda e: e.get("lastTimestamp") or e.get("eventTime") or ""  # noqa: E731
    return sorted((e for e in items if stamp(e) >= since), key=stamp)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))


def wait_serving(timeout: float = 600) -> list[str]:
    """Until both replicas are ready, in the endpoints and answer; returns their names."""
    deadline = time.monotonic() + timeout
    while True:
        names = [r["metadata"]["name"] for r in replicas()]
        ips = {head_ip(n) for n in names}
        status = infd().get("status") or {}
        if len(names) == 2 and status.get("readyReplicas") == 2 and None not in ips and ips <= ready_ips():
            return names
        assert time.monotonic() < deadline, f"2 replicas not serving after {timeout}s: {names} {status}"
        time.sleep(1)


def measure(fault: str, faulty: str, inject, *, back_timeout: float = 600) -> dict:
    """Injects a fault into replica `faulty` under traffic; measures and checks what must hold."""
    names = wait_serving()
    healthy = next(n for n in names if n != faulty)
    healthy_ip, faulty_ip = head_ip(healthy), head_ip(faulty)
    since = utc_now()
    with traffic() as sent:
        time.sleep(3)  # requests in flight on both replicas
        injected = time.monotonic()
        inject()
        left = back = None
        deadline = injected + back_timeout
        while back is None:
            assert time.monotonic() < deadline, f"{fault}: {faulty} did not serve again in {back_timeout}s"
            ready, ip = ready_ips(), head_ip(faulty)
            if left is None and faulty_ip not in ready:
                left = time.monotonic() - injected
            if left is not None and ip and ip in ready:
                try:
                    complete(base_url(ip), timeout=30, max_tokens=4)
                    back = time.monotonic() - injected
                except Exception:  # noqa: BLE001 - in the endpoints, not answering yet
                    pass
            time.sleep(0.25)
        time.sleep(3)  # traffic on the healed replica too
    on_healthy = [r for r in sent.requests if r.host == healthy_ip]
    on_faulty = [r for r in sent.requests if r.host != healthy_ip]
    row = {"fault": fault, "left_endpoints_s": round(left, 1), "served_again_s": round(back, 1),
           "healthy_requests": len(on_healthy), "healthy_failed": sum(bool(r.error) for r in on_healthy),
           "faulty_requests": len(on_faulty), "faulty_failed": sum(bool(r.error) for r in on_faulty),
           "faulty_hung": sum(r.timed_out for r in on_faulty),
           "errors_seen": sorted({r.error.split(":")[0] for r in on_faulty if r.error})}
    RESULTS["faults"].append(row)
    print(json.dumps(row))
    assert row["healthy_failed"] == 0, [r for r in on_healthy if r.error][:3]
    assert row["faulty_hung"] == 0, [r for r in on_faulty if r.timed_out][:3]
    assert on_healthy, "no request reached the healthy replica"
    # The Events say what happened to which replica, and that it serves again.
    deadline = time.monotonic() + 60
    while True:
        seen = events(since)
        warned = [e for e in seen if e["type"] == "Warning" and faulty in e.get("message", "")]
        recovered = [e for e in seen if e["reason"] == "ReplicaRecovered" and faulty in e.get("message", "")]
        if warned and recovered:
            break
        assert time.monotonic() < deadline, f"{fault}: no Warning and ReplicaRecovered events for {faulty}: " + \
            json.dumps([(e["type"], e["reason"], e.get("message")) for e in seen])
        time.sleep(1)
    row["events"] = [f"{e['reason']}: {e['message']}"[:200] for e in warned[:1] + recovered[:1]]
    return row


@pytest.fixture(scope="module")
def deployment():
    assert MODEL_URI, "RAYPRISM_E2E_MODEL_URI must name the v1/v2 revisions (make e2e prepares them)"
    subprocess.run([kubectl_binary(), "create", "namespace", NAMESPACE], capture_output=True)
    kubectl("label", "namespace", NAMESPACE, "--overwrite", "pod-security.kubernetes.io/enforce=restricted")
    manifest = yaml.safe_load((REPO / "examples" / "smollm2.yaml").read_text())
    manifest["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    spec = manifest["spec"]
    spec["replicas"] = 2
    spec["model"]["uri"] = MODEL_URI
    spec["resources"].update({"cpu": "600m", "memory": "3Gi", "headCpu": "200m", "headMemory": "1536Mi"})
    # A drain long enough for a stream in flight on this loaded CPU node (a worker pod stopped alone drains too).
    spec["rollout"] = {"maxSurge": 0, "maxUnavailable": 1, "drainSeconds": 20, "weightUpdate": "InPlace"}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    kubectl("wait", "--for=condition=Available", f"infd/{NAME}", "--timeout=600s", timeout=630)
    wait_serving()
    yield
    print("faults:", json.dumps(RESULTS["faults"], indent=1))
    subprocess.run([kubectl_binary(), "-n", NAMESPACE, "delete", "infd", NAME, "--wait=true", "--timeout=300s"],
                   capture_output=True)
    subprocess.run([kubectl_binary(), "delete", "namespace", NAMESPACE, "--wait=false"], capture_output=True)


@pytest.mark.timeout(900)
def test_a_killed_model_rank(deployment):
    faulty = replicas()[0]["metadata"]["name"]
    worker = pods(faulty, "worker")[0]
    measure("model rank process SIGKILLed", faulty, lambda: kill(worker, RANK_PROCESS))


@pytest.mark.timeout(900)
def test_a_killed_head_server(deployment):
    faulty = replicas()[1]["metadata"]["name"]
    head = pods(faulty, "head")[0]
    measure("head's server process SIGKILLed", faulty, lambda: kill(head, b"rayprism\0serve"))
    [head] = pods(faulty, "head")
    assert head["status"]["containerStatuses"][0]["restartCount"] >= 1, "the head container was not restarted"


@pytest.mark.timeout(900)
def test_a_deleted_worker_pod(deployment):
    faulty = replicas()[0]["metadata"]["name"]
    worker = pods(faulty, "worker")[0]["metadata"]["name"]
    measure("worker pod deleted", faulty, lambda: kubectl("delete", "pod", worker, "--wait=false"))


@pytest.mark.timeout(900)
def test_a_deleted_head_pod(deployment):
    faulty = replicas()[1]["metadata"]["name"]
    head = pods(faulty, "head")[0]["metadata"]["name"]
    measure("head pod deleted", faulty, lambda: kubectl("delete", "pod", head, "--wait=false"))


# --- the operator and the API server, in the middle of a rollout -------------------------------------------
OPERATOR_NAMESPACE = "rayprism-system"
OPERATOR_SELECTOR = "app.kubernetes.io/component=operator"
LABEL_REVISION = "rayprism.dev/revision"
ANNOTATION_WEIGHTS = "rayprism.dev/weights-revision"
ANNOTATION_WEIGHTS_TARGET = "rayprism.dev/weights-target"


def delete_operator_pods() -> None:
    subprocess.run([kubectl_binary(), "-n", OPERATOR_NAMESPACE, "delete", "pod", "-l", OPERATOR_SELECTOR,
                    "--wait=false"], check=True, capture_output=True, timeout=60)


def restart_api_server(down_s: float) -> None:
    """Stops the API server (etcd keeps the data), waits, starts it again; `up` also starts any component that
    exited meanwhile, as a node's kubelet restarts its static pods."""
    from e2e.controlplane import cluster

    cluster.stop("kube-apiserver", timeout=10)
    time.sleep(down_s)
    cluster.up(["rayprism-e2e-node"])


def all_rayclusters() -> list[dict]:
    return kubectl_json(NAMESPACE, "get", "rayclusters", "-l", SELECTOR)["items"]


def roll(fault: str, spec: dict, started, inject, *, in_place: bool) -> dict:
    """Changes the spec under traffic; once `started(rayclusters)` says the rollout is under way, injects the
    fault; then waits until the rollout completes and checks it completed as if nothing happened."""
    before = {r["metadata"]["name"] for r in replicas()}
    old_revision = infd()["status"]["updateRevision"]
    revisions_seen: set[str] = set()
    with traffic() as sent:
        out = kubectl("patch", "infd", NAME, "--type", "merge", "-p", json.dumps({"spec": spec}), "-o", "json")
        generation = json.loads(out)["metadata"]["generation"]
        deadline = time.monotonic() + 300
        while not started(all_rayclusters()):
            assert time.monotonic() < deadline, f"{fault}: the rollout did not start"
            time.sleep(0.5)
        injected = time.monotonic()
        inject()
        deadline = time.monotonic() + 900
        while True:
            revisions_seen |= {r["metadata"]["labels"][LABEL_REVISION] for r in all_rayclusters()}
            status = infd().get("status") or {}
            if status.get("observedGeneration") == generation and status.get("readyReplicas") == 2 and \
                    condition(status, "Progressing").get("reason") == "NewRevisionAvailable":
                break
            assert time.monotonic() < deadline, f"{fault}: the rollout did not complete: {status}"
            time.sleep(1)
        completed = time.monotonic() - injected
    new_revision = status["updateRevision"]
    after = replicas()
    # No replica of a third revision, no duplicate, no orphan.
    assert revisions_seen <= {old_revision, new_revision}, revisions_seen
    assert len(after) == 2 and {r["metadata"]["labels"][LABEL_REVISION] for r in after} == {new_revision}, after
    names = {r["metadata"]["name"] for r in after}
    assert names == before if in_place else not names & before, (before, names)
    policies = kubectl_json(NAMESPACE, "get", "networkpolicies", "-l", SELECTOR)["items"]
    assert {p["metadata"]["name"] for p in policies} == {f"{n}-ray" for n in names} | {f"{NAME}-serving"}, policies
    failed = sent.failures
    row = {"fault": fault, "rollout_completed_after_s": round(completed, 1), "requests": len(sent.requests),
           "failed": len(failed), "hung": sum(r.timed_out for r in sent.requests)}
    RESULTS["faults"].append(row)
    print(json.dumps(row))
    assert not failed, failed[:3]
    return status


def loading_left_endpoints(rayclusters: list[dict]) -> bool:
    """An in-place load is under way and its replica has left the ready endpoints (so that no request is sent
    to it after the fault: nothing would take it out of the endpoints while the operator or API server is away)."""
    loading = [r for r in rayclusters if (r["metadata"].get("annotations") or {}).get(ANNOTATION_WEIGHTS_TARGET)]
    return bool(loading) and all(head_ip(r["metadata"]["name"]) not in ready_ips() for r in loading)


@pytest.mark.timeout(1500)
def test_the_operator_deleted_mid_rolling_replacement(deployment):
    wait_serving()
    old = infd()["status"]["updateRevision"]
    # maxUnavailable 1, maxSurge 0: an old replica goes first, then a new one is created.
    roll("operator pod deleted mid rolling replacement", {"engine": {"maxNumSeqs": 15}},
         lambda rcs: any(r["metadata"]["labels"][LABEL_REVISION] != old for r in rcs),
         delete_operator_pods, in_place=False)


def other_revision() -> str:
    """v1 or v2, whichever the deployment does not serve."""
    return "v2" if infd()["spec"]["model"]["revision"] == "v1" else "v1"


@pytest.mark.timeout(1500)
def test_the_operator_deleted_mid_in_place_weights_update(deployment):
    wait_serving()
    revision = other_revision()
    status = roll("operator pod deleted mid in-place weights update", {"model": {"revision": revision}},
                  loading_left_endpoints, delete_operator_pods, in_place=True)
    assert status["weightsRevision"] == revision, status
    assert {(r["metadata"].get("annotations") or {}).get(ANNOTATION_WEIGHTS) for r in replicas()} == {revision}


@pytest.mark.timeout(1500)
def test_the_api_server_stopped_mid_in_place_weights_update(deployment):
    wait_serving()
    revision = other_revision()
    status = roll("API server stopped for 30 s mid in-place weights update", {"model": {"revision": revision}},
                  loading_left_endpoints, lambda: restart_api_server(30), in_place=True)
    assert status["weightsRevision"] == revision, status


@pytest.mark.timeout(1500)
def test_a_replica_whose_revision_vanished(deployment):
    """Both replicas load a revision in place; it then vanishes, and one head pod is recreated: its server
    cannot load the weights. The replica is reported as failing, with the server's reason, after a bounded
    number of attempts (the kubelet's back-off); the other keeps serving. Once the revision is back, the
    replica serves again by itself."""
    models = Path(MODEL_URI.removeprefix("file://")).parent
    shutil.copytree(models / "v1", models / "v3", dirs_exist_ok=True)
    wait_serving()
    kubectl("patch", "infd", NAME, "--type", "merge", "-p", json.dumps({"spec": {"model": {"revision": "v3"}}}))
    kubectl("wait", "--for=jsonpath={.status.weightsRevision}=v3", f"infd/{NAME}", "--timeout=600s", timeout=630)
    names = wait_serving()
    faulty, healthy = names[1], names[0]
    head = pods(faulty, "head")[0]["metadata"]["name"]
    with traffic() as sent:
        shutil.rmtree(models / "v3")
        injected = time.monotonic()
        kubectl("delete", "pod", head, "--wait=false")
        deadline = time.monotonic() + 600
        while True:
            degraded = condition(infd().get("status") or {}, "Degraded")
            if degraded.get("status") == "True" and faulty in degraded.get("message", "") and \
                    "could not load the model" in degraded.get("message", ""):
                break
            assert time.monotonic() < deadline, f"the failing replica was not reported: {degraded}"
            time.sleep(1)
        reported = time.monotonic() - injected
        [container] = pods(faulty, "head")[0]["status"]["containerStatuses"]
        healthy_ip = head_ip(healthy)
        assert healthy_ip in ready_ips() and head_ip(faulty) not in ready_ips()
        shutil.copytree(models / "v1", models / "v3")
        wait_serving(timeout=600)   # the next restart after the back-off loads it
        back = time.monotonic() - injected
    on_healthy = [r for r in sent.requests if r.host == healthy_ip]
    row = {"fault": "head pod recreated after its weights revision vanished", "reported_after_s": round(reported, 1),
           "attempts_when_reported": container["restartCount"] + 1, "degraded": degraded["message"][:300],
           "served_again_after_restore_s": round(back, 1), "healthy_requests": len(on_healthy),
           "healthy_failed": sum(bool(r.error) for r in on_healthy)}
    RESULTS["faults"].append(row)
    print(json.dumps(row))
    assert on_healthy and row["healthy_failed"] == 0, [r for r in on_healthy if r.error][:3]
