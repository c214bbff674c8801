"""The rollout planner: from what exists to what should change. Pure: no I/O, no clock, no randomness.

It plays the Deployment controller for replicas that are whole RayClusters. Every call looks at the
observed state only (the InferenceDeployment, its RayClusters with their labels, annotations and
status, and what the replicas' admin API said), so an operator that restarts resumes where it was.

One pass, in this order, keeps both rollout bounds at every moment (deletions are applied before
creations): never more than `replicas + maxSurge` RayClusters, never fewer than
`replicas - maxUnavailable` available ones. Not-ready old replicas are removed only within a budget
(the Deployment controller's cleanupUnhealthyReplicas), so that one which may come back is not replaced
when that would keep fewer than `replicas - maxUnavailable` serving for longer.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from .api import InferenceDeploymentSpec

# How often in-flight weight loads are polled when nothing else wakes the reconcile.
DEFAULT_WEIGHTS_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class WeightsReport:
    """What a replica's GET /admin/v1/weights answered."""

    revision: str | None
    state: str  # ready | loading | failed | restarting (the server rebuilds a dead engine)
    error: str | None = None
    restarts: int | None = None  # the engine's restarts since the server started (None: the server does not say)


@dataclass(frozen=True)
class Replica:
    """One RayCluster as the planner sees it."""

    name: str
    revision: str  # the rayprism.dev/revision label
    created: datetime
    ready: bool  # HeadPodReady and every worker ready
    ready_since: datetime | None = None
    terminating: bool = False  # deletionTimestamp set: still counts toward the surge bound
    weights_revision: str | None = None  # model.revision the replica has loaded (annotation)
    weights_target: str | None = None  # revision of an in-flight in-place load (annotation)
    weights_since: datetime | None = None  # when a load was last asked for, or finished (annotation)
    weights_failed: str | None = None  # revision whose in-place load failed (annotation)
    admin: WeightsReport | None = None  # polled only while a load is in flight; None: no answer
    # Why it does not serve: (reason, message). ReplicaUnhealthy: it served once and does not now; else why
    # KubeRay or the scheduler cannot make its pods run, e.g. KubeRay's ReplicaFailure (FailedCreateHeadPod:
    # refused by admission), Unschedulable, ImagePullBackOff.
    failure: tuple[str, str] | None = None
    engine_restarts: int | None = None  # what its server says (WeightsReport.restarts); None: not asked or no answer
    engine_restarts_seen: int = 0  # the count last recorded (Plan.record_engine_restarts)


@dataclass(frozen=True)
class Observed:
    spec: InferenceDeploymentSpec
    update_revision: str  # revision_hash of the spec
    generation: int | None
    replicas: list[Replica]
    conditions: list[dict]  # the current status.conditions (to keep transition times)
    endpoint: str
    selector: str
    now: datetime
    weights_poll_seconds: float = DEFAULT_WEIGHTS_POLL_SECONDS


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    create: int = 0  # new replicas of the update revision
    delete: list[str] = field(default_factory=list)
    start_weight_updates: list[str] = field(default_factory=list)
    finish_weight_updates: list[str] = field(default_factory=list)  # loaded: record the revision
    fail_weight_updates: list[str] = field(default_factory=list)  # failed or timed out: replace
    record_engine_restarts: dict[str, int] = field(default_factory=dict)  # replica -> its server's count now
    status: dict = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None  # seconds until something time-based may change


def _by_created(replicas: list[Replica], newest_first: bool = False) -> list[Replica]:
    return sorted(replicas, key=lambda r: (r.created, r.name), reverse=newest_first)


def _removal_order(replicas: list[Replica], loading: set[str]) -> list[Replica]:
    """Scale-down order: not-ready replicas first, then those loading weights (they serve nothing either),
    then the newest."""
    return sorted(_by_created(replicas, newest_first=True), key=lambda r: (r.ready, r.name not in loading))


