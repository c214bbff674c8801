"""spec.scheduling (issue #20 part 3): the labels each replica's RayCluster gets for KubeRay's batch-scheduler
plugins and Kueue, table-tested; the rules, refused with the field named, by the CLI and by the API server's CEL
alike."""

from __future__ import annotations

import pytest
import yaml

from rayprism_operator import api, render
from rayprism_operator.crd import crd_yaml
from tests.foundation.test_crd import _cel, _rules_at

BASE = {"model": {"name": "m", "uri": "hf://org/m"}, "resources": {"gpusPerNode": 1},
        "parallelism": {"tensor": 1, "pipeline": 3}}


def deployment(scheduling: dict | None = None, priority: str | None = None) -> api.InferenceDeployment:
    spec = {**BASE, **({"scheduling": scheduling} if scheduling is not None else {})}
    if priority:
        spec["pods"] = {"priorityClassName": priority}
    return api.parse_inference_deployment({"apiVersion": api.API_VERSION, "kind": api.KIND,
                                           "metadata": {"name": "demo", "namespace": "ns", "uid": "u"}, "spec": spec})


def replica_labels(infd: api.InferenceDeployment) -> tuple[str, dict[str, str]]:
    """The RayCluster's labels other than the operator's own (which select the replicas)."""
    cluster = render.render_raycluster(infd, "rev", "abcde")
    own = render.labels("demo", "rev")
    labels = cluster["metadata"]["labels"]
    assert {k: labels[k] for k in own} == own
    return cluster["metadata"]["name"], {k: v for k, v in labels.items() if k not in own}


@pytest.mark.parametrize("case, scheduling, priority, expected", [
    ("none: the default scheduler, nothing added", None, None, {}),
    ("priority alone goes on the pods only", None, "high", {}),
    ("volcano: a PodGroup per RayCluster, in the queue, with the pods' priority",
     {"batchScheduler": "volcano", "queue": "inference"}, "high",
     {"ray.io/scheduler-name": "volcano", "volcano.sh/queue-name": "inference", "ray.io/priority-class-name": "high"}),
    ("volcano without a queue: Volcano's default queue",
     {"batchScheduler": "volcano"}, None, {"ray.io/scheduler-name": "volcano"}),
    ("yunikorn: gang scheduling enabled, one application per replica",
     {"batchScheduler": "yunikorn", "queue": "root.inference"}, "high",
     {"ray.io/scheduler-name": "yunikorn", "yunikorn.apache.org/queue": "root.inference",
      "ray.io/gang-scheduling-enabled": "true", "yunikorn.apache.org/app-id": "<replica>"}),
    ("kai-scheduler: its queue label",
     {"batchScheduler": "kai-scheduler", "queue": "team-a"}, None,
     {"ray.io/scheduler-name": "kai-scheduler", "kai.scheduler/queue": "team-a"}),
    ("scheduler-plugins: gang scheduling enabled (its PodGroup)",
     {"batchScheduler": "scheduler-plugins"}, None,
     {"ray.io/scheduler-name": "scheduler-plugins", "ray.io/gang-scheduling-enabled": "true"}),
    ("kueue alone", {"kueueQueueName": "team-a-local"}, "high", {"kueue.x-k8s.io/queue-name": "team-a-local"}),
    ("kueue with volcano",
     {"batchScheduler": "volcano", "queue": "q", "kueueQueueName": "lq"}, None,
     {"ray.io/scheduler-name": "volcano", "volcano.sh/queue-name": "q", "kueue.x-k8s.io/queue-name": "lq"}),
])
def test_scheduling_labels_on_the_raycluster(case, scheduling, priority, expected):
    infd = deployment(scheduling, priority)
    name, labels = replica_labels(infd)
    assert labels == {k: name if v == "<replica>" else v for k, v in expected.items()}
    # The priority is the pods' in every case: on the head's and the workers' templates.
    spec = render.render_raycluster(infd, "rev", "abcde")["spec"]
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    assert [t["spec"].get("priorityClassName") for t in templates] == [priority] * 2


