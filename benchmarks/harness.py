"""Running one case: the settings, the timer, the interleaved round-robin, the memory probe, and the
Pacer that shares the run's time budget among the cases."""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

import fusedtie
from cases import DECODER, Case, Mode, ShapeCase, compiles_on
from contenders import BASELINE, CACHED, COMPILED, LAYER_OPS, Contender, Runner, make_decoder_tie
from guard import REFERENCES, check_cache_scope, guard


@dataclass(frozen=True)
class Settings:
    shapes: list[ShapeCase]
    transforms: list[str]
    modes: list[Mode]
    contenders: list[Contender]
    dtypes: list[torch.dtype]
    compile_on: str  # "all", "some" (COMPILE_SOME_SHAPES) or "none"
    warmup: int
    reps: int
    # Wall-clock cap per case (seconds, timed repetitions only): on a busy shared machine a case
    # stops early, at a whole rotation, rather than blowing the run's time budget. None: no cap.
    case_budget_s: Optional[float]
    # Target for the whole run (seconds), or None: each case's budget shrinks below the cap when the
    # run is behind schedule (see Pacer).
    run_target_s: Optional[float] = None
    # The caps of the kinds whose cap differs from case_budget_s (--quick: decoder and conv1d calls
    # are short, so a smaller cap still gives hundreds of repetitions and keeps the run's growth small).
    kind_case_budget_s: dict[str, float] = field(default_factory=dict)

    def case_cap(self, shape: ShapeCase) -> Optional[float]:
        return self.kind_case_budget_s.get(shape.kind, self.case_budget_s)

    def contenders_for(self, shape: ShapeCase, mode: Mode) -> list[Contender]:
        chosen = []
        for c in self.contenders:
            if mode.name not in c.modes or c.builder(shape.kind) is None:
                continue
            if c.name == COMPILED and not compiles_on(self.compile_on, shape):
                continue
            chosen.append(c)
        return chosen


MIN_REPS = 12  # the budget never cuts a case below this many repetitions


