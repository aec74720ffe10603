"""Benchmark: y = layer(x, f(W), g(b)) with W trainable, fusedtie against the alternatives.

The command line and the main loop. What is measured, how and why is in benchmarks/README.md;
cases.py, contenders.py, guard.py, harness.py, report.py and plot.py beside this file do the work.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from typing import ContextManager, Iterator, Optional

# Benchmark the working tree this file lives in, not whatever `fusedtie` happens to be installed:
# `python benchmarks/bench.py` puts benchmarks/ on sys.path, not the repository root. benchmarks/ goes
# on it too, for importlib loads (tests/test_benchmark.py), so the modules beside this file import.
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
for _path in (REPO_ROOT, BENCH_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402  (torch first: the extension needs torch's shared libraries loaded)

import fusedtie  # noqa: E402
from cases import COMPILE_SOME_SHAPES, FORUM_TRANSFORMS, FULL, MODES, QUICK, TRANSFORMS, Case  # noqa: E402
from contenders import BASELINE, COMPILED, CONTENDER_NAMES, CONTENDERS, Contender  # noqa: E402
from guard import GuardError, ScopeError  # noqa: E402
from harness import Pacer, Settings, run_case  # noqa: E402
from plot import plot_ratios  # noqa: E402
from report import case_records, environment, print_report, write_json  # noqa: E402


def _split(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="size",
        action="store_const",
        const="quick",
        help="representative subset, about 3 minutes on 2 CPU cores (default)",
    )
    size.add_argument("--full", dest="size", action="store_const", const="full", help="every shape, more repetitions")
    parser.set_defaults(size="quick")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads value (default: torch's own default)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "both"),
        default="auto",
        help="auto: float32 on CPU, float32 and bfloat16 on CUDA",
    )
    parser.add_argument("--json", metavar="PATH", help="also write results and environment here")
    parser.add_argument("--plot", metavar="PNG", help="also draw the ratios to plain here (matplotlib)")
    parser.add_argument("--reps", type=int, help="override the number of timed repetitions")
    parser.add_argument("--warmup", type=int, help="override the number of warm-up repetitions")
    parser.add_argument(
        "--case-budget", type=float, metavar="SECONDS", help="cap on the timed repetitions of one case (0: no cap)"
    )
    parser.add_argument(
        "--compile",
        dest="compile_on",
        choices=("all", "some", "none"),
        help="cases on which torch.compile runs (default: some for --quick, all "
        f"for --full; some = {', '.join(COMPILE_SOME_SHAPES)})",
    )
    parser.add_argument(
        "--cpu-algorithm",
        choices=("auto", "library", "gemm", "brgemm", "depthwise", "linear"),
        default="auto",
        help="force fusedtie's CPU convolution algorithm (fusedtie."
        "use_cpu_conv_algorithm): library = oneDNN, the one plain runs on conv cases; "
        "gemm = im2col + BLAS; depthwise = fusedtie's fused depthwise kernel; linear = fused "
        "skinny GEMMs (linear cases); auto (default) = fusedtie's per-shape choice",
    )
    parser.add_argument(
        "--cuda-algorithm",
        choices=("auto", "autotune", "fused", "library"),
        default="auto",
        help="force fusedtie's CUDA convolution algorithm (fusedtie.use_cuda_conv_algorithm): "
        "fused = fusedtie's fused kernels; library = transform kernel + cuDNN; "
        "autotune = both timed once per shape; auto (default) = the heuristic",
    )
    parser.add_argument(
        "--shapes",
        metavar="SUBSTRING",
        help="only cases whose shape description contains this (e.g. b32, conv5_x, "
        "decoder, linear, conv1d); several, comma-separated: any of them",
    )
    parser.add_argument("--transforms", metavar="LIST", help=f"comma-separated, of {','.join(TRANSFORMS)}")
    parser.add_argument(
        "--contenders", metavar="LIST", help=f"comma-separated, of {','.join(CONTENDER_NAMES)} (plain always runs)"
    )
    parser.add_argument("--modes", metavar="LIST", help=f"comma-separated, of {','.join(m.name for m in MODES)}")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.reps is not None and args.reps < 4:
        parser.error("--reps must be at least 4 (the quartiles need a few samples)")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be non-negative")
    for option, known in (
        ("transforms", TRANSFORMS),
        ("contenders", CONTENDER_NAMES),
        ("modes", [m.name for m in MODES]),
    ):
        chosen = _split(getattr(args, option))
        unknown = [v for v in chosen or [] if v not in known]
        if unknown:
            parser.error(f"--{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
        setattr(args, option, chosen)
    return args


def select_contenders(wanted: Optional[list[str]]) -> tuple[list[Contender], dict[str, str]]:
    """The contenders to run (plain always) and the reasons of those that cannot run here."""
    skipped = {}
    chosen = []
    for c in CONTENDERS:
        if c.name != BASELINE and wanted is not None and c.name not in wanted:
            continue
        reason = c.unavailable()
        if reason:
            skipped[c.name] = reason
            continue
        chosen.append(c)
    return chosen, skipped


def select_dtypes(choice: str, device: torch.device) -> list[torch.dtype]:
    if choice == "auto":
        choice = "both" if device.type == "cuda" else "float32"
    return {"float32": [torch.float32], "bfloat16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16]}[choice]


def make_settings(args: argparse.Namespace, device: torch.device) -> tuple[Settings, dict[str, str]]:
    preset = QUICK if args.size == "quick" else FULL
    shapes = preset["shapes"](device)
    if args.shapes:  # comma-separated alternatives (no description contains a comma)
        wanted = _split(args.shapes)
        shapes = [s for s in shapes if any(w in s.describe() for w in wanted)]
        if not shapes:
            sys.exit(f"bench: --shapes {args.shapes!r} matches no shape of --{args.size}")
    contenders, skipped = select_contenders(args.contenders)
    settings = Settings(
        shapes=shapes,
        transforms=[t for t in (args.transforms or TRANSFORMS) if t in FORUM_TRANSFORMS],
        modes=[m for m in MODES if args.modes is None or m.name in args.modes],
        contenders=contenders,
        dtypes=select_dtypes(args.dtype, device),
        compile_on=args.compile_on or preset["compile_on"],
        warmup=preset["warmup"] if args.warmup is None else args.warmup,
        reps=preset["reps"] if args.reps is None else args.reps,
        case_budget_s=preset["case_budget_s"] if args.case_budget is None else (args.case_budget or None),
        # An explicit --case-budget is taken as it is.
        run_target_s=preset["run_target_s"] if args.case_budget is None else None,
        kind_case_budget_s=preset["kind_case_budget_s"] if args.case_budget is None else {},
    )
    return settings, skipped


def check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench: --device cuda, but torch sees no CUDA device")
        if not getattr(fusedtie, "cuda_compiled", False):
            sys.exit("bench: --device cuda, but the fusedtie extension was built without CUDA")


def announce(
    args: argparse.Namespace, settings: Settings, cases: list[Case], env: dict, skipped: dict[str, str]
) -> None:
    sys.stderr.write(
        f"bench ({args.size}): {len(cases)} cases, contenders "
        f"{', '.join(c.name for c in settings.contenders)}; {settings.warmup} warm-up + "
        f"{settings.reps} timed repetitions, {env['threads']} threads on {env['device']}; "
        f"--compile {settings.compile_on}; --cpu-algorithm {args.cpu_algorithm}; "
        f"--cuda-algorithm {args.cuda_algorithm}\n"
    )
    for name, reason in skipped.items():
        sys.stderr.write(f"bench: note: skipping {name}: {reason}\n")
    # Other work on the machine shows up as noise and as a bias against whichever contender happens
    # to be running; say so up front, and keep the load per case in the JSON for the reader.
    if env["loadavg_at_start"] > 0.5 * (os.cpu_count() or 1):
        sys.stderr.write(
            f"bench: warning: load average {env['loadavg_at_start']:.2f} on "
            f"{os.cpu_count()} CPUs before starting; timings will be noisy\n"
        )


class Progress:
    """One line per case on stderr, with an ETA; redrawn in place when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, label: str) -> None:
        elapsed = time.perf_counter() - self.start
        width = 20
        filled = width * done // self.total
        eta = f" ETA {elapsed / done * (self.total - done):4.0f}s" if done else ""
        text = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {elapsed:5.1f}s{eta} {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def finish(self) -> float:
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(("\r\033[K" if self.tty else "") + f"done: {self.total} cases in {elapsed:.1f}s\n")
        return elapsed


def run_all(cases: list[Case], settings: Settings, device: torch.device) -> tuple[list[dict], float]:
    progress = Progress(len(cases))
    pacer = Pacer(
        [settings.case_cap(case.shape) for case in cases],
        settings.run_target_s,
        [any(c.name == COMPILED for c in settings.contenders_for(case.shape, case.mode)) for case in cases],
    )
    with_dtype = len(settings.dtypes) > 1
    results = []
    for i, case in enumerate(cases):
        label = case.describe(with_dtype)
        progress.update(i, label)
        started = time.perf_counter()
        budget = pacer.budget(i)
        try:
            result = run_case(case, settings, budget, device)
        except GuardError as error:
            sys.stderr.write("\n")
            sys.exit(
                f"bench: ABORTED, wrong result in case [{label}]: {error}. "
                "Timings of a kernel that computes the wrong thing mean nothing; fix it first."
            )
        except ScopeError as error:
            sys.stderr.write("\n")
            sys.exit(f"bench: ABORTED in case [{label}]: {error}.")
        pacer.record(time.perf_counter() - started, result)
        for record in case_records(case, result):
            record["case_budget_s"] = budget
            record["device"] = device.type
            results.append(record)
    return results, progress.finish()


@contextlib.contextmanager
def private_inductor_cache(compiles: bool) -> Iterator[str]:
    """An empty inductor cache directory for this run, unless the user chose one (or none compiles).

    Yields the directory used, for the JSON.
    """
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not compiles or chosen is not None:
        yield chosen or "(not used)"
        return
    with tempfile.TemporaryDirectory(prefix="bench-inductor-", ignore_cleanup_errors=True) as path:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        try:
            yield f"private, fresh: {path}"
        finally:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]


