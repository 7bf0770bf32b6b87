"""Wall-clock timing shared by the benchmarks."""
from __future__ import annotations

import statistics
import time


def timed(*fns, repeats: int) -> list[float]:
    """Median seconds of `repeats` calls of each fn, after one warm-up call each (compilation).
    The calls take turns (fn 1, fn 2, ..., fn 1, ...), so that a machine growing busier or
    quieter during the run shifts every fn alike and the ratios between them hold."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]
