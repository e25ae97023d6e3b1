#!/usr/bin/env bash
# The GPU proof in one call, inside a time budget (BUDGET seconds, default 510 on CUDA: the
# device tool allows 10 minutes a command), on a machine with no internet and torch with CUDA
# preinstalled. Steps run most valuable first; each gets at most what is left of the budget;
# a step that no longer fits is reported as skipped, and one the budget cut short (started
# with less than it asked for, then stopped at that limit) as "cut": neither counts as a
# failure, and both are named for a second call:
#   0. preflight: the versions of everything used, nvcc, compute-sanitizer, Python.h, whether
#      pip can write its site-packages; the optional packages that are missing (pytest,
#      matplotlib, nnsight) skip what needs them;
#   1. build for sm_90 only (H100/H200) in place, print build_info;
#   2. every CUDA-marked test (pytest -m cuda): the kernels against float64 on the card;
#   3. scripts/gpu_check.py, one step per part: analyze --demo with PSS on CUDA vs the CPU
#      (same accuracy, statistics within float32 tolerance); a random-weights ~1B Llama:
#      tokens/s of the scoring pass with and without statistics, batched vs
#      one-mask-at-a-time PSS; the 1B model with --device-map and half its layers offloaded
#      vs in memory;
#   4. the CUDA kernel tests under compute-sanitizer memcheck;
#   5. the kernel benchmarks (per-call cost at hook sizes too), then the peers benchmark;
#   6. causal fine-tuning of the held-out demo on the device (all strategies, one seed);
#   7. compute-sanitizer racecheck on the kernel tests;
#   (pytest-all, the whole suite, runs only when named in --only: CI runs it on the CPU.)
# The last lines printed are a summary: one line per step, pass / FAIL / TIMEOUT / cut /
# skipped (with the reason), so that the end of the output alone says what happened.
#
# Files: the device tool brings back only a few small files from $OUT (8 files, 16 MiB each),
# so every log, CSV and run directory goes to $WORK (default: a new folder under /tmp; the
# ~1B model is 2.2 GB), and $OUT holds, rewritten after every step so that a run cut short
# still returns what it did: summary.txt; steps.csv (one row per step: status, seconds,
# pytest counts, note); tables.csv (every table the benchmarks and gpu_check.py printed, one
# cell a row: source, table, row, column, value); results.csv (the benchmarks' rows in
# bench/results.csv's columns); gpu_check.tar.gz (every log and CSV, and the run directories'
# small files; `tar xzf gpu_check.tar.gz` gives logs/ and those).
#
#   device run:  bash scripts/gpu_check.sh                      (OUT defaults to /tmp/specext-gpu)
#   second call: bash scripts/gpu_check.sh --only bench,finetune,racecheck
#                (the build, then only the listed steps: those the first call's summary
#                reported as skipped or cut; steps: pytest-cuda demo model devicemap memcheck
#                bench finetune racecheck pytest-all)
#   CI, no GPU:  bash scripts/gpu_check.sh --device cpu --quick (no build, no sanitizer: the
#                same Python steps on the installed package, so the script cannot rot)
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
QUICK=${QUICK:-}
ONLY=${ONLY:-}  # comma list of steps to run (after the build): pytest-cuda demo model devicemap memcheck bench finetune racecheck pytest-all
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu] [--quick] [--only STEP,...]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/specext-gpu}
mkdir -p "$OUT"
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/specext-gpu-work.XXXXXX")}
LOGS=$WORK/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 OUT WORK
# every table the benchmarks and gpu_check.py print also goes here, one cell a row (bench/_harness.py)
export SPECEXT_TABLES_CSV=$LOGS/tables.csv
# Nothing can be fetched on the device machine: pip must not try an index or its own update.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Everything is local (the demo model, the random model's folder): no Hugging Face Hub calls either.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} HF_HUB_DISABLE_TELEMETRY=1
PY=${PYTHON:-python3}
if [ "$DEVICE" = cuda ]; then BUDGET=${BUDGET:-510}; else BUDGET=${BUDGET:-1500}; fi
START=$(date +%s)
fail=0
SUMMARY=()  # one line per step: name, status, seconds, note
step() { echo; echo "== $*   [$(( $(date +%s) - START )) s of $BUDGET]"; }
# limit WANT: sets t, the seconds a step may take: WANT, or what is left of the budget (minus
# a margin) when that is less, and CUT=1 then (a stop at t is the budget's doing, not the step's)
limit() {
  local l=$(( BUDGET - ($(date +%s) - START) - 10 ))
  if [ "$l" -lt "$1" ]; then t=$l; CUT=1; else t=$1; CUT=""; fi
}
t=0 CUT=""
STEPS_CSV=$WORK/steps.csv
echo "step,status,seconds,passed,failed,skipped,note" >"$STEPS_CSV"
csv_field() { local v=${1//\"/\"\"}; printf '"%s"' "$v"; }
record() {  # record NAME STATUS SECONDS [NOTE]: a summary line; FAIL and TIMEOUT count as failures
  SUMMARY+=("$(printf '  %-30s %-8s %5s s  %s' "$1" "$2" "$3" "${4:-}")")
  case "$2" in FAIL|TIMEOUT) fail=1 ;; cut) rerun_add ;; esac
  local np nf ns
  np=$(echo "${4:-}" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+'); nf=$(echo "${4:-}" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+')
  ns=$(echo "${4:-}" | grep -oE '[0-9]+ skipped' | grep -oE '[0-9]+')
  { csv_field "$1"; printf ',%s,%s,%s,%s,%s,' "$2" "${3/-/}" "$np" "$nf" "$ns"; csv_field "${4:-}"; echo; } >>"$STEPS_CSV"
  save
}
skip() { echo "skipped: $1 ($2)"; record "$1" skipped - "$2"; }
# fits T NAME [MIN]: whether a step with T seconds (at least MIN, default 20) is worth starting
fits() {
  if [ "$1" -lt "${3:-20}" ]; then
    rerun_add
    skip "$2" "$(( $1 < 0 ? 0 : $1 )) s left of the $BUDGET s budget, needs ${3:-20}"
    return 1
  fi
}
CUR="" RERUN=""  # the --only name of the step under way; the steps the budget left out or cut
rerun_add() {  # name the step under way for a second call
  [ -n "$CUR" ] || return 0
  case ",$RERUN," in *",$CUR,"*) ;; *) RERUN=${RERUN:+$RERUN,}$CUR ;; esac
}
# finish NAME RC T0 LIMIT LOG [NOTE]: record a step that ran, from its exit status (and CUT)
finish() {
  local s=$(( $(date +%s) - $3 )) log
  log=$(basename "$5")${6:+; $6}
  if [ "$2" -eq 0 ]; then record "$1" pass "$s" "$log"
  elif { [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; } && [ -n "$CUT" ]; then
    record "$1" cut "$s" "the budget left it $4 s and it needed more; $log"
  elif [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then record "$1" TIMEOUT "$s" "killed at its limit of $4 s; $log"
  else record "$1" FAIL "$s" "rc=$2; $log"; fi
}
summary_text() {
  echo "== gpu_check summary: device $DEVICE, quick=${QUICK:-0}, $(( $(date +%s) - START )) s of a $BUDGET s budget"
  printf '%s\n' "${SUMMARY[@]}"
  local n_pass n_skip n_fail
  n_pass=$(printf '%s\n' "${SUMMARY[@]}" | grep -c '^  .\{30\} pass ')
  n_skip=$(printf '%s\n' "${SUMMARY[@]}" | grep -cE '^  .{30} (skipped|cut) ')
  n_fail=$(printf '%s\n' "${SUMMARY[@]}" | grep -cE '^  .{30} (FAIL|TIMEOUT) ')
  echo "  => $([ $fail -eq 0 ] && echo "no failures" || echo "FAILURES"): $n_pass passed, $n_fail failed, $n_skip skipped or cut;" \
       "CSVs: $OUT/steps.csv, tables.csv, results.csv; logs: $OUT/gpu_check.tar.gz (work dir $WORK)"
  [ -z "$RERUN" ] || echo "  => the budget left out or cut: run them with  bash scripts/gpu_check.sh --only $RERUN"
}
save() {  # $OUT: summary.txt, the CSVs and a tarball of the logs, CSVs and the run directories' small files
  summary_text >"$OUT/summary.txt"
  cp -f "$STEPS_CSV" "$OUT/steps.csv"
  local f; for f in tables.csv results.csv; do [ -f "$LOGS/$f" ] && cp -f "$LOGS/$f" "$OUT/$f"; done
  (cd "$WORK" && find . -type f -size -4M ! -name '*.safetensors' ! -name '*.bin' ! -name '*.pt' ! -name '.lock' \
     ! -path './random_llama/*' ! -path './offload/*' -print0 | tar czf "$OUT/.gpu_check.tar.gz" --null -T - 2>/dev/null) \
    && mv -f "$OUT/.gpu_check.tar.gz" "$OUT/gpu_check.tar.gz"
}
final() { echo; summary_text; }
# want STEP: whether --only selects the step (every step when --only is not given)
want() {
  CUR=$1
  [ -z "$ONLY" ] && return 0
  case ",$ONLY," in *",$1,"*) return 0 ;; esac
  skip "$1" "not in --only $ONLY"; return 1
}
trap 'echo; echo "gpu_check interrupted"; final; exit 130' INT TERM
# pytest's closing line ("12 passed, 3 skipped in 9.1s"), for the summary
# (compute-sanitizer's own lines, "========= ERROR SUMMARY: 0 errors", come after it: left out)
pytest_line() { grep -v '^=========' "$1" | grep -E "[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran" | tail -1 | tr -d '='; }
# finish_pytest NAME RC T0 LIMIT LOG: the failed tests and the closing line, then the record;
# a run where no test passed (every CUDA test skipped, say) proves nothing and is a failure
finish_pytest() {
  local line; line=$(pytest_line "$5")
  grep -E "^(FAILED|ERROR) " "$5" | head -10; echo "$line"
  if [ "$2" -eq 0 ] && ! echo "$line" | grep -q "passed"; then
    record "$1" FAIL $(( $(date +%s) - $3 )) "no test passed: $line; $(basename "$5")"
  else
    finish "$1" "$2" "$3" "$4" "$5" "$line"
  fi
}

# ---- 0. preflight: what is there (one look at the output tells a missing piece)
CUDA_BIN=""
for d in /usr/local/cuda/bin /usr/local/cuda-13/bin /usr/local/cuda-13.0/bin; do [ -d "$d" ] && { CUDA_BIN=$d; break; }; done
# CMake looks for nvcc on PATH (or CUDACXX): add the toolkit's folder when nvcc or the sanitizer is not there
if [ -n "$CUDA_BIN" ] && ! { command -v nvcc && command -v compute-sanitizer; } >/dev/null; then
  export PATH="$PATH:$CUDA_BIN"
fi
{
  if [ "$DEVICE" = cuda ]; then  # the full table goes to the logs only: the output's tail is short
    nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1
    echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm \
      --format=csv,noheader 2>&1 | head -3)"
  fi
  echo "nvcc: $(command -v nvcc || echo 'not found')  $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*')"
  echo "compute-sanitizer: $(command -v compute-sanitizer || echo 'not found')  CUDACXX=${CUDACXX:-unset}"
  "$PY" - "$WORK/preflight.env" <<'EOF'
import importlib.metadata as md, importlib.util, os, sys, sysconfig
print("python", sys.version.split()[0], sys.executable)
inc = sysconfig.get_paths()["include"]
print("Python.h:", "found in " + inc if os.path.exists(os.path.join(inc, "Python.h")) else "MISSING in " + inc)
purelib = sysconfig.get_paths()["purelib"]
print("site-packages:", purelib, "writable" if os.access(purelib, os.W_OK) else "NOT WRITABLE (pip install -e . needs it)")
row = []
for d in ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "numpy", "tqdm", "pytest", "scipy",
          "matplotlib", "nnsight", "scikit-build-core", "pybind11", "cmake", "ninja", "pip"):
    try:
        row.append(f"{d} {md.version(d)}")
    except md.PackageNotFoundError:
        row.append(f"{d} MISSING")