def forced_algorithm(device: str, name: str) -> ContextManager:
    """fusedtie.use_{device}_conv_algorithm(name) for the whole run (auto: fusedtie's own default)."""
    use = getattr(fusedtie, f"use_{device}_conv_algorithm", None)
    if use is None:
        if name != "auto":
            sys.exit(
                f"bench: --{device}-algorithm {name}, but this build of fusedtie has no use_{device}_conv_algorithm"
            )
        return contextlib.nullcontext()
    return use(name)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    check_device(device)
    settings, skipped = make_settings(args, device)
    env = environment(device)
    cases = [
        Case(s, t, d, m)
        for s in settings.shapes
        for t in settings.transforms
        for d in settings.dtypes
        for m in settings.modes
    ]
    announce(args, settings, cases, env, skipped)
    compiles = any(c.name == COMPILED for c in settings.contenders) and settings.compile_on != "none"
    with (
        private_inductor_cache(compiles) as inductor_cache,
        forced_algorithm("cpu", args.cpu_algorithm),
        forced_algorithm("cuda", args.cuda_algorithm),
    ):
        env["inductor_cache_dir"] = inductor_cache
        results, wall = run_all(cases, settings, device)
    print_report(args, settings, env, results, skipped)
    if args.json:
        write_json(args.json, args, settings, env, results, skipped, wall)
    if args.plot:
        plot_ratios(results, [c.name for c in settings.contenders], env, args.plot)
        sys.stderr.write(f"wrote {args.plot}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
