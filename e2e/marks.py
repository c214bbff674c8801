"""pytest marks of the e2e suite: which cluster a test needs."""

from __future__ import annotations

import os

import pytest

# Any cluster prepared as e2e/run.sh (kind) or `make e2e` (this machine's control plane) prepares one.
ON_A_CLUSTER = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("RAYPRISM_E2E") != "1",
                       reason="needs a cluster prepared by e2e/run.sh or `make e2e` (they set RAYPRISM_E2E=1)"),
]
# Tests that register Nodes run by our kubelet or read its pods' log files: this machine's control plane only.
LOCAL_CONTROL_PLANE_ONLY = pytest.mark.skipif(os.environ.get("RAYPRISM_E2E_LOCAL_KUBELET") != "1",
                                              reason="needs this machine's control plane and its kubelet (make e2e)")
ON_THE_LOCAL_CONTROL_PLANE = [*ON_A_CLUSTER, LOCAL_CONTROL_PLANE_ONLY]
