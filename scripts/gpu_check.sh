#!/usr/bin/env bash
# The GPU check: one prepared run for a machine with an NVIDIA GPU, from the repository root.
#
#   bash scripts/gpu_check.sh            # results in $OUT (default ./gpu-results)
#
# Steps, each time-boxed with `timeout`; a failed step does not stop the later ones, and the
# script exits non-zero at the end if any step failed, timed out or had no time left to run:
#   1. info       nvidia-smi, torch/CUDA versions, the GPU              -> gpu-check.log
#   2. build      JIT build of the extension for this GPU's architecture -> build.log
#   3. test-cuda  pytest -m cuda tests (every CUDA test or parameter)   -> test-cuda.log, test-cuda-junit.xml
#   4. sanitizer  compute-sanitizer memcheck: forward+backward once through each forced CUDA
#                 algorithm (fused, library) in float32 and bfloat16, both operators -> sanitizer.log
#   5. bench      benchmarks/bench.py --device cuda --quick              -> bench-cuda.log, bench-cuda.json
#   6. test-rest  (only with RUN_REST=1) the rest of the suite            -> test-rest.log
# At most 8 files land in $OUT (the device tool brings back 8). Every step's one-line result is
# printed and appended to gpu-check.log.
#
# Knobs (environment):
#   OUT                    where the results go (default ./gpu-results)
#   PYTHON                 the interpreter with torch (default python3)
#   GPU_CHECK_BUDGET_S     the whole run (default 420 s: even a run whose every step hits its cap
#                          ends within 8 minutes); no step runs past it
#   BUILD_TIMEOUT_S, TEST_TIMEOUT_S, SANITIZER_TIMEOUT_S, BENCH_TIMEOUT_S, REST_TIMEOUT_S
#                          each step's own cap (270, 200, 150, 150, 150 s)
#   TORCH_CUDA_ARCH_LIST   default: this GPU's compute capability, e.g. 9.0
#   CUDA_HOME              default: the toolkit of the nvcc on PATH, else /usr/local/cuda
#   FUSEDTIE_CACHE_DIR     the JIT build folder (default: a fresh temporary folder)
#   FUSEDTIE_PTXAS_VERBOSE default 1: every kernel's registers, spills and shared memory in build.log
#   BENCH_COMPILE          bench.py --compile (default none: max-autotune alone takes minutes)
#   BENCH_ARGS, PYTEST_ARGS  extra flags for bench.py and for the test-cuda pytest run
#   RUN_REST=1             also run the rest of the suite
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
LOG="$OUT/gpu-check.log"
: >"$LOG"

START=$(date +%s)
BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"
DEADLINE=$((START + BUDGET_S))
FAILED=0
SUMMARY=()

log() { echo "$*" | tee -a "$LOG"; }

# run_step NAME CAP_S LOGFILE COMMAND...: runs COMMAND under `timeout`, capped by what is left of
# the budget; sets STEP_STATUS (PASS, FAIL, TIMEOUT or NOTIME), STEP_RC and STEP_S.
run_step() {
  local name="$1" cap="$2" logfile="$3"
  shift 3
  local now left limit t0
  now=$(date +%s)
  left=$((DEADLINE - now))
  limit=$((cap < left ? cap : left))
  STEP_RC=0
  STEP_S=0
  if ((limit < 20)); then
    STEP_STATUS=NOTIME
    echo "step $name: not run, ${left}s of the ${BUDGET_S}s budget left" >"$logfile"
    return 0
  fi
  log "--- step $name (at most ${limit}s): $*"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$logfile" 2>&1 || STEP_RC=$?
  STEP_S=$(($(date +%s) - t0))
  if ((STEP_RC == 0)); then
    STEP_STATUS=PASS
  elif ((STEP_RC == 124 || STEP_RC == 137)); then
    STEP_STATUS=TIMEOUT
  else
    STEP_STATUS=FAIL
  fi
  return 0
}

# record NAME STATUS DETAIL: one summary line; anything but PASS and SKIP fails the run.
record() {
  local line="step $1: $2 $3"
  SUMMARY+=("$line")
  log "$line"
  case "$2" in
    PASS | SKIP*) ;;
    *) FAILED=1 ;;
  esac
}

tail_into_log() {  # the last lines of a step's log, indented, into gpu-check.log
  [[ -f "$1" ]] && tail -n "${2:-8}" "$1" | sed 's/^/    /' >>"$LOG" || true
}

