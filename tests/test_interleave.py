"""benchmarks/interleave.py: variants take turns, in an order that reverses each round, the
first round untimed; each gets the median of its timed rounds and its last result."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import interleave  # noqa: E402


def test_rounds_alternate_and_the_first_is_warm_up(monkeypatch):
    clock = iter(range(1000))
    monkeypatch.setattr(interleave.time, "perf_counter", lambda: next(clock))
    calls = []

    def run(variant):
        calls.append(variant)
        for _ in range(10 if len(calls) <= 3 else 1):  # the warm-up round is slow
            next(clock)
        return (variant, len(calls))

    seconds, results = interleave.interleaved(["a", "b", "c"], run, repeats=3)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert seconds == {"a": 2, "b": 2, "c": 2}  # 11 ticks in the warm-up, 2 after
    assert results == {"a": ("a", 12), "b": ("b", 11), "c": ("c", 10)}
