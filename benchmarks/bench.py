"""Benchmark: y = conv(x, f(W), g(b)) with W trainable, fusedtie against the alternatives.

Contenders (all compute the same y; see CONTENDERS):
  plain     nn.Conv2d holding f(W) precomputed once: the floor, what a conv costs with no tie at all.
  fusedtie  fusedtie.FusedTiedConv2d: f applied inside the one fused operator.
  forum     the forum recipe, F.conv2d(x, f(w), b, ...) recomputing f(W) on every call.

Usage (from the repository root; `make bench` runs the quick set):
  python benchmarks/bench.py [--quick | --full] [--threads N] [--device cpu|cuda] [--json PATH]

Method: per case, a correctness guard, then warm-up, then many repetitions in which every contender
runs once, round-robin, with the order rotated each repetition; each call is timed on its own with
time.perf_counter. The table gives the median, the interquartile range as a percentage of the
median, and median(contender) / median(plain) from the same run.

To extend: add a ShapeCase to the shape lists, a Contender to CONTENDERS, a Mode to MODES, or a
transform to FORUM_TRANSFORMS (the reference f written with plain torch ops).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

# Benchmark the working tree this file lives in, not whatever `fusedtie` happens to be installed:
# `python benchmarks/bench.py` puts benchmarks/ on sys.path, not the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402  (torch first: the extension needs torch's shared libraries loaded)
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import fusedtie  # noqa: E402

# --- what is measured -------------------------------------------------------------------------------

# f written with ordinary torch ops: the forum recipe's f, the plain contender's precomputation and
# the reference of the correctness guard. A transform is benchmarked only if it is listed here.
FORUM_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "square": lambda w: w**2,
    "tanh": torch.tanh,
}


@dataclass(frozen=True)
class ShapeCase:
    """One convolution: input (batch, in_channels, height, width) and the conv's hyper-parameters."""

    label: str
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    def describe(self) -> str:
        extra = ""
        if self.stride != 1:
            extra += f" s{self.stride}"
        if self.groups != 1:
            extra += f" g{self.groups}"
        return (f"{self.label}: {self.batch}x{self.in_channels}x{self.height}x{self.width} "
                f"{self.in_channels}->{self.out_channels} {self.kernel}x{self.kernel}{extra}")

    def source_conv(self, device: torch.device) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel, stride=self.stride,
                         padding=self.padding, groups=self.groups, device=device)

    def input(self, device: torch.device) -> Tensor:
        return torch.randn(self.batch, self.in_channels, self.height, self.width, device=device)


SEED_CASE = ShapeCase("seed", 1, 16, 16, 300, 300, 3, padding=1)

QUICK_SHAPES = [
    SEED_CASE,
    ShapeCase("resnet 3x3", 1, 256, 256, 14, 14, 3, padding=1),
    ShapeCase("resnet 1x1", 1, 1024, 256, 14, 14, 1),
]

FULL_SHAPES = QUICK_SHAPES + [
    ShapeCase("seed b8", 8, 16, 16, 300, 300, 3, padding=1),
    ShapeCase("resnet 3x3", 1, 64, 64, 56, 56, 3, padding=1),
    ShapeCase("resnet 3x3", 1, 128, 128, 28, 28, 3, padding=1),
    ShapeCase("resnet 3x3", 1, 512, 512, 7, 7, 3, padding=1),
    ShapeCase("resnet 3x3 down", 1, 128, 128, 56, 56, 3, stride=2, padding=1),
    ShapeCase("resnet 1x1", 1, 256, 1024, 14, 14, 1),
    ShapeCase("resnet 3x3 b32", 32, 256, 256, 14, 14, 3, padding=1),
    ShapeCase("depthwise 3x3", 1, 256, 256, 28, 28, 3, padding=1, groups=256),
]


