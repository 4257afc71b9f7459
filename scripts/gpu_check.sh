#!/usr/bin/env bash
# One-shot check on a machine with a CUDA GPU and no network (`make gpu-check`).
#
# Stages, in order of priority, each logged and timed, each run even when an
# earlier one failed, all within a budget of GPU_CHECK_BUDGET seconds
# (default 450):
#   env        GPU, driver, Python, torch and nvcc versions
#   build      the extension with its CUDA kernels, in place, for
#              TORCH_CUDA_ARCH_LIST (default 9.0), without network
#   import     the extension loads and has a CUDA kernel for every op
#   emulated-cases  the cases of `make cuda-emulate` on the GPU, against the
#              oracle and bit for bit against build/cuda-emulate/results.json
#   tests-cuda the test suite's CUDA cases and device-free cases (-k "not cpu")
#   bench      scripts/bench_cuda.py: fraction of the copy bandwidth
#   memcheck   compute-sanitizer memcheck on scripts/sanitize_case.py
#   racecheck  compute-sanitizer racecheck on the same case
#   tests-cpu  the rest of the suite (-k cpu), with the time left
# Results go to $OUT when set, else ./gpu-check-out: summary.md (the stages,
# the test counts and the benchmark table), gpu-check.log (everything),
# env.txt, bench.md, pytest-cuda.txt, pytest-cpu.txt, sanitizer.log.
# Exit status: 0 when every stage that ran passed, else 1.
set -u
cd "$(dirname "$0")/.."

PY=${GPU_PYTHON:-python3}
OUT_DIR=${OUT:-gpu-check-out}
BUDGET=${GPU_CHECK_BUDGET:-450}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export SIMPLEX_PARAM_WITH_CUDA=1
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu-check.log"
SUMMARY="$OUT_DIR/summary.md"
: >"$LOG"
START=$(date +%s)
STATUS=()
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# stage NAME CAP COMMAND...: runs COMMAND with at most min(CAP, time left) s.
stage() {
  local name=$1 cap=$2
  shift 2
  local limit
  limit=$(left)
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 10 ]; then
    STATUS+=("| $name | SKIPPED (out of time) | 0 s |")
    log "=== $name: SKIPPED, out of time"
    return 0
  fi
  log "=== $name (limit ${limit} s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0)) result=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    result="TIMEOUT after ${limit} s"
    FAILED=1
  elif [ $rc -ne 0 ]; then
    result="FAILED (exit $rc)"
    FAILED=1
  fi
  STATUS+=("| $name | $result | $dt s |")
  log "=== $name: $result in $dt s"
  return $rc
}

skip() {
  STATUS+=("| $1 | SKIPPED: $2 | 0 s |")
  log "=== $1: SKIPPED: $2"
}

write_summary() {
  {
    echo "# simplex_param GPU check"
    echo
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo '```'
    cat "$OUT_DIR/env.txt" 2>/dev/null
    echo '```'
    echo
    echo "| stage | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${STATUS[@]}"
    echo
    for part in cuda cpu; do
      if [ -f "$OUT_DIR/pytest-$part.txt" ]; then
        echo "tests-$part: $(tail -n 1 "$OUT_DIR/pytest-$part.txt")"
        grep -E '^(FAILED|ERROR)' "$OUT_DIR/pytest-$part.txt" | head -n 30
        echo
      fi
    done
    if [ -f "$OUT_DIR/bench.md" ]; then
      echo "## Benchmark"
      echo
      cat "$OUT_DIR/bench.md"
      echo
    fi
    grep -E '^gpu-cases:' "$LOG" 2>/dev/null
    grep -E 'ERROR SUMMARY|sanitize_case:' "$OUT_DIR/sanitizer.log" 2>/dev/null
    echo
    echo "total: $(($(date +%s) - START)) s"
  } >"$SUMMARY"
}

