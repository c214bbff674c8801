"""The chart's RBAC, enforced: the real operator does its job under exactly the rules the chart grants.

The operator (kopf and the rayprism handlers) runs against the operator tests' emulated API server
(tests/operator/harness.py: kmock plus what a real API server does, and a KubeRay stand-in). Here the
emulator also plays the API server's RBAC authorizer: every request made with the operator's token
is checked against the Roles and ClusterRoles that `helm template` renders for the operator's
ServiceAccount, and answered 403 when no rule allows it, as Kubernetes would.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from contextlib import asynccontextmanager

import kmock
import kopf
import kubernetes.config.kube_config
import pytest
import yaml
from kmock import Server

from ..operator.harness import IDEP_PATH, NS, SERVICES, ApiServerEmulator, FakeKubeRay, deployment, register, wait_for
from .tools import tool_paths

TOKEN = "operator-service-account-token"
# HTTP-level actions as the RBAC verbs the API server checks.
VERB = {kmock.action.LIST: "list", kmock.action.WATCH: "watch", kmock.action.FETCH: "get",
        kmock.action.CREATE: "create", kmock.action.UPDATE: "patch", kmock.action.DELETE: "delete"}


class Forbidden(kmock.KubernetesError):
    status = 403
    reason = "Forbidden"
    message = "forbidden by the chart's RBAC rules"


def rendered_rules(watch_namespaces: list[str]) -> dict[str | None, list[dict]]:
    """{namespace or None (cluster-wide): rules} bound to the chart's operator ServiceAccount."""
    values = ["--set", f"watchNamespaces={{{','.join(watch_namespaces)}}}"] if watch_namespaces else []
    out = subprocess.run([str(tool_paths()["helm"]), "template", "rp", "charts/rayprism", *values],
                         capture_output=True, text=True, check=True, timeout=60)
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o["rules"]
             for o in objects if o["kind"] in ("Role", "ClusterRole")}
    rules: dict[str | None, list[dict]] = {}
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == "rp-rayprism" for s in binding["subjects"]):
            continue
        namespace = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        ref = binding["roleRef"]
        rules.setdefault(namespace, []).extend(roles[(ref["kind"], namespace if ref["kind"] == "Role" else None,
                                                      ref["name"])])
    return rules


class RbacEmulator(ApiServerEmulator):
    def __init__(self, rules: dict[str | None, list[dict]], **kwargs):
        super().__init__(**kwargs)
        self.rules = rules
        self.denied: list[str] = []
        self.allowed: set[tuple[str, str, str]] = set()

    def _permits(self, namespace: str | None, group: str, resource: str, verb: str) -> bool:
        # A ClusterRoleBinding grants in every namespace and cluster-wide; a RoleBinding in its own.
        scopes = [None] if namespace is None else [None, namespace]
        return any(group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
                   for scope in scopes for rule in self.rules.get(scope, []))

    async def _handle(self, request):
        # Only the operator's requests carry its token; the test's own (playing users and KubeRay) do not.
        # Discovery (/api, /apis/GROUP/VERSION: no plural) is open to every authenticated user.
        resource = request.resource
        if request.headers.get("Authorization") == f"Bearer {TOKEN}" and resource and resource.plural:
            plural = resource.plural + (f"/{request.subresource}" if request.subresource else "")
            check = (request.namespace, resource.group, plural, VERB[request.action])
            if not self._permits(*check):
                self.denied.append(f"{check[3]} {check[1] or 'core'}/{check[2]} in {check[0] or 'the cluster'}")
                raise Forbidden()
            self.allowed.add(check[1:])
            if request.action == kmock.action.CREATE:
                self._admit_owner_references(request)
        return await super()._handle(request)

    def _admit_owner_references(self, request) -> None:
        """The OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift): creating an object
        whose ownerReference sets blockOwnerDeletion needs update on the owner's finalizers subresource."""
        for ref in (request.data.get("metadata") or {}).get("ownerReferences") or []:
            if not ref.get("blockOwnerDeletion"):
                continue
            group = ref["apiVersion"].rpartition("/")[0]
            [plural] = [r.plural for r in self.resources if r.group == group and self.resources[r].kind == ref["kind"]]
            check = (request.namespace, group, f"{plural}/finalizers", "update")
            if not self._permits(*check):
                self.denied.append(f"update {group}/{plural}/finalizers in {request.namespace} (blockOwnerDeletion)")
                raise Forbidden()
            self.allowed.add(check[1:])


