"""The RLHF tests reuse the serving tests' setup: Ray without auth, and two random checkpoints (revisions a, b)."""
from tests.serving.conftest import checkpoints  # noqa: F401 - a fixture, found by pytest here
