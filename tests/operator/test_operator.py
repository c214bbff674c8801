"""The real operator (kopf + rayprism handlers) against kmock's Kubernetes emulator and a KubeRay stand-in."""

from __future__ import annotations

from .harness import IDEP_PATH, NS, RC, deployment, wait_for


def status(k8s, name="demo") -> dict:
    return k8s.deployment(name).get("status") or {}


def condition(k8s, type_, name="demo") -> dict:
    return next((c for c in status(k8s, name).get("conditions", []) if c["type"] == type_), {})


def settled(k8s, name="demo", replicas=2) -> bool:
    s = status(k8s, name)
    return (s.get("readyReplicas") == replicas and s.get("availableReplicas") == replicas
            and s.get("replicas") == replicas and condition(k8s, "Progressing", name).get("reason") == "NewRevisionAvailable"
            and s.get("observedGeneration") == k8s.deployment(name)["metadata"]["generation"])


async def test_create_makes_replicas_and_becomes_available(k8s, operator):
    await k8s.post(IDEP_PATH, json=deployment(replicas=3))
    await wait_for(lambda: settled(k8s, replicas=3), what="3 ready replicas")
    replicas = k8s.replicas("demo")
    assert len(replicas) == 3 and all(ready for _, ready in replicas.values())
    s = status(k8s)
    revision = s["updateRevision"]
    assert all(name.startswith(f"demo-{revision}-") and len(name) == len(f"demo-{revision}-") + 5 for name in replicas)
    assert s["currentRevision"] == revision and s["weightsRevision"] == "v1" and s["updatedReplicas"] == 3
    assert s["selector"] == "app.kubernetes.io/name=rayprism,rayprism.dev/deployment=demo,ray.io/node-type=head"
    assert s["endpoint"] == f"http://demo.{NS}.svc:8000/v1"
    assert condition(k8s, "Available")["status"] == "True"
    assert condition(k8s, "Degraded")["status"] == "False"
    uid = k8s.deployment("demo")["metadata"]["uid"]
    for name in replicas:
        assert k8s.objects[RC, NS, name].raw["metadata"]["ownerReferences"][0]["uid"] == uid
    await wait_for(lambda: k8s.events("ReplicasCreated") and k8s.events("RolloutComplete"), what="events")
