#!/usr/bin/env bash
# Lint, then the test suite. On a machine without CUDA the Triton kernels run through Triton's interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported); on CUDA they run compiled.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k full_kl`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# Lint first (pyproject.toml [tool.ruff]); an interpreter without ruff (a GPU host's own) skips it.
if "$PY" -m ruff --version >/dev/null 2>&1; then
  "$PY" -m ruff check .
else
  echo "[test] ruff is not installed for $PY: lint skipped" >&2
fi
exec "$PY" -m pytest -q "$@"
