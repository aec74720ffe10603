"""What this fusedtie is and runs on, and a self-check of its kernels: ``python -m fusedtie``.

``build_info``, ``cpu_capability`` and ``clear_cuda_autotune_cache`` are public (``fusedtie.*``).
``main`` is the command: it prints the environment (for a bug report), then checks both operators'
forward and gradients against ``F.conv2d`` / ``F.conv_transpose2d`` on f(W) computed in float64, on
the CPU under each CPU algorithm and on every visible GPU under each CUDA algorithm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import mmap
import os
import platform
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _build
from ._library import LIB
from ._user_build import cache_root
from ._version import __version__
from .ops import (
    cpu_conv_algorithm_for,
    cpu_info,
    tied_conv2d,
    tied_conv_transpose2d,
    use_cpu_conv_algorithm,
    use_cuda_conv_algorithm,
)
from .transforms import Transform, transform_table

# Exit statuses of `python -m fusedtie` (argparse uses 2 for a bad command line). A build that cannot
# load fails in `import fusedtie`, before this module runs: Python prints the loader's ImportError
# and exits with 1.
EXIT_PASS = 0
EXIT_MISMATCH = 1


def build_info() -> dict:
    """What was built and how it was loaded; cheap (no GPU, no compiler), never raises for a missing fact.

    Returns:
        A dict with ``version`` (fusedtie's), ``torch_version`` and ``torch_cuda_version`` (the torch
        the extension runs under; the latter None for a CPU torch), ``loaded`` (``"prebuilt"``: the
        installed ``fusedtie._C``, or ``"jit"``: compiled on first import) and ``loaded_why``,
        ``path`` (the extension's file), ``cuda`` (whether it has the CUDA kernels), ``cuda_archs``
        (for a CUDA build the GPU code in its fatbinary, e.g. ``["sm_80", "sm_90", "compute_90"]``,
        ``sm_*`` being machine code and ``compute_*`` PTX; ``[]`` for a CPU-only build; None where it
        cannot be read), ``jit_cache_dir`` (the JIT build's folder, for a prebuilt load the one a JIT
        build would use), ``user_transform_cache_dir`` (``Transform.from_expression``'s libraries)
        and ``cpu_capability`` (see ``cpu_capability()``).

    Examples:
        >>> info = fusedtie.build_info()
        >>> info["loaded"], info["cuda"], info["cuda_archs"]  # an installed CPU-only build
        ('prebuilt', False, [])
    """
    path = getattr(LIB, "__file__", None)
    cuda = bool(LIB.cuda_compiled)
    how = _build.LOADED.get("how") or ("prebuilt" if LIB.__name__ == "fusedtie._C" else "jit")
    if how == "jit" and path:
        jit_cache_dir = os.path.dirname(path)
    else:
        jit_cache_dir = _build._cache_dir(cuda)
    info = {
        "version": __version__,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "loaded": how,
        "loaded_why": _build.LOADED.get("why", ""),
        "path": path,
        "cuda": cuda,
        "cuda_archs": (_compiled_cuda_archs(path) if path else None) if cuda else [],
        "jit_cache_dir": jit_cache_dir,
        "user_transform_cache_dir": cache_root(),
        "cpu_capability": cpu_capability(),
    }
    if "cuda" in _build.LOADED:
        info["jit_cuda_decision"] = _build.LOADED["cuda"]
    return info


def cpu_capability() -> str:
    """The instruction set of the CPU transform passes (f and f' over a tensor) this process runs.

    The widest one both the extension was compiled with and ATen chose for this CPU (ATen's choice
    can be capped with the ``ATEN_CPU_CAPABILITY`` environment variable, e.g. ``default``).

    Returns:
        ``"DEFAULT"`` (portable code), ``"AVX2"`` or ``"AVX512"``.

    Examples:
        >>> fusedtie.cpu_capability()  # on a CPU with AVX-512
        'AVX512'
    """
    return str(LIB.cpu_transform_capability())


def clear_cuda_autotune_cache() -> None:
    """Forget every choice that ``use_cuda_conv_algorithm("autotune")`` has measured in this process.

    The next call of each shape times both algorithms again (e.g. after changing clocks, or to
    benchmark the first call). Harmless in a build without CUDA, where the cache is always empty.

    Examples:
        >>> layer = fusedtie.FusedTiedConv2d(torch.nn.Conv2d(8, 8, 3).cuda(), "square")
        >>> x = torch.randn(1, 8, 16, 16, device="cuda")
        >>> with fusedtie.use_cuda_conv_algorithm("autotune"):
        ...     y = layer(x)  # times fused and library once for this shape
        >>> fusedtie.clear_cuda_autotune_cache()  # the next autotuned call measures again
    """
    LIB.clear_cuda_autotune_cache()


# --- the GPU code in a CUDA build: read from the fatbinary, no GPU or CUDA tool needed -------------

_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)  # the header of each fatbinary in the .nv_fatbin section
_FATBIN_PTX, _FATBIN_ELF = 1, 2


def _compiled_cuda_archs(path: str) -> Optional[list[str]]:
    """The architectures of the GPU code in the ELF shared object at ``path``, or None if unreadable.

    Reads the entry headers of each fatbinary in the ``.nv_fatbin`` section (what ``cuobjdump
    --list-elf --list-ptx`` lists): kind (1 PTX, 2 ELF) and the SM version at byte 28. Layout
    checked against nvcc 13.0's output for ``-gencode`` sm_80, sm_90 and compute_90."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            section = _elf_section(data, b".nv_fatbin")
            if section is None:
                return None
            start, end = section
            found: set[tuple[int, int]] = set()
            pos = data.find(_FATBIN_MAGIC, start, end)
            while pos >= 0:
                _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
                entry, stop = pos + header_size, min(pos + header_size + fat_size, end)
                while entry + 32 <= stop:
                    kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
                    (arch,) = struct.unpack_from("<I", data, entry + 28)
                    if kind in (_FATBIN_PTX, _FATBIN_ELF) and 10 <= arch < 10000:
                        found.add((arch, kind))
                    if entry_header == 0:
                        break
                    entry += entry_header + payload
                pos = data.find(_FATBIN_MAGIC, max(stop, pos + 4), end)
    except (OSError, ValueError, struct.error):
        return None
    if not found:
        return None
    return [f"{'sm' if kind == _FATBIN_ELF else 'compute'}_{arch}" for arch, kind in sorted(found, key=_arch_order)]


def _arch_order(item: tuple[int, int]) -> tuple[int, int]:
    arch, kind = item
    return (arch, 0 if kind == _FATBIN_ELF else 1)  # sm_90 before compute_90


def _elf_section(data: mmap.mmap, name: bytes) -> Optional[tuple[int, int]]:
    """(start, end) file offsets of the section ``name`` of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or shstrndx >= shnum:
        return None

    def header(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        (name_offset,) = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 24)
        return name_offset, offset, size

    _, names, names_size = header(shstrndx)
    for index in range(shnum):
        name_offset, offset, size = header(index)
        if name_offset < names_size:
            start = names + name_offset
            if data[start : data.find(b"\0", start, names + names_size)] == name:
                return offset, offset + size
    return None


# --- the environment ----------------------------------------------------------------------------


def environment() -> dict:
    """Everything ``python -m fusedtie`` reports before its self-check, as one JSON-ready dict."""
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(
                {
                    "device": f"cuda:{index}",
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    return {
        "fusedtie": __version__,
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": _cudnn_version(),
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
        "build": build_info(),
        "cpu": {**cpu_info(), "algorithm_setting": LIB.cpu_conv_algorithm()},
        "cuda_algorithm_setting": LIB.cuda_conv_algorithm(),
        "transforms": [{"name": row["name"], "uses_alpha": row["uses_alpha"]} for row in transform_table()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": gpus,
    }


def _cudnn_version() -> Optional[int]:
    if torch.version.cuda is None:
        return None
    try:  # it loads cuDNN, which raises on a mismatched install: a fact for the report, not a crash
        return torch.backends.cudnn.version()
    except Exception:
        return None


def format_environment(env: dict) -> str:
    """The environment as aligned ``key  value`` lines, to paste into a bug report."""
    torch_info, build, cpu = env["torch"], env["build"], env["cpu"]
    if build["cuda"]:
        archs = build["cuda_archs"]
        kernels = f"CPU + CUDA ({', '.join(archs) if archs else 'compiled architectures unknown'})"
    else:
        kernels = "CPU only (no CUDA kernels)"
    torch_build = f"CUDA {torch_info['cuda']}, cuDNN {torch_info['cudnn']}" if torch_info["cuda"] else "CPU build"
    loaded = build["loaded"] + (f" ({build['loaded_why']})" if build["loaded_why"] else "")
    if "jit_cuda_decision" in build:
        loaded += f"; CUDA kernels: {build['jit_cuda_decision']}"
    gemm = "yes" if cpu["gemm_under_auto"] else "no"
    brgemm = "oneDNN micro-kernel" if cpu["brgemm_micro_kernel"] else "one BLAS call per tile (no micro-kernel)"
    transforms = ", ".join(t["name"] + ("(alpha)" if t["uses_alpha"] else "") for t in env["transforms"])
    if env["gpus"]:
        gpus = [f"{g['device']}: {g['name']}, capability {g['capability']}, {g['memory_gib']} GiB" for g in env["gpus"]]
    else:
        gpus = ["none visible" + ("" if torch_info["cuda"] else " (torch is a CPU build)")]
    if env["cuda_visible_devices"] is not None:
        gpus[0] += f" (CUDA_VISIBLE_DEVICES={env['cuda_visible_devices']})"
    rows = [
        ("fusedtie", env["fusedtie"]),
        ("torch", f"{torch_info['version']} ({torch_build}), {torch_info['threads']} threads"),
        ("python", f"{env['python']['version']} ({env['python']['implementation']}) {env['python']['executable']}"),
        ("platform", env["platform"]),
        ("build", loaded),
        ("  path", build["path"]),
        ("  kernels", kernels),
        ("  jit cache", build["jit_cache_dir"] + (" (used by a JIT build only)" if build["loaded"] != "jit" else "")),
        ("  user transforms", build["user_transform_cache_dir"]),
        ("cpu", f"{cpu['vendor']}, {cpu['model']}"),
        ("  capability", f"{cpu['transform_capability']} (fusedtie's passes), {torch_info['cpu_capability']} (ATen)"),
        ("  blas", cpu["blas"]),
        ("  gemm under auto", f"{gemm}: {cpu['reason']}"),
        ("  brgemm path", brgemm),
        ("algorithms", f"cpu {cpu['algorithm_setting']}, cuda {env['cuda_algorithm_setting']} (settings)"),
        ("transforms", transforms),
        ("gpus", gpus[0]),
        *(("", gpu) for gpu in gpus[1:]),
    ]
    return "\n".join(f"{key:<18} {value}".rstrip() for key, value in rows)


# --- the self-check -------------------------------------------------------------------------------

# f in float64 (and in the checked dtype, for PyTorch's own path), by name, from torch's own ops.
# tests/reference.py holds the suite's own copy on purpose: the installed package cannot import the
# tests, and the suite's oracle must not depend on the package it checks.
_REFERENCE_F: dict[str, Callable[[Tensor, float], Tensor]] = {
    "identity": lambda w, a: w,
    "square": lambda w, a: w * w,
    "abs": lambda w, a: w.abs(),
    "neg": lambda w, a: -w,
    "scale": lambda w, a: a * w,
    "exp": lambda w, a: torch.exp(w),
    "sigmoid": lambda w, a: torch.sigmoid(w),
    "tanh": lambda w, a: torch.tanh(w),
    "softplus": lambda w, a: F.softplus(w),
    "relu": lambda w, a: torch.relu(w),
}
# The transforms checked: the trivial one, a polynomial, a saturating one and a scaled one.
_CHECKED = (("identity", None), ("square", None), ("tanh", None), ("scale", 1.5))

# The error allowed against the float64 reference: the larger of this floor and 3x the error of
# PyTorch's own path in the same dtype on the same device (F.conv2d on f(W) computed in that dtype),
# so TF32 and 16-bit types are held to what PyTorch itself achieves there.
_FLOOR = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
_TORCH_FACTOR = 3.0

_QUANTITIES = ("out", "d_input", "d_weight", "d_bias")


@dataclass(frozen=True)
class _Case:
    """A convolution's shapes and geometry; weight in the operator's own layout."""

    input: tuple[int, ...]
    weight: tuple[int, ...]
    bias: int
    kwargs: dict


# conv2d: weight (out, in/groups, kH, kW); conv_transpose2d: weight (in, out/groups, kH, kW). 8 and 12
# channels are multiples of 8 so that 16-bit CUDA calls reach the tensor-core kernels.
_DENSE = _Case((2, 8, 6, 7), (12, 8, 3, 3), 12, {"stride": 1, "padding": 1})
_DEPTHWISE = _Case((2, 8, 10, 10), (8, 1, 3, 3), 8, {"stride": 1, "padding": 1, "groups": 8})
_TRANSPOSED = _Case((2, 12, 4, 5), (12, 8, 3, 3), 8, {"stride": 2, "padding": 1, "output_padding": 1})

# (algorithm, case) for tied_conv2d on the CPU: each forced algorithm on a case it applies to
# (gemm and brgemm: groups 1, NCHW; brgemm float32 only; depthwise: groups == channels).
_CPU_PLAN = (("auto", _DENSE), ("library", _DENSE), ("gemm", _DENSE), ("brgemm", _DENSE), ("depthwise", _DEPTHWISE))
_CPU_DTYPES = (torch.float32,)
_CUDA_ALGORITHMS = ("fused", "library")
_CUDA_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class CheckResult:
    """One check: an operator's forward and gradients on one device, algorithm, transform and dtype.

    ``errors`` maps ``out``, ``d_input``, ``d_weight`` and ``d_bias`` to max|got - ref| / max|ref|
    against the float64 reference; ``status`` is ``ok``, ``FAIL`` (``detail`` names the quantities
    over ``tolerance``), ``ERROR`` (the call raised; ``detail`` says what) or ``skip`` (the
    algorithm does not apply here; ``detail`` says why)."""

    device: str
    op: str
    algorithm: str
    ran: str
    transform: str
    dtype: str
    errors: dict
    tolerance: float
    status: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "ERROR")

    @property
    def name(self) -> str:
        return f"{self.device} {self.op} {self.algorithm} {self.transform} {self.dtype}"


def _relative_error(got: Optional[Tensor], ref: Tensor) -> float:
    if got is None or tuple(got.shape) != tuple(ref.shape):
        return math.inf
    scale = ref.abs().max().item() if ref.numel() else 0.0
    error = (got.detach().to("cpu", torch.float64) - ref).abs().max().item() if ref.numel() else 0.0
    return error / scale if scale > 0 else error


def _run(fn: Callable, tensors: Sequence[Tensor], grad_output: Tensor) -> tuple[Tensor, list]:
    """fn's output and the gradients of <output, grad_output> with respect to ``tensors`` (as leaves)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_output.to(out.device, out.dtype), allow_unused=True)
    return out, list(grads)


def _check_one(op: str, case: _Case, transform: Transform, device: str, dtype: torch.dtype) -> tuple[dict, float]:
    """(errors, tolerance) of fusedtie's op against the float64 reference, on one case."""
    gen = torch.Generator().manual_seed(0)
    # The values are drawn in float64 and rounded to dtype once: the reference sees exactly the
    # tested values, so the input's own rounding is no part of the error.
    x = torch.randn(case.input, generator=gen, dtype=torch.float64).to(dtype)
    w = (0.5 * torch.randn(case.weight, generator=gen, dtype=torch.float64)).to(dtype)
    b = (0.5 * torch.randn(case.bias, generator=gen, dtype=torch.float64)).to(dtype)
    f = _REFERENCE_F[transform.name]
    alpha = transform.op_alpha
    kw = case.kwargs
    if op == "tied_conv2d":

        def plain(x, w, b):
            return F.conv2d(x, f(w, alpha), f(b, alpha), **kw)  # bias_transform = transform

        def fused(x, w, b):
            return tied_conv2d(x, w, b, transform=transform, bias_transform=transform, **kw)
    else:

        def plain(x, w, b):
            return F.conv_transpose2d(x, f(w, alpha), b, **kw)

        def fused(x, w, b):
            return tied_conv_transpose2d(x, w, b, transform=transform, **kw)

    exact = [t.double() for t in (x, w, b)]
    with torch.no_grad():
        out_shape = plain(*exact).shape
    grad_output = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype)
    ref_out, ref_grads = _run(plain, exact, grad_output.double())
    on_device = [t.to(device) for t in (x, w, b)]
    got_out, got_grads = _run(fused, on_device, grad_output)
    torch_out, torch_grads = _run(plain, on_device, grad_output)
    refs = [ref_out, *ref_grads]
    errors = {q: _relative_error(g, r) for q, g, r in zip(_QUANTITIES, [got_out, *got_grads], refs)}
    torch_errors = [_relative_error(g, r) for g, r in zip([torch_out, *torch_grads], refs)]
    return errors, max(_FLOOR[dtype], _TORCH_FACTOR * max(torch_errors))


def _plan(devices: Sequence[str]) -> Iterator[tuple[str, str, str, _Case, Callable, torch.dtype]]:
    """(device, op, algorithm, case, setting context, dtype) for every check, in print order."""
    for device in devices:
        if device == "cpu":
            for dtype in _CPU_DTYPES:
                for algorithm, case in _CPU_PLAN:
                    yield device, "tied_conv2d", algorithm, case, lambda a=algorithm: use_cpu_conv_algorithm(a), dtype
                # The CPU transposed convolution has one algorithm (f(W), oneDNN, the chain rule).
                yield device, "tied_conv_transpose2d", "library", _TRANSPOSED, contextlib.nullcontext, dtype
        else:
            for dtype in _CUDA_DTYPES:
                for algorithm in _CUDA_ALGORITHMS:
                    for op, case in (("tied_conv2d", _DENSE), ("tied_conv_transpose2d", _TRANSPOSED)):
                        yield device, op, algorithm, case, lambda a=algorithm: use_cuda_conv_algorithm(a), dtype


def checked_transforms() -> list[Transform]:
    """The transforms the self-check runs: identity, square, tanh and scale(1.5), where built in."""
    built_in = {row["name"]: row for row in transform_table()}
    return [
        Transform(name, alpha if built_in[name]["uses_alpha"] else None)
        for name, alpha in _CHECKED
        if name in built_in and name in _REFERENCE_F
    ]


def self_check(
    devices: Optional[Sequence[str]] = None, report: Optional[Callable[[CheckResult], None]] = None
) -> list[CheckResult]:
    """Check both operators' forward and input, weight and bias gradients against PyTorch in float64.

    Args:
        devices: ``"cpu"`` and ``"cuda:N"`` names; by default the CPU and, in a CUDA build, every
            visible GPU.
        report: called with each result as soon as it is known (so a crash shows the last check
            that ran).

    Returns:
        One ``CheckResult`` per (device, operator, algorithm, transform, dtype).

    Examples:
        >>> results = fusedtie.info.self_check(["cpu"])
        >>> all(not r.failed for r in results)
        True
    """
    if devices is None:
        devices = ["cpu"]
        if LIB.cuda_compiled and torch.cuda.is_available():
            devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    results = []
    for device, op, algorithm, case, setting, dtype in _plan(devices):
        for transform in checked_transforms():
            dtype_name = str(dtype).replace("torch.", "")
            result = CheckResult(device, op, algorithm, algorithm, str(transform), dtype_name, {}, 0.0, "ok")
            try:
                on_gpu = torch.cuda.device(device) if device != "cpu" else contextlib.nullcontext()
                with setting(), on_gpu:
                    if device == "cpu" and op == "tied_conv2d":
                        result.ran = _cpu_algorithm_ran(case, transform, dtype)
                        forced = algorithm != "auto"
                        if forced and result.ran != algorithm:
                            result.status = "skip"
                            result.detail = f"{algorithm} does not apply to this case (runs {result.ran})"
                    if result.status != "skip":
                        result.errors, result.tolerance = _check_one(op, case, transform, device, dtype)
                        over = [q for q, e in result.errors.items() if not e <= result.tolerance]  # NaN is over
                        if over:
                            result.status, result.detail = "FAIL", ", ".join(over)
            except Exception as error:  # a check that raises is a failed check, and the rest still run
                result.status = "ERROR"
                first_line = (str(error).strip().splitlines() or [""])[0]
                result.detail = f"{type(error).__name__}: {first_line}"
            results.append(result)
            if report is not None:
                report(result)
    return results


def _cpu_algorithm_ran(case: _Case, transform, dtype: torch.dtype) -> str:
    """What the CPU forward and backward run for ``case`` and f under the current setting ("a" or "a/b")."""
    x, w = torch.empty(case.input, dtype=dtype), torch.empty(case.weight, dtype=dtype)
    kw = dict(case.kwargs, transform=transform)
    forward = cpu_conv_algorithm_for(x, w, **kw)
    backward = cpu_conv_algorithm_for(x, w, **kw, backward=True)
    return forward if forward == backward else f"{forward}/{backward}"


_COLUMNS = f"{'device':<8}{'op':<23}{'algorithm':<19}{'transform':<18}{'dtype':<10}" + "".join(
    f"{q:<10}" for q in _QUANTITIES
)


def format_result(r: CheckResult) -> str:
    """One aligned line: the check, its four relative errors, the tolerance and the result."""
    algorithm = r.algorithm if r.ran == r.algorithm else f"{r.algorithm}({r.ran})"
    head = f"{r.device:<8}{r.op:<23}{algorithm:<19}{r.transform:<18}{r.dtype:<10}"
    if r.status in ("skip", "ERROR"):
        return f"{head}{r.status}: {r.detail}"
    errors = "".join(f"{r.errors[q]:<10.1e}" for q in _QUANTITIES)
    verdict = "ok" if r.status == "ok" else f"FAIL ({r.detail})"
    return f"{head}{errors}tol {r.tolerance:.1e}  {verdict}"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fusedtie [--no-check] [--json]``: the report and self-check; returns the exit status
    (0 all checks passed or none run, 1 a check failed or raised)."""
    parser = argparse.ArgumentParser(
        prog="python -m fusedtie",
        description="Print what fusedtie was built as and runs on, then check its kernels against PyTorch "
        "in float64 (exit status 0: all passed, 1: a mismatch or an error).",
    )
    parser.add_argument("--no-check", action="store_true", help="only the information, no self-check")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of text")
    args = parser.parse_args(argv)

    env = environment()
    if not args.json:
        print(format_environment(env), flush=True)
    if args.no_check:
        if args.json:
            print(json.dumps(_json_safe({**env, "checks": None, "passed": None}), indent=2))
        return EXIT_PASS

    start = time.perf_counter()
    if not args.json:
        print(
            "\nself-check: forward and gradients against F.conv2d / F.conv_transpose2d on f(W) in float64;"
            "\nerror = max|got - ref| / max|ref|; tol = max(floor for the dtype, 3x PyTorch's own error there)",
            flush=True,
        )
        print(_COLUMNS.rstrip(), flush=True)
        if LIB.cuda_compiled and not torch.cuda.is_available():
            print("(no GPU visible: CUDA checks not run)", flush=True)
        elif not LIB.cuda_compiled and torch.cuda.is_available():
            print("(GPUs visible, but this build has no CUDA kernels: CUDA checks not run)", flush=True)
    results = self_check(report=None if args.json else lambda r: print(format_result(r), flush=True))
    seconds = time.perf_counter() - start
    failed = [r for r in results if r.failed]
    skipped = sum(r.status == "skip" for r in results)
    if args.json:
        checks = [{**asdict(r), "name": r.name} for r in results]
        print(json.dumps(_json_safe({**env, "checks": checks, "passed": not failed, "seconds": seconds}), indent=2))
    elif failed:
        print(f"FAIL: {len(failed)} of {len(results)} checks failed ({seconds:.1f} s):")
        for r in failed:
            print(f"  {r.name}: {r.status} {r.detail}")
    else:
        print(f"PASS: {len(results) - skipped} checks passed, {skipped} skipped ({seconds:.1f} s)")
    return EXIT_MISMATCH if failed else EXIT_PASS