print(", ".join(row))
have = {m: int(importlib.util.find_spec(m) is not None) for m in ("pytest", "matplotlib")}
cuda = 0
try:
    import torch
    cuda = int(torch.cuda.is_available())
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", bool(cuda),
          torch.cuda.get_device_name(0) if cuda else "")
    have["torch"] = 1
except Exception as e:  # noqa: BLE001
    print("torch import failed:", e)
    have["torch"] = 0
with open(sys.argv[1], "w") as f:  # for the shell: what the steps below may use
    f.write(f"HAVE_TORCH={have['torch'] or ''}\nTORCH_CUDA={cuda or ''}\nHAVE_PYTEST={have['pytest'] or ''}\n"
            f"HAVE_MPL={have['matplotlib'] or ''}\n")
EOF
} 2>&1 | tee "$LOGS/device.txt"
HAVE_TORCH="" TORCH_CUDA="" HAVE_PYTEST="" HAVE_MPL=""
[ -f "$WORK/preflight.env" ] && . "$WORK/preflight.env"
if [ -z "$HAVE_TORCH" ]; then record preflight FAIL 0 "$PY cannot import torch"; final; exit 1; fi
if [ "$DEVICE" = cuda ] && [ -z "$TORCH_CUDA" ]; then record preflight FAIL 0 "torch sees no CUDA device"; final; exit 1; fi
NO_REPORT=""; [ -n "$HAVE_MPL" ] || NO_REPORT=--no-report
SANITIZER=1; command -v compute-sanitizer >/dev/null || SANITIZER=""

