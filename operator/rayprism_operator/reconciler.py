"""One reconcile of one InferenceDeployment: read the cluster, ask the planner, apply the difference.

All rollout state lives in the cluster (labels and annotations of the RayClusters, the status of the
InferenceDeployment), so any reconcile, including the first one after a restart, starts from scratch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import kopf

from . import api, autoscaler, metrics, planner, render
from .observe import (ANNOTATION_ENGINE_RESTARTS, ANNOTATION_WEIGHTS_FAILED, ANNOTATION_WEIGHTS_SINCE,
                      ANNOTATION_WEIGHTS_TARGET, is_ready, observe, provisioned)
from .kube import (INFERENCE_DEPLOYMENTS, INFERENCE_POOLS, NETWORK_POLICIES, PODS, RAYCLUSTERS, SECRETS, SERVICES,
                   ApiError, Conflict, KubeClient, NotFound)
from .weights import WeightsClient, admin_url, head_pod_ip, metrics_url

logger = logging.getLogger(__name__)

SUFFIX_ALPHABET = string.ascii_lowercase + string.digits
# The namespace of the pod's service account, i.e. the operator's own, as every in-cluster client finds it.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class Gone(Exception):
    """The InferenceDeployment no longer exists: nothing left to reconcile."""


@dataclass(frozen=True)
class Settings:
    """Operator-wide settings, from the environment (the Helm chart sets them)."""

    admin_key: bytes = b""  # the key of every admin token (render.admin_token)
    options: render.RenderOptions = render.RenderOptions()
    weights_poll_seconds: float = planner.DEFAULT_WEIGHTS_POLL_SECONDS
    # Look again at least this often: what no watch event announces, such as a replica's server that
    # restarted on the revision in its args after the replica was loaded in place.
    resync_seconds: float = 30.0
    # How often an autoscaled deployment's replicas are read (KServe's KPA: 2 s; the HPA: 15 s).
    autoscale_seconds: float = 5.0

    @classmethod
    def from_env(cls) -> "Settings":
        key_file = os.environ.get("RAYPRISM_ADMIN_KEY_FILE")
        if not key_file:
            raise kopf.PermanentError("RAYPRISM_ADMIN_KEY_FILE is not set: the operator derives the replicas' admin "
                                      "tokens from the key in that file (the Helm chart mounts one)")
        try:
            admin_key = Path(key_file).read_bytes().strip()
        except OSError as e:
            raise kopf.PermanentError(f"RAYPRISM_ADMIN_KEY_FILE {key_file}: {e.strerror}") from None
        if len(admin_key) < 32:
            raise kopf.PermanentError(f"RAYPRISM_ADMIN_KEY_FILE {key_file}: the key must be at least 32 bytes")
        namespace = os.environ.get("RAYPRISM_OPERATOR_NAMESPACE") or (
            SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.exists() else None)
        return cls(
            admin_key=admin_key,
            options=render.RenderOptions(
                default_image=os.environ.get("RAYPRISM_DEFAULT_WORKER_IMAGE", render.DEFAULT_WORKER_IMAGE),
                operator_namespace=namespace),
            weights_poll_seconds=float(os.environ.get("RAYPRISM_WEIGHTS_POLL_SECONDS",
                                                      planner.DEFAULT_WEIGHTS_POLL_SECONDS)),
            resync_seconds=float(os.environ.get("RAYPRISM_RESYNC_SECONDS", 30.0)),
            autoscale_seconds=float(os.environ.get("RAYPRISM_AUTOSCALE_SECONDS", 5.0)),
        )


def _stamp(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


class NotOwned(Exception):
    """A child's name is taken by an object this InferenceDeployment does not own: it is left alone."""


def _check_owned(child: dict, infd: api.InferenceDeployment) -> None:
    meta = child["metadata"]
    if not any(o.get("uid") == infd.metadata.uid and o.get("controller") for o in meta.get("ownerReferences") or []):
        raise NotOwned(f"{child.get('kind', 'object')} {meta.get('namespace')}/{meta['name']} exists and is not "
                       f"owned by InferenceDeployment {infd.metadata.name}: rename or delete it")


INFERENCE_POOL_CRD_MISSING = "InferencePoolCRDMissing"


