#!/usr/bin/env bash
# One call on an offline GPU host that allows 15 minutes per visit, machine start included: what run 1 of
# results/2026-11-27-h200 ran (357 s), plus the forward tile sweep, into two tar files.
#
#   FASTRLHF_GIT_COMMIT=<sha> bash scripts/gpu/gpu_session.sh OUT
#       needs .whl/ and .gpu/cfg135m/ from scripts/gpu/gpu_prepare.sh; OUT: the folder whose files come back
#   1 gpu_check.sh in a 350 s slot (kernel tests compiled on CUDA, the sweep, beyond-the-logits, sampling at
#     the demo shape, then 1B shapes while its 75 s last)                                       -> /tmp/gc
#   2 tune_rows.py --budget-s 65: token_logprobs' and full_kl's forward tiles (10 each)    -> /tmp/gc/tune_rows.json
#     gpu_math_probe.py: the GPU's exp2, division and fp32/bf16 tl.dot vs fp64 (~10 s) -> /tmp/gc/gpu_math_probe.json
#     tune_linear.py --backward --budget-s 30: the fused-linear grad_z kernel's tiles  -> /tmp/gc/tune_linear_bwd.json
#   3 gpu_pipeline.sh on a random model of .gpu/cfg135m (pipeline 180 s, bench_ppo_step --cuda-graphs 45 s) -> /tmp/pl
#   OUT gets gpu_check.tgz and gpu_pipeline.tgz (at most 8 files come back). About 530 s in all:
#   give it a 590 s limit, which leaves the rest of the 15 minutes for the machine's start.
# Every stage's time limit is the variable of gpu_check.sh / gpu_pipeline.sh of the same name (defaults: the
# numbers above); PYTHON and FASTRLHF_GPU_CHECK_DRY pass through. FASTRLHF_GPU_CHECK_DRY=1 is a CPU wiring
# check (~2.5 min on 2 cores): gpu_check.sh's dry run, the two GPU-only tuners refusing, the probe on the
# interpreter, and the pipeline and bench_ppo_step end to end on tiny settings (40 prompts x 4 samples, one
# PPO step; one 4-prompt step) where the GPU runs the defaults.
set -u
[ $# = 1 ] || { echo "usage: bash scripts/gpu/gpu_session.sh OUT" >&2; exit 2; }
OUT=$1
cd "$(dirname "$0")/../.." || exit 2
PY=${PYTHON:-python3}
S=$(date +%s)
stamp() { echo "== gpu_session: $1 at $(( $(date +%s) - S )) s"; }

stamp "gpu_check"
FASTRLHF_TOTAL_S=${FASTRLHF_TOTAL_S:-350} FASTRLHF_TESTS_TIMEOUT=${FASTRLHF_TESTS_TIMEOUT:-70} \
  FASTRLHF_SWEEP_MIN_S=${FASTRLHF_SWEEP_MIN_S:-90} FASTRLHF_SWEEP_TIMEOUT=${FASTRLHF_SWEEP_TIMEOUT:-110} \
  FASTRLHF_LINEAR_TIMEOUT=${FASTRLHF_LINEAR_TIMEOUT:-35} FASTRLHF_GAE_TIMEOUT=${FASTRLHF_GAE_TIMEOUT:-12} \
  FASTRLHF_HEAD_MEMORY_TIMEOUT=${FASTRLHF_HEAD_MEMORY_TIMEOUT:-35} \
  FASTRLHF_GENERATE_TIMEOUT=${FASTRLHF_GENERATE_TIMEOUT:-75} bash scripts/gpu/gpu_check.sh /tmp/gc
# what gpu_check installed or shimmed (wheels in /tmp/site, fastrlhf itself editable or through the shim)
export PYTHONPATH=/tmp/site:/tmp/fastrlhf_shim${PYTHONPATH:+:$PYTHONPATH}

stamp "tune_rows"
timeout "${FASTRLHF_TUNE_ROWS_TIMEOUT:-100}" "$PY" benchmarks/tools/tune_rows.py --out /tmp/gc/tune_rows.json \
  --budget-s "${FASTRLHF_TUNE_ROWS_BUDGET:-65}" 2>&1 | tee /tmp/gc/tune_rows.log
stamp "gpu_math_probe"  # ex2.approx / div.full / tl.dot against fp64, to calibrate tests/gpu_math.py (~10 s)
timeout "${FASTRLHF_PROBE_TIMEOUT:-60}" "$PY" benchmarks/tools/gpu_math_probe.py --out /tmp/gc/gpu_math_probe.json \
  2>&1 | tee /tmp/gc/gpu_math_probe.log
stamp "tune_linear_bwd"  # the fused-linear backward's grad_z tiles (it ships the forward's, which spill) (~35 s)
timeout "${FASTRLHF_TUNE_LINEAR_TIMEOUT:-60}" "$PY" benchmarks/tools/tune_linear.py --backward --out /tmp/gc/tune_linear_bwd.json \
  --budget-s "${FASTRLHF_TUNE_LINEAR_BUDGET:-30}" 2>&1 | tee /tmp/gc/tune_linear_bwd.log
tar czf "$OUT/gpu_check.tgz" -C /tmp gc

stamp "gpu_pipeline"
if [ "${FASTRLHF_GPU_CHECK_DRY:-0}" = 1 ]; then  # on a CPU the defaults would run past their time limits
  export FASTRLHF_PIPELINE_ARGS=${FASTRLHF_PIPELINE_ARGS:---limit 40 --samples-per-prompt 4 --ppo-steps 1 --ppo-batch-prompts 4 --ppo-minibatch-size 2 --rm-epochs 1 --eval-samples-per-prompt 1}
  export FASTRLHF_PPO_STEP_ARGS=${FASTRLHF_PPO_STEP_ARGS:---steps 1 --batch-prompts 4 --minibatch-size 2 --ppo-epochs 1 --max-new-tokens 8}
fi
# bench_ppo_step samples with CUDA graphs (the sampler's decode step): the step the kernels speed up is then
# not mostly generation
export FASTRLHF_PPO_STEP_ARGS=${FASTRLHF_PPO_STEP_ARGS:---cuda-graphs}
FASTRLHF_PIPELINE_TIMEOUT=${FASTRLHF_PIPELINE_TIMEOUT:-180} FASTRLHF_PPO_STEP_TIMEOUT=${FASTRLHF_PPO_STEP_TIMEOUT:-45} \
  bash scripts/gpu/gpu_pipeline.sh .gpu/cfg135m /tmp/pl
tar czf "$OUT/gpu_pipeline.tgz" -C /tmp pl
stamp "all done"
