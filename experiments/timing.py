"""Wall-clock timing shared by the benchmarks."""
from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn, after one warm-up call (compilation)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
