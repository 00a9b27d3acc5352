#!/usr/bin/env bash
# One command for an offline GPU host: install carried wheels, make fastrlhf importable without network,
# record the machine, run the kernel tests compiled on CUDA, the benchmark sweep, then the "beyond the logits" benchmarks.
#
#   bash scripts/gpu/gpu_check.sh OUT_DIR [--quick]
#
# Stages (each under `timeout`; a failing or hanging stage is recorded and the next one still runs):
#   1 wheels   if .whl/ (or $WHEELS) holds wheels: pip install --no-index --no-deps --target /tmp/site
#   2 import   fastrlhf importable: as is, else `pip install --no-deps --no-build-isolation -e .`,
#              else a shim folder /tmp/fastrlhf_shim/fastrlhf/{kernels,trainer} of symlinks on PYTHONPATH
#   3 env      nvidia-smi, python / torch / triton / transformers / liger versions
#   4 tests    the KERNEL test files only (tests/test_token_logprobs.py test_kl.py test_pairwise.py
#              test_linear_logprobs.py test_ppo_head.py test_gae.py
#              test_properties.py test_training_parity.py): the trainer's tests need packages a GPU host
#              lacks (gguf, tyro, datasets, the embedded model). JUnit XML -> OUT_DIR/junit.xml; the pytest
#              output goes into gpu_check.log (between "----- pytest output" markers)
#   5 sweep    benchmarks/sweep.py --out OUT_DIR [--quick] (CSV, JSON, markdown, two PNGs)
#   6 linear       benchmarks/bench_linear.py [--quick]: fused linear log-probs vs chunked torch, eager, matmul
#   7 gae          benchmarks/bench_gae.py on a reduced grid: the GAE scan vs the Python loop
#   8 head_memory  benchmarks/bench_head_memory.py --arch llama-3.2-1b: one PPO step's memory per head mode
#                  (skipped, with the reason logged, while the script does not exist)
#   9 generate     benchmarks/bench_generate.py: sampling tokens/s, time to first token and peak memory of HF
#                  generate (dynamic cache; static cache + compile) and fastrlhf's sampler, at the demo shape
#                  (SmolLM2-135M config, 64 prompts x 2 samples, 24 new tokens) and, without --quick, at 1B
#                  shapes (random-init Llama-3.2-1B, then Qwen2.5-1.5B configs: 32 prompts x 2, 256 new
#                  tokens, one repetition); each run's JSON goes under "generate" in beyond.json
#   6-9 write into a scratch folder, never into OUT_DIR; then a merge step bundles their JSONs, unchanged, into
#   OUT_DIR/beyond.json ({"linear": linear.json, "gae": gae.json, "head_memory": head_memory.json, "generate":
#   {run: generate.json}, "missing": {name: why}}) and appends their markdown to summary.md under "## Beyond the logits".
# Time: <= 10 min on one H100 (<= 3.5 min with --quick), by a deadline of 590 s (205 s) that every stage after
# the script's start shares, the merge included, plus at most 20 s of a stage's grace to exit (timeout's
# KILL 15 s after TERM, the merge's 5 s). Within it: set-up ~15 s; the tests up to 120 s (45 s); the sweep
# what they leave, up to 210 s (60 s) and at least 170 s (50 s), its own --budget-s 25 s less; the beyond-the-logits
# stages 120 s (35 s): linear 45 s (15 s), gae 15 s (8 s), head_memory 60 s (12 s), up to 15 s more when
# the others finished early; generate 150 s (45 s); the merge the last 15 s. Each stage is also capped on its own, and bench_linear
# and bench_head_memory get internal time budgets under their caps. Run 1 on an H200
# (results/2026-11-27-h200) took 253 s in a 290 s slot. The worst case, checked on CPU with a
# stand-in python that hangs at every stage and ignores INT and TERM: 445 s (165 s with --quick), before the
# generate stage and its 150 s (45 s) were added.
# OUT_DIR gets exactly 8 flat files (an offline GPU host returns at most 8 files, plain names):
# gpu_check.log junit.xml sweep.csv sweep.json summary.md bandwidth_vs_vocab.png peak_memory_vs_rows.png
# beyond.json. Every measured number is in them. The console gets the stage lines, the sweep's markdown, the
# beyond-the-logits markdown and the stage table.
#
# Environment: PYTHON (default python3), WHEELS (default .whl), FASTRLHF_GIT_COMMIT (recorded when the
# host's copy has no .git), FASTRLHF_TEST_WORKERS (pytest-xdist workers, default 8 when xdist is there),
# FASTRLHF_TOTAL_S / FASTRLHF_TESTS_TIMEOUT / FASTRLHF_SWEEP_TIMEOUT / FASTRLHF_SWEEP_MIN_S (what the tests leave
# the sweep at least) / FASTRLHF_LINEAR_TIMEOUT /
# FASTRLHF_GAE_TIMEOUT / FASTRLHF_HEAD_MEMORY_TIMEOUT / FASTRLHF_GENERATE_TIMEOUT (seconds), FASTRLHF_SITE / FASTRLHF_SHIM (folders),
# FASTRLHF_GPU_CHECK_DRY=1 (a CPU wiring check: no wheel install, no pip install, tests collected but
# not run, `sweep.py --smoke` on two ops instead of the GPU grid, the beyond-the-logits benchmarks in their CPU smoke
# modes; tests/test_benchmarks_smoke.py runs it).
set -u

