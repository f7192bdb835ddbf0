"""What the Triton kernel tests share: the device they run on and the import of a kernel
module, skipping the test module where the kernel cannot run."""

from __future__ import annotations

import importlib
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
