"""pytest set-up for the benchmark suite (`pytest benchmarks/ --benchmark-...`).

- On a machine without CUDA, run the Triton kernels through Triton's interpreter (as tests/conftest.py
  does): TRITON_INTERPRET must be set before triton is first imported.
- Collect `bench_*.py` files too (pytest's default pattern is `test_*.py`), without collecting a file
  twice when it is named on the command line.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
