"""What a benchmark's timings depend on besides the code, recorded in every report: threads,
OpenMP waiting, library versions, the CPU model and the kernel flags it has."""

from __future__ import annotations

import os
import platform

import onnxruntime
import torch
import transformers

from eeengine.cpu_flags import cpu_flags, cpu_info


def environment() -> dict:
    """What the timings depend on besides the code: threads, OpenMP waiting, versions, CPU."""
    return {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        **_cpu_model(),
        "load_average": os.getloadavg(),
        **{name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


# CPU features the int8 and bf16 kernels dispatch on.
_KERNEL_FLAGS = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _cpu_model() -> dict:
    """The CPU's model name and which of :data:`_KERNEL_FLAGS` it has (empty where unknown)."""
    info = cpu_info()
    if not info:
        return {}
    flags = cpu_flags()
    return {
        "cpu_model": info.get("model name"),
        "cpu_flags": [flag for flag in _KERNEL_FLAGS if flag in flags],
    }
