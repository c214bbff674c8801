"""Fixtures: the emulated API server, the KubeRay stand-in and the operator (see harness.py)."""

from __future__ import annotations

import kubernetes.config.kube_config
import pytest
from kmock import Server

from .harness import ADMIN_KEY, WORKER_IMAGE, ApiServerEmulator, FakeKubeRay, OperatorThread, register, write_kubeconfig


@pytest.fixture
async def k8s(tmp_path, monkeypatch):
    async with ApiServerEmulator() as emulator, Server(emulator):
        register(emulator)
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, str(emulator.url), token="test")
        # The operator finds the cluster the way it does outside tests: through KUBECONFIG.
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        # The kubernetes package reads $KUBECONFIG once, at import (which happened already).
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        monkeypatch.setenv("RAYPRISM_WEIGHTS_POLL_SECONDS", "0.2")
        monkeypatch.setenv("RAYPRISM_RESYNC_SECONDS", "2")  # what no watch event announces, seen soon
        monkeypatch.setenv("RAYPRISM_DEFAULT_WORKER_IMAGE", WORKER_IMAGE)  # as the Helm chart sets it
        (key := tmp_path / "admin-key").write_text(ADMIN_KEY)  # the chart mounts its key Secret so
        monkeypatch.setenv("RAYPRISM_ADMIN_KEY_FILE", str(key))
        monkeypatch.setenv("RAYPRISM_OPERATOR_NAMESPACE", "rayprism-system")
        yield emulator


@pytest.fixture
async def kuberay(k8s):
    async with FakeKubeRay(k8s) as fake:
        yield fake


@pytest.fixture
async def operator(k8s, kuberay):
    op = OperatorThread()
    await op.start()
    yield op
    await op.stop()
