"""Ahead-of-time build of fusedtie._C: `pip install --no-build-isolation .` (or `-e .`).

A CppExtension, or a CUDAExtension when nvcc, a CUDA build of torch and CUDA kernels are present.
FUSEDTIE_FORCE_CPU=1 forces the CPU build, FUSEDTIE_DEBUG=1 builds without optimisation, and
TORCH_CUDA_ARCH_LIST picks the GPU architectures as for any torch extension, and
FUSEDTIE_PTXAS_VERBOSE=1 has ptxas report each kernel's registers and spills. FUSEDTIE_SKIP_EXT=1
installs the Python package alone (the Makefile then builds the extension in place with
`setup.py build_ext --inplace`, incrementally). `make cuda-build` builds out of place
(`setup.py build --build-base build-cuda`) with a CUDA torch in .venv-cuda: scripts/cuda_build.sh.
The metadata lives in pyproject.toml, the version in fusedtie/_version.py; this file adds the
extension and the torch requirement, which depends on the build (torch_requirement below).
"""

import importlib.util
import os
import re
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# The oldest torch fusedtie supports (verified with 2.13.0).
MIN_TORCH = "2.13"
# fusedtie/_build.py holds the source list and the CUDA decision for both builds; load it by path so
# that setup.py does not import the package (which would try to load the extension being built).
_spec = importlib.util.spec_from_file_location("fusedtie_build", os.path.join(ROOT, "fusedtie", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

use_cuda, reason = _build.cuda_build_decision()
debug = os.environ.get("FUSEDTIE_DEBUG", "0") == "1"
flags = _build.compile_flags(debug, cuda=use_cuda)
sanitize = _build.sanitizer_flags()
flags["cxx"] += sanitize
print(
    f"fusedtie setup: {'CUDAExtension' if use_cuda else 'CppExtension'} ({reason}); "
    f"{'debug' if debug else 'release'} build"
    f"{'; ASan+UBSan' if sanitize else ''}"
    f"{'; ptxas -v' if use_cuda and '-Xptxas=-v' in flags['nvcc'] else ''}",
    flush=True,
)

Extension = CUDAExtension if use_cuda else CppExtension
extension = Extension(
    name="fusedtie._C",
    sources=[os.path.relpath(s, ROOT) for s in _build.source_files(use_cuda)],
    include_dirs=[os.path.join(ROOT, "csrc")],
    define_macros=[("FUSEDTIE_WITH_CUDA", None)] if use_cuda else [],
    extra_compile_args=flags if use_cuda else flags["cxx"],
    extra_link_args=_build.openmp_flags() + sanitize,
)

skip_extension = os.environ.get("FUSEDTIE_SKIP_EXT", "0") == "1"
if skip_extension:
    print("fusedtie setup: FUSEDTIE_SKIP_EXT=1, installing the Python package without the extension")


def torch_requirement() -> str:
    """The install requirement on torch. torch keeps no C++ ABI across minor releases, so a wheel
    whose _C was compiled against torch X.Y asks for X.Y (as torchvision's wheels name the torch
    they were built with): pip then refuses to pair it with another torch, instead of the import
    failing later on undefined symbols. Without the extension (the editable dev install,
    FUSEDTIE_SKIP_EXT=1, whose _C the Makefile builds in place) and in the sdist (which builds
    against whatever torch is installed) the requirement stays loose."""
    # The sdist: PEP 517's build_sdist (setuptools.build_meta) runs this file as `setup.py sdist`.
    if skip_extension or "sdist" in sys.argv[1:]:
        return f"torch>={MIN_TORCH}"
    release = torch.__version__.split("+")[0]  # "2.13.0+cpu" -> "2.13.0"
    if not re.fullmatch(r"\d+\.\d+\.\d+", release):  # a pre-release or nightly: that build only
        return f"torch=={release}"
    major, minor = (int(part) for part in release.split(".")[:2])
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


requirement = torch_requirement()
print(f"fusedtie setup: requires {requirement}", flush=True)

setup(
    install_requires=[requirement],
    ext_modules=[] if skip_extension else [extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
