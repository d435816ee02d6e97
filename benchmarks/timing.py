"""Side-by-side timing: every candidate is timed in the same rounds, so ratios share the noise.

On a shared machine the absolute speed drifts from second to second. We therefore time all the
functions being compared in one loop of rounds (alternating their order), form the ratio inside
each round, and report the median over rounds. Each sample is a ``torch.utils.benchmark.Timer``
measurement (its ``timeit`` with a calibrated ``number`` of calls) after two warm-up calls.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer


def calibrate(fn: Callable[[], object], min_time: float) -> int:
    """Warm ``fn`` up (two calls) and return how many calls make a sample of about ``min_time`` s."""
    fn()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    return max(1, round(min_time / max(elapsed, 1e-7)))


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_time: float) -> dict[str, list[float]]:
    """Per-call seconds of each function, one sample per round, the functions alternating in order."""
    threads = torch.get_num_threads()
    number = {k: calibrate(f, min_time) for k, f in fns.items()}
    timers = {k: Timer("fn()", globals={"fn": f}, num_threads=threads, label=k) for k, f in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys if r % 2 == 0 else reversed(keys):
            samples[k].append(timers[k].timeit(number[k]).median)
    return samples


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ratio(
    samples: dict[str, list[float]], num: Callable[[dict[str, float]], float], den: Callable[[dict[str, float]], float]
) -> float:
    """Median over rounds of num(round) / den(round), each a function of that round's times."""
    rounds = len(next(iter(samples.values())))
    per_round = []
    for r in range(rounds):
        row = {k: v[r] for k, v in samples.items()}
        per_round.append(num(row) / den(row))
    return median(per_round)


def ms(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median of each case's samples, in milliseconds."""
    return {k: 1e3 * median(v) for k, v in samples.items()}
