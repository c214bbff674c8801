"""rayprism on a real cluster: apply, serve, scale, roll weights in place, delete.

Needs a cluster with KubeRay and the rayprism chart installed and the images loaded: e2e/run.sh
prepares a kind cluster and runs this file. Skipped unless RAYPRISM_E2E=1. The tests run in order
and share one InferenceDeployment (examples/smollm2.yaml, CPU only); run with -x.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("RAYPRISM_E2E") != "1",
                       reason="needs a kind cluster: run e2e/run.sh (sets RAYPRISM_E2E=1)"),
]

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "examples" / "smollm2.yaml"
NAME = "smollm2"
MODEL = "smollm2-135m-instruct"
NAMESPACE = os.environ.get("RAYPRISM_E2E_NAMESPACE", "rayprism-e2e")
SELECTOR = f"rayprism.dev/deployment={NAME}"
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl") or "kubectl"


def kubectl(*args: str, timeout: float = 120) -> str:
    out = subprocess.run([KUBECTL, "-n", NAMESPACE, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr.strip()}"
    return out.stdout


def infd() -> dict:
    return json.loads(kubectl("get", "infd", NAME, "-o", "json"))


def wait_for(condition: str, timeout_s: int) -> None:
    """kubectl wait on the InferenceDeployment (condition=... or jsonpath=...)."""
    kubectl("wait", f"--for={condition}", f"infd/{NAME}", f"--timeout={timeout_s}s", timeout=timeout_s + 30)


def labelled(kind: str) -> list[dict]:
    return json.loads(kubectl("get", kind, "-l", SELECTOR, "-o", "json"))["items"]


@contextmanager
def port_forward():
    """kubectl port-forward svc/NAME to a free local port; yields the OpenAI base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([KUBECTL, "-n", NAMESPACE, "port-forward", f"svc/{NAME}", f"{port}:8000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8000", or EOF on failure
        assert "Forwarding from" in line, f"port-forward failed: {line}{proc.stderr.read()}"
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def client(base_url: str):
    from openai import OpenAI

    # No API key is configured on the server; the client insists on some string.
    return OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)


def chat(openai_client, content: str = "What is the capital of France?", max_tokens: int = 16):
    return openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0)


def _quantity(value: str) -> float:
    """A Kubernetes CPU or memory quantity as a number (cores, bytes)."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * units[suffix]
    return float(value)


@pytest.fixture(scope="module", autouse=True)
def cluster_fits_two_replicas():
    """Fail at once, with numbers, if the nodes cannot hold the two replicas the scale step asks for."""
    import yaml

    resources = yaml.safe_load(MANIFEST.read_text())["spec"]["resources"]
    nodes = json.loads(subprocess.run([KUBECTL, "get", "nodes", "-o", "json"], capture_output=True,
                                      text=True, check=True).stdout)["items"]
    for kind, pod_keys in (("cpu", ("cpu", "headCpu")), ("memory", ("memory", "headMemory"))):
        needed = 2 * sum(_quantity(resources[key]) for key in pod_keys)
        allocatable = sum(_quantity(node["status"]["allocatable"][kind]) for node in nodes)
        # The control plane, KubeRay and the rayprism operator take their share too.
        assert allocatable > needed, (
            f"the cluster's allocatable {kind} ({allocatable:g}) is not above the {needed:g} that two "
            f"replicas of {MANIFEST.name} request: give Docker more CPUs and memory")


@pytest.fixture(scope="module", autouse=True)
def namespace():
    subprocess.run([KUBECTL, "create", "namespace", NAMESPACE], capture_output=True)
    yield
    subprocess.run([KUBECTL, "-n", NAMESPACE, "delete", "infd", NAME, "--ignore-not-found", "--wait=false"],
                   capture_output=True)
    subprocess.run([KUBECTL, "delete", "namespace", NAMESPACE, "--wait=false"], capture_output=True)


@pytest.mark.timeout(1500)
def test_apply_becomes_available():
    kubectl("apply", "-f", str(MANIFEST))
    # The first start pulls nothing (images are kind-loaded) but converts the builtin model.
    wait_for("condition=Available", 1200)
    status = infd()["status"]
    assert status["readyReplicas"] == 1 and status["availableReplicas"] == 1
    assert status["endpoint"] == f"http://{NAME}.{NAMESPACE}.svc:8000/v1"
    assert status["weightsRevision"] == "v1"
    assert len(labelled("rayclusters")) == 1
    assert [s["metadata"]["name"] for s in labelled("services")] == [NAME]


def test_chat_completions_through_port_forward():
    with port_forward() as base_url:
        openai_client = client(base_url)
        assert MODEL in [m.id for m in openai_client.models.list()]
        reply = chat(openai_client)
        assert reply.choices[0].message.content.strip()
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert 0 < reply.usage.completion_tokens <= 16
        # Greedy decoding: the same prompt gives the same answer.
        assert chat(openai_client).choices[0].message.content == reply.choices[0].message.content
        stream = openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()


@pytest.mark.timeout(1500)
def test_scale_to_two():
    kubectl("scale", "infd", NAME, "--replicas", "2")
    wait_for("jsonpath={.status.readyReplicas}=2", 1200)
    wait_for("condition=Available", 60)
    assert len(labelled("rayclusters")) == 2
    assert infd()["status"]["replicas"] == 2
    with port_forward() as base_url:
        assert chat(client(base_url)).choices[0].message.content.strip()


@pytest.mark.timeout(1200)
def test_weights_roll_in_place_without_failed_requests():
    before = sorted(rc["metadata"]["name"] for rc in labelled("rayclusters"))
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def keep_asking(base_url: str) -> None:
        nonlocal answered
        openai_client = client(base_url)
        while not stop.is_set():
            try:
                assert chat(openai_client, max_tokens=8).choices[0].message.content is not None
                answered += 1
            except Exception as e:  # every failure is recorded; the roll must cause none
                failures.append(repr(e))

    with port_forward() as base_url:
        asker = threading.Thread(target=keep_asking, args=(base_url,), daemon=True)
        asker.start()
        try:
            kubectl("patch", "infd", NAME, "--type", "merge", "-p", '{"spec": {"model": {"revision": "v2"}}}')
            wait_for("jsonpath={.status.weightsRevision}=v2", 900)
            wait_for("condition=Available", 120)
        finally:
            stop.set()
            asker.join(timeout=180)
    assert not failures, failures[:5]
    assert answered > 0
    # In place: the same RayClusters, each now recording the new weights revision.
    clusters = labelled("rayclusters")
    assert sorted(rc["metadata"]["name"] for rc in clusters) == before
    assert {rc["metadata"]["annotations"]["rayprism.dev/weights-revision"] for rc in clusters} == {"v2"}


@pytest.mark.timeout(600)
def test_delete_leaves_nothing():
    kubectl("delete", "infd", NAME, "--wait=true", timeout=300)
    deadline = time.monotonic() + 300
    kinds = ("rayclusters", "services", "secrets", "pods")
    while True:
        left = {kind: [o["metadata"]["name"] for o in labelled(kind)] for kind in kinds}
        left = {kind: names for kind, names in left.items() if names}
        if not left:
            break
        assert time.monotonic() < deadline, f"still there 5 minutes after deletion: {left}"
        time.sleep(5)  # garbage collection of owned objects is asynchronous
