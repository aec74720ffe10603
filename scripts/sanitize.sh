#!/usr/bin/env bash
# `make sanitize`: the CPU extension under AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   1. build   fusedtie._C with FUSEDTIE_SANITIZE=1 (fusedtie/_build.py: sanitizer_flags), CPU only,
#              out of place in build-sanitize/ (never fusedtie/_C*.so or build/ of `make test`)
#   2. tests   the suites that drive the C++ (SUITES below, the bounded fuzzer among them) with
#              libasan preloaded into Python, from build-sanitize/lib, which is laid out like the
#              repository (fusedtie/, csrc -> ../../csrc, copies of tests/, benchmarks/, examples/)
#
# A report fails the run: ASan stops at its first error, UBSan at its first report
# (-fno-sanitize-recover); reports are written to build-sanitize/reports/ and printed at the end.
# PyTorch and CPython are not instrumented: ASan checks every access our code makes, and catches
# damage others do to memory only where it hits a red zone of ASan's allocator. The options:
#   detect_leaks=0           CPython and torch keep allocations until exit by design
#   allocator_may_return_null=1
#                            a huge request returns null, so torch raises its own "can't allocate"
#                            RuntimeError (as without ASan) and the tests of that error hold
#   handle_segv=0, handle_sigbus=0, handle_sigfpe=0
#                            a signal stays a signal, which the fuzzer's harness reports with its
#                            call (its own test crashes a child on purpose)
# Checked to fail: a scratch buffer allocated one float short (csrc/cpu/scratch.cpp) gave a
# heap-buffer-overflow report in im2col_transposed, and the run failed.
#
# Environment: PYTHON (the venv's python), MAX_JOBS, SUITES (pytest arguments; default below).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VPY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=build-sanitize
LIB=$ROOT/$OUT/lib
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
# The suites that run our C++ on every path: each CPU algorithm on the op grid and its edges, the
# crash regressions and the fuzzer (kept cases and the bounded run), bad input, non-finite values,
# caches and user transforms (our loader), modules, the Linear (skinny GEMMs) and 3-d operators.
# Left out, for time: property tests (hypothesis, same kernels), compile/export in their own files,
# the example, the benchmark harness and the build tests.
SUITES=${SUITES:-tests/test_op_grid.py tests/test_cpu_algorithms.py tests/test_crash_regressions.py \
tests/test_fuzz.py tests/test_bad_input.py tests/test_nonfinite.py tests/test_conv_transpose.py \
tests/test_module.py tests/test_user_transforms.py tests/test_cache.py tests/test_determinism.py \
tests/test_transform_accuracy.py tests/test_call_paths.py tests/test_linear.py tests/test_conv3d.py}

start=$(date +%s)
mkdir -p "$OUT"
echo "== sanitize: build (ASan + UBSan, CPU only; log $OUT/build.log)"
# --force: setuptools judges staleness by the .cpp files alone, not the headers.
if ! FUSEDTIE_SANITIZE=1 FUSEDTIE_FORCE_CPU=1 "$VPY" setup.py build --force \
    --build-base "$OUT" --build-lib "$LIB" > "$OUT/build.log" 2>&1; then
  grep -E -n '(: error|error:|fatal error|undefined reference)' "$OUT/build.log" | head -n 60 >&2 || true
  tail -n 15 "$OUT/build.log" >&2
  echo "make sanitize: the build failed; full log: $OUT/build.log" >&2
  exit 1
fi
grep -q '^fusedtie setup: .*ASan+UBSan' "$OUT/build.log" || {
  echo "make sanitize: setup.py did not build with the sanitizers (see $OUT/build.log)" >&2
  exit 1
}
scripts/lay_out_lib.sh "$LIB"
echo "   built in $(( $(date +%s) - start )) s"

libasan=$(gcc -print-file-name=libasan.so)
libstdcxx=$(gcc -print-file-name=libstdc++.so.6)
[ -e "$libasan" ] || { echo "make sanitize: gcc has no libasan.so ($libasan)" >&2; exit 1; }
# libstdc++ too: python does not link it, and ASan's __cxa_throw interceptor, set up when libasan
# loads, aborts on the first C++ exception unless libstdc++ was loaded before it ran.
export LD_PRELOAD="$libasan $libstdcxx"
# Reports go to files (pytest captures stderr, and a process ASan aborts takes its capture along);
# any report fails the run and is printed at the end.
REPORTS=$ROOT/$OUT/reports
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:handle_segv=0:handle_sigbus=0:handle_sigfpe=0:log_path=$REPORTS/asan
export UBSAN_OPTIONS=print_stacktrace=1:log_path=$REPORTS/ubsan
# build-sanitize/lib before site-packages, where .venv's editable install would find the repository's
# fusedtie/ (with -P, the CWD is not on sys.path either).
export PYTHONPATH=$LIB${PYTHONPATH:+:$PYTHONPATH}
tests_start=$(date +%s)
echo "== sanitize: tests (in $OUT/lib, LD_PRELOAD=$LD_PRELOAD; log $OUT/tests.log)"
( cd "$LIB" && "$VPY" -P - "$LIB" <<'EOF'
import os, sys
import fusedtie
where = os.path.realpath(fusedtie._LIB.__file__)
assert where.startswith(os.path.realpath(sys.argv[1]) + os.sep), f"fusedtie._C is {where}, not build-sanitize's"
print(f"   fusedtie._C: {where}")
EOF
)
set +e
# shellcheck disable=SC2086  # SUITES is a list of pytest arguments
( cd "$LIB" && "$VPY" -P -m pytest -q --rootdir "$LIB" -p no:cacheprovider $SUITES ) 2>&1 | tee "$OUT/tests.log"
rc=${PIPESTATUS[0]}
set -e
echo "== sanitize: tests took $(( $(date +%s) - tests_start )) s; total $(( $(date +%s) - start )) s"
# A report is an error (ASan's "ERROR:", UBSan's "runtime error:", a failed CHECK). ASan also logs a
# warning when it refuses a huge allocation (allocator_may_return_null): tests ask for those on
# purpose and expect torch's error, so these are counted, not failed.
errors=$(grep -l -E 'ERROR: |runtime error:|CHECK failed' "$REPORTS"/* 2>/dev/null || true)
refused=$( (grep -l 'failed to allocate' "$REPORTS"/* 2>/dev/null || true) | wc -l)
echo "   ASan refused $refused huge allocation(s) (tests that expect torch's allocation error)"
if [ -n "$errors" ]; then
  echo "make sanitize: $(echo "$errors" | wc -l) sanitizer report(s) in $OUT/reports:" >&2
  for report in $errors; do
    echo "--- $report" >&2
    head -n 60 "$report" >&2
  done
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  echo "make sanitize: the tests failed (exit $rc); log: $OUT/tests.log" >&2
  exit "$rc"
fi
echo "make sanitize: OK, no sanitizer reports"
