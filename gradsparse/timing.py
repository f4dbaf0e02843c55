"""Wall-clock timing shared by the link probe and the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

__all__ = ["median_seconds"]


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
