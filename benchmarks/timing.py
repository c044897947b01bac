"""Interleaved timing, robust to a machine shared with other jobs.

Every case runs once per *round* and the rounds repeat, so a burst of background load hits all
cases alike instead of one case's whole series. The order rotates each round (no case is always
first). Two estimates of a ratio a/b are kept:

* ``best``: min(a) / min(b) — each case at its least disturbed; on a quiet machine the min and the
  median agree and this is the number to quote;
* ``paired``: the median over rounds of a_i / b_i — neighbours in time share the background load,
  so their ratio is steadier than either time when the machine is busy.

When the two disagree by more than a few percent the machine was too busy for that ratio; the
report shows both.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Ratio:
    best: float  # min(a) / min(b)
    paired: float  # median over rounds of a_i / b_i
    paired_lo: float  # first quartile of a_i / b_i
    paired_hi: float  # third quartile


def time_interleaved(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    synchronize: Callable[[], None] = lambda: None,
    on_round: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each case by ``clock`` (wall clock; ``time.process_time`` counts only this
    process's CPU time, steadier on a shared machine with one thread), ``repeats`` times each, in
    rotating round-robin order.

    The garbage collector runs between rounds, never inside a timed call (tensors are freed by
    reference counting anyway). ``synchronize`` waits for queued
    device work (``torch.cuda.synchronize`` on a GPU) before the clock is read.
    """
    names = list(cases)
    for _ in range(warmup):  # first calls allocate caches and pick kernels: not timed
        for name in names:
            cases[name]()
    synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(repeats):
            gc.collect(1)  # the young generations: a full collection takes ~1 s with torch imported
            gc.disable()
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                synchronize()
                start = clock()
                cases[name]()
                synchronize()
                times[name].append(clock() - start)
            gc.enable()
            if on_round is not None:
                on_round(r)
    finally:
        if gc_was_enabled:
            gc.enable()
        else:
            gc.disable()
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> Ratio:
    """How much slower ``a`` is than ``b`` (see the module docstring)."""
    pairs = sorted(x / y for x, y in zip(times[a], times[b]))
    if len(pairs) >= 4:
        lo, _, hi = statistics.quantiles(pairs, n=4)
    else:
        lo, hi = pairs[0], pairs[-1]
    return Ratio(min(times[a]) / min(times[b]), statistics.median(pairs), lo, hi)


def best_ms(times: dict[str, list[float]], name: str) -> float:
    return 1e3 * min(times[name])


def median_ms(times: dict[str, list[float]], name: str) -> float:
    return 1e3 * statistics.median(times[name])
