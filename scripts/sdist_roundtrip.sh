#!/usr/bin/env bash
# CI: the sdist builds and works on its own, away from the repository.
#
#   1. sdist    python -m build --sdist --no-isolation (the build package, requirements-dev.txt)
#   2. contents the sdist holds every file git has under csrc/ and fusedtie/ (tracked, or untracked
#               and not ignored), and no build output (*.so, *.o, build/, .venv*)
#   3. venv     a fresh venv with the torch release the build side has (pip installs it from the
#               local wheel or cache: about 20-30 s here), numpy (torch warns without it),
#               setuptools and ninja
#   4. wheel    pip wheel --no-build-isolation --no-deps <sdist> (compiles the extension, as
#               `pip install <sdist>` does; MAX_JOBS, default 2), then pip install of that wheel
#   5. check    in a folder outside the repository: the prebuilt fusedtie._C loads (no JIT build),
#               py.typed and include/*.h are installed, the torch requirement is the built minor
#               release and pip check agrees, a forward and backward against F.conv2d, and
#               `python -m fusedtie`
#
# Environment: BUILD_PYTHON (the build side; default .venv/bin/python), MAX_JOBS (default 2),
# TORCH_SPEC (what the fresh venv installs; default torch==<the build side's release>),
# KEEP=1 (keep the temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${BUILD_PYTHON:-$ROOT/.venv/bin/python}
export MAX_JOBS=${MAX_JOBS:-2}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fusedtie-sdist.XXXXXX")
VENV=$WORK/venv
VPY=$VENV/bin/python

step_names=()
step_times=()
step=""
step_start=0
begin() { step=$1; step_start=$(date +%s); echo "== sdist-roundtrip: $step"; }
end() { step_names+=("$step"); step_times+=($(( $(date +%s) - step_start ))); step=""; }
print_times() {
  local i total=0
  echo "== sdist-roundtrip: wall time per step"
  for i in "${!step_names[@]}"; do
    printf '  %-9s %5d s\n' "${step_names[$i]}" "${step_times[$i]}"
    total=$(( total + step_times[i] ))
  done
  printf '  %-9s %5d s\n' total "$total"
}
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    [ -n "$step" ] && { step_names+=("$step"); step_times+=($(( $(date +%s) - step_start ))); }
    print_times
    echo "sdist-roundtrip: FAILED${step:+ in step '$step'} (exit $rc)" >&2
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "sdist-roundtrip: kept $WORK"; else rm -rf "$WORK"; fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP # so that on_exit cleans up after these too

# Runs a command with its output in a log, which is shown (the end of it) only if the command fails.
logged() {
  local log=$1
  shift
  if ! "$@" > "$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 60 >&2
    echo "sdist-roundtrip: '$*' failed; log above ($log)" >&2
    return 1
  fi
}

"$PY" -c 'import build' 2>/dev/null || {
  echo "sdist-roundtrip: $PY has no 'build' package: pip install -r requirements-dev.txt" >&2
  exit 1
}
torch_release=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
TORCH_SPEC=${TORCH_SPEC:-torch==$torch_release}

