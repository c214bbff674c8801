"""An RLHF job's second driver reconnects to the named, detached workers a first driver left running.

Each driver is its own process against one standalone Ray head (`ray start --head`, as a KubeRay head or a
trainer's cluster would be); the first driver exits without shutting the workers down."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.slow

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
DRIVER = """
import json, sys
from rayprism import LLM, SamplingParams
role, address, model = sys.argv[1:4]
greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
if role == "first":
    llm = LLM(model, device="cpu", ray_address=address, name="rp-rlhf", namespace="rp-reconnect", detached=True)
else:
    llm = LLM.connect("rp-rlhf", namespace="rp-reconnect", ray_address=address)
tokens = [r.token_ids for r in llm.generate(["The capital of France is", "1, 2, 3,"], greedy)]
if role == "second":
    llm.shutdown()
print("RESULT " + json.dumps(tokens), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_driver(role: str, address: str, model: str) -> list[list[int]]:
    done = subprocess.run([sys.executable, "-c", DRIVER, role, address, model], capture_output=True, text=True,
                          timeout=300, env=os.environ)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and results, f"{role} driver failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(results[0].removeprefix("RESULT "))


def test_a_second_driver_reconnects_and_shuts_down(checkpoints):
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rp")
    # --block: the head's processes live as long as this one, which the test stops (never `ray stop`, which
    # would stop every Ray cluster on the machine).
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:  # the head's GCS listens once it is up
            assert head.poll() is None, "ray start --head exited"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(0.5)
        first = run_driver("first", address, str(checkpoints["a"]))
        second = run_driver("second", address, str(checkpoints["a"]))  # the first driver has exited
        assert second == first and all(len(tokens) == 12 for tokens in first)
        # The second driver's shutdown removed the workers: a third driver finds nothing to connect to.
        with pytest.raises(AssertionError, match="rp-rlhf"):
            run_driver("second", address, str(checkpoints["a"]))
    finally:
        head.terminate()
        head.wait(timeout=120)
