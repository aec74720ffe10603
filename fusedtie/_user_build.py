"""Compiles user transforms (``fusedtie.Transform.from_expression``) into shared libraries, cached.

Kept free of the operator library (it never imports ``fusedtie._C``), so that the code generation
and the compiler call can be exercised on their own (for example in a CUDA-enabled environment
without a GPU).

What is compiled: a source file that defines a functor with the user's f and f' and includes
``fusedtie/include/fusedtie_user_transform.h``, which holds the loops (CPU, and CUDA kernels when the
source is a ``.cu``) and the table of functions the operator library loads. The headers ship inside
the Python package, so the same code compiles from a source checkout and from an installed wheel,
and they include only c10's light headers: no ``torch/extension.h`` (which ``load_inline`` would
prepend), so a library builds in one or two seconds instead of about a minute. It is built with
``torch.utils.cpp_extension.load`` (torch's compiler flags, ABI settings and nvcc handling) and
loaded by the operator library with dlopen.

Vector CPU loops (a decision, measured): an expression that calls tanh, exp... runs much slower as
a scalar loop (one glibc call per element) than as a vector pass: 29x for tanh(x), 5.6x for
x / (1 + exp(-x)) (per 2^20 float32 values, AVX-512; README, "Your own transforms"). So where ATen's CPU capability
is AVX2 or AVX512 (``torch.backends.cpu.get_cpu_capability()``, which ATEN_CPU_CAPABILITY can
lower), the CPU code is compiled for that instruction set with ``FUSEDTIE_USER_VECTOR``: each
expression that compiles for the vector type of ``fusedtie_user_vector.h`` (SLEEF's math, as the
built-in passes) runs vectorised, and one that does not (``?:``...) keeps its scalar loop in the
same library; the generated functor tests this with a requires-expression, so nothing is compiled
twice. Should the vector build fail all the same (an expression the test let through, such as
``std::max<T>(...)``), the scalar library is built instead, and the failure is remembered in the
cache; an expression that does not compile at all is reported from the scalar build, so the
message quotes the user's code only. ``FUSEDTIE_USER_VECTORIZE=0`` builds scalar loops only. The
library records what it got (``fusedtie_user_transform_isa`` / ``_vectorized``, read back with
ctypes after the build and kept in the cache marker).

The cache: one folder per library under ``cache_root()``, named by a SHA-256 of everything the
binary depends on (the generated sources, hence the expressions and parameter names; the headers'
contents; torch's and fusedtie's versions; the Python version; whether CUDA kernels are compiled;
the flags, hence the instruction set, so machines of different capabilities sharing a cache each
get their own library). A library is used only once its ``built`` marker exists (written after
the build succeeded), so a later use, in this process or another, loads it without invoking the
compiler.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from ._build import build_lock, compiler_errors, file_digest, write_atomically

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
INCLUDE_DIR = os.path.join(PACKAGE_DIR, "include")
HEADER = "fusedtie_user_transform.h"
VECTOR_HEADER = "fusedtie_user_vector.h"  # included by HEADER with FUSEDTIE_USER_VECTOR
CXX_FLAGS = ["-O3", "-Wno-unknown-pragmas", "-Wno-psabi"]
CUDA_FLAGS = ["-O3"]
# The flags of each instruction set ATen's CPU capability names (its test: AVX2 means AVX2 and FMA;
# AVX512 means F, BW, VL and DQ). -ffp-contract=off: no a * b + c contracted into an FMA, which the
# scalar form does not have. No -mf16c: c10::Half would then include <immintrin.h> for one scalar
# conversion instruction, 0.6 s of compile time.
ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-ffp-contract=off"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-ffp-contract=off"],
}
VECTORIZE_ENV = "FUSEDTIE_USER_VECTORIZE"

# Parameter names the generated code could not declare: C/C++ keywords and the names it uses.
_CPP_KEYWORDS = frozenset(
    """
