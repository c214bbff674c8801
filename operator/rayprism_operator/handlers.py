"""kopf handlers: they only wake the reconcile of the InferenceDeployment concerned.

No finalizer is added (no daemons, timers or deletion handlers): the RayClusters, the Service and the
admin Secret carry ownerReferences, so Kubernetes' garbage collector removes them.

Two operator replicas: kopf's peering (`--peering NAME`, the default unless `--standalone`) pauses the
watches of every replica but the one with the highest priority, so only it receives events. The work
queue also wakes itself (resyncs, polls of weight loads, the progress deadline): each reconcile first
checks that this replica leads (peering.py), so a paused one changes nothing. When the leader goes, kopf
resumes the next one's watches, whose initial listing wakes every InferenceDeployment there.
"""

from __future__ import annotations

import logging

import kopf

from . import api, metrics, render
from .kube import KubeClient
from .peering import Peering
from .reconciler import Reconciler, Settings
from .weights import WeightsClient
from .workqueue import WorkQueue


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, logger, **_) -> None:
    settings.posting.level = logging.INFO  # Normal events (every scale and rollout step) are posted too

    def login() -> kopf.ConnectionInfo:  # the way kopf logs in itself: KUBECONFIG or the service account
        info = kopf.login_via_client(logger=logger, settings=settings)
        if info is None:
            raise kopf.PermanentError("no Kubernetes credentials: set KUBECONFIG or run in a cluster")
        return info

    memo.kube = KubeClient(login)
    memo.weights = WeightsClient()
    reconciler = Reconciler(memo.kube, memo.weights, Settings.from_env())
    peering = Peering(memo.kube, None if settings.peering.standalone else settings.peering.name,
                      settings.peering.priority, settings.peering.clusterwide)

    async def reconcile_while_leading(namespace: str, name: str) -> float | None:
        if not await peering.leads(namespace):
            return None  # a standby: the leader reconciles; kopf's resumed watches wake this one if it leads
        return await reconciler.reconcile(namespace, name)

    memo.queue = WorkQueue(reconcile_while_leading)
    memo.metrics = await metrics.serve()  # on RAYPRISM_METRICS_PORT, when set


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_) -> None:
    await memo.queue.close()
    await memo.kube.close()
    await memo.weights.close()
    if memo.metrics:
        await memo.metrics.cleanup()


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def deployment_changed(namespace: str, name: str, memo: kopf.Memo, **_) -> None:
    memo.queue.wake((namespace, name))


@kopf.on.event("ray.io", "v1", "rayclusters", labels={render.LABEL_NAME: "rayprism"})
async def replica_changed(namespace: str, labels: dict, memo: kopf.Memo, **_) -> None:
    """A replica's status (readiness) or existence changed: its InferenceDeployment decides what next."""
    if deployment := labels.get(render.LABEL_DEPLOYMENT):
        memo.queue.wake((namespace, deployment))
