"""spec.autoscaling (issue #20 part 2): the pure decision (table tests, in the HPA's terms), the metric read from the
page a replica's server really serves, the rules of the API, and what the autoscaler needs of the network."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import yaml

from rayprism.server.metrics import Metrics
from rayprism_operator import api, render
from rayprism_operator.autoscaler import METRIC_NAMES, Recommendation, decide, metric_value, recommend
from rayprism_operator.crd import crd_yaml
from tests.foundation.test_crd import _cel, _rules_at

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def autoscaling(**fields) -> api.Autoscaling:
    return api.Autoscaling.model_validate({"minReplicas": 1, "maxReplicas": 10, "metric": "requestsWaiting",
                                           "target": 4, "scaleUpStabilizationSeconds": 0,
                                           "scaleDownStabilizationSeconds": 0, **fields})


@pytest.mark.parametrize("case, samples, target, current, expected", [
    ("no replica reported: no recommendation", [], 4, 2, None),
    ("at target", [4, 4], 4, 2, 2),
    ("within the 10% tolerance above", [4.4, 4.4], 4, 2, 2),
    ("within the 10% tolerance below", [3.6, 3.6], 4, 2, 2),
    ("above: ceil(sum / target)", [10, 7], 4, 2, 5),
    ("below: ceil(sum / target)", [1, 2, 0], 4, 3, 1),
    ("idle", [0, 0, 0], 4, 3, 0),
    ("fractions: kvCacheUsage 0.9 + 0.9 at target 0.6", [0.9, 0.9], 0.6, 2, 3),
    ("float sums do not ask for one more: 0.1 + 0.2 at target 0.3", [0.1, 0.2], 0.3, 2, 1),
    # A replica without a sample (starting) counts as idle going up: 9 over 3 replicas is 3, within target 4...
    ("a starting replica holds a scale-up that it will absorb", [9], 4, 3, 3),
    ("...but not load beyond all of them", [16], 4, 3, 4),
    # ...and as at target going down: a new replica is not removed for reporting nothing yet.
    ("a starting replica is not removed for its missing sample", [3.8], 4, 2, 2),
    ("below target even with the missing one at target", [0], 4, 2, 1),
])
def test_recommend(case, samples, target, current, expected):
    assert recommend(samples, target, current) == expected


def at(seconds_ago: float, replicas: int) -> Recommendation:
    return Recommendation(NOW - timedelta(seconds=seconds_ago), replicas)


@pytest.mark.parametrize("case, fields, current, samples, history, expected", [
    ("up at once without an up-window", {}, 1, [12], (at(30, 1),), 3),
    ("bounded by maxReplicas", {"maxReplicas": 2}, 1, [40], (at(30, 1),), 2),
    ("down at once without a down-window", {}, 3, [0, 0, 0], (at(30, 3),), 1),
    ("bounded by minReplicas", {"minReplicas": 2}, 3, [0, 0, 0], (at(30, 3),), 2),
    ("a count below minReplicas goes up with nothing to go by", {"minReplicas": 2}, 1, [], (), 2),
    ("a count above maxReplicas goes down with nothing to go by", {"maxReplicas": 2}, 4, [], (), 2),
    ("no samples: the count stands", {}, 3, [], (at(1, 1),), 3),
    # The down-window: the highest recommendation of the last 60 s.
    ("down-window: a recommendation of 3 20 s ago holds 3", {"scaleDownStabilizationSeconds": 60}, 3, [0, 0, 0],
     (at(50, 3), at(20, 3), at(10, 1)), 3),
    ("down-window: down to the highest within it", {"scaleDownStabilizationSeconds": 60}, 3, [0, 0, 0],
     (at(90, 3), at(50, 2), at(10, 1)), 2),
    ("down-window passed: to the recommendation", {"scaleDownStabilizationSeconds": 60}, 3, [0, 0, 0],
     (at(90, 3), at(70, 3)), 1),
    ("down-window does not slow a scale-up", {"scaleDownStabilizationSeconds": 60}, 1, [12], (at(10, 1),), 3),
    # The up-window: the lowest recommendation of the last 30 s.
    ("up-window: a burst shorter than it adds nothing", {"scaleUpStabilizationSeconds": 30}, 1, [12],
     (at(20, 1), at(10, 3)), 1),
    ("up-window: up to the lowest within it", {"scaleUpStabilizationSeconds": 30}, 1, [12],
     (at(40, 1), at(20, 2), at(10, 3)), 2),
    ("up-window does not slow a scale-down", {"scaleUpStabilizationSeconds": 30}, 3, [0, 0, 0], (at(10, 3),), 1),
    # After a start (no history) the current count stands for the past, for a window.
    ("no history, windows: nothing changes yet", {"scaleUpStabilizationSeconds": 30,
                                                  "scaleDownStabilizationSeconds": 60}, 2, [40, 40], (), 2),
    ("no history, no windows: at once", {}, 2, [40, 40], (), 10),
])
def test_decide(case, fields, current, samples, history, expected):
    decision = decide(autoscaling(**fields), current, samples, history, NOW)
    assert decision.replicas == expected


def test_the_history_keeps_the_longest_window_and_adds_this_recommendation():
    spec = autoscaling(scaleUpStabilizationSeconds=30, scaleDownStabilizationSeconds=60)
    decision = decide(spec, 2, [4, 4, 4], (at(90, 5), at(59, 4), at(10, 3)), NOW)
    assert decision.history == (at(59, 4), at(10, 3), at(0, 3))
    assert decision.recommended == 3 and decision.average == 4
    # The windows follow time: 31 s later the 4 of 59 s ago has left the down-window.
    later = decide(spec, 4, [0, 0, 0, 0], decision.history, NOW + timedelta(seconds=31))
    assert later.replicas == 3 and later.recommended == 1


def test_a_timeline_under_load_then_idle():
    """Load arrives (waiting requests): up to maxReplicas at once, the new replicas ready one after the other; the
    load falls, then stops: down only as far as the highest recommendation of the down-window."""
    spec = autoscaling(maxReplicas=3, target=2, scaleDownStabilizationSeconds=20)
    history, replicas, timeline = (at(60, 1),), 1, []
    # (second, samples of the ready replicas)
    for second, samples in [(0, [0]), (5, [7]), (10, [7]), (15, [4, 3]), (20, [1, 1, 1]), (25, [0, 0, 0]),
                            (30, [0, 0, 0]), (35, [0, 0, 0]), (45, [0, 0]), (50, [0])]:
        decision = decide(spec, replicas, samples, history, NOW + timedelta(seconds=second))
        history, replicas = decision.history, decision.replicas
        timeline.append((second, replicas))
    assert timeline == [(0, 1), (5, 3), (10, 3), (15, 3), (20, 3), (25, 3), (30, 3), (35, 2), (45, 1), (50, 1)]


def test_the_metric_from_the_page_a_server_serves():
    stats = {"num_running": 5, "num_waiting": 3, "kv_cache_usage": 0.42, "block_size": 16, "num_kv_blocks": 100}
    page = Metrics("smollm2", lambda: stats, lambda: 8).render().decode()
    assert metric_value(page, "requestsWaiting") == 3
    assert metric_value(page, "runningRequestsPerReplica") == 5
    assert metric_value(page, "kvCacheUsage") == pytest.approx(0.42)
    assert set(METRIC_NAMES) == set(api.Autoscaling.model_fields["metric"].annotation.__args__)


@pytest.mark.parametrize("page", ["", "# HELP other_metric x\nother_metric 3\n", "<html>502 Bad Gateway</html>"])
def test_no_metric_on_the_page_is_no_sample(page):
    assert metric_value(page, "requestsWaiting") is None


INVALID = [
    ({"minReplicas": 3, "maxReplicas": 2}, "autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
    ({"metric": "kvCacheUsage", "target": 80}, "autoscaling.target of metric kvCacheUsage is a fraction"),
    ({"target": 0}, "spec.autoscaling.target: Input should be greater than 0"),
    ({"minReplicas": 0}, "spec.autoscaling.minReplicas: Input should be greater than or equal to 1"),
    ({"metric": "cpu"}, "spec.autoscaling.metric: Input should be 'requestsWaiting', 'runningRequestsPerReplica' or "
                        "'kvCacheUsage'"),
    ({"scaleDownStabilizationSeconds": -1}, "spec.autoscaling.scaleDownStabilizationSeconds: Input should be greater"),
]


def spec_with(**fields) -> dict:
    return {"model": {"name": "m", "uri": "hf://org/m"},
            "autoscaling": {"maxReplicas": 4, "metric": "requestsWaiting", "target": 4, **fields}}


@pytest.mark.parametrize("fields, message", INVALID, ids=[str(f) for f, _ in INVALID])
def test_invalid_autoscaling_is_refused_naming_the_field(fields, message):
    with pytest.raises(api.SpecError) as refused:
        api.parse_spec(spec_with(**fields))
    assert message in str(refused.value)


CEL_CASES = [{}, {"minReplicas": 4}, {"minReplicas": 5}, {"metric": "kvCacheUsage", "target": 0.8},
             {"metric": "kvCacheUsage", "target": 1.0}, {"metric": "kvCacheUsage", "target": 1.5},
             {"metric": "runningRequestsPerReplica", "target": 12.0}]


@pytest.mark.parametrize("fields", CEL_CASES, ids=[str(c) for c in CEL_CASES])
def test_cel_rules_agree_with_python(fields):
    crd = yaml.safe_load(crd_yaml())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["autoscaling"]
    defaulted = {"minReplicas": 1, "target": 4.0, **spec_with(**fields)["autoscaling"]}
    cel_ok = all(_cel(r["rule"], defaulted) for r in _rules_at(schema))
    try:
        api.parse_spec(spec_with(**fields))
        python_ok = True
    except api.SpecError:
        python_ok = False
    assert cel_ok == python_ok
    assert all(len(p["description"]) > 30 for p in schema["properties"].values())  # kubectl explain


def deployment(**spec) -> api.InferenceDeployment:
    return api.parse_inference_deployment({"apiVersion": api.API_VERSION, "kind": api.KIND,
                                           "metadata": {"name": "demo", "namespace": "ns", "uid": "u"},
                                           "spec": {"model": {"name": "m", "uri": "hf://org/m"}, **spec}})


def test_autoscaling_rolls_nothing():
    """Turning autoscaling on or changing it changes no pod: no new revision."""
    options = render.RenderOptions()
    plain = render.revision_hash(deployment().spec, options)
    scaled = deployment(autoscaling={"maxReplicas": 4, "metric": "kvCacheUsage", "target": 0.8})
    assert render.revision_hash(scaled.spec, options) == plain


OPERATOR_NAMESPACE = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "rayprism-system"}}}
GATEWAY = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}


@pytest.mark.parametrize("case, spec, openai_from", [
    ("open to all: nothing to add", {}, None),
    ("open to all with autoscaling: nothing to add",
     {"autoscaling": {"maxReplicas": 2, "metric": "requestsWaiting", "target": 2}}, None),
    ("restricted, no autoscaling: only the peers", {"service": {"allowFrom": [GATEWAY]}}, [GATEWAY]),
    ("restricted with autoscaling: the operator reads /metrics on the OpenAI port",
     {"service": {"allowFrom": [GATEWAY]}, "autoscaling": {"maxReplicas": 2, "metric": "requestsWaiting", "target": 2}},
     [GATEWAY, OPERATOR_NAMESPACE]),
])
def test_the_operator_reaches_metrics(case, spec, openai_from):
    policy = render.render_serving_network_policy(deployment(**spec), "rayprism-system")
    openai, admin = policy["spec"]["ingress"]
    assert openai.get("from") == openai_from
    assert admin["from"] == [OPERATOR_NAMESPACE]
