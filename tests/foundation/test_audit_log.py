"""e2e/controlplane/audit.py on a small synthetic audit log: what one user called, grouped as RBAC grants it."""

from __future__ import annotations

import json
import sys

import pytest

from e2e.controlplane import audit

OPERATOR = "system:serviceaccount:rayprism-system:rayprism"


def event(audit_id: str, verb: str, code: int, *, user: str = OPERATOR, stage: str = "ResponseComplete",
          decision: str | None = None,
          resource: str | None = None, group: str = "", namespace: str | None = None,
          subresource: str | None = None, uri: str = "/", impersonated: str | None = None) -> dict:
    out = {"kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata", "auditID": audit_id,
           "stage": stage, "requestURI": uri, "verb": verb, "user": {"username": user, "groups": []},
           "responseStatus": {"metadata": {}, "code": code}}
    # The authorizer's decision, as the API server annotates it; a 403 without "forbid" came from admission.
    out["annotations"] = {"authorization.k8s.io/decision": decision or ("forbid" if code == 403 else "allow")}
    if resource:
        out["objectRef"] = {"resource": resource, "apiVersion": "v1", **({"apiGroup": group} if group else {}),
                            **({"namespace": namespace} if namespace else {}),
                            **({"subresource": subresource} if subresource else {})}
    if impersonated:
        out["impersonatedUser"] = {"username": impersonated}
    return out


@pytest.fixture
def log(tmp_path):
    rotated = [event("r1", "list", 200, resource="pods", namespace="team-a", uri="/api/v1/namespaces/team-a/pods")]
    current = [
        event("1", "list", 200, resource="pods", namespace="team-b", uri="/api/v1/namespaces/team-b/pods?limit=500"),
        # A watch that ended: two stages, one request.
        event("2", "watch", 200, resource="rayclusters", group="ray.io", stage="ResponseStarted",
              uri="/apis/ray.io/v1/rayclusters?watch=true"),
        event("2", "watch", 200, resource="rayclusters", group="ray.io", uri="/apis/ray.io/v1/rayclusters?watch=true"),
        # A watch still open: only its first stage.
        event("3", "watch", 200, resource="rayclusters", group="ray.io", stage="ResponseStarted",
              uri="/apis/ray.io/v1/rayclusters?watch=true"),
        event("4", "list", 403, resource="nodes", uri="/api/v1/nodes"),
        event("5", "patch", 200, resource="pods", subresource="status", namespace="team-a",
              uri="/api/v1/namespaces/team-a/pods/p/status"),
        event("6", "get", 200, uri="/apis"),
        # kubectl --as: the admin made it, RBAC judged it as the operator.
        event("7", "create", 403, user="admin", impersonated=OPERATOR, resource="secrets", namespace="team-a",
              uri="/api/v1/namespaces/team-a/secrets"),
        event("8", "list", 200, user="admin", resource="pods", uri="/api/v1/pods"),
        # Allowed by RBAC, refused by admission: the namespace is being deleted.
        event("10", "create", 403, decision="allow", resource="networkpolicies", group="networking.k8s.io",
              namespace="team-c", uri="/apis/networking.k8s.io/v1/namespaces/team-c/networkpolicies"),
    ]
    (tmp_path / "audit-2026-01-01T00-00-00.000.log").write_text("".join(json.dumps(e) + "\n" for e in rotated))
    path = tmp_path / "audit.log"
    # The last line is the one the API server is writing.
    path.write_text("".join(json.dumps(e) + "\n" for e in current) + '{"kind":"Event","auditID":"9"')
    return path


def row(rows, verb, resource, scope) -> audit.Usage:
    return next(r for r in rows if (r.call.verb, r.call.resource, r.call.scope) == (verb, resource, scope))


def test_one_row_per_verb_group_resource_and_scope(log):
    rows = audit.summarize(OPERATOR, log)
    assert [(r.call.verb, r.call.api_group, r.call.resource, r.call.scope, r.count) for r in rows] == [
        ("create", "", "secrets", "namespaced", 1),
        ("create", "networking.k8s.io", "networkpolicies", "namespaced", 1),
        ("get", "", "/apis", "nonresource", 1),
        ("list", "", "nodes", "cluster", 1),
        ("list", "", "pods", "namespaced", 2),  # one of them from the rotated file
        ("patch", "", "pods/status", "namespaced", 1),
        ("watch", "ray.io", "rayclusters", "cluster", 2),  # one request per auditID, open or ended
    ]
    assert row(rows, "list", "pods", "namespaced").namespaces == {"team-a", "team-b"}


def test_what_rbac_refused_is_flagged(log):
    rows = audit.summarize(OPERATOR, log)
    assert {(r.call.verb, r.call.resource) for r in rows if r.forbidden} == {("create", "secrets"), ("list", "nodes")}
    assert row(rows, "list", "nodes", "cluster").codes == {403: 1}
    # A 403 from admission (NamespaceTerminating) is not RBAC's: the ClusterRole is not to blame.
    refused_by_admission = row(rows, "create", "networkpolicies", "namespaced")
    assert refused_by_admission.codes == {403: 1} and not refused_by_admission.forbidden


def test_other_users_are_left_out(log):
    assert [(r.call.verb, r.call.resource, r.call.scope) for r in audit.summarize("admin", log)] == [
        ("list", "pods", "cluster")]
    assert audit.summarize("system:serviceaccount:x:y", log) == []


def test_json_and_table(log, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["audit", "--user", OPERATOR, "--log", str(log), "--json"])
    audit.main()
    out = json.loads(capsys.readouterr().out)
    assert out["user"] == OPERATOR
    assert {"verb": "list", "api_group": "", "resource": "nodes", "scope": "cluster", "count": 1,
            "codes": {"403": 1}, "namespaces": [], "denied": 1, "forbidden": True} in out["calls"]

    monkeypatch.setattr(sys, "argv", ["audit", "--user", OPERATOR, "--log", str(log)])
    audit.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["VERB", "APIGROUP", "RESOURCE", "SCOPE", "COUNT", "CODES", "NAMESPACES"]
    assert lines[4].split() == ["list", '""', "nodes", "cluster", "1", "403x1", "-", "FORBIDDEN"]
    assert lines[-1] == "2 request(s) refused by RBAC"
