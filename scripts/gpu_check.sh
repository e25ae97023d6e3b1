#!/usr/bin/env bash
# The GPU proof in one call (<= 9 minutes with the build, on a machine with no internet and
# torch with CUDA preinstalled):
#   1. build for sm_90 only (H100/H200) in place, print build_info;
#   2. the CUDA kernel tests under compute-sanitizer (memcheck, then racecheck), then the
#      whole test suite (CUDA-marked tests run there);
#   3. scripts/gpu_check.py: analyze --demo with PSS on CUDA vs the CPU (same accuracy,
#      statistics within float32 tolerance), and a random-weights ~1B Llama: tokens/s of the
#      scoring pass with and without statistics, batched vs one-mask-at-a-time PSS;
#   4. the kernel benchmarks and the peers benchmark against torch on the same card.
# Everything printed also lands under $OUT (logs and CSVs).
#
#   device run:  bash scripts/gpu_check.sh                      (OUT defaults to /tmp/specext-gpu)
#   CI, no GPU:  bash scripts/gpu_check.sh --device cpu --quick (no build, no sanitizer: the
#                same Python steps on the installed package, so the script cannot rot)
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
QUICK=${QUICK:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "usage: $0 [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/specext-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
PY=${PYTHON:-python3}
fail=0
step() { echo; echo "== $*"; }

if [ "$DEVICE" = cuda ]; then
  { nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
    2>&1 | tee "$OUT/device.txt"
  step "build (sm_90 only)"
  SPECEXT_CUDA=ON SPECEXT_CUDA_ARCHS=${SPECEXT_CUDA_ARCHS:-90} \
    "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
  rc=$?
  tail -5 "$OUT/build.log"
  [ $rc -eq 0 ] || { echo "build failed (rc=$rc), see build.log"; exit $rc; }
fi
"$PY" -c "import specext, json; print(json.dumps(specext.build_info()))" | tee "$OUT/build_info.json"

KERNEL_TESTS="tests/test_category_accumulate.py tests/test_neuron_specialization.py tests/test_value_vector_norms.py tests/test_prompt_stats.py"
if [ "$DEVICE" = cuda ]; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer --tool $tool on the CUDA kernel tests"
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 99 --target-processes all \
      "$PY" -m pytest -q -x -m cuda -p no:cacheprovider $KERNEL_TESTS 2>&1 | tee "$OUT/sanitizer_$tool.log" | tail -6
    rc=${PIPESTATUS[0]}
    [ $rc -eq 0 ] || { echo "compute-sanitizer $tool: rc=$rc"; fail=1; }
  done
  step "the whole test suite"
  timeout 200 "$PY" -m pytest -q -x tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
fi

step "end to end: demo on $DEVICE vs cpu, and a random-weights model"
timeout 240 "$PY" scripts/gpu_check.py --device "$DEVICE" ${QUICK:+--quick} --out "$OUT" 2>&1 | tee "$OUT/gpu_check_py.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail=1

step "causal fine-tuning on $DEVICE: the held-out demo, all four strategies, one seed"
timeout 150 "$PY" -m specext.finetune --demo --strategy all --seeds 1 --device "$DEVICE" --no-save-model \
  --out "$OUT/finetune" ${QUICK:+--steps 10 --se-samples 2 --pss-ratios 1,2} -q 2>&1 | tee "$OUT/finetune.txt" | tail -9
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "finetune failed"; fail=1; }

step "kernel and peers benchmarks on $DEVICE"
for b in bench/bench_category_accumulate.py bench/bench_neuron_specialization.py bench/bench_value_vector_norms.py bench/bench_peers.py; do
  [ -f "$b" ] || continue
  name=$(basename "$b" .py)
  timeout 120 "$PY" "$b" --device "$DEVICE" ${QUICK:+--quick} --csv "$OUT/results.csv" 2>&1 | tee "$OUT/$name.txt" | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "$name failed"; fail=1; }
done
echo
echo "gpu_check done (device $DEVICE, quick=${QUICK:-0}, failures: $fail); logs and CSVs in $OUT"
exit $fail
