"""The planner's view of one replica (planner.Replica), read from its RayCluster, its pods and what its server
says of itself (the admin API's report): whether it is ready, which weights it holds, and, when it does not
serve, why, in KubeRay's, the kubelet's or its server's words. Pure: the reconciler does the reading."""

from __future__ import annotations

import re
import signal
from datetime import datetime, timezone

from . import api, planner, render

ANNOTATION_WEIGHTS_TARGET = f"{api.GROUP}/weights-target"  # revision being loaded in place
ANNOTATION_WEIGHTS_SINCE = f"{api.GROUP}/weights-since"  # when a load was last asked for, or finished
ANNOTATION_WEIGHTS_FAILED = f"{api.GROUP}/weights-failed"  # revision whose load failed: replace
ANNOTATION_ENGINE_RESTARTS = f"{api.GROUP}/engine-restarts"  # the server's engine restart count last seen


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def is_ready(raycluster: dict) -> bool:
    """KubeRay's view: the head pod is ready (its probe is the server's /health) and every worker is."""
    status = raycluster.get("status") or {}
    head = next((c for c in status.get("conditions") or [] if c.get("type") == "HeadPodReady"), {})
    # KubeRay omits zero counts (omitempty), hence the defaults.
    # >=: KubeRay's readyWorkerReplicas counts every running and ready worker pod, terminating ones
    # included, so it exceeds desiredWorkerReplicas while a surplus pod goes away.
    return head.get("status") == "True" and status.get("readyWorkerReplicas", 0) >= status.get(
        "desiredWorkerReplicas", 0)


# Container states that a pod does not get out of by waiting.
STUCK_CONTAINER_REASONS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                           "CreateContainerError", "CrashLoopBackOff"}
# A log line of an error (Python's logging, as the server writes it: "<time> ERROR <logger>: <text>").
ERROR_LOG_LINE = re.compile(r"\b(?:ERROR|CRITICAL|FATAL)\b:?\s+(?:[\w.]+:\s+)?(?P<text>\S.*)")
SIGNAL_NAMES = {s.value: s.name for s in signal.Signals}  # a process killed by signal N exits 128 + N


def provisioned(raycluster: dict) -> dict | None:
    """KubeRay's RayClusterProvisioned condition when True: every pod of the replica was running and ready
    once, i.e. it served. KubeRay never sets it back (but for suspending a RayCluster, which is not done here)."""
    return next((c for c in (raycluster.get("status") or {}).get("conditions") or []
                 if c.get("type") == "RayClusterProvisioned" and c.get("status") == "True"), None)


