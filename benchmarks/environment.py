"""What a benchmark's timings depend on besides the code, recorded in every report: threads,
OpenMP waiting, library versions, the CPU model and the kernel flags it has."""

from __future__ import annotations

import os
import platform

import onnxruntime
import torch
import transformers


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
    """The CPU's model name and which of :data:`_KERNEL_FLAGS` it has, from /proc/cpuinfo
    (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            fields = dict(line.split(":", 1) for line in cpuinfo if ":" in line)
    except OSError:
        return {}
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name"),
        "cpu_flags": [flag for flag in _KERNEL_FLAGS if flag in flags],
    }
