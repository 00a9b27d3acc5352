"""The test harness itself: the contract's bounds reject what they should, and a contract test that did not
run its Triton kernel fails (in a pytest subprocess with this directory's conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from contract import assert_contract, rounding

TESTS = Path(__file__).resolve().parent


def test_rounding_is_half_an_ulp_or_the_subnormal_spacing():
    x = torch.tensor([1.0, 1.5, 2.0, 3.0e-8, 0.0], dtype=torch.float64)
    half16 = rounding(x, torch.float16)
    assert half16.tolist() == [2.0**-11, 2.0**-11, 2.0**-10, 2.0**-25, 2.0**-25]  # fp16: 10 bits, subnormals 2^-24
    assert (rounding(x, torch.float32) == 0).all()


@pytest.mark.kernels()  # the rule on its own: no kernel runs
def test_contract_rejects_an_offset_a_scale_and_a_zeroed_slice_in_bf16(gen, monkeypatch):
    """The faults a bf16-sized bound once let through: on fp32 outputs from bf16 inputs, and on a bf16 gradient."""
    monkeypatch.delenv("FASTRLHF_CONTRACT_LOG", raising=False)  # not a kernel's record
    ref = torch.randn(64, generator=gen, dtype=torch.float64) * 3
    eager32 = ref.float()  # eager at fp32 accuracy
    assert_contract("exact", ref.float(), eager32, ref)
    for wrong in (ref.float() + 0.05, ref.float() * 1.005):
        with pytest.raises(AssertionError, match="bound"):
            assert_contract("fp32 output", wrong, eager32, ref)
    grad = ref.to(torch.bfloat16)  # one rounding: passes
    assert_contract("bf16 grad", grad, eager32, ref)
    zeroed = grad.clone()
    zeroed[::3] = 0
    with pytest.raises(AssertionError, match="bound"):
        assert_contract("bf16 grad, a third zeroed", zeroed, eager32, ref)


@pytest.mark.kernels()  # the rule on its own: no kernel runs
def test_eager_in_a_low_precision_dtype_is_refused(gen):
    ref = torch.randn(8, generator=gen, dtype=torch.float64)
    with pytest.raises(AssertionError, match="eager must run in fp32"):
        assert_contract("x", ref.float(), ref.to(torch.bfloat16), ref)


HARNESS_CHECK = """
import importlib
import pytest
import torch
from contract import assert_contract
from fastrlhf.kernels import full_kl, full_kl_ref

FK = importlib.import_module("fastrlhf.kernels.full_kl")


def kl_case(monkeypatch, kernel):
    if not kernel:
        monkeypatch.setattr(FK, "use_triton", lambda t: False)  # what TRITON_INTERPRET=0 would do on CPU
    x, y = torch.randn(3, 40), torch.randn(3, 40)
    assert_contract("kl", full_kl(x, y), full_kl_ref(x, y), full_kl_ref(x.double(), y.double()))


@pytest.mark.kernels("full_kl.fwd")
def test_kernel_ran(monkeypatch):
    kl_case(monkeypatch, True)


@pytest.mark.kernels("full_kl.fwd")
def test_reference_ran(monkeypatch):
    kl_case(monkeypatch, False)


def test_undeclared(monkeypatch):
    kl_case(monkeypatch, True)
"""


def test_a_contract_test_must_declare_and_run_its_kernel(tmp_path):
    for name in ("conftest.py", "contract.py", "gpu_math.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "test_check.py").write_text(textwrap.dedent(HARNESS_CHECK))
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # exported 0: the conftest must still run the kernels
    env.pop("FASTRLHF_CONTRACT_LOG", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert "PASSED test_check.py::test_kernel_ran" in out, out
    assert "ERROR at teardown of test_reference_ran" in out and "did not run" in out, out
    assert "ERROR at teardown of test_undeclared" in out and "must name its launches" in out, out