def _termination_text(terminated: dict) -> str:
    """What a container's termination message says: with FallbackToLogsOnError (render.py) the kubelet puts
    the log tail there, whose last error line says why (the lines after it are the shutdown's). A container
    killed by a signal wrote nothing about it: its last line is shown only when it is an error's."""
    lines = [line.strip() for line in (terminated.get("message") or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if match := ERROR_LOG_LINE.search(line):
            return match["text"][:300]
    return lines[-1][:300] if lines and terminated.get("exitCode", 0) <= 128 else ""


def _exit(terminated: dict) -> str:
    """How a container ended: `exit 137 (SIGKILL; Error at <finishedAt>): <text>`, as far as its status says."""
    code = terminated.get("exitCode")
    how = [SIGNAL_NAMES[code - 128]] if isinstance(code, int) and code - 128 in SIGNAL_NAMES else []
    how.append(" at ".join(filter(None, (terminated.get("reason"), terminated.get("finishedAt")))))
    text = _termination_text(terminated)
    return f"exit {code} ({'; '.join(filter(None, how))})" + (f": {text}" if text else "")


def _restart_count(container_status: dict) -> str:
    count = container_status.get("restartCount", 0)
    return f"{count} restart{'' if count == 1 else 's'}"


def _restarts(container_status: dict) -> str:
    last = (container_status.get("lastState") or {}).get("terminated")
    return _restart_count(container_status) + (f"; last {_exit(last)}" if last else "")


def _stuck(pod_name: str, container_status: dict) -> tuple[str, str] | None:
    """(reason, message) of a container waiting in a state it does not get out of by waiting. The kubelet's
    CrashLoopBackOff message is replaced: it names the back-off, which grows at every restart, and not why."""
    waiting = (container_status.get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    if reason not in STUCK_CONTAINER_REASONS:
        return None
    what = (f"back-off restarting failed container ({_restarts(container_status)})" if reason == "CrashLoopBackOff"
            else waiting.get("message", ""))
    return reason, f"pod {pod_name} container {container_status['name']}: {what}"


def _unschedulable(pod: dict) -> tuple[str, str] | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return c.get("reason") or "Unschedulable", c.get("message", "")
    return None


def _replica_failure(raycluster: dict) -> tuple[str, str] | None:
    """KubeRay's ReplicaFailure condition: a pod it could not create or delete."""
    for c in (raycluster.get("status") or {}).get("conditions") or []:
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            return c.get("reason") or "ReplicaFailure", c.get("message") or ""
    return None


def _pod_faults(pod: dict, provisioned_at: datetime | None) -> list[str]:
    """What is wrong with one pod of a replica that served: it goes away, cannot be scheduled, or a container
    of it is stuck, exited or restarted and is not ready; else, if the pod is not ready, when it was created if
    that was after the replica was provisioned (KubeRay recreated it)."""
    name, status = pod["metadata"]["name"], pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp"):
        return [f"pod {name} terminating"]
    if unschedulable := _unschedulable(pod):
        return [f"pod {name} {unschedulable[0]}: {unschedulable[1]}"]
    faults = []
    for init, statuses in ((True, status.get("initContainerStatuses")), (False, status.get("containerStatuses"))):
        for cs in statuses or []:
            terminated = (cs.get("state") or {}).get("terminated")
            if stuck := _stuck(name, cs):
                faults.append(stuck[1])
            elif terminated and not (init and terminated.get("exitCode") == 0):  # a finished init container is fine
                faults.append(f"pod {name} container {cs['name']} terminated "
                              f"({_restart_count(cs)}; {_exit(terminated)})")
            elif cs.get("restartCount") and not cs.get("ready") and not init:
                faults.append(f"pod {name} container {cs['name']} restarted ({_restarts(cs)})")
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if not faults and not ready:
        created = pod["metadata"].get("creationTimestamp")
        recreated = provisioned_at is not None and created and _time(created) > provisioned_at
        faults.append(f"pod {name} not ready" + (f" (created {created}, after the replica was provisioned)"
                                                  if recreated else ""))
    return faults


def _server_state(served: planner.WeightsReport | None) -> str | None:
    """What the replica's server says of itself (its admin report), when that explains its unreadiness."""
    if served is None:
        return None
    if served.state == "restarting":
        count = f" (restart {served.restarts})" if served.restarts is not None else ""
        return f"its server is restarting the model engine{count}: {served.error}"
    if served.state == "failed":
        return f"its server failed: {served.error}"
    if served.state == "loading":
        return "its server is loading the model"
    return None


def _unhealthy(raycluster: dict, pods: list[dict], served: planner.WeightsReport | None) -> str:
    """What keeps a replica that served from serving now: KubeRay's failure to create a pod, missing pods,
    each pod's faults, and its server's own report. Only what changes with the fault, no moving clock, so
    that the message stays the same while nothing changes (a new message is a new Warning event)."""
    status = raycluster.get("status") or {}
    replica_failure = _replica_failure(raycluster)
    faults = [": ".join(replica_failure)] if replica_failure else []
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    if not any((p["metadata"].get("labels") or {}).get(render.KUBERAY_NODE_TYPE) == "head" for p in live):
        faults.append("no head pod")
    workers = sum((p["metadata"].get("labels") or {}).get(render.KUBERAY_NODE_TYPE) == "worker" for p in live)
    if workers < (desired := status.get("desiredWorkerReplicas", 0)):
        faults.append(f"{workers} of {desired} worker pods")
    provisioned_at = _time((provisioned(raycluster) or {}).get("lastTransitionTime"))
    for pod in pods:
        faults += _pod_faults(pod, provisioned_at)
    if server := _server_state(served):
        faults.append(server)
    head = next((c for c in status.get("conditions") or [] if c.get("type") == "HeadPodReady"), {})
    return "; ".join(faults) or (f"not ready (KubeRay: HeadPodReady {head.get('status', 'Unknown')}, "
                                 f"{status.get('readyWorkerReplicas', 0)} of {desired} worker pods ready)")


def failure(raycluster: dict, pods: list[dict], served: planner.WeightsReport | None = None) -> tuple[str, str] | None:
    """Why a replica does not serve. One that served once (KubeRay's RayClusterProvisioned) and is not ready
    now, and is neither going away nor loading weights in place (both unready on purpose), is ReplicaUnhealthy,
    with what its pods and its server (`served`: its admin report, None if not asked or no answer) say.
    Else, for pods that never ran, in KubeRay's or the kubelet's words: the RayCluster's ReplicaFailure
    condition (a pod KubeRay could not create), else an unschedulable or stuck pod of it."""
    meta = raycluster.get("metadata") or {}
    pods = sorted(pods, key=lambda p: p["metadata"]["name"])
    if (provisioned(raycluster) and not is_ready(raycluster) and not meta.get("deletionTimestamp")
            and not (meta.get("annotations") or {}).get(ANNOTATION_WEIGHTS_TARGET)):
        return "ReplicaUnhealthy", _unhealthy(raycluster, pods, served)
    if replica_failure := _replica_failure(raycluster):
        return replica_failure
    for pod in pods:
        pod_name = pod["metadata"]["name"]
        if unschedulable := _unschedulable(pod):
            return unschedulable[0], f"pod {pod_name}: {unschedulable[1]}"
        status = pod.get("status") or {}
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            if stuck := _stuck(pod_name, cs):
                return stuck
    return None


def observe(raycluster: dict, now: datetime, report: planner.WeightsReport | None = None,
            pods: list[dict] = (), served: planner.WeightsReport | None = None) -> planner.Replica:
    """`report`: a loading replica's admin API; `served`: what a settled or unhealthy one says of itself: the
    revision it serves, which wins over the annotation (a head container that restarted comes back on the
    revision in its args), its engine's restarts, and why it does not serve."""
    meta = raycluster["metadata"]
    annotations = meta.get("annotations") or {}
    status = raycluster.get("status") or {}
    head = next((c for c in status.get("conditions") or [] if c.get("type") == "HeadPodReady"), {})
    return planner.Replica(
        name=meta["name"],
        revision=(meta.get("labels") or {}).get(render.LABEL_REVISION, ""),
        created=_time(meta.get("creationTimestamp")) or now,
        ready=is_ready(raycluster) and not meta.get("deletionTimestamp"),
        ready_since=_time(head.get("lastTransitionTime")) if head.get("status") == "True" else None,
        terminating=bool(meta.get("deletionTimestamp")),
        weights_revision=(served.revision if served is not None and served.state == "ready"
                          else annotations.get(render.ANNOTATION_WEIGHTS_REVISION) or None),
        weights_target=annotations.get(ANNOTATION_WEIGHTS_TARGET),
        weights_since=_time(annotations.get(ANNOTATION_WEIGHTS_SINCE)),
        weights_failed=annotations.get(ANNOTATION_WEIGHTS_FAILED),
        admin=report,
        failure=failure(raycluster, list(pods), served),
        engine_restarts=served.restarts if served is not None else None,
        engine_restarts_seen=int(annotations.get(ANNOTATION_ENGINE_RESTARTS) or 0),
    )