usage() { echo "usage: bash scripts/gpu/gpu_check.sh OUT_DIR [--quick]" >&2; exit 2; }
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

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
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
# Time: a total deadline (TOTAL_S) the stages share; the beyond-the-logits stages keep BEYOND_S of it and the sweep
# SWEEP_MIN_S whatever the tests take; the sweep's own --budget-s is its timeout minus ~25 s (start-up,
# ceilings, writing files), bench_linear's its timeout minus 10 s.
if [ "$QUICK" = 1 ]; then
  TOTAL_S=${FASTRLHF_TOTAL_S:-205}
  TESTS_TIMEOUT=${FASTRLHF_TESTS_TIMEOUT:-45}
  SWEEP_TIMEOUT=${FASTRLHF_SWEEP_TIMEOUT:-60}
  SWEEP_MIN_S=${FASTRLHF_SWEEP_MIN_S:-50}
  LINEAR_S=${FASTRLHF_LINEAR_TIMEOUT:-15}
  GAE_S=${FASTRLHF_GAE_TIMEOUT:-8}
  HEAD_MEMORY_S=${FASTRLHF_HEAD_MEMORY_TIMEOUT:-12}
  SWEEP_FLAGS=(--quick)
  LINEAR_FLAGS=(--quick)
  GAE_FLAGS=(--batches 64 --seqs 512 8192 --ref-max-t 512)
  HEAD_MEMORY_BUDGET_S=2  # per mode; --no-search as well where the script has it
  GENERATE_S=${FASTRLHF_GENERATE_TIMEOUT:-45}
  GENERATE_RUNS=("demo --arch smollm2-135m")
else
  TOTAL_S=${FASTRLHF_TOTAL_S:-590}
  TESTS_TIMEOUT=${FASTRLHF_TESTS_TIMEOUT:-120}
  SWEEP_TIMEOUT=${FASTRLHF_SWEEP_TIMEOUT:-210}
  SWEEP_MIN_S=${FASTRLHF_SWEEP_MIN_S:-170}
  LINEAR_S=${FASTRLHF_LINEAR_TIMEOUT:-45}
  GAE_S=${FASTRLHF_GAE_TIMEOUT:-15}
  HEAD_MEMORY_S=${FASTRLHF_HEAD_MEMORY_TIMEOUT:-60}
  SWEEP_FLAGS=()
  LINEAR_FLAGS=()
  GAE_FLAGS=(--batches 8 64 --seqs 512 2048 8192 --ref-max-t 2048)
  HEAD_MEMORY_BUDGET_S=6
  GENERATE_S=${FASTRLHF_GENERATE_TIMEOUT:-150}
  GENERATE_RUNS=("demo --arch smollm2-135m"
                 "llama-3.2-1b --arch llama-3.2-1b --prompts 32 --max-new-tokens 256 --repeats 1"
                 "qwen2.5-1.5b --arch qwen2.5-1.5b --prompts 32 --max-new-tokens 256 --repeats 1")
