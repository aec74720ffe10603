# Every target does its own set-up in .venv, so `make test` and `make bench` work on a fresh clone.
#   make test        build the extension (incrementally, ninja) and run the whole pytest suite
#   make bench       the same set-up, then the benchmark (quick run; table on stdout, JSON and PNG in bench-results/)
#   make cmake-test  the Python-free CMake build of the operator library and its C++ test (ctest)
#   make build       only (re)build fusedtie/_C in place
#   make docs        the documentation site (mkdocs-material + mkdocstrings) into site/, warnings as errors
#   make sdist-check the sdist round trip: build, install in a fresh venv, python -m fusedtie there
#   make lint        ruff (lint and format) and clang-format, checking only; make format applies them
#   make cuda-build  the CUDA extension, no GPU needed: .venv-cuda (torch 2.14.1, CUDA 13.0), an
#                    out-of-place build in build-cuda/ (sm_80, sm_90 + PTX), the suite against it,
#                    ptxas registers/spills per kernel (scripts/cuda_build.sh); make cuda-clean
#   make sanitize    the CPU extension with ASan + UBSan in build-sanitize/, and the suites that drive
#                    the C++ under it (scripts/sanitize.sh)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cuh' -o -name '*.cu') $(wildcard fusedtie/include/*.h)
CMAKE_BUILD := build/cmake
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: test bench build cmake-test clean cuda-build cuda-clean lint format docs sdist-check sanitize

# The venv with the pinned dependencies and fusedtie installed editable. FUSEDTIE_SKIP_EXT=1 makes
# the editable install only register the package; the extension is built by the rule below, in
# place and incrementally, so editing one kernel does not recompile everything.
$(VENV)/.deps: requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	FUSEDTIE_SKIP_EXT=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

$(VENV)/.built: $(VENV)/.deps $(CSRC) setup.py fusedtie/_build.py
	@echo "make: building fusedtie._C (MAX_JOBS=$(MAX_JOBS))"
	@start=$$(date +%s); $(PY) setup.py --quiet build_ext --inplace; \
	  echo "make: extension built in $$(( $$(date +%s) - start )) s"
	touch $@

build: $(VENV)/.built

test: $(VENV)/.built
	$(PY) -m pytest -q tests

bench: $(VENV)/.built
	$(PY) benchmarks/bench.py --quick --json bench-results/quick.json --plot bench-results/quick.png

# Every C++/CUDA source git tracks (a generated or untracked file is not ours to format).
CXX_SOURCES = $(shell git ls-files 'csrc/*' 'tests/cpp/*' 'tests/cuda_emulation/*' 'fusedtie/include/*' | grep -E '\.(h|cpp|cu|cuh)$$')

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --style=file --dry-run --Werror $(CXX_SOURCES)
	@echo "make: lint clean"

format: $(VENV)/.deps
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format --style=file -i $(CXX_SOURCES)

# The documentation site: docs/ and the docstrings (griffe reads them from the source: nothing is
# imported, so no _C is needed) into site/.
$(VENV)/.docs-deps: $(VENV)/.deps requirements-docs.txt
	$(PY) -m pip install --quiet -r requirements-docs.txt
	touch $@

docs: $(VENV)/.docs-deps
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The sdist on its own: build it, check it holds every source, install it in a fresh venv, run
# `python -m fusedtie` there.
sdist-check: $(VENV)/.deps
	scripts/sdist_roundtrip.sh

cmake-test: $(VENV)/.deps
	@start=$$(date +%s); \
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" && \
	cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS) && \
	echo "make: CMake build took $$(( $$(date +%s) - start )) s" && \
	cd $(CMAKE_BUILD) && ctest --output-on-failure

# Its own venv (.venv-cuda) and build folder (build-cuda/): never .venv, build/ or fusedtie/_C*.so.
cuda-build:
	PYTHON="$(PYTHON)" scripts/cuda_build.sh

clean:
	rm -rf build fusedtie/_C*.so $(VENV)/.built

cuda-clean:
	rm -rf build-cuda

# Its own build folder (build-sanitize/), with .venv's python: never build/ or fusedtie/_C*.so.
sanitize: $(VENV)/.deps
	PYTHON="$(abspath $(PY))" scripts/sanitize.sh
