"""Whether this operator pod leads, by kopf's peering object: kopf pauses the watches of every pod but the
one with the highest priority, but the work queue's own wake-ups (resyncs, polls of weight loads, the
progress deadline) are not watches. A reconcile first asks here, with kopf's rule: a pod leads while no
alive peer (lastseen + lifetime in the future) has a higher priority.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from .kube import KubeClient, NotFound

CACHE_SECONDS = 1.0


def leads(status: dict, priority: int, now: datetime) -> bool:
    """kopf's rule on a peering object's status: {peer id: {priority, lifetime, lastseen}}."""
    for peer in (status or {}).values():
        lastseen = datetime.fromisoformat(str(peer.get("lastseen", "")).replace("Z", "+00:00"))
        if lastseen.tzinfo is None:
            lastseen = lastseen.replace(tzinfo=timezone.utc)
        alive = (now - lastseen).total_seconds() < float(peer.get("lifetime", 60))
        if alive and int(peer.get("priority", 0)) > priority:
            return False
    return True


class Peering:
    """`name` is kopf's --peering (None: --standalone, always leads); a cluster-wide operator has one
    ClusterKopfPeering, a namespaced one a KopfPeering per namespace."""

    def __init__(self, kube: KubeClient, name: str | None, priority: int, clusterwide: bool):
        self.kube, self.name, self.priority, self.clusterwide = kube, name, priority, clusterwide
        self._cache: dict[str, tuple[float, bool]] = {}

    async def leads(self, namespace: str) -> bool:
        if self.name is None:
            return True
        scope = "" if self.clusterwide else namespace
        at, answer = self._cache.get(scope, (0.0, True))
        if time.monotonic() - at < CACHE_SECONDS:
            return answer
        path = (f"/apis/kopf.dev/v1/clusterkopfpeerings/{self.name}" if self.clusterwide
                else f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/{self.name}")
        try:
            body = await self.kube.request("GET", path)
        except NotFound:  # no peering object: kopf itself does not pause then
            body = {}
        answer = leads(body.get("status") or {}, self.priority, datetime.now(timezone.utc))
        self._cache[scope] = (time.monotonic(), answer)
        return answer