# --- 1. info -------------------------------------------------------------------------------------
{
  echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), repo $REPO, commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "gpu_check: budget ${BUDGET_S}s, results in $OUT"
  echo "--- nvidia-smi"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
  echo "--- python and torch"
  "$PY" - <<'PY' 2>&1 || echo "torch failed to import or see the GPU"
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, "| capability %d.%d" % (p.major, p.minor), "| SMs", p.multi_processor_count,
          "| memory %.1f GiB" % (p.total_memory / 2**30))
PY
  echo "--- tools"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc not on PATH"
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2 || echo "compute-sanitizer not on PATH"
  echo "nproc $(nproc)"
} >>"$LOG" 2>&1
cat "$LOG"

# --- environment shared by every step --------------------------------------------------------------
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" && -n "$ARCH" ]]; then
  export TORCH_CUDA_ARCH_LIST="$ARCH"
fi
export FUSEDTIE_FORCE_JIT=1
# torch finds CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit: name the
# toolkit (the folder with include/cuda_runtime.h) when it is not set.
if [[ -z "${CUDA_HOME:-}" ]]; then
  for candidate in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")" \
    /usr/local/cuda; do
    if [[ -f "$candidate/include/cuda_runtime.h" ]]; then
      export CUDA_HOME="$candidate"
      break
    fi
  done
fi
# registers, spills and shared memory of every kernel in build.log (set for every step: it is part
# of the build flags, and a step with other flags would rebuild)
export FUSEDTIE_PTXAS_VERBOSE="${FUSEDTIE_PTXAS_VERBOSE:-1}"
export FUSEDTIE_CACHE_DIR="${FUSEDTIE_CACHE_DIR:-$(mktemp -d /tmp/fusedtie-jit.XXXXXX)}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"  # for torch.use_deterministic_algorithms
WORK="$(mktemp -d /tmp/gpu-check.XXXXXX)"
log "env: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} CUDA_HOME=${CUDA_HOME:-unset} FUSEDTIE_CACHE_DIR=$FUSEDTIE_CACHE_DIR MAX_JOBS=$MAX_JOBS"
if [[ -n "$ARCH" ]]; then
  record info PASS "($("$PY" -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__)' 2>&1), capability $ARCH)"
else
  record info FAIL "(torch sees no CUDA device; nothing else runs)"
fi

# --- 2. build ------------------------------------------------------------------------------------
cat >"$WORK/build.py" <<'PY'
import sys, time
t0 = time.time()
import torch
import fusedtie
from fusedtie import _build
print(f"fusedtie loaded in {time.time() - t0:.1f}s from {getattr(fusedtie._LIB, '__file__', '?')}")
print("cuda build decision:", _build.cuda_build_decision())
print("fusedtie.cuda_compiled:", fusedtie.cuda_compiled, "| transforms:", fusedtie.available_transforms())
sys.exit(0 if fusedtie.cuda_compiled else 3)
PY
BUILT=0
if [[ -z "$ARCH" ]]; then
  STEP_STATUS=NOT-RUN STEP_S=0  # no GPU: a CPU-only build would only spend the budget
else
  run_step build "${BUILD_TIMEOUT_S:-270}" "$OUT/build.log" env FUSEDTIE_VERBOSE_BUILD=1 "$PY" "$WORK/build.py"
  tail_into_log "$OUT/build.log" 4
fi
case "$STEP_STATUS" in
  PASS) BUILT=1; record build PASS "(${STEP_S}s; log build.log)" ;;
  NOT-RUN) record build NOT-RUN "(no GPU)" ;;
  FAIL) record build FAIL "(rc=$STEP_RC after ${STEP_S}s: $( ((STEP_RC == 3)) && echo 'built without CUDA' || echo 'build error'); log build.log)" ;;
  *) record build "$STEP_STATUS" "(after ${STEP_S}s; log build.log)" ;;
esac

needs_build() {  # NAME: record a step that cannot run without the extension
  record "$1" "NOT-RUN" "(the build failed)"
}

# --- 3. the CUDA tests -----------------------------------------------------------------------------
if ((BUILT)); then
  # shellcheck disable=SC2086
  run_step test-cuda "${TEST_TIMEOUT_S:-260}" "$OUT/test-cuda.log" \
    "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=15 \
    --junitxml="$OUT/test-cuda-junit.xml" -m cuda tests ${PYTEST_ARGS:-}
  tail_into_log "$OUT/test-cuda.log" 3
  counts="$(grep -E '[0-9]+ (passed|failed|skipped|errors?).* in [0-9.]+s' "$OUT/test-cuda.log" | tail -n 1 || true)"
  if [[ "$STEP_STATUS" == PASS ]] && ! grep -qE '[0-9]+ passed' <<<"$counts"; then
    STEP_STATUS=FAIL-NONE-PASSED  # everything skipped on a GPU machine is a failure of the check
  fi
  record test-cuda "$STEP_STATUS" "(${STEP_S}s: ${counts:-no pytest summary}; log test-cuda.log, test-cuda-junit.xml)"
