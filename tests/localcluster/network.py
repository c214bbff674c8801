"""Pod networking as a CNI bridge plugin does it: one network namespace per pod, a veth pair into a bridge
in the root namespace, an address from a private /24 (in 10.213.0.0/16) that this module creates and
removes itself; only these namespaces and this bridge are ever touched.

Every rayprism pod binds 0.0.0.0:8000 (and Ray's 6379, 8265, ...), so pods on one loopback would collide;
in their own namespaces the rendered commands run unchanged, and the test process (root namespace)
reaches each pod at its own IP, as the operator reaches a head pod in a cluster.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import uuid

from .node import setup_lock


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def unavailable_reason() -> str | None:
    """Why pods cannot get their own namespaces here (None when they can)."""
    if os.geteuid() != 0:
        return "per-pod network and mount namespaces need root"
    for tool in ("ip", "unshare", "mount"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed"
    probe = f"rpprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"`ip netns add` is not permitted here: {e.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


class PodNetwork:
    """A bridge with the subnet's first address (the node's side) and one namespace per pod; the subnet is
    the first /24 of `supernet` that no interface here uses (another local cluster may be running)."""

    def __init__(self, supernet: str = "10.213.0.0/16"):
        self.supernet = ipaddress.ip_network(supernet)
        tag = uuid.uuid4().hex[:5]
        self.bridge = f"rpbr{tag}"
        self._prefix = f"rp{tag}"
        self._pods: dict[str, tuple[str, str]] = {}  # netns -> (ip, host-side veth)
        self._next = 0

    def __enter__(self) -> "PodNetwork":
        with setup_lock():
            used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
            used_addresses = {ipaddress.ip_address(a.split("/")[0]) for a in re.findall(r"inet (\S+)", used)}
            self.subnet = next((s for s in self.supernet.subnets(new_prefix=24)
                                if not any(a in s for a in used_addresses)), None)
            if self.subnet is None:
                raise RuntimeError(f"no free /24 left in {self.supernet}")
            gateway, *pool = self.subnet.hosts()
            self.gateway, self._free = str(gateway), [str(a) for a in pool]
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        return self

    def add_pod(self) -> tuple[str, str]:
        """A new pod namespace: (netns name, pod IP)."""
        netns, veth = f"{self._prefix}p{self._next}", f"{self._prefix}v{self._next}"
        self._next += 1
        address = self._free.pop(0)
        _ip("netns", "add", netns)
        self._pods[netns] = (address, veth)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        # Ray finds its node IP through the default route, as it does in a pod.
        _ip("-n", netns, "route", "add", "default", "via", self.gateway)
        return netns, address

    def pids(self, netns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def remove_pod(self, netns: str) -> None:
        """Deletes the namespace (its veth goes with it); the caller has ended its processes."""
        address, _ = self._pods.pop(netns)
        _ip("netns", "del", netns)
        self._free.append(address)

    def namespaces(self) -> list[str]:
        return list(self._pods)

    def __exit__(self, *exc) -> None:
        for netns in list(self._pods):
            self.remove_pod(netns)
        _ip("link", "del", self.bridge)