# 1. sdist -----------------------------------------------------------------------------------------
begin sdist
# setuptools adds the files listed in a previous build's fusedtie.egg-info/SOURCES.txt to the sdist,
# which would hide a file that MANIFEST.in no longer includes: start without one, leave none behind.
rm -rf "$ROOT/fusedtie.egg-info"
logged "$WORK/sdist.log" "$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" "$ROOT"
sdists=("$WORK"/dist/*.tar.gz)
SDIST=${sdists[0]}
rm -rf "$ROOT/fusedtie.egg-info"
tar -tzf "$SDIST" | grep -v '/$' | sed 's|^[^/]*/||' | LC_ALL=C sort > "$WORK/sdist-files.txt"
echo "   $(basename "$SDIST"): $(wc -l < "$WORK/sdist-files.txt") files, $(du -k "$SDIST" | cut -f1) KiB"
echo "   sdist PKG-INFO: $(tar -xzOf "$SDIST" "$(basename "$SDIST" .tar.gz)/PKG-INFO" | grep '^Requires-Dist: torch')"
end

# 2. contents --------------------------------------------------------------------------------------
begin contents
if git -C "$ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  git -C "$ROOT" ls-files --cached --others --exclude-standard csrc fusedtie | LC_ALL=C sort -u |
    while read -r f; do [ -f "$ROOT/$f" ] && echo "$f"; done > "$WORK/git-files.txt"
  missing=$(LC_ALL=C comm -23 "$WORK/git-files.txt" "$WORK/sdist-files.txt")
  if [ -n "$missing" ]; then
    echo "sdist-roundtrip: the sdist lacks these files under csrc/ and fusedtie/ (see MANIFEST.in):" >&2
    echo "$missing" | sed 's/^/     /' >&2
    exit 1
  fi
  echo "   every file of csrc/ and fusedtie/ ($(wc -l < "$WORK/git-files.txt")) is in the sdist"
else
  echo "   not a git work tree: the comparison with git's files is skipped"
fi
outputs=$(grep -E '(\.so|\.o|\.pyc)$|^(build|build-cuda|dist|\.venv[^/]*)/' "$WORK/sdist-files.txt" || true)
if [ -n "$outputs" ]; then
  echo "sdist-roundtrip: build outputs in the sdist (see MANIFEST.in):" >&2
  echo "$outputs" | head -n 20 | sed 's/^/     /' >&2
  exit 1
fi
end

# 3. venv ------------------------------------------------------------------------------------------
begin venv
"$PY" -m venv "$VENV"
echo "   $VENV: pip install $TORCH_SPEC numpy setuptools>=77 ninja"
logged "$WORK/venv.log" "$VPY" -m pip install "$TORCH_SPEC" numpy "setuptools>=77" ninja
"$VPY" -c 'import torch; print(f"   torch {torch.__version__}")'
end

# 4. wheel -----------------------------------------------------------------------------------------
begin wheel
echo "   pip wheel --no-build-isolation --no-deps $(basename "$SDIST") (MAX_JOBS=$MAX_JOBS)"
# The venv's bin first on PATH: the build then finds the venv's ninja.
PATH="$VENV/bin:$PATH" logged "$WORK/wheel.log" \
  "$VPY" -m pip wheel -v --no-build-isolation --no-deps --wheel-dir "$WORK/wheels" "$SDIST"
grep -m2 '^ *fusedtie setup:' "$WORK/wheel.log" | sed 's/^ */   /' || true
wheels=("$WORK"/wheels/fusedtie-*.whl)
WHEEL=${wheels[0]}
echo "   $(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KiB"
logged "$WORK/install.log" "$VPY" -m pip install --no-deps "$WHEEL"
end

# 5. check -----------------------------------------------------------------------------------------
begin check
mkdir -p "$WORK/elsewhere"
cd "$WORK/elsewhere"
export FUSEDTIE_CACHE_DIR=$WORK/jit-cache # a JIT build, were one to start, stays in $WORK
logged "$WORK/pip-check.log" "$VPY" -m pip check
echo "   pip check: $(cat "$WORK/pip-check.log")"
"$VPY" - "$ROOT" "$WHEEL" <<'EOF'
import glob, importlib.metadata as md, os, sys, zipfile
import torch, torch.nn.functional as F
import fusedtie

root, wheel = sys.argv[1], sys.argv[2]
pkg = os.path.dirname(os.path.realpath(fusedtie.__file__))
assert pkg.startswith(sys.prefix), f"fusedtie imported from {pkg}, not from the venv {sys.prefix}"
assert fusedtie._LIB.__name__ == "fusedtie._C", f"loaded {fusedtie._LIB.__name__}, not the prebuilt fusedtie._C"
assert os.path.isfile(os.path.join(pkg, "py.typed")), "py.typed is not installed"
want = sorted(os.path.basename(h) for h in glob.glob(os.path.join(root, "fusedtie", "include", "*.h")))
have = sorted(os.path.basename(h) for h in glob.glob(os.path.join(pkg, "include", "*.h")))
assert want and have == want, f"include/*.h installed: {have}, expected {want}"
names = zipfile.ZipFile(wheel).namelist()
stray = [n for n in names if n.startswith(("csrc/", "tests/", "build/")) or n.endswith(".o")]
assert not stray, f"the wheel carries {stray[:5]}"
assert any(n.endswith("licenses/LICENSE") for n in names), "the wheel has no LICENSE"
assert md.version("fusedtie") == fusedtie.__version__, (md.version("fusedtie"), fusedtie.__version__)
requires = [r for r in md.requires("fusedtie") if r.startswith("torch")]
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
assert len(requires) == 1 and f"<{major}.{minor + 1}" in requires[0], f"torch requirement {requires}"

torch.manual_seed(0)
x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
b = torch.randn(4, dtype=torch.float64, requires_grad=True)
y = fusedtie.tied_conv2d(x, w, b, transform="tanh", stride=2, padding=1)
ref = F.conv2d(x, torch.tanh(w), b, stride=2, padding=1)
torch.testing.assert_close(y, ref)
grads = torch.autograd.grad(y.square().sum(), (w, b))
ref_grads = torch.autograd.grad(ref.square().sum(), (w, b))
torch.testing.assert_close(grads, ref_grads)
conv = torch.nn.Conv2d(3, 3, 3, padding=1)
tied = fusedtie.FusedTiedConv2d(conv, transform="square", bias="same")
xf = torch.randn(1, 3, 8, 8)
torch.testing.assert_close(tied(xf), F.conv2d(xf, conv.weight.square(), conv.bias, padding=1))
print(f"   fusedtie {fusedtie.__version__} from {pkg}")
print(f"   extension {os.path.basename(fusedtie._LIB.__file__)}; cuda_compiled={fusedtie.cuda_compiled}")
print(f"   Requires-Dist: {requires[0]}; py.typed and include/{', '.join(have)} installed")
print("   tied_conv2d (tanh, float64) forward and backward match F.conv2d; FusedTiedConv2d (square) too")
EOF
if "$VPY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("fusedtie.__main__") is None)'; then
  echo "   python -m fusedtie:"
  logged "$WORK/main.log" "$VPY" -m fusedtie
  sed 's/^/     /' "$WORK/main.log"
else
  echo "   python -m fusedtie: NOT RUN, the installed package has no fusedtie/__main__.py"
fi
cd "$ROOT"
end

print_times
echo "sdist-roundtrip: OK"
