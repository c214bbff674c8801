"""Our kubelet, on the real API server: it registers Nodes, keeps their Leases fresh, runs the pods that the
real scheduler binds to them as local processes, and reports their real status.

    python -m e2e.controlplane.kubelet --kubeconfig K --state DIR --network network.json [--node SPEC ...]

Each pod gets its own network namespace on the cluster's bridge (a CNI bridge plugin's job: cluster.py
makes the bridge) and each container its own mount and UTS namespace, where the pod's volumes are mounted
at their mountPaths, so a rendered command runs byte for byte as in a container. A container sees the
host's filesystem, with the checkout standing for the image; /etc/hosts, /etc/resolv.conf and
/etc/profile are the kubelet's (read-only), /dev/shm a tmpfs of its own (64 MiB), and /tmp/ray a writable
dir of the pod's own, standing for the container's own writable /tmp where Ray keeps its temp dir.
With `securityContext.readOnlyRootFilesystem: true` there is no such /tmp/ray: every mount it sees is
remounted read-only in its mount namespace except its volumes, /proc and /dev (the host's, with a
/dev/shm of its own), as a runtime gives a read-only root filesystem; it brings its own emptyDir for /tmp
and whatever else it writes.

What it does as a kubelet does: pod phase, podIP, hostIP, Ready/ContainersReady/Initialized conditions,
containerStatuses with restart counts, states and exit codes (128 + the signal for a killed one); init
containers in order; restartPolicy with the kubelet's back-off (the first restart at once, then 10 s doubling,
at most 5 min); terminationMessagePolicy FallbackToLogsOnError (a failed container's log tail in its
terminated state); startup, readiness and liveness probes (httpGet, tcpSocket, exec; the others wait for the
startup probe; a failed liveness or startup probe is SIGTERM, the grace period, then SIGKILL); $(VAR)
expansion; env from values, fieldRef, resourceFieldRef, Secrets and ConfigMaps; emptyDir (a dir, or a
tmpfs of its sizeLimit for medium Memory), Secret, ConfigMap, downwardAPI and projected volumes, with
service-account tokens from the TokenRequest API bound to the pod and mounted at the path the admission
plugin chose (none where the pod or its ServiceAccount says `automountServiceAccountToken: false`);
KUBERNETES_SERVICE_HOST/PORT; preStop hooks (exec, httpGet, sleep), SIGTERM, the pod's grace period,
then SIGKILL, and only then the pod's final deletion. Its Nodes report `ephemeral-storage` capacity
(50Gi unless --node says otherwise), so pods that request or limit it are scheduled. Nodes labelled
`rayprism.dev/local-kubelet=true` that someone else created (a test that needs a Node with a given
number of `nvidia.com/gpu`) are run by this kubelet too: it renews their Leases and runs their pods.

What it does not (no container runtime here): no images (containers run this checkout's .venv, i.e. the
images' packages, with the image's ENV, ENTRYPOINT and CMD read from its Dockerfile), no cgroup limits,
no eviction (neither ephemeral-storage limits nor a disk emptyDir's sizeLimit are enforced: a disk
emptyDir is a dir under the state dir), no user switching (processes run as root; Pod Security
admission still checks the specs), no port-forward/exec/logs API (logs are files
under the state dir), no token refresh (tests run for less than the tokens' hour). Pods resolve
Service names through an /etc/hosts written from the Services' EndpointSlices (headless Services: every
address; others: the ready ones), as cluster DNS plus kube-proxy would route them; there is no DNS
server and no Service IP routing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import logging
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .node import Mountpoints

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY_TMP = "/tmp/ray"  # Ray's temp dir: each pod gets its own, as each container has its own /tmp
IMAGE_STASH = "/run/rayprism-kubelet-image"  # where each container binds the checkout before its mounts
NODE_LABEL = "rayprism.dev/local-kubelet"
HEARTBEAT_S = 10
LEASE_S = 40
log = logging.getLogger("kubelet")


class PodError(RuntimeError):
    """The pod cannot start as specified (a missing key, a volume kind this kubelet lacks...)."""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def quantity(value) -> float:
    """A Kubernetes quantity ("2", "500m", "4Gi", "1G") as a number."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


def next_back_off(exits: list["Exit"]) -> int:
    """Seconds before restarting a container that exited (exits: its runs so far, the last just ended)."""
    recent = 0
    for run in reversed(exits):
        if _seconds(run.finished) - _seconds(run.started) >= 600:
            break
        recent += 1
    return 0 if recent <= 1 else min(10 * 2 ** (recent - 2), 300)