else
  needs_build test-cuda
fi

# --- 4. compute-sanitizer memcheck -------------------------------------------------------------------
cat >"$WORK/sanitizer_check.py" <<'PY'
"""Forward + backward once through each forced CUDA algorithm, float32 and bfloat16, on small shapes
(channel counts and sizes mostly not multiples of a tile, channels_last, groups, depthwise), checked
loosely against F.conv2d in float64. Under memcheck: any out-of-bounds access is reported."""
import sys

import torch
import torch.nn.functional as F

import fusedtie

assert torch.cuda.is_available() and fusedtie.cuda_compiled, "needs the CUDA build"
torch.backends.cudnn.allow_tf32 = False
F_REF = {"square": lambda t: t * t, "tanh": torch.tanh, "softplus": F.softplus, "exp": torch.exp,
         "identity": lambda t: t}
# (batch, cin, cout, hw, kernel, stride, padding, dilation, groups, channels_last, f, bias f)
CASES = [
    (2, 12, 20, (13, 11), (3, 3), 1, 1, 1, 1, False, "square", "identity"),
    (2, 12, 20, (13, 11), (3, 3), 1, 1, 1, 1, True, "tanh", "tanh"),
    (3, 8, 8, (9, 10), (5, 4), (2, 1), 0, 1, 2, False, "softplus", "identity"),
    (2, 16, 16, (12, 9), (3, 3), 1, 1, 2, 16, False, "exp", "identity"),
]


def make_leaves(x_shape, w_shape, bias_size, dtype, channels_last):
    """(x, w, b) on the GPU in dtype, requiring gradients; x and w channels-last if asked."""
    x = torch.randn(x_shape, device="cuda").to(dtype)
    w = (torch.randn(w_shape, device="cuda") * 0.3).to(dtype)
    b = (torch.randn(bias_size, device="cuda") * 0.3).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        w = w.to(memory_format=torch.channels_last)
    return [t.requires_grad_(True) for t in (x, w, b)]