def make_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function that runs a call and returns its duration in seconds, device work included."""
    if device.type == "cuda":

        def timed(call):
            # Kernels run asynchronously: wait for earlier work before starting the clock, and for
            # this call's work before stopping it.
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            torch.cuda.synchronize(device)
            return time.perf_counter() - start
    else:

        def timed(call):
            start = time.perf_counter()
            call()
            return time.perf_counter() - start

    return timed


@contextlib.contextmanager
def _fd2_silenced() -> Iterator[None]:
    """Silences file descriptor 2 (the profiler's C++ start/stop lines would break the progress bar)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tree_nodes(nodes) -> Iterator:
    for node in nodes:
        yield node
        yield from _tree_nodes(node.children)


def cpu_step_peak_bytes(call: Callable[[], object]) -> int:
    """Peak of the running sum of CPU-allocator allocations and frees during one call (bytes)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _fd2_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()  # its result is dropped at once, inside the profile: the output's free is recorded
    tree = prof.profiler.kineto_results.experimental_event_tree()
    events = sorted((n for n in _tree_nodes(tree) if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    running = peak = 0
    for event in events:
        if event.extra_fields.device.type != "cpu":
            continue
        running += event.extra_fields.alloc_size  # negative for a free
        peak = max(peak, running)
    return peak


def cuda_step_peak_bytes(call: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def step_peak_mib(call: Callable[[], object], device: torch.device) -> Optional[float]:
    """The step's peak memory in MiB; None where this torch lacks the profiler API used on CPU."""
    if device.type == "cuda":
        return cuda_step_peak_bytes(call, device) / 2**20
    try:
        return cpu_step_peak_bytes(call) / 2**20
    except (AttributeError, ImportError) as error:  # private profiler API: may move in a later torch
        _warn_once(f"no CPU memory figures: torch.profiler's event tree is unavailable ({error})")
        return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        sys.stderr.write(f"\nbench: warning: {message}\n")


@dataclass
class CaseResult:
    """Per contender: timed samples, first-call time and peak step memory."""

    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    first_call_ms: dict[str, float] = field(default_factory=dict)
    peak_mib: dict[str, Optional[float]] = field(default_factory=dict)
    algorithm: Optional[str] = None  # the CPU algorithm fusedtie ran (auto's choice, or the forced one)

    @property
    def baseline_ms(self) -> float:
        """plain's median: the denominator of every ratio."""
        return statistics.median(self.samples_ms[BASELINE])


def build_runners(case: Case, contenders: list[Contender], tie) -> dict[str, Runner]:
    """tie: the source layer of a conv, conv1d or linear case, the DecoderTie of a decoder case."""
    return {c.name: c.builder(case.shape.kind)(tie, case.transform, case.mode.trains) for c in contenders}


def time_round_robin(
    runners: dict[str, Runner],
    x: Tensor,
    mode: Mode,
    settings: Settings,
    budget_s: Optional[float],
    device: torch.device,
) -> dict[str, list[float]]:
    """Warm-up, then the interleaved, rotated repetitions; per-call durations in milliseconds."""
    timed = make_timer(device)
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    # A collection pass in the middle of a timed call would be charged to whichever contender ran.
    gc.collect()
    gc.disable()
    deadline = None
    try:
        for rep in range(settings.warmup + settings.reps):
            timed_reps = rep - settings.warmup
            if timed_reps == 0 and budget_s is not None:
                deadline = time.perf_counter() + budget_s
            if (
                deadline is not None
                and timed_reps >= MIN_REPS
                and timed_reps % len(names) == 0
                and time.perf_counter() > deadline
            ):
                break  # at a whole rotation, so every contender ran equally often in each slot
            # Rotating the order spreads drift (thermal, other tenants) and any after-effect of the
            # previous contender (caches, allocator) evenly over all contenders.
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                runner = runners[name]
                seconds = timed(lambda: mode.step(runner, x))
                if rep >= settings.warmup:
                    samples[name].append(seconds * 1e3)
    finally:
        gc.enable()
    return samples


def run_case(case: Case, settings: Settings, budget_s: Optional[float], device: torch.device) -> CaseResult:
    """Scopes, first calls, guard, timings and memory of every contender on one case."""
    mode = case.mode
    contenders = settings.contenders_for(case.shape, mode)
    compiles = any(c.name == COMPILED for c in contenders)
    if compiles:
        torch._dynamo.reset()  # a new module per case: start each compilation from a clean slate
    torch.manual_seed(0)
    source = case.shape.source_layer(device, case.dtype)
    x = case.shape.input(device, case.dtype)
    tie = make_decoder_tie(case.shape, source) if case.shape.kind == DECODER else source
    runners = build_runners(case, contenders, tie)
    timed = make_timer(device)
    result = CaseResult(algorithm=fusedtie_cpu_algorithm(case.shape, source, x, case.transform))
    try:
        for runner in runners.values():
            mode.prepare(runner)
            runner.open_scope()
        if CACHED in runners:
            check_cache_scope(runners)
        result.first_call_ms = {name: 1e3 * timed(lambda: mode.step(r, x)) for name, r in runners.items()}
        guard(runners, REFERENCES[case.shape.kind][0](tie, case.transform, x), x, mode)
        for runner in runners.values():
            mode.prepare(runner)
        result.samples_ms = time_round_robin(runners, x, mode, settings, budget_s, device)
        result.peak_mib = {name: step_peak_mib(lambda: mode.step(r, x), device) for name, r in runners.items()}
    finally:
        for runner in runners.values():
            runner.close_scope()
        if compiles:
            torch._dynamo.reset()
    return result


def fusedtie_cpu_algorithm(shape: ShapeCase, source: nn.Module, x: Tensor, transform: str) -> Optional[str]:
    """The CPU algorithm fusedtie runs on this case, "forward/backward" where the two differ (None
    on CUDA); the transposed operator's CPU path is always the library. conv1d and linear cases
    run tied_conv2d on views (LayerOps.conv2d_view): the algorithm is the one it picks for those."""
    if x.device.type != "cpu":
        return None
    if shape.kind == DECODER:
        return "library"
    view = LAYER_OPS[type(source)].conv2d_view(source, x)
    # The benchmark's training step wants no input gradient (the input is data, not a parameter).
    forward, backward = (
        fusedtie.cpu_conv_algorithm_for(*view, transform=transform, backward=b, input_gradient=False)
        for b in (False, True)
    )
    return forward if forward == backward else f"{forward}/{backward}"


class Pacer:
    """Each case's timed budget: the cap, or less when the run is behind its target.

    The time left is shared out equally among the cases left, after reserving for each its
    untimed work (first calls, guard, memory: the median so far, since the first case also
    pays one-off start-up costs) and for each compilation still to come (the median of those after
    the first, which includes inductor's start-up; priors below). Cases whose cap is below the
    equal share (decoder and conv1d cases in --quick) take only their cap and leave the rest to the others
    (_level). A budget of 0 still runs MIN_REPS rotations, so a very busy machine overruns the
    target rather than measuring nothing.
    """

    FIRST_COMPILE_S = 15.0  # priors, measured on the 2-core CPU machine
    COMPILE_S = 4.0
    UNTIMED_S = 0.5

    def __init__(self, caps: list[Optional[float]], target_s: Optional[float], compiles: list[bool]):
        self.caps = caps  # per case; None: no cap
        self.target_s = target_s
        self.compiles = compiles
        self.start = time.perf_counter()
        self.untimed_s: list[float] = []
        self.compile_s: list[float] = []

    @staticmethod
    def _level(total: float, caps: list[Optional[float]]) -> float:
        """The level s at which sum(min(cap, s) over caps) == total (caps of None: no cap): the
        cases capped below it take their cap, the others share the rest equally."""
        finite = sorted(c for c in caps if c is not None)
        below = 0.0
        for k, cap in enumerate(finite):
            level = (total - below) / (len(caps) - k)
            if level <= cap:
                return level
            below += cap
        if len(finite) == len(caps):
            return float("inf")  # time for every cap
        return (total - below) / (len(caps) - len(finite))

    def budget(self, i: int) -> Optional[float]:
        cap = self.caps[i]
        if self.target_s is None:
            return cap
        left = self.target_s - (time.perf_counter() - self.start)
        to_compile = sum(self.compiles[i:])
        if to_compile and not self.compile_s:
            left -= self.FIRST_COMPILE_S - self.COMPILE_S
        later = self.compile_s[1:]
        left -= to_compile * (statistics.median(later) if later else self.COMPILE_S)
        untimed_each = statistics.median(self.untimed_s) if self.untimed_s else self.UNTIMED_S
        share = self._level(left - untimed_each * (len(self.caps) - i), self.caps[i:])
        share = max(0.0, share)
        return share if cap is None else min(cap, share)

    def record(self, wall_s: float, result: CaseResult) -> None:
        timed_s = sum(sum(v) for v in result.samples_ms.values()) / 1e3
        compile_s = result.first_call_ms.get(COMPILED, 0.0) / 1e3
        if COMPILED in result.first_call_ms:
            self.compile_s.append(compile_s)
        self.untimed_s.append(max(0.0, wall_s - timed_s - compile_s))