def _seconds(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes, the rest is kept."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


@dataclass
class Image:
    """What an image would bring: ENV, ENTRYPOINT and CMD, read from this checkout's Dockerfile for it."""

    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]

    @classmethod
    def for_name(cls, image: str) -> "Image":
        repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
        dockerfiles = {"operator": REPO / "operator" / "Dockerfile", "worker": REPO / "worker_image" / "Dockerfile"}
        kind = repository.rsplit("/", 1)[-1]
        if kind not in dockerfiles:
            raise PodError(f"image {image!r}: this node runs only rayprism's operator and worker images "
                           f"(a repository ending in /operator or /worker)")
        env = {"PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        entrypoint: list[str] = []
        cmd: list[str] = []
        for line in dockerfiles[kind].read_text().replace("\\\n", " ").splitlines():
            word, _, rest = line.partition(" ")
            if word == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    env[key] = value
            elif word in ("ENTRYPOINT", "CMD"):
                value = json.loads(rest) if rest.strip().startswith("[") else ["/bin/sh", "-c", rest]
                entrypoint, cmd = (value, []) if word == "ENTRYPOINT" else (entrypoint, value)
        return cls(env, entrypoint, cmd)


class Api:
    """The API server, with the kubeconfig's token and CA."""

    def __init__(self, kubeconfig: Path):
        config = json.loads(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        self.server = cluster["server"]
        self.token = config["users"][0]["user"]["token"]
        self._ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Api":
        context = ssl.create_default_context(cadata=self._ca)
        self.session = aiohttp.ClientSession(
            base_url=self.server, headers={"Authorization": f"Bearer {self.token}"},
            connector=aiohttp.TCPConnector(ssl=context), timeout=aiohttp.ClientTimeout(total=30))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body=None, *, content_type: str = "application/json",
                   params: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body)
        async with self.session.request(method, path, data=data, params=params,
                                        headers={"Content-Type": content_type}) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text) if text else {}
            except json.JSONDecodeError:
                return response.status, {"message": text}

    async def get(self, path: str, **params) -> tuple[int, dict]:
        return await self.call("GET", path, params=params or None)

    async def merge_patch(self, path: str, body: dict) -> tuple[int, dict]:
        return await self.call("PATCH", path, body, content_type="application/merge-patch+json")


