"""_common's Triton helpers, checked bit for bit on their own."""

import pytest
import torch
import triton
import triton.language as tl

from fastrlhf.kernels._common import load_whole


@triton.jit
def _widen(x_ptr, out_ptr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    v = load_whole((x_ptr + row * BLOCK_V)[None], 1, BLOCK_V, tl.float32)
    tl.store(out_ptr + row * BLOCK_V + tl.arange(0, BLOCK_V)[None, :], v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_load_whole_widens_exactly(dtype, gen, device):
    """bf16 is widened by hand (two bf16 per 32-bit word): every value, in column order, bit for bit as
    torch's conversion, infinities, NaN, signed zeros and subnormals included."""
    x = torch.randn(3, 64, generator=gen).to(dtype)
    x[0, :6] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-40, -3e-39]).to(dtype)
    x = x.to(device)
    out = torch.empty(3, 64, device=device)
    _widen[(3,)](x, out, BLOCK_V=64)
    assert torch.equal(out.view(torch.int32), x.float().view(torch.int32))