# --- env ---------------------------------------------------------------------
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU available:', torch.cuda.is_available())" 2>&1
  (command -v nvcc >/dev/null && nvcc --version | tail -n 1) || echo "nvcc: not found"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
} >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt" | tee -a "$LOG"
STATUS+=("| env | ok | 0 s |")

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
  skip build "no CUDA device here: this check is for a GPU machine (nothing was built)"
  FAILED=1
  write_summary
  cat "$SUMMARY"
  exit 1
fi

# --- build -------------------------------------------------------------------
# pip's editable install without network; if pip cannot (missing wheel or
# setuptools support), build the extension in place with setup.py.
stage build 240 bash -c "'$PY' -m pip install --no-build-isolation --no-deps --no-index -e . ||
  { echo 'pip install -e failed; building in place with setup.py'; '$PY' setup.py build_ext --inplace; }"

# --- import ------------------------------------------------------------------
stage import 60 "$PY" -c "
import sys, torch
import simplex_param as sp
from simplex_param import _ext
print('loaded from:', _ext.LOADED_FROM, '| error:', _ext.LOAD_ERROR)
has = torch._C._dispatch_has_computed_kernel_for_dispatch_key
ops = sp.ops.OPS
missing = [op for op in ops if not has('simplex_param::' + op, 'CUDA')]
x = [torch.ones(3, device='cuda') for _ in range(2)]
print('smoke:', sp.softmax_weighted_sum(torch.zeros(2, device='cuda'), x).tolist())
sys.exit('no CUDA kernel for: ' + ', '.join(missing) if missing else 0)
"

# --- the emulation's cases on the GPU ----------------------------------------
# The cases of `make cuda-emulate` (tests/cuda_emulation/) run by the real
# kernels: against the oracle, and bit for bit against the emulated results
# when `make cuda-emulate` saved them (carry build/cuda-emulate/results.json).
EMULATED=build/cuda-emulate/results.json
if [ -f "$EMULATED" ]; then
  stage emulated-cases 120 "$PY" tests/cuda_emulation/check.py --device cuda --compare "$EMULATED" --save "$OUT_DIR/gpu-results.json"
else
  stage emulated-cases 120 "$PY" tests/cuda_emulation/check.py --device cuda --save "$OUT_DIR/gpu-results.json"
fi

# --- tests -------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs --continue-on-collection-errors)
stage tests-cuda 200 bash -c "${PYTEST[*]} tests -k 'not cpu' 2>&1 | tee '$OUT_DIR/pytest-cuda.txt'; exit \${PIPESTATUS[0]}"

# --- benchmark ---------------------------------------------------------------
stage bench 150 "$PY" scripts/bench_cuda.py --out "$OUT_DIR/bench.md"

# --- compute-sanitizer -------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
for d in "${CUDA_HOME:-}" /usr/local/cuda; do
  [ -z "$SANITIZER" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && SANITIZER="$d/bin/compute-sanitizer"
done
if [ -n "$SANITIZER" ]; then
  : >"$OUT_DIR/sanitizer.log"
  for tool in memcheck racecheck; do
    # Without the caching allocator, memcheck sees each tensor's own bounds.
    stage "$tool" 90 bash -c "echo '--- $tool' >>'$OUT_DIR/sanitizer.log'; PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SANITIZER' --tool $tool --error-exitcode 1 --print-limit 20 '$PY' scripts/sanitize_case.py >>'$OUT_DIR/sanitizer.log' 2>&1; rc=\$?; tail -n 5 '$OUT_DIR/sanitizer.log'; exit \$rc"
  done
else
  skip memcheck "compute-sanitizer not found"
  skip racecheck "compute-sanitizer not found"
fi

# --- the CPU half of the suite, with the time left ---------------------------
stage tests-cpu 200 bash -c "${PYTEST[*]} tests -k cpu 2>&1 | tee '$OUT_DIR/pytest-cpu.txt'; exit \${PIPESTATUS[0]}"

write_summary
cat "$SUMMARY" | tee -a "$LOG"
exit $FAILED