class Network:
    """Pod network namespaces on the cluster's bridge (cluster.py made it); addresses from its /24."""

    def __init__(self, state: dict):
        import ipaddress

        self.bridge, self.gateway = state["bridge"], state["gateway"]
        subnet = ipaddress.ip_network(state["subnet"])
        self.prefixlen = subnet.prefixlen
        self._free = [str(a) for a in subnet.hosts()][1:]
        self._next = 0
        self._tag = os.urandom(2).hex()[:3]  # names of a restarted kubelet never meet its predecessor's

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def add_pod(self) -> tuple[str, str]:
        netns, veth = f"{self.bridge}p{self._tag}{self._next}", f"{self.bridge}v{self._tag}{self._next}"
        self._next += 1
        address = self._free.pop(0)
        self._ip("netns", "add", netns)
        self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self._ip("link", "set", veth, "master", self.bridge, "up")
        self._ip("-n", netns, "addr", "add", f"{address}/{self.prefixlen}", "dev", "eth0")
        self._ip("-n", netns, "link", "set", "eth0", "up")
        self._ip("-n", netns, "link", "set", "lo", "up")
        # Ray finds its node IP through the default route, as it does in a pod.
        self._ip("-n", netns, "route", "add", "default", "via", self.gateway)
        return netns, address

    @staticmethod
    def pids(netns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def remove_pod(self, netns: str, address: str) -> None:
        """Deletes the namespace (its veth goes with it); the caller has ended its processes."""
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self._free.append(address)


@dataclass(frozen=True)
class Exit:
    """One run of a container that ended, as `state.terminated` / `lastState.terminated` report it."""

    code: int
    started: str
    finished: str
    message: str = ""

    def terminated(self) -> dict:
        return {"exitCode": self.code, "reason": "Completed" if self.code == 0 else "Error",
                "startedAt": self.started, "finishedAt": self.finished,
                **({"message": self.message} if self.message else {})}


@dataclass
class Container:
    """One container's runtime state, as containerStatuses reports it."""

    spec: dict
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)  # what exec hooks and probes run with, as in the container
    started_at: str = ""
    exits: list[Exit] = field(default_factory=list)
    log_offset: int = 0  # where this run's output starts in the container's log file
    ready: bool = False
    started: bool = False  # its startup probe passed (or it has none): readiness and liveness probes run
    waiting: tuple[str, str] = ("ContainerCreating", "")  # reason, message while not running

    @property
    def name(self) -> str:
        return self.spec["name"]

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Pod:
    """One pod on this node: its namespaces, volumes, containers, probes and status."""

    def __init__(self, kubelet: "Kubelet", obj: dict):
        self.kubelet, self.api = kubelet, kubelet.api
        self.obj = obj
        meta, self.spec = obj["metadata"], obj["spec"]
        self.name, self.namespace, self.uid = meta["name"], meta["namespace"], meta["uid"]
        self.root = kubelet.state / "pods" / self.uid
        self.netns = self.ip = ""
        self.init = [Container(c) for c in self.spec.get("initContainers", [])]
        self.containers = [Container(c) for c in self.spec["containers"]]
        self.initialized = not self.init
        self.phase = "Pending"
        self.failed = ""  # why the pod cannot run, reported on its containers instead of raising
        self.start_time = now()
        self.transitions: dict[str, tuple[str, str]] = {}  # condition type -> (status, since)
        self._tasks: list[asyncio.Task] = []
        self.run_task: asyncio.Task | None = None
        self._volumes: dict[str, tuple[str, str]] = {}
        self._written: dict | None = None
        self.terminating = False

    # --- start

    async def run(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.netns, self.ip = await asyncio.to_thread(self.kubelet.network.add_pod)
            self.write_hosts()
            self._volumes = await self.volumes()
            for container in self.init:
                await self.start_container(container)
                code = await self.exit_code(container)
                if code != 0:
                    if self.spec.get("restartPolicy", "Always") == "Never":
                        self.phase = "Failed"
                        return
                    raise PodError(f"init container {container.name} exited with {code}:\n{self.log(container.name)}")
            self.initialized = True
            for container in self.containers:
                await self.start_container(container)
                self._tasks.append(asyncio.create_task(self.supervise(container)))
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if kind in container.spec:
                        self._tasks.append(asyncio.create_task(self.probe(container, kind)))
            self.phase = "Running"
        except PodError as e:
            self.failed = str(e)
            for container in self.init + self.containers:
                if not container.running():
                    container.waiting = ("CreateContainerConfigError", str(e)[:1000])

    async def exit_code(self, container: Container) -> int:
        while container.process.poll() is None:
            await asyncio.sleep(0.2)
        code = container.process.returncode
        code = 128 - code if code < 0 else code  # killed by a signal: a runtime reports 128 + the signal
        container.exits.append(Exit(code, container.started_at, now(), self.termination_message(container, code)))
        return code

    def termination_message(self, container: Container, code: int) -> str:
        """terminationMessagePolicy FallbackToLogsOnError: a failed container's last log lines (at most 80
        lines and 2 KiB, the kubelet's limits). There is no terminationMessagePath file here to read first."""
        if code == 0 or container.spec.get("terminationMessagePolicy") != "FallbackToLogsOnError":
            return ""
        path = self.root / f"{container.name}.log"
        with open(path, "rb") as f:
            f.seek(container.log_offset)
            output = f.read()
        return "\n".join(output.decode(errors="replace").splitlines()[-80:])[-2048:]

    async def supervise(self, container: Container) -> None:
        policy = self.spec.get("restartPolicy", "Always")
        while True:
            code = await self.exit_code(container)
            container.ready = False
            await self.kill_processes(container)
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                if not any(c.running() for c in self.containers):
                    self.phase = "Succeeded" if all(c.exits[-1].code == 0 for c in self.containers) else "Failed"
                return
            # The kubelet's back-off: the first restart at once, then 10 s doubling up to 5 min; a container
            # that ran for 10 minutes (twice the longest back-off) starts over.
            back_off = next_back_off(container.exits)
            if back_off:
                container.waiting = ("CrashLoopBackOff", f"back-off {back_off}s restarting failed container")
                await asyncio.sleep(back_off)
            await self.start_container(container)

    async def secret(self, name: str, optional: bool = False) -> dict[str, bytes]:
        return await self._data("secrets", name, optional)

    async def config_map(self, name: str, optional: bool = False) -> dict[str, bytes]:
        return await self._data("configmaps", name, optional)

    async def _data(self, kind: str, name: str, optional: bool) -> dict[str, bytes]:
        """A Secret's or ConfigMap's data; a kubelet waits for one that does not exist yet."""
        while True:
            status, body = await self.api.get(f"/api/v1/namespaces/{self.namespace}/{kind}/{name}")
            if status == 200:
                data = {k: base64.b64decode(v) for k, v in (body.get("data") or {}).items()} if kind == "secrets" \
                    else {k: v.encode() for k, v in (body.get("data") or {}).items()}
                if kind == "configmaps":
                    data.update({k: base64.b64decode(v) for k, v in (body.get("binaryData") or {}).items()})
                return data
            if status == 404 and optional:
                return {}
            for container in self.init + self.containers:
                container.waiting = ("CreateContainerConfigError", f"{kind[:-1]} {name!r} not found")
            await asyncio.sleep(1)

    async def token(self, source: dict) -> bytes:
        """A service-account token bound to this pod, from the TokenRequest API."""
        sa = self.spec.get("serviceAccountName", "default")
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [source["audience"]] if source.get("audience") else [],
            "expirationSeconds": source.get("expirationSeconds", 3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}}}
        status, out = await self.api.call("POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{sa}/token", body)
        if status != 201:
            raise PodError(f"TokenRequest for service account {sa}: {status} {out.get('message')}")
        return out["status"]["token"].encode()

    @staticmethod
    def _select(data: dict[str, bytes], items: list[dict] | None) -> dict[str, bytes]:
        if not items:
            return data
        missing = [i["key"] for i in items if i["key"] not in data]
        if missing:
            raise PodError(f"keys {missing} not found")
        return {i["path"]: data[i["key"]] for i in items}

    async def _files(self, source: dict) -> dict[str, bytes]:
        """The files of one volume source (secret, configMap, downwardAPI, serviceAccountToken)."""
        if "secret" in source:
            s = source["secret"]
            return self._select(await self.secret(s.get("secretName") or s["name"], s.get("optional", False)), s.get("items"))
        if "configMap" in source:
            c = source["configMap"]
            return self._select(await self.config_map(c["name"], c.get("optional", False)), c.get("items"))
        if "downwardAPI" in source:
            return {i["path"]: self.field(i["fieldRef"]["fieldPath"]).encode() for i in source["downwardAPI"]["items"]}
        if "serviceAccountToken" in source:
            return {source["serviceAccountToken"]["path"]: await self.token(source["serviceAccountToken"])}
        raise PodError(f"volume source {sorted(source)} is not supported by this node")

    async def volumes(self) -> dict[str, tuple[str, str]]:
        """volume name -> (kind, source): ("bind", host dir) or ("tmpfs", size)."""
        out = {}
        for volume in self.spec.get("volumes", []):
            name = volume["name"]
            path = self.root / "volumes" / name
            if "emptyDir" in volume:
                if volume["emptyDir"].get("medium") == "Memory":
                    out[name] = ("tmpfs", str(int(quantity(volume["emptyDir"].get("sizeLimit", "64Mi")))))
                    continue
                path.mkdir(parents=True)
            elif any(k in volume for k in ("secret", "configMap", "downwardAPI", "projected")):
                kind = next(k for k in ("secret", "configMap", "downwardAPI", "projected") if k in volume)
                sources = volume["projected"]["sources"] if kind == "projected" else [{kind: volume[kind]}]
                mode = volume[kind].get("defaultMode", 0o644)
                path.mkdir(parents=True)
                for source in sources:
                    try:
                        files = await self._files(source)
                    except PodError as e:
                        raise PodError(f"volume {name}: {e}") from None
                    for relative, content in files.items():
                        (target := path / relative).parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(content)
                        target.chmod(mode)
            else:
                raise PodError(f"volume {name}: {sorted(set(volume) - {'name'})} volumes do not run on this node")
            out[name] = ("bind", str(path))
        return out

    def field(self, path: str) -> str:
        meta = self.obj["metadata"]
        fields = {"metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
                  "spec.nodeName": self.spec.get("nodeName", ""), "spec.serviceAccountName":
                  self.spec.get("serviceAccountName", ""), "status.podIP": self.ip, "status.podIPs": self.ip,
                  "status.hostIP": self.kubelet.network.gateway, "status.hostIPs": self.kubelet.network.gateway}
        if path in fields:
            return fields[path]
        if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        raise PodError(f"fieldRef {path!r} is not supported by this node")

    def resource_field(self, container: dict, ref: dict) -> str:
        kind, _, resource = ref["resource"].partition(".")
        resources = container.get("resources", {})
        value = resources.get(kind, {}).get(resource) or (resources.get("requests", {}).get(resource)
                                                          if kind == "limits" else None)
        if value is None:  # a limit that is not set: the node's allocatable, as a kubelet reports it
            value = self.kubelet.capacities.get(self.spec.get("nodeName"), {}).get(resource, "0")
        divisor = quantity(ref.get("divisor", "1"))
        return str(int(-(-quantity(value) // divisor)))  # rounded up, as the kubelet does

    async def env(self, container: dict, image: Image) -> dict[str, str]:
        env = dict(image.env)
        host, port = self.kubelet.network.gateway, self.kubelet.api_port
        # What the kubelet injects for the `kubernetes` Service: its endpoint here, as nothing routes its IP.
        env.update({"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
                    "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{host}:{port}"})
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                data = await self.secret(source["secretRef"]["name"], source["secretRef"].get("optional", False))
            elif "configMapRef" in source:
                data = await self.config_map(source["configMapRef"]["name"], source["configMapRef"].get("optional", False))
            else:
                raise PodError(f"container {container['name']}: envFrom {sorted(source)} is not supported")
            env.update({source.get("prefix", "") + k: v.decode() for k, v in data.items()})
        for var in container.get("env", []):
            source = var.get("valueFrom", {})
            if "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
            elif ref := source.get("fieldRef"):
                env[var["name"]] = self.field(ref["fieldPath"])
            elif ref := source.get("resourceFieldRef"):
                env[var["name"]] = self.resource_field(container, ref)
            elif ref := source.get("secretKeyRef") or source.get("configMapKeyRef"):
                fetch = self.secret if "secretKeyRef" in source else self.config_map
                data = await fetch(ref["name"], ref.get("optional", False))
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise PodError(f"container {container['name']}: env {var['name']}: "
                                   f"{ref['name']} has no key {ref['key']!r}")
                env[var["name"]] = data[ref["key"]].decode()
            else:
                raise PodError(f"container {container['name']}: env {var['name']}: unsupported source {var}")
        return env

    def write_hosts(self) -> None:
        """/etc/hosts of the pod: its own name, and the Services' names (kubelet.hosts_for). Written in place,
        as containers bind-mount this file and keep its inode."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
                 f"{self.ip} {self.name}", *self.kubelet.hosts_for(self.namespace)]
        text = "\n".join(lines) + "\n"
        path = self.root / "hosts"
        if not path.exists() or path.read_text() != text:
            with open(path, "r+" if path.exists() else "w") as f:
                f.write(text)
                f.truncate()

    async def start_container(self, container: Container) -> None:
        spec = container.spec
        image = Image.for_name(spec.get("image", ""))
        env = await self.env(spec, image)
        command = spec.get("command") or image.entrypoint
        args = spec.get("args") if "args" in spec else ([] if spec.get("command") else image.cmd)
        argv = [expand(a, env) for a in [*command, *args]]
        if not argv:
            raise PodError(f"container {container.name}: no command and no image ENTRYPOINT/CMD")
        (home := self.root / "home").mkdir(exist_ok=True)
        etc = self.kubelet.state / "etc"
        mounts = [("bind", str(self.root / "hosts"), "/etc/hosts", True),
                  ("bind", str(etc / "resolv.conf"), "/etc/resolv.conf", True),
                  ("bind", str(etc / "profile"), "/etc/profile", True)]
        read_only_root = (spec.get("securityContext") or {}).get("readOnlyRootFilesystem", False)
        if not read_only_root:  # the container's own writable /tmp, where Ray keeps its temp dir
            (ray_tmp := self.root / "ray").mkdir(exist_ok=True)
            mounts.insert(0, ("bind", str(ray_tmp), RAY_TMP, False))
        for mount in spec.get("volumeMounts", []):
            if mount["name"] not in self._volumes:
                raise PodError(f"container {container.name}: volumeMount {mount['name']!r} names no volume")
            kind, source = self._volumes[mount["name"]]
            if mount.get("subPath"):
                source = str(Path(source) / mount["subPath"])
            mounts.append((kind, source, mount["mountPath"], mount.get("readOnly", False)))
        if not any(target == "/dev/shm" for _, _, target, _ in mounts):  # a container runtime's default
            mounts.append(("tmpfs", str(64 * 2**20), "/dev/shm", False))
        # The checkout stands for the image's filesystem: a volume mounted over one of its parents (an
        # emptyDir at /tmp with the checkout under /tmp) must not hide it, so it is bound back on top.
        # Every source under the checkout is bound from that stash, as the mounts may hide the checkout.
        image_root, stash = str(REPO), IMAGE_STASH
        script = ["set -e", f"hostname {shlex.quote(self.name[:63])}",
                  f"mount --bind {shlex.quote(image_root)} {shlex.quote(stash)}"]
        for kind, source, target, read_only in mounts:
            self.kubelet.mountpoints.ensure(target)
            q = shlex.quote(target)
            if kind == "tmpfs":
                script.append(f"mount -t tmpfs -o size={shlex.quote(source)} tmpfs {q}")
            else:
                if source.startswith(image_root + "/"):
                    source = stash + source[len(image_root):]
                script.append(f"mount --bind {shlex.quote(source)} {q}")
                if read_only:
                    script.append(f"mount -o remount,bind,ro {q}")
        script.append(f"[ -e {shlex.quote(str(VENV_BIN / 'python'))} ] || "
                      f"{{ mkdir -p {shlex.quote(image_root)}; mount --bind {shlex.quote(stash)} {shlex.quote(image_root)}; }}")
        script.append(f"umount {shlex.quote(stash)}")
        if read_only_root:
            volumes = [os.path.normpath(m["mountPath"]) for m in spec.get("volumeMounts", [])]
            script.append(self.read_only_script(volumes))
        script += [f"cd {shlex.quote(spec.get('workingDir') or str(home))}", 'exec "$@"']
        env.setdefault("HOME", str(home))
        container.env = env
        log_file = open(self.root / f"{container.name}.log", "ab")  # a restart appends
        container.log_offset = log_file.tell()
        # ip netns exec and unshare exec, so the container's main process keeps this pid.
        container.process = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--propagation", "private", "--",
             "/bin/bash", "-c", "\n".join(script), "container", *argv],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log_file.close()
        container.started_at = now()
        container.waiting = ("", "")
        container.ready = "readinessProbe" not in spec
        container.started = "startupProbe" not in spec

    @staticmethod
    def read_only_script(volumes: list[str]) -> str:
        """Shell lines that make every mount the container sees read-only but its volumes, /proc, /dev and
        the mounts under those two (/dev/shm): the host's /, the checkout, /etc/hosts, /sys (read-only in a
        runtime's unprivileged containers too). Bind remounts change only this mount namespace's mounts. A
        mount hidden under a volume (its path is no mount point any more) cannot be reached: left alone."""
        exempt = "|".join(["/proc", "/proc/*", "/dev", "/dev/*", *map(shlex.quote, volumes)])
        return "\n".join([
            "while IFS= read -r target; do",
            "  printf -v target '%b' \"$target\"",  # findmnt -r writes a space as \x20
            f"  case \"$target\" in {exempt}) continue;; esac",
            "  mountpoint -q \"$target\" || continue",
            "  mount -o remount,bind,ro \"$target\"",
            "done < <(findmnt -rn -o TARGET)"])

    # --- probes and hooks

    async def check(self, container: Container, handler: dict, timeout: float) -> bool:
        """One probe or hook: httpGet, tcpSocket or exec (in the container's namespaces)."""
        if "exec" in handler:
            argv = ["nsenter", "-t", str(container.process.pid), "-m", "-n", "-u", "--", *handler["exec"]["command"]]
            try:
                process = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL,
                                                               stderr=subprocess.DEVNULL, env=container.env)
                return await asyncio.wait_for(process.wait(), timeout) == 0
            except (TimeoutError, OSError):
                return False
        kind = "httpGet" if "httpGet" in handler else "tcpSocket"
        port = handler[kind]["port"]
        if isinstance(port, str):
            port = next((p["containerPort"] for p in container.spec.get("ports", []) if p.get("name") == port), port)
        host = handler[kind].get("host") or self.ip
        try:
            if kind == "tcpSocket":
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
                writer.close()
                return True
            url = f"{handler[kind].get('scheme', 'HTTP').lower()}://{host}:{port}{handler[kind].get('path', '/')}"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                async with session.get(url, ssl=False) as response:
                    return 200 <= response.status < 400
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return False

    async def probe(self, container: Container, kind: str) -> None:
        probe = container.spec.get(kind)
        if probe is None:
            return
        await asyncio.sleep(probe.get("initialDelaySeconds", 0))
        failures = successes = 0
        while True:
            # The startup probe runs until it passes (again after each restart); the others only after it.
            if container.running() and container.started == (kind != "startupProbe"):
                ok = await self.check(container, probe, probe.get("timeoutSeconds", 1))
                failures, successes = (0, successes + 1) if ok else (failures + 1, 0)
                if kind == "readinessProbe":
                    if successes >= probe.get("successThreshold", 1):
                        container.ready = True
                    elif failures >= probe.get("failureThreshold", 3):
                        container.ready = False
                elif kind == "startupProbe" and ok:
                    container.started, failures = True, 0
                elif failures >= probe.get("failureThreshold", 3):
                    log.info("pod %s/%s: container %s failed its %s: restarting",
                             self.namespace, self.name, container.name, kind)
                    grace = probe.get("terminationGracePeriodSeconds", self.spec.get("terminationGracePeriodSeconds", 30))
                    await self.kill(container, grace)
                    failures = 0
            await asyncio.sleep(probe.get("periodSeconds", 10))

    # --- status

    def _condition(self, kind: str, ok: bool, reason: str = "") -> dict:
        status = "True" if ok else "False"
        if self.transitions.get(kind, ("", ""))[0] != status:
            self.transitions[kind] = (status, now())
        condition = {"type": kind, "status": status, "lastTransitionTime": self.transitions[kind][1],
                     "lastProbeTime": None}
        return {**condition, "reason": reason} if reason and not ok else condition

    def _container_status(self, container: Container, init: bool) -> dict:
        state: dict
        if container.running():
            state = {"running": {"startedAt": container.started_at}}
        elif container.waiting[0] or not container.exits:
            reason, message = container.waiting if container.waiting[0] else ("PodInitializing", "")
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        else:
            state = {"terminated": container.exits[-1].terminated()}
        restarts = max(0, len(container.exits) - (1 if init or not container.running() else 0))
        status = {"name": container.name, "image": container.spec.get("image", ""), "imageID": "",
                  "ready": container.ready and container.running(), "restartCount": restarts,
                  "started": container.running() and container.started, "state": state}
        if container.process is not None:
            status["containerID"] = f"rayprism-local://{container.process.pid}"
        if container.exits and (container.running() or container.waiting[0]):
            status["lastState"] = {"terminated": container.exits[-1].terminated()}
        return status

    def status(self) -> dict:
        ready = self.initialized and not self.failed and all(c.ready and c.running() for c in self.containers)
        started = bool(self.netns)
        status = {
            "phase": self.phase, "hostIP": self.kubelet.network.gateway,
            "hostIPs": [{"ip": self.kubelet.network.gateway}], "startTime": self.start_time,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": self.start_time, "lastProbeTime": None},
                self._condition("PodReadyToStartContainers", started),
                self._condition("Initialized", self.initialized, "ContainersNotInitialized"),
                self._condition("ContainersReady", ready, "ContainersNotReady"),
                self._condition("Ready", ready, "ContainersNotReady")],
            "containerStatuses": [self._container_status(c, False) for c in self.containers],
        }
        if self.init:
            status["initContainerStatuses"] = [self._container_status(c, True) for c in self.init]
        if self.ip:
            status["podIP"], status["podIPs"] = self.ip, [{"ip": self.ip}]
        return status

    async def report(self) -> None:
        status = self.status()
        if status != self._written or self._changed_by_others(status):
            code, body = await self.api.merge_patch(
                f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status", {"status": status})
            if code == 200:
                self._written = status
            elif code != 404:
                log.warning("pod %s/%s: status not written: %s %s", self.namespace, self.name, code, body.get("message"))

    @property
    def reported_phase(self) -> str | None:
        """The phase this kubelet last wrote to the API server."""
        return (self._written or {}).get("phase")

    def _changed_by_others(self, status: dict) -> bool:
        """Whether the API server holds other conditions than this kubelet wrote: the node lifecycle controller
        marks a Node's pods not ready when its Lease expired (an API server outage longer than its grace period
        does that too); a kubelet's status manager then writes the pods' real status again."""
        held = {c["type"]: c.get("status") for c in (self.obj.get("status") or {}).get("conditions") or []}
        return any(held.get(c["type"], c["status"]) != c["status"] for c in status["conditions"])

    def log(self, container: str) -> str:
        path = self.root / f"{container}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # --- stop

    async def terminate(self, grace_seconds: float) -> None:
        """preStop hooks, SIGTERM, the grace period (counting the hooks), then SIGKILL and cleanup."""
        deadline = time.monotonic() + grace_seconds
        if self.run_task is not None and not self.run_task.done():  # deleted while its containers started
            self.run_task.cancel()
            await asyncio.gather(self.run_task, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        hooks = [self._pre_stop(c, deadline) for c in self.containers
                 if c.running() and "preStop" in (c.spec.get("lifecycle") or {})]
        await asyncio.gather(*hooks)
        for container in self.init + self.containers:
            if container.running():
                container.process.send_signal(signal.SIGTERM)
        while any(c.running() for c in self.init + self.containers) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.netns:
            await self.kill_processes(None)
            await asyncio.to_thread(self.kubelet.network.remove_pod, self.netns, self.ip)
            self.netns = ""
        # The containers' logs outlive the pod (for diagnosis, as a kubelet keeps exited containers' logs).
        kept = self.kubelet.state / "logs" / f"{self.namespace}_{self.name}_{self.uid}"
        kept.mkdir(parents=True, exist_ok=True)
        for log_file in self.root.glob("*.log"):
            shutil.move(log_file, kept / log_file.name)
        shutil.rmtree(self.root, ignore_errors=True)

    async def _pre_stop(self, container: Container, deadline: float) -> None:
        hook = container.spec["lifecycle"]["preStop"]
        remaining = max(0.0, deadline - time.monotonic())
        if "sleep" in hook:
            await asyncio.sleep(min(hook["sleep"]["seconds"], remaining))
        else:
            await self.check(container, hook, remaining)

    async def kill(self, container: Container, grace_seconds: float) -> None:
        """A container that failed its liveness or startup probe: SIGTERM, then SIGKILL after its grace period;
        supervise() restarts it."""
        process = container.process
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if process.poll() is None:
            process.kill()

    async def kill_processes(self, container: Container | None) -> None:
        """SIGKILL to every process in the pod's network namespace until none is left (a runtime kills the
        container's cgroup; rendered pods run one container with processes of its own), and reaps."""
        while pids := self.kubelet.network.pids(self.netns):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await asyncio.sleep(0.1)
        for c in [container] if container else self.init + self.containers:
            if c.process is not None:
                await asyncio.to_thread(c.process.wait)


class Kubelet:
    def __init__(self, api: Api, state: Path, network: Network, nodes: list[tuple[str, dict[str, str]]]):
        self.api, self.state, self.network = api, state, network
        self.api_port = api.server.rsplit(":", 1)[1]
        self.own_nodes = nodes
        self.capacities = dict(nodes)  # of the nodes it registered (a test's nodes carry their own)
        self.nodes: set[str] = {name for name, _ in nodes}
        self.pods: dict[str, Pod] = {}  # uid -> pod
        self.stopping: set[asyncio.Task] = set()  # pods being terminated
        self.finished: set[str] = set()  # uids of pods whose containers completed (restartPolicy)
        self.service_names: list[tuple[str, str, str]] = []  # (namespace, Service, address)
        self.mountpoints = Mountpoints()

    # --- nodes

    def node_status(self, capacity: dict[str, str] | None) -> dict:
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                 "lastHeartbeatTime": now(), "lastTransitionTime": self.started}
        pressures = [{"type": t, "status": "False", "reason": f"KubeletHas{r}", "message": "",
                      "lastHeartbeatTime": now(), "lastTransitionTime": self.started}
                     for t, r in (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"),
                                  ("PIDPressure", "SufficientPID"))]
        status = {"conditions": [*pressures, ready]}
        if capacity is not None:
            status.update({
                "capacity": capacity, "allocatable": capacity,
                "addresses": [{"type": "InternalIP", "address": self.network.gateway}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {"kubeletVersion": f"v{os.environ.get('KUBERNETES_VERSION', '1.36.3')}",
                             "kubeProxyVersion": "", "containerRuntimeVersion": "rayprism-local://1",
                             "operatingSystem": "linux", "architecture": "amd64", "osImage": "rayprism local node",
                             "kernelVersion": os.uname().release, "machineID": "", "systemUUID": "", "bootID": ""}})
        return status

    async def register(self) -> None:
        for name, capacity in self.own_nodes:
            body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                NODE_LABEL: "true"}}}
            code, out = await self.api.call("POST", "/api/v1/nodes", body)
            if code not in (201, 409):
                raise RuntimeError(f"node {name} not registered: {code} {out.get('message')}")
            code, out = await self.api.merge_patch(f"/api/v1/nodes/{name}/status", {"status": self.node_status(capacity)})
            if code != 200:
                raise RuntimeError(f"node {name} status not written: {code} {out.get('message')}")

    async def heartbeat(self) -> None:
        """Every node labelled for this kubelet: Ready, and a fresh Lease; through API server outages too."""
        while True:
            try:
                await self._beat()
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("heartbeat: API server: %r", e)
            await asyncio.sleep(HEARTBEAT_S)

    async def _beat(self) -> None:
        code, out = await self.api.get("/api/v1/nodes", labelSelector=f"{NODE_LABEL}=true")
        if code == 200:
            self.nodes = {n["metadata"]["name"] for n in out["items"]}
        for name in self.nodes:
            await self.api.merge_patch(f"/api/v1/nodes/{name}/status", {"status": self.node_status(None)})
            lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                     "metadata": {"name": name, "namespace": "kube-node-lease"},
                     "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_S,
                              "renewTime": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
            code, _ = await self.api.call("PUT", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}", lease)
            if code == 404:
                await self.api.call("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)

    # --- Service names for the pods' /etc/hosts

    async def refresh_hosts(self) -> None:
        code, services = await self.api.get("/api/v1/services")
        code2, slices = await self.api.get("/apis/discovery.k8s.io/v1/endpointslices")
        if code != 200 or code2 != 200:
            return
        publish_not_ready = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in services["items"]
                             if s["spec"].get("publishNotReadyAddresses")}
        addresses: dict[tuple[str, str], set[str]] = {}
        for s in slices["items"]:
            key = (s["metadata"]["namespace"], (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name", ""))
            for endpoint in s.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") or key in publish_not_ready:
                    addresses.setdefault(key, set()).update(endpoint["addresses"])
        names = []
        for svc in services["items"]:
            key = (svc["metadata"]["namespace"], svc["metadata"]["name"])
            # A headless Service's name resolves to every address; for a Service IP, which nothing routes
            # here, to one ready endpoint, as kube-proxy would pick one.
            ips = sorted(addresses.get(key, ()))
            names += [(*key, ip) for ip in (ips if svc["spec"].get("clusterIP") == "None" else ips[:1])]
        self.service_names = names

    def hosts_for(self, namespace: str) -> list[str]:
        """/etc/hosts lines of the Services: in full, and short in the pod's own namespace (as the DNS search
        domains make them)."""
        return [f"{ip} {name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns}" + (f" {name}" if ns == namespace else "")
                for ns, name, ip in self.service_names]

    # --- pods

    async def sync(self) -> None:
        code, out = await self.api.get("/api/v1/pods")
        if code != 200:
            log.warning("pods not listed: %s %s", code, out.get("message"))
            return
        listed = {}
        for obj in out["items"]:
            if obj["spec"].get("nodeName") not in self.nodes:
                continue
            uid = obj["metadata"]["uid"]
            listed[uid] = obj
            pod = self.pods.get(uid)
            if obj["metadata"].get("deletionTimestamp"):
                if pod is None or uid in self.finished:
                    await self.remove(obj)
                elif not pod.terminating:
                    grace = obj["metadata"].get("deletionGracePeriodSeconds",
                                                obj["spec"].get("terminationGracePeriodSeconds", 30))
                    self.stop(pod, grace, obj)
            elif pod is None and uid not in self.finished and obj.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                pod = self.pods[uid] = Pod(self, obj)
                pod.run_task = asyncio.create_task(pod.run())
            elif pod is not None:
                pod.obj = obj
        for uid in [u for u in self.pods if u not in listed]:
            if uid in self.finished:  # a completed pod whose object is gone: nothing left to run or report
                del self.pods[uid]
                self.finished.discard(uid)
            elif not self.pods[uid].terminating:  # deleted with grace 0 by someone else
                self.stop(self.pods[uid], 0, None)
        await self.refresh_hosts()
        for pod in list(self.pods.values()):
            if pod.terminating:
                continue
            if pod.netns:
                pod.write_hosts()
            await pod.report()
            # Stopped (and no longer reported) only once the API server holds the final phase: a container that
            # ends while report() awaits it, or a write that failed, is reported again by the next sync.
            if pod.reported_phase in ("Succeeded", "Failed") and pod.uid not in self.finished:
                self.finished.add(pod.uid)
                self.stop(pod, 0, None, keep=True)

    def stop(self, pod: Pod, grace: float, obj: dict | None, keep: bool = False) -> None:
        pod.terminating = True  # at once: the next sync must not stop it again
        cause = "completed" if keep else "deleted" if obj is not None else "gone from the API server"
        log.info("pod %s/%s %s: stopping with a grace period of %ss", pod.namespace, pod.name, cause, grace)
        task = asyncio.create_task(self.terminate(pod, grace, obj, keep))
        self.stopping.add(task)
        task.add_done_callback(self.stopping.discard)

    async def terminate(self, pod: Pod, grace: float, obj: dict | None, keep: bool) -> None:
        try:
            await pod.terminate(grace)
        finally:
            if not keep:
                self.pods.pop(pod.uid, None)
                self.finished.discard(pod.uid)
        if obj is not None:
            await self.remove(obj)

    async def remove(self, obj: dict) -> None:
        """The pod's final deletion, once its containers are gone (grace 0, only this uid)."""
        meta = obj["metadata"]
        await self.api.call("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                            {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                             "preconditions": {"uid": meta["uid"]}})

    # --- lifetime

    async def run(self, stop: asyncio.Event) -> None:
        self.started = now()
        etc = self.state / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        # No DNS server: lookups of names that /etc/hosts lacks fail at once (127.0.0.1:53 refuses).
        (etc / "resolv.conf").write_text("options timeout:1 attempts:1\n")
        # An image's /etc/profile sets no PATH of its own over the image's (KubeRay runs `bash -lc`).
        (etc / "profile").write_text("")
        self.mountpoints.__enter__()
        self.mountpoints.ensure(IMAGE_STASH)
        await self.register()
        beat = asyncio.create_task(self.heartbeat())
        try:
            while not stop.is_set():
                try:
                    await self.sync()
                except (aiohttp.ClientError, TimeoutError) as e:
                    log.warning("API server: %r", e)
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except TimeoutError:
                    pass
        finally:
            beat.cancel()
            # Stopping the node: every pod gets its grace period (a node drain would evict them first).
            for pod in list(self.pods.values()):
                if not pod.terminating:
                    self.stop(pod, min(30, pod.spec.get("terminationGracePeriodSeconds", 30)), None)
            await asyncio.gather(*self.stopping, return_exceptions=True)
            self.mountpoints.__exit__()


def node_spec(text: str) -> tuple[str, dict[str, str]]:
    """NAME[:RESOURCE=QUANTITY,...] -> (name, capacity); cpu and memory default to this machine's."""
    name, _, rest = text.partition(":")
    memory_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    capacity = {"cpu": str(os.cpu_count()), "memory": f"{memory_kib}Ki", "pods": "110", "ephemeral-storage": "50Gi"}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        capacity[key] = value
    return name, capacity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True, help="pod directories, logs and node files")
    parser.add_argument("--network", type=Path, required=True, help="the bridge cluster.py made (JSON)")
    parser.add_argument("--node", action="append", default=[], help="NAME[:RESOURCE=QUANTITY,...]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.state.mkdir(parents=True, exist_ok=True)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with Api(args.kubeconfig) as api:
            network = Network(json.loads(args.network.read_text()))
            await Kubelet(api, args.state, network, [node_spec(n) for n in args.node]).run(stop)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