alignas alignof and and_eq asm auto bitand bitor bool break case catch char char8_t char16_t
char32_t class compl concept const consteval constexpr constinit const_cast continue co_await
co_return co_yield decltype default delete do double dynamic_cast else enum explicit export extern
false float for friend goto if inline int long mutable namespace new noexcept not not_eq nullptr
operator or or_eq private protected public register reinterpret_cast requires return short signed
sizeof static static_assert static_cast struct switch template this thread_local throw true try
typedef typeid typename union unsigned using virtual void volatile wchar_t while xor xor_eq
""".split()
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def check_parameter_name(name: str) -> None:
    """ValueError unless ``name`` can be declared as a parameter of the generated functor."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(f"parameter name {name!r} is not a C identifier (letters, digits, _)")
    if name == "x":
        raise ValueError("parameter name 'x' would shadow the transform's argument x")
    if name in _CPP_KEYWORDS:
        raise ValueError(f"parameter name {name!r} is a C++ keyword")
    if name.startswith("fusedtie") or name.startswith("__") or re.match(r"_[A-Z]", name):
        raise ValueError(f"parameter name {name!r} is reserved (fusedtie*, __*, _[A-Z]*)")


def check_expression(what: str, expression: str) -> None:
    """ValueError unless ``expression`` is one non-empty C++ expression (no statements or directives)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"the {what} must be a non-empty C++ expression in x, got {expression!r}")
    bad = sorted(set(expression) & set(";{}#\\\n\r"))
    if bad:
        raise ValueError(
            f"the {what} must be a single C++ expression in x, without {' '.join(map(repr, bad))}; got {expression!r}"
        )


def generate_source(
    forward: str,
    derivative: str,
    param_names: Sequence[str],
    file_name: str,
    *,
    vector: bool = False,
    part: str = "library",
) -> str:
    """The source of a library (``part="library"``): a functor with f and f', the table of functions
    exported in C, and the two data symbols saying what the CPU code is. A CUDA library with vector
    CPU loops is two sources, since nvcc's host pass does not get the instruction-set flags: the
    ``.cu`` (``part="cuda"``: the table and the kernels) and a ``.cpp`` (``part="cpu"``: the CPU
    functions the table points to, and the data symbols).

    ``using namespace std`` makes ``exp(x)``, ``tanh(x)``, ``pow(x, 3)``... resolve to the overload for
    the computation type, on the host and in CUDA device code; for the vector type, argument-dependent
    lookup finds fusedtie_user_vector.h's. With ``vector``, the functor also tells, for a type T,
    whether each expression compiles for it (a requires-expression with the same parameters and the
    same using-directive), which the header asks of its vector type. Each expression is on lines of
    its own, introduced by ``#line 1 "forward"`` (or ``"derivative"``), so that a compiler message
    points into the user's expression (``forward:1:5: error: ...``), not into generated code.
    """
    if part not in ("library", "cuda", "cpu"):
        raise ValueError(f"part must be 'library', 'cuda' or 'cpu', got {part!r}")
    lines = [
        "// Generated by fusedtie (fusedtie/_user_build.py) for Transform.from_expression; do not edit.",
        "#define FUSEDTIE_USER_TRANSFORM_SOURCE",
    ]
    if vector:
        lines.append("#define FUSEDTIE_USER_VECTOR")
    if part == "cuda":
        lines.append("#define FUSEDTIE_USER_CPU_ELSEWHERE")
    lines.extend(
        [
            f'#include "{HEADER}"',
            "",
            "namespace {",
            "struct UserTransform {",
            f"  static constexpr int kNumParams = {len(param_names)};",
        ]
    )

    def expression_lines(expression: str, what: str) -> None:
        lines.append(f'#line 1 "{what}"')
        lines.append(expression)
        lines.append(f'#line {len(lines) + 2} "{file_name}"')  # the number of the line after this one

    def method(method_name: str, expression: str) -> None:
        lines.extend(
            [
                "  template <typename T>",
                f"  static FUSEDTIE_USER_HD T {method_name}([[maybe_unused]] T x, "
                "[[maybe_unused]] const fusedtie_user::Params<T, kNumParams>& fusedtie_params) {",
                "    using namespace std;",
            ]
        )
        lines.extend(
            f"    [[maybe_unused]] const T {p} = fusedtie_params.value[{i}];" for i, p in enumerate(param_names)
        )
        lines.append("    return static_cast<T>(")
        expression_lines(expression, method_name)
        lines.extend(["    );", "  }"])

    def compiles(method_name: str, expression: str) -> None:
        # False, not an error, when the expression does not compile for T (T is dependent here).
        params = "".join(f", const T {p}" for p in param_names)
        lines.extend(
            [
                "  template <typename T>",
                f"  static constexpr bool {method_name}_compiles() {{",
                "    using namespace std;",
                f"    return requires(T x{params}) {{",
                "      static_cast<T>(",
            ]
        )
        expression_lines(expression, method_name)
        lines.extend(["      );", "    };", "  }"])

    method("forward", forward)
    method("derivative", derivative)
    if vector:
        compiles("forward", forward)
        compiles("derivative", derivative)
    lines.extend(["};", "}  // namespace", ""])
    if part in ("library", "cuda"):
        lines.extend(
            [
                'extern "C" __attribute__((visibility("default"))) const FusedtieUserTransformTable*',
                "fusedtie_user_transform_table() {",
                "  return fusedtie_user::make_table<UserTransform>();",
                "}",
            ]
        )
    if part == "cpu":  # the functions the .cu's table points to (declared in the header)
        lines.extend(
            [
                'extern "C" __attribute__((visibility("hidden"))) const char* fusedtie_user_cpu_forward(',
                "    int32_t dtype, const void* in, void* out, int64_t numel, const double* params) {",
                "  return fusedtie_user::cpu_forward<UserTransform>(dtype, in, out, numel, params);",
                "}",
                'extern "C" __attribute__((visibility("hidden"))) const char* fusedtie_user_cpu_chain_rule(',
                "    int32_t dtype, const void* grad, const void* source, void* out, int64_t numel,",
                "    const double* params) {",
                "  return fusedtie_user::cpu_chain_rule<UserTransform>(dtype, grad, source, out, numel, params);",
                "}",
            ]
        )
    if part in ("library", "cpu"):
        lines.extend(
            [
                'extern "C" __attribute__((visibility("default"))) const char fusedtie_user_transform_isa[] = '
                "FUSEDTIE_USER_ISA;",
                'extern "C" __attribute__((visibility("default"))) const int32_t fusedtie_user_transform_vectorized = '
                "fusedtie_user::vectorized_passes<UserTransform>();",
            ]
        )
    lines.append("")
    return "\n".join(lines)


def vector_isa() -> Optional[str]:
    """The instruction set to compile vector CPU loops for: ATen's CPU capability when it is AVX2 or
    AVX512 on x86-64 Linux; None (scalar loops only) elsewhere, or when FUSEDTIE_USER_VECTORIZE=0."""
    if os.environ.get(VECTORIZE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in ISA_FLAGS else None


def cache_root() -> str:
    """FUSEDTIE_CACHE_DIR, else TORCH_EXTENSIONS_DIR, else torch's default (~/.cache/torch_extensions),
    with a ``fusedtie_user_transforms`` folder under it."""
    root = (
        os.environ.get("FUSEDTIE_CACHE_DIR")
        or os.environ.get("TORCH_EXTENSIONS_DIR")
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    )
    return os.path.join(root, "fusedtie_user_transforms")


def library_key(sources: Sequence[str], cuda: bool, fusedtie_version: str, flags: Sequence[str]) -> str:
    """SHA-256 of everything the compiled library depends on."""
    import torch

    digest = hashlib.sha256()
    headers = []
    for header in (HEADER, VECTOR_HEADER):
        with open(os.path.join(INCLUDE_DIR, header), "rb") as f:
            headers.append(f.read())
    for part in (
        *(source.encode() for source in sources),
        *headers,
        torch.__version__.encode(),
        fusedtie_version.encode(),
        f"py{sys.version_info[0]}.{sys.version_info[1]}".encode(),
        b"cuda" if cuda else b"cpu",
        " ".join(flags).encode(),
    ):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class BuiltLibrary:
    """A compiled user transform library, as its build (or cache marker) describes it."""

    path: str
    compiled: bool  # by this call (else found in the cache)
    isa: str  # the instruction set of its CPU code: "DEFAULT", "AVX2" or "AVX512"
    vectorized_forward: bool  # cpu_forward runs f's vector form
    vectorized_chain_rule: bool  # cpu_chain_rule runs f''s vector form

    @property
    def vectorized(self) -> bool:
        return self.vectorized_forward and self.vectorized_chain_rule


def build_library(
    forward: str, derivative: str, param_names: Sequence[str], *, cuda: bool, fusedtie_version: str
) -> BuiltLibrary:
    """The library for these expressions, compiled if not cached. With a vector instruction set
    (vector_isa()), the vector build first, then the scalar one if that fails; ValueError quoting
    the compiler's errors when the scalar build fails too."""
    isa = vector_isa()
    if isa is not None:
        built = _build(forward, derivative, param_names, cuda=cuda, fusedtie_version=fusedtie_version, isa=isa)
        if built is not None:
            return built
    built = _build(forward, derivative, param_names, cuda=cuda, fusedtie_version=fusedtie_version, isa=None)
    assert built is not None  # a scalar build raises rather than fail quietly
    return built