def plan(obs: Observed) -> Plan:
    spec, rollout = obs.spec, obs.spec.rollout
    want, target_weights = spec.replicas, spec.model.revision
    in_place = rollout.weight_update == "InPlace"
    out = Plan()

    def superseded(r: Replica) -> bool:
        # The revision hash leaves model.revision out (so switching rollout.weightUpdate rolls nothing):
        # Rolling replaces replicas whose weights differ, InPlace loads model.revision into them.
        return r.revision != obs.update_revision or (not in_place and r.weights_revision != target_weights)

    live = [r for r in obs.replicas if not r.terminating]
    terminating = [r for r in obs.replicas if r.terminating]
    current = [r for r in live if not superseded(r)]
    outdated = [r for r in live if superseded(r)]
    progress = _last_progress(current)

    # Weights of current-revision replicas (only InPlace leaves them behind the spec).
    failed, replace, loading, stale = (_weights(obs, current, out) if in_place and target_weights is not None
                                       else (set(), set(), set(), []))
    finished = set(out.finish_weight_updates)
    # A revision that failed to load halts its rollout, as a Deployment stops on failing new pods: the
    # replica that failed keeps serving its old weights (the server keeps them), no other load starts, and
    # nothing is replaced (a replacement would start on the failing revision and crash-loop). A new
    # model.revision resumes: failures count against the revision that failed.
    if failed:
        stale = []
    # Replicas that will be replaced: outdated, or weights that may not be loaded in place (maxUnavailable 0).
    outdated += [r for r in current if r.name in replace]
    current = [r for r in current if r.name not in replace]

    def available(r: Replica) -> bool:
        return r.ready and r.name not in loading

    # 1. Scale the current revision down to spec.replicas: those serving nothing first, then the newest.
    excess = max(0, len(current) - want)
    if excess:
        for r in _removal_order(current, loading)[:excess]:
            out.delete.append(r.name)
        current = [r for r in current if r.name not in out.delete]
        stale = [r for r in stale if r.name not in out.delete]
        loading -= set(out.delete)

    # 2. Replace outdated replicas.
    min_available = want - rollout.max_unavailable
    recreating = rollout.strategy == "Recreate" and bool(outdated)
    if recreating:
        out.delete += [r.name for r in outdated]
        outdated = []
    else:
        # Not-ready outdated replicas serve nothing (this also supersedes a rollout that an edit
        # interrupted: its starting replicas go first), but one that is only briefly down would be back
        # long before a replacement: remove them only while the rest can still make min_available, not
        # counting current replicas that are not available yet (the Deployment controller's maxScaledDown).
        budget = len(current) + len(outdated) - min_available - sum(not available(r) for r in current)
        unready = _by_created([r for r in outdated if not r.ready])[: max(0, budget)]
        out.delete += [r.name for r in unready]
        outdated = [r for r in outdated if r.name not in out.delete]
        spare = sum(available(r) for r in current + outdated) - min_available
        for r in sorted(_by_created(outdated), key=lambda r: r.ready)[: max(0, spare)]:  # not-ready first
            out.delete.append(r.name)
        outdated = [r for r in outdated if r.name not in out.delete]

    # 3. Start in-place weight loads, at most maxUnavailable at a time and within the availability bound.
    if stale:
        spare = sum(available(r) for r in current + outdated) - min_available
        budget = min(rollout.max_unavailable - len(loading), spare)
        for r in _by_created([r for r in stale if r.ready])[: max(0, budget)]:
            out.start_weight_updates.append(r.name)
            loading.add(r.name)
            out.events.append(Event("Normal", "WeightUpdateStarted",
                                    f"Asked replica {r.name} to load weights revision {target_weights}"))

    # 4. Create replicas of the update revision, within replicas + maxSurge RayClusters.
    # Recreate: nothing new until every old replica is gone (the deletions' watch events wake us).
    blocked_by_recreate = recreating or (rollout.strategy == "Recreate" and any(
        superseded(r) for r in terminating))
    # Replicas deleted in this pass still hold their pods (and GPUs) until those are gone, like terminating ones.
    total = len(current) + len(outdated) + len(terminating) + len(out.delete)
    if not blocked_by_recreate:
        out.create = max(0, min(want - len(current), want + rollout.max_surge - total))

    deleted = set(out.delete)
    for name in out.delete:
        out.events.append(Event("Normal", "ReplicaDeleted", f"Deleted replica {name}"))
    if out.create:
        out.events.append(Event("Normal", "ReplicasCreated",
                                f"Creating {out.create} replica(s) of revision {obs.update_revision}"))

    # Status, from what exists after this pass's deletions (creations show up on the next pass).
    remaining = [r for r in live if r.name not in deleted]

    def weights_current(r: Replica) -> bool:
        return not in_place or target_weights is None or r.weights_revision == target_weights or r.name in finished

    updated = [r for r in current if r.name not in deleted and weights_current(r)]
    ready = [r for r in remaining if r.ready]
    available_now = [r for r in updated if r.ready and r.name not in loading]
    serving = Counter(r.revision for r in ready)
    # What every replica serves, not only the ready ones: a replica draining or loading is unready, and
    # still holds the weights it had.
    weights = {r.weights_revision if r.name not in finished else target_weights for r in remaining}
    complete = len(available_now) == want and len(remaining) + len(terminating) == want

    # The deadline runs only while a rollout is in progress (a replica not yet on the update revision and its
    # weights, or fewer of those than wanted), counted from its last progress or, before any, from when it
    # began (so it fires also when no new replica can be created: quota, admission, scheduling). A ready
    # replica that goes unready in steady state is no rollout: Available and Degraded say so.
    in_rollout = not complete and (len(updated) < want or any(r not in updated for r in remaining))
    deadline_passed, progress = _deadline(obs, progress) if in_rollout else (False, None)
    if complete:
        progressing = ("True", "NewRevisionAvailable", f"Revision {obs.update_revision} is available")
    elif failed:
        progressing = ("False", "WeightUpdateFailed",
                       f"weights revision {target_weights} failed to load on {', '.join(sorted(failed))}: the rollout "
                       "is halted and every replica keeps the weights it has; set model.revision to one that loads")
    elif deadline_passed:
        progressing = ("False", "ProgressDeadlineExceeded",
                       f"Rollout to revision {obs.update_revision} made no progress for "
                       f"{rollout.progress_deadline_seconds}s")
    else:
        progressing = ("True", "RolloutInProgress",
                       f"{len(available_now)} of {want} replicas of revision {obs.update_revision} available")
    # Available: the endpoint can serve, so never with no replica serving, whatever maxUnavailable allows.
    serving_now = sum(available(r) for r in remaining)
    availability = (("True", "MinimumReplicasAvailable", f"{serving_now} of {want} replicas serving")
                    if serving_now >= max(1, min_available) else
                    ("False", "MinimumReplicasUnavailable",
                     f"{serving_now} of {want} replicas serving; at least {max(1, min_available)} needed"))
    readiness = (("True", "AllReplicasReady", f"{want} of {want} replicas ready on revision {obs.update_revision}")
                 if complete else
                 ("False", "ReplicasNotReady",
                  f"{len(available_now)} of {want} replicas ready on revision {obs.update_revision}"))
    failing = sorted((r.name, r.failure) for r in live if r.failure and r.name not in out.delete)
    if failed:
        degraded = ("True", "WeightUpdateFailed", progressing[2])
    elif failing:
        degraded = ("True", failing[0][1][0], _degraded_message(failing))
    else:
        degraded = ("False", "ReconcileSucceeded", "")

    conditions = set_conditions(obs.conditions, obs.now, obs.generation, {
        "Available": availability, "Ready": readiness, "Progressing": progressing, "Degraded": degraded})
    previous = {c["type"]: c for c in obs.conditions}
    was_progressing = previous.get("Progressing", {}).get("reason")
    if progressing[1] == "ProgressDeadlineExceeded" and was_progressing != progressing[1]:
        out.events.append(Event("Warning", "ProgressDeadlineExceeded", progressing[2]))
    if complete and was_progressing != "NewRevisionAvailable":
        out.events.append(Event("Normal", "RolloutComplete", progressing[2]))
    was_degraded = previous.get("Degraded", {})
    if failing and (was_degraded.get("reason"), was_degraded.get("message")) != degraded[1:]:
        out.events.append(Event("Warning", degraded[1], degraded[2]))
    serving_again = _reported_unhealthy(was_degraded) & {r.name for r in remaining if r.ready and not r.failure}
    for name in sorted(serving_again):
        out.events.append(Event("Normal", "ReplicaRecovered", f"Replica {name} is ready again after it was "
                                                              "reported unhealthy"))
    for r in remaining:
        if r.engine_restarts is None or r.engine_restarts == r.engine_restarts_seen:
            continue
        out.record_engine_restarts[r.name] = r.engine_restarts
        # An unready one is reported by Degraded; a lower count is a server that started afresh.
        if r.ready and r.engine_restarts > r.engine_restarts_seen:
            out.events.append(Event("Warning", "EngineRestarted", f"Replica {r.name}'s server restarted its model "
                                    f"engine: {r.engine_restarts} restart(s) since the server started"))

    out.status = {
        "observedGeneration": obs.generation,
        "replicas": len(remaining) + len(terminating),
        "readyReplicas": len(ready),
        "updatedReplicas": len(updated),
        "availableReplicas": len(available_now),
        "currentRevision": serving.most_common(1)[0][0] if serving else obs.update_revision,
        "updateRevision": obs.update_revision,
        "weightsRevision": weights.pop() if len(weights) == 1 else None,
        "selector": obs.selector,
        "endpoint": obs.endpoint,
        "conditions": conditions,
    }

    deadline = progress if not deadline_passed else None
    out.requeue_after = _requeue_after(obs, loading, deadline)
    return out


