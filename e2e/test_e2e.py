"""rayprism on a real cluster: apply, serve, scale, roll weights in place, replace pods, delete, refuse
invalid manifests.

Runs against whatever cluster KUBECONFIG names, with KubeRay and the rayprism chart installed and the
worker image available: e2e/run.sh prepares a kind cluster, `make e2e` the control plane on this
machine. Skipped unless RAYPRISM_E2E=1. The tests run in order and share one InferenceDeployment
(examples/smollm2.yaml, CPU only); run with -x. Traffic goes only to the Service's ready endpoints
(e2e/endpoints.py). Settings (environment):

  RAYPRISM_E2E_NAMESPACE     namespace of the test (default rayprism-e2e)
  RAYPRISM_E2E_SMALL=1       resources that fit two replicas on a 2-core / 24 GiB node (SMALL_RESOURCES)
  RAYPRISM_E2E_MODEL_URI     spec.model.uri instead of the builtin model: a file://.../{revision}
                             template with revisions v1 and v2 whose greedy answers differ
  RAYPRISM_E2E_POD_NETWORK   `direct` where pod IPs are routable from here (else kubectl port-forward)
  KUBECTL                    kubectl binary (else the one on PATH, else the venv's)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from e2e.endpoints import (ReadyEndpoints, kubectl_binary, kubectl_json, openai_base_url, openai_base_urls,
                           ready_addresses, service_port)
from e2e.marks import ON_A_CLUSTER
from e2e.traffic import Traffic

pytestmark = ON_A_CLUSTER

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "smollm2.yaml"
CRD = REPO / "crds" / "rayprism.dev_inferencedeployments.yaml"
EXAMPLE_DOC = yaml.safe_load(EXAMPLE.read_text())
NAME = EXAMPLE_DOC["metadata"]["name"]
MODEL = EXAMPLE_DOC["spec"]["model"]["name"]
FIRST_REVISION = EXAMPLE_DOC["spec"]["model"]["revision"]
NEXT_REVISION = "v2"  # the runner prepares both revisions under RAYPRISM_E2E_MODEL_URI
SCALED_REPLICAS = 2
NAMESPACE = os.environ.get("RAYPRISM_E2E_NAMESPACE", "rayprism-e2e")
SMALL = os.environ.get("RAYPRISM_E2E_SMALL") == "1"
MODEL_URI = os.environ.get("RAYPRISM_E2E_MODEL_URI")
SMALL_RESOURCES = {"cpu": "600m", "memory": "3Gi", "headCpu": "200m", "headMemory": "1536Mi"}
SELECTOR = f"rayprism.dev/deployment={NAME}"
HEAD_SELECTOR = f"{SELECTOR},ray.io/node-type=head"
SERVICE_PORT = "http"  # the port name of the Service the operator renders (render.render_service)

# What the run measured, for the runner to print or read: greedy answers by weights revision, and the
# traffic and readiness seen during the rollouts.
RESULTS: dict = {"greedy_answers": {}}


def run_kubectl(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl_binary(), "-n", NAMESPACE, *args], input=input, capture_output=True,
                          text=True, timeout=timeout)


def kubectl(*args: str, input: str | None = None, timeout: float = 120) -> str:
    out = run_kubectl(*args, input=input, timeout=timeout)
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr.strip()}"
    return out.stdout


def infd() -> dict:
    return kubectl_json(NAMESPACE, "get", "infd", NAME)


def wait_for(condition: str, timeout_s: int, name: str = NAME) -> None:
    """kubectl wait on an InferenceDeployment (condition=... or jsonpath=...)."""
    kubectl("wait", f"--for={condition}", f"infd/{name}", f"--timeout={timeout_s}s", timeout=timeout_s + 30)


def patch_spec(spec: dict) -> int:
    """Merge-patches the spec; returns the new generation."""
    out = kubectl("patch", "infd", NAME, "--type", "merge", "-p", json.dumps({"spec": spec}), "-o", "json")
    return json.loads(out)["metadata"]["generation"]


def labelled(kind: str, selector: str = SELECTOR) -> list[dict]:
    return kubectl_json(NAMESPACE, "get", kind, "-l", selector)["items"]


def names(objects: list[dict]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objects)


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions", ()) if c["type"] == type_), {})


def deep_merge(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in, key by key (like a JSON merge patch without deletions)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = deep_merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def manifest() -> dict:
    """examples/smollm2.yaml as this run applies it (RAYPRISM_E2E_SMALL, RAYPRISM_E2E_MODEL_URI)."""
    changes: dict = {}
    if SMALL:
        changes["resources"] = SMALL_RESOURCES
    if MODEL_URI:
        changes["model"] = {"uri": MODEL_URI}
    return deep_merge(EXAMPLE_DOC, {"spec": changes})


def openai_client(base_url: str):
    from openai import OpenAI

    # No API key is configured on the server; the client insists on some string.
    return OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)


def chat(base_url: str, content: str = "What is the capital of France?", max_tokens: int = 16):
    """A greedy chat completion; a fresh client each time, so no connection outlives its endpoint."""
    with openai_client(base_url) as client:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0)


def stream_chat(base_url: str, max_tokens: int = 24) -> None:
    """A streamed greedy chat completion that must run to its end: a stream cut off (a replica stopped
    under it) has no finish_reason."""
    with openai_client(base_url) as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me about the sea."}], max_tokens=max_tokens,
            temperature=0, stream=True)
        finish = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"]), f"the stream ended without finishing: {finish}"


def greedy_chat(base_url: str) -> None:
    assert chat(base_url, max_tokens=8).choices[0].message.content is not None


def _quantity(value: str) -> float:
    """A Kubernetes CPU or memory quantity as a number (cores, bytes)."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * units[suffix]
    return float(value)


