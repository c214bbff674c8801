"""What one user called on the API server, from its audit log (cluster.py writes it at level Metadata).

    python -m e2e.controlplane.audit --user system:serviceaccount:NS:NAME [--log PATH] [--json]

One row for every distinct (verb, API group, resource[/subresource], scope) with the number of requests
and the HTTP status codes answered; what RBAC refused is flagged (the authorizer's decision, which the API
server annotates each event with: a 403 can also come from admission, e.g. a create in a namespace being
deleted, which RBAC had allowed). Scope is `namespaced` (the
request named a namespace: a Role can grant it), `cluster` (cluster-scoped resources, and namespaced ones
across all namespaces: only a ClusterRole grants it) or `nonresource` (a URL such as /apis, whose path
is the resource). The namespaces seen are listed, for Roles per namespace. A request made with
impersonation counts for the impersonated user, as RBAC judged it.

`summarize()` returns the rows, for tests: e.g. derive least-privilege RBAC from what the operator's
ServiceAccount called, or assert that it was never refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cluster import AUDIT_LOG


@dataclass(frozen=True, order=True)
class Call:
    """What RBAC decides on: a verb on a resource of an API group ("" is the core group), at a scope."""

    verb: str
    api_group: str
    resource: str  # "pods", "pods/status", or a non-resource URL's path
    scope: str  # "namespaced", "cluster" or "nonresource"


@dataclass
class Usage:
    call: Call
    count: int = 0
    codes: Counter = field(default_factory=Counter)  # HTTP status code -> requests
    namespaces: set[str] = field(default_factory=set)
    denied: int = 0  # requests the authorizer (RBAC) refused

    @property
    def forbidden(self) -> bool:
        return self.denied > 0

    def to_json(self) -> dict:
        return {**asdict(self.call), "count": self.count, "codes": {str(c): n for c, n in sorted(self.codes.items())},
                "namespaces": sorted(self.namespaces), "denied": self.denied, "forbidden": self.forbidden}


def log_files(log: Path) -> list[Path]:
    """The log and the files it was rotated into (audit-<time>.log), oldest first."""
    return [*sorted(log.parent.glob(f"{log.stem}-*{log.suffix}")), log]


def events(paths: Iterable[Path]) -> Iterable[dict]:
    """One event per request: its last stage (a watch logs ResponseStarted, then ResponseComplete when it
    ends; one still open has only the first)."""
    last: dict[str, dict] = {}
    for path in paths:
        with open(path, errors="replace") as lines:
            for line in lines:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:  # the line the API server is writing now
                    continue
                last[event["auditID"]] = event
    return last.values()


def effective_user(event: dict) -> str:
    return (event.get("impersonatedUser") or event.get("user") or {}).get("username", "")


def call_of(event: dict) -> tuple[Call, str | None]:
    """The event's call, and its namespace if it named one."""
    ref = event.get("objectRef")
    if ref is None:
        return Call(event["verb"], "", event["requestURI"].split("?", 1)[0], "nonresource"), None
    resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    namespace = ref.get("namespace")
    return Call(event["verb"], ref.get("apiGroup", ""), resource, "namespaced" if namespace else "cluster"), namespace


def summarize(user: str, log: Path = AUDIT_LOG) -> list[Usage]:
    """Every distinct call `user` made, sorted, with counts, status codes and namespaces."""
    usage: dict[Call, Usage] = {}
    for event in events(log_files(log)):
        if effective_user(event) != user:
            continue
        call, namespace = call_of(event)
        row = usage.setdefault(call, Usage(call))
        row.count += 1
        row.codes[(event.get("responseStatus") or {}).get("code", 0)] += 1
        if namespace:
            row.namespaces.add(namespace)
        if (event.get("annotations") or {}).get("authorization.k8s.io/decision") == "forbid":
            row.denied += 1
    return [usage[c] for c in sorted(usage)]


def table(rows: list[Usage]) -> str:
    header = ("VERB", "APIGROUP", "RESOURCE", "SCOPE", "COUNT", "CODES", "NAMESPACES", "")
    lines = [header] + [(
        r.call.verb, "-" if r.call.scope == "nonresource" else r.call.api_group or '""', r.call.resource, r.call.scope, str(r.count),
        ",".join(f"{c}x{n}" for c, n in sorted(r.codes.items())), ",".join(sorted(r.namespaces)) or "-",
        "FORBIDDEN" if r.forbidden else "") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--user", required=True, help="e.g. system:serviceaccount:rayprism-system:rayprism")
    parser.add_argument("--log", type=Path, default=AUDIT_LOG, help=f"the audit log (default {AUDIT_LOG})")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    args = parser.parse_args()
    if not args.log.exists():
        sys.exit(f"audit: no audit log at {args.log}")
    rows = summarize(args.user, args.log)
    if args.json:
        print(json.dumps({"user": args.user, "calls": [r.to_json() for r in rows]}, indent=1))
    else:
        print(table(rows) if rows else f"no request of {args.user} in the audit log")
        denied = sum(r.denied for r in rows)
        if denied:
            print(f"\n{denied} request(s) refused by RBAC")


if __name__ == "__main__":
    main()