fi
if [ "$DRY" = 1 ]; then  # CPU wiring only: tests/test_benchmarks_smoke.py and test_bench_linear_smoke.py cover the rest
  TOTAL_S=${FASTRLHF_TOTAL_S:-380}  # the interpreter is slow: room for the smoke modes
  LINEAR_S=${FASTRLHF_LINEAR_TIMEOUT:-60}
  GAE_S=${FASTRLHF_GAE_TIMEOUT:-30}
  HEAD_MEMORY_S=${FASTRLHF_HEAD_MEMORY_TIMEOUT:-75}
  SWEEP_FLAGS=(--smoke --ops token_logprobs pairwise_loss)
  LINEAR_FLAGS=(--smoke)
  GAE_FLAGS=()  # without CUDA it times the Python loop at B=8, T=512 only
  GENERATE_S=${FASTRLHF_GENERATE_TIMEOUT:-60}
  GENERATE_RUNS=("smoke --smoke --device cpu")
fi
MERGE_S=15  # the last seconds of the deadline, kept for the merge step
BEYOND_S=$((LINEAR_S + GAE_S + HEAD_MEMORY_S + GENERATE_S + MERGE_S))
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg MPLCONFIGDIR=/tmp/fastrlhf_mpl HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONDONTWRITEBYTECODE=1

STAGES=()
FAILED=0
T_START=$(date +%s)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/fastrlhf_gpu_check.XXXXXX") || exit 2  # the beyond-the-logits outputs, tests.log
trap 'rm -rf "$SCRATCH"' EXIT
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
STATE_VARS=(PY REPO OUT WHEELS SITE SHIM SCRATCH KERNEL_TESTS PYTEST_ARGS SWEEP_ARGS LINEAR_ARGS GAE_ARGS HEAD_MEMORY_ARGS GENERATE_RUNS)

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
  log "no wheels in $WHEELS/: nothing to install (liger_kernel / nvtx may be missing: scripts/gpu/fetch_wheels.sh)"
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
TESTS_LIMIT=$(min "$TESTS_TIMEOUT" $(($(left_s) - SWEEP_MIN_S - BEYOND_S)))
if [ "$TESTS_LIMIT" -ge 10 ]; then
  run_stage tests "$TESTS_LIMIT" "$SCRATCH/tests.log" run_tests INT
  { echo "----- pytest output (kernel tests) -----"; cat "$SCRATCH/tests.log"; echo "----- end of pytest output -----"; } >>"$LOG"
else
  log "stage tests: skipped, no time left (${TESTS_LIMIT}s)"
  record tests 124 0
fi
tail -n 4 "$SCRATCH/tests.log" 2>/dev/null
echo

# ---- 5 sweep ---------------------------------------------------------------------------------------
SWEEP_LIMIT=$(min "$SWEEP_TIMEOUT" $(($(left_s) - BEYOND_S)))
SWEEP_ARGS=(benchmarks/sweep.py --out "$OUT" ${SWEEP_FLAGS[@]+"${SWEEP_FLAGS[@]}"})
[ "$DRY" = 1 ] || SWEEP_ARGS+=(--budget-s $((SWEEP_LIMIT - 25)))
run_sweep() { "$PY" "${SWEEP_ARGS[@]}"; }
if [ "$SWEEP_LIMIT" -ge 45 ]; then
  run_stage sweep "$SWEEP_LIMIT" "$LOG" run_sweep
else
  log "stage sweep: skipped, no time left (${SWEEP_LIMIT}s)"
  record sweep 124 0
fi