# ---- 1. build
if [ "$DEVICE" = cuda ]; then
  step "build (sm_90 only)"
  t0=$(date +%s); limit 300
  SPECEXT_CUDA=ON SPECEXT_CUDA_ARCHS=${SPECEXT_CUDA_ARCHS:-90} \
    timeout -k 15 "$t" "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$LOGS/build.log" 2>&1
  rc=$?
  tail -5 "$LOGS/build.log"
  finish build "$rc" "$t0" "$t" "$LOGS/build.log"
  if [ $rc -ne 0 ]; then
    echo "build failed (rc=$rc); the errors in build.log:"
    grep -inE "error|fatal|could not|not found|no such" "$LOGS/build.log" | grep -v "^\s*$" | tail -25
    final; exit 1
  fi
fi
if "$PY" -c "import specext, json; print(json.dumps(specext.build_info()))" >"$LOGS/build_info.json" 2>&1; then
  cat "$LOGS/build_info.json"
  if [ "$DEVICE" = cuda ] && ! "$PY" -c "import specext, sys; i = specext.build_info(); sys.exit(not (i['cuda'] and i['cuda_devices'] > 0))"; then
    record build_info FAIL 0 "the extension was built without CUDA or sees no device: $(cat "$LOGS/build_info.json")"
  fi
