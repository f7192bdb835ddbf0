"""Build check of the CUDA kernels in csrc/ without a GPU: nvcc compiles each to an object file.

The kernels include only CUDA headers (their ATen wrappers are C++ built with the extension), so
this works against the CPU torch wheel, whose CUDA headers are incomplete. Skipped without nvcc.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = ["csrc/exit_head_cuda.cu"]
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (CUDA toolkit missing)")
@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_source_compiles_for_sm90(source: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [NVCC, "-std=c++17", "-arch=sm_90", "-Werror=all-warnings", "-c", source, "-o",
         str(tmp_path / "kernel.o")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "kernel.o").stat().st_size > 0
