#!/usr/bin/env bash
# Lint, the test suite, then the mutation run (scripts/mutation_check.py: known faults written into the kernels
# and the RL math, one at a time; the tests must catch every one). On a machine without CUDA the Triton
# kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
# imported); on CUDA they run compiled. Extra arguments go to pytest alone, with no mutation run, e.g.
# `bash scripts/test.sh -k full_kl`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# Lint and format check first (pyproject.toml [tool.ruff]); an interpreter without ruff (a GPU host's own) skips them.
if "$PY" -m ruff --version >/dev/null 2>&1; then
  "$PY" -m ruff check .
  "$PY" -m ruff format --check .
else
  echo "[test] ruff is not installed for $PY: lint skipped" >&2
fi
"$PY" -m pytest -q "$@"
if [ $# -eq 0 ]; then
  "$PY" scripts/mutation_check.py --no-baseline  # the suite just passed: its tests are the baseline
fi
