"""Bradley-Terry pairwise reward loss: -log sigmoid(r_chosen - r_rejected - margin).

With z = r_c - r_r - m:   loss = softplus(-z) = max(-z, 0) + log1p(exp(-|z|))
                         dloss/dz = -sigmoid(-z),  sigmoid(-z) = e/(1+e) if z >= 0 else 1/(1+e),  e = exp(-|z|)
Both forms never exponentiate a positive number, so |z| up to 1e4 (and beyond) is exact to rounding:
the loss tends to 0 or to -z, never to inf or NaN. The margin receives the gradient of -z too.

Elementwise: reads two or three (B,) vectors and writes one fp32 vector; the reduction is a torch sum.
For the fused version that starts from hidden states (last-token gather + scalar head + this loss),
see `reward_head.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_float, check_same_device, check_shape, div_rn, kernel_range, tl_dtype, use_triton

REDUCTIONS = ("mean", "sum", "none")
BLOCK = 1024


@triton.jit
def softplus_neg(z):
    """-log sigmoid(z) = softplus(-z), for any finite z."""
    return tl.maximum(-z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def sigmoid_neg(z):
    """sigmoid(-z) = 1 - sigmoid(z), for any finite z (divisions correctly rounded, see _common)."""
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, div_rn(e, 1.0 + e), div_rn(1.0, 1.0 + e))


@triton.jit
def _pairwise_fwd(
    chosen_ptr,  # (N,) float
    rejected_ptr,  # (N,) float
    margin_ptr,  # (N,) float, read when HAS_MARGIN
    loss_ptr,  # (N,) fp32 out
    N,
    HAS_MARGIN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    z = tl.load(chosen_ptr + offs, mask=inb, other=0.0).to(ACC) - tl.load(rejected_ptr + offs, mask=inb, other=0.0).to(
        ACC
    )
    if HAS_MARGIN:
        z -= tl.load(margin_ptr + offs, mask=inb, other=0.0).to(ACC)
    tl.store(loss_ptr + offs, softplus_neg(z), mask=inb)


@triton.jit
def _pairwise_bwd(
    chosen_ptr,  # (N,) float
    rejected_ptr,  # (N,) float
    margin_ptr,  # (N,) float, read when HAS_MARGIN
    grad_loss_ptr,  # (N,) upstream gradient per pair (already scaled for the reduction)
    grad_z_ptr,  # (N,) fp32 out: dloss/dz; the caller maps it to chosen (+), rejected (-), margin (-)
    N,
    HAS_MARGIN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    z = tl.load(chosen_ptr + offs, mask=inb, other=0.0).to(ACC) - tl.load(rejected_ptr + offs, mask=inb, other=0.0).to(
        ACC
    )
    if HAS_MARGIN:
        z -= tl.load(margin_ptr + offs, mask=inb, other=0.0).to(ACC)
    g = tl.load(grad_loss_ptr + offs, mask=inb, other=0.0).to(ACC)
    tl.store(grad_z_ptr + offs, -g * sigmoid_neg(z), mask=inb)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


class _PairwiseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen, rejected, margin):
        with kernel_range("fastrlhf.pairwise_loss.fwd"):
            acc = acc_dtype(chosen, rejected, margin)
            loss = torch.empty(chosen.shape, dtype=acc, device=chosen.device)
            n = chosen.numel()
            _pairwise_fwd[(triton.cdiv(n, BLOCK),)](
                chosen,
                rejected,
                margin if margin is not None else chosen,
                loss,
                n,
                HAS_MARGIN=margin is not None,
                ACC=tl_dtype(acc),
                BLOCK=BLOCK,
                enable_fp_fusion=True,
            )
        ctx.save_for_backward(chosen, rejected, margin)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        chosen, rejected, margin = ctx.saved_tensors
        with kernel_range("fastrlhf.pairwise_loss.bwd"):
            grad_z = torch.empty(chosen.shape, dtype=acc_dtype(chosen, rejected, margin), device=chosen.device)
            n = chosen.numel()
            _pairwise_bwd[(triton.cdiv(n, BLOCK),)](
                chosen,
                rejected,
                margin if margin is not None else chosen,
                grad_loss.contiguous(),
                grad_z,
                n,
                HAS_MARGIN=margin is not None,
                ACC=tl_dtype(grad_z.dtype),
                BLOCK=BLOCK,
                enable_fp_fusion=True,
            )
        return (
            grad_z.to(chosen.dtype),
            (-grad_z).to(rejected.dtype),
            None if margin is None else (-grad_z).to(margin.dtype),
        )


def _check_inputs(chosen, rejected, margin, reduction):
    check_float("chosen_rewards", chosen)
    check_float("rejected_rewards", rejected)
    check_shape("rejected_rewards", rejected, chosen.shape, "chosen_rewards")
    if margin is not None and not isinstance(margin, (int, float)):
        check_float("margin", margin)
        check_shape("margin", margin, chosen.shape, "chosen_rewards")
    check_same_device(chosen_rewards=chosen, rejected_rewards=rejected, margin=margin)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def pairwise_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_c - r_r - margin), stable for any finite reward gap.

    Args:
        chosen_rewards, rejected_rewards: (B,) (or any equal shapes) float rewards of each pair.
        margin: None, a float, or a tensor of the same shape (e.g. a preference-strength column).
        reduction: "mean" | "sum" | "none".
    Returns:
        A fp32 scalar, or (B,) fp32 with reduction="none". Gradients flow to both rewards (and to a
        margin tensor that requires grad).
    """
    _check_inputs(chosen_rewards, rejected_rewards, margin, reduction)
    if not use_triton(chosen_rewards):
        return pairwise_loss_ref(chosen_rewards, rejected_rewards, margin=margin, reduction=reduction)
    if isinstance(margin, (int, float)):
        margin = torch.full_like(chosen_rewards, float(margin), dtype=torch.float32)
    flat = [t.reshape(-1).contiguous() if t is not None else None for t in (chosen_rewards, rejected_rewards, margin)]
    if flat[0].numel() == 0:
        loss = torch.zeros(chosen_rewards.shape, dtype=acc_dtype(*flat), device=chosen_rewards.device)
    else:
        loss = _PairwiseLoss.apply(*flat).view(chosen_rewards.shape)
    return _reduce(loss, reduction)


def pairwise_loss_ref(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Pure-PyTorch twin of `pairwise_loss` (fp32, or fp64 for fp64 inputs)."""
    _check_inputs(chosen_rewards, rejected_rewards, margin, reduction)
    acc = acc_dtype(chosen_rewards, rejected_rewards, margin)
    z = chosen_rewards.to(acc) - rejected_rewards.to(acc)
    if margin is not None:
        z = z - (margin.to(acc) if isinstance(margin, torch.Tensor) else float(margin))
    return _reduce(-torch.nn.functional.logsigmoid(z), reduction)
