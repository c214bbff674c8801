"""The operator's test bench: the real operator (kopf + rayprism handlers, in a thread) against kmock's
KubernetesEmulator, with the API-server behaviour the operator relies on added, and a stand-in for KubeRay.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import itertools
import logging
import threading
import uuid
from collections.abc import Callable

import kmock
import yaml
import kopf
from aiohttp import web
from kmock import KubernetesEmulator, KubernetesError

import rayprism_operator.handlers  # noqa: F401  (registers the handlers in kopf's default registry)
from rayprism_operator import render

IDEP = kmock.resource("rayprism.dev/v1alpha1/inferencedeployments")
RC = kmock.resource("ray.io/v1/rayclusters")
EVENTS = kmock.resource("v1/events")
SECRETS = kmock.resource("v1/secrets")
NETWORK_POLICIES = kmock.resource("networking.k8s.io/v1/networkpolicies")
SERVICES = kmock.resource("v1/services")
NS = "default"
IDEP_PATH = f"/apis/rayprism.dev/v1alpha1/namespaces/{NS}/inferencedeployments"
RC_PATH = f"/apis/ray.io/v1/namespaces/{NS}/rayclusters"
ADMIN_KEY = "k" * 48  # the operator's admin-token key, as the chart's Secret holds one
WORKER_IMAGE = "registry.test/rayprism-worker:test"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class ApiServerEmulator(KubernetesEmulator):
    """kmock's emulator plus what a real API server does and the operator relies on; each addition
    mutates the request before kmock stores it, so watchers see it in the same event.

    It also records, after every write to a RayCluster, a snapshot of all RayClusters (name ->
    (revision, ready)): the timeline over which the rollout bounds are asserted.
    """

    _resource_versions = itertools.count(1)

    def __init__(self, filter_labels: bool = False, keep_requests: bool = True, record_timeline: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.record_timeline = record_timeline
        # kmock matches every request against every recorded one (its views are request sequences):
        # quadratic. The benchmark forgets requests once served (keep_requests=False) and counts them.
        self.keep_requests = keep_requests
        self.requests_served = 0
        # Authentication and admission: a request for which this returns an error is refused and not
        # stored (kmock stores every write, even one that a test reaction answers with an error).
        self.admission: Callable[[kmock.Request], KubernetesError | None] = lambda request: None
        self.timeline: list[dict[str, tuple[str, bool]]] = []
        # Off in tests: the operator must cope with kmock ignoring labelSelector. On in the benchmark,
        # where listing every RayCluster of 200 deployments would measure the emulator instead.
        self.filter_labels = filter_labels

    async def _handle(self, request):
        if error := self.admission(request):
            self.requests_served += 1
            if not self.keep_requests:
                self._forget(request)
            raise error
        action, data = request.action, request.data
        meta = data.setdefault("metadata", {}) if isinstance(data, dict) and request.resource else None
        subresources = self.resources[request.resource].subresources if request.resource in self.resources else set()
        if action == kmock.action.CREATE and meta is not None:
            # Names from generateName (kopf's Events use it), namespace from the URL, uid,
            # creationTimestamp, generation 1; status is not writable on create with a /status.
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
            meta["resourceVersion"] = str(next(self._resource_versions))
            if "status" in subresources:
                data.pop("status", None)
            # Secrets: stringData is write-only, the API server stores it base64-encoded in data.
            if request.resource == SECRETS and "stringData" in data:
                data.setdefault("data", {}).update(
                    {k: base64.b64encode(v.encode()).decode() for k, v in data.pop("stringData").items()})
        elif action == kmock.action.UPDATE and meta is not None:
            key = (request.resource, request.namespace, request.name)
            if request.subresource == "status":  # /status changes only .status
                for k in list(data):
                    if k != "status":
                        data.pop(k)
                data["metadata"] = {}
            elif "status" in subresources:  # the main resource ignores .status
                data.pop("status", None)
            # /scale: a Scale's spec.replicas is the CRD's specReplicasPath (.spec.replicas), so
            # kmock's merge into the whole object is what the API server does.
            if key in self.objects and not self.objects[key].deleted:
                old = self.objects[key].raw
                if "spec" in data and {**old.get("spec", {}), **data["spec"]} != old.get("spec"):
                    data["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            data["metadata"]["resourceVersion"] = str(next(self._resource_versions))
        try:
            response = await super()._handle(request)
        finally:
            self.requests_served += 1
            if not self.keep_requests:  # kmock 0.8 private API: the request logs of the root and reactions
                self._forget(request)
        # As the real garbage collector does for every object it sees: a child created for an owner that is
        # gone (a reconcile racing the owner's deletion) is collected too.
        if action in (kmock.action.DELETE, kmock.action.CREATE) and request.resource:
            await self._collect_garbage()
        writes = (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)
        if self.record_timeline and request.resource == RC and action in writes:
            self.timeline.append(self.replicas())
        return response

    def _forget(self, request) -> None:
        self._requests.remove(request)
        for payload in self._payloads:
            for i in range(len(payload._requests) - 1, -1, -1):
                if payload._requests[i] is request:
                    del payload._requests[i]
                    break

    async def _serve_list(self, request):
        """Lists honour equality-based labelSelectors when filter_labels (kmock returns everything)."""
        listing = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector and self.filter_labels:
            wanted = dict(term.split("=", 1) for term in selector.split(","))
            listing["items"] = [i for i in listing["items"]
                                if wanted.items() <= (i.get("metadata", {}).get("labels") or {}).items()]
        return listing

    async def _collect_garbage(self) -> None:
        """The garbage collector: delete objects whose owner (by uid) no longer exists."""
        while True:
            live = {o.raw["metadata"].get("uid") for o in self.objects.values() if not o.deleted}
            orphans = [(k, o) for k, o in self.objects.items() if not o.deleted and any(
                r.get("uid") not in live for r in o.raw["metadata"].get("ownerReferences", []))]
            if not orphans:
                return
            async with self._lock:  # kmock 0.8 private API: the store's lock and watch buses
                for (resource, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})

    def replicas(self, deployment: str | None = None) -> dict[str, tuple[str, bool]]:
        """Live RayClusters: name -> (revision, ready)."""
        from rayprism_operator.observe import is_ready
        out = {}
        for (resource, _, name), obj in self.objects.items():
            if resource == RC and not obj.deleted:
                labels = obj.raw["metadata"].get("labels", {})
                if deployment is None or labels.get(render.LABEL_DEPLOYMENT) == deployment:
                    out[name] = (labels.get(render.LABEL_REVISION), is_ready(obj.raw))
        return out

    def deployment(self, name: str) -> dict:
        return self.objects[IDEP, NS, name].raw

    def events(self, reason: str | None = None) -> list[dict]:
        return [o.raw for (r, _, _), o in self.objects.items()
                if r == EVENTS and not o.deleted and reason in (None, o.raw.get("reason"))]


def register(k: KubernetesEmulator) -> None:
    k.resources["rayprism.dev/v1alpha1/inferencedeployments"] = kmock.ResourceInfo(
        kind="InferenceDeployment", singular="inferencedeployment", namespaced=True, verbs=VERBS,
        subresources={"status", "scale"})
    k.resources["ray.io/v1/rayclusters"] = kmock.ResourceInfo(
        kind="RayCluster", singular="raycluster", namespaced=True, verbs=VERBS, subresources={"status"})
    # kopf waits until CRDs are discoverable (it watches them).
    k.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False, verbs=VERBS)
    k.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", singular="namespace",
                                                      namespaced=False, verbs=VERBS)
    for plural, kind in [("services", "Service"), ("secrets", "Secret"), ("events", "Event"), ("pods", "Pod")]:
        k.resources[f"v1/{plural}"] = kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=True,
                                                         verbs=VERBS)
    k.resources["networking.k8s.io/v1/networkpolicies"] = kmock.ResourceInfo(
        kind="NetworkPolicy", singular="networkpolicy", namespaced=True, verbs=VERBS)


class FakeKubeRay:
    """Stands in for KubeRay (which would start the head and worker pods): it reports a RayCluster
    ready (HeadPodReady True, every worker ready, the head's pod IP) once `ready_when(raycluster)`
    says so, and otherwise leaves it pending. Tests change `ready_when` or call `set_ready`."""

    def __init__(self, k8s: ApiServerEmulator):
        self.k8s = k8s
        self.ready_when: Callable[[dict], bool] = lambda rc: True
        # Gives a RayCluster its head pod IP when it becomes ready (tests with an admin API to reach).
        self.assign_pod_ip: Callable[[dict], str] | None = None
        self.pod_ips: dict[str, str] = {}  # name -> head pod IP reported
        self._task: asyncio.Task | None = None

    async def set_ready(self, name: str, ready: bool = True) -> None:
        raw = self.k8s.objects[RC, NS, name].raw
        workers = raw["spec"]["workerGroupSpecs"][0]["replicas"]
        # Set once every pod was ready, never unset (KubeRay's RayClusterProvisioned).
        provisioned = [c for c in (raw.get("status") or {}).get("conditions") or []
                       if c["type"] == "RayClusterProvisioned"] or (
            [{"type": "RayClusterProvisioned", "status": "True", "lastTransitionTime": _now(),
              "reason": "AllPodRunningAndReadyFirstTime"}] if ready else [])
        status = {
            "state": "ready" if ready else "",
            "conditions": [{"type": "HeadPodReady", "status": str(ready), "lastTransitionTime": _now(),
                            "reason": "HeadPodRunningAndReady" if ready else "HeadPodNotReady"}, *provisioned],
            "desiredWorkerReplicas": workers,
            "readyWorkerReplicas": workers if ready else 0,
        }
        if name in self.pod_ips:
            status["head"] = {"podIP": self.pod_ips[name]}
        await self.k8s.patch(f"{RC_PATH}/{name}/status", json={"status": status})

    async def _run(self) -> None:
        reported: set[tuple[str, str]] = set()
        while True:
            for (resource, _, name), obj in list(self.k8s.objects.items()):
                if resource != RC or obj.deleted:
                    continue
                raw = obj.raw
                key = (name, raw["metadata"]["uid"])
                if key not in reported and self.ready_when(raw):
                    reported.add(key)
                    if self.assign_pod_ip:
                        self.pod_ips[name] = self.assign_pod_ip(raw)
                    await self.set_ready(name)
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> "FakeKubeRay":
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class OperatorThread:
    """The rayprism operator (kopf with rayprism_operator.handlers) in its own thread and event loop:
    kopf cancels every task of its loop when it stops, and the emulator must keep serving meanwhile."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    async def start(self) -> None:
        settings = kopf.OperatorSettings()
        settings.peering.standalone = True
        settings.watching.connect_timeout = 1
        settings.watching.server_timeout = 10
        settings.queueing.idle_timeout = 1
        settings.queueing.exit_timeout = 1
        settings.networking.request_timeout = 5
        self._stop, ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=asyncio.run, daemon=True, args=(kopf.operator(
            settings=settings, clusterwide=True, stop_flag=self._stop, ready_flag=ready),))
        self._thread.start()
        assert await asyncio.to_thread(ready.wait, 30), "the operator did not start"

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 30)
        assert not self._thread.is_alive(), "the operator did not stop"


