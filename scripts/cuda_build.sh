#!/usr/bin/env bash
# `make cuda-build`: the CUDA extension built and tested on a machine without a GPU.
#
#   1. venv    .venv-cuda with torch==2.14.1 (CUDA 13.0; requirements-cuda.txt; without triton) and
#              the dev tools of requirements-dev.txt less its torch pin; reinstalled only when either
#              file changes; fails at once, saying why, where the disk has too little room
#   2. build   fusedtie._C as a CUDAExtension for TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"),
#              out of place: `setup.py build --build-base build-cuda`, so the package and its _C
#              land together in build-cuda/lib/fusedtie/ (the in-place fusedtie/_C*.so and build/
#              of `make test` are never touched); ptxas -v on, log in build-cuda/build.log
#   3. import  asserts fusedtie.cuda_compiled, that fusedtie._C is build-cuda's, and a CUDA kernel for every op
#   4. tests   the whole pytest suite (tests/) against it; GPU tests skip without a GPU
#   5. report  ptxas registers/spills per kernel and architecture, and each step's wall time
#
# build-cuda/lib is laid out like the repository (fusedtie/, csrc -> ../../csrc, and copies of tests/,
# benchmarks/ and examples/), and a .pth file puts it on .venv-cuda's sys.path: the suite (and its
# subprocesses, which run `python -c` in the repository root or benchmarks/bench.py, which puts the
# root first on sys.path) then import the CUDA build, never the repository's in-place CPU one. By
# hand, from the repository root: `.venv-cuda/bin/python -P ...` (-P: no CWD on sys.path).
#
# Environment: PYTHON (for the venv), MAX_JOBS (default: nproc), TORCH_CUDA_ARCH_LIST, CUDA_HOME
# (default: the toolkit of the nvcc on PATH, see fusedtie/_build.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv-cuda
VPY=$ROOT/$VENV/bin/python
OUT=build-cuda
VENV_NEEDS_MB=5500 # .venv-cuda as installed: 4.9 GB (torch 1.2, its CUDA libraries 3.2)
LIB=$ROOT/$OUT/lib
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}

step_names=()
step_times=()
step=""
step_start=0
ptxas_ready=0
begin() { step=$1; step_start=$(date +%s); echo "== cuda-build: $step"; }
end() { step_names+=("$step"); step_times+=($(( $(date +%s) - step_start ))); step=""; }
print_times() {
  local i total=0
  echo "== cuda-build: wall time per step"
  for i in "${!step_names[@]}"; do
    printf '  %-8s %5d s\n' "${step_names[$i]}" "${step_times[$i]}"
    total=$(( total + step_times[i] ))
  done
  printf '  %-8s %5d s\n' total "$total"
}
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    [ -n "$step" ] && { step_names+=("$step"); step_times+=($(( $(date +%s) - step_start ))); }
    print_times
    if [ "$ptxas_ready" = 1 ] && [ "$step" != build ]; then
      echo "== cuda-build: ptxas per kernel (see $OUT/ptxas-summary.txt)"
      cat "$OUT/ptxas-summary.txt"
    fi
    echo "make cuda-build: FAILED${step:+ in step '$step'} (exit $rc)" >&2
  fi
}
trap on_exit EXIT

shopt -s nullglob
kernels=(csrc/cuda/*.cu)
shopt -u nullglob
if [ ${#kernels[@]} -eq 0 ]; then
  echo "make cuda-build: csrc/cuda has no .cu kernels yet; nothing to build (skipped)"
  exit 0
fi

mkdir -p "$OUT"

# 1. venv ------------------------------------------------------------------------------------------
begin venv
stamp=$(cat requirements-cuda.txt requirements-dev.txt | sha256sum | cut -c1-16)
if [ -x "$VPY" ] && [ "$(cat "$VENV/.deps" 2>/dev/null)" = "$stamp" ]; then
  echo "   $VENV up to date"
else
  # A CI runner's free disk varies (seen: a few GB); say so plainly before pip fails half-way.
  free_mb=$(df -Pm "$ROOT" | awk 'NR == 2 {print $4}')
  have_mb=$(du -sm "$VENV" 2>/dev/null | cut -f1 || echo 0)
  if [ $(( free_mb + have_mb )) -lt "$VENV_NEEDS_MB" ]; then
    echo "make cuda-build: $VENV needs about $VENV_NEEDS_MB MB on the disk of $ROOT;" \
         "$free_mb MB are free (and $VENV holds $have_mb MB)" >&2
    exit 1
  fi
  [ -x "$VPY" ] || "$PYTHON" -m venv "$VENV"
  # requirements-dev.txt's tools, without its CPU torch pin (requirements-cuda.txt pins torch).
  grep -v -E '^[[:space:]]*torch[[:space:]]*([=<>!~;[]|$)' requirements-dev.txt > "$VENV/requirements-dev-tools.txt"
  echo "   pip install -r requirements-cuda.txt -r requirements-dev.txt (less torch); log $OUT/venv.log"
  {
    # torch without triton (0.9 GB that nothing here runs: no GPU, and inductor on the CPU does
    # not use it): torch alone, then its own requirements less triton, then the tools.
    "$VPY" -m pip install --no-deps -r requirements-cuda.txt &&
      "$VPY" - > "$VENV/requirements-torch.txt" <<'PY' &&
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for line in requires("torch"):
    req = Requirement(line)
    if req.name != "triton" and (req.marker is None or req.marker.evaluate({"extra": ""})):
        print(line.split(";")[0])
PY
      "$VPY" -m pip install -r "$VENV/requirements-torch.txt" -r "$VENV/requirements-dev-tools.txt"
  } > "$OUT/venv.log" 2>&1 || {
    grep -v "is ignored: it is neither a file nor a directory" "$OUT/venv.log" | tail -n 40 >&2
    exit 1
  }
  echo "$stamp" > "$VENV/.deps"
fi
# build-cuda/lib on the venv's sys.path (after site-packages, which holds no fusedtie).
site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$LIB" > "$site/fusedtie-build-cuda.pth"
"$VPY" -c 'import torch; print(f"   torch {torch.__version__} (CUDA {torch.version.cuda})")'
end

# 2. build -----------------------------------------------------------------------------------------
begin build
echo "   ${#kernels[@]} .cu files; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; MAX_JOBS=$MAX_JOBS; log $OUT/build.log"
# --force: setuptools judges staleness by the .cu/.cpp files alone (not the headers); ninja still
# recompiles only what changed, and the link is redone.
set +e
FUSEDTIE_PTXAS_VERBOSE=1 FUSEDTIE_FORCE_CPU=0 "$VPY" setup.py build --force \
    --build-base "$OUT" --build-lib "$LIB" > "$OUT/build.log" 2>&1 &
build_pid=$!
# A line every minute, so that a long build is seen to be alive.
while kill -0 "$build_pid" 2>/dev/null; do
  for _ in $(seq 60); do kill -0 "$build_pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$build_pid" 2>/dev/null; then
    progress=$(grep -o '^\[[0-9]*/[0-9]*\]' "$OUT/build.log" | tail -n1)
    echo "   ... $(( $(date +%s) - step_start )) s, ninja ${progress:-starting}"
  fi
