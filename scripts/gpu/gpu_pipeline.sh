#!/usr/bin/env bash
# The pipeline's GPU measurements on an offline GPU host that lacks the embedded model's weights (the 98 MB
# GGUF does not fit the host's 64 MiB per call): `fastrlhf pipeline` and benchmarks/bench_ppo_step.py on a
# seeded RANDOM model of the default model's configuration (SmolLM2-135M: same shapes, same tokenizer).
#
#   bash scripts/gpu/gpu_pipeline.sh CFG_DIR OUT_DIR
#       CFG_DIR  config.json, generation_config.json and the tokenizer files of the model (no weights);
#                for the default model, copy them from ~/.cache/fastrlhf/smollm2-135m-instruct/ (~3.5 MB)
#       OUT_DIR  gets pipeline.log, pipeline/ (report.md, metrics.json, plots/), ppo_step/ (ppo_step.json
#                and .md, both runs' metrics.jsonl) and ppo_step.log
#
# What the numbers mean. A random model almost never samples EOS, so every reply runs to the token limit:
# generation does the most work it can, and the pipeline's wall time is an upper bound for the same
# settings on the real weights, which stop early (EOS rate 0.3 -> 0.7 on CPU). The rubric's verdicts,
# the win rate and the reward model's accuracy on random text mean nothing; only times and memory count.
# Triton compiles into a fresh cache (TRITON_CACHE_DIR), so the pipeline's time includes them, as on a
# new machine.
#
# Environment: PYTHON (default python3), FASTRLHF_PIPELINE_TIMEOUT (s, default 240),
# FASTRLHF_PPO_STEP_TIMEOUT (s, default 90; 0 skips bench_ppo_step), FASTRLHF_PIPELINE_ARGS (extra
# `fastrlhf pipeline` flags, default none: the default settings, int8 reference included),
# FASTRLHF_PPO_STEP_ARGS (extra bench_ppo_step.py flags, default none).
set -u
[ $# = 2 ] || { echo "usage: bash scripts/gpu/gpu_pipeline.sh CFG_DIR OUT_DIR" >&2; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CFG=$(cd "$1" && pwd) || exit 2
mkdir -p "$2" || exit 2
OUT=$(cd "$2" && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg MPLCONFIGDIR=/tmp/fastrlhf_mpl HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastrlhf_gpu_pipeline.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
log() { echo "[gpu_pipeline $(date +%H:%M:%S)] $*"; }

# fastrlhf importable without network: as installed, else the symlink shim scripts/gpu/gpu_check.sh makes
if ! (cd /tmp && "$PY" -c "import fastrlhf.trainer.cli") 2>/dev/null; then
  SHIM=${FASTRLHF_SHIM:-/tmp/fastrlhf_shim}
  mkdir -p "$SHIM/fastrlhf" && ln -sfn "$REPO/kernels" "$SHIM/fastrlhf/kernels" && ln -sfn "$REPO/trainer" "$SHIM/fastrlhf/trainer"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  (cd /tmp && "$PY" -c "import fastrlhf.trainer.cli") || { log "fastrlhf.trainer.cli is not importable"; exit 1; }
fi

log "building a seeded random model of $CFG"
"$PY" - "$CFG" "$WORK/model" <<'EOF' || exit 1
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_ppo_step import random_init_model
print("random model:", random_init_model(sys.argv[1], Path(sys.argv[2]), seed=0))
EOF

RC=0
log "fastrlhf pipeline --model <random $(basename "$CFG")> ${FASTRLHF_PIPELINE_ARGS:-} (timeout ${FASTRLHF_PIPELINE_TIMEOUT:-240}s)"
T0=$(date +%s)
# shellcheck disable=SC2086  # FASTRLHF_PIPELINE_ARGS is a list of flags
TRITON_CACHE_DIR="$WORK/triton_cache" timeout -k 10 "${FASTRLHF_PIPELINE_TIMEOUT:-240}" \
  "$PY" -m fastrlhf.trainer.cli pipeline --model "$WORK/model" --out-dir "$WORK/pipeline" ${FASTRLHF_PIPELINE_ARGS:-} \
  >"$OUT/pipeline.log" 2>&1 || RC=$?
log "pipeline: rc=$RC, wall $(($(date +%s) - T0)) s (log: pipeline.log)"
mkdir -p "$OUT/pipeline"
cp -r "$WORK"/pipeline/report.md "$WORK"/pipeline/metrics.json "$WORK"/pipeline/plots "$OUT/pipeline/" 2>/dev/null
grep -E "pipeline finished|Error" "$OUT/pipeline.log" | tail -n 3
"$PY" -c 'import json, sys; print("timings (s):", json.load(open(sys.argv[1]))["timings"])' "$OUT/pipeline/metrics.json" 2>/dev/null

if [ "${FASTRLHF_PPO_STEP_TIMEOUT:-90}" != 0 ]; then
  log "bench_ppo_step ${FASTRLHF_PPO_STEP_ARGS:-}: kernels vs eager on the same random model (timeout ${FASTRLHF_PPO_STEP_TIMEOUT:-90}s)"
  # shellcheck disable=SC2086  # FASTRLHF_PPO_STEP_ARGS is a list of flags
  timeout -k 10 "${FASTRLHF_PPO_STEP_TIMEOUT:-90}" "$PY" benchmarks/bench_ppo_step.py --model "$WORK/model" \
    --out "$OUT/ppo_step" --work-dir "$WORK/ppo_step_work" ${FASTRLHF_PPO_STEP_ARGS:-} >"$OUT/ppo_step.log" 2>&1 || RC=$?
  tail -n 25 "$OUT/ppo_step.log"
fi
exit "$RC"
