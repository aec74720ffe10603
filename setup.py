"""Ahead-of-time build of fusedtie._C: `pip install --no-build-isolation .` (or `-e .`).

A CppExtension, or a CUDAExtension when nvcc, a CUDA build of torch and CUDA kernels are present.
FUSEDTIE_FORCE_CPU=1 forces the CPU build, FUSEDTIE_DEBUG=1 builds without optimisation, and
TORCH_CUDA_ARCH_LIST picks the GPU architectures as for any torch extension, and
FUSEDTIE_PTXAS_VERBOSE=1 has ptxas report each kernel's registers and spills. FUSEDTIE_SKIP_EXT=1
installs the Python package alone (the Makefile then builds the extension in place with
`setup.py build_ext --inplace`, incrementally). `make cuda-build` builds out of place
(`setup.py build --build-base build-cuda`) with a CUDA torch in .venv-cuda: scripts/cuda_build.sh.
"""

import importlib.util
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# fusedtie/_build.py holds the source list and the CUDA decision for both builds; load it by path so
# that setup.py does not import the package (which would try to load the extension being built).
_spec = importlib.util.spec_from_file_location("fusedtie_build", os.path.join(ROOT, "fusedtie", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

use_cuda, reason = _build.cuda_build_decision()
debug = os.environ.get("FUSEDTIE_DEBUG", "0") == "1"
flags = _build.compile_flags(debug, cuda=use_cuda)
print(
    f"fusedtie setup: {'CUDAExtension' if use_cuda else 'CppExtension'} ({reason}); "
    f"{'debug' if debug else 'release'} build"
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
    extra_link_args=_build.openmp_flags(),
)

skip_extension = os.environ.get("FUSEDTIE_SKIP_EXT", "0") == "1"
if skip_extension:
    print("fusedtie setup: FUSEDTIE_SKIP_EXT=1, installing the Python package without the extension")

setup(
    name="fusedtie",
    version="0.1.0",
    description="Tie one conv layer's weights to a function of another's, fused into one operator",
    packages=["fusedtie"],
    # The header that Transform.from_expression compiles user transforms against (the operator
    # library includes it from here too): shipped in the wheel, since csrc/ is not.
    package_data={"fusedtie": ["include/*.h"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.13"],
    ext_modules=[] if skip_extension else [extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
