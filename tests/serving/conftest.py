"""Fixtures of the serving tests. Ray in tests: no auth, no usage stats, each cluster in its own temp dir."""
import os
from pathlib import Path

import pytest

from tests.serving.helpers import make_checkpoint

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")   # Ray's default 15 starves workers on a busy CI machine


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two random checkpoints as revisions of one URI template: <root>/ckpt-{revision}."""
    root = tmp_path_factory.mktemp("ckpts")
    return {rev: make_checkpoint(root / f"ckpt-{rev}", seed) for rev, seed in (("a", 1), ("b", 2))}