def _build(
    forward: str, derivative: str, param_names: Sequence[str], *, cuda: bool, fusedtie_version: str, isa: Optional[str]
) -> Optional[BuiltLibrary]:
    """One build (vector loops for isa, or scalar loops for None), or its cached result. None when a
    vector build fails (now, or in an earlier process: the ``failed`` marker remembers it)."""
    vector = isa is not None
    flags = CXX_FLAGS + (ISA_FLAGS[isa] if vector else []) + (CUDA_FLAGS if cuda else [])
    if cuda and vector:  # the CPU code in a .cpp of its own (the only .cpp: extra_cflags reach it alone)
        files = {
            "transform.cu": generate_source(forward, derivative, param_names, "transform.cu", part="cuda"),
            "transform_cpu.cpp": generate_source(
                forward, derivative, param_names, "transform_cpu.cpp", vector=True, part="cpu"
            ),
        }
    else:
        file_name = "transform.cu" if cuda else "transform.cpp"
        files = {file_name: generate_source(forward, derivative, param_names, file_name, vector=vector)}
    key = library_key(list(files.values()), cuda, fusedtie_version, flags)
    name = f"fusedtie_user_{key[:24]}"
    build_dir = os.path.join(cache_root(), name)
    library = os.path.join(build_dir, name + ".so")
    marker = os.path.join(build_dir, "built")
    failed = os.path.join(build_dir, "failed")
    cached = _cached_build(marker, library, failed, vector)
    if cached is not False:
        return cached
    os.makedirs(build_dir, exist_ok=True)
    # Two processes creating the same transform: one builds and records it, the other waits, then
    # finds the record (checked again under the lock).
    with build_lock(build_dir, what=f"the transform library {name}"):
        cached = _cached_build(marker, library, failed, vector)
        if cached is not False:
            return cached
        if not _compile(files, name, build_dir, isa, cuda, forward, derivative, failed, key):
            return None
        if not os.path.exists(library):
            raise RuntimeError(f"fusedtie: the build of {name} reported success but made no {library}")
        # The library was built here, for this machine's instruction set: reading its data symbols
        # runs none of its code. (cpp_extension.load has loaded it already: this is the same handle.)
        size, digest = file_digest(library)  # before the first load: what this build wrote
        handle = ctypes.CDLL(library)
        isa_address = ctypes.addressof(ctypes.c_char.in_dll(handle, "fusedtie_user_transform_isa"))
        description = {
            "key": key,
            "isa": ctypes.cast(isa_address, ctypes.c_char_p).value.decode(),  # up to its NUL
            "vectorized": int(ctypes.c_int32.in_dll(handle, "fusedtie_user_transform_vectorized").value),
            "size": size,
            "sha256": digest,
        }
        write_atomically(marker, json.dumps(description) + "\n")  # another process sees no marker or a whole one
    built = _read_marker(marker, library)
    assert built is not None
    return BuiltLibrary(built.path, True, built.isa, built.vectorized_forward, built.vectorized_chain_rule)


