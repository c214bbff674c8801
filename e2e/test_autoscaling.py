"""spec.autoscaling on the real control plane (issue #20 part 2): a bounded client (4 streams at a time) raises the
replicas from 1 to 2, idle lowers them back to 1, the removed replica drained. The operator reads
vllm:num_requests_running from the ready replicas' /metrics (target 2 per replica) and writes spec.replicas
through /scale; small windows (up 0 s, down 10 s) and a short drain keep it brief. Every second the timeline
records spec.replicas, the ready replicas and the RayClusters; it is printed and kept in RESULTS.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from e2e.endpoints import kubectl, openai_base_urls, wait_until
from e2e.marks import ON_A_CLUSTER
from e2e.test_e2e import stream_chat
from e2e.traffic import Traffic

pytestmark = ON_A_CLUSTER

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "rayprism-e2e-autoscale"
NAME = "autoscaled"
CLIENTS = 4
RESULTS: dict = {}


def get(*args: str) -> dict:
    return json.loads(kubectl("-n", NAMESPACE, "get", *args, "-o", "json").stdout)


class Timeline:
    """(seconds since the start, spec.replicas, status.readyReplicas, RayClusters), on every change."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.rows: list[tuple[float, int, int, int]] = []
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._record, daemon=True)

    def _record(self) -> None:
        while not self._stop.wait(1):
            infd = get("infd", NAME)
            clusters = len(get("rayclusters", "-l", f"rayprism.dev/deployment={NAME}")["items"])
            now = (infd["spec"]["replicas"], infd.get("status", {}).get("readyReplicas", 0), clusters)
            if not self.rows or self.rows[-1][1:] != now:
                self.rows.append((round(time.monotonic() - self.started, 1), *now))

    def mark(self, what: str) -> None:
        self.marks.append((round(time.monotonic() - self.started, 1), what))

    def latest(self) -> tuple[float, int, int, int]:
        return self.rows[-1] if self.rows else (0, 0, 0, 0)

    def __enter__(self) -> "Timeline":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def namespace():
    kubectl("create", "namespace", NAMESPACE, check=False)
    kubectl("label", "namespace", NAMESPACE, "--overwrite", "pod-security.kubernetes.io/enforce=restricted")
    yield
    kubectl("-n", NAMESPACE, "delete", "infd", NAME, "--ignore-not-found", "--wait=true", "--timeout=120s", check=False)
    # The pods hold the node's CPUs until they are gone: the next test needs them.
    kubectl("-n", NAMESPACE, "wait", "--for=delete", "pods", "--all", "--timeout=180s", check=False)
    kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


@pytest.mark.timeout(600)
def test_load_raises_the_replicas_and_idle_lowers_them(namespace):
    manifest = yaml.safe_load((REPO / "examples" / "smollm2-autoscaled.yaml").read_text())
    manifest["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    manifest["spec"]["resources"].update({"cpu": "600m", "memory": "3Gi", "headCpu": "200m", "headMemory": "1536Mi"})
    manifest["spec"]["autoscaling"].update({"maxReplicas": 2, "target": 2, "scaleDownStabilizationSeconds": 10})
    manifest["spec"]["rollout"]["drainSeconds"] = 5
    kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    with Timeline() as timeline:
        wait_until(lambda: timeline.latest()[2] == 1, 300, "the first replica ready")
        timeline.mark("load: 4 streams")
        with openai_base_urls(NAMESPACE, NAME) as next_base_url, \
                Traffic(next_base_url, lambda url: stream_chat(url, max_tokens=32), clients=CLIENTS) as traffic:
            # 4 running requests on 1 replica, target 2: ceil(4 / 2) = 2 replicas.
            wait_until(lambda: timeline.latest()[1] == 2, 60, "spec.replicas 2 under load")
            timeline.mark("scaled up")
            wait_until(lambda: timeline.latest()[2] == 2, 300, "the second replica ready")
            timeline.mark("second replica ready")
            # Under the same load, now spread over both: 2 per replica, the target, so 2 stays.
            time.sleep(6)
            assert timeline.latest()[1] == 2, "the replicas changed under a steady load at target"
            timeline.mark("load stops (the requests in flight finish)")
        timeline.mark("idle")
        served = traffic.report()
        # Idle: 0 running, after the 10 s down-window: 1 replica; the other drains and goes.
        wait_until(lambda: timeline.latest()[1] == 1, 60, "spec.replicas 1 when idle")
        timeline.mark("scaled down")
        wait_until(lambda: timeline.latest()[1:] == (1, 1, 1), 120, "one RayCluster left")
        timeline.mark("one replica left")

    events = get("events", "--field-selector", f"involvedObject.name={NAME},reason=Autoscaled")["items"]
    messages = [e["message"] for e in sorted(events, key=lambda e: e.get("firstTimestamp") or e["eventTime"])]
    RESULTS.update(timeline=timeline.rows, marks=timeline.marks, traffic=served, events=messages)
    print("t(s)  spec.replicas  ready  RayClusters")
    for row in timeline.rows:
        print("{:5.1f}  {:13d}  {:5d}  {:11d}".format(*row))
    print("marks:", timeline.marks)
    print("traffic:", served)
    print("events:", *messages, sep="\n  ")
    assert [m.split(":")[0] for m in messages] == ["Scaled from 1 to 2 replicas", "Scaled from 2 to 1 replicas"]
    assert "runningRequestsPerReplica" in messages[0] and "target 2" in messages[0]
    assert served["requests"] > 0 and served["failed"] == 0, traffic.failures[:5]
    # The replicas went 1 -> 2 -> 1 and never beyond maxReplicas.
    assert max(row[1] for row in timeline.rows) == 2 and max(row[3] for row in timeline.rows) == 2


@pytest.mark.parametrize("autoscaling, message", [
    ({"minReplicas": 3, "maxReplicas": 2, "metric": "requestsWaiting", "target": 4},
     "spec.autoscaling: Invalid value: autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
    ({"maxReplicas": 2, "metric": "kvCacheUsage", "target": 80},
     "spec.autoscaling: Invalid value: autoscaling.target of metric kvCacheUsage is a fraction"),
    ({"maxReplicas": 2, "metric": "cpu", "target": 4}, "spec.autoscaling.metric: Unsupported value: \"cpu\""),
])
def test_the_api_server_refuses_invalid_autoscaling_naming_the_field(namespace, autoscaling, message):
    manifest = {"apiVersion": "rayprism.dev/v1alpha1", "kind": "InferenceDeployment",
                "metadata": {"name": "invalid", "namespace": NAMESPACE},
                "spec": {"model": {"name": "m", "uri": "hf://org/m"}, "autoscaling": autoscaling}}
    out = kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(manifest), check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr
