#!/usr/bin/env bash
# Peak memory (max RSS) and time per step of step 3's settings, PPO vs GRPO, each in its own process:
# 3 of the pipeline's 20 steps, on the pipeline run's train prompts and reward model (runs/pipeline).
set -u
cd "$(dirname "$0")/../../.."
source scripts/setup_env.sh
R=runs/pipeline
COMMON="--prompts $R/prompts/train.jsonl --reward-model $R/step2_reward/model --ref-quant int8 --freeze-layers -1 --steps 20 --max-steps 3 --minibatch-size 16 --ppo-epochs 2 --lr 5e-5 --save-every 100 --seed 0"
run() {
  name=$1; shift
  rm -rf runs/mem/$name; mkdir -p runs/mem
  /usr/bin/time -v "$PY" -m fastrlhf.trainer.cli ppo $COMMON --out-dir runs/mem/$name "$@" > runs/mem/$name.log 2>&1
  echo "$name rc=$? $(grep 'Maximum resident' runs/mem/$name.log) $(grep 'Elapsed (wall' runs/mem/$name.log)"
}
run ppo --batch-prompts 32 --critic separate
run grpo-both --batch-prompts 8 --samples-per-prompt 4 --advantage grpo --kl-in loss --reward both
run grpo-rubric --batch-prompts 8 --samples-per-prompt 4 --advantage grpo --kl-in loss --reward rubric
