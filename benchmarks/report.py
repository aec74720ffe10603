"""What a run reports: the JSON records, the machine's description, the Markdown tables on stdout
and the JSON file."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
from typing import Optional

import torch

import bench_targets
import fusedtie
from cases import COMPILE_SOME_SHAPES, DECODER, Case, dtype_name
from contenders import BASELINE, BASELINE_BY_KIND, COMPILED
from guard import GUARD_REFERENCE_BY_KIND, TOLERANCES
from harness import MIN_REPS, CaseResult, Settings


def summarise(samples: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "iqr_pct": 100.0 * (q3 - q1) / median}


def case_records(case: Case, result: CaseResult) -> list[dict]:
    """One JSON record per contender of a case."""
    records = []
    base = result.baseline_ms
    for name, values in result.samples_ms.items():
        stats = summarise(values)
        record = {
            "shape": case.shape.describe(),
            "shape_name": case.shape.name,
            "shape_params": dataclasses.asdict(case.shape),
            "kind": case.shape.kind,
            "transform": case.transform,
            "dtype": dtype_name(case.dtype),
            "mode": case.mode.name,
            "contender": name,
            "fusedtie_cpu_algorithm": result.algorithm,
            **stats,
            "n": len(values),
            "ratio_to_plain": stats["median_ms"] / base,
            "first_call_ms": result.first_call_ms[name],
            "peak_mib": result.peak_mib[name],
            "loadavg_after": os.getloadavg()[0],
            "samples_ms": values,
        }
        if name == COMPILED:
            record["compile_s"] = result.first_call_ms[name] / 1e3
        records.append(record)
    return records


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
        "fusedtie_has_cached": callable(getattr(fusedtie, "cached", None)),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_info": fusedtie.cpu_info(),
        "mkl_env": {k: os.environ[k] for k in ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR") if k in os.environ},
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_at_start": os.getloadavg()[0],
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _row_key(r: dict) -> tuple:
    return (r["shape"], r["transform"], r["dtype"], r["mode"])


def group_by_case(results: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{(shape, transform, dtype, mode): {contender: record}}, in run order."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in results:
        cases.setdefault(_row_key(r), {})[r["contender"]] = r
    return cases


def several_dtypes(cases: dict[tuple, dict[str, dict]]) -> bool:
    """Whether group_by_case's cases span several dtypes (only then is the dtype shown)."""
    return len({k[2] for k in cases}) > 1


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _case_cells(key: tuple, with_dtype: bool) -> list[str]:
    shape, transform, dtype, mode = key
    return [shape, transform] + ([dtype] if with_dtype else []) + [mode]


def ratio_table(results: list[dict], contenders: list[str]) -> str:
    """plain's median and IQR, then every other contender's ratio to plain, one row per case."""
    cases = group_by_case(results)
    with_dtype = several_dtypes(cases)
    others = [c for c in contenders if c != BASELINE]
    with_algorithm = any(r.get("fusedtie_cpu_algorithm") for r in results)
    header = (
        ["shape", "f"]
        + (["dtype"] if with_dtype else [])
        + ["mode"]
        + (["algorithm"] if with_algorithm else [])
        + ["plain ms", "IQR %"]
        + others
    )
    align = ["---"] * (3 + with_dtype + with_algorithm) + ["---:"] * (2 + len(others))
    rows = []
    for key, by_name in cases.items():
        base = by_name[BASELINE]
        cells = _case_cells(key, with_dtype) + ([base["fusedtie_cpu_algorithm"] or ""] if with_algorithm else [])
        cells += [f"{base['median_ms']:.3f}", f"{base['iqr_pct']:.0f}"]
        cells += [
            f"{by_name[c]['ratio_to_plain']:.2f}" + (" !" if bench_targets.flagged(c, by_name) else "")
            if c in by_name
            else ""
            for c in others
        ]
        rows.append(cells)
    return _table(header, align, rows)


def target_report(results: list[dict]) -> tuple[list[str], list]:
    """The closing lines (worst ratios) and every missed target (bench_targets)."""
    cases = group_by_case(results)
    with_dtype = several_dtypes(cases)
    described = {" | ".join(_case_cells(key, with_dtype)): by_name for key, by_name in cases.items()}
    return bench_targets.summary(described)


def _mib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def memory_table(results: list[dict], contenders: list[str]) -> str:
    cases = group_by_case(results)
    with_dtype = several_dtypes(cases)
    header = ["shape", "f"] + (["dtype"] if with_dtype else []) + ["mode"] + contenders
    align = ["---"] * (3 + with_dtype) + ["---:"] * len(contenders)
    rows = []
    for key, by_name in cases.items():
        cells = _case_cells(key, with_dtype)
        cells += [_mib(by_name[c]["peak_mib"]) if c in by_name else "" for c in contenders]
        rows.append(cells)
    return _table(header, align, rows)


def compile_times(results: list[dict]) -> list[dict]:
    return [
        {
            "shape": r["shape"],
            "transform": r["transform"],
            "dtype": r["dtype"],
            "mode": r["mode"],
            "compile_s": r["compile_s"],
        }
        for r in results
        if r["contender"] == COMPILED
    ]


