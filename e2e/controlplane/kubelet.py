"""A kubelet for one machine: runs a pod spec's containers as local processes, byte-for-byte the rendered
command, args and env, each pod in its own network namespace (see network.py) and its own mount namespace,
where the pod's volumes are mounted at the rendered mountPaths.

What a kubelet does and this one does too: $(VAR) expansion in command/args/env, env from fieldRef and
Secrets (through the API server), emptyDir (a dir, or a tmpfs of sizeLimit for medium Memory), Secret
volumes (files with defaultMode, mounted read-only), a 64 MiB /dev/shm where no volume is mounted there
(a container runtime's default), init containers run in order to completion,
readiness probes (httpGet with the rendered period, timeout and threshold), SIGTERM then SIGKILL on delete.

Containers restart as restartPolicy says (default Always), after a kubelet's back-off (10 s, doubling),
and a restart first ends whatever the container left running (a runtime kills the container's cgroup;
here: every process in the pod's namespace, which holds just that container in rendered pods).

What it does not: no image (the container runs this checkout's .venv, i.e. the image's packages, with the
image's ENV from worker_image/Dockerfile), no cgroup limits, processes run as root (the interpreter lives
under /root, unreadable to uid 1000), and the open-files hard limit is this machine's (the rendered
commands raise the soft limit to it, as in a container).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .network import PodNetwork
from .node import Mountpoints


REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# Ray's default temp dir: each pod gets its own, as each container has its own /tmp.
RAY_TMP = "/tmp/ray"


class PodError(RuntimeError):
    """The pod cannot start as rendered (a missing Secret key, an env source this kubelet lacks...)."""


def image_env() -> dict[str, str]:
    """The worker image's environment: its Dockerfile ENV lines, with PATH leading to the image's packages."""
    env = {"PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    text = (REPO / "worker_image" / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes, the rest is kept."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


@dataclass
class Pod:
    """One pod: its metadata (name, namespace, labels) and spec, as KubeRay would create it."""

    name: str
    namespace: str
    labels: dict[str, str]
    spec: dict
    network: PodNetwork
    api: aiohttp.ClientSession  # the API server, for Secrets
    root: Path                  # the pod's directory on the node (volumes, logs, home)
    mountpoints: Mountpoints    # the machine's mountpoint dirs for bind mounts
    netns: str = ""
    ip: str = ""
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # container -> main process
    exits: dict[str, list[int]] = field(default_factory=dict)  # container -> exit codes so far
    ready: bool = False
    failed: str = ""            # why the pod cannot run (set instead of raising: a kubelet reports)
    _tasks: list[asyncio.Task] = field(default_factory=list)  # supervisors and the readiness probe

    # --- start

    async def start(self) -> None:
        try:
            self.root.mkdir(parents=True)
            self.netns, self.ip = await asyncio.to_thread(self.network.add_pod)
            volumes = await self._volumes()
            for container in self.spec.get("initContainers", []):
                code = await self._exit_code(await self._run_container(container, volumes))
                del self.processes[container["name"]]  # done; its log stays
                if code != 0:
                    raise PodError(f"init container {container['name']} exited with {code}:\n"
                                   f"{self.log(container['name'])}")
            for container in self.spec["containers"]:
                await self._run_container(container, volumes)
                self._tasks.append(asyncio.create_task(self._supervise(container, volumes)))
            container = self.spec["containers"][0]
            if probe := container.get("readinessProbe"):
                self._tasks.append(asyncio.create_task(self._readiness(container, probe)))
            else:
                self.ready = True
        except PodError as e:
            self.failed = str(e)

    @staticmethod
    async def _exit_code(process: subprocess.Popen) -> int:
        while process.poll() is None:
            await asyncio.sleep(0.2)
        return process.returncode

    async def _supervise(self, container: dict, volumes: dict[str, tuple[str, str]]) -> None:
        name, policy = container["name"], self.spec.get("restartPolicy", "Always")
        while True:
            code = await self._exit_code(self.processes[name])
            self.exits.setdefault(name, []).append(code)
            self.ready = False
            await self._kill_all()
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                return
            await asyncio.sleep(min(10 * 2 ** (len(self.exits[name]) - 1), 300))
            await self._run_container(container, volumes)
            self.ready = "readinessProbe" not in container  # else the probe decides

    async def _secret(self, name: str) -> dict[str, bytes]:
        """A Secret's data; a kubelet waits for a Secret that does not exist yet (pod ContainerCreating)."""
        while True:
            async with self.api.get(f"/api/v1/namespaces/{self.namespace}/secrets/{name}") as response:
                if response.status == 200:
                    body = await response.json()
                    return {k: base64.b64decode(v) for k, v in (body.get("data") or {}).items()}
            await asyncio.sleep(0.2)

    async def _volumes(self) -> dict[str, tuple[str, str]]:
        """volume name -> (kind, source): ("bind", host dir) or ("tmpfs", size)."""
        out = {}
        for volume in self.spec.get("volumes", []):
            name = volume["name"]
            if "emptyDir" in volume:
                if volume["emptyDir"].get("medium") == "Memory":
                    out[name] = ("tmpfs", volume["emptyDir"].get("sizeLimit", "64Mi").replace("i", ""))
                else:
                    (path := self.root / "volumes" / name).mkdir(parents=True)
                    out[name] = ("bind", str(path))
            elif "secret" in volume:
                data = await self._secret(volume["secret"]["secretName"])
                (path := self.root / "volumes" / name).mkdir(parents=True)
                for key, value in data.items():
                    (path / key).write_bytes(value)
                    (path / key).chmod(volume["secret"].get("defaultMode", 0o644))
                out[name] = ("bind", str(path))
            else:
                raise PodError(f"volume {name}: only emptyDir and secret volumes run on this node, "
                               f"not {sorted(volume)}")
        return out

    def _field(self, path: str) -> str:
        fields = {"metadata.name": self.name, "metadata.namespace": self.namespace, "status.podIP": self.ip,
                  "spec.nodeName": "localhost", "status.hostIP": self.network.gateway}
        if path in fields:
            return fields[path]
        if m := re.fullmatch(r"metadata\.labels\['(.+)'\]", path):
            return self.labels.get(m.group(1), "")
        raise PodError(f"pod {self.name}: fieldRef {path!r} is not supported by this kubelet")

    async def _env(self, container: dict) -> dict[str, str]:
        env = image_env()
        for source in container.get("envFrom", []):
            if "secretRef" not in source:
                raise PodError(f"container {container['name']}: envFrom {sorted(source)} is not supported")
            data = await self._secret(source["secretRef"]["name"])
            env.update({source.get("prefix", "") + k: v.decode() for k, v in data.items()})
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
            elif ref := var.get("valueFrom", {}).get("fieldRef"):
                env[var["name"]] = self._field(ref["fieldPath"])
            elif ref := var.get("valueFrom", {}).get("secretKeyRef"):
                data = await self._secret(ref["name"])
                if ref["key"] not in data:
                    raise PodError(f"container {container['name']}: Secret {ref['name']} has no key {ref['key']!r}")
                env[var["name"]] = data[ref["key"]].decode()
            else:
                raise PodError(f"container {container['name']}: env {var['name']}: unsupported source {var}")
        return env

    async def _run_container(self, container: dict, volumes: dict[str, tuple[str, str]]) -> subprocess.Popen:
        env = await self._env(container)
        argv = [expand(a, env) for a in container.get("command", []) + container.get("args", [])]
        if not argv:
            raise PodError(f"container {container['name']}: no command (this node has no image entrypoint)")
        (ray_tmp := self.root / "ray").mkdir(exist_ok=True)
        mounts = [("bind", str(ray_tmp), RAY_TMP, False)]
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                raise PodError(f"container {container['name']}: volumeMount {mount['name']!r} names no volume")
            kind, source = volumes[mount["name"]]
            mounts.append((kind, source, mount["mountPath"], mount.get("readOnly", False)))
        if not any(target == "/dev/shm" for _, _, target, _ in mounts):  # a container runtime's default
            mounts.append(("tmpfs", "64M", "/dev/shm", False))
        script = ["set -e"]
        for kind, source, target, read_only in mounts:
            self.mountpoints.ensure(target)
            if kind == "tmpfs":
                script.append(f"mount -t tmpfs -o size={shlex.quote(source)} tmpfs {shlex.quote(target)}")
            else:
                script.append(f"mount --bind {shlex.quote(source)} {shlex.quote(target)}")
                if read_only:
                    script.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
        (home := self.root / "home").mkdir(exist_ok=True)
        script.append(f"cd {shlex.quote(str(home))}")
        script.append('exec "$@"')
        env.setdefault("HOME", str(home))
        log_file = open(self.root / f"{container['name']}.log", "ab")  # a restart appends
        # ip netns exec and unshare exec, so the container's main process keeps this pid.
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "--",
             "/bin/bash", "-c", "\n".join(script), "mount-volumes", *argv],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log_file.close()
        self.processes[container["name"]] = process
        return process

    # --- health

    async def _readiness(self, container: dict, probe: dict) -> None:
        http = probe["httpGet"]
        port = http["port"]
        if isinstance(port, str):
            port = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)
            if port is None:
                self.failed = f"readinessProbe port {http['port']!r} is not a named port of {container['name']}"
                return
        url = f"http://{self.ip}:{port}{http.get('path', '/')}"
        timeout = aiohttp.ClientTimeout(total=probe.get("timeoutSeconds", 1))
        failures = 0
        await asyncio.sleep(probe.get("initialDelaySeconds", 0))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    async with session.get(url) as response:
                        ok = 200 <= response.status < 400
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                failures = 0 if ok else failures + 1
                if ok:
                    self.ready = True
                elif failures >= probe.get("failureThreshold", 3):
                    self.ready = False
                await asyncio.sleep(probe.get("periodSeconds", 10))

    def running(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes.values())

    def is_ready(self) -> bool:
        return self.ready and not self.failed and self.running()

    def log(self, container: str) -> str:
        path = self.root / f"{container}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def describe(self) -> str:
        lines = [f"pod {self.name} ({self.ip}): ready={self.is_ready()} exit codes={self.exits} failed={self.failed}"]
        for name in self.processes:
            lines.append(f"--- {name} log (tail):\n{self.log(name)}")
        return "\n".join(lines)

    # --- stop

    async def stop(self, grace_seconds: float) -> None:
        """SIGTERM to each container's main process, then SIGKILL for whatever still runs in the pod's
        namespace (a runtime kills the container's cgroup); then the namespace and the pod dir go."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while any(p.poll() is None for p in self.processes.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.netns:
            await self._kill_all()
            await asyncio.to_thread(self.network.remove_pod, self.netns)
        shutil.rmtree(self.root, ignore_errors=True)

    async def _kill_all(self) -> None:
        """SIGKILL to every process in the pod's namespace until none is left; reaps the main processes."""
        while pids := self.network.pids(self.netns):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await asyncio.sleep(0.1)
        for process in self.processes.values():
            process.wait()
