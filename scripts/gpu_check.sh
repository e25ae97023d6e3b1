#!/usr/bin/env bash
# One call on a GPU machine (no internet; torch with CUDA preinstalled): build with CUDA,
# run the whole test suite (the CUDA-marked tests run there), run every benchmark on the
# GPU, and leave logs and CSVs under $OUT.
#   device run: bash scripts/gpu_check.sh            (timeout ~540 s)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/specext-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
QUICK=${QUICK:-}   # QUICK=1: smaller benchmark shapes

{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  2>&1 | tee "$OUT/device.txt"

# Only sm_90 for H100/H200: a 4-architecture build costs device minutes for nothing here.
SPECEXT_CUDA=ON SPECEXT_CUDA_ARCHS=${SPECEXT_CUDA_ARCHS:-90} \
  "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
rc=$?
tail -5 "$OUT/build.log"
[ $rc -eq 0 ] || { echo "build failed (rc=$rc), see build.log"; exit $rc; }
"$PY" -c "import specext, json; print(json.dumps(specext.build_info()))" | tee "$OUT/build_info.json"

timeout 240 "$PY" -m pytest -q -x tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -15

for b in bench/bench_category_accumulate.py bench/bench_neuron_specialization.py bench/bench_value_vector_norms.py; do
  name=$(basename "$b" .py)
  timeout 150 "$PY" "$b" --device cuda ${QUICK:+--quick} --csv "$OUT/results.csv" 2>&1 | tee "$OUT/$name.txt"
done
# Capture overhead of the analysis pass on the GPU (the demo model; memory part is CPU-side).
timeout 120 "$PY" bench/bench_analyze.py --device cuda --skip-memory --csv "$OUT/results.csv" 2>&1 | tee "$OUT/bench_analyze.txt"
timeout 120 "$PY" -m specext.analyze --demo --device cuda --out "$OUT/demo_run" -q --no-report 2>&1 | tee "$OUT/demo.txt"
echo "gpu_check done"
