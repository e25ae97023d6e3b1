#!/usr/bin/env bash
# Creates ./.venv (when missing) and installs specext with its test extra into it.
# torch is pinned: an unpinned torch would pull a multi-GB CUDA build. Re-running is
# cheap: the CMake build directory (build/) is reused, so only changed sources compile.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${SPECEXT_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q ".[test]"
.venv/bin/python -c "import specext, json; print('specext', json.dumps(specext.build_info()))"
