"""The CPU's instruction-set flags, read once from ``/proc/cpuinfo``: what the bf16 training
path (AMX) and the int8 executors (VNNI) dispatch on, and what the benchmarks record."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (``"model name"``, ``"flags"``, ...);
    empty where it cannot be read (not Linux)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return {}


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The fields of the first processor block of a ``/proc/cpuinfo`` text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU's flags (``avx2``, ``avx512_vnni``, ``amx_bf16``, ...); empty where unknown."""
    return frozenset(cpu_info().get("flags", "").split())


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI int8 dot products (AVX512-VNNI or AVX-VNNI)."""
    return not cpu_flags().isdisjoint({"avx512_vnni", "avx_vnni"})


def cpu_has_amx_bf16() -> bool:
    """Whether the CPU has AMX-BF16 tiles."""
    return "amx_bf16" in cpu_flags()