def _degraded_message(failing: list[tuple[str, tuple[str, str]]]) -> str:
    """The first failing replica with its message, then the others with their reasons (within 1000
    characters: the first's message is cut first). _reported_unhealthy reads the names back."""
    (name, (_, message)), others = failing[0], failing[1:]
    also = ("; also failing: " + ", ".join(f"replica {n} ({reason})" for n, (reason, _) in others)) if others else ""
    first = f"replica {name}: {message}"
    return (first[:max(len(name) + 10, 1000 - len(also))] + also)[:1000]


def _reported_unhealthy(degraded: dict) -> set[str]:
    """The replicas a Degraded condition (as _degraded_message writes it) reported ReplicaUnhealthy."""
    if degraded.get("status") != "True":
        return set()
    message = degraded.get("message") or ""
    names = set(re.findall(r"replica (\S+) \(ReplicaUnhealthy\)", message))
    if degraded.get("reason") == "ReplicaUnhealthy" and (first := re.match(r"replica (\S+): ", message)):
        names.add(first[1])
    return names


def _requeue_after(obs: Observed, loading: set[str], progress: datetime | None) -> float | None:
    """When to look again for what no watch event announces: in-flight loads (polled, and their
    timeouts) and the progress deadline counted from `progress`."""
    rollout, waits = obs.spec.rollout, []
    for r in obs.replicas:
        if r.name in loading:
            elapsed = (obs.now - (r.weights_since or obs.now)).total_seconds()
            # Back-off: a quarter of the time the load has taken, between the poll interval and 10 s, so a
            # replica that does not answer (or answers 5xx) is asked again less and less often.
            waits.append(min(10.0, max(obs.weights_poll_seconds, elapsed / 4)))
            waits.append(rollout.weight_update_timeout_seconds - elapsed + 0.1)
    if progress is not None:
        waits.append(rollout.progress_deadline_seconds - (obs.now - progress).total_seconds() + 0.1)
    return max(0.1, min(waits)) if waits else None


