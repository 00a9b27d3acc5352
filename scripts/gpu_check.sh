#!/usr/bin/env bash
# One command for an offline GPU host: install carried wheels, make fastrlhf importable without network,
# record the machine, run the kernel tests compiled on CUDA, then the benchmark sweep.
#
#   bash scripts/gpu_check.sh OUT_DIR [--quick]
#
# Stages (each under `timeout`; a failing or hanging stage is recorded and the next one still runs):
#   1 wheels   if .whl/ (or $WHEELS) holds wheels: pip install --no-index --no-deps --target /tmp/site
#   2 import   fastrlhf importable: as is, else `pip install --no-deps --no-build-isolation -e .`,
#              else a shim folder /tmp/fastrlhf_shim/fastrlhf/{kernels,trainer} of symlinks on PYTHONPATH
#   3 env      nvidia-smi, python / torch / triton / transformers / liger versions
#   4 tests    the KERNEL test files only (tests/test_token_logprobs.py test_kl.py test_pairwise.py
#              test_linear_logprobs.py test_ppo_head.py test_gae.py
#              test_properties.py test_training_parity.py): the trainer's tests need packages a GPU host
#              lacks (gguf, tyro, datasets, the embedded model). JUnit XML -> OUT_DIR/junit.xml
#   5 sweep    benchmarks/sweep.py --out OUT_DIR [--quick] (CSV, JSON, markdown, two PNGs)
# Time: <= 8 min on one H100 (<= 3 min with --quick): the stages share a deadline of 465 s (170 s),
# set-up takes ~20 s, the tests up to 130 s (55 s), the sweep the rest, up to 300 s (95 s), with its own
# time budget inside that; each stage is also capped on its own. OUT_DIR gets exactly 8 flat files (the device tool returns at most 8, two folders deep, plain names):
# gpu_check.log tests.log junit.xml sweep.csv sweep.json summary.md bandwidth_vs_vocab.png
# peak_memory_vs_rows.png. The console gets the stage lines, the sweep's markdown and the stage table.
#
# Environment: PYTHON (default python3), WHEELS (default .whl), FASTRLHF_GIT_COMMIT (recorded when the
# host's copy has no .git), FASTRLHF_TEST_WORKERS (pytest-xdist workers, default 8 when xdist is there),
# FASTRLHF_TESTS_TIMEOUT / FASTRLHF_SWEEP_TIMEOUT (seconds), FASTRLHF_SITE / FASTRLHF_SHIM (folders),
# FASTRLHF_GPU_CHECK_DRY=1 (a CPU wiring check: no wheel install, no pip install, tests collected but
# not run, `sweep.py --smoke` on two ops instead of the GPU grid; tests/test_benchmarks_smoke.py runs it).
set -u

usage() { echo "usage: bash scripts/gpu_check.sh OUT_DIR [--quick]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT_ARG=$1
shift
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    *) usage ;;
  esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT_ARG" || exit 2
OUT=$(cd "$OUT_ARG" && pwd)
LOG="$OUT/gpu_check.log"
: >"$LOG"
PY=${PYTHON:-python3}
DRY=${FASTRLHF_GPU_CHECK_DRY:-0}
WHEELS=${WHEELS:-.whl}
SITE=${FASTRLHF_SITE:-/tmp/site}
SHIM=${FASTRLHF_SHIM:-/tmp/fastrlhf_shim}
# Time: a total deadline (TOTAL_S) the stages share; the sweep keeps SWEEP_MIN_S of it whatever the
# tests take, and its own --budget-s is its timeout minus ~25 s (start-up, ceilings, writing files).
if [ "$QUICK" = 1 ]; then
  TOTAL_S=${FASTRLHF_TOTAL_S:-170}
  TESTS_TIMEOUT=${FASTRLHF_TESTS_TIMEOUT:-55}
  SWEEP_TIMEOUT=${FASTRLHF_SWEEP_TIMEOUT:-95}
  SWEEP_MIN_S=80
  SWEEP_FLAGS=(--quick)