else
  cat "$LOGS/build_info.json"; record build_info FAIL 0 "import specext failed"; final; exit 1
fi

KERNEL_TESTS="tests/test_category_accumulate.py tests/test_neuron_specialization.py tests/test_value_vector_norms.py tests/test_prompt_stats.py"

sanitizer() {  # sanitizer TOOL SECONDS
  want "$1" || return 0
  step "compute-sanitizer --tool $1 on the CUDA kernel tests"
  [ -n "$SANITIZER" ] || { skip "sanitizer $1" "compute-sanitizer not found"; return 0; }
  [ -n "$HAVE_PYTEST" ] || { skip "sanitizer $1" "pytest not installed"; return 0; }
  local t0 rc log=$LOGS/sanitizer_$1.log; limit "$2"
  fits "$t" "sanitizer $1" 30 || return 0
  t0=$(date +%s)
  # memcheck sees an out-of-bounds access only outside every cudaMalloc'd block: without
  # torch's caching allocator each tensor is its own block (the tests of no-sync and CUDA-graph
  # capture need the caching allocator; the pytest-cuda step runs them)
  # (torch disables it when the variable is set at all, even empty: set it for memcheck only)
  local envs=() sel=()
  [ "$1" = memcheck ] && { envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1); sel=(-k "not synchronise"); }
  env ${envs[@]+"${envs[@]}"} timeout -k 15 "$t" compute-sanitizer --tool "$1" --error-exitcode 99 \
    --target-processes all "$PY" -m pytest -q -x -m cuda ${sel[@]+"${sel[@]}"} -p no:cacheprovider $KERNEL_TESTS >"$log" 2>&1
  rc=$?
  if [ $rc -ne 0 ] && grep -qiE "device not supported|not supported on this (device|platform)" "$log"; then
    skip "sanitizer $1" "compute-sanitizer does not support this device/runtime (see $(basename "$log"))"
  else
    # the sanitizer's findings (kernel accesses, races, failed CUDA API calls) and its summary
    grep -E "^========= (Invalid|Race|Error|ERROR SUMMARY|Program hit)" "$log" | head -8
    finish_pytest "sanitizer $1" "$rc" "$t0" "$t" "$log"
  fi
}

