#!/usr/bin/env bash
# scripts/lay_out_lib.sh LIB: an out-of-place build's lib folder (build-cuda/lib, build-sanitize/lib)
# laid out like the repository, so that the suite runs against its fusedtie/: csrc -> ../../csrc,
# and fresh copies of tests/, benchmarks/ and examples/. Run from the repository root.
set -euo pipefail
LIB=$1
ln -sfn ../../csrc "$LIB/csrc"
rm -rf "$LIB/tests" "$LIB/benchmarks" "$LIB/examples"
cp -r tests benchmarks examples "$LIB/"
find "$LIB/tests" "$LIB/benchmarks" "$LIB/examples" -name __pycache__ -prune -exec rm -rf {} +