else
  TOTAL_S=${FASTRLHF_TOTAL_S:-465}
  TESTS_TIMEOUT=${FASTRLHF_TESTS_TIMEOUT:-130}
  SWEEP_TIMEOUT=${FASTRLHF_SWEEP_TIMEOUT:-300}
  SWEEP_MIN_S=240
  SWEEP_FLAGS=()
fi
if [ "$DRY" = 1 ]; then
  SWEEP_FLAGS=(--smoke --ops token_logprobs pairwise_loss)  # wiring only: tests/test_benchmarks_smoke.py covers the rest
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg MPLCONFIGDIR=/tmp/fastrlhf_mpl HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONDONTWRITEBYTECODE=1

STAGES=()
FAILED=0
T_START=$(date +%s)
left_s() { echo $((TOTAL_S - ($(date +%s) - T_START))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
record() {
  STAGES+=("$1 rc=$2 ${3}s")
  [ "$2" = 0 ] || FAILED=1
  log "stage $1: rc=$2 (${3}s)"
}
# run_stage NAME TIMEOUT_S LOGFILE FUNCTION [SIGNAL]: run one of this script's functions in a child bash
# under `timeout` (which signals the whole process group: SIGNAL, default TERM, then KILL 15 s later),
# output appended to LOGFILE; record rc and seconds. pytest gets INT: it stops and still writes its XML.
run_stage() {
  local name=$1 limit=$2 out=$3 fn=$4 sig=${5:-TERM} t0 rc
  log "== stage $name (timeout ${limit}s)"
  t0=$(date +%s)
  timeout -s "$sig" -k 15 "$limit" bash -c "set -u; $(declare -f "$fn"); $(declare -p "${STATE_VARS[@]}" 2>/dev/null); $fn" >>"$out" 2>&1
  rc=$?
  case "$rc" in 124|137) log "stage $name TIMED OUT after ${limit}s" ;; esac
  record "$name" "$rc" "$(($(date +%s) - t0))"
}
STATE_VARS=(PY REPO OUT WHEELS SITE SHIM KERNEL_TESTS PYTEST_ARGS SWEEP_ARGS)

log "fastrlhf gpu_check: repo $REPO, out $OUT, quick=$QUICK, dry=$DRY, python $PY"

# ---- 1 wheels --------------------------------------------------------------------------------------
install_wheels() {
  local whls=("$WHEELS"/*.whl) w rc=0
  mkdir -p "$SITE"
  echo "installing ${#whls[@]} wheels into $SITE: ${whls[*]}"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whls[@]}"; then
    return 0
  fi
  echo "all-at-once install failed; installing one by one so one bad wheel does not drop the rest"
  for w in "${whls[@]}"; do
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$w" || { echo "FAILED: $w"; rc=1; }
  done
  return $rc
}
if [ "$DRY" = 1 ]; then
  log "dry run: wheel install skipped"
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  run_stage wheels 60 "$LOG" install_wheels
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  log "no wheels in $WHEELS/: nothing to install (liger_kernel / nvtx may be missing: scripts/fetch_wheels.sh)"
fi

# ---- 2 fastrlhf importable -------------------------------------------------------------------------
importable() { (cd /tmp && "$PY" -c "import fastrlhf.kernels as k; print('fastrlhf.kernels from', k.__file__)"); }
make_importable() {
  if importable; then return 0; fi
  if [ "$DRY" = 1 ]; then
    echo "dry run: no pip install into $PY's environment"
  else
    echo "not importable: trying pip install --no-deps --no-build-isolation --no-index -e ."
    if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" && importable; then return 0; fi
  fi
  echo "no editable install: a shim of symlinks at $SHIM/fastrlhf/{kernels,trainer}"
  mkdir -p "$SHIM/fastrlhf" && ln -sfn "$REPO/kernels" "$SHIM/fastrlhf/kernels" && ln -sfn "$REPO/trainer" "$SHIM/fastrlhf/trainer"
  return 3
}
t0=$(date +%s)
timeout -k 10 90 bash -c "set -u; $(declare -f importable make_importable); $(declare -p PY REPO SHIM DRY); make_importable" >>"$LOG" 2>&1
rc=$?
if [ "$rc" = 3 ]; then  # the shim goes on this shell's PYTHONPATH (for the stages below), then is checked
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  importable >>"$LOG" 2>&1
  rc=$?
fi
record import "$rc" "$(($(date +%s) - t0))"

# ---- 3 environment ---------------------------------------------------------------------------------
env_report() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -srm)  commit: ${FASTRLHF_GIT_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,power.limit --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" -c '
import importlib.metadata as md, platform, torch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", v("triton"), "| transformers", v("transformers"), "| liger-kernel", v("liger-kernel"),
      "| nvtx", v("nvtx"), "| pytest-benchmark", v("pytest-benchmark"))
print("cuda available:", torch.cuda.is_available(), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
'
}
run_stage env 30 "$LOG" env_report
grep -E "^(python|cuda available|date)" "$LOG" | tail -n 3

# ---- 4 kernel tests --------------------------------------------------------------------------------
KERNEL_TESTS=(tests/test_token_logprobs.py tests/test_kl.py tests/test_pairwise.py tests/test_properties.py tests/test_training_parity.py
              tests/test_linear_logprobs.py tests/test_ppo_head.py tests/test_gae.py)
PYTEST_ARGS=(-q -p no:cacheprovider "--junitxml=$OUT/junit.xml")
if [ "$DRY" = 1 ]; then
  PYTEST_ARGS+=(--collect-only)  # the CPU interpreter would take a minute: prove the wiring only
elif "$PY" -c "import xdist" 2>/dev/null && [ "${FASTRLHF_TEST_WORKERS:-8}" != 0 ]; then
  PYTEST_ARGS+=(-n "${FASTRLHF_TEST_WORKERS:-8}")  # Triton compiles are CPU-bound: spread them over cores
fi
log "kernel tests only (the trainer tests need gguf, tyro, datasets and the embedded model, absent on GPU hosts)"
run_tests() { "$PY" -m pytest "${KERNEL_TESTS[@]}" "${PYTEST_ARGS[@]}"; }
TESTS_LIMIT=$(min "$TESTS_TIMEOUT" $(($(left_s) - SWEEP_MIN_S)))
if [ "$TESTS_LIMIT" -ge 10 ]; then
  run_stage tests "$TESTS_LIMIT" "$OUT/tests.log" run_tests INT
else
  log "stage tests: skipped, no time left (${TESTS_LIMIT}s)"
  record tests 124 0
fi
{ tail -n 4 "$OUT/tests.log" 2>/dev/null; echo; } | tee -a "$LOG"

# ---- 5 sweep ---------------------------------------------------------------------------------------
SWEEP_LIMIT=$(min "$SWEEP_TIMEOUT" "$(left_s)")
SWEEP_ARGS=(benchmarks/sweep.py --out "$OUT" ${SWEEP_FLAGS[@]+"${SWEEP_FLAGS[@]}"})
[ "$DRY" = 1 ] || SWEEP_ARGS+=(--budget-s $((SWEEP_LIMIT - 25)))
run_sweep() { "$PY" "${SWEEP_ARGS[@]}"; }
if [ "$SWEEP_LIMIT" -ge 45 ]; then
  run_stage sweep "$SWEEP_LIMIT" "$LOG" run_sweep
else
  log "stage sweep: skipped, no time left (${SWEEP_LIMIT}s)"
  record sweep 124 0
fi

# ---- summary (printed last: the sweep's short markdown, then the stages) ----------------------------
if [ -f "$OUT/summary.md" ]; then
  sed '/^### All cells/,$d' "$OUT/summary.md"
else
  echo "no summary.md: see the sweep stage in gpu_check.log"
  tail -n 20 "$LOG"
fi
echo
echo "## gpu_check stages ($(($(date +%s) - T_START)) s total; quick=$QUICK dry=$DRY)" | tee -a "$LOG"
for s in "${STAGES[@]}"; do echo "- $s" | tee -a "$LOG"; done
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')" | tee -a "$LOG"
exit "$FAILED"