def _cached_build(marker: str, library: str, failed: str, vector: bool):
    """The cached library's description; None where a vector build failed before (the ``failed``
    marker); False where there is nothing usable (nothing built, or a library that does not match
    its record, which is then removed with a warning)."""
    if os.path.exists(marker) and os.path.exists(library):
        described = _read_marker(marker, library)
        if described is not None:
            return described
        # A library that does not match its marker (a build killed mid-write, a full disk, an
        # older fusedtie's marker) is never loaded: a truncated ELF crashes the process on dlopen.
        warnings.warn(
            f"fusedtie: the cached transform library {library} does not match its record; rebuilding it", stacklevel=5
        )
        for stale in (marker, library):
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
    if vector and os.path.exists(failed):
        return None
    return False


def _compile(
    files: dict[str, str],
    name: str,
    build_dir: str,
    isa: Optional[str],
    cuda: bool,
    forward: str,
    derivative: str,
    failed: str,
    key: str,
) -> bool:
    """Compiles the library in build_dir (under the caller's lock). False when a vector build fails
    (recorded in ``failed``); ValueError quoting the compiler when a scalar build fails."""
    from torch.utils import cpp_extension  # imported only to build (it takes a while to import)

    vector = isa is not None
    source_paths = []
    for file_name, source in files.items():
        source_paths.append(os.path.join(build_dir, file_name))
        write_atomically(source_paths[-1], source)  # a compiler reading it sees a whole file
    try:
        # is_python_module=False: a plain shared library, no Python bindings (torch also loads it
        # into the process, which is harmless: the operator library dlopens the same file).
        cpp_extension.load(
            name=name,
            sources=source_paths,
            extra_cflags=CXX_FLAGS + (ISA_FLAGS[isa] if vector else []),
            extra_cuda_cflags=CUDA_FLAGS,
            extra_include_paths=[INCLUDE_DIR],
            build_directory=build_dir,
            with_cuda=cuda,
            is_python_module=False,
            verbose=False,
        )
    except RuntimeError as error:
        if vector:
            write_atomically(failed, key + "\n" + compiler_errors(str(error)) + "\n")
            return False
        raise ValueError(
            f"the transform's expressions do not compile (forward: {forward!r}, derivative: {derivative!r}):\n"
            + compiler_errors(str(error))
            + f"\n(the generated source and the build files are in {build_dir})"
        ) from None
    return True


def _read_marker(marker: str, library: str) -> Optional[BuiltLibrary]:
    """The description in a ``built`` marker; None if it is not one this version wrote, or if the
    library on disk is not the one it describes (size and SHA-256)."""
    try:
        with open(marker) as f:
            description = json.load(f)
        vectorized = int(description["vectorized"])
        if file_digest(library) != (int(description["size"]), str(description["sha256"])):
            return None
        return BuiltLibrary(library, False, str(description["isa"]), bool(vectorized & 1), bool(vectorized & 2))
    except (OSError, ValueError, KeyError, TypeError):
        return None
