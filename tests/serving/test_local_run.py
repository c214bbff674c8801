"""`rayprism run FILE`: a local Ray cluster and the server for a manifest; Ctrl-C stops everything."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from tests.serving.helpers import free_port

pytestmark = pytest.mark.slow

MANIFEST = """\
apiVersion: rayprism.dev/v1alpha1
kind: InferenceDeployment
metadata:
  name: tiny
spec:
  model:
    name: tiny-local
    uri: file://{uri}
  parallelism:
    tensor: 1
  resources:
    gpusPerNode: 0
  engine:
    maxNumSeqs: 4
"""


def test_run_serves_the_manifest_and_ctrl_c_stops_everything(tmp_path, checkpoints):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(MANIFEST.format(uri=checkpoints["a"]))
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "rayprism.cli", "run", str(manifest), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while not any(line.startswith("try:") for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            lines.append(process.stdout.readline())
        output = "".join(lines)
        assert f"ready: http://127.0.0.1:{port}/v1 (model 'tiny-local')" in output
        assert "curl " in output and "/v1/chat/completions" in output
        assert "no admin API" in output  # nothing to reach it: a second run, or port 8001 in use, is no clash
        children = psutil.Process(process.pid).children(recursive=True)
        assert any("raylet" in " ".join(c.cmdline()) for c in children)
        response = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
            "model": "tiny-local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=90)
        assert process.returncode == 0, output + rest
        assert "stopped" in rest
        time.sleep(1)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_run_rejects_a_bad_manifest(tmp_path):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text("apiVersion: rayprism.dev/v1alpha1\nkind: InferenceDeployment\nspec: {}\n")
    result = subprocess.run([sys.executable, "-m", "rayprism.cli", "run", str(manifest)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "invalid InferenceDeployment" in result.stderr
