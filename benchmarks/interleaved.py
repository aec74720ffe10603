"""The timing loop of the per-pass and network scripts: warm, then rounds in a rotated order."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Each call's median time in seconds. Every call runs once to warm up (kernels generated,
    scratch allocated); then each round runs every call once, the order rotated by one a round so
    that no call always follows the same other one."""
    names = list(calls)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        calls[n]()
    for i in range(rounds):
        shift = i % len(names)
        for n in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[n]()
            samples[n].append(time.perf_counter() - start)
    return {n: statistics.median(v) for n, v in samples.items()}