@dataclass
class Runner:
    """A contender built for one case: the module to call and the leaves a training step needs."""

    module: nn.Module
    params: list[Tensor]
    # Whether `params` are the source's W and b (so their gradients must equal the reference's).
    # The plain floor differentiates with respect to its own f(W), which is not comparable.
    grads_wrt_source: bool = True


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[nn.Conv2d, str], Runner]


class ForumConv2d(nn.Module):
    """The forum recipe, in a module so its call overhead matches the other contenders'."""

    def __init__(self, source: nn.Conv2d, transform: str) -> None:
        super().__init__()
        self.source = source
        self.f = FORUM_TRANSFORMS[transform]

    def forward(self, x: Tensor) -> Tensor:
        s = self.source
        return F.conv2d(x, self.f(s.weight), s.bias, s.stride, s.padding, s.dilation, s.groups)


def build_plain(source: nn.Conv2d, transform: str) -> Runner:
    conv = nn.Conv2d(source.in_channels, source.out_channels, source.kernel_size,
                     stride=source.stride, padding=source.padding, dilation=source.dilation,
                     groups=source.groups, device=source.weight.device)
    with torch.no_grad():
        conv.weight.copy_(FORUM_TRANSFORMS[transform](source.weight))
        conv.bias.copy_(source.bias)  # bias="same": g is the identity
    return Runner(conv, [conv.weight, conv.bias], grads_wrt_source=False)


def build_fusedtie(source: nn.Conv2d, transform: str) -> Runner:
    layer = fusedtie.FusedTiedConv2d(source, transform, bias="same")
    return Runner(layer, [source.weight, source.bias])


def build_forum(source: nn.Conv2d, transform: str) -> Runner:
    return Runner(ForumConv2d(source, transform), [source.weight, source.bias])


# The first entry is the baseline of the ratio column; the guard's reference is "forum".
CONTENDERS = [
    Contender("plain", build_plain),
    Contender("fusedtie", build_fusedtie),
    Contender("forum", build_forum),
]
BASELINE = "plain"
REFERENCE = "forum"


@dataclass(frozen=True)
class Mode:
    """How one timed call uses a Runner; `prepare` puts the module in the right state beforehand."""

    name: str
    trains: bool  # whether the step differentiates (the guard then checks gradients too)
    prepare: Callable[[Runner], None]
    step: Callable[[Runner, Tensor], object]


def _inference_step(runner: Runner, x: Tensor) -> Tensor:
    with torch.no_grad():
        return runner.module(x)


def _train_step(runner: Runner, x: Tensor) -> tuple[Tensor, ...]:
    # autograd.grad returns fresh gradients instead of accumulating into .grad, so no contender pays
    # for an accumulation (or a zero_grad) the others do not.
    y = runner.module(x)
    return torch.autograd.grad(y.sum(), runner.params)


MODES = [
    Mode("inference", False, lambda r: r.module.eval(), _inference_step),
    Mode("train", True, lambda r: r.module.train(), _train_step),
]

TRANSFORMS = ["square", "tanh"]


@dataclass(frozen=True)
class Settings:
    shapes: list[ShapeCase]
    transforms: list[str]
    modes: list[Mode]
    warmup: int
    reps: int
    # Wall-clock cap per case (seconds, timed repetitions only): on a busy shared machine a case
    # stops early, at a whole rotation, rather than blowing the run's time budget. None: no cap.
    case_budget_s: Optional[float]


# --quick is sized to finish in about 2 minutes on a 2-core CPU machine, busy or not (the budget).
QUICK = dict(shapes=QUICK_SHAPES, warmup=10, reps=300, case_budget_s=6.0)
FULL = dict(shapes=FULL_SHAPES, warmup=20, reps=400, case_budget_s=60.0)
MIN_REPS = 12  # the budget never cuts a case below this many repetitions

# --- the correctness guard --------------------------------------------------------------------------

RTOL = 1e-4
ATOL = 1e-5  # relative to the reference's largest magnitude: sums over many terms scale with it


class GuardError(RuntimeError):
    pass


