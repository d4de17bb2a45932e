"""benchmarks/device_check.py on a machine without the device: one line on stderr, exit 2, nothing run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: the check would run")
def test_device_check_without_cuda_exits_2_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--device", "cuda"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == "error: --device cuda: CUDA is not available on this machine; use --device cpu or auto\n"
    assert result.stdout == ""