pytest_step() {  # pytest_step NAME TITLE SECONDS MIN LOG PYTEST-ARGS...: a pytest run as one step
  local name=$1 title=$2 secs=$3 min=$4 log=$5 t0; shift 5
  want "$name" || return 0
  step "$title"
  [ -n "$HAVE_PYTEST" ] || { skip "$name" "pytest not installed"; return 0; }
  limit "$secs"
  fits "$t" "$name" "$min" || return 0
  t0=$(date +%s)
  timeout -k 15 "$t" "$PY" -m pytest "$@" -p no:cacheprovider >"$log" 2>&1
  finish_pytest "$name" $? "$t0" "$t" "$log"
}

# ---- 2. the kernels against float64 on the card: the most direct CUDA proof, and cheap
[ "$DEVICE" = cuda ] && pytest_step pytest-cuda "every CUDA-marked test" 120 30 "$LOGS/pytest_cuda.log" -q -m cuda tests

# ---- 3. end to end: scripts/gpu_check.py, one part per step (a part that fails or times out
# does not take the others with it)
for part in demo:150 model:150 devicemap:180; do
  name=${part%%:*}
  want "$name" || continue
  step "end to end ($name): scripts/gpu_check.py --only $name on $DEVICE"
  limit "${part##*:}"
  fits "$t" "gpu_check.py $name" 45 || continue
  t0=$(date +%s)
  timeout -k 15 "$t" "$PY" scripts/gpu_check.py --device "$DEVICE" ${QUICK:+--quick} --only "$name" --out "$LOGS" --work "$WORK" \
    2>&1 | tee "$LOGS/gpu_check_$name.txt"
  finish "gpu_check.py $name" "${PIPESTATUS[0]}" "$t0" "$t" "$LOGS/gpu_check_$name.txt"
done

# ---- 4. out-of-bounds accesses of the kernels
[ "$DEVICE" = cuda ] && sanitizer memcheck 120

# ---- 5. the benchmarks: the kernels against torch on the same card, then the peers
if want bench; then
  step "kernel and peers benchmarks on $DEVICE"
  for b in bench/bench_category_accumulate.py bench/bench_call_overhead.py bench/bench_neuron_specialization.py \
           bench/bench_value_vector_norms.py bench/bench_peers.py; do
    [ -f "$b" ] || continue
    name=$(basename "$b" .py)
    # bench_peers starts a process per method and model, each loading two copies of its model
    limit "$([ "$name" = bench_peers ] && echo 200 || echo 120)"
    fits "$t" "$name" 30 || continue
    t0=$(date +%s)
    timeout -k 15 "$t" "$PY" "$b" --device "$DEVICE" ${QUICK:+--quick} --csv "$LOGS/results.csv" >"$LOGS/$name.txt" 2>&1
    rc=$?
    tail -12 "$LOGS/$name.txt"
    finish "$name" "$rc" "$t0" "$t" "$LOGS/$name.txt"
  done
fi

# ---- 6. causal fine-tuning
if want finetune; then
  step "causal fine-tuning on $DEVICE: the held-out demo, all four strategies, one seed"
  limit 150
  if fits "$t" finetune 45; then
    t0=$(date +%s)
    # the report (results.html) needs matplotlib; without it the run itself is still checked
    timeout -k 15 "$t" "$PY" -m specext.finetune --demo --strategy all --seeds 1 --device "$DEVICE" --no-save-model \
      --out "$WORK/finetune" --overwrite ${QUICK:+--steps 10 --se-samples 2 --pss-ratios 1,2} $NO_REPORT -q \
      >"$LOGS/finetune.txt" 2>&1
    rc=$?
    tail -9 "$LOGS/finetune.txt"
    finish finetune "$rc" "$t0" "$t" "$LOGS/finetune.txt" "${NO_REPORT:+matplotlib missing: run without its report}"
  fi
fi

# ---- 7. shared-memory races of the kernels; the whole suite only when asked for by name
if [ "$DEVICE" = cuda ]; then
  sanitizer racecheck 120
  case ",$ONLY," in *,pytest-all,*) pytest_step pytest-all "the whole test suite" 300 60 "$LOGS/pytest.log" -q -x tests ;; esac
fi
# the big scratch files (the random model and its offload folder) are not kept
rm -rf "$WORK/random_llama" "$WORK/offload"
final
exit $fail