def _check_close(what: str, got: Tensor, ref: Tensor) -> None:
    atol = ATOL * max(1.0, ref.abs().max().item())
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=RTOL, atol=atol):
        err = (got - ref).abs().max().item() if got.shape == ref.shape else float("nan")
        raise GuardError(
            f"{what} does not match the reference (shape {list(got.shape)} vs {list(ref.shape)}, "
            f"max abs error {err:.3g}, rtol={RTOL:g}, atol={atol:.3g})"
        )


def guard(runners: dict[str, Runner], x: Tensor, mode: Mode) -> None:
    """Every contender's output, and when training the source's gradients, must equal forum's.

    Each contender runs as the mode runs it (under no_grad for inference), since that is the path
    being timed and an operator may take another path with autograd off.
    """
    ref = runners[REFERENCE]
    ref.module.train()
    ref_y = ref.module(x)
    ref_grads = torch.autograd.grad(ref_y.sum(), ref.params)
    for name, runner in runners.items():
        if name == REFERENCE:
            continue
        mode.prepare(runner)
        with torch.set_grad_enabled(mode.trains):
            y = runner.module(x)
        _check_close(f"{name} output", y.detach(), ref_y.detach())
        if mode.trains and runner.grads_wrt_source:
            grads = torch.autograd.grad(y.sum(), runner.params)
            for label, g, rg in zip(("d/dW", "d/db"), grads, ref_grads):
                _check_close(f"{name} gradient {label}", g, rg)


# --- timing -----------------------------------------------------------------------------------------


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


def run_case(shape: ShapeCase, transform: str, mode: Mode, settings: Settings,
             device: torch.device) -> dict[str, list[float]]:
    """Times every contender on one case; returns the per-call durations in milliseconds."""
    torch.manual_seed(0)
    source = shape.source_conv(device)
    x = shape.input(device)
    runners = {c.name: c.build(source, transform) for c in CONTENDERS}
    guard(runners, x, mode)
    for runner in runners.values():
        mode.prepare(runner)

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
            if timed_reps == 0 and settings.case_budget_s is not None:
                deadline = time.perf_counter() + settings.case_budget_s
            if (deadline is not None and timed_reps >= MIN_REPS and timed_reps % len(names) == 0
                    and time.perf_counter() > deadline):
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


def summarise(samples: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "iqr_pct": 100.0 * (q3 - q1) / median}


# --- reporting --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fusedtie": getattr(fusedtie, "__version__", "unknown"),
        "fusedtie_cuda_compiled": bool(getattr(fusedtie, "cuda_compiled", False)),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_at_start": os.getloadavg()[0],
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def markdown_table(results: list[dict]) -> str:
    header = ["shape", "transform", "mode", "contender", "median ms", "IQR %", "ratio to plain"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * 3) + "|"]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['transform']} | {r['mode']} | {r['contender']} | "
            f"{r['median_ms']:.3f} | {r['iqr_pct']:.1f} | {r['ratio_to_plain']:.2f} |"
        )
    return "\n".join(lines)


