import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


@pytest.fixture
def llama() -> dict:
    return yaml.safe_load((EXAMPLES / "llama.yaml").read_text())


@pytest.fixture
def smollm2() -> dict:
    return yaml.safe_load((EXAMPLES / "smollm2.yaml").read_text())


def with_changes(manifest: dict, **paths) -> dict:
    """A copy of manifest with dotted paths set, e.g. with_changes(m, **{"spec.replicas": 3})."""
    out = copy.deepcopy(manifest)
    for path, value in paths.items():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out
