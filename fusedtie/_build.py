"""Finds the operator library: the prebuilt ``fusedtie._C`` if installed, else a JIT build.

The two are never loaded in one process: a prebuilt extension that exists but fails to import is an
error with instructions, not a silent fall-back to a second copy of the same operators.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from types import ModuleType
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: torch's own lock file is all there is
    fcntl = None

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")
JIT_NAME = "fusedtie_jit"

# How load_library found the extension, for fusedtie.build_info(): "how" is "prebuilt" or "jit",
# "why" says why (and, for a JIT build, "cuda" why it has or lacks the CUDA kernels). Empty until then.
LOADED: dict[str, str] = {}


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
    note = ""
    chosen = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not _is_toolkit(cpp_extension.CUDA_HOME) and not chosen:
        # Without CUDA_HOME set, torch takes the parent of the folder of the nvcc on PATH, which may
        # be a wrapper script outside the toolkit (/usr/local/bin/nvcc gives /usr/local, whose
        # include/ has no CUDA headers and whose lib64/ no libcudart). nvcc knows its own toolkit.
        toolkit = _nvcc_toolkit()
        if _is_toolkit(toolkit):
            note = f" (nvcc's own toolkit; torch had guessed CUDA_HOME={cpp_extension.CUDA_HOME})"
            cpp_extension.CUDA_HOME = toolkit  # what the build reads (include, lib64, bin/nvcc)
    if not _is_toolkit(cpp_extension.CUDA_HOME):
        return False, (
            f"CUDA_HOME={cpp_extension.CUDA_HOME} has no include/cuda_runtime.h "
            "(set CUDA_HOME to the CUDA toolkit, e.g. /usr/local/cuda)"
        )
    if not glob.glob(os.path.join(SOURCE_DIR, "cuda", "*.cu")):
        return False, "no CUDA kernels in csrc/cuda yet"
    return True, f"nvcc at {cpp_extension.CUDA_HOME}{note}, torch CUDA {torch.version.cuda}"


def _is_toolkit(path: str | None) -> bool:
    return path is not None and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def _nvcc_toolkit() -> str | None:
    """The CUDA toolkit of the nvcc on PATH, as nvcc reports it (the TOP of `nvcc -dryrun`)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        run = subprocess.run(
            [nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (run.stdout + run.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.realpath(line[len("#$ TOP=") :].strip())
    return None


def openmp_flags() -> list[str]:
    """-fopenmp when torch runs at::parallel_for on OpenMP: parallel_for is a header template, so
    without it our passes would run on one thread. Linking libgomp is safe: torch ships its own
    libgomp.so.1, and the loader reuses the copy already loaded under that name."""
    import torch

    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def sanitizer_flags() -> list[str]:
    """FUSEDTIE_SANITIZE=1 (read by setup.py; `make sanitize`): AddressSanitizer and
    UndefinedBehaviorSanitizer on the C++ units, for both compiling and linking. UB aborts at its
    first report (-fno-sanitize-recover), so a test cannot pass over one; frame pointers and line
    tables make the reports' stacks readable. Such a library loads only with libasan (and
    libstdc++) preloaded (scripts/sanitize.sh)."""
    if os.environ.get("FUSEDTIE_SANITIZE", "0") != "1":
        return []
    return ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1"]


def cuda_header_dirs() -> list[str]:
    """The include folders of the CUDA libraries that pip installed with a CUDA torch
    (site-packages/nvidia/*/include: cuBLAS, cuSPARSE, cuSOLVER, cuDNN, ...).

    ATen/cuda/CUDAContext.h includes cublas_v2.h and cusparse.h, which a CUDA toolkit installed
    without its math libraries lacks. They are added with -isystem, which the compilers search after
    every -I folder, so the toolkit's own headers (CUDA_HOME/include, an -I) still win wherever both
    have a header."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [
        d
        for root in spec.submodule_search_locations
        for d in sorted(glob.glob(os.path.join(root, "*", "include")))
        if os.path.isdir(d)
    ]


def compile_flags(debug: bool, cuda: bool = False) -> dict[str, list[str]]:
    """Compiler flags: "cxx" for the C++ units, "nvcc" for the CUDA ones (used when ``cuda``).

    FUSEDTIE_PTXAS_VERBOSE=1 adds -Xptxas=-v, so that ptxas prints each kernel's registers, spills,
    stack and shared memory per architecture (`make cuda-build` summarises them)."""
    # torch's vector headers use `#pragma unroll` (unknown to GCC) and pass 32/64-byte vectors by
    # value (a GCC ABI note); both are noise about torch's headers, not our code.
    quiet = ["-Wno-unknown-pragmas", "-Wno-psabi"]
    cxx = (["-O0", "-g"] if debug else ["-O3"]) + openmp_flags() + quiet
    nvcc = ["-O0", "-G"] if debug else ["-O3"]
    if cuda:
        system_includes = [flag for d in cuda_header_dirs() for flag in ("-isystem", d)]
        cxx += system_includes
        nvcc += system_includes
        if os.environ.get("FUSEDTIE_PTXAS_VERBOSE", "0") == "1":
            nvcc.append("-Xptxas=-v")
    return {"cxx": cxx, "nvcc": nvcc}


def _cache_dir(cuda: bool) -> str:
    """FUSEDTIE_CACHE_DIR, else TORCH_EXTENSIONS_DIR/fusedtie, else ~/.cache/fusedtie; then a folder
    per torch version, Python version and CPU/CUDA."""
    import torch

    root = os.environ.get("FUSEDTIE_CACHE_DIR") or (
        os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "fusedtie")
        if os.environ.get("TORCH_EXTENSIONS_DIR")
        else os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fusedtie")
    )
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{'cuda' if cuda else 'cpu'}"
    return os.path.join(root, re.sub(r"[^A-Za-z0-9_.-]", "_", tag))


# The expected time of a first build, for the "compiling" line (2 cores: 1-2.5 min for the CPU
# extension, several minutes with the CUDA kernels).
EXPECTED_BUILD = {False: "1-3 minutes on 2 cores", True: "5-15 minutes on 2 cores"}
BUILD_LOCK = "fusedtie-build.lock"


@contextlib.contextmanager
def build_lock(build_dir: str, what: str = "the extension") -> Iterator[None]:
    """Exclusive use of the build folder, by an flock that the kernel drops when its holder exits,
    however it exits: an interrupted build leaves nothing that makes the next import wait. Waiting
    on a live builder ends after FUSEDTIE_BUILD_WAIT_SECONDS (default 3600) with an error naming it.
    ``what`` names what is being built, in the line printed while waiting."""
    if fcntl is None:
        yield
        return
    path = os.path.join(build_dir, BUILD_LOCK)
    limit = float(os.environ.get("FUSEDTIE_BUILD_WAIT_SECONDS", "3600"))
    with open(path, "a+") as lock:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                if time.monotonic() - start > limit:
                    raise RuntimeError(
                        f"fusedtie: waited {limit:.0f} s for {holder} to finish building in {build_dir} "
                        f"(lock {path}). If that process is stuck, stop it; raise FUSEDTIE_BUILD_WAIT_SECONDS "
                        "to wait longer."
                    ) from None
                if not told:
                    print(
                        f"fusedtie: waiting for {holder}, which is building {what} in {build_dir}",
                        file=sys.stderr,
                        flush=True,
                    )
                    told = True
                time.sleep(0.2)
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def write_atomically(path: str, text: str) -> None:
    """``text`` into ``path`` by a rename: another process sees the old file, none, or the whole new one."""
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


def file_digest(path: str) -> tuple[int, str]:
    """A file's size and SHA-256: what a cache records beside a library it built, and checks before
    loading it (a truncated ELF crashes the process on dlopen; garbage gives an error at best)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return os.path.getsize(path), digest.hexdigest()


def _record_path(library: str) -> str:
    return library + ".record"


def _matches_record(library: str) -> bool:
    try:
        with open(_record_path(library)) as f:
            record = json.load(f)
        return file_digest(library) == (int(record["size"]), str(record["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _drop_unrecorded_libraries(build_dir: str) -> None:
    """ninja writes the JIT library in place, so a build killed while linking, a full disk or later
    damage leaves a file that ninja considers up to date. Each library is loaded only if it matches
    the record written after its build succeeded; any other is removed, with a line saying so, and
    ninja links it again from the compiled objects."""
    for library in glob.glob(os.path.join(build_dir, JIT_NAME + "*.so")):
        if not _matches_record(library):
            print(
                f"fusedtie: {library} does not match the record of its build (interrupted, out of disk space "
                "or damaged); linking it again",
                file=sys.stderr,
                flush=True,
            )
            for stale in (library, _record_path(library)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stale)


def _record_library(library: str) -> None:
    """Records the size and SHA-256 of a library this process built, once it has loaded."""
    size, digest = file_digest(library)
    write_atomically(_record_path(library), json.dumps({"size": size, "sha256": digest}) + "\n")


def compiler_errors(log: str, max_lines: int = 24) -> str:
    """The compiler's error lines in a build log, each with the source excerpt GCC prints under it
    (indented lines, ``  1 | ...`` and the caret); the log's tail if no line reads as an error."""
    # GCC quotes with ‘’ in a UTF-8 locale, with '' otherwise: one spelling for the messages.
    lines = log.replace("\u2018", "'").replace("\u2019", "'").splitlines()
    kept: list[str] = []
    in_error = False
    for line in lines:
        noise = line.startswith(("FAILED:", "ninja:", "[")) or "Error building extension" in line or " -c " in line
        if re.search(r"error", line, re.IGNORECASE) and not noise:
            kept.append(line)
            in_error = True
        elif in_error and re.match(r"\s+(\d+\s*)?\|", line):
            kept.append(line)
        else:
            in_error = False
    return "\n".join(kept[:max_lines] if kept else lines[-max_lines:])


def _clear_torch_lock(build_dir: str) -> None:
    """torch's own lock file in the build folder, where torch waits on the file's mere existence
    (FileBaton, torch <= 2.13; later releases lock it with flock and leave it in place). Under our
    lock no live fusedtie build holds it, so it is a leftover of an interrupted one, on which torch's
    load() would wait forever."""
    from torch.utils import cpp_extension

    if getattr(cpp_extension, "FileLock", None) is not None:
        return
    stale = os.path.join(build_dir, "lock")
    if fcntl is not None and os.path.exists(stale):
        print(f"fusedtie: removing {stale}, left by an interrupted build", file=sys.stderr, flush=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension

    cuda, why = cuda_build_decision()
    LOADED["cuda"] = why
    build_dir = _cache_dir(cuda)
    os.makedirs(build_dir, exist_ok=True)
    sources = source_files(cuda)
    headers = [
        f for pattern in ("*.h", "*.cuh") for f in glob.glob(os.path.join(SOURCE_DIR, "**", pattern), recursive=True)
    ]
    headers += glob.glob(os.path.join(PACKAGE_DIR, "include", "*.h"))  # the user-transform interface
    debug = os.environ.get("FUSEDTIE_DEBUG", "0") == "1"
    flags = compile_flags(debug, cuda)
    with build_lock(build_dir):
        _clear_torch_lock(build_dir)
        _drop_unrecorded_libraries(build_dir)
        built = glob.glob(os.path.join(build_dir, JIT_NAME + "*.so"))
        newest_input = max(os.path.getmtime(f) for f in sources + headers)
        compiling = not built or newest_input > max(os.path.getmtime(f) for f in built)
        if compiling:
            for library in built:  # ninja may link these again in place: their records no longer hold
                with contextlib.suppress(FileNotFoundError):
                    os.remove(_record_path(library))
            print(
                f"fusedtie: compiling the extension once ({'CPU+CUDA' if cuda else 'CPU only'}: {why}; "
                f"expect {EXPECTED_BUILD[cuda]}); cache {build_dir}",
                file=sys.stderr,
                flush=True,
            )
        start = time.monotonic()
        try:
            module = cpp_extension.load(
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
        except RuntimeError as error:
            if "Error building extension" not in str(error):
                raise
            raise ImportError(
                f"fusedtie: the JIT build failed in {build_dir}. The compiler said:\n"
                + compiler_errors(str(error))
                + "\nFor the whole log: FUSEDTIE_VERBOSE_BUILD=1 python -c 'import fusedtie'"
            ) from None
        if not os.path.exists(_record_path(module.__file__)):  # built by this call (the rest were checked)
            _record_library(module.__file__)
        if compiling:
            print(f"fusedtie: built in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        return module


def load_library() -> ModuleType:
    """Import the prebuilt ``fusedtie._C``, or JIT-build the extension when none is installed."""
    # The extension links against libc10/libtorch_cpu, which the dynamic loader finds only once
    # torch itself is loaded (torch puts them in the process; they are not on the library path).
    import torch  # noqa: F401

    if os.environ.get("FUSEDTIE_FORCE_JIT", "0") != "1":
        spec = importlib.util.find_spec("fusedtie._C")
        if spec is not None:
            try:
                module = importlib.import_module("fusedtie._C")
            except ImportError as error:
                raise ImportError(
                    f"fusedtie: the prebuilt extension {spec.origin} failed to load: {error}. It was "
                    "probably built against another torch. Rebuild it (`pip install --no-build-isolation "
                    ".` or `make build`), or delete it to use the JIT build."
                ) from error
            LOADED.update(how="prebuilt", why="fusedtie._C is installed")
            return module
        LOADED.update(how="jit", why="no prebuilt fusedtie._C is installed")
    else:
        LOADED.update(how="jit", why="FUSEDTIE_FORCE_JIT=1")
    return _jit_build()
