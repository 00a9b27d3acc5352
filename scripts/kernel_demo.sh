#!/usr/bin/env bash
# Kernel demo: each fused kernel next to eager PyTorch on SmolLM2-sized logits (vocab 49152), errors
# against an fp64 reference, and time and memory on CUDA. On a machine without CUDA the kernels run
# through Triton's interpreter (exact, slow: about a minute); on CUDA they run compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
exec "$PY" scripts/kernel_demo.py "$@"