# ---- 6-8 the "beyond the logits" benchmarks ------- -----------------------------------------------
# Each writes into $SCRATCH/<name>/, never into OUT_DIR (at most 8 files come back); the merge
# below bundles the JSONs into OUT_DIR/beyond.json and appends the markdown to summary.md.
BEYOND_NOTES=()  # "name: why" for a benchmark that did not run
run_linear() { "$PY" "${LINEAR_ARGS[@]}"; }
run_gae() { "$PY" "${GAE_ARGS[@]}"; }
run_head_memory() { "$PY" "${HEAD_MEMORY_ARGS[@]}"; }
# each run "NAME ARGS...": bench_generate.py ARGS --out $SCRATCH/generate/NAME, in order; a run cut by the
# stage's timeout leaves the earlier runs' files
run_generate() {
  local spec rc=0
  for spec in "${GENERATE_RUNS[@]}"; do
    # shellcheck disable=SC2086  # the run's arguments, split on purpose
    "$PY" benchmarks/bench_generate.py ${spec#* } --out "$SCRATCH/generate/${spec%% *}" || rc=1
  done
  return $rc
}
# beyond_stage NAME LIMIT_S FUNCTION: run it if at least 10 s are left for it, else record why not
beyond_stage() {
  if [ "$2" -ge 10 ]; then
    run_stage "$1" "$2" "$LOG" "$3"
  else
    log "stage $1: skipped, no time left (${2}s)"
    record "$1" 124 0
    BEYOND_NOTES+=("$1: skipped, no time left (${2}s)")
  fi
}

LINEAR_LIMIT=$(min "$LINEAR_S" $(($(left_s) - GAE_S - HEAD_MEMORY_S)))
LINEAR_ARGS=(benchmarks/bench_linear.py --out "$SCRATCH/linear" ${LINEAR_FLAGS[@]+"${LINEAR_FLAGS[@]}"}
             --budget-s $((LINEAR_LIMIT > 20 ? LINEAR_LIMIT - 10 : 10)))  # start-up ~5 s, the last call's overrun
beyond_stage linear "$LINEAR_LIMIT" run_linear

GAE_LIMIT=$(min "$GAE_S" $(($(left_s) - HEAD_MEMORY_S)))
GAE_ARGS=(benchmarks/bench_gae.py --out "$SCRATCH/gae" ${GAE_FLAGS[@]+"${GAE_FLAGS[@]}"})
beyond_stage gae "$GAE_LIMIT" run_gae

HM=benchmarks/bench_head_memory.py
HEAD_MEMORY_LIMIT=$(min $((HEAD_MEMORY_S + 15)) $(($(left_s) - GENERATE_S - MERGE_S)))
if [ ! -f "$HM" ]; then
  log "stage head_memory: skipped: $HM does not exist (yet)"
  STAGES+=("head_memory skipped: $HM does not exist")
  BEYOND_NOTES+=("head_memory: skipped, $HM does not exist")
else
  HEAD_MEMORY_ARGS=("$HM" --out "$SCRATCH/head_memory")
  if [ "$DRY" = 1 ]; then
    HEAD_MEMORY_ARGS+=(--arch tiny --vocab-size 300 --hidden-size 32 --batch 2 --prompt-len 4 --reply-len 8
                       --warmup 0 --reps 1 --device cpu)
  else
    HEAD_MEMORY_ARGS+=(--arch llama-3.2-1b --time-budget-s "$HEAD_MEMORY_BUDGET_S")
    if [ "$QUICK" = 1 ]; then  # the script is written in parallel: pass only the flags it has
      grep -q '"--search", action=argparse.BooleanOptionalAction' "$HM" && HEAD_MEMORY_ARGS+=(--no-search)
      grep -q '"--reps"' "$HM" && HEAD_MEMORY_ARGS+=(--reps 1)
    fi
  fi
  beyond_stage head_memory "$HEAD_MEMORY_LIMIT" run_head_memory
fi

GENERATE_LIMIT=$(min $((GENERATE_S + 15)) $(($(left_s) - MERGE_S)))  # the last stage: what the others left
beyond_stage generate "$GENERATE_LIMIT" run_generate

# merge: OUT_DIR/beyond.json (the JSONs, unchanged) and the markdown appended to summary.md
t0=$(date +%s)
timeout -k 5 "$MERGE_S" "$PY" - "$SCRATCH" "$OUT" ${BEYOND_NOTES[@]+"${BEYOND_NOTES[@]}"} >>"$LOG" 2>&1 <<'PYEOF'
import json, sys
from pathlib import Path

scratch, out, notes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
sys.path.insert(0, "benchmarks")
parts = {"linear": ("linear.json", "linear.md"), "gae": ("gae.json", None),
         "head_memory": ("head_memory.json", "head_memory.md")}
doc = {"about": "the beyond-the-logits benchmarks run by scripts/gpu/gpu_check.sh; each entry is that script's own JSON, unchanged "
                "(benchmarks/bench_linear.py, bench_gae.py, bench_head_memory.py; bench_generate.py per run under "
                "'generate'); 'missing' says why one is absent",
       "missing": {}}
md = ["## Beyond the logits: bench_linear, bench_gae, bench_head_memory, bench_generate", ""]
why = dict(n.split(": ", 1) for n in notes)
for name, (js, mdf) in parts.items():
    path = scratch / name / js
    try:
        doc[name] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        doc[name] = None
        doc["missing"][name] = why.get(name, f"no {js}: the stage failed or timed out ({type(e).__name__}); "
                                             "see gpu_check.log")
        md += [f"### {name}: not measured ({doc['missing'][name]})", ""]
        continue
    if mdf is not None and (scratch / name / mdf).is_file():
        md += [(scratch / name / mdf).read_text().strip(), ""]
    else:  # bench_gae prints its table but writes only the JSON: rebuild the table from it
        try:
            import bench_gae
            table = bench_gae.markdown(doc[name]["rows"], doc[name]["meta"])
            md += ["### GAE scan vs the Python loop (bench_gae)", "", table, ""]
        except Exception as e:
            md += [f"### {name}: table not rendered ({type(e).__name__}: {e}); the numbers are in beyond.json", ""]
runs = sorted((scratch / "generate").glob("*/generate.json"))
doc["generate"] = {}
for path in runs:
    try:
        doc["generate"][path.parent.name] = json.loads(path.read_text())
        md += [f"### Sampling ({path.parent.name}, bench_generate)", "", (path.parent / "generate.md").read_text().strip(), ""]
    except (OSError, ValueError) as e:
        md += [f"### generate {path.parent.name}: not read ({type(e).__name__}: {e})", ""]
if not doc["generate"]:
    doc["generate"] = None
    doc["missing"]["generate"] = why.get("generate", "no generate.json: the stage failed or timed out; see gpu_check.log")
    md += [f"### generate: not measured ({doc['missing']['generate']})", ""]
(out / "beyond.json").write_text(json.dumps(doc, indent=2, default=str))
summary = out / "summary.md"
head = summary.read_text().rstrip() + "\n\n" if summary.is_file() else "(no sweep summary: see gpu_check.log)\n\n"
summary.write_text(head + "\n".join(md).rstrip() + "\n")
print("merge: beyond.json (" + ", ".join(k for k in parts if doc[k] is not None) + "), summary.md appended;"
      + (" missing: " + json.dumps(doc["missing"]) if doc["missing"] else ""))
PYEOF
record merge $? $(($(date +%s) - t0))

# ---- summary (printed last: the sweep's short markdown, the beyond-the-logits markdown, then the stages) ---------
if [ -f "$OUT/summary.md" ]; then
  sed '/^### All cells/,$d; /^## Beyond the logits/,$d' "$OUT/summary.md"
  echo
  sed -n '/^## Beyond the logits/,$p' "$OUT/summary.md"
else
  echo "no summary.md: see the sweep stage in gpu_check.log"
  tail -n 20 "$LOG"
fi
echo
echo "## gpu_check stages ($(($(date +%s) - T_START)) s total; quick=$QUICK dry=$DRY)" | tee -a "$LOG"
for s in "${STAGES[@]}"; do echo "- $s" | tee -a "$LOG"; done
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')" | tee -a "$LOG"
exit "$FAILED"