def _weights(obs: Observed, current: list[Replica],
             out: Plan) -> tuple[set[str], set[str], set[str], list[Replica]]:
    """Where each current-revision replica stands with model.revision: (failed, replace, loading, stale).
    Finished and failed loads are recorded in `out` (with their events)."""
    rollout, target_weights = obs.spec.rollout, obs.spec.model.revision
    failed: set[str] = set()
    replace: set[str] = set()
    loading: set[str] = set()
    stale: list[Replica] = []
    for r in current:
        if r.weights_revision == target_weights:
            continue
        if r.weights_failed is not None and r.weights_failed == target_weights:
            failed.add(r.name)
        elif r.weights_target == target_weights:
            report = r.admin
            started = r.weights_since or obs.now
            if report and report.state == "ready" and report.revision == target_weights:
                out.finish_weight_updates.append(r.name)
                out.events.append(Event("Normal", "WeightsUpdated",
                                        f"Replica {r.name} loaded weights revision {target_weights}"))
            elif report and report.state == "failed":
                failed.add(r.name)
                out.fail_weight_updates.append(r.name)
                out.events.append(Event("Warning", "WeightUpdateFailed",
                                        f"Replica {r.name} failed to load weights revision "
                                        f"{target_weights}: {report.error}; the rollout is halted"))
            elif (obs.now - started).total_seconds() >= rollout.weight_update_timeout_seconds:
                failed.add(r.name)
                out.fail_weight_updates.append(r.name)
                out.events.append(Event("Warning", "WeightUpdateFailed",
                                        f"Replica {r.name} did not load weights revision {target_weights} "
                                        f"within {rollout.weight_update_timeout_seconds}s; the rollout is halted"))
            else:
                loading.add(r.name)
        elif r.weights_target is not None:
            # Still loading a revision the spec moved past: ask for the new one (it is unavailable
            # anyway, so this takes nothing from the budget).
            out.start_weight_updates.append(r.name)
            loading.add(r.name)
            out.events.append(Event("Normal", "WeightUpdateStarted",
                                    f"Asked replica {r.name} to load weights revision {target_weights} "
                                    f"instead of {r.weights_target}"))
        elif rollout.max_unavailable == 0:
            # No replica may go unavailable, so an in-place load is never allowed: replace instead.
            replace.add(r.name)
        else:
            stale.append(r)
    return failed, replace, loading, stale


