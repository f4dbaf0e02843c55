"""Wall-clock timing shared by the link probe and the benchmarks, and the hook's profiler
ranges."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, ContextManager

import torch.autograd.profiler as _profiler

__all__ = ["median_seconds", "stage"]

_NOTHING = contextlib.nullcontext()


def stage(name: str) -> ContextManager[Any]:
    """A ``torch.profiler`` range named ``gradsparse.<name>`` while a profiler records (so a
    trace shows the hook's stages, on whichever thread runs them); nothing otherwise (a
    range costs about 10 us even unrecorded, and the hook opens several per bucket)."""
    if _profiler._is_profiler_enabled:
        return _profiler.record_function(f"gradsparse.{name}")
    return _NOTHING


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
