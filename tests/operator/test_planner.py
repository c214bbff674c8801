"""Table tests of the pure rollout planner."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from rayprism_operator.api import parse_spec
from rayprism_operator.planner import Observed, Replica, WeightsReport, plan

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
NEW, OLD, OLDER = "new", "old", "older"


def spec(replicas=3, **rollout):
    return parse_spec({"model": {"name": "m", "uri": "hf://org/m", "revision": "v2"}, "replicas": replicas,
                       "rollout": rollout})


def rep(name, revision=NEW, ready=True, age=100, weights="v2", **kw):
    return Replica(name=name, revision=revision, created=NOW - timedelta(seconds=age), ready=ready,
                   ready_since=NOW - timedelta(seconds=age) if ready else None, weights_revision=weights, **kw)


def observe(s, replicas, conditions=()):
    return Observed(spec=s, update_revision=NEW, generation=2, replicas=replicas, conditions=list(conditions),
                    endpoint="http://x/v1", selector="a=b", now=NOW)


def conditions(p):
    return {c["type"]: (c["status"], c["reason"]) for c in p.status["conditions"]}


@pytest.mark.parametrize("case, s, replicas, create, delete", [
    ("nothing yet", spec(3), [], 3, []),
    ("steady", spec(3), [rep("a"), rep("b"), rep("c")], 0, []),
    ("scale up", spec(3), [rep("a")], 2, []),
    ("scale down: not ready first, then newest",
     spec(2), [rep("a", age=300), rep("b", age=200), rep("c", age=100), rep("d", ready=False, age=400)], 0, ["d", "c"]),
    ("rolling, surge 1 unavailable 0: surge first",
     spec(3, maxSurge=1, maxUnavailable=0), [rep(n, OLD) for n in "abc"], 1, []),
    # A replica deleted in a pass holds its pods (and GPUs) until they are gone: its successor comes in a
    # later pass, when it no longer shows (the surge bound counts it as terminating until then).
    ("rolling, surge 0 unavailable 1: delete the oldest first, its successor once it is gone",
     spec(3, maxSurge=0, maxUnavailable=1), [rep("a", OLD, age=300), rep("b", OLD, age=200), rep("c", OLD)], 0, ["a"]),
    ("rolling, surge 0: the successor once the deleted one is gone",
     spec(3, maxSurge=0, maxUnavailable=1), [rep("b", OLD, age=200), rep("c", OLD)], 1, []),
    ("rolling waits for the new replica",
     spec(3, maxSurge=1, maxUnavailable=0), [rep(n, OLD) for n in "abc"] + [rep("n", ready=False, age=1)], 0, []),
    ("rolling: a ready new replica frees one old",
     spec(3, maxSurge=1, maxUnavailable=0), [rep("a", OLD, age=300), rep("b", OLD), rep("c", OLD), rep("n", age=1)],
     0, ["a"]),
    ("not-ready outdated replicas go at once (superseded rollout)",
     spec(3, maxSurge=1, maxUnavailable=0), [rep(n, OLDER) for n in "abc"] + [rep("m", OLD, ready=False)], 0, ["m"]),
    # Two old replicas went down: deleting both would leave 1 serving until a replacement is up, below
    # replicas - maxUnavailable = 2; the newest may be back sooner, so it stays.
    ("not-ready outdated replicas go only within the availability budget",
     spec(3, maxSurge=0, maxUnavailable=1),
     [rep("a", OLD, age=300), rep("b", OLD, ready=False, age=200), rep("c", OLD, ready=False, age=100)], 0, ["b"]),
    ("a not-ready new replica takes from that budget",
     spec(3, maxSurge=1, maxUnavailable=1),
     [rep("a", OLD), rep("b", OLD, ready=False, age=200), rep("c", OLD, ready=False), rep("n", ready=False, age=1)],
     0, ["b"]),
    ("a ready new replica frees the budget for the not-ready old one",
     spec(3, maxSurge=0, maxUnavailable=1),
     [rep("a", OLD, age=300), rep("c", OLD, ready=False, age=100), rep("n", age=1)], 0, ["c"]),
    ("surge bound counts terminating replicas",
     spec(3, maxSurge=1, maxUnavailable=0), [rep(n, OLD) for n in "abc"] + [rep("t", OLD, terminating=True)], 0, []),
    ("recreate deletes every old replica, creates nothing yet",
     spec(2, strategy="Recreate"), [rep("a", OLD), rep("b", OLD)], 0, ["a", "b"]),
    ("recreate waits for terminating old replicas",
     spec(2, strategy="Recreate"), [rep("a", OLD, terminating=True)], 0, []),
    ("recreate creates once the old are gone", spec(2, strategy="Recreate"), [], 2, []),
    ("replicas 0 deletes everything", spec(0), [rep("a"), rep("b", OLD)], 0, ["a", "b"]),
    ("scale down: a replica loading weights goes before serving ones",
     spec(2, maxUnavailable=1),
     [rep("a", age=300, weights="v1", weights_target="v2", weights_since=NOW, admin=WeightsReport("v1", "loading")),
      rep("b", age=200), rep("c", age=100)], 0, ["a"]),
    ("weightUpdate Rolling: other weights are replaced like another revision",
     spec(3, maxUnavailable=1, weightUpdate="Rolling"),
     [rep("a", age=300, weights="v1"), rep("b", age=200, weights="v1"), rep("c", weights="v1")], 0, ["a"]),
    ("weightUpdate Rolling, matching weights: switching rolls nothing",
     spec(3, weightUpdate="Rolling"), [rep("a"), rep("b"), rep("c")], 0, []),
    ("weightUpdate Rolling with Recreate waits for terminating replicas of other weights",
     spec(2, strategy="Recreate", weightUpdate="Rolling"), [rep("a", weights="v1", terminating=True)], 0, []),
])
def test_replica_changes(case, s, replicas, create, delete):
    p = plan(observe(s, replicas))
    assert (p.create, p.delete) == (create, delete), case


@pytest.mark.parametrize("case, s, replicas, start, finish, fail, delete, create", [
    ("one at a time with maxUnavailable 1",
     spec(3, maxUnavailable=1), [rep("a", age=300, weights="v1"), rep("b", weights="v1"), rep("c", weights="v1")],
     ["a"], [], [], [], 0),
    ("two at a time with maxUnavailable 2",
     spec(3, maxUnavailable=2), [rep(n, weights="v1") for n in "abc"], ["a", "b"], [], [], [], 0),
    ("waits while one loads",
     spec(3, maxUnavailable=1),
     [rep("a", weights="v1", weights_target="v2", weights_since=NOW, admin=WeightsReport("v1", "loading")),
      rep("b", weights="v1"), rep("c", weights="v1")], [], [], [], [], 0),
    ("a finished load is recorded and the next starts",
     spec(3, maxUnavailable=1),
     [rep("a", weights="v1", weights_target="v2", weights_since=NOW, admin=WeightsReport("v2", "ready")),
      rep("b", age=300, weights="v1"), rep("c", weights="v1")], ["b"], ["a"], [], [], 0),
    ("a failed load halts the rollout: nothing replaced, no other load starts",
     spec(3, maxUnavailable=1),
     [rep("a", weights="v1", weights_target="v2", weights_since=NOW, admin=WeightsReport("v1", "failed", "x")),
      rep("b", weights="v1"), rep("c")], [], [], ["a"], [], 0),
    ("a load past its timeout halts the rollout",
     spec(3, maxUnavailable=1, weightUpdateTimeoutSeconds=60),
     [rep("a", weights="v1", weights_target="v2", weights_since=NOW - timedelta(seconds=61), admin=None),
      rep("b"), rep("c")], [], [], ["a"], [], 0),
    ("a recorded failure keeps the rollout halted",
     spec(3, maxUnavailable=1),
     [rep("a", weights="v1", weights_failed="v2"), rep("b", weights="v1"), rep("c", weights="v1")], [], [], [], [], 0),
    ("failures of another revision do not count: v3 loads where v2 failed",
     parse_spec({"model": {"name": "m", "uri": "hf://org/m", "revision": "v3"}, "replicas": 2}),
     [rep("a", age=300, weights="v1", weights_failed="v2"), rep("b", weights="v1")], ["a"], [], [], [], 0),
    ("maxUnavailable 0: replaced with surge instead of loaded in place",
     spec(2, maxSurge=1, maxUnavailable=0), [rep("a", weights="v1"), rep("b", weights="v1")], [], [], [], [], 1),
    ("not-ready stale replicas wait",
     spec(2, maxUnavailable=1), [rep("a", ready=False, weights="v1"), rep("b")], [], [], [], [], 0),
])
def test_in_place_weight_updates(case, s, replicas, start, finish, fail, delete, create):
    p = plan(observe(s, replicas))
    assert (p.start_weight_updates, p.finish_weight_updates, p.fail_weight_updates, p.delete, p.create) == (
        start, finish, fail, delete, create), case


def test_a_halted_rollout_says_so_and_keeps_serving():
    replicas = [rep("a", weights="v1", weights_failed="v2"), rep("b", weights="v1")]
    p = plan(observe(spec(2, maxUnavailable=1), replicas))
    conditions = {c["type"]: c for c in p.status["conditions"]}
    assert (conditions["Progressing"]["status"], conditions["Progressing"]["reason"]) == ("False", "WeightUpdateFailed")
    assert "halted" in conditions["Progressing"]["message"] and "a" in conditions["Progressing"]["message"]
    assert conditions["Degraded"]["reason"] == "WeightUpdateFailed"
    assert conditions["Available"]["status"] == "True"  # both still serve v1
    assert p.status["weightsRevision"] == "v1"


def test_status_of_a_finished_rollout():
    p = plan(observe(spec(2), [rep("a"), rep("b")]))
    assert p.status | {"conditions": None} == {
        "observedGeneration": 2, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "availableReplicas": 2,
        "currentRevision": NEW, "updateRevision": NEW, "weightsRevision": "v2", "selector": "a=b",
        "endpoint": "http://x/v1", "conditions": None}
    assert conditions(p) == {"Available": ("True", "MinimumReplicasAvailable"),
                             "Ready": ("True", "AllReplicasReady"),
                             "Progressing": ("True", "NewRevisionAvailable"),
                             "Degraded": ("False", "ReconcileSucceeded")}
    assert [e.reason for e in p.events] == ["RolloutComplete"]
    assert p.requeue_after is None


def test_status_mid_rollout_counts_only_the_new_revision_as_updated():
    replicas = [rep("a", OLD), rep("b", OLD), rep("n", ready=False, age=1)]
    p = plan(observe(spec(2, maxSurge=1, maxUnavailable=0), replicas))
    assert (p.status["replicas"], p.status["readyReplicas"], p.status["updatedReplicas"],
            p.status["availableReplicas"], p.status["currentRevision"]) == (3, 2, 1, 0, OLD)
    assert conditions(p)["Progressing"] == ("True", "RolloutInProgress")
    assert p.requeue_after == pytest.approx(1800 - 1 + 0.1)  # wakes up at the progress deadline


def test_progress_deadline_turns_progressing_false_once():
    s = spec(2, maxSurge=1, maxUnavailable=0, progressDeadlineSeconds=60)
    stuck = [rep("a", OLD), rep("b", OLD), rep("n", ready=False, age=61)]
    p = plan(observe(s, stuck))
    assert conditions(p)["Progressing"] == ("False", "ProgressDeadlineExceeded")
    assert [e.reason for e in p.events] == ["ProgressDeadlineExceeded"]
    again = plan(observe(s, stuck, p.status["conditions"]))
    assert again.events == [] and again.status["conditions"] == p.status["conditions"]  # no new transition


def _progressing(reason: str, since: datetime) -> list[dict]:
    stamp = since.isoformat().replace("+00:00", "Z")
    return [{"type": "Progressing", "status": "True" if reason == "RolloutInProgress" else "False", "reason": reason,
             "message": "", "lastTransitionTime": stamp, "lastUpdateTime": stamp}]


def test_progress_deadline_fires_when_no_replica_of_the_new_revision_can_be_created():
    # Creations refused (quota, admission): there is no new replica whose progress could be counted, so the
    # deadline counts from when the rollout began.
    s = spec(1, maxSurge=1, maxUnavailable=0, progressDeadlineSeconds=60)
    old_only = [rep("a", OLD, age=3600)]
    started = plan(observe(s, old_only))
    assert conditions(started)["Progressing"] == ("True", "RolloutInProgress")
    assert started.requeue_after == pytest.approx(60.1)
    later = plan(observe(s, old_only, _progressing("RolloutInProgress", NOW - timedelta(seconds=61))))
    assert conditions(later)["Progressing"] == ("False", "ProgressDeadlineExceeded")
    # Exceeded stays exceeded until a replica progresses.
    still = plan(observe(s, old_only, later.status["conditions"]))
    assert conditions(still)["Progressing"] == ("False", "ProgressDeadlineExceeded")
    assert "ProgressDeadlineExceeded" not in [e.reason for e in still.events]  # said once


def test_a_replica_unready_in_steady_state_is_not_a_rollout_past_its_deadline():
    s = spec(2, progressDeadlineSeconds=60)
    down = [rep("a"), rep("b", ready=False, age=3600, failure=("CrashLoopBackOff", "pod b-head: back-off"))]
    p = plan(observe(s, down, _progressing("NewRevisionAvailable", NOW - timedelta(seconds=3600))))
    assert conditions(p)["Progressing"][1] != "ProgressDeadlineExceeded"
    assert conditions(p)["Degraded"] == ("True", "CrashLoopBackOff")
    assert conditions(p)["Available"] == ("True", "MinimumReplicasAvailable")


def test_weights_revision_is_reported_only_when_every_replica_has_it():
    mixed = plan(observe(spec(2, maxUnavailable=1), [rep("a", weights="v1"), rep("b")]))
    assert mixed.status["weightsRevision"] is None
    assert mixed.status["updatedReplicas"] == 1
    # A replica draining before its load is unready and still serves v1: status must not say v2.
    draining = rep("a", ready=False, weights="v1", weights_target="v2", weights_since=NOW,
                   admin=WeightsReport("v1", "loading"))
    assert plan(observe(spec(2, maxUnavailable=1), [draining, rep("b")])).status["weightsRevision"] is None


@pytest.mark.parametrize("pods_failure", [("FailedCreateHeadPod", "pods \"x-head\" is forbidden: violates PodSecurity"),
                                          ("Unschedulable", "0/1 nodes are available: 1 Insufficient nvidia.com/gpu")])
def test_why_a_replica_does_not_run_reaches_degraded_and_one_event(pods_failure):
    s = spec(1)
    stuck = [rep("a", ready=False, failure=pods_failure)]
    p = plan(observe(s, stuck))
    degraded = next(c for c in p.status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", pods_failure[0])
    assert pods_failure[1] in degraded["message"]
    assert [(e.type, e.reason) for e in p.events] == [("Warning", pods_failure[0])]
    assert plan(observe(s, stuck, p.status["conditions"])).events == []  # said once, not every pass
    healed = plan(observe(s, [rep("a")], p.status["conditions"]))
    assert next(c for c in healed.status["conditions"] if c["type"] == "Degraded")["status"] == "False"


@pytest.mark.parametrize("case, s, replicas, available", [
    ("nothing runs yet, although maxUnavailable allows 0", spec(1, maxUnavailable=1), [], False),
    ("the only replica is not ready", spec(1, maxUnavailable=1), [rep("a", ready=False, age=1)], False),
    ("the only replica loads weights", spec(1, maxUnavailable=1),
     [rep("a", weights="v1", weights_target="v2", weights_since=NOW, admin=WeightsReport("v1", "loading"))], False),
    ("one replica serves", spec(1, maxUnavailable=1), [rep("a")], True),
    ("an old replica serves", spec(1, maxSurge=1, maxUnavailable=0), [rep("a", OLD), rep("n", ready=False, age=1)],
     True),
    ("scaled to zero: nothing serves", spec(0), [], False),
])
def test_available_means_the_endpoint_can_serve(case, s, replicas, available):
    assert (conditions(plan(observe(s, replicas)))["Available"][0] == "True") == available, case


def test_ready_means_every_replica_is_ready_on_the_update_revision():
    assert conditions(plan(observe(spec(2), [rep("a"), rep("b")])))["Ready"] == ("True", "AllReplicasReady")
    for replicas in ([rep("a"), rep("b", ready=False)],  # one not ready
                     [rep("a"), rep("b", OLD)],  # one of the old revision
                     [rep("a"), rep("b", weights="v1")],  # one with the old weights
                     [rep("a"), rep("b"), rep("c", OLD, terminating=True)]):  # an old one still terminating
        assert conditions(plan(observe(spec(2), replicas)))["Ready"] == ("False", "ReplicasNotReady"), replicas


def test_availability_follows_max_unavailable():
    p = plan(observe(spec(3, maxUnavailable=1), [rep("a"), rep("b"), rep("c", ready=False)]))
    assert conditions(p)["Available"] == ("True", "MinimumReplicasAvailable")
    p = plan(observe(spec(3, maxUnavailable=1), [rep("a"), rep("b", ready=False), rep("c", ready=False)]))
    assert conditions(p)["Available"] == ("False", "MinimumReplicasUnavailable")


def test_a_load_of_a_superseded_revision_is_retargeted_without_budget():
    s = spec(3, maxUnavailable=1)  # model.revision is v2 now; "a" was loading v1.5
    p = plan(observe(s, [rep("a", weights="v1", weights_target="v1.5", weights_since=NOW),
                         rep("b", weights="v1"), rep("c", weights="v1")]))
    assert p.start_weight_updates == ["a"]  # b and c wait: a is still unavailable


def test_no_weights_revision_in_the_spec_means_nothing_to_load():
    s = parse_spec({"model": {"name": "m", "uri": "hf://org/m"}, "replicas": 2})
    p = plan(observe(s, [rep("a", weights=None), rep("b", weights=None)]))
    assert (p.start_weight_updates, p.create, p.delete, p.status["updatedReplicas"]) == ([], 0, [], 2)


def test_a_finished_load_counts_as_progress():
    s = spec(2, maxUnavailable=1, progressDeadlineSeconds=60)
    replicas = [rep("a", age=1000, weights_since=NOW - timedelta(seconds=10)),
                rep("b", age=1000, ready=False, weights="v1")]
    assert conditions(plan(observe(s, replicas)))["Progressing"] == ("True", "RolloutInProgress")
    replicas[0] = rep("a", age=1000, weights_since=NOW - timedelta(seconds=61))
    assert conditions(plan(observe(s, replicas)))["Progressing"] == ("False", "ProgressDeadlineExceeded")


UNHEALTHY = ("ReplicaUnhealthy", "pod a-head container ray-head restarted (1 restart; last exit 137 (SIGKILL; Error "
                                 "at 2026-01-01T00:00:00Z)); its server is loading the model")


def degraded(p):
    return next((c["status"], c["reason"], c["message"]) for c in p.status["conditions"] if c["type"] == "Degraded")


def events(p, reason=None):
    return [(e.type, e.reason, e.message) for e in p.events if reason in (None, e.reason)]


def test_an_unhealthy_replica_is_reported_once_then_its_recovery():
    s = spec(2)
    down = plan(observe(s, [rep("a", ready=False, failure=UNHEALTHY), rep("b")]))
    message = f"replica a: {UNHEALTHY[1]}"
    assert degraded(down) == ("True", "ReplicaUnhealthy", message)
    assert events(down) == [("Warning", "ReplicaUnhealthy", message)]
    assert plan(observe(s, [rep("a", ready=False, failure=UNHEALTHY), rep("b")], down.status["conditions"])).events == []
    back = plan(observe(s, [rep("a"), rep("b")], down.status["conditions"]))
    assert degraded(back) == ("False", "ReconcileSucceeded", "")
    assert events(back, "ReplicaRecovered") == [
        ("Normal", "ReplicaRecovered", "Replica a is ready again after it was reported unhealthy")]
    assert plan(observe(s, [rep("a"), rep("b")], back.status["conditions"])).events == []  # said once


def test_each_failing_replica_is_named_and_each_recovery_told():
    s = spec(3)
    failing = [rep("a", ready=False, failure=("Unschedulable", "pod a-head: 0/1 nodes are available")),
               rep("b", ready=False, failure=UNHEALTHY), rep("c", ready=False, failure=UNHEALTHY)]
    down = plan(observe(s, failing))
    assert degraded(down) == ("True", "Unschedulable", "replica a: pod a-head: 0/1 nodes are available; also failing: "
                                                       "replica b (ReplicaUnhealthy), replica c (ReplicaUnhealthy)")
    # c serves again, b is gone (replaced), a was never unhealthy: only c recovered.
    back = plan(observe(s, [rep("a"), rep("c")], down.status["conditions"]))
    assert events(back, "ReplicaRecovered") == [
        ("Normal", "ReplicaRecovered", "Replica c is ready again after it was reported unhealthy")]


def test_the_degraded_message_keeps_every_name_within_its_length():
    long = ("ReplicaUnhealthy", "x" * 2000)
    p = plan(observe(spec(2), [rep("a", ready=False, failure=long), rep("b", ready=False, failure=UNHEALTHY)]))
    message = degraded(p)[2]
    assert len(message) == 1000 and message.startswith("replica a: xxx")
    assert message.endswith("; also failing: replica b (ReplicaUnhealthy)")
    back = plan(observe(spec(2), [rep("a"), rep("b")], p.status["conditions"]))
    assert [e[2] for e in events(back, "ReplicaRecovered")] == [
        f"Replica {n} is ready again after it was reported unhealthy" for n in "ab"]


@pytest.mark.parametrize("case, replica, record, event", [
    ("grew on a ready replica", rep("a", engine_restarts=2, engine_restarts_seen=1), {"a": 2},
     ("Warning", "EngineRestarted", "Replica a's server restarted its model engine: 2 restart(s) since the server "
                                    "started")),
    ("first seen, and restarted", rep("a", engine_restarts=1), {"a": 1},
     ("Warning", "EngineRestarted", "Replica a's server restarted its model engine: 1 restart(s) since the server "
                                    "started")),
    ("unchanged", rep("a", engine_restarts=2, engine_restarts_seen=2), {}, None),
    ("the server started afresh", rep("a", engine_restarts=0, engine_restarts_seen=3), {"a": 0}, None),
    ("unready: Degraded tells", rep("a", ready=False, engine_restarts=1, failure=UNHEALTHY), {"a": 1}, None),
    ("not asked or no answer", rep("a", engine_restarts=None, engine_restarts_seen=2), {}, None),
])
def test_engine_restarts_the_operator_did_not_see_as_unreadiness(case, replica, record, event):
    p = plan(observe(spec(1), [replica]))
    assert p.record_engine_restarts == record, case
    assert events(p, "EngineRestarted") == ([event] if event else []), case