def test_every_pod_of_a_replica_is_in_its_raycluster():
    """What KubeRay's Volcano plugin counts for minMember: head plus the worker group's replicas, fixed (no
    autoscaling): 1 + 3 pipeline stages on 1-GPU nodes."""
    spec = render.render_raycluster(deployment({"batchScheduler": "volcano"}), "rev", "abcde")["spec"]
    assert spec["enableInTreeAutoscaling"] is False
    (workers,) = spec["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 3


def test_scheduling_is_part_of_the_revision():
    """A PodGroup's queue and a Kueue admission are fixed when the RayCluster is made: a change replaces the
    replicas. A spec without scheduling keeps the revision it had before the field existed."""
    options = render.RenderOptions()
    plain = render.revision_hash(deployment().spec, options)
    assert render.revision_hash(deployment({}).spec, options) == plain
    assert render.revision_hash(deployment({"batchScheduler": "volcano"}).spec, options) != plain
    assert (render.revision_hash(deployment({"batchScheduler": "volcano", "queue": "a"}).spec, options)
            != render.revision_hash(deployment({"batchScheduler": "volcano", "queue": "b"}).spec, options))


INVALID = [
    ({"queue": "q"}, "scheduling.queue needs scheduling.batchScheduler"),
    ({"batchScheduler": "kai-scheduler"}, "scheduling.queue is required with batchScheduler kai-scheduler"),
    ({"batchScheduler": "scheduler-plugins", "queue": "q"}, "scheduling.queue is not supported with batchScheduler "
                                                            "scheduler-plugins"),
    ({"batchScheduler": "slurm"}, "spec.scheduling.batchScheduler: Input should be 'volcano', 'yunikorn', "
                                  "'kai-scheduler' or 'scheduler-plugins'"),
    ({"batchScheduler": "volcano", "queue": "not a label"}, "spec.scheduling.queue: String should match pattern"),
    ({"kueueQueueName": "x" * 64}, "spec.scheduling.kueueQueueName: String should have at most 63 characters"),
    ({"schedulerName": "volcano"}, "spec.scheduling.schedulerName: unknown field"),
]


@pytest.mark.parametrize("scheduling, message", INVALID, ids=[str(s) for s, _ in INVALID])
def test_invalid_scheduling_is_refused_naming_the_field(scheduling, message):
    with pytest.raises(api.SpecError, match="scheduling") as refused:
        deployment(scheduling)
    assert message in str(refused.value)


def _scheduling_schema() -> dict:
    crd = yaml.safe_load(crd_yaml())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["scheduling"]


CEL_CASES = [{}, {"batchScheduler": "volcano"}, {"batchScheduler": "volcano", "queue": "q"}, {"queue": "q"},
             {"batchScheduler": "kai-scheduler"}, {"batchScheduler": "kai-scheduler", "queue": "q"},
             {"batchScheduler": "scheduler-plugins"}, {"batchScheduler": "scheduler-plugins", "queue": "q"},
             {"batchScheduler": "yunikorn", "queue": "q", "kueueQueueName": "lq"}, {"kueueQueueName": "lq"}]


@pytest.mark.parametrize("scheduling", CEL_CASES, ids=[str(c) for c in CEL_CASES])
def test_cel_rules_agree_with_python(scheduling):
    """The API server's verdict on spec.scheduling (its CEL rules) equals the CLI's and the operator's."""
    rules = _rules_at(_scheduling_schema())
    assert len(rules) == 3
    cel_ok = all(_cel(r["rule"], scheduling) for r in rules)
    try:
        deployment(scheduling)
        python_ok = True
    except api.SpecError:
        python_ok = False
    assert cel_ok == python_ok


def test_kubectl_explain_documents_every_field():
    schema = _scheduling_schema()
    assert set(schema["properties"]) == {"batchScheduler", "queue", "kueueQueueName"}
    assert all(len(p["description"]) > 40 for p in schema["properties"].values())
    assert schema["properties"]["batchScheduler"]["enum"] == list(api.BATCH_SCHEDULERS)
