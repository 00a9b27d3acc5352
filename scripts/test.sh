#!/usr/bin/env bash
# The test suite. On a machine without CUDA the Triton kernels run through Triton's interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported); on CUDA they run compiled.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k full_kl`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "$PY" -m pytest -q "$@"
