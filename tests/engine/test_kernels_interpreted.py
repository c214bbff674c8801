"""The Triton kernels' logic on the CPU, through Triton's interpreter: CI checks their index arithmetic, masks
and context splits, which the GPU tests (marked gpu) check again in bf16 on a GPU host. The checks live in
interpreted_kernels.py; each runs in its own process with TRITON_INTERPRET=1. The fused all-reduce + norm needs
two GPUs and symmetric memory: test_gpu_comm.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # the dev extra installs it (the worker image gets it with CUDA torch)

from .interpreted_kernels import CHECKS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_kernel_under_the_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "tests.engine.interpreted_kernels", check], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