@pytest.fixture(scope="module", autouse=True)
def cluster_fits_scaled_replicas():
    """Fail at once, with numbers, if the nodes cannot hold the replicas the scale step asks for."""
    resources = manifest()["spec"]["resources"]
    nodes = kubectl_json(NAMESPACE, "get", "nodes")["items"]
    for kind, pod_keys in (("cpu", ("cpu", "headCpu")), ("memory", ("memory", "headMemory"))):
        needed = SCALED_REPLICAS * sum(_quantity(resources[key]) for key in pod_keys)
        allocatable = sum(_quantity(node["status"]["allocatable"][kind]) for node in nodes)
        # The control plane, KubeRay and the rayprism operator take their share too.
        assert allocatable > needed, (
            f"the cluster's allocatable {kind} ({allocatable:g}) is not above the {needed:g} that "
            f"{SCALED_REPLICAS} replicas of {EXAMPLE.name} request (RAYPRISM_E2E_SMALL={int(SMALL)})")


@pytest.fixture(scope="module", autouse=True)
def namespace():
    subprocess.run([kubectl_binary(), "create", "namespace", NAMESPACE], capture_output=True)
    yield
    subprocess.run([kubectl_binary(), "-n", NAMESPACE, "delete", "infd", NAME, "--ignore-not-found",
                    "--wait=false"], capture_output=True)
    subprocess.run([kubectl_binary(), "delete", "namespace", NAMESPACE, "--wait=false"], capture_output=True)


@pytest.mark.timeout(1500)
def test_apply_becomes_available_only_when_serving():
    applied = manifest()
    kubectl("apply", "-f", "-", input=yaml.safe_dump(applied))
    # The first start converts or loads the model on CPU.
    wait_for("condition=Available", 1200)
    # Available must mean serving: one request at once, no retries, only to ready endpoints.
    with openai_base_url(NAMESPACE, NAME, SERVICE_PORT) as base_url:
        assert chat(base_url).choices[0].message.content.strip()
    replicas = applied["spec"]["replicas"]
    status = infd()["status"]
    assert status["readyReplicas"] == replicas and status["availableReplicas"] == replicas
    port = service_port(NAMESPACE, NAME, SERVICE_PORT)["port"]
    assert status["endpoint"] == f"http://{NAME}.{NAMESPACE}.svc:{port}/v1"
    assert status["weightsRevision"] == FIRST_REVISION
    assert len(labelled("rayclusters")) == replicas
    assert names(labelled("services")) == [NAME]