class Reconciler:
    def __init__(self, kube: KubeClient, weights: WeightsClient, settings: Settings):
        self.kube, self.weights, self.settings = kube, weights, settings
        # The autoscaler's past recommendations per deployment, in memory as the HPA keeps them: after a restart
        # the windows start again (autoscaler.decide), which only delays a change.
        self.autoscaling_history: dict[tuple[str, str], tuple[autoscaler.Recommendation, ...]] = {}

    async def reconcile(self, namespace: str, name: str) -> float | None:
        """Bring one InferenceDeployment closer to its spec; returns when to look again (seconds)."""
        try:
            body = await self.kube.get(INFERENCE_DEPLOYMENTS, namespace, name)
        except NotFound:
            self.autoscaling_history.pop((namespace, name), None)
            raise Gone() from None
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return None  # the garbage collector removes the children through their ownerReferences
        body = {**body, "metadata": {**meta, "namespace": namespace}}
        now = datetime.now(timezone.utc)
        try:
            infd = api.parse_inference_deployment({
                "apiVersion": body.get("apiVersion", api.API_VERSION), "kind": body.get("kind", api.KIND),
                "metadata": {"name": name, "namespace": namespace, "uid": meta.get("uid"),
                             "generation": meta.get("generation")},
                "spec": body.get("spec")})
        except api.SpecError as e:
            await self._report_degraded(body, "InvalidSpec", str(e), now)
            return None

        children = await self._replicas(infd)
        try:
            token = await self._ensure_admin_secret(infd)
            await self._ensure_service(infd)
            await self._ensure_network_policies(infd, [c["metadata"]["name"] for c in children])
            # The InferencePool is an extra way in: without its CRD the replicas are still managed and serve
            # through the Service, and Degraded says what is missing (below).
            missing = await self._ensure_inference_pool(infd)
        except NotOwned as e:  # the user's object: never adopted or changed; say so, look again later
            await self._report_degraded(body, "ChildNotOwned", str(e), now)
            return self.settings.resync_seconds
        revision = render.revision_hash(infd.spec, self.settings.options)
        replicas = await self._observe(children, revision, infd.spec.model.revision, token, now)
        if infd.spec.autoscaling:
            infd = await self._autoscale(infd, body, children, replicas, now)
        else:
            self.autoscaling_history.pop((namespace, name), None)
        plan = planner.plan(planner.Observed(
            spec=infd.spec, update_revision=revision, generation=infd.metadata.generation,
            replicas=replicas, conditions=(body.get("status") or {}).get("conditions") or [],
            endpoint=render.endpoint_url(infd), selector=render.head_pod_selector(name), now=now,
            weights_poll_seconds=self.settings.weights_poll_seconds))
        if missing:
            self._degrade(plan, body, now, infd.metadata.generation, INFERENCE_POOL_CRD_MISSING, missing)
        try:
            await self._apply(plan, infd, revision, children, token, body, now)
        except ApiError as e:  # e.g. refused by RBAC or admission: say so, then retry with backoff
            await self._report_degraded(body, "ApplyFailed", str(e)[:1000], now)
            raise
        for event in plan.events:  # after the changes they announce were made
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)

        metrics.record_status(namespace, name, plan.status)
        current = body.get("status") or {}
        changes = {k: v for k, v in plan.status.items() if current.get(k) != v}
        if changes:
            await self.kube.patch(INFERENCE_DEPLOYMENTS, namespace, name, {"status": changes}, subresource="status")
        resync = self.settings.autoscale_seconds if infd.spec.autoscaling else self.settings.resync_seconds
        return min(plan.requeue_after or resync, resync)

    async def _autoscale(self, infd: api.InferenceDeployment, body: dict, children: list[dict],
                         replicas: list[planner.Replica], now: datetime) -> api.InferenceDeployment:
        """spec.replicas for the load the ready replicas report (autoscaler.decide), written through the /scale
        subresource as an HPA writes it; returns the deployment as the planner is to see it in this pass."""
        autoscaling, key = infd.spec.autoscaling, (infd.metadata.namespace, infd.metadata.name)
        urls = [url for c, r in zip(children, replicas) if r.ready and not r.terminating and (url := metrics_url(c))]
        pages = await asyncio.gather(*(self.weights.metrics(url) for url in urls))
        samples = [v for page in pages if page and (v := autoscaler.metric_value(page, autoscaling.metric)) is not None]
        current = infd.spec.replicas
        decision = autoscaler.decide(autoscaling, current, samples, self.autoscaling_history.get(key, ()), now)
        self.autoscaling_history[key] = decision.history
        if decision.replicas == current:
            return infd
        await self.kube.patch(INFERENCE_DEPLOYMENTS, *key, {"spec": {"replicas": decision.replicas}},
                              subresource="scale")
        why = (f"{autoscaling.metric} {decision.average:.2f} per ready replica ({len(samples)} reporting), target "
               f"{autoscaling.target:g}" if decision.average is not None else
               f"the bounds {autoscaling.min_replicas}..{autoscaling.max_replicas}")
        kopf.event(body, type="Normal", reason="Autoscaled", message=f"Scaled from {current} to {decision.replicas} "
                   f"replicas: {why}")
        return infd.model_copy(update={"spec": infd.spec.model_copy(update={"replicas": decision.replicas})})

    async def _replicas(self, infd: api.InferenceDeployment) -> list[dict]:
        """The RayClusters of this InferenceDeployment (by label, and owner uid where known)."""
        namespace, name = infd.metadata.namespace, infd.metadata.name
        children = await self.kube.list(RAYCLUSTERS, namespace, render.selector_labels(name))
        uid = infd.metadata.uid
        return [c for c in children if not uid or any(
            o.get("uid") == uid for o in c["metadata"].get("ownerReferences") or [])]

    async def _observe(self, children: list[dict], revision: str, target: str | None, token: str,
                       now: datetime) -> list[planner.Replica]:
        """The planner's view of the replicas, with what their admin API says."""
        loading = [c for c in children if target is not None
                   and (c["metadata"].get("annotations") or {}).get(ANNOTATION_WEIGHTS_TARGET) == target
                   and (c["metadata"].get("labels") or {}).get(render.LABEL_REVISION) == revision]
        # The others are asked what they serve, how often their engine restarted, and why those that served
        # once do not now, at their head pod's IP, which KubeRay reports for every head pod (no DNS lookup of
        # the head Service on each resync).
        asked = [c for c in children if c not in loading and (is_ready(c) or provisioned(c))
                 and not c["metadata"].get("deletionTimestamp") and head_pod_ip(c)]
        reports, served = await asyncio.gather(
            asyncio.gather(*(self.weights.poll(admin_url(c), token, target) for c in loading)),
            asyncio.gather(*(self.weights.served(admin_url(c), token) for c in asked)))
        by_name = {c["metadata"]["name"]: r for c, r in zip(loading, reports)}
        served_by_name = {c["metadata"]["name"]: r for c, r in zip(asked, served)}
        pods: dict[str, list[dict]] = {}
        if children:  # the pods carry the template's labels, and KubeRay's with their RayCluster's name
            meta = children[0]["metadata"]
            selector = render.selector_labels(meta["labels"][render.LABEL_DEPLOYMENT])
            for pod in await self.kube.list(PODS, meta["namespace"], selector):
                pods.setdefault((pod["metadata"].get("labels") or {}).get("ray.io/cluster", ""), []).append(pod)
        return [observe(c, now, by_name.get(name := c["metadata"]["name"]), pods.get(name, []), served_by_name.get(name))
                for c in children]

    async def _apply(self, plan: planner.Plan, infd: api.InferenceDeployment, revision: str,
                     children: list[dict], token: str, body: dict, now: datetime) -> None:
        namespace, target = infd.metadata.namespace, infd.spec.model.revision

        async def annotate(replica: str, values: dict, spec: dict | None = None) -> None:
            patch = {"metadata": {"annotations": values}, **({"spec": spec} if spec else {})}
            await self.kube.patch(RAYCLUSTERS, namespace, replica, patch)

        if plan.finish_weight_updates:
            # The loaded revision goes into the RayCluster's spec too (KubeRay leaves running pods
            # alone), so that a head pod that restarts loads it again.
            spec = render.render_raycluster(infd, revision, "", self.settings.options)["spec"]
            for replica in plan.finish_weight_updates:
                await annotate(replica, {render.ANNOTATION_WEIGHTS_REVISION: target,
                                         ANNOTATION_WEIGHTS_TARGET: None, ANNOTATION_WEIGHTS_SINCE: _stamp(now)},
                               spec)
        metrics.WEIGHT_UPDATES.labels("succeeded").inc(len(plan.finish_weight_updates))
        for replica in plan.fail_weight_updates:
            await annotate(replica, {ANNOTATION_WEIGHTS_FAILED: target, ANNOTATION_WEIGHTS_TARGET: None})
            metrics.WEIGHT_UPDATES.labels("failed").inc()
        for replica in plan.delete:
            await self.kube.delete(RAYCLUSTERS, namespace, replica)
        for replica, count in plan.record_engine_restarts.items():
            await annotate(replica, {ANNOTATION_ENGINE_RESTARTS: str(count)})
        for replica in plan.start_weight_updates:
            # Recorded before asking, so that a restart in between polls (and re-asks) the replica.
            await annotate(replica, {ANNOTATION_WEIGHTS_TARGET: target, ANNOTATION_WEIGHTS_SINCE: _stamp(now)})
            child = next(c for c in children if c["metadata"]["name"] == replica)
            refused = await self.weights.request_load(admin_url(child), token, target)
            if refused:  # a 4xx: asking again would not help; the next pass halts the rollout
                await annotate(replica, {ANNOTATION_WEIGHTS_FAILED: target, ANNOTATION_WEIGHTS_TARGET: None})
                metrics.WEIGHT_UPDATES.labels("failed").inc()
                kopf.event(body, type="Warning", reason="WeightUpdateFailed",
                           message=f"Replica {replica} refused to load weights revision {target}: {refused}")
        for _ in range(plan.create):
            await self._create_replica(infd, revision)

    async def _create_replica(self, infd: api.InferenceDeployment, revision: str) -> None:
        for _ in range(3):  # a suffix already taken is a 409: draw another
            suffix = "".join(secrets.choice(SUFFIX_ALPHABET) for _ in range(5))
            raycluster = render.render_raycluster(infd, revision, suffix, self.settings.options)
            # The replica's NetworkPolicy first, so that its pods never run with Ray's ports open.
            policy = render.render_replica_network_policy(infd, raycluster["metadata"]["name"])
            await self._create_if_absent(NETWORK_POLICIES, policy)
            try:
                await self.kube.create(RAYCLUSTERS, infd.metadata.namespace, raycluster)
                return
            except Conflict:
                continue  # the policy of a name not ours goes with the next pass (_ensure_network_policies)
            except ApiError:  # refused: no replica, no policy
                await self.kube.delete(NETWORK_POLICIES, infd.metadata.namespace, policy["metadata"]["name"])
                raise
        raise RuntimeError(f"could not find a free replica name for {infd.metadata.name}")

    async def _create_if_absent(self, resource: tuple[str, str], obj: dict) -> None:
        try:
            await self.kube.create(resource, obj["metadata"]["namespace"], obj)
        except Conflict:
            pass

    async def _ensure_admin_secret(self, infd: api.InferenceDeployment) -> str:
        """The replicas' admin token, derived from the operator's key, and its Secret (which the heads mount),
        created when absent. Never read: the operator may create Secrets but not read any. A Secret of that name
        holding another token shows as replicas that refuse the operator: a warning in its log on every ask, and
        WeightUpdateFailed with the 401 in the Degraded condition when it asks one to load weights."""
        token = render.admin_token(self.settings.admin_key, infd)
        await self._create_if_absent(SECRETS, render.render_admin_secret(infd, token))
        return token

    async def _ensure_network_policies(self, infd: api.InferenceDeployment, replicas: list[str]) -> None:
        """One NetworkPolicy per replica (Ray's ports) and one for the heads' server; the others it owns go."""
        namespace = infd.metadata.namespace
        serving = render.render_serving_network_policy(infd, self.settings.options.operator_namespace)
        wanted = {serving["metadata"]["name"]: serving} | {
            render.replica_network_policy_name(r): render.render_replica_network_policy(infd, r) for r in replicas}
        existing = {p["metadata"]["name"]: p for p in await self.kube.list(
            NETWORK_POLICIES, namespace, render.selector_labels(infd.metadata.name))}
        for name, policy in wanted.items():
            if name not in existing:
                await self._create_if_absent(NETWORK_POLICIES, policy)
            elif existing[name].get("spec") != policy["spec"]:
                _check_owned(existing[name], infd)
                await self.kube.patch(NETWORK_POLICIES, namespace, name, {"spec": policy["spec"]})
        for name, policy in existing.items():
            owned = any(o.get("uid") == infd.metadata.uid for o in policy["metadata"].get("ownerReferences") or [])
            if name not in wanted and owned:
                await self.kube.delete(NETWORK_POLICIES, namespace, name)

    async def _ensure_service(self, infd: api.InferenceDeployment) -> None:
        desired = render.render_service(infd)
        namespace, name = infd.metadata.namespace, desired["metadata"]["name"]
        try:
            existing = await self.kube.get(SERVICES, namespace, name)
        except NotFound:
            try:
                await self.kube.create(SERVICES, namespace, desired)
            except Conflict:
                pass  # created meanwhile; the next reconcile compares it
            return
        _check_owned(existing, infd)
        spec, wanted = existing.get("spec") or {}, desired["spec"]

        def ports(s: dict) -> list:  # the API server fills in more (nodePort, ...): compare ours only
            return [(p.get("name"), p.get("port"), p.get("targetPort")) for p in s.get("ports") or []]

        ours = (wanted["type"], wanted["selector"], ports(wanted))
        if (spec.get("type"), spec.get("selector"), ports(spec)) != ours:
            await self.kube.patch(SERVICES, namespace, name, {"spec": wanted})

    @staticmethod
    def _degrade(plan: planner.Plan, body: dict, now: datetime, generation: int | None, reason: str,
                 message: str) -> None:
        """Degraded=True in the plan's status unless the planner already reports something worse (a replica's
        failure), with a Warning event when it was not reported so already."""
        conditions = plan.status.get("conditions") or []
        degraded = next((c for c in conditions if c.get("type") == "Degraded"), {})
        if degraded.get("status") == "True":
            return
        previous = (body.get("status") or {}).get("conditions") or []
        before = next((c for c in previous if c.get("type") == "Degraded"), {})
        plan.status["conditions"] = [c for c in conditions if c.get("type") != "Degraded"] + planner.set_conditions(
            previous, now, generation, {"Degraded": ("True", reason, message)})
        if (before.get("status"), before.get("reason"), before.get("message")) != ("True", reason, message):
            plan.events.append(planner.Event("Warning", reason, message))

    async def _ensure_inference_pool(self, infd: api.InferenceDeployment) -> str | None:
        """The InferencePool when spec.router.inferencePool asks for one: created, its spec patched back when it
        drifts; when the field goes, the pool it owns goes too. A pool of that name it does not own is left alone
        (NotOwned). Returns what is missing when asked for a pool on a cluster without the InferencePool CRD."""
        desired = render.render_inference_pool(infd)
        namespace, name = infd.metadata.namespace, render.inference_pool_name(infd.metadata.name)
        try:
            existing = await self.kube.get(INFERENCE_POOLS, namespace, name)
        except NotFound:  # no such pool, or no such kind at all
            existing = None
        if desired is None:
            if existing and any(o.get("uid") == infd.metadata.uid and o.get("controller")
                                for o in existing["metadata"].get("ownerReferences") or []):
                await self.kube.delete(INFERENCE_POOLS, namespace, name)
            return None
        if existing is None:
            try:
                await self.kube.create(INFERENCE_POOLS, namespace, desired)
            except Conflict:
                pass  # created meanwhile; the next reconcile compares it
            except NotFound:  # a create answered 404: the API server does not serve the kind
                return (
                    f"spec.router.inferencePool asks for an InferencePool, but the cluster does not serve "
                    f"{render.INFERENCE_POOL_API_VERSION} inferencepools: install the InferencePool CRD of the "
                    f"Gateway API Inference Extension (sigs.k8s.io/gateway-api-inference-extension, "
                    f"config/crd/bases/inference.networking.k8s.io_inferencepools.yaml); until then the replicas "
                    f"serve through the Service only")
            return None
        _check_owned(existing, infd)
        spec = existing.get("spec") or {}
        # The API server writes the CRD's defaults in (appProtocol): compare the fields we set.
        if any(spec.get(k) != v for k, v in desired["spec"].items()):
            # A merge patch keeps keys it does not name: a port left from a Service picker is removed by name.
            wanted = {**desired["spec"], "endpointPickerRef": {"port": None, **desired["spec"]["endpointPickerRef"]}}
            await self.kube.patch(INFERENCE_POOLS, namespace, name, {"spec": wanted})
        return None

    async def _report_degraded(self, body: dict, reason: str, message: str, now: datetime) -> None:
        """Degraded=True with a Warning event, once per reason, message and generation."""
        status = body.get("status") or {}
        conditions = status.get("conditions") or []
        degraded = next((c for c in conditions if c.get("type") == "Degraded"), {})
        generation = body["metadata"].get("generation")
        if degraded.get("reason") == reason and degraded.get("message") == message \
                and status.get("observedGeneration") == generation:
            return  # already reported
        kopf.event(body, type="Warning", reason=reason, message=message)
        if reason == "InvalidSpec":
            new = planner.invalid_spec_conditions(conditions, now, generation, message)
        else:  # a refused change: the other conditions still describe the replicas
            new = [c for c in conditions if c.get("type") != "Degraded"] + planner.set_conditions(
                conditions, now, generation, {"Degraded": ("True", reason, message)})
        await self.kube.patch(INFERENCE_DEPLOYMENTS, body["metadata"]["namespace"], body["metadata"]["name"],
                              {"status": {"observedGeneration": generation, "conditions": new}},
                              subresource="status")
