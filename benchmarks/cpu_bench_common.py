"""What the CPU per-pass and network scripts share: their common options, the machine line that
heads their tables, and their timing loop (warm, then rounds in a rotated order)."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import fusedtie


def add_common_arguments(parser: argparse.ArgumentParser, rounds: int, algorithms: str) -> None:
    """--transform, --rounds, --algorithms and --threads, with the script's own defaults."""
    parser.add_argument("--transform", default="square")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--algorithms", default=algorithms, help="comma-separated CPU algorithms")
    parser.add_argument("--threads", type=int, default=None)


def machine_line(args: argparse.Namespace) -> str:
    """Applies --threads, then names the CPU, threads, torch, f and rounds (every figure's context)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = fusedtie.cpu_info()
    return (
        f"{info['vendor']} {info['model']}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"f = {args.transform}, {args.rounds} rounds"
    )


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