@pytest.mark.timeout(120)
def test_get_shows_printer_columns_and_explain_documents_the_model():
    crd = yaml.safe_load(CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["storage"]]
    # kubectl prints the name, then every priority-0 column, upper-cased.
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"] if not c.get("priority")]
    header, *rows = kubectl("get", "infd", NAME).splitlines()
    assert header.split() == ["NAME", *columns]
    [row] = rows
    cells = dict(zip(header.split(), row.split()))
    assert len(row.split()) == len(cells) and "<none>" not in cells.values(), (header, row)

    explained = kubectl("explain", "infd.spec.model")
    for field in ("revision", "uri"):
        assert re.search(rf"^\s+{field}\s+<", explained, re.MULTILINE), explained


@pytest.mark.timeout(300)
def test_chat_completions_through_ready_endpoints():
    with openai_base_urls(NAMESPACE, NAME, SERVICE_PORT) as next_base_url:
        with openai_client(next_base_url()) as client:
            assert MODEL in [m.id for m in client.models.list()]
        reply = chat(next_base_url())
        answer = reply.choices[0].message.content
        assert answer.strip()
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert 0 < reply.usage.completion_tokens <= 16
        # Greedy decoding: the same prompt gives the same answer.
        assert chat(next_base_url()).choices[0].message.content == answer
        with openai_client(next_base_url()) as client:
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
    RESULTS["greedy_answers"][FIRST_REVISION] = answer


@pytest.mark.timeout(1500)
def test_scale_to_two():
    kubectl("scale", "infd", NAME, "--replicas", str(SCALED_REPLICAS))
    wait_for(f"jsonpath={{.status.readyReplicas}}={SCALED_REPLICAS}", 1200)
    wait_for("condition=Available", 60)
    assert len(labelled("rayclusters")) == SCALED_REPLICAS
    assert infd()["status"]["replicas"] == SCALED_REPLICAS
    assert len(ready_addresses(NAMESPACE, NAME, SERVICE_PORT)) == SCALED_REPLICAS
    with openai_base_urls(NAMESPACE, NAME, SERVICE_PORT) as next_base_url:
        for _ in range(SCALED_REPLICAS):  # round-robin: one request to each ready endpoint
            assert chat(next_base_url()).choices[0].message.content.strip()


@pytest.mark.timeout(1200)
def test_weights_roll_in_place_without_failed_requests():
    uri = manifest()["spec"]["model"]["uri"]
    # Other URIs hold the same files for every revision, and the CRD refuses changing it there.
    if not (uri.startswith("hf://") or "{revision}" in uri):
        pytest.skip(f"model.revision selects no weights in {uri}: set RAYPRISM_E2E_MODEL_URI to a "
                    "file://.../{revision} template")
    before = names(labelled("rayclusters"))
    with openai_base_urls(NAMESPACE, NAME, SERVICE_PORT) as next_base_url, \
            Traffic(next_base_url, greedy_chat) as traffic:
        patch_spec({"model": {"revision": NEXT_REVISION}})
        wait_for(f"jsonpath={{.status.weightsRevision}}={NEXT_REVISION}", 900)
        wait_for("condition=Available", 120)
    report = traffic.report()
    RESULTS["in_place_roll"] = report
    print(f"in-place roll to {NEXT_REVISION}: {report}")
    assert not traffic.failures, traffic.failures[:5]
    assert traffic.requests
    # In place: the same RayClusters, each now recording the new weights revision.
    clusters = labelled("rayclusters")
    assert names(clusters) == before
    assert {rc["metadata"]["annotations"]["rayprism.dev/weights-revision"] for rc in clusters} == {NEXT_REVISION}

    with openai_base_urls(NAMESPACE, NAME, SERVICE_PORT) as next_base_url:
        answers = {chat(next_base_url()).choices[0].message.content for _ in range(SCALED_REPLICAS)}
    assert len(answers) == 1, f"the replicas answer differently after the roll: {answers}"
    [answer] = answers
    RESULTS["greedy_answers"][NEXT_REVISION] = answer
    assert answer != RESULTS["greedy_answers"][FIRST_REVISION], "the new weights answer like the old ones"


