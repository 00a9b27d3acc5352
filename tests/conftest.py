"""Test set-up: on a machine without CUDA, run the Triton kernels through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this happens at the top of conftest,
before torch or fastrlhf are imported. Without it, CPU tensors would take the `*_ref` path and the
kernel tests would compare the reference with itself.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's name: fresh inputs per test, reproducible run to run."""
    g = torch.Generator(device="cpu")
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g
