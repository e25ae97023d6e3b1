#!/usr/bin/env bash
# Creates ./.venv (when missing) and installs specext with its test extra into it.
#
# torch is pinned: an unpinned torch would pull a multi-GB CUDA build.
#
# Re-running is cheap (about a second) when nothing the install is made of has changed: the
# SHA-256 of csrc/, python/, CMakeLists.txt, pyproject.toml and the build variables is
# recorded in .venv/.specext-setup after a successful install, and a re-run with the same
# hash only checks that the installed extension imports. When something changed, the
# package is rebuilt without pip's build isolation, with pinned build tools installed in
# .venv, into the persistent build directory build/<wheel tag>/: the build environment is
# the same on every run, so CMake keeps its configuration and ninja compiles only the
# changed sources. SPECEXT_SETUP_FORCE=1 reinstalls regardless of the recorded hash.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${SPECEXT_TORCH:-torch==2.13.0}
# The build backend and its tools, pinned, so that the build environment never changes.
BUILD_DEPS=(scikit-build-core==1.1.2 pybind11==3.1.0 cmake==4.4.5 ninja==1.13.2)
STAMP=.venv/.specext-setup
VPY=.venv/bin/python

[ -x "$VPY" ] || { "$PY" -m venv .venv && "$VPY" -m pip install -q --upgrade pip; }

# Everything the installed package is built from, and the options it is built with.
inputs_hash() {
  SETUP_ENV="torch=$TORCH_SPEC build=${BUILD_DEPS[*]} cuda=${SPECEXT_CUDA:-} archs=${SPECEXT_CUDA_ARCHS:-} cudacxx=${CUDACXX:-} nvcc=$(command -v nvcc || true)" \
  "$VPY" -I - <<'EOF'
import hashlib, os
h = hashlib.sha256(os.environ["SETUP_ENV"].encode() + b"\0")
files = ["CMakeLists.txt", "pyproject.toml"]
for top in ("csrc", "python"):
    for d, dirs, names in os.walk(top):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        files += [os.path.join(d, n) for n in sorted(names) if not n.endswith((".so", ".pyd", ".pyc"))]
for f in files:
    h.update(f.encode() + b"\0")
    with open(f, "rb") as fh:
        h.update(hashlib.sha256(fh.read()).digest())
print(h.hexdigest())
EOF
}

report() { "$VPY" -I -c "import specext, json; print('specext', json.dumps(specext.build_info()))"; }

HASH=$(inputs_hash)
if [ -z "${SPECEXT_SETUP_FORCE:-}" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && report 2>/dev/null; then
  echo "specext: up to date in .venv (sources unchanged since the last install; SPECEXT_SETUP_FORCE=1 reinstalls)"
  exit 0
fi
rm -f "$STAMP"
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install -q "$TORCH_SPEC"
"$VPY" -m pip install -q "${BUILD_DEPS[@]}"
# A build directory configured elsewhere (a copied checkout) or by another interpreter
# cannot be reused: CMake refuses a cache made for another source directory.
for cache in build/*/CMakeCache.txt; do
  [ -f "$cache" ] || continue
  if ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$PWD" "$cache" \
     || ! grep -q "^Python_EXECUTABLE:[A-Z]*=$PWD/.venv/bin/python$" "$cache"; then
    echo "specext: removing $(dirname "$cache") (configured for another checkout or interpreter)"
    rm -rf "$(dirname "$cache")"
  fi
done
"$VPY" -m pip install -q --no-build-isolation ".[test]"
report
echo "$HASH" > "$STAMP"
