"""Side-by-side timing in one process: variants run in turn, in an order that reverses from
repeat to repeat, so that drift of the machine and warm caches favour none of them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

K = TypeVar("K")
T = TypeVar("T")


def interleaved(
    variants: Sequence[K], run: Callable[[K], T], repeats: int
) -> tuple[dict[K, float], dict[K, T]]:
    """``run(variant)`` for every variant, ``repeats + 1`` times; the first round is warm-up.

    Returns:
        Each variant's median wall time over the timed rounds (seconds), and what its last
        run returned.
    """
    times: dict[K, list[float]] = {variant: [] for variant in variants}
    results: dict[K, T] = {}
    for repeat in range(repeats + 1):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            started = time.perf_counter()
            results[variant] = run(variant)
            if repeat:
                times[variant].append(time.perf_counter() - started)
    return {variant: statistics.median(t) for variant, t in times.items()}, results
