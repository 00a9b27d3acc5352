"""The GPU arithmetic model (gpu_math.py) itself, and the kernels' fp32 precision contract under it.

The interpreter rounds exp2 and division (nearly) correctly; a GPU does not (ex2.approx.ftz.f32, div.full.f32). The
kernels' fp32 contract tests run once more under the model, in a subprocess, so that a kernel which leans on
exact rounding (an fp32 `/` where forward and backward must agree, a 2^x that must be exactly 1) fails here,
on CPU, and not first on a GPU. The model's own tests pin what it claims: exact where the hardware is exact,
within its bounds elsewhere, deterministic, and really different from exact rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gpu_math
import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="a model for the interpreter; a GPU runs the real thing")

F32 = np.float32


def test_exp2_exact_where_the_hardware_is():
    ints = np.arange(-126, 128, dtype=F32)
    assert np.array_equal(gpu_math.exp2(ints), (2.0 ** ints.astype(np.float64)).astype(F32))  # 2^k, exactly
    tiny = -np.logspace(-30, -8, 50).astype(F32)  # below the argument's 2^-23 resolution: 2^x rounds to 1
    assert np.all(gpu_math.exp2(tiny) == 1.0)
    assert gpu_math.exp2(np.array([-127.5, -149.0], F32)).tolist() == [0.0, 0.0]  # .ftz: no subnormals
    assert gpu_math.exp2(np.array([-np.inf, np.inf, np.nan], F32))[:2].tolist() == [0.0, np.inf]
    assert np.isnan(gpu_math.exp2(np.array([np.nan], F32)))[0]


def test_exp2_error_bounded_deterministic_and_real():
    x = np.random.default_rng(0).uniform(-60, 10, 200_000).astype(F32)
    y, exact = gpu_math.exp2(x).astype(np.float64), np.exp2(x.astype(np.float64))
    rel = np.abs(y / exact - 1)
    # the argument's quantisation (2^-24 ln 2, only where |x| < 1), the table, the result's rounding
    assert rel.max() <= 2.0**-24 * np.log(2) + gpu_math.TABLE_ERR + 2.0**-24 + 1e-12
    assert np.array_equal(gpu_math.exp2(x), gpu_math.exp2(x.copy()))  # a function of the input
    correctly_rounded = np.exp2(x.astype(np.float64)).astype(F32)  # not numpy's fp32 exp2: its accuracy is the CPU's
    assert (gpu_math.exp2(x) != correctly_rounded).mean() > 0.4  # and not exact rounding (it moves ~half)
    assert not np.array_equal(gpu_math.exp2(x, seed=1), gpu_math.exp2(x, seed=0))
    e = np.random.default_rng(1).uniform(-80, 80, 1000).astype(F32)
    assert np.array_equal(gpu_math.exp(e), gpu_math.exp2((e * F32(1.4426950408889634)).astype(F32)))


def test_division_model():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(-5, 5, 100_000).astype(F32), rng.uniform(0.01, 50, 100_000).astype(F32)
    q, exact = gpu_math.div(a, b).astype(np.float64), a.astype(np.float64) / b.astype(np.float64)
    assert np.abs(q / exact - 1).max() <= 2.0**-23 + 2.0**-24 + 1e-12  # rcp within 1 ulp, the product's rounding
    r = gpu_math.div(np.ones_like(b), b).astype(np.float64)
    ulp = np.exp2(np.floor(np.log2(1.0 / b.astype(np.float64))) - 23)
    assert (np.abs(r - 1.0 / b.astype(np.float64)) / ulp).max() <= 1.0
    assert (gpu_math.div(a, b) != a / b).mean() > 0.3
    p2 = np.array([1.0, 2.0, 0.5, 1024.0, -4.0], F32)
    assert np.array_equal(gpu_math.div(a[:5], p2), a[:5] / p2)  # rcp of a power of two is exact
    assert gpu_math.div(np.float64(1.0), np.float64(3.0)) == 1.0 / 3.0  # other dtypes: exact


def test_fp32_dot_is_one_fma_chain_over_k():
    a = np.array([[1e8, 1.0, -1e8, 1.0]], F32)  # 1e8 + 1 rounds back to 1e8 in fp32: the order shows
    ones = np.ones((4, 1), F32)
    assert gpu_math.dot(a, ones, np.zeros((1, 1), F32))[0, 0] == 1.0  # ((1e8 + 1) - 1e8) + 1
    assert gpu_math.dot(a[:, [0, 2, 1, 3]], ones, np.zeros((1, 1), F32))[0, 0] == 2.0  # ((1e8 - 1e8) + 1) + 1: exact
    assert gpu_math.dot(a, ones, np.full((1, 1), -1e8, F32))[0, 0] == -1e8 + 1  # from the accumulator passed in
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((8, 64)).astype(F32), rng.standard_normal((64, 8)).astype(F32)
    chain = np.zeros((8, 8), F32)
    for k in range(64):  # the FMA: exact product, one rounding
        chain = (chain.astype(np.float64) + x[:, k, None].astype(np.float64) * y[k].astype(np.float64)).astype(F32)
    assert np.array_equal(gpu_math.dot(x, y, np.zeros((8, 8), F32)), chain)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr):
    i, k = tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + i[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + i[None, :])
    c = tl.load(c_ptr + i[:, None] * N + i[None, :])
    tl.store(out_ptr + i[:, None] * N + i[None, :], tl.dot(a, b, c, input_precision="ieee"))


def test_install_models_the_fp32_dot():
    g = torch.Generator().manual_seed(5)
    a, b, c = torch.randn(16, 64, generator=g) * 8, torch.randn(64, 16, generator=g), torch.randn(16, 16, generator=g)
    out = torch.empty(16, 16)
    old = gpu_math.install(seed=0)
    try:
        _dot_kernel[(1,)](a, b, c, out, N=16, K=64)
    finally:
        gpu_math.uninstall(old)
    assert torch.equal(out, torch.from_numpy(gpu_math.dot(a.numpy(), b.numpy(), c.numpy())))


@triton.jit
def _ops(x_ptr, b_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    b = tl.load(b_ptr + i)
    tl.store(out_ptr + i, tl.exp2(x))
    tl.store(out_ptr + N + i, x / b)
    tl.store(out_ptr + 2 * N + i, tl.div_rn(x, b))


def test_install_patches_the_interpreter_and_uninstall_restores_it():
    n = 1024
    g = torch.Generator().manual_seed(3)
    x, b = torch.randn(n, generator=g) * 5, torch.rand(n, generator=g) + 0.5

    def run():
        out = torch.empty(3 * n)
        _ops[(1,)](x, b, out, N=n)
        return out.view(3, n)

    plain = run()
    assert torch.equal(plain[0], torch.from_numpy(np.exp2(x.numpy()))) and torch.equal(plain[1], x / b)
    old = gpu_math.install(seed=0)
    try:
        model = run()
    finally:
        gpu_math.uninstall(old)
    assert torch.equal(model[0], torch.from_numpy(gpu_math.exp2(x.numpy())))
    assert torch.equal(model[1], torch.from_numpy(gpu_math.div(x.numpy(), b.numpy())))
    assert not torch.equal(model[1], x / b)
    assert torch.equal(model[2], x / b)  # div_rn stays correctly rounded: what the kernels use
    assert torch.equal(run(), plain)


# The kernels' tests in fp32 (bf16 / fp16 inputs compute in fp32 too, but their eager errors are a bf16 ulp: no
# test there is close to the model's few fp32 ulps; the bf16 / fp16 ones pass under it too, 3 min):
# the contract, and accuracy beyond it. Not ppo_head's tie
# test: it needs the kernel's ratio to be one particular float (1 + c + 1 ulp), which a modelled exp2 reaches
# or skips by luck (with some seeds it skips it; the H200 reached it).
FILES = ["test_kl.py", "test_token_logprobs.py", "test_ppo_head.py", "test_pairwise.py", "test_linear_logprobs.py"]
SELECT = "not bfloat16 and not float16 and not gradcheck and not fp64 and not tie_gradient"


def test_kernels_meet_the_fp32_contract_under_gpu_math():
    """~80 s. On failure: FASTRLHF_GPU_MATH=1 pytest tests/<file> -k <test> reproduces it (and
    FASTRLHF_GPU_MATH_SEED=n tries other error functions)."""
    tests = Path(__file__).parent
    env = dict(os.environ, FASTRLHF_GPU_MATH="1", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "--no-header", "-p", "no:cacheprovider", "-k", SELECT]
    proc = subprocess.run(
        cmd + [str(tests / f) for f in FILES], cwd=tests.parent, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, f"fp32 contract under gpu_math.py:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout
