"""Finds the operator library: the prebuilt ``fusedtie._C`` if installed, else a JIT build.

The two are never loaded in one process: a prebuilt extension that exists but fails to import is an
error with instructions, not a silent fall-back to a second copy of the same operators.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import sys
from types import ModuleType

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")
JIT_NAME = "fusedtie_jit"


def source_files(cuda: bool) -> list[str]:
    """The C++ (and, with ``cuda``, CUDA) sources of the extension; setup.py uses the same list."""
    sources = sorted(glob.glob(os.path.join(SOURCE_DIR, "*.cpp")))
    cpu = sorted(glob.glob(os.path.join(SOURCE_DIR, "cpu", "*.cpp")))
    # The units compiled for one instruction set (transform_passes_avx*.cpp) link last: where a
    # header's inline function is emitted by several units, the linker keeps the first copy, which
    # must be a portable one.
    is_isa_specific = lambda path: os.path.basename(path).startswith("transform_passes_avx")  # noqa: E731
    sources += [f for f in cpu if not is_isa_specific(f)] + [f for f in cpu if is_isa_specific(f)]
    if cuda:
        sources += sorted(glob.glob(os.path.join(SOURCE_DIR, "cuda", "*.cu")))
    return sources


def cuda_build_decision() -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why: needs nvcc, a CUDA torch and .cu sources."""
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("FUSEDTIE_FORCE_CPU", "0") == "1":
        return False, "FUSEDTIE_FORCE_CPU=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    if not glob.glob(os.path.join(SOURCE_DIR, "cuda", "*.cu")):
        return False, "no CUDA kernels in csrc/cuda yet"
    return True, f"nvcc at {cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}"


def openmp_flags() -> list[str]:
    """-fopenmp when torch runs at::parallel_for on OpenMP: parallel_for is a header template, so
    without it our passes would run on one thread. Linking libgomp is safe: torch ships its own
    libgomp.so.1, and the loader reuses the copy already loaded under that name."""
    import torch

    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def compile_flags(debug: bool) -> dict[str, list[str]]:
    # torch's vector headers use `#pragma unroll` (unknown to GCC) and pass 32/64-byte vectors by
    # value (a GCC ABI note); both are noise about torch's headers, not our code.
    quiet = ["-Wno-unknown-pragmas", "-Wno-psabi"]
    cxx = (["-O0", "-g"] if debug else ["-O3"]) + openmp_flags() + quiet
    return {"cxx": cxx, "nvcc": ["-O0", "-G"] if debug else ["-O3"]}


def _cache_dir(cuda: bool) -> str:
    import torch

    root = os.environ.get("FUSEDTIE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fusedtie"
    )
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{'cuda' if cuda else 'cpu'}"
    return os.path.join(root, re.sub(r"[^A-Za-z0-9_.-]", "_", tag))


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension

    cuda, why = cuda_build_decision()
    build_dir = _cache_dir(cuda)
    os.makedirs(build_dir, exist_ok=True)
    sources = source_files(cuda)
    headers = glob.glob(os.path.join(SOURCE_DIR, "**", "*.h"), recursive=True)
    built = glob.glob(os.path.join(build_dir, JIT_NAME + "*.so"))
    newest_input = max(os.path.getmtime(f) for f in sources + headers)
    if not built or newest_input > max(os.path.getmtime(f) for f in built):
        print(
            f"fusedtie: compiling the extension once ({'CPU+CUDA' if cuda else 'CPU only'}: {why}); "
            f"cache {build_dir}",
            file=sys.stderr,
            flush=True,
        )
    debug = os.environ.get("FUSEDTIE_DEBUG", "0") == "1"
    flags = compile_flags(debug)
    return cpp_extension.load(
        name=JIT_NAME,
        sources=sources,
        extra_cflags=flags["cxx"] + (["-DFUSEDTIE_WITH_CUDA"] if cuda else []),
        extra_cuda_cflags=flags["nvcc"] + ["-DFUSEDTIE_WITH_CUDA"],
        extra_include_paths=[SOURCE_DIR],
        extra_ldflags=openmp_flags(),
        build_directory=build_dir,
        is_python_module=True,
        verbose=os.environ.get("FUSEDTIE_VERBOSE_BUILD", "0") == "1",
    )


def load_library() -> ModuleType:
    """Import the prebuilt ``fusedtie._C``, or JIT-build the extension when none is installed."""
    # The extension links against libc10/libtorch_cpu, which the dynamic loader finds only once
    # torch itself is loaded (torch puts them in the process; they are not on the library path).
    import torch  # noqa: F401

    if os.environ.get("FUSEDTIE_FORCE_JIT", "0") != "1":
        spec = importlib.util.find_spec("fusedtie._C")
        if spec is not None:
            try:
                return importlib.import_module("fusedtie._C")
            except ImportError as error:
                raise ImportError(
                    f"fusedtie: the prebuilt extension {spec.origin} failed to load: {error}. It was "
                    "probably built against another torch. Rebuild it (`pip install --no-build-isolation "
                    ".` or `make build`), or delete it to use the JIT build."
                ) from error
    return _jit_build()
