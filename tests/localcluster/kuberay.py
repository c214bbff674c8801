"""KubeRay for the emulated API server: for every RayCluster, the head pod and the worker pods it would
create (KubeRay 1.x pod builder: labels, KUBERAY_GEN_RAY_START_CMD and the env it injects, the workers'
wait-gcs-ready init container), run by the local kubelet (kubelet.py); the RayCluster's status is
written from those pods' real health. Deleting a RayCluster deletes its pods.

Differences from KubeRay: workers reach the head at its pod IP (no DNS here for the head Service's name;
that Service is not created, the operator reaches heads at status.head.podIP), Ray runs with
RAY_AUTH_MODE=disabled and without usage stats (no network to report to), and wait-gcs-ready polls every
2 s instead of 5, with `bash -c` instead of `bash -lc` (a login shell here would reset PATH away from the
image's packages).
"""

from __future__ import annotations

import asyncio
import datetime
import math
import re
import uuid
from pathlib import Path

import aiohttp
import kmock

from .kubelet import Pod
from .network import PodNetwork
from .node import Mountpoints

RC = kmock.resource("ray.io/v1/rayclusters")
GCS_PORT = "6379"
TEST_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _quantity(value: str) -> float:
    """A Kubernetes quantity ("2", "500m", "4Gi", "1G") as a number."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


def ray_start_command(params: dict[str, str], container: dict, head: bool, head_address: str) -> str:
    """KubeRay's generated `ray start`: rayStartParams plus what it fills in from the container's
    resources (num-cpus, memory, num-gpus) and its defaults (block, metrics and agent ports)."""
    params = dict(params)
    resources = container.get("resources", {})
    amounts = {**resources.get("requests", {}), **resources.get("limits", {})}
    if "num-cpus" not in params and "cpu" in amounts:
        params["num-cpus"] = str(math.ceil(_quantity(amounts["cpu"])))
    if "memory" not in params and "memory" in amounts:
        params["memory"] = str(int(_quantity(amounts["memory"])))
    if "num-gpus" not in params:
        gpus = [v for k, v in resources.get("limits", {}).items() if k.endswith("gpu")]
        if gpus:
            params["num-gpus"] = str(gpus[0])
    params.setdefault("metrics-export-port", "8080")
    params.setdefault("dashboard-agent-listen-port", "52365")
    params.setdefault("block", "true")
    if not head:
        params["address"] = head_address
    flags = [f"--{k}" if v == "true" else f"--{k}={v}" for k, v in sorted(params.items())]
    return " ".join(["ray", "start", *(["--head"] if head else []), *flags])


def _kuberay_env(cluster: str, start_command: str, ray_ip: str) -> list[dict]:
    def field(path: str) -> dict:
        return {"valueFrom": {"fieldRef": {"fieldPath": path}}}

    return [
        {"name": "RAY_CLUSTER_NAME", **field("metadata.labels['ray.io/cluster']")},
        {"name": "RAY_CLOUD_INSTANCE_ID", **field("metadata.name")},
        {"name": "RAY_NODE_TYPE_NAME", **field("metadata.labels['ray.io/group']")},
        {"name": "KUBERAY_GEN_RAY_START_CMD", "value": start_command},
        {"name": "RAY_IP", "value": ray_ip},
        {"name": "FQ_RAY_IP", "value": ray_ip},
        {"name": "RAY_PORT", "value": GCS_PORT},
        {"name": "RAY_ADDRESS", "value": f"{ray_ip}:{GCS_PORT}"},
        {"name": "RAY_USAGE_STATS_KUBERAY_IN_USE", "value": "1"},
        {"name": "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "value": "1"},
        *({"name": k, "value": v} for k, v in TEST_ENV.items()),
    ]


def _wait_gcs_ready(container: dict, address: str, env: list[dict]) -> dict:
    """KubeRay's injected init container for workers: wait until the head's GCS answers."""
    return {
        "name": "wait-gcs-ready",
        "image": container.get("image"),
        "command": ["/bin/bash", "-c", "--"],
        "args": [f"until ray health-check --address {address} > /dev/null 2>&1; do "
                 "echo wait for GCS to be ready; sleep 2; done"],
        "env": env,
    }


class RayClusterPods:
    """The pods of one RayCluster."""

    def __init__(self, raycluster: dict):
        self.name = raycluster["metadata"]["name"]
        self.namespace = raycluster["metadata"]["namespace"]
        self.uid = raycluster["metadata"]["uid"]
        self.head: Pod | None = None
        self.workers: list[Pod] = []
        self.desired_workers = sum(g.get("replicas", 0) for g in raycluster["spec"].get("workerGroupSpecs", []))
        self.head_ready_since: tuple[bool, str] = (False, _now())
        self.task: asyncio.Task | None = None

    def busy(self) -> bool:
        """Pods of deleted RayClusters are still stopping."""
        return bool(self._stopping)

    def pods(self) -> list[Pod]:
        return [p for p in [self.head, *self.workers] if p is not None]

    def status(self) -> dict:
        head_ready = self.head is not None and self.head.is_ready()
        if head_ready != self.head_ready_since[0]:
            self.head_ready_since = (head_ready, _now())
        ready_workers = sum(w.is_ready() for w in self.workers)
        status = {
            "state": "ready" if head_ready and ready_workers == self.desired_workers else "",
            "desiredWorkerReplicas": self.desired_workers,
            "readyWorkerReplicas": ready_workers,
            "availableWorkerReplicas": ready_workers,
            "conditions": [{
                "type": "HeadPodReady", "status": str(head_ready),
                "reason": "HeadPodRunningAndReady" if head_ready else "HeadPodNotReady",
                "lastTransitionTime": self.head_ready_since[1]}],
        }
        if self.head is not None and self.head.ip:
            status["head"] = {"podIP": self.head.ip, "podName": self.head.name}
        return status


class LocalKubeRay:
    """Watches the emulator's RayClusters and runs their pods; `grace_seconds` is the pods' termination
    grace period (SIGTERM, then SIGKILL)."""

    def __init__(self, k8s, network: PodNetwork, workdir: Path, grace_seconds: float = 10.0):
        self.k8s, self.network, self.workdir = k8s, network, workdir
        self.grace_seconds = grace_seconds
        self.clusters: dict[str, RayClusterPods] = {}  # uid -> pods
        self.mountpoints = Mountpoints()
        self._api: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._stopping: set[asyncio.Task] = set()

    # --- pods of a RayCluster, as KubeRay builds them

    def _pod(self, rc: dict, group: str, node_type: str, template: dict) -> Pod:
        cluster = rc["metadata"]["name"]
        suffix = uuid.uuid4().hex[:5]
        name = f"{cluster}-head-{suffix}" if node_type == "head" else f"{cluster}-{group}-worker-{suffix}"
        labels = {**template.get("metadata", {}).get("labels", {}), "ray.io/cluster": cluster,
                  "ray.io/group": group, "ray.io/node-type": node_type}
        return Pod(name=name, namespace=rc["metadata"]["namespace"], labels=labels, spec=dict(template["spec"]),
                   network=self.network, api=self._api, root=self.workdir / name, mountpoints=self.mountpoints)

    @staticmethod
    def _with_env(spec: dict, env: list[dict]) -> dict:
        container, *rest = spec["containers"]
        return {**spec, "containers": [{**container, "env": [*container.get("env", []), *env]}, *rest]}

    async def _run(self, rc: dict, pods: RayClusterPods) -> None:
        head_group = rc["spec"]["headGroupSpec"]
        template = head_group["template"]
        command = ray_start_command(head_group.get("rayStartParams", {}), template["spec"]["containers"][0],
                                    head=True, head_address="")
        head = self._pod(rc, "headgroup", "head", template)
        head.spec = self._with_env(head.spec, _kuberay_env(pods.name, command, "127.0.0.1"))
        pods.head = head
        await head.start()
        address = f"{head.ip}:{head_group.get('rayStartParams', {}).get('port', GCS_PORT)}"
        for group in rc["spec"].get("workerGroupSpecs", []):
            template = group["template"]
            container = template["spec"]["containers"][0]
            command = ray_start_command(group.get("rayStartParams", {}), container, head=False, head_address=address)
            env = _kuberay_env(pods.name, command, head.ip)
            for _ in range(group.get("replicas", 0)):
                worker = self._pod(rc, group["groupName"], "worker", template)
                worker.spec = self._with_env(worker.spec, env)
                worker.spec["initContainers"] = [_wait_gcs_ready(container, address, env),
                                                 *worker.spec.get("initContainers", [])]
                pods.workers.append(worker)
        await asyncio.gather(*(w.start() for w in pods.workers))

    async def _stop(self, pods: RayClusterPods) -> None:
        if pods.task:
            pods.task.cancel()
            await asyncio.gather(pods.task, return_exceptions=True)
        await asyncio.gather(*(p.stop(self.grace_seconds) for p in pods.pods()))

    # --- the control loop

    def _live(self) -> dict[str, dict]:
        out = {}
        for (resource, _, _), obj in list(self.k8s.objects.items()):
            if resource == RC and not obj.deleted:
                raw = obj.raw
                if not raw["metadata"].get("deletionTimestamp"):
                    out[raw["metadata"]["uid"]] = raw
        return out

    async def _loop(self) -> None:
        written: dict[str, dict] = {}
        while True:
            live = self._live()
            for uid, rc in live.items():
                if uid not in self.clusters:
                    pods = self.clusters[uid] = RayClusterPods(rc)
                    pods.task = asyncio.create_task(self._run(rc, pods))
            for uid in [u for u in self.clusters if u not in live]:
                task = asyncio.create_task(self._stop(self.clusters.pop(uid)))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
                written.pop(uid, None)
            for uid, pods in self.clusters.items():
                status = pods.status()
                if written.get(uid) != status:
                    async with self._api.patch(
                            f"/apis/ray.io/v1/namespaces/{pods.namespace}/rayclusters/{pods.name}/status",
                            json={"status": status}) as response:
                        if response.status == 200:
                            written[uid] = status
            await asyncio.sleep(0.2)

    def busy(self) -> bool:
        """Pods of deleted RayClusters are still stopping."""
        return bool(self._stopping)

    def pods(self) -> list[Pod]:
        return [p for c in self.clusters.values() for p in c.pods()]

    def describe(self) -> str:
        """Every pod's state and log tail, and any error KubeRay's own work hit: for failure messages."""
        lines = [p.describe() for p in self.pods()]
        for c in self.clusters.values():
            if c.task and c.task.done() and not c.task.cancelled() and c.task.exception():
                lines.append(f"RayCluster {c.name}: {c.task.exception()!r}")
        return "\n".join(lines) or "no pods"

    async def __aenter__(self) -> "LocalKubeRay":
        self.mountpoints.__enter__()
        self._api = aiohttp.ClientSession(base_url=str(self.k8s.url))
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._stopping, *(self._stop(p) for p in self.clusters.values()))
        self.clusters.clear()
        await self._api.close()
        self.mountpoints.__exit__()
