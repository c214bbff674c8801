"""Fixtures of the local cluster: the operator tests' emulated API server (tests/operator), KubeRay and a
kubelet that run the rendered pods for real (kuberay.py, kubelet.py), and the real operator."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.operator.conftest import k8s  # noqa: F401  (the emulated API server, KUBECONFIG pointing at it)
from tests.operator.harness import OperatorThread

from .kuberay import LocalKubeRay
from .network import PodNetwork, unavailable_reason


@pytest.fixture
async def local_kuberay(k8s, tmp_path):  # noqa: F811
    if reason := unavailable_reason():
        pytest.skip(f"the local cluster gives every pod its own network namespace: {reason}")
    with PodNetwork() as network:
        async with LocalKubeRay(k8s, network, tmp_path / "node") as kuberay:
            yield kuberay
        assert not network.namespaces()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert network.bridge not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert not any(line.startswith(network._prefix) for line in namespaces.splitlines()), namespaces


@pytest.fixture
async def operator(local_kuberay):
    op = OperatorThread()
    await op.start()
    yield op
    await op.stop()


@pytest.fixture(scope="session")
def model_revisions(tmp_path_factory):
    """file:// URI template with two revision folders of the converted SmolLM2 checkpoint: v1 as converted
    (hard links), v2 with its final norm negated, so that greedy answers show which weights serve."""
    from rayprism.engine.loader import resolve_model_path
    from safetensors.torch import load_file, save_file

    source = resolve_model_path("builtin://smollm2-135m-instruct")
    root = tmp_path_factory.mktemp("models")
    for revision in ("v1", "v2"):
        shutil.copytree(source, root / revision, copy_function=os.link)
    weights = root / "v2" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = -tensors["model.norm.weight"]
    weights.unlink()  # a hard link to v1's file: write a new one
    save_file(tensors, weights, metadata={"format": "pt"})
    return f"file://{root}/{{revision}}"
