"""What the Triton kernel tests share: the device they run on and the import of a kernel
module, skipping the test module where the kernel cannot run."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# CUDA when there is a GPU; else CPU tensors for Triton's interpreter.
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def import_kernel(name: str) -> ModuleType:
    """``eeengine.kernels.<name>``; skips the calling test module when triton is missing, or
    when there is no GPU and triton was imported without ``TRITON_INTERPRET=1``
    (tests/conftest.py sets it first, so run the tests through pytest)."""
    pytest.importorskip("triton", reason="triton is not installed")
    module = importlib.import_module(f"eeengine.kernels.{name}")
    if not HAS_CUDA and not module.INTERPRETED:
        pytest.skip(
            "no GPU, and triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets "
            "it first; run these tests through pytest)",
            allow_module_level=True,
        )
    return module


def compile_for_sm90(name: str) -> int:
    """Build check: run ``eeengine.kernels.<name>.compile_ahead_of_time(90)`` (triton.compile
    for GPUTarget("cuda", 90, 32)) in a fresh process without TRITON_INTERPRET (the calling
    process imported the interpreted kernel) and check every variant's PTX targets sm_90 and
    has a cubin. Skips the test where triton has no ptxas.

    Returns:
        The number of variants compiled.
    """
    code = (
        f"from eeengine.kernels.{name} import compile_ahead_of_time\n"
        "compiled = compile_ahead_of_time(90)\n"
        "for k in compiled.values():\n"
        "    assert '.target sm_90' in k.asm['ptx'] and k.asm['cubin']\n"
        "print(len(compiled))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip(f"triton cannot compile for sm_90 here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1])