class Progress:
    """One line per case on stderr; redrawn in place when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, label: str) -> None:
        elapsed = time.perf_counter() - self.start
        width = 20
        filled = width * done // self.total
        text = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {elapsed:5.1f}s {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def finish(self) -> float:
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(("\r\033[K" if self.tty else "") + f"done: {self.total} cases in {elapsed:.1f}s\n")
        return elapsed


# --- main -------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="the seed shape plus two ResNet-like shapes (default; at most about 2 minutes)")
    size.add_argument("--full", dest="size", action="store_const", const="full",
                      help="more shapes and repetitions")
    parser.set_defaults(size="quick")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads value (default: torch's own default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="PATH", help="also write results and environment here")
    parser.add_argument("--reps", type=int, help="override the number of timed repetitions")
    parser.add_argument("--warmup", type=int, help="override the number of warm-up repetitions")
    parser.add_argument("--case-budget", type=float, metavar="SECONDS",
                        help="cap on the timed repetitions of one case (0: no cap)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.reps is not None and args.reps < 4:
        parser.error("--reps must be at least 4 (the quartiles need a few samples)")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be non-negative")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench: --device cuda, but torch sees no CUDA device")
        if not getattr(fusedtie, "cuda_compiled", False):
            sys.exit("bench: --device cuda, but the fusedtie extension was built without CUDA")

    preset = QUICK if args.size == "quick" else FULL
    settings = Settings(
        shapes=preset["shapes"],
        transforms=[t for t in TRANSFORMS if t in FORUM_TRANSFORMS],
        modes=MODES,
        warmup=preset["warmup"] if args.warmup is None else args.warmup,
        reps=preset["reps"] if args.reps is None else args.reps,
        case_budget_s=preset["case_budget_s"] if args.case_budget is None else (args.case_budget or None),
    )
    env = environment(device)
    cases = [(s, t, m) for s in settings.shapes for t in settings.transforms for m in settings.modes]

    sys.stderr.write(f"bench ({args.size}): {len(cases)} cases x {len(CONTENDERS)} contenders, "
                     f"{settings.warmup} warm-up + {settings.reps} timed repetitions, "
                     f"{env['threads']} threads on {env['device']}\n")
    # Other work on the machine shows up as noise and as a bias against whichever contender happens
    # to be running; say so up front, and keep the load per case in the JSON for the reader.
    if env["loadavg_at_start"] > 0.5 * (os.cpu_count() or 1):
        sys.stderr.write(f"bench: warning: load average {env['loadavg_at_start']:.2f} on "
                         f"{os.cpu_count()} CPUs before starting; timings will be noisy\n")
    progress = Progress(len(cases))
    results = []
    for i, (shape, transform, mode) in enumerate(cases):
        label = f"{shape.describe()} | {transform} | {mode.name}"
        progress.update(i, label)
        try:
            samples = run_case(shape, transform, mode, settings, device)
        except GuardError as error:
            sys.stderr.write("\n")
            sys.exit(f"bench: ABORTED, wrong result in case [{label}]: {error}. "
                     "Timings of a kernel that computes the wrong thing mean nothing; fix it first.")
        base = statistics.median(samples[BASELINE])
        for name, values in samples.items():
            stats = summarise(values)
            results.append({
                "shape": shape.describe(),
                "shape_params": dataclasses.asdict(shape),
                "transform": transform,
                "mode": mode.name,
                "contender": name,
                **stats,
                "n": len(values),
                "loadavg_after": os.getloadavg()[0],
                "ratio_to_plain": stats["median_ms"] / base,
                "samples_ms": values,
            })
    wall = progress.finish()

    budget = "" if settings.case_budget_s is None else f" (at most {settings.case_budget_s:g}s a case)"
    print(f"fusedtie benchmark ({args.size}): torch {env['torch']}, {env['device']}, "
          f"{env['threads']} threads, {env['cpu']}; {settings.warmup} warm-up + "
          f"{settings.reps} timed repetitions{budget}, contenders interleaved\n")
    print(markdown_table(results))
    # dict.fromkeys: unique cases in table order (every contender of a case has the same n)
    cut = list(dict.fromkeys((r["shape"], r["transform"], r["mode"], r["n"]) for r in results
                             if r["n"] < settings.reps))
    if cut:
        print("\nCut short by the time budget (repetitions done): "
              + "; ".join(f"{s} {t} {m}: {n}" for s, t, m, n in cut))

    if args.json:
        out = {
            "environment": env,
            "settings": {"size": args.size, "warmup": settings.warmup, "reps": settings.reps,
                         "case_budget_s": settings.case_budget_s, "transforms": settings.transforms,
                         "modes": [m.name for m in settings.modes],
                         "contenders": [c.name for c in CONTENDERS], "baseline": BASELINE,
                         "wall_seconds": wall},
            "results": results,
        }
        parent = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(parent, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        sys.stderr.write(f"wrote {args.json}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
