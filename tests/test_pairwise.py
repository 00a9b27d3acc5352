"""pairwise_loss and the fused reward head: stability, gradients, padding sides, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from contract import assert_contract, max_err

from fastrlhf.kernels import (
    last_token_rewards,
    last_token_rewards_ref,
    pairwise_loss,
    pairwise_loss_ref,
    reward_head_pairwise_loss,
    reward_head_pairwise_loss_ref,
)


# ----------------------------------------------------------------------------------- pairwise_loss
@pytest.mark.kernels("pairwise_loss.fwd", "pairwise_loss.bwd")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("margin_kind", ["none", "float", "tensor"])
def test_pairwise_contract(dtype, margin_kind, gen, device):
    rc = (torch.randn(257, generator=gen) * 3).to(dtype).to(device)
    rr = (torch.randn(257, generator=gen) * 3).to(dtype).to(device)
    margin = {"none": None, "float": 0.5, "tensor": torch.rand(257, generator=gen).to(dtype).to(device)}[margin_kind]
    g = torch.randn(257, generator=gen).to(device)

    a, b = rc.clone().requires_grad_(), rr.clone().requires_grad_()
    loss = pairwise_loss(a, b, margin=margin, reduction="none")
    assert loss.dtype == torch.float32
    ga, gb = torch.autograd.grad((loss * g).sum(), (a, b))

    a64, b64 = rc.double().requires_grad_(), rr.double().requires_grad_()
    m64 = margin.double() if isinstance(margin, torch.Tensor) else margin
    loss64 = pairwise_loss_ref(a64, b64, margin=m64, reduction="none")
    ga64, gb64 = torch.autograd.grad((loss64 * g.double()).sum(), (a64, b64))

    ae, be = rc.float().requires_grad_(), rr.float().requires_grad_()  # eager fp32 on the same inputs
    losse = -F.logsigmoid(ae - be - (margin.float() if isinstance(margin, torch.Tensor) else (margin or 0)))
    gae, gbe = torch.autograd.grad((losse * g).sum(), (ae, be))

    assert_contract("loss", loss, losse, loss64)
    assert_contract("grad chosen", ga, gae, ga64)
    assert_contract("grad rejected", gb, gbe, gb64)


def test_pairwise_stable_for_huge_gaps(device):
    """|r_c - r_r| up to 1e4: loss -> 0 or -> gap, never inf/NaN; gradients -> 0 or -> -1."""
    gap = torch.tensor([1e4, -1e4, 80.0, -80.0, 0.0], device=device)
    rc = gap.clone().requires_grad_()
    loss = pairwise_loss(rc, torch.zeros_like(gap), reduction="none")
    torch.testing.assert_close(loss, torch.tensor([0.0, 1e4, 0.0, 80.0, 0.6931471805599453], device=device))
    loss.sum().backward()
    torch.testing.assert_close(rc.grad, torch.tensor([-0.0, -1.0, -1.8048513e-35, -1.0, -0.5], device=device))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pairwise_reductions_and_margin_grad(reduction, gen, device):
    rc = torch.randn(33, generator=gen).to(device).requires_grad_()
    rr = torch.randn(33, generator=gen).to(device).requires_grad_()
    m = torch.rand(33, generator=gen).to(device).requires_grad_()
    out = pairwise_loss(rc, rr, margin=m, reduction=reduction)
    ref = pairwise_loss_ref(rc.detach().double(), rr.detach().double(), margin=m.detach().double(), reduction=reduction)
    assert out.shape == ref.shape
    assert max_err(out, ref) < 1e-6
    out.sum().backward()
    torch.testing.assert_close(m.grad, -rc.grad)
    torch.testing.assert_close(rr.grad, -rc.grad)


def test_pairwise_bad_input(device):
    a = torch.randn(4, device=device)
    with pytest.raises(ValueError, match=r"rejected_rewards.*\(4,\).*\(5,\)"):
        pairwise_loss(a, torch.randn(5, device=device))
    with pytest.raises(ValueError, match="reduction"):
        pairwise_loss(a, a, reduction="avg")
    with pytest.raises(TypeError, match="chosen_rewards"):
        pairwise_loss(a.long(), a)
    with pytest.raises(ValueError, match=r"margin.*\(4,\)"):
        pairwise_loss(a, a, margin=torch.randn(3, device=device))


def test_pairwise_gradcheck(gen, device):
    a = torch.randn(7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: pairwise_loss(x, y, margin=0.3, reduction="sum"), (a, b))


# ------------------------------------------------------------------------------ fused reward head
def head_inputs(gen, device, dtype=torch.float32, B=4, T=9, H=37, padding="right"):
    hidden = (torch.randn(2 * B, T, H, generator=gen)).to(dtype).to(device)
    weight = (torch.randn(1, H, generator=gen) / H**0.5).to(device)
    bias = torch.randn(1, generator=gen).to(device)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=gen)
    pos = torch.arange(T).expand(2 * B, T)
    if padding == "right":
        mask = (pos < lengths[:, None]).long()
    else:
        mask = (pos >= T - lengths[:, None]).long()
    return hidden, weight, bias, mask.to(device), lengths.to(device)


@pytest.mark.kernels("reward_head.fwd", "reward_head.bwd")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("padding, locate", [("right", "mask"), ("left", "mask"), ("right", "lengths")])
def test_reward_head_matches_reference(dtype, padding, locate, gen, device):
    hidden, weight, bias, mask, lengths = head_inputs(gen, device, dtype, padding=padding)
    where = {"attention_mask": mask} if locate == "mask" else {"lengths": lengths}
    margin = torch.rand(4, generator=gen).to(device)

    def run(fn, h, w, b, m):
        out = fn(h, w, b, margin=m, **where)
        center = 0.01 * (out.chosen_rewards + out.rejected_rewards).pow(2).mean()  # reward centering term
        return out, torch.autograd.grad(out.loss + center, (h, w, b))

    out, grads = run(reward_head_pairwise_loss, *(t.clone().requires_grad_() for t in (hidden, weight, bias)), margin)
    ins64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    ref, grads64 = run(reward_head_pairwise_loss_ref, *ins64, margin.double())
    ins32 = (t.detach().float().requires_grad_() for t in (hidden, weight, bias))  # eager fp32, same inputs
    e32, grads32 = run(reward_head_pairwise_loss_ref, *ins32, margin)

    assert out.loss.dtype == torch.float32 and out.chosen_rewards.shape == (4,)
    for name in ("loss", "chosen_rewards", "rejected_rewards"):
        assert_contract(name, getattr(out, name), getattr(e32, name), getattr(ref, name))
    assert out.accuracy.item() == ref.accuracy.item()
    for name, g, g32, g64 in zip(["hidden", "weight", "bias"], grads, grads32, grads64):
        assert g.dtype == {"hidden": dtype}.get(name, torch.float32)
        assert_contract(f"grad {name}", g, g32, g64)
    # only the last real token of each sequence receives gradient
    nonzero_positions = (grads[0] != 0).any(-1)
    assert (nonzero_positions.sum(-1) <= 1).all()


def test_reward_head_empty_sequence_is_nan_and_isolated(gen, device):
    hidden, weight, bias, mask, _ = head_inputs(gen, device)
    mask[1] = 0  # chosen of pair 1 has no real token
    h = hidden.clone().requires_grad_()
    out = reward_head_pairwise_loss(h, weight, bias, attention_mask=mask, reduction="none")
    assert torch.isnan(out.chosen_rewards[1]) and torch.isnan(out.loss[1])
    assert torch.isfinite(out.loss[[0, 2, 3]]).all()
    out.loss[[0, 2, 3]].sum().backward()
    assert torch.isfinite(h.grad).all() and (h.grad[1] == 0).all() and (h.grad[5] == 0).all()


def test_last_token_rewards(gen, device):
    hidden, weight, bias, mask, lengths = head_inputs(gen, device, padding="left")
    h = hidden.clone().requires_grad_()
    r = last_token_rewards(h, weight, bias, attention_mask=mask)
    h64 = hidden.double().requires_grad_()
    r64 = last_token_rewards_ref(h64, weight.double(), bias.double(), attention_mask=mask)
    assert max_err(r, r64) < 1e-5
    g = torch.randn(r.shape, generator=gen).to(device)
    (gh,) = torch.autograd.grad((r * g).sum(), h)
    (gh64,) = torch.autograd.grad((r64 * g.double()).sum(), h64)
    assert max_err(gh, gh64) < 1e-6
    assert (gh[:, -1] != 0).any() and (gh[:, :-1] == 0).all()  # left padding: last column


def test_reward_head_gradcheck(gen, device):
    hidden, weight, bias, mask, _ = head_inputs(gen, device, B=2, T=4, H=5)
    h, w, b = (t.double().requires_grad_() for t in (hidden, weight, bias))

    def f(h, w, b):
        out = reward_head_pairwise_loss(h, w, b, attention_mask=mask, margin=0.2)
        return out.loss, out.chosen_rewards, out.rejected_rewards

    assert torch.autograd.gradcheck(f, (h, w, b))


def test_reward_head_bad_input(gen, device):
    hidden, weight, bias, mask, lengths = head_inputs(gen, device)
    with pytest.raises(ValueError, match="exactly one of attention_mask"):
        reward_head_pairwise_loss(hidden, weight, bias)
    with pytest.raises(ValueError, match="exactly one of attention_mask"):
        reward_head_pairwise_loss(hidden, weight, bias, attention_mask=mask, lengths=lengths)
    with pytest.raises(ValueError, match="even count"):
        reward_head_pairwise_loss(hidden[:7], weight, bias, attention_mask=mask[:7])
    with pytest.raises(ValueError, match=r"weight must be \(H,\) or \(1, H\) with H = 37"):
        reward_head_pairwise_loss(hidden, weight[:, :5], bias, attention_mask=mask)
    with pytest.raises(ValueError, match=r"attention_mask.*\(8, 9\)"):
        reward_head_pairwise_loss(hidden, weight, bias, attention_mask=mask[:, :4])
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        reward_head_pairwise_loss(hidden, weight, bias, attention_mask=mask.float())
    with pytest.raises(ValueError, match=r"hidden must be \(S, T, H\)"):
        last_token_rewards(hidden[0], weight, attention_mask=mask[0])
