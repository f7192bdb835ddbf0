"""The CPU flag reader against hand-written /proc/cpuinfo texts."""

import pytest

import eeengine.cpu_flags as cpu_flags_module
from eeengine.cpu_flags import cpu_flags, cpu_has_amx_bf16, cpu_has_vnni, parse_cpuinfo

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512_vnni amx_bf16 amx_tile

processor\t: 1
model name\t: other
flags\t\t: fpu
"""


def test_parse_cpuinfo_reads_the_first_processor():
    fields = parse_cpuinfo(CPUINFO)
    assert fields["model name"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert fields["flags"].split() == [
        "fpu",
        "avx2",
        "avx512f",
        "avx512_vnni",
        "amx_bf16",
        "amx_tile",
    ]


@pytest.mark.parametrize(
    ("flags", "vnni", "amx"),
    [
        ("fpu avx2 avx512_vnni amx_bf16", True, True),
        ("fpu avx2 avx_vnni", True, False),
        ("fpu avx2 avx512_bf16", False, False),
        ("fpu avx512_vnnix amx_bf16x", False, False),  # whole flags only, not substrings
    ],
)
def test_dispatch_flags(monkeypatch, flags, vnni, amx):
    monkeypatch.setattr(cpu_flags_module, "cpu_info", lambda: {"flags": flags})
    assert cpu_flags() == frozenset(flags.split())
    assert cpu_has_vnni() is vnni and cpu_has_amx_bf16() is amx


def test_no_cpuinfo_means_no_flags(monkeypatch):
    monkeypatch.setattr(cpu_flags_module, "cpu_info", lambda: {})
    assert cpu_flags() == frozenset() and not cpu_has_vnni() and not cpu_has_amx_bf16()