@asynccontextmanager
async def emulated_cluster(rules, tmp_path, monkeypatch):
    async with RbacEmulator(rules) as emulator, Server(emulator):
        register(emulator)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": str(emulator.url).rstrip("/")}}],
            "users": [{"name": "operator", "user": {"token": TOKEN}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "operator"}}]}))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        # The kubernetes package reads $KUBECONFIG once, at import.
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        yield emulator


@asynccontextmanager
async def running_operator(namespaces: list[str]):
    """kopf with the rayprism handlers, in its own thread and loop, cluster-wide or on `namespaces`."""
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True
    settings.watching.connect_timeout = 1
    settings.watching.server_timeout = 10
    settings.networking.request_timeout = 5
    # kmock cannot serve GET /api/v1/namespaces (its path parser reads "namespaces" as the start of a
    # namespaced URL), so the namespaced run turns kopf's cluster observation off: kopf then takes the
    # namespaces as given. The rules for that observation are checked statically in test_chart.py.
    settings.scanning.disabled = bool(namespaces)
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=asyncio.run, daemon=True, args=(kopf.operator(
        settings=settings, clusterwide=not namespaces, namespaces=namespaces, stop_flag=stop, ready_flag=ready),))
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 10), "the operator did not start"
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive(), "the operator did not stop"


def _available(k8s, replicas: int) -> bool:
    status = k8s.deployment("demo").get("status") or {}
    return status.get("availableReplicas") == replicas and status.get("replicas") == replicas


def _service_port(k8s) -> int | None:
    service = k8s.objects[SERVICES, NS, "demo"].raw
    return service["spec"]["ports"][0]["port"]


@pytest.mark.parametrize("watch_namespaces", [[], [NS]], ids=["cluster-wide", "namespaced"])
async def test_operator_works_within_the_chart_rbac(watch_namespaces, tmp_path, monkeypatch):
    monkeypatch.chdir(tool_paths()["helm"].parents[2])  # the repository root
    async with emulated_cluster(rendered_rules(watch_namespaces), tmp_path, monkeypatch) as k8s, \
            FakeKubeRay(k8s), running_operator(watch_namespaces):
        await k8s.post(IDEP_PATH, json=deployment(replicas=2))
        await wait_for(lambda: _available(k8s, 2), timeout=20, what="2 available replicas")
        await k8s.patch(f"{IDEP_PATH}/demo/scale", json={"spec": {"replicas": 1}})
        await wait_for(lambda: _available(k8s, 1) and len(k8s.replicas("demo")) == 1, timeout=20,
                       what="scaled down to 1")
        await k8s.patch(f"{IDEP_PATH}/demo", json={"spec": {"service": {"port": 9000}}})
        await wait_for(lambda: _service_port(k8s) == 9000, timeout=20, what="the Service patched to port 9000")
        await k8s.delete(f"{IDEP_PATH}/demo")
        await wait_for(lambda: not k8s.replicas("demo"), timeout=20, what="replicas collected")
    assert k8s.denied == []
    # The scenario did go through the rules: kopf's observation and the operator's own work.
    if not watch_namespaces:
        assert ("apiextensions.k8s.io", "customresourcedefinitions", "watch") in k8s.allowed
    assert {("rayprism.dev", "inferencedeployments", "watch"),
            ("rayprism.dev", "inferencedeployments/status", "patch"),
            ("ray.io", "rayclusters", "create"), ("ray.io", "rayclusters", "delete"),
            ("", "services", "get"), ("", "services", "create"), ("", "services", "patch"),
            ("", "secrets", "get"), ("", "secrets", "create"), ("", "events", "create"),
            ("rayprism.dev", "inferencedeployments/finalizers", "update")} <= k8s.allowed


async def test_a_missing_rule_is_denied(tmp_path, monkeypatch):
    """The authorizer is not a pass-through: without the RayCluster rule, creating replicas is refused."""
    monkeypatch.chdir(tool_paths()["helm"].parents[2])
    rules = rendered_rules([])
    rules[None] = [r for r in rules[None] if r["apiGroups"] != ["ray.io"]]
    async with emulated_cluster(rules, tmp_path, monkeypatch) as k8s, FakeKubeRay(k8s), running_operator([]):
        await k8s.post(IDEP_PATH, json=deployment(replicas=1))
        await wait_for(lambda: any("ray.io/rayclusters" in d for d in k8s.denied), timeout=20,
                       what="a denied RayCluster request")
    assert not k8s.replicas("demo")
