"""Wall-clock timing of one step for the benchmark tools (``tools/benchmark_*.py``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["median_seconds"]


def median_seconds(step: Callable[[], object], device: str, repeats: int, warmup: int = 2) -> float:
    """The median wall time of ``step()`` over ``repeats`` calls, after ``warmup`` untimed calls
    (compilation, autotuning, the allocator). On ``cuda`` each call is timed from an idle device
    to the end of its kernels (``torch.cuda.synchronize`` before and after)."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
