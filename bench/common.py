"""Timing helpers for benchmarks: alternate the sides, report medians and ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(
    sides: dict[str, Callable[[], None]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each side, calling the sides in turn each round (A B A B ...)."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)
