"""examples/rlhf_spawn_reconnect.py end to end on a standalone Ray head: a first driver spawns SmolLM2 engines at
tensor parallel 1 and 3 as named detached actors and exits; a second reconnects, pushes a trainer's weights
(resharded per engine) and generates transformers' greedy tokens on both, then shuts the TP 1 engine down; a third
finds the TP 3 engine serving the new weights, and the TP 1 engine gone."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.serving.helpers import free_port

pytestmark = pytest.mark.slow

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
EXAMPLE = Path(__file__).parents[2] / "examples" / "rlhf_spawn_reconnect.py"


def run(address: str, *command: str, expect_ok: bool = True) -> dict:
    done = subprocess.run([sys.executable, str(EXAMPLE), *command, "--ray-address", address], capture_output=True,
                          text=True, timeout=600, env=os.environ)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not expect_ok:
        assert done.returncode != 0 and not results, done.stdout[-2000:]
        return {"stderr": done.stderr}
    assert done.returncode == 0 and results, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(results[0].removeprefix("RESULT "))


@pytest.fixture
def ray_head():
    port = free_port()
    # --block: the head lives as long as this process, which the fixture stops (never `ray stop`: other clusters).
    # Ray's memory monitor off: it counts the whole machine's memory, and on a shared CI machine killed an idle
    # rank of this test because other processes were using memory (the kernel's OOM killer still applies).
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=false", f"--temp-dir={tempfile.mkdtemp(prefix='/tmp/rp')}",
                             "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_memory_monitor_refresh_ms": "0"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, "ray start --head exited"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        head.wait(timeout=120)


def test_spawn_reconnect_update_and_shut_one_down(ray_head):
    spawned = run(ray_head, "spawn")
    assert spawned["rollout-tp1"] == spawned["rollout-tp3"]
    trained = run(ray_head, "train")
    assert trained["rollout-tp1"] == trained["rollout-tp3"] == trained["transformers"]
    assert trained["rollout-tp3"] != spawned["rollout-tp3"]   # the pushed weights are the ones serving
    assert run(ray_head, "generate", "rollout-tp3") == {"rollout-tp3": trained["rollout-tp3"]}
    assert "rollout-tp1-rank0" in run(ray_head, "generate", "rollout-tp1", expect_ok=False)["stderr"]
    run(ray_head, "shutdown", "rollout-tp3")
