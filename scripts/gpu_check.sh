#!/usr/bin/env bash
# The GPU proof in one call, inside a time budget (BUDGET seconds, default 510 on CUDA: the
# device tool allows 10 minutes a command), on a machine with no internet and torch with CUDA
# preinstalled. Steps run most valuable first; each gets at most what is left of the budget,
# and a step that no longer fits is reported as skipped (not as passed):
#   1. build for sm_90 only (H100/H200) in place, print build_info;
#   2. scripts/gpu_check.py: analyze --demo with PSS on CUDA vs the CPU (same accuracy,
#      statistics within float32 tolerance), a random-weights ~1B Llama: tokens/s of the
#      scoring pass with and without statistics, batched vs one-mask-at-a-time PSS, and the
#      1B model with --device-map and half its layers offloaded vs in memory;
#   3. the CUDA kernel tests under compute-sanitizer memcheck;
#   4. every CUDA-marked test (pytest -m cuda);
#   5. causal fine-tuning of the held-out demo on the device (all strategies, one seed);
#   6. the kernel benchmarks and the peers benchmark against torch on the same card;
#   7. compute-sanitizer racecheck on the kernel tests; 8. the whole test suite.
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
if [ "$DEVICE" = cuda ]; then BUDGET=${BUDGET:-510}; else BUDGET=${BUDGET:-1500}; fi
START=$(date +%s)
fail=0
skipped=""
step() { echo; echo "== $*   [$(( $(date +%s) - START )) s of $BUDGET]"; }
# limit WANT: the seconds a step may take, WANT or what is left of the budget (minus a margin)
limit() { local l=$(( BUDGET - ($(date +%s) - START) - 10 )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
# fits T NAME: whether a step with T seconds is worth starting; records it as skipped if not
fits() { if [ "$1" -lt 20 ]; then echo "skipped: $2 (time budget of $BUDGET s spent)"; skipped="$skipped $2"; return 1; fi; }

if [ "$DEVICE" = cuda ]; then
  { nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
    2>&1 | tee "$OUT/device.txt"
  step "build (sm_90 only)"
  SPECEXT_CUDA=ON SPECEXT_CUDA_ARCHS=${SPECEXT_CUDA_ARCHS:-90} \
    timeout "$(limit 300)" "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
  rc=$?
  tail -5 "$OUT/build.log"
  [ $rc -eq 0 ] || { echo "build failed (rc=$rc), see build.log"; exit $rc; }
fi
"$PY" -c "import specext, json; print(json.dumps(specext.build_info()))" | tee "$OUT/build_info.json"

KERNEL_TESTS="tests/test_category_accumulate.py tests/test_neuron_specialization.py tests/test_value_vector_norms.py tests/test_prompt_stats.py"

step "end to end: demo on $DEVICE vs cpu, and a random-weights model"
t=$(limit 240)
if fits "$t" gpu_check.py; then
  timeout "$t" "$PY" scripts/gpu_check.py --device "$DEVICE" ${QUICK:+--quick} --out "$OUT" 2>&1 | tee "$OUT/gpu_check_py.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
fi

sanitizer() {  # sanitizer TOOL SECONDS
  step "compute-sanitizer --tool $1 on the CUDA kernel tests"
  local t; t=$(limit "$2")
  fits "$t" "sanitizer-$1" || return 0
  timeout "$t" compute-sanitizer --tool "$1" --error-exitcode 99 --target-processes all \
    "$PY" -m pytest -q -x -m cuda -p no:cacheprovider $KERNEL_TESTS 2>&1 | tee "$OUT/sanitizer_$1.log" | tail -6
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "compute-sanitizer $1: rc=$rc"; fail=1; }
}

if [ "$DEVICE" = cuda ]; then
  sanitizer memcheck 120
  step "every CUDA-marked test"
  t=$(limit 120)
  if fits "$t" pytest-cuda; then
    timeout "$t" "$PY" -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log" | tail -6
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
  fi
fi

step "causal fine-tuning on $DEVICE: the held-out demo, all four strategies, one seed"
t=$(limit 150)
if fits "$t" finetune; then
  timeout "$t" "$PY" -m specext.finetune --demo --strategy all --seeds 1 --device "$DEVICE" --no-save-model \
    --out "$OUT/finetune" ${QUICK:+--steps 10 --se-samples 2 --pss-ratios 1,2} -q 2>&1 | tee "$OUT/finetune.txt" | tail -9
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "finetune failed"; fail=1; }
fi

step "kernel and peers benchmarks on $DEVICE"
for b in bench/bench_category_accumulate.py bench/bench_neuron_specialization.py bench/bench_value_vector_norms.py bench/bench_peers.py; do
  [ -f "$b" ] || continue
  name=$(basename "$b" .py)
  t=$(limit 120)
  fits "$t" "$name" || continue
  timeout "$t" "$PY" "$b" --device "$DEVICE" ${QUICK:+--quick} --csv "$OUT/results.csv" 2>&1 | tee "$OUT/$name.txt" | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "$name failed"; fail=1; }
done

if [ "$DEVICE" = cuda ]; then
  sanitizer racecheck 120
  step "the whole test suite"
  t=$(limit 300)
  if fits "$t" pytest-all; then
    timeout "$t" "$PY" -m pytest -q -x tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -8
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
  fi
fi
echo
echo "gpu_check done in $(( $(date +%s) - START )) s (device $DEVICE, quick=${QUICK:-0}, failures: $fail," \
     "skipped:${skipped:- none}); logs and CSVs in $OUT"
exit $fail
