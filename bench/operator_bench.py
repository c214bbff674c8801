"""Operator benchmark: N InferenceDeployments against kmock's Kubernetes emulator.

Runs `rayprism-operator --standalone -A` as its own process (so its CPU time and peak RSS are its own)
against the test bench's emulated API server and KubeRay stand-in (tests/operator/harness.py), creates
N InferenceDeployments at once, and measures the time until every one has its RayClusters and a
correct status (all replicas ready and available, Progressing=NewRevisionAvailable, observedGeneration
current). Writes a JSON record to bench/results/.

    .venv/bin/python bench/operator_bench.py --deployments 200 --replicas 2
    .venv/bin/python bench/operator_bench.py --deployments 200 --backlog   # all exist before it starts
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kmock import Server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.operator.harness import (IDEP, IDEP_PATH, NS, ApiServerEmulator, FakeKubeRay,  # noqa: E402
                                    deployment, register, write_kubeconfig)


def _settled(k8s: ApiServerEmulator, name: str, replicas: int) -> bool:
    obj = k8s.objects[IDEP, NS, name]
    if obj.deleted:
        return False
    raw = obj.raw
    status = raw.get("status") or {}
    progressing = next((c for c in status.get("conditions", []) if c["type"] == "Progressing"), {})
    return (status.get("readyReplicas") == replicas and status.get("availableReplicas") == replicas
            and status.get("replicas") == replicas and progressing.get("reason") == "NewRevisionAvailable"
            and status.get("observedGeneration") == raw["metadata"]["generation"]
            and len(k8s.replicas(name)) == replicas)


def _proc_usage(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) and peak RSS in MiB of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return cpu, int(hwm.split()[1]) / 1024


async def run(deployments: int, replicas: int, timeout: float, backlog: bool) -> dict:
    """backlog=False: the operator runs while the deployments are created (a create storm).
    backlog=True: they all exist before the operator starts (a restart with a backlog)."""
    emulator = ApiServerEmulator(filter_labels=True, keep_requests=False, record_timeline=False)
    names = [f"bench-{i:04d}" for i in range(deployments)]
    async with emulator as k8s, Server(k8s), FakeKubeRay(k8s):
        register(k8s)
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            write_kubeconfig(kubeconfig, str(k8s.url), token="bench")

            async def create_all() -> float:
                began = time.perf_counter()
                for name in names:
                    await k8s.post(IDEP_PATH, json=deployment(name, replicas=replicas))
                return time.perf_counter() - began

            created = await create_all() if backlog else None
            command = [str(Path(sys.executable).parent / "rayprism-operator"), "--standalone", "-A", "--quiet"]
            operator = subprocess.Popen(command, env={**os.environ, "KUBECONFIG": str(kubeconfig)},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                # Ready once it watches InferenceDeployments.
                async with asyncio.timeout(30):
                    while not any(r.params.get("watch") == "true" and r.resource == IDEP for r in list(k8s)):
                        await asyncio.sleep(0.1)
                cpu_before, _ = _proc_usage(operator.pid)
                start = time.perf_counter()
                if not backlog:
                    created = await create_all()
                pending = set(names)
                async with asyncio.timeout(timeout):
                    while pending:
                        pending = {n for n in pending if not _settled(k8s, n, replicas)}
                        await asyncio.sleep(0.05)
                elapsed = time.perf_counter() - start
                cpu_after, peak_rss = _proc_usage(operator.pid)
            finally:
                operator.terminate()
                _, stderr = operator.communicate(timeout=30)
    return {
        "deployments": deployments, "replicas_per_deployment": replicas,
        "mode": "backlog: created before the operator started" if backlog else "created while the operator runs",
        "seconds_to_all_settled": round(elapsed, 2), "seconds_to_post_all": round(created, 2),
        "operator_cpu_seconds": round(cpu_after - cpu_before, 2), "operator_peak_rss_mib": round(peak_rss, 1),
        "api_requests": k8s.requests_served, "operator_exit_code": operator.returncode,
        "operator_errors": [line for line in stderr.decode().splitlines() if "Traceback" in line][:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployments", type=int, default=200)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--backlog", action="store_true",
                        help="create every deployment before starting the operator (timed from its start)")
    parser.add_argument("--output", type=Path, default=None, help="default: bench/results/operator-<date>.json")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]  # other work on the machine skews the wall times
    result = asyncio.run(run(args.deployments, args.replicas, args.timeout, args.backlog))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record = {
        "benchmark": "operator_bench",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_1m_at_start": round(load_at_start, 2),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "note": "kmock KubernetesEmulator (with label-selector filtering) and the KubeRay stand-in run in "
                "the benchmark process on the same cores as the operator; RayClusters turn ready within ~50 ms.",
        "results": result,
    }
    mode = "-backlog" if args.backlog else ""
    output = args.output or ROOT / "bench" / "results" / f"operator{mode}-{datetime.date.today()}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
