#!/usr/bin/env python3
"""Summarise ptxas's verbose output (nvcc -Xptxas=-v) in a build log: per kernel and architecture,
the registers, spill stores/loads, stack frame and static shared memory.

    python scripts/ptxas_summary.py BUILD_LOG [--json STATE.json] [--sources csrc/cuda]

The log is the output of `setup.py build` with FUSEDTIE_PTXAS_VERBOSE=1, as scripts/cuda_build.sh
writes it. ninja (run with -v by torch) prints each finished command, `[i/n] .../nvcc ... -c X.cu
...`, followed by that command's output, so every ptxas line is attributed to its .cu file.

ninja recompiles only the .cu files that changed, so a log may hold some of the kernels only. With
--json, the kernels of every file compiled in this log replace that file's entries in STATE.json,
the other files keep theirs from an earlier build (marked so in the table), and files that no
longer exist under --sources are dropped.

Only the Python standard library; names are demangled with c++filt when it is on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

NINJA_NVCC = re.compile(r"^\[\d+/\d+\] .*\bnvcc\b.* -c (\S+\.cu)\b")
COMPILING = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(\w+)'")
PROPERTIES = re.compile(r"ptxas info\s*: Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"ptxas info\s*: Used (\d+) registers(.*)")
SMEM = re.compile(r"(\d+) bytes smem")
BARRIERS = re.compile(r"used (\d+) barriers")
PTXAS_WARNING = re.compile(r"ptxas (warning|error)\s*:\s*(.*)")


def parse(lines: list[str]) -> tuple[dict, list[str]]:
    """{source: {arch: {mangled kernel: {registers, spill_stores, ...}}}} and ptxas's warnings."""
    result: dict[str, dict[str, dict[str, dict]]] = {}
    warnings: list[str] = []
    source = "?"
    entry = arch = None  # the entry function ptxas is compiling
    props = None  # the function whose "Function properties" block is open
    for raw in lines:
        line = raw.rstrip("\n")
        if m := NINJA_NVCC.match(line):
            source, entry, arch, props = os.path.realpath(m.group(1)), None, None, None
        elif m := COMPILING.search(line):
            entry, arch = m.group(1), m.group(2)
            result.setdefault(source, {}).setdefault(arch, {}).setdefault(entry, {})
        elif m := PROPERTIES.search(line):
            props = m.group(1)
        elif (m := FRAME.search(line)) and props is not None and arch is not None:
            # Also printed for non-inlined device functions that the entry calls; kept for the
            # entry only (a callee's spills show in its caller's stack frame and in ptxas warnings).
            if props == entry:
                result[source][arch][entry].update(
                    stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))
                )
            props = None
        elif (m := USED.search(line)) and entry is not None:
            info = result[source][arch][entry]
            info["registers"] = int(m.group(1))
            if s := SMEM.search(m.group(2)):
                info["smem"] = int(s.group(1))
            if b := BARRIERS.search(m.group(2)):
                info["barriers"] = int(b.group(1))
        elif m := PTXAS_WARNING.search(line):
            warnings.append(f"{os.path.basename(source)}: ptxas {m.group(1)}: {m.group(2)}")
    return result, warnings


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not names or cxxfilt is None:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True).stdout
    readable = out.splitlines()
    if len(readable) != len(names):
        return {n: n for n in names}
    return dict(zip(names, readable))


def short(name: str) -> str:
    """`void ns::kernel<T, 3>(float const*, ...)` -> `ns::kernel<T, 3>`: the parameter list and the
    return type add nothing to tell kernels apart, the template arguments do."""
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name[5:] if name.startswith("void ") else name


GROUP = 32  # the width of one architecture's columns, less its " |"


def table(state: dict, fresh: set[str], root: str) -> str:
    """One block per .cu file: a row per kernel, per architecture its registers, spill stores/loads,
    stack frame and static shared memory (bytes)."""
    archs = sorted({a for per_arch in state.values() for a in per_arch})
    mangled = sorted({k for per_arch in state.values() for kernels in per_arch.values() for k in kernels})
    names = demangle(mangled)
    lines = []
    total = spilling = 0
    for source in sorted(state):
        per_arch = state[source]
        kernels = sorted({k for kernels in per_arch.values() for k in kernels}, key=lambda k: short(names[k]))
        where = os.path.relpath(source, root) if source != "?" else "?"
        note = "" if source in fresh else "  (not recompiled: figures from an earlier build)"
        lines.append(f"{where}: {len(kernels)} kernel{'s' if len(kernels) != 1 else ''}{note}")
        lines.append("  " + "".join(f"{a:^{GROUP}} |" for a in archs))
        lines.append(
            "  " + "".join(f"{'regs':>5}{'spill st/ld':>13}{'stack':>7}{'smem':>7} |" for _ in archs) + " kernel"
        )
        for k in kernels:
            row = "  "
            spills = False
            for a in archs:
                info = per_arch.get(a, {}).get(k)
                if info is None:
                    row += f"{'-':>5}{'-':>13}{'-':>7}{'-':>7} |"
                    continue
                st, ld = info.get("spill_stores", 0), info.get("spill_loads", 0)
                spills |= bool(st or ld)
                row += (
                    f"{info.get('registers', '?'):>5}{f'{st}/{ld}':>13}{info.get('stack', 0):>7}"
                    f"{info.get('smem', 0):>7} |"
                )
            total += 1
            spilling += spills
            lines.append(row + " " + short(names[k]) + ("   <-- SPILLS" if spills else ""))
    lines.append(
        f"{total} kernels over {', '.join(archs) or 'no architecture'}; "
        f"{spilling} with spills" + (" (see above)" if spilling else "")
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--json", help="merged per-file state, kept across incremental builds")
    parser.add_argument("--sources", default="csrc/cuda", help="the .cu folder (drops deleted files)")
    parser.add_argument("--root", default=".", help="paths in the table are relative to this")
    args = parser.parse_args()

    with open(args.log, errors="replace") as f:
        parsed, warnings = parse(f.readlines())
    state: dict = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            state = json.load(f)
    state.update(parsed)
    present = (
        {os.path.realpath(os.path.join(args.sources, n)) for n in os.listdir(args.sources) if n.endswith(".cu")}
        if os.path.isdir(args.sources)
        else set()
    )
    state = {s: v for s, v in state.items() if s in present or s in parsed}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(state, f, indent=1, sort_keys=True)

    if not state:
        print("ptxas: no ptxas output in the log (no kernel compiled, or built without FUSEDTIE_PTXAS_VERBOSE=1)")
        return 0
    print(table(state, set(parsed), os.path.realpath(args.root)))
    for w in warnings:
        print("  " + w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
