"""gae: precision contract against an fp64 loop, the trainer's loop, masks anywhere, chunk carry, bad input.

The interpreter scans element by element in Python (~0.4 ms per position), so shapes stay small; the
chunk carry is exercised with 64-position chunks there and, on CUDA, by shrinking the chunk.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from contract import assert_contract

from fastrlhf.kernels.gae import gae, gae_ref
from fastrlhf.trainer import rl

G = importlib.import_module("fastrlhf.kernels.gae")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(gen, B, T, mask_kind, dtype=torch.float32, device="cpu"):
    """rewards ~ N(0, 1) (plus a larger terminal reward), values ~ N(0, 2); padding holds garbage."""
    rewards = torch.randn(B, T, generator=gen) * 0.3
    values = torch.randn(B, T, generator=gen) * 2
    if mask_kind == "right_pad":  # lengths from 0 (all masked) to T (none)
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        lengths[0], lengths[-1] = 0, T
        mask = torch.arange(T)[None, :] < lengths[:, None]
        last = (lengths - 1).clamp_min(0)
        rewards[torch.arange(B), last] += 5 * torch.randn(B, generator=gen)
    else:  # arbitrary: holes anywhere, one all-masked row
        mask = torch.rand(B, T, generator=gen) < 0.7
        mask[0] = False
    rewards[~mask] = 1e4 * torch.randn(int((~mask).sum()), generator=gen)  # must be ignored
    return rewards.to(dtype).to(device), values.to(dtype).to(device), mask.to(device)


def check_contract(what, rewards, values, mask, gamma, lam):
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == rewards.shape
    adv32, ret32 = gae_ref(rewards.float(), values.float(), mask, gamma=gamma, lam=lam)  # the fp32 loop
    adv64, ret64 = gae_ref(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    assert_contract(f"{what} advantages", adv, adv32, adv64)
    assert_contract(f"{what} returns", ret, ret32, ret64)
    return adv, ret


@pytest.mark.kernels("gae.fwd")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["right_pad", "arbitrary"])
def test_contract_dtypes_and_masks(mask_kind, dtype, gen, device):
    rewards, values, mask = make_inputs(gen, 5, 77, mask_kind, dtype, device)  # 77: a partial last chunk
    check_contract(f"{mask_kind} {dtype}", rewards, values, mask, 1.0, 0.95)


@pytest.mark.kernels("gae.fwd")
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.0), (0.99, 0.95), (0.9, 0.5), (0.0, 0.7), (0.5, 1.0)])
def test_contract_gamma_lam(gamma, lam, gen, device):
    rewards, values, mask = make_inputs(gen, 4, 70, "arbitrary", device=device)
    check_contract(f"gamma={gamma} lam={lam}", rewards, values, mask, gamma, lam)


@pytest.mark.kernels("gae.fwd")
@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("mask_kind", ["right_pad", "arbitrary"])
def test_contract_long_sequence_carry(mask_kind, block, gen, device, monkeypatch):
    """T spans many chunks (64 on the interpreter, 2048 or 16 compiled); gamma = lam = 1 is the worst
    case for rounding (nothing decays, A_t is a sum over the whole tail)."""
    if block is not None:
        monkeypatch.setattr(G, "MAX_BLOCK_T", block)
        monkeypatch.setattr(G, "INTERPRET_BLOCK_T", block)
    T = 600 if device.type == "cpu" else 5000
    rewards, values, mask = make_inputs(gen, 2, T, mask_kind, device=device)
    check_contract(f"T={T} block={block}", rewards, values, mask, 1.0, 1.0)
    check_contract(f"T={T} block={block}", rewards, values, mask, 1.0, 0.95)


def test_sequence_length_one_and_empty(gen, device):
    r, v = torch.randn(3, 1, generator=gen).to(device), torch.randn(3, 1, generator=gen).to(device)
    m = torch.tensor([[True], [False], [True]], device=device)
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    assert torch.equal(adv, torch.where(m, r - v, 0)) and torch.equal(ret, torch.where(m, r, 0))
    for shape in [(0, 5), (3, 0)]:
        adv, ret = gae(
            torch.randn(shape, device=device), torch.randn(shape, device=device), torch.ones(shape, device=device)
        )
        assert adv.shape == ret.shape == shape and adv.dtype == torch.float32


def test_matches_hand_computed_values(device):
    """delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; a hole ends the episode."""
    r = torch.tensor([[1.0, 0.0, 2.0], [1.0, 5.0, 2.0]], device=device)
    v = torch.tensor([[0.5, 1.0, 1.5], [0.5, 7.0, 1.5]], device=device)
    m = torch.tensor([[1, 1, 1], [1, 0, 1]], device=device)
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    d2 = 2.0 - 1.5
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a1 = d1 + 0.72 * d2
    want = torch.tensor([[d0 + 0.72 * a1, a1, d2], [1.0 - 0.5, 0.0, d2]], device=device)
    torch.testing.assert_close(adv, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ret, want + v * m, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["right_pad", "arbitrary"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_agrees_with_trainer_loop(mask_kind, mask_dtype, gen, device):
    rewards, values, mask = make_inputs(gen, 4, 40, mask_kind, device=device)
    mask = mask.to(mask_dtype)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    want_adv, want_ret = rl.gae(rewards, values, mask, 0.99, 0.95)
    scale = want_ret.abs().max().item()
    torch.testing.assert_close(adv, want_adv, rtol=0, atol=16 * 2**-23 * scale)
    torch.testing.assert_close(ret, want_ret, rtol=0, atol=16 * 2**-23 * scale)


def test_nonfinite_garbage_at_padding_is_ignored(gen, device):
    rewards, values, mask = make_inputs(gen, 3, 20, "arbitrary", device=device)
    rewards[~mask], values[~mask] = float("nan"), float("inf")
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    want_adv, want_ret = rl.gae(rewards, values, mask, 1.0, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    torch.testing.assert_close(adv, want_adv, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ret, want_ret, rtol=1e-6, atol=1e-5)


def test_strided_views_and_mixed_dtypes(gen, device):
    base_r = torch.randn(8, 30, generator=gen).to(device)
    base_v = torch.randn(30, 4, generator=gen).to(device).bfloat16()
    mask = (torch.rand(8, 30, generator=gen) < 0.8).to(device)
    r, v, m = base_r[::2], base_v.t(), mask[1::2]  # (4, 30) views, no copies
    adv, ret = gae(r, v, m, gamma=0.95, lam=0.9)
    want_adv, want_ret = gae_ref(r.contiguous(), v.contiguous(), m.contiguous(), gamma=0.95, lam=0.9)
    torch.testing.assert_close(adv, want_adv, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ret, want_ret, rtol=1e-6, atol=1e-5)


def test_outputs_are_detached_and_fp64_runs_the_loop(gen, device):
    r = torch.randn(2, 6, generator=gen).to(device).requires_grad_()
    v = torch.randn(2, 6, generator=gen).to(device).requires_grad_()
    adv, ret = gae(r, v, torch.ones(2, 6, device=device))
    assert not adv.requires_grad and not ret.requires_grad
    adv64, _ = gae(r.double(), v.double(), torch.ones(2, 6, device=device))
    assert adv64.dtype == torch.float64
    torch.testing.assert_close(adv64.float(), adv, rtol=1e-6, atol=1e-6)


def test_kernel_path_is_triton_not_reference(monkeypatch, device):
    def boom(*a, **k):
        raise AssertionError("reference path taken")

    monkeypatch.setattr(G, "gae_ref", boom)
    adv, _ = gae(torch.randn(2, 5, device=device), torch.randn(2, 5, device=device), torch.ones(2, 5, device=device))
    assert adv.shape == (2, 5)


def test_bad_input(device):
    r, v, m = torch.randn(2, 5, device=device), torch.randn(2, 5, device=device), torch.ones(2, 5, device=device)
    with pytest.raises(ValueError, match=r"values.*\(2, 5\).*\(5, 2\)"):
        gae(r, torch.randn(5, 2, device=device), m)
    with pytest.raises(ValueError, match=r"mask.*\(2, 5\).*\(2, 4\)"):
        gae(r, v, torch.ones(2, 4, device=device))
    with pytest.raises(ValueError, match=r"rewards must be 2-D.*\(10,\)"):
        gae(r.view(-1), v.view(-1), m.view(-1))
    with pytest.raises(TypeError, match=r"rewards.*torch.int64"):
        gae(r.long(), v, m)
    with pytest.raises(TypeError, match=r"values"):
        gae(r, v.int(), m)
    with pytest.raises(TypeError, match=r"mask"):
        gae(r, v, m.to(torch.complex64))
    with pytest.raises(ValueError, match=r"one device.*meta"):
        gae(r, v, torch.ones(2, 5, device="meta"))
    for kw in [{"gamma": 1.5}, {"gamma": -0.1}, {"lam": 1.01}, {"lam": float("nan")}]:
        with pytest.raises(ValueError, match=next(iter(kw))):
            gae(r, v, m, **kw)
    with pytest.raises(TypeError, match="gamma"):
        gae(r, v, m, gamma="0.9")