def compile_summary(times: list[dict], compile_on: str) -> str:
    if not times:
        return f"compile: not run (--compile {compile_on})"
    where = "" if compile_on == "all" else f" (--compile some: only {', '.join(COMPILE_SOME_SHAPES)})"
    first = times[0]["compile_s"]
    text = (
        f"compile: first call (dynamo + inductor), {len(times)} cases{where}, "
        f"{sum(t['compile_s'] for t in times):.0f} s in all: the run's first compilation "
        f"{first:.1f} s (includes inductor's start-up)"
    )
    later = sorted(t["compile_s"] for t in times[1:])
    if later:
        text += f", the others {statistics.median(later):.1f} s median ({later[0]:.1f}-{later[-1]:.1f} s)"
    return text


def print_report(
    args: argparse.Namespace, settings: Settings, env: dict, results: list[dict], skipped: dict[str, str]
) -> None:
    ran = [c.name for c in settings.contenders if any(r["contender"] == c.name for r in results)]
    budget = "" if settings.case_budget_s is None else f" (at most {settings.case_budget_s:g}s a case"
    kinds = list(dict.fromkeys(r["kind"] for r in results))
    caps = settings.kind_case_budget_s
    if budget:
        budget += "".join(f", {caps[k]:g}s a {k} case" for k in kinds if k in caps)
    if settings.run_target_s is not None:
        budget += f", less when behind the run's {settings.run_target_s:g}s target"
    budget += ")" if budget else ""
    info = env["cpu_info"]
    cpu = f"{info['vendor'] or 'unknown vendor'} {env['cpu']}, BLAS {info['blas']}" + "".join(
        f", {k}={v}" for k, v in env["mkl_env"].items()
    )
    print(
        f"fusedtie benchmark ({args.size}): torch {env['torch']}, {env['device']}, "
        f"{env['threads']} threads, {env.get('gpu') or cpu}; {settings.warmup} warm-up + "
        f"{settings.reps} timed repetitions{budget}, contenders interleaved; fusedtie CPU conv "
        f"algorithm: {args.cpu_algorithm}; CUDA conv algorithm: {args.cuda_algorithm}\n"
    )
    for kind in kinds:
        print(f"Baseline (plain) of the {kind} cases: {BASELINE_BY_KIND[kind]}.")
    if env["device"] == "cpu":
        print(f"fusedtie's GEMM path under auto: {'yes' if info['gemm_under_auto'] else 'no'} ({info['reason']}).")
    print(
        "\nTime: plain's median (ms) and IQR, and every contender's median / plain's median "
        "(algorithm: the CPU algorithm fusedtie ran, forward/backward where they differ; ! marks a missed target):\n"
    )
    print(ratio_table(results, ran))
    for name, reason in skipped.items():
        print(f"\nSkipped {name}: {reason}.")
    print("\nPeak memory of one step (MiB allocated beyond what existed before it):\n")
    print(memory_table(results, ran))
    print("\n" + compile_summary(compile_times(results), settings.compile_on))
    # plain runs in every case: its n is the case's repetitions.
    reps = sorted(r["n"] for r in results if r["contender"] == BASELINE)
    cut = sum(n < settings.reps for n in reps)
    if cut:
        print(
            f"Timed repetitions per case: {reps[0]}-{reps[-1]}, median {statistics.median(reps):g}; "
            f"{cut} of {len(reps)} cases cut short by the time budget (each case's n and budget "
            "are in the JSON)"
        )
    lines, misses = target_report(results)
    print(f"\nTargets (benchmarks/README.md): {bench_targets.describe()}.")
    for line in lines:
        print(line)
    if misses:
        print(f"ABOVE TARGET in {len(misses)} place(s):")
        for miss in misses:
            print(miss.line())
    else:
        print("every case within its targets")


def write_json(
    path: str,
    args: argparse.Namespace,
    settings: Settings,
    env: dict,
    results: list[dict],
    skipped: dict[str, str],
    wall: float,
) -> None:
    worst, misses = target_report(results)
    out = {
        "environment": env,
        "settings": {
            "size": args.size,
            "warmup": settings.warmup,
            "reps": settings.reps,
            "min_reps": MIN_REPS,
            "case_budget_s": settings.case_budget_s,
            "run_target_s": settings.run_target_s,
            "shapes": [s.describe() for s in settings.shapes],
            "shapes_filter": args.shapes,
            "transforms": settings.transforms,
            "modes": [m.name for m in settings.modes],
            "dtypes": [dtype_name(d) for d in settings.dtypes],
            "contenders": [c.name for c in settings.contenders],
            "baseline": BASELINE,
            "baseline_by_kind": BASELINE_BY_KIND,
            "guard_reference_by_kind": GUARD_REFERENCE_BY_KIND,
            "decoder_case_budget_s": settings.kind_case_budget_s.get(DECODER),
            "kind_case_budget_s": settings.kind_case_budget_s,
            "skipped_contenders": skipped,
            "compile_on": settings.compile_on,
            "cpu_algorithm": args.cpu_algorithm,
            "cuda_algorithm": args.cuda_algorithm,
            "compile_some_shapes": list(COMPILE_SOME_SHAPES),
            "tolerances": {dtype_name(d): {"rtol": t[0], "atol_relative": t[1]} for d, t in TOLERANCES.items()},
            "memory": (
                "cuda max_memory_allocated - memory_allocated before the step"
                if env["device"].startswith("cuda")
                else "CPU: peak running sum of torch.profiler allocation events during one step"
            ),
            "wall_seconds": wall,
        },
        "compile_times": compile_times(results),
        "targets": {"worst": worst, "missed": [dataclasses.asdict(m) for m in misses]},
        "results": results,
    }
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    sys.stderr.write(f"wrote {path}\n")