def _sample_rollout(endpoints, generation: int, replicas: int, samples: list[dict], started: float) -> None:
    """Every 0.5 s until the rollout is complete: the ready endpoints and ready head pods."""
    while True:
        tick = time.monotonic()
        samples.append({"t": round(tick - started, 1), "ready_endpoints": len(endpoints.current()),
                        "ready_heads": _ready_heads()})
        status = infd()["status"]
        done = (status.get("observedGeneration", 0) >= generation
                and condition(status, "Progressing").get("reason") == "NewRevisionAvailable"
                and samples[-1]["ready_endpoints"] == replicas)
        if done:
            return
        assert tick - started < 2100, f"the rollout did not finish in 35 minutes: {status.get('conditions')}"
        time.sleep(max(0.0, tick + 0.5 - time.monotonic()))


def _ready_heads() -> list[str]:
    """Head pods that are Ready and not being deleted."""
    return names([p for p in labelled("pods", HEAD_SELECTOR)
                  if not p["metadata"].get("deletionTimestamp")
                  and condition(p.get("status", {}), "Ready").get("status") == "True"])


@pytest.mark.timeout(2400)
def test_pod_template_change_replaces_replicas_within_max_unavailable():
    before = infd()
    replicas = before["spec"]["replicas"]
    max_unavailable = 1
    min_ready = replicas - max_unavailable
    old_clusters = names(labelled("rayclusters"))
    endpoints = ReadyEndpoints(NAMESPACE, NAME, SERVICE_PORT)
    # maxNumSeqs is a flag of the head's command: part of the pod template, so it needs new replicas.
    generation = patch_spec({"engine": {"maxNumSeqs": before["spec"]["engine"]["maxNumSeqs"] + 1},
                             "rollout": {"maxUnavailable": max_unavailable, "maxSurge": 0}})
    samples: list[dict] = []
    started = time.monotonic()
    with openai_base_urls(NAMESPACE, NAME, SERVICE_PORT) as next_base_url, \
            Traffic(next_base_url, stream_chat, clients=2) as traffic:
        _sample_rollout(endpoints, generation, replicas, samples, started)
    RESULTS["replacement_traffic"] = traffic.report()
    print(f"streaming during the replacement: {traffic.report()}")
    report = {"samples": len(samples), "seconds": samples[-1]["t"],
              "min_ready_endpoints": min(s["ready_endpoints"] for s in samples),
              "min_ready_heads": min(len(s["ready_heads"]) for s in samples)}
    RESULTS["replacement_roll"] = report
    print(f"pod template rollout: {report}")
    short = [s for s in samples if s["ready_endpoints"] < min_ready or len(s["ready_heads"]) < min_ready]
    assert not short, f"fewer than {min_ready} ready replicas during the rollout: {short[:5]}"
    assert not traffic.failures, traffic.failures[:5]
    assert infd()["status"]["updateRevision"] != before["status"]["updateRevision"]
    new_clusters = names(labelled("rayclusters"))
    assert len(new_clusters) == replicas and not set(new_clusters) & set(old_clusters), (old_clusters, new_clusters)
    with openai_base_urls(NAMESPACE, NAME, SERVICE_PORT) as next_base_url:
        for _ in range(replicas):
            assert chat(next_base_url()).choices[0].message.content.strip()


@pytest.mark.timeout(600)
def test_scale_down_drains_streams():
    """The removed replica leaves the endpoints first and finishes the streams it has (spec.rollout.drainSeconds)."""
    with openai_base_urls(NAMESPACE, NAME, SERVICE_PORT) as next_base_url, \
            Traffic(next_base_url, stream_chat, clients=2) as traffic:
        time.sleep(3)  # streams on both replicas
        kubectl("scale", "infd", NAME, "--replicas", "1")
        deadline = time.monotonic() + 300
        while len(labelled("rayclusters")) > 1 or len(ready_addresses(NAMESPACE, NAME, SERVICE_PORT)) != 1:
            assert time.monotonic() < deadline, "the replica was not removed in 5 minutes"
            time.sleep(1)
        time.sleep(3)  # and streams after it is gone
    RESULTS["scale_down_traffic"] = traffic.report()
    print(f"streaming during the scale-down: {traffic.report()}")
    assert not traffic.failures, traffic.failures[:5]
    assert traffic.requests


