"""kopf's leadership rule, as the work queue applies it to its own wake-ups (rayprism_operator.peering)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from rayprism_operator.peering import leads

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def peer(priority: int, seen_ago: float, lifetime: int = 60) -> dict:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seen_ago)).isoformat()}


@pytest.mark.parametrize("case, status, mine, expected", [
    ("alone", {"me": peer(5, 1)}, 5, True),
    ("a lower peer", {"me": peer(5, 1), "b": peer(3, 1)}, 5, True),
    ("a higher peer", {"me": peer(5, 1), "b": peer(9, 1)}, 5, False),
    ("a higher peer that died (lastseen + lifetime passed)", {"me": peer(5, 1), "b": peer(9, 61)}, 5, True),
    ("no peering status yet", {}, 5, True),
    ("kopf's naive timestamps are UTC", {"b": {"priority": 9, "lifetime": 60, "lastseen": "2025-12-31T23:59:59"}},
     5, False),
])
def test_a_pod_leads_while_no_alive_peer_has_a_higher_priority(case, status, mine, expected):
    assert leads(status, mine, NOW) is expected, case
