#!/usr/bin/env bash
# The main job: `fastrlhf pipeline` -- RLHF steps 1-3 on the embedded SmolLM2-135M-Instruct and the shipped
# prompts (sample pairs, scripted-rubric annotation, reward model, validation, PPO against an int8 reference,
# evaluation on held-out prompts), offline, with a report in
# runs/pipeline/report.md. Extra arguments go to the command (`bash scripts/pipeline.sh --help`).
# On CPU the kernels' *_ref twins run (the Triton interpreter is for tests); on CUDA the compiled kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "$PY" -m fastrlhf.trainer.cli pipeline "$@"