def write_kubeconfig(path, server: str, token: str) -> None:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server.rstrip("/")}}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}]}))


async def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what or predicate}") from None


class FakeAdminApi:
    """Stands in for the replicas' rayprism servers (contracts.md section 3, the admin weights API): one
    aiohttp server on the admin port of several loopback addresses, one address per replica's head pod IP.
    A POSTed revision loads for `load_seconds`, then is ready, or failed on the addresses in `failing`."""

    def __init__(self, k8s: ApiServerEmulator, deployment: str, addresses: list[str], load_seconds: float = 0.3):
        self.k8s, self.secret = k8s, f"{deployment}-admin"
        self.free = list(addresses)
        self.load_seconds = load_seconds
        self.weights: dict[str, dict] = {}  # address -> the GET answer
        self.failing: set[str] = set()
        self.loading_peak = 0
        self._runner: web.AppRunner | None = None
        self._loads: set[asyncio.Task] = set()

    def start_replica(self, raycluster: dict) -> str:
        """A head pod starts: it serves the revision it was rendered with."""
        address = self.free.pop(0)
        revision = raycluster["metadata"]["annotations"][render.ANNOTATION_WEIGHTS_REVISION]
        self.weights[address] = {"revision": revision, "uri": "builtin://smollm2-135m-instruct",
                                 "state": "ready", "error": None}
        return address

    def _authorized(self, request: web.Request) -> bool:
        token = base64.b64decode(self.k8s.objects[SECRETS, NS, self.secret].raw["data"]["token"]).decode()
        return request.headers.get("Authorization") == f"Bearer {token}"

    async def _get(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "forbidden"}, status=403)
        return web.json_response(self.weights[request.transport.get_extra_info("sockname")[0]])

    async def _post(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "forbidden"}, status=403)
        address = request.transport.get_extra_info("sockname")[0]
        revision = (await request.json())["revision"]
        current = self.weights[address]
        if current["state"] == "loading":
            return web.json_response({"error": "a load is in progress"}, status=409)
        if current["revision"] == revision:
            return web.json_response({"revision": revision, "state": "ready"})
        current.update(state="loading", error=None)
        self.loading_peak = max(self.loading_peak, sum(w["state"] == "loading" for w in self.weights.values()))
        task = asyncio.create_task(self._load(address, revision))
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        return web.json_response({"revision": revision, "state": "loading"}, status=202)

    async def _load(self, address: str, revision: str) -> None:
        await asyncio.sleep(self.load_seconds)
        if address in self.failing:
            self.weights[address].update(state="failed", error="checkpoint shards are corrupt")
        else:
            self.weights[address].update(state="ready", revision=revision)

    async def __aenter__(self) -> "FakeAdminApi":
        app = web.Application()
        app.router.add_get("/admin/v1/weights", self._get)
        app.router.add_post("/admin/v1/weights", self._post)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        for address in self.free:
            await web.TCPSite(self._runner, address, render.ADMIN_PORT).start()
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._loads:
            task.cancel()
        await self._runner.cleanup()


def deployment(name: str = "demo", replicas: int = 2, **spec) -> dict:
    return {
        "apiVersion": "rayprism.dev/v1alpha1", "kind": "InferenceDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"name": "smol", "uri": "builtin://smollm2-135m-instruct", "revision": "v1"},
                 "replicas": replicas, "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "1Gi"}, **spec},
    }


logging.getLogger("kopf").setLevel(logging.WARNING)
