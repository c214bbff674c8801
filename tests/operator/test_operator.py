"""The real operator (kopf + rayprism handlers) against kmock's Kubernetes emulator and a KubeRay stand-in."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import subprocess
import sys

import aiohttp
import kmock
import pytest
from kmock import KubernetesError

from rayprism_operator import api, render
from rayprism_operator.main import main

from .harness import (ADMIN_KEY, IDEP, IDEP_PATH, NETWORK_POLICIES, NS, RC, SECRETS, SERVICES, WORKER_IMAGE,
                      FakeAdminApi, OperatorThread, deployment, wait_for, write_kubeconfig)


def status(k8s, name="demo") -> dict:
    return k8s.deployment(name).get("status") or {}


def condition(k8s, type_, name="demo") -> dict:
    return next((c for c in status(k8s, name).get("conditions", []) if c["type"] == type_), {})


def settled(k8s, name="demo", replicas=2) -> bool:
    s = status(k8s, name)
    return (s.get("readyReplicas") == replicas and s.get("availableReplicas") == replicas
            and s.get("replicas") == replicas
            and condition(k8s, "Progressing", name).get("reason") == "NewRevisionAvailable"
            and s.get("observedGeneration") == k8s.deployment(name)["metadata"]["generation"])


async def test_create_makes_replicas_and_becomes_available(k8s, operator):
    await k8s.post(IDEP_PATH, json=deployment(replicas=3))
    await wait_for(lambda: settled(k8s, replicas=3), what="3 ready replicas")
    replicas = k8s.replicas("demo")
    assert len(replicas) == 3 and all(ready for _, ready in replicas.values())
    s = status(k8s)
    revision = s["updateRevision"]
    assert all(name.startswith(f"demo-{revision}-") and len(name) == len(f"demo-{revision}-") + 5 for name in replicas)
    assert s["currentRevision"] == revision and s["weightsRevision"] == "v1" and s["updatedReplicas"] == 3
    assert s["selector"] == "app.kubernetes.io/name=rayprism,rayprism.dev/deployment=demo,ray.io/node-type=head"
    assert s["endpoint"] == f"http://demo.{NS}.svc:8000/v1"
    assert condition(k8s, "Available")["status"] == "True"
    assert condition(k8s, "Degraded")["status"] == "False"
    uid = k8s.deployment("demo")["metadata"]["uid"]
    for name in replicas:
        rc = k8s.objects[RC, NS, name].raw
        assert rc["metadata"]["ownerReferences"][0]["uid"] == uid
        assert rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == WORKER_IMAGE
    await wait_for(lambda: k8s.events("ReplicasCreated") and k8s.events("RolloutComplete"), what="events")
    service = k8s.objects[SERVICES, NS, "demo"].raw
    assert service["spec"]["selector"]["ray.io/node-type"] == "head"
    assert service["metadata"]["ownerReferences"][0]["uid"] == uid
    token = base64.b64decode(k8s.objects[SECRETS, NS, "demo-admin"].raw["data"]["token"]).decode()
    # Derived from the operator's key (it never reads a Secret back), mounted into every head.
    assert token == render.admin_token(ADMIN_KEY.encode(), api.parse_inference_deployment(
        {k: v for k, v in k8s.deployment("demo").items() if k != "status"}))
    policies = {name for (resource, _, name), obj in k8s.objects.items()
                if resource == NETWORK_POLICIES and not obj.deleted}
    assert policies == {"demo-serving", *(f"{name}-ray" for name in replicas)}


async def edit(k8s, patch: dict, name: str = "demo", path: str = "") -> None:
    response = await k8s.patch(f"{IDEP_PATH}/{name}{path}", json=patch)
    assert response.status == 200, await response.text()


def replicas_of(k8s, revision: str) -> dict:
    return {n: r for n, (rev, r) in k8s.replicas("demo").items() if rev == revision}


def assert_bounds(k8s, since: int, want: int, surge: int, unavailable: int) -> None:
    """The rollout bounds over every recorded state of the RayClusters since `since`."""
    assert len(k8s.timeline) > since
    for step, snapshot in enumerate(k8s.timeline[since:], since):
        ready = sum(r for _, r in snapshot.values())
        assert len(snapshot) <= want + surge, f"step {step}: {len(snapshot)} RayClusters: {snapshot}"
        assert ready >= want - unavailable, f"step {step}: only {ready} ready: {snapshot}"


async def test_scale_up_and_down_through_spec_and_scale_subresource(k8s, kuberay, operator):
    await k8s.post(IDEP_PATH, json=deployment(replicas=3))
    await wait_for(lambda: settled(k8s, replicas=3), what="3 ready replicas")
    first = sorted(k8s.replicas("demo"), key=lambda n: k8s.objects[RC, NS, n].raw["metadata"]["creationTimestamp"])

    kuberay.ready_when = lambda rc: False  # the next replicas stay pending
    await edit(k8s, {"spec": {"replicas": 5}})
    await wait_for(lambda: len(k8s.replicas("demo")) == 5 and status(k8s).get("replicas") == 5, what="5 replicas")
    assert status(k8s)["readyReplicas"] == 3

    # kubectl scale: a Scale patch on the /scale subresource; pending replicas go first, then the newest.
    await edit(k8s, {"spec": {"replicas": 2}}, path="/scale")
    await wait_for(lambda: settled(k8s, replicas=2), what="scaled down to 2")
    assert sorted(k8s.replicas("demo")) == sorted(first[:2])
    await wait_for(lambda: len(k8s.events("ReplicaDeleted")) == 3, what="3 deletion events")

    kuberay.ready_when = lambda rc: True
    await edit(k8s, {"spec": {"replicas": 4}})
    await wait_for(lambda: settled(k8s, replicas=4), what="scaled up to 4")


async def test_parallelism_change_rolls_within_surge_and_unavailability(k8s, operator):
    rollout = {"maxSurge": 1, "maxUnavailable": 1}
    await k8s.post(IDEP_PATH, json=deployment(replicas=4, rollout=rollout))
    await wait_for(lambda: settled(k8s, replicas=4), what="4 ready replicas")
    old = status(k8s)["updateRevision"]
    since = len(k8s.timeline)

    await edit(k8s, {"spec": {"parallelism": {"tensor": 2}}})
    await wait_for(lambda: settled(k8s, replicas=4) and status(k8s)["updateRevision"] != old, what="rollout")
    new = status(k8s)["updateRevision"]
    assert len(replicas_of(k8s, new)) == 4 and not replicas_of(k8s, old)
    assert_bounds(k8s, since, want=4, surge=1, unavailable=1)
    rc = k8s.objects[RC, NS, next(iter(replicas_of(k8s, new)))].raw
    assert "--tensor-parallel-size 2" in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["args"][0]


async def test_recreate_removes_the_old_revision_first(k8s, operator):
    await k8s.post(IDEP_PATH, json=deployment(replicas=2, rollout={"strategy": "Recreate"}))
    await wait_for(lambda: settled(k8s), what="2 ready replicas")
    old = status(k8s)["updateRevision"]
    since = len(k8s.timeline)
    await edit(k8s, {"spec": {"engine": {"maxNumSeqs": 8}}})
    await wait_for(lambda: settled(k8s) and status(k8s)["updateRevision"] != old, what="recreated")
    for snapshot in k8s.timeline[since:]:
        revisions = {rev for rev, _ in snapshot.values()}
        assert len(revisions) <= 1, f"old and new revisions side by side: {snapshot}"


async def test_stuck_rollout_exceeds_its_progress_deadline(k8s, kuberay, operator):
    rollout = {"maxSurge": 1, "maxUnavailable": 0, "progressDeadlineSeconds": 1}
    await k8s.post(IDEP_PATH, json=deployment(replicas=2, rollout=rollout))
    await wait_for(lambda: settled(k8s), what="2 ready replicas")
    old = status(k8s)["updateRevision"]
    kuberay.ready_when = lambda rc: rc["metadata"]["labels"]["rayprism.dev/revision"] == old  # new never ready

    await edit(k8s, {"spec": {"image": "example.com/worker:broken"}})
    await wait_for(lambda: condition(k8s, "Progressing").get("reason") == "ProgressDeadlineExceeded",
                   what="deadline")
    assert condition(k8s, "Progressing")["status"] == "False"
    assert condition(k8s, "Available")["status"] == "True"  # the old replicas keep serving
    assert len(replicas_of(k8s, old)) == 2 and len(k8s.replicas("demo")) == 3
    await wait_for(lambda: k8s.events("ProgressDeadlineExceeded"), what="deadline event")
    assert k8s.events("ProgressDeadlineExceeded")[0]["type"] == "Warning"


async def test_edit_mid_rollout_supersedes_it(k8s, kuberay, operator):
    rollout = {"maxSurge": 1, "maxUnavailable": 0}
    await k8s.post(IDEP_PATH, json=deployment(replicas=3, rollout=rollout))
    await wait_for(lambda: settled(k8s, replicas=3), what="3 ready replicas")
    first = status(k8s)["updateRevision"]
    since = len(k8s.timeline)

    kuberay.ready_when = lambda rc: rc["metadata"]["labels"]["rayprism.dev/revision"] == first
    await edit(k8s, {"spec": {"engine": {"maxNumSeqs": 8}}})
    await wait_for(lambda: status(k8s).get("updateRevision") not in (None, first) and len(k8s.replicas("demo")) == 4,
                   what="second revision surging")
    second = status(k8s)["updateRevision"]
    kuberay.ready_when = lambda rc: rc["metadata"]["labels"]["rayprism.dev/revision"] != second
    await edit(k8s, {"spec": {"engine": {"maxNumSeqs": 16}}})
    await wait_for(lambda: settled(k8s, replicas=3) and status(k8s)["updateRevision"] not in (first, second),
                   what="third revision")
    third = status(k8s)["updateRevision"]
    assert set(k8s.replicas("demo")) == set(replicas_of(k8s, third)) and len(replicas_of(k8s, third)) == 3
    assert_bounds(k8s, since, want=3, surge=1, unavailable=0)


async def test_operator_restart_mid_rollout_resumes_it(k8s, kuberay, operator):
    rollout = {"maxSurge": 1, "maxUnavailable": 0}
    await k8s.post(IDEP_PATH, json=deployment(replicas=3, rollout=rollout))
    await wait_for(lambda: settled(k8s, replicas=3), what="3 ready replicas")
    first = status(k8s)["updateRevision"]
    since = len(k8s.timeline)
    kuberay.ready_when = lambda rc: rc["metadata"]["labels"]["rayprism.dev/revision"] == first
    await edit(k8s, {"spec": {"engine": {"maxNumSeqs": 8}}})
    await wait_for(lambda: len(k8s.replicas("demo")) == 4, what="a surge replica")

    await operator.stop()
    kuberay.ready_when = lambda rc: True  # the surge replica becomes ready while no operator runs
    await wait_for(lambda: sum(r for _, r in k8s.replicas("demo").values()) == 4, what="surge replica ready")
    await operator.start()
    await wait_for(lambda: settled(k8s, replicas=3) and status(k8s)["updateRevision"] != first, what="resumed")
    assert not replicas_of(k8s, first)
    assert_bounds(k8s, since, want=3, surge=1, unavailable=0)


async def test_invalid_spec_is_reported_as_degraded_then_recovers(k8s, operator):
    bad = deployment(replicas=1, parallelism={"tensor": 3}, resources={"gpusPerNode": 2})
    await k8s.post(IDEP_PATH, json=bad)
    await wait_for(lambda: condition(k8s, "Degraded").get("reason") == "InvalidSpec", what="Degraded")
    assert "gpusPerNode" in condition(k8s, "Degraded")["message"]
    await wait_for(lambda: k8s.events("InvalidSpec"), what="InvalidSpec event")
    assert not k8s.replicas("demo")

    await edit(k8s, {"spec": {"resources": {"gpusPerNode": 4}}})
    await wait_for(lambda: settled(k8s, replicas=1), what="recovered")
    assert condition(k8s, "Degraded")["status"] == "False"
    assert len(k8s.events("InvalidSpec")) == 1


async def test_an_invalid_edit_leaves_no_stale_condition(k8s, operator):
    await k8s.post(IDEP_PATH, json=deployment(replicas=1))
    await wait_for(lambda: settled(k8s, replicas=1), what="1 ready replica")
    assert condition(k8s, "Available")["status"] == condition(k8s, "Ready")["status"] == "True"

    await edit(k8s, {"spec": {"parallelism": {"tensor": 3}, "resources": {"gpusPerNode": 2}}})
    await wait_for(lambda: condition(k8s, "Degraded").get("reason") == "InvalidSpec", what="Degraded")
    generation = k8s.deployment("demo")["metadata"]["generation"]
    assert {c["type"]: (c["status"], c["reason"], c["observedGeneration"]) for c in status(k8s)["conditions"]} == {
        "Available": ("Unknown", "InvalidSpec", generation), "Ready": ("Unknown", "InvalidSpec", generation),
        "Progressing": ("False", "InvalidSpec", generation), "Degraded": ("True", "InvalidSpec", generation)}


async def test_delete_removes_every_child(k8s, operator):
    await k8s.post(IDEP_PATH, json=deployment(replicas=2))
    await k8s.post(IDEP_PATH, json=deployment("other", replicas=1))
    await wait_for(lambda: settled(k8s) and settled(k8s, "other", replicas=1), what="2 deployments ready")
    assert not k8s.deployment("demo")["metadata"].get("finalizers")
    names = list(k8s.replicas("demo"))
    response = await k8s.delete(f"{IDEP_PATH}/demo")
    assert response.status == 200
    await wait_for(lambda: not k8s.replicas("demo"), what="replicas gone")
    assert all(k8s.objects[RC, NS, n].deleted for n in names)
    assert k8s.objects[SERVICES, NS, "demo"].deleted and k8s.objects[SECRETS, NS, "demo-admin"].deleted
    # The other deployment (its RayClusters were in every unfiltered list) is untouched.
    assert len(k8s.replicas("other")) == 1 and settled(k8s, "other", replicas=1)


@contextlib.asynccontextmanager
async def in_place_replicas(k8s, kuberay, replicas: int, subnet: int):
    """The operator, and `replicas` ready replicas (InPlace, one load at a time) whose servers' admin API is
    FakeAdminApi, one 127.0.<subnet>.x address each; yields (admin, operator)."""
    async with FakeAdminApi(k8s, "demo", [f"127.0.{subnet}.{i}" for i in range(1, 9)]) as admin:
        kuberay.assign_pod_ip = admin.start_replica
        op = OperatorThread()
        await op.start()
        try:
            rollout = {"maxSurge": 0, "maxUnavailable": 1, "weightUpdate": "InPlace"}
            await k8s.post(IDEP_PATH, json=deployment(replicas=replicas, rollout=rollout))
            await wait_for(lambda: settled(k8s, replicas=replicas), what=f"{replicas} ready replicas")
            yield admin, op
        finally:
            await op.stop()


async def test_a_revision_that_fails_to_load_halts_the_rollout_and_the_next_one_resumes(k8s, kuberay):
    async with in_place_replicas(k8s, kuberay, 3, subnet=57) as (admin, op):
        revision, before = status(k8s)["updateRevision"], set(k8s.replicas("demo"))
        since = len(k8s.timeline)
        failing = sorted(before)[1]
        admin.failing.add(kuberay.pod_ips[failing])

        await edit(k8s, {"spec": {"model": {"revision": "v2"}}})
        # The operator restarts while the first replica loads: it resumes from the annotations and
        # reads the admin token back from the Secret.
        await wait_for(lambda: any("rayprism.dev/weights-target" in k8s.objects[RC, NS, n].raw["metadata"]
                                   ["annotations"] for n in before), what="a load in flight")
        await op.stop()
        await op.start()
        await wait_for(lambda: condition(k8s, "Progressing").get("reason") == "WeightUpdateFailed",
                       timeout=60, what="the rollout halted")
        assert condition(k8s, "Progressing")["status"] == "False"
        assert condition(k8s, "Degraded")["reason"] == "WeightUpdateFailed"
        assert condition(k8s, "Available")["status"] == "True"
        # Nothing was replaced: a replacement would start on v2 and fail again. The failing replica
        # serves v1 still; no load started after the failure.
        await asyncio.sleep(1)
        assert set(k8s.replicas("demo")) == before and status(k8s)["updateRevision"] == revision
        assert admin.weights[kuberay.pod_ips[failing]]["revision"] == "v1"
        served = {admin.weights[kuberay.pod_ips[n]]["revision"] for n in before}
        assert status(k8s).get("weightsRevision") == (served.pop() if len(served) == 1 else None)
        assert k8s.events("WeightUpdateFailed")
        assert admin.loading_peak == 1  # maxUnavailable: one replica loads at a time

        # v3 loads: the failures were v2's. It loads everywhere, in place, and the rollout completes.
        admin.failing.clear()
        await edit(k8s, {"spec": {"model": {"revision": "v3"}}})
        await wait_for(lambda: status(k8s).get("weightsRevision") == "v3" and settled(k8s, replicas=3),
                       timeout=60, what="weights v3 everywhere")
        assert set(k8s.replicas("demo")) == before
        for name in before:
            annotations = k8s.objects[RC, NS, name].raw["metadata"]["annotations"]
            assert annotations["rayprism.dev/weights-revision"] == "v3"
            head = k8s.objects[RC, NS, name].raw["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
            assert "--model-revision v3" in head["args"][0]  # a restarted head loads v3 too
            assert admin.weights[kuberay.pod_ips[name]]["revision"] == "v3"
        assert_bounds(k8s, since, want=3, surge=0, unavailable=1)


async def test_a_replica_back_on_old_weights_is_reported_and_reloaded(k8s, kuberay, monkeypatch):
    """A head container restart (OOM, liveness) brings the server back on the revision in its pod's args,
    whatever the annotation says: status must say what is served, and the operator must load the
    desired revision again. Nothing announces it but the server itself (a periodic resync asks)."""
    monkeypatch.setenv("RAYPRISM_RESYNC_SECONDS", "0.5")
    async with in_place_replicas(k8s, kuberay, 2, subnet=58) as (admin, _):
        await edit(k8s, {"spec": {"model": {"revision": "v2"}}})
        await wait_for(lambda: status(k8s).get("weightsRevision") == "v2", what="weights v2")
        restarted = kuberay.pod_ips[sorted(k8s.replicas("demo"))[0]]
        admin.weights[restarted].update(revision="v1", state="ready")  # the server came back on v1
        await wait_for(lambda: status(k8s).get("weightsRevision") is None, what="status no longer says v2")
        await wait_for(lambda: admin.weights[restarted] == {**admin.weights[restarted], "revision": "v2",
                                                             "state": "ready"}, what="v2 loaded again")
        await wait_for(lambda: status(k8s).get("weightsRevision") == "v2", what="weights v2 again")


async def test_a_replica_that_stops_serving_is_reported_with_its_servers_words_then_its_recovery(k8s, kuberay):
    async with in_place_replicas(k8s, kuberay, 2, subnet=59) as (admin, _):
        faulty = sorted(k8s.replicas("demo"))[0]
        server = admin.weights[kuberay.pod_ips[faulty]]
        await kuberay.set_ready(faulty, False)
        await wait_for(lambda: condition(k8s, "Degraded").get("reason") == "ReplicaUnhealthy", what="unready seen")
        # Its server restarts the engine (a worker died), and says so once asked (a count that grew on a
        # replica still seen ready would be an EngineRestarted event).
        server.update(state="restarting", error="a worker died: ActorDiedError", restarts=1)
        said = "its server is restarting the model engine (restart 1): a worker died: ActorDiedError"
        await wait_for(lambda: condition(k8s, "Degraded").get("message", "").endswith(said), what="unhealthy")
        message = condition(k8s, "Degraded")["message"]
        assert condition(k8s, "Degraded")["reason"] == "ReplicaUnhealthy" and message.startswith(f"replica {faulty}: ")
        await wait_for(lambda: message in [e["message"] for e in k8s.events("ReplicaUnhealthy")], what="its event")

        server.update(state="ready", error=None)
        await kuberay.set_ready(faulty)
        await wait_for(lambda: k8s.events("ReplicaRecovered"), what="recovered")
        assert condition(k8s, "Degraded")["status"] == "False"
        assert [e["message"] for e in k8s.events("ReplicaRecovered")] == [
            f"Replica {faulty} is ready again after it was reported unhealthy"]
        assert not k8s.events("EngineRestarted")  # that restart was reported as unreadiness

        server["restarts"] = 2  # healed between two looks: only its count tells
        await wait_for(lambda: k8s.events("EngineRestarted"), what="the restart the operator did not see")
        assert [e["message"] for e in k8s.events("EngineRestarted")] == [
            f"Replica {faulty}'s server restarted its model engine: 2 restart(s) since the server started"]
        assert k8s.objects[RC, NS, faulty].raw["metadata"]["annotations"]["rayprism.dev/engine-restarts"] == "2"


async def test_children_it_does_not_own_are_refused_and_owned_ones_recreated(k8s, operator):
    # A Service of the deployment's name that someone else made: never adopted, never patched.
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "demo", "namespace": NS},
               "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 80}]}}
    assert (await k8s.post(f"/api/v1/namespaces/{NS}/services", json=foreign)).status in (200, 201)
    await k8s.post(IDEP_PATH, json=deployment(replicas=1))
    await wait_for(lambda: condition(k8s, "Degraded").get("reason") == "ChildNotOwned", what="ChildNotOwned")
    assert "Service" in condition(k8s, "Degraded")["message"] and "demo" in condition(k8s, "Degraded")["message"]
    assert k8s.objects[SERVICES, NS, "demo"].raw["spec"]["selector"] == {"app": "theirs"}
    assert not k8s.replicas("demo")  # nothing is built on a name it cannot have
    assert k8s.events("ChildNotOwned")
    # Once the name is free, the operator makes its own, and recreates it if it is deleted later.
    await k8s.delete(f"/api/v1/namespaces/{NS}/services/demo")
    await wait_for(lambda: settled(k8s, replicas=1), what="ready once the name is free")
    await k8s.delete(f"/api/v1/namespaces/{NS}/services/demo")
    await wait_for(lambda: (NS, "demo") in {(ns, n) for (r, ns, n), o in k8s.objects.items()
                                            if r == SERVICES and not o.deleted}, timeout=60, what="Service recreated")


async def test_transient_api_errors_are_retried(k8s, operator):
    # The first two RayCluster creations answer 503 although kmock stores them (as when an API
    # server's answer is lost), and the first status write answers 500.
    lost_creations = k8s[kmock.action.CREATE, RC][:2] << 503
    failed_status = k8s[kmock.action.UPDATE, IDEP, kmock.subresource("status")][:1] << 500
    rollout = {"maxSurge": 1, "maxUnavailable": 0}
    await k8s.post(IDEP_PATH, json=deployment(replicas=3, rollout=rollout))
    await wait_for(lambda: settled(k8s, replicas=3), what="3 ready replicas despite errors")
    assert len(list(lost_creations)) == 2 and len(list(failed_status)) == 1
    assert all(len(snapshot) <= 3 for snapshot in k8s.timeline)  # no duplicate from a blind retry


def test_the_console_script_takes_kopfs_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("Usage: rayprism-operator")
    for flag in ("--all-namespaces", "--namespace", "--standalone", "--liveness", "--verbose", "--peering"):
        assert flag in usage


def test_the_operator_imports_without_torch_or_ray():
    # The operator image installs neither; importing them by accident would break it there.
    code = ("import sys, rayprism_operator.main, rayprism_operator.handlers; "
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


async def test_a_refused_change_is_reported_as_degraded_and_retried(k8s, operator):
    refused = []

    def admission(request):  # an admission webhook that refuses the first three RayClusters
        if request.action == kmock.action.CREATE and request.resource == RC and len(refused) < 3:
            refused.append(request)
            return KubernetesError(status=403, reason="Forbidden", message="denied by policy")

    k8s.admission = admission
    await k8s.post(IDEP_PATH, json=deployment(replicas=1))
    await wait_for(lambda: condition(k8s, "Degraded").get("reason") == "ApplyFailed", what="ApplyFailed")
    assert "denied by policy" in condition(k8s, "Degraded")["message"]
    await wait_for(lambda: k8s.events("ApplyFailed"), what="ApplyFailed event")
    await wait_for(lambda: settled(k8s, replicas=1), what="recovered once allowed")
    assert condition(k8s, "Degraded")["status"] == "False" and len(refused) == 3


async def test_a_rotated_token_makes_the_operator_log_in_again(k8s, operator, tmp_path):
    await k8s.post(IDEP_PATH, json=deployment(replicas=1))
    await wait_for(lambda: settled(k8s, replicas=1), what="1 ready replica")
    # The service account token is rotated: the old one is refused from now on.
    write_kubeconfig(tmp_path / "kubeconfig", str(k8s.url), token="rotated")
    stale = []

    def authentication(request):
        if request.headers.get("Authorization") == "Bearer test":
            stale.append(request)
            return KubernetesError(status=401, reason="Unauthorized", message="token expired")

    k8s.admission = authentication
    await edit(k8s, {"spec": {"replicas": 2}}, path="/scale")
    await wait_for(lambda: settled(k8s, replicas=2), what="scaled with the new token")
    assert stale  # the operator did try the old token first


async def test_prometheus_metrics_on_the_configured_port(k8s, kuberay, monkeypatch):
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAYPRISM_METRICS_PORT", str(port))
    op = OperatorThread()
    await op.start()
    try:
        await k8s.post(IDEP_PATH, json=deployment(replicas=2))
        await wait_for(lambda: settled(k8s), what="2 ready replicas")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                text = await response.text()
    finally:
        await op.stop()
    assert 'rayprism_operator_replicas{deployment="demo",namespace="default",state="ready"} 2.0' in text
    assert 'rayprism_operator_reconciles_total{result="success"}' in text
    assert "rayprism_operator_reconcile_seconds_bucket" in text


INFERENCE_POOLS = kmock.resource("inference.networking.k8s.io/v1/inferencepools")


async def test_an_inference_pool_waits_for_its_crd_without_holding_the_replicas(k8s, operator):
    """Without the InferencePool CRD the replicas are still made and Degraded says what is missing; once it is
    installed the pool appears (owned, over the heads), Degraded clears, and removing the field deletes it."""
    installed = False

    def no_such_kind(request):  # kmock serves any resource: answer as an API server without the CRD does
        if request.resource == INFERENCE_POOLS and not installed:
            return KubernetesError(status=404, reason="NotFound", message="the server could not find the requested "
                                                                         "resource")

    k8s.admission = no_such_kind
    router = {"inferencePool": {"endpointPickerRef": {"name": "demo-epp", "port": {"number": 9002}}}}
    await k8s.post(IDEP_PATH, json=deployment(replicas=1, router=router))
    await wait_for(lambda: condition(k8s, "Degraded").get("reason") == "InferencePoolCRDMissing", what="CRD missing")
    assert "inference.networking.k8s.io_inferencepools.yaml" in condition(k8s, "Degraded")["message"]
    await wait_for(lambda: status(k8s).get("readyReplicas") == 1, what="the replica, pool or not")
    await asyncio.sleep(3)  # resyncs (every 2 s here) keep the condition and post no second event
    assert condition(k8s, "Degraded").get("reason") == "InferencePoolCRDMissing"
    assert len(k8s.events("InferencePoolCRDMissing")) == 1

    installed = True

    def pool() -> dict | None:
        return next((o.raw for (r, ns, n), o in k8s.objects.items()
                     if (r, ns, n) == (INFERENCE_POOLS, NS, "demo") and not o.deleted), None)

    await wait_for(lambda: pool() is not None, what="the InferencePool")
    assert pool()["spec"]["selector"]["matchLabels"] == k8s.objects[SERVICES, NS, "demo"].raw["spec"]["selector"]
    assert pool()["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool()["metadata"]["ownerReferences"][0]["uid"] == k8s.deployment("demo")["metadata"]["uid"]
    await wait_for(lambda: condition(k8s, "Degraded").get("status") == "False", what="Degraded cleared")

    # Drift is patched back, a picker of another kind without its port included.
    await k8s.patch(f"/apis/inference.networking.k8s.io/v1/namespaces/{NS}/inferencepools/demo",
                    json={"spec": {"targetPorts": [{"number": 9999}]}})
    await wait_for(lambda: pool()["spec"]["targetPorts"] == [{"number": 8000}], what="the drift patched back")
    await edit(k8s, {"spec": {"router": {"inferencePool": {"endpointPickerRef": {
        "name": "picker", "kind": "Gateway", "group": "gateway.example.com", "port": None}}}}})
    await wait_for(lambda: pool()["spec"]["endpointPickerRef"] == {
        "group": "gateway.example.com", "kind": "Gateway", "name": "picker", "failureMode": "FailClose"},
        what="the new picker")

    await edit(k8s, {"spec": {"router": {"inferencePool": None}}})
    await wait_for(lambda: pool() is None, what="the InferencePool deleted")