done
wait "$build_pid"
rc=$?
set -e
grep -m1 '^fusedtie setup:' "$OUT/build.log" | sed 's/^/   /' || true
if [ "$rc" -ne 0 ]; then
  echo "make cuda-build: the build failed (exit $rc); full log: $OUT/build.log" >&2
  if grep -q '^FAILED: ' "$OUT/build.log"; then
    # Each failed compilation: ninja's FAILED line and the compiler's output, less the command line.
    awk '/^FAILED: /{on=1; print; getline; next} /^\[[0-9]+\/[0-9]+\] |^ninja: /{on=0} on' \
        "$OUT/build.log" | head -n 150 >&2
  else
    grep -E -n '(: error|error:|fatal error|undefined reference)' "$OUT/build.log" | head -n 60 >&2 || true
    tail -n 15 "$OUT/build.log" >&2
  fi
  exit "$rc"
fi
if ! grep -q '^fusedtie setup: CUDAExtension' "$OUT/build.log"; then
  echo "make cuda-build: setup.py did not build a CUDAExtension (see the line above)" >&2
  exit 1
fi
warnings=$(grep -E '^[^ ]*csrc/cuda/[^ ]*(\([0-9]+\)|:[0-9]+:[0-9]+:) ?:? warning' "$OUT/build.log" | sort -u || true)
if [ -n "$warnings" ]; then
  echo "   compiler warnings in csrc/cuda ($(echo "$warnings" | wc -l); full text in $OUT/build.log):"
  echo "$warnings" | head -n 20 | sed "s|^$ROOT/||; s/^/     /"
fi
# Lay build-cuda/lib out like the repository, for the tests (see the top of this file).
scripts/lay_out_lib.sh "$LIB"
"$VPY" scripts/ptxas_summary.py "$OUT/build.log" --json "$OUT/ptxas.json" --sources csrc/cuda \
    > "$OUT/ptxas-summary.txt"
ptxas_ready=1
end

# 3. import ----------------------------------------------------------------------------------------
begin import
# -P: the repository root (the CWD) stays off sys.path, so its fusedtie/ and in-place _C cannot win.
"$VPY" -P - "$LIB" <<'EOF'
import os, sys
import torch
import fusedtie
lib = os.path.realpath(sys.argv[1])
ext = fusedtie._LIB
where = os.path.realpath(getattr(ext, "__file__", "") or "")
assert ext.__name__ == "fusedtie._C", f"loaded {ext.__name__}, not the prebuilt fusedtie._C"
assert where.startswith(os.path.join(lib, "fusedtie") + os.sep), f"fusedtie._C is {where}, not build-cuda's"
assert os.path.realpath(fusedtie.__file__).startswith(lib + os.sep), f"fusedtie is {fusedtie.__file__}"
assert fusedtie.cuda_compiled is True, "fusedtie.cuda_compiled is False: the CUDA kernels were not compiled in"
names = ("tied_conv2d", "_tied_conv2d_backward", "tied_conv_transpose2d", "_tied_conv_transpose2d_backward",
         "transform", "_transform_backward")
ops = [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedtie::{n}", "CUDA")]
missing = sorted(set(names) - set(ops))
assert not missing, f"no CUDA kernel registered for: {', '.join(missing)}"
print(f"   fusedtie._C: {os.path.relpath(where)}; cuda_compiled=True; "
      f"CUDA kernels for: {', '.join(ops) or 'none'}; torch.cuda.is_available()={torch.cuda.is_available()}")
EOF
end

# 4. tests -----------------------------------------------------------------------------------------
begin tests
echo "   .venv-cuda/bin/python -m pytest -q tests   (in $OUT/lib; log $OUT/tests.log)"
# --rootdir: else pytest takes the repository (its setup.py) as rootdir and writes .pytest_cache there.
( cd "$LIB" && "$VPY" -m pytest -q --rootdir "$LIB" tests ) 2>&1 | tee "$OUT/tests.log"
end

# 5. report ----------------------------------------------------------------------------------------
echo "== cuda-build: ptxas per kernel (registers; spill stores/loads, stack frame, static shared" \
     "memory in bytes), ${TORCH_CUDA_ARCH_LIST}"
cat "$OUT/ptxas-summary.txt"
print_times
echo "make cuda-build: OK"
