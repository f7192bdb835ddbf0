"""benchmarks/compare.py's verdict (benchmarks/compare_report.py): the fastest eeengine
configuration within 0.5 points of fp32 full depth is judged at each batch size on that batch
size's accuracy (int8 predictions depend on the other inputs of a call), on hand-made reports."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from compare_report import fastest_within, markdown  # noqa: E402


def _row(acc1: float, acc32: float, ms: float, rate: float) -> dict:
    return {
        "policy": "none",
        "accuracy_b1": acc1,
        "accuracy_b32": acc32,
        "median_ms": ms,
        "p90_ms": ms,
        "sentences_per_s_b32": rate,
        "speedup_median_vs_ort_int8": 2.0 / ms,
        "throughput_vs_ort_int8_b32": rate / 500,
    }


REPORT = {
    "max_drop": 0.5,
    "providers": {
        "ort_int8": _row(88.0, 88.0, 2.0, 500),  # a peer is never the verdict
        "eeengine_torch_full": _row(90.0, 90.0, 10.0, 250),
        # int8: inside the bound alone, outside in batches of 32.
        "eeengine_ort_int8_drop0.5": _row(89.6, 89.0, 1.5, 900),
        "eeengine_ort_drop1.0": _row(89.5, 89.5, 1.9, 560),
        "eeengine_ort_int8_drop1.0": _row(89.0, 89.0, 1.4, 950),  # outside at both
    },
}


def test_each_batch_size_is_judged_on_its_own_accuracy():
    assert fastest_within(REPORT, 1) == ("eeengine_ort_int8_drop0.5", 89.5)
    assert fastest_within(REPORT, 32) == ("eeengine_ort_drop1.0", 89.5)


def test_the_bound_is_inclusive_and_none_when_nothing_is_inside():
    assert fastest_within(REPORT, 32, drop=1.0) == ("eeengine_ort_int8_drop1.0", 89.0)
    assert fastest_within(REPORT, 1, drop=0.0) == ("eeengine_torch_full", 90.0)
    strict = {"providers": {"hf_eager": REPORT["providers"]["ort_int8"]}}
    assert fastest_within(strict, 1) is None  # hf_eager is the reference, not a candidate


def test_markdown_states_the_verdict_per_batch_size():
    text = markdown(REPORT, [32])
    assert (
        "- batch 1: fastest eeengine within 0.5 points of fp32 full depth (≥ 89.50): "
        "eeengine_ort_int8_drop0.5, 89.60, 1.50 ms (1.33× ort_int8)" in text
    )
    assert (
        "- batch 32: fastest eeengine within 0.5 points of fp32 full depth (≥ 89.50): "
        "eeengine_ort_drop1.0, 89.50, 560.0 inputs/s (1.12× ort_int8)" in text
    )