def check(leaves, out, grads, grad_out, reference, what):
    """Output and gradients against reference(x, w, b) in float64, relative to the largest value;
    prints one line, returns whether all are within tolerance (False on NaN too)."""
    torch.cuda.synchronize()
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = reference(*l64)
    refs = [ref, *torch.autograd.grad(ref, l64, grad_out.double())]
    rtol = 2e-5 if out.dtype == torch.float32 else 3e-2
    errs = [(got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
            for got, want in zip([out, *grads], refs)]
    ok = all(e <= rtol for e in errs)
    print(f"{'ok ' if ok else 'BAD'} {what}: relative errors " + " ".join(f"{e:.1e}" for e in errs))
    return ok


torch.manual_seed(0)
bad = 0
for algorithm in ("fused", "library"):
    for dtype in (torch.float32, torch.bfloat16):
        for (n, cin, cout, hw, k, stride, padding, dilation, groups, cl, f, bf) in CASES:
            leaves = x, w, b = make_leaves((n, cin, *hw), (cout, cin // groups, *k), cout, dtype, cl)
            with fusedtie.use_cuda_conv_algorithm(algorithm):
                out = fusedtie.tied_conv2d(x, w, b, f, bf, stride, padding, dilation, groups)
                g = torch.randn(out.shape, device="cuda").to(dtype)
                grads = torch.autograd.grad(out, leaves, g)
            bad += not check(leaves, out, grads, g,
                             lambda x, w, b: F.conv2d(x, F_REF[f](w), F_REF[bf](b), stride, padding, dilation,
                                                      groups),
                             f"{algorithm:7s} {str(dtype):14s} x{list(x.shape)} w{list(w.shape)} groups={groups} "
                             f"channels_last={cl} {f}/{bf}")
# the transposed operator, whose fused path runs the same kernels with their roles swapped:
# (batch, cin, cout, hw, kernel, stride, padding, output_padding, groups, channels_last, f)
TRANSPOSE_CASES = [
    (2, 12, 20, (7, 6), (3, 3), 2, 1, 1, 1, False, "square"),
    (2, 16, 8, (6, 5), (4, 4), 2, 1, 0, 1, True, "tanh"),
    (2, 16, 24, (9, 8), (3, 3), 1, 1, 0, 2, False, "softplus"),
]
for algorithm in ("fused", "library"):
    for dtype in (torch.float32, torch.bfloat16):
        for (n, cin, cout, hw, k, stride, padding, output_padding, groups, cl, f) in TRANSPOSE_CASES:
            leaves = x, w, b = make_leaves((n, cin, *hw), (cin, cout // groups, *k), cout, dtype, cl)
            with fusedtie.use_cuda_conv_algorithm(algorithm):
                out = fusedtie.tied_conv_transpose2d(x, w, b, f, stride, padding, output_padding, groups)
                g = torch.randn(out.shape, device="cuda").to(dtype)
                grads = torch.autograd.grad(out, leaves, g)
            bad += not check(leaves, out, grads, g,
                             lambda x, w, b: F.conv_transpose2d(x, F_REF[f](w), b, stride, padding, output_padding,
                                                                groups),
                             f"{algorithm:7s} {str(dtype):14s} transposed x{list(x.shape)} w{list(w.shape)} "
                             f"groups={groups} channels_last={cl} {f}")
print(f"sanitizer_check: {bad} mismatches")
sys.exit(1 if bad else 0)
PY
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
if ((!BUILT)); then
  needs_build sanitizer
elif [[ -z "$SANITIZER" ]]; then
  record sanitizer "SKIP" "(compute-sanitizer not found)"
else
  run_step sanitizer "${SANITIZER_TIMEOUT_S:-150}" "$OUT/sanitizer.log" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --report-api-errors no --error-exitcode 86 --print-limit 50 \
    "$PY" "$WORK/sanitizer_check.py"
  tail_into_log "$OUT/sanitizer.log" 3
  summary="$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -n 1 || true)"
  if [[ "$STEP_STATUS" != PASS ]] && grep -qE 'Device not supported|not supported on this platform' "$OUT/sanitizer.log"; then
    record sanitizer "SKIP-UNSUPPORTED" "(compute-sanitizer cannot run on this machine; log sanitizer.log)"
  elif [[ "$STEP_STATUS" == FAIL && "$STEP_RC" == 86 ]]; then
    record sanitizer FAIL "(memcheck found errors after ${STEP_S}s: ${summary:-?}; log sanitizer.log)"
  else
    record sanitizer "$STEP_STATUS" "(rc=$STEP_RC after ${STEP_S}s: ${summary:-no sanitizer summary}; log sanitizer.log)"
  fi
fi

# --- 5. the benchmark's CUDA suite -----------------------------------------------------------------
if ((BUILT)); then
  read -r -a bench_extra <<<"${BENCH_ARGS:-}"
  # --quick paces itself to about 110 s; with less than that left, a shorter run (float32 only,
  # 1 s of timed repetitions a case, unpaced) still gives every case a number.
  if (($(date +%s) + 140 > DEADLINE)); then
    bench_extra=(--dtype float32 --case-budget 1 ${bench_extra[@]+"${bench_extra[@]}"})
    log "bench: less than 140 s left, so the short form: ${bench_extra[*]}"
  fi
  run_step bench "${BENCH_TIMEOUT_S:-150}" "$OUT/bench-cuda.log" \
    "$PY" benchmarks/bench.py --device cuda --quick --compile "${BENCH_COMPILE:-none}" \
    --json "$OUT/bench-cuda.json" ${bench_extra[@]+"${bench_extra[@]}"}
  tail_into_log "$OUT/bench-cuda.log" 4
  record bench "$STEP_STATUS" "(rc=$STEP_RC after ${STEP_S}s; log bench-cuda.log, bench-cuda.json)"
else
  needs_build bench
fi

# --- 6. optional: the rest of the suite ------------------------------------------------------------
if [[ "${RUN_REST:-0}" == 1 ]]; then
  if ((BUILT)); then
    run_step test-rest "${REST_TIMEOUT_S:-150}" "$OUT/test-rest.log" \
      "$PY" -m pytest -q -p no:cacheprovider -x -m "not cuda" tests
    counts="$(grep -E '[0-9]+ (passed|failed|skipped|errors?).* in [0-9.]+s' "$OUT/test-rest.log" | tail -n 1 || true)"
    record test-rest "$STEP_STATUS" "(${STEP_S}s: ${counts:-no pytest summary}; log test-rest.log)"
  else
    needs_build test-rest
  fi
fi

rm -rf "$WORK"
log "=== gpu_check summary ($(($(date +%s) - START))s of ${BUDGET_S}s; files in $OUT: $(ls "$OUT" | tr '\n' ' '))"
for line in ${SUMMARY[@]+"${SUMMARY[@]}"}; do
  log "$line"
done
if ((FAILED)); then
  log "gpu_check: FAILED"
  exit 1
fi
log "gpu_check: all steps passed"