def _deadline(obs: Observed, replica_progress: datetime | None) -> tuple[bool, datetime | None]:
    """(exceeded, last progress) of the rollout in progress. Progress: a replica's, or the rollout's start
    (the Progressing condition's last update to RolloutInProgress; now, when it starts). Once exceeded, it
    stays so until a replica progresses after that."""
    before = next((c for c in obs.conditions if c.get("type") == "Progressing"), {})
    stamp = before.get("lastUpdateTime") or before.get("lastTransitionTime")
    since = datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else obs.now
    if before.get("reason") == "ProgressDeadlineExceeded" and (replica_progress is None or replica_progress <= since):
        return True, None
    began = since if before.get("reason") == "RolloutInProgress" else None
    last = max((t for t in (replica_progress, began) if t is not None), default=obs.now)
    return (obs.now - last).total_seconds() > obs.spec.rollout.progress_deadline_seconds, last


def _last_progress(updated: list[Replica]) -> datetime | None:
    """When the rollout last moved: one of the live replicas of the update revision (and weights, unless
    loaded in place) was created, became ready, or started or finished loading weights. None when there
    is none yet."""
    times = []
    for r in updated:
        times.append(r.created)
        if r.ready_since is not None:
            times.append(r.ready_since)
        if r.weights_since is not None:
            times.append(r.weights_since)
    return max(times) if times else None


def set_conditions(previous: list[dict], now: datetime, generation: int | None,
                   wanted: dict[str, tuple[str, str, str]]) -> list[dict]:
    """Conditions with lastTransitionTime kept where the status did not change, and lastUpdateTime where
    neither status nor reason did (a Deployment's conditions carry both)."""
    old = {c.get("type"): c for c in previous}
    stamp = now.isoformat().replace("+00:00", "Z")
    out = []
    for type_, (status, reason, message) in wanted.items():
        before = old.get(type_) or {}
        same_status = before.get("status") == status
        since = before.get("lastTransitionTime") if same_status else stamp
        updated = (before.get("lastUpdateTime") or since) if same_status and before.get("reason") == reason else stamp
        out.append({"type": type_, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": since, "lastUpdateTime": updated, "observedGeneration": generation})
    return out


def invalid_spec_conditions(previous: list[dict], now: datetime, generation: int | None,
                            message: str) -> list[dict]:
    """Conditions while the spec is invalid: the operator then neither observes nor changes the replicas,
    so what Available, Ready and Progressing said under an older spec is replaced, not kept."""
    unobserved = "Replicas are not observed while the spec is invalid"
    return set_conditions(previous, now, generation, {
        "Available": ("Unknown", "InvalidSpec", unobserved),
        "Ready": ("Unknown", "InvalidSpec", unobserved),
        "Progressing": ("False", "InvalidSpec", "No rollout while the spec is invalid"),
        "Degraded": ("True", "InvalidSpec", message)})