@pytest.mark.timeout(600)
def test_delete_leaves_nothing():
    kubectl("delete", "infd", NAME, "--wait=true", timeout=300)
    deadline = time.monotonic() + 300
    kinds = ("rayclusters", "services", "secrets", "pods")
    while True:
        left = {kind: names(labelled(kind)) for kind in kinds}
        left = {kind: found for kind, found in left.items() if found}
        if not left:
            break
        assert time.monotonic() < deadline, f"still there 5 minutes after deletion: {left}"
        time.sleep(5)  # garbage collection of owned objects is asynchronous


# Each case: changes to the manifest, what the error must name, and kubectl's --validate. `false` turns
# kubectl's own checks off, so the refusal can only come from the API server (the CRD's schema and CEL
# rules); unknown fields need `strict`, which asks the server for strict field validation.
INVALID_MANIFESTS = [
    pytest.param({"spec": {"replicas": -1}}, ["spec.replicas"], "false", id="negative-replicas"),
    pytest.param({"spec": {"parallelism": {"tensor": 0}}}, ["spec.parallelism.tensor"], "false", id="zero-tensor"),
    pytest.param({"spec": {"replicaCount": 2}}, ["spec.replicaCount"], "strict", id="unknown-field"),
    pytest.param({"spec": {"model": {"uri": "http://models.example/smollm2"}}}, ["spec.model", "model.uri"],
                 "false", id="uri-scheme"),
    pytest.param({"spec": {"resources": {"cpu": "two"}}}, ["spec.resources.cpu"], "false", id="cpu-quantity"),
    pytest.param({"spec": {"rollout": {"maxSurge": 0, "maxUnavailable": 0}}},
                 ["spec.rollout", "rollout.maxSurge"], "false", id="rollout-cannot-progress"),
    # 37 characters: a valid object name, but its replicas' RayCluster names (name + 17) would exceed KubeRay's
    # 53; the CRD's CEL rule on metadata.name refuses it, saying the limit.
    pytest.param({"metadata": {"name": "x" * 37}}, ["metadata.name must be at most 36 characters"], "false",
                 id="name-too-long-for-kuberay"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("changes, named, validate", INVALID_MANIFESTS)
def test_api_server_refuses_invalid_manifest(changes: dict, named: list[str], validate: str):
    invalid = deep_merge(deep_merge(manifest(), {"metadata": {"name": f"{NAME}-invalid"}}), changes)
    # Server-side dry run: validated exactly like a real create, but nothing starts if it were accepted.
    out = run_kubectl("apply", "--dry-run=server", f"--validate={validate}", "-f", "-", input=yaml.safe_dump(invalid))
    assert out.returncode != 0, f"accepted: {out.stdout}"
    for field in named:
        assert field in out.stderr, out.stderr


@pytest.mark.timeout(300)
def test_why_pods_do_not_run_reaches_the_deployment():
    """The scheduler's reason (here: no node has 64 CPUs) shows in the Degraded condition and an Event."""
    stuck = deep_merge(manifest(), {"metadata": {"name": f"{NAME}-unschedulable"}, "spec": {"resources": {"cpu": "64"}}})
    kubectl("apply", "-f", "-", input=yaml.safe_dump(stuck))
    try:
        wait_for("jsonpath={.status.conditions[?(@.type=='Degraded')].reason}=Unschedulable", 180,
                 name=stuck["metadata"]["name"])
        events = kubectl("get", "events", "--field-selector",
                         f"involvedObject.kind=InferenceDeployment,involvedObject.name={stuck['metadata']['name']}")
        assert "Unschedulable" in events and "Insufficient cpu" in events, events
    finally:
        kubectl("delete", "infd", stuck["metadata"]["name"], "--wait=false")
