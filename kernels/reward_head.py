"""Fused reward head: last-real-token gather + scalar head + Bradley-Terry loss (+ accuracy), and the
same gather + head alone for scoring.

A reward model is a causal LM trunk whose final hidden state at the last real token of each sequence
goes through a linear head H -> 1. Unfused, that is an index computation (often `mask.sum(-1) - 1`,
wrong for left padding, or an `.item()` loop), a gather copy, a matmul, a subtraction and a loss:
five launches and a host sync for a few KB of work. Here it is one launch forward and one backward:
    idx_s = max{t : mask[s, t] != 0}   (or lengths[s] - 1)      no host sync, any padding side
    r_s   = <hidden[s, idx_s, :], w> + b                       fp32 accumulation
    pair i = (chosen i, rejected B + i):  z_i = r_i - r_{B+i} - m_i,  loss_i = softplus(-z_i)
Backward, given c_s = dLoss/dr_s: dhidden[s, idx_s, :] = c_s w (zeros elsewhere), dw = sum_s c_s
hidden[s, idx_s, :], db = sum_s c_s (which is 0 for the pairwise loss alone: the bias cancels).
Bytes: forward reads 2B rows of H (+ the mask); backward writes the dense (2B, T, H) gradient (zeros
except one row per sequence) -- launch-bound, not bandwidth-bound, at realistic sizes.

A sequence with no real token (all-zero mask, or a length outside [1, T]) gets a NaN reward and
contributes nothing to the gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (
    acc_dtype,
    check_float,
    check_int,
    check_same_device,
    check_shape,
    kernel_range,
    tl_dtype,
    use_triton,
)
from .pairwise_loss import REDUCTIONS, _reduce, sigmoid_neg, softplus_neg


@triton.jit
def _last_index(mask_ptr, lengths_ptr, seq, T, stride_mask, USE_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    """Index of the last real token of sequence `seq` (int64; -1 if none)."""
    if USE_MASK:
        last = tl.full([BLOCK_T], -1, tl.int64)
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T).to(tl.int64)
            m = tl.load(mask_ptr + seq * stride_mask + t, mask=t < T, other=0)
            last = tl.maximum(last, tl.where(m != 0, t, -1))
        return tl.max(last, 0)
    else:
        return tl.load(lengths_ptr + seq).to(tl.int64) - 1


@triton.jit
def _head_score(
    hidden_ptr,
    w_ptr,
    b_ptr,
    seq,
    idx,
    T,
    H,
    stride_hs,
    stride_ht,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """<hidden[seq, idx, :], w> + b accumulated in ACC (fp32); NaN when idx is not a valid position."""
    valid = (idx >= 0) & (idx < T)
    h_end = tl.where(valid, H, 0)  # an invalid position reads nothing
    row = hidden_ptr + seq * stride_hs + idx * stride_ht
    acc = tl.zeros([BLOCK_H], ACC)
    for start in range(0, H, BLOCK_H):
        h = start + tl.arange(0, BLOCK_H)
        x = tl.load(row + h, mask=h < h_end, other=0.0).to(ACC)
        w = tl.load(w_ptr + h, mask=h < H, other=0.0).to(ACC)
        acc += x * w
    r = tl.sum(acc, 0)
    if HAS_BIAS:
        r += tl.load(b_ptr).to(ACC)
    return tl.where(valid, r, float("nan"))


@triton.jit
def _pairwise_head_fwd(
    hidden_ptr,  # (2B, T, H) float; strides stride_hs, stride_ht, 1; rows [0, B) chosen, [B, 2B) rejected
    w_ptr,  # (H,) head weight
    b_ptr,  # (1,) head bias, read when HAS_BIAS
    mask_ptr,  # (2B, T) int/bool attention mask, row stride stride_mask (USE_MASK)
    lengths_ptr,  # (2B,) int lengths (not USE_MASK)
    margin_ptr,  # (B,) float, read when HAS_MARGIN
    chosen_ptr,  # (B,) fp32 out: chosen rewards
    rejected_ptr,  # (B,) fp32 out: rejected rewards
    index_ptr,  # (2B,) int64 out: last real token, saved for backward
    loss_ptr,  # (B,) fp32 out
    grad_z_ptr,  # (B,) fp32 out: dloss_i/dz_i = -sigmoid(-z_i), saved for backward
    B,
    T,
    H,
    stride_hs,
    stride_ht,
    stride_mask,
    USE_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MARGIN: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32 (tl.float64 for fp64 inputs)
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    idx_c = _last_index(mask_ptr, lengths_ptr, i, T, stride_mask, USE_MASK, BLOCK_T)
    idx_r = _last_index(mask_ptr, lengths_ptr, B + i, T, stride_mask, USE_MASK, BLOCK_T)
    r_c = _head_score(hidden_ptr, w_ptr, b_ptr, i, idx_c, T, H, stride_hs, stride_ht, HAS_BIAS, ACC, BLOCK_H)
    r_r = _head_score(hidden_ptr, w_ptr, b_ptr, B + i, idx_r, T, H, stride_hs, stride_ht, HAS_BIAS, ACC, BLOCK_H)
    z = r_c - r_r
    if HAS_MARGIN:
        z -= tl.load(margin_ptr + i).to(ACC)
    tl.store(chosen_ptr + i, r_c)
    tl.store(rejected_ptr + i, r_r)
    tl.store(index_ptr + i, idx_c)
    tl.store(index_ptr + B + i, idx_r)
    tl.store(loss_ptr + i, softplus_neg(z))
    tl.store(grad_z_ptr + i, -sigmoid_neg(z))


@triton.jit
def _head_score_fwd(
    hidden_ptr,  # (S, T, H) float; strides stride_hs, stride_ht, 1
    w_ptr,  # (H,)
    b_ptr,  # (1,), read when HAS_BIAS
    mask_ptr,  # (S, T) attention mask (USE_MASK)
    lengths_ptr,  # (S,) lengths (not USE_MASK)
    rewards_ptr,  # (S,) fp32 out
    index_ptr,  # (S,) int64 out
    T,
    H,
    stride_hs,
    stride_ht,
    stride_mask,
    USE_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    idx = _last_index(mask_ptr, lengths_ptr, s, T, stride_mask, USE_MASK, BLOCK_T)
    r = _head_score(hidden_ptr, w_ptr, b_ptr, s, idx, T, H, stride_hs, stride_ht, HAS_BIAS, ACC, BLOCK_H)
    tl.store(rewards_ptr + s, r)
    tl.store(index_ptr + s, idx)


@triton.jit
def _head_bwd(
    hidden_ptr,  # (S, T, H) float, as in forward
    w_ptr,  # (H,)
    index_ptr,  # (S,) int64 last real token
    coef_ptr,  # (S,) fp32: dLoss/dr_s
    grad_hidden_ptr,  # (S, T, H) out, zero-filled by the caller; strides gstride_s, gstride_t, 1
    grad_w_part_ptr,  # (S, H) fp32 (ACC) out: c_s * hidden[s, idx_s, :], summed over s by the caller
    T,
    H,
    stride_hs,
    stride_ht,
    gstride_s,
    gstride_t,
    ACC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    idx = tl.load(index_ptr + s)
    h_end = tl.where((idx >= 0) & (idx < T), H, 0)  # an invalid position reads and writes nothing
    c = tl.load(coef_ptr + s)
    for start in range(0, H, BLOCK_H):
        h = start + tl.arange(0, BLOCK_H)
        hm = h < h_end
        x = tl.load(hidden_ptr + s * stride_hs + idx * stride_ht + h, mask=hm, other=0.0).to(ACC)
        w = tl.load(w_ptr + h, mask=h < H, other=0.0).to(ACC)
        tl.store(
            grad_hidden_ptr + s * gstride_s + idx * gstride_t + h, (c * w).to(grad_hidden_ptr.dtype.element_ty), mask=hm
        )
        tl.store(grad_w_part_ptr + s * H + h, tl.where(hm, c * x, 0.0), mask=h < H)


def _blocks(T: int, H: int, device: torch.device) -> tuple[int, int]:
    cap = 65536 if device.type == "cpu" else 1024
    return min(triton.next_power_of_2(T), cap), min(triton.next_power_of_2(H), cap)


def _mask_args(attention_mask, lengths):
    """(mask pointer, lengths pointer, mask row stride, USE_MASK); the unused pointer is a dummy."""
    if attention_mask is not None:
        return attention_mask, attention_mask, attention_mask.stride(0), True
    return lengths, lengths, 0, False


def _head_backward(hidden, weight, bias, index, coef):
    """coef (S,) = dLoss/dr_s -> (grad_hidden, grad_weight, grad_bias)."""
    with kernel_range("fastrlhf.reward_head.bwd"):
        S, T, H = hidden.shape
        acc = acc_dtype(hidden)
        grad_hidden = torch.zeros((S, T, H), dtype=hidden.dtype, device=hidden.device)
        part = torch.empty((S, H), dtype=acc, device=hidden.device)
        coef = torch.nan_to_num(coef.to(acc).contiguous(), nan=0.0)  # a NaN reward's row gets no gradient
        _, block_h = _blocks(T, H, hidden.device)
        _head_bwd[(S,)](
            hidden,
            weight,
            index,
            coef,
            grad_hidden,
            part,
            T,
            H,
            hidden.stride(0),
            hidden.stride(1),
            grad_hidden.stride(0),
            grad_hidden.stride(1),
            ACC=tl_dtype(acc),
            BLOCK_H=block_h,
            enable_fp_fusion=True,
        )
        grad_w = part.sum(0).to(weight.dtype)
        grad_b = None if bias is None else coef.sum().to(bias.dtype).reshape(bias.shape)
        return grad_hidden, grad_w, grad_b


class _PairwiseHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, attention_mask, lengths, margin):
        with kernel_range("fastrlhf.reward_head.fwd"):
            S, T, H = hidden.shape
            B = S // 2
            acc = acc_dtype(hidden)
            chosen, rejected, loss, grad_z = (torch.empty(B, dtype=acc, device=hidden.device) for _ in range(4))
            index = torch.empty(S, dtype=torch.int64, device=hidden.device)
            mask_ptr, len_ptr, stride_mask, use_mask = _mask_args(attention_mask, lengths)
            block_t, block_h = _blocks(T, H, hidden.device)
            _pairwise_head_fwd[(B,)](
                hidden,
                weight,
                bias if bias is not None else weight,
                mask_ptr,
                len_ptr,
                margin if margin is not None else loss,
                chosen,
                rejected,
                index,
                loss,
                grad_z,
                B,
                T,
                H,
                hidden.stride(0),
                hidden.stride(1),
                stride_mask,
                USE_MASK=use_mask,
                HAS_BIAS=bias is not None,
                HAS_MARGIN=margin is not None,
                ACC=tl_dtype(acc),
                BLOCK_T=block_t,
                BLOCK_H=block_h,
                enable_fp_fusion=True,
            )
        ctx.save_for_backward(hidden, weight, bias, index, grad_z)
        return loss, chosen, rejected

    @staticmethod
    def backward(ctx, g_loss, g_chosen, g_rejected):
        hidden, weight, bias, index, grad_z = ctx.saved_tensors
        dz = grad_z * g_loss if g_loss is not None else torch.zeros_like(grad_z)
        gc = dz if g_chosen is None else dz + g_chosen
        gr = -dz if g_rejected is None else g_rejected - dz
        grad_hidden, grad_w, grad_b = _head_backward(hidden, weight, bias, index, torch.cat([gc, gr]))
        return grad_hidden, grad_w, grad_b, None, None, None


class _HeadScore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, attention_mask, lengths):
        with kernel_range("fastrlhf.reward_head.score"):
            S, T, H = hidden.shape
            acc = acc_dtype(hidden)
            rewards = torch.empty(S, dtype=acc, device=hidden.device)
            index = torch.empty(S, dtype=torch.int64, device=hidden.device)
            mask_ptr, len_ptr, stride_mask, use_mask = _mask_args(attention_mask, lengths)
            block_t, block_h = _blocks(T, H, hidden.device)
            _head_score_fwd[(S,)](
                hidden,
                weight,
                bias if bias is not None else weight,
                mask_ptr,
                len_ptr,
                rewards,
                index,
                T,
                H,
                hidden.stride(0),
                hidden.stride(1),
                stride_mask,
                USE_MASK=use_mask,
                HAS_BIAS=bias is not None,
                ACC=tl_dtype(acc),
                BLOCK_T=block_t,
                BLOCK_H=block_h,
                enable_fp_fusion=True,
            )
        ctx.save_for_backward(hidden, weight, bias, index)
        return rewards

    @staticmethod
    def backward(ctx, g_rewards):
        hidden, weight, bias, index = ctx.saved_tensors
        grad_hidden, grad_w, grad_b = _head_backward(hidden, weight, bias, index, g_rewards)
        return grad_hidden, grad_w, grad_b, None, None


# ------------------------------------------------------------------------------------------- public API
class RewardHeadOutput(NamedTuple):
    loss: torch.Tensor  # () fp32 (or (B,) with reduction="none")
    chosen_rewards: torch.Tensor  # (B,) fp32, differentiable
    rejected_rewards: torch.Tensor  # (B,) fp32, differentiable
    accuracy: torch.Tensor  # () fp32: fraction of pairs with r_chosen > r_rejected (no gradient)


def _check_head(hidden, weight, bias, attention_mask, lengths):
    check_float("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (S, T, H) last hidden states, got shape {tuple(hidden.shape)}")
    if hidden.stride(-1) != 1:
        raise ValueError(f"hidden must have stride 1 along H, got strides {tuple(hidden.stride())}")
    S, T, H = hidden.shape
    check_float("weight", weight)
    if weight.numel() != H or weight.dim() not in (1, 2):
        raise ValueError(
            f"weight must be (H,) or (1, H) with H = {H} (hidden {tuple(hidden.shape)}), got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_float("bias", bias)
        if bias.numel() != 1:
            raise ValueError(f"bias must hold one value, got shape {tuple(bias.shape)}")
    if (attention_mask is None) == (lengths is None):
        raise ValueError("pass exactly one of attention_mask (S, T) or lengths (S,) to locate the last real token")
    if attention_mask is not None:
        if attention_mask.dtype.is_floating_point:
            raise TypeError(f"attention_mask must be bool or integer, got {attention_mask.dtype}")
        check_shape("attention_mask", attention_mask, (S, T), f"hidden {tuple(hidden.shape)}")
    else:
        check_int("lengths", lengths)
        check_shape("lengths", lengths, (S,), f"hidden {tuple(hidden.shape)}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, attention_mask=attention_mask, lengths=lengths)


def _prep(weight, bias, attention_mask, lengths):
    weight = weight.reshape(-1)
    bias = None if bias is None else bias.reshape(1)
    if attention_mask is not None:
        attention_mask = attention_mask.contiguous()
        if attention_mask.dtype == torch.bool:
            attention_mask = attention_mask.to(torch.uint8)
    if lengths is not None:
        lengths = lengths.contiguous()
    return weight.contiguous(), bias, attention_mask, lengths


def reward_head_pairwise_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    margin: torch.Tensor | float | None = None,
    reduction: str = "mean",
) -> RewardHeadOutput:
    """Reward-model pairwise loss from final hidden states in one fused kernel.

    Args:
        hidden: (2B, T, H) last hidden states of the trunk; rows [0, B) are the chosen responses and
            rows [B, 2B) the rejected ones (pair i = rows i and B + i). Stride 1 along H.
        weight: (H,) or (1, H) scalar-head weight (e.g. `nn.Linear(H, 1).weight`); bias: None or 1 value.
        attention_mask: (2B, T) 0/1, any padding side; or lengths: (2B,) real-token counts (right padding).
        margin: None, a float, or (B,) per-pair margins.
        reduction: "mean" | "sum" | "none" over pairs.
    Returns:
        RewardHeadOutput(loss, chosen_rewards, rejected_rewards, accuracy); rewards are fp32 and
        differentiable (so a reward-centering term can be added to the loss).
    """
    _check_head(hidden, weight, bias, attention_mask, lengths)
    if hidden.shape[0] % 2:
        raise ValueError(f"hidden must stack chosen then rejected rows (even count), got {hidden.shape[0]} rows")
    B = hidden.shape[0] // 2
    if margin is not None and not isinstance(margin, (int, float)):
        check_float("margin", margin)
        check_shape("margin", margin, (B,), f"{B} pairs")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not use_triton(hidden):
        return reward_head_pairwise_loss_ref(
            hidden, weight, bias, attention_mask=attention_mask, lengths=lengths, margin=margin, reduction=reduction
        )
    weight, bias, attention_mask, lengths = _prep(weight, bias, attention_mask, lengths)
    if isinstance(margin, (int, float)):
        margin = torch.full((B,), float(margin), dtype=torch.float32, device=hidden.device)
    elif margin is not None:
        margin = margin.contiguous()
    loss, chosen, rejected = _PairwiseHead.apply(hidden, weight, bias, attention_mask, lengths, margin)
    accuracy = (chosen > rejected).float().mean().detach()
    return RewardHeadOutput(_reduce(loss, reduction), chosen, rejected, accuracy)


def last_token_rewards(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar-head reward at each sequence's last real token: (S, T, H) -> (S,) fp32, differentiable.
    Same arguments as `reward_head_pairwise_loss` without the pairing."""
    _check_head(hidden, weight, bias, attention_mask, lengths)
    if not use_triton(hidden):
        return last_token_rewards_ref(hidden, weight, bias, attention_mask=attention_mask, lengths=lengths)
    weight, bias, attention_mask, lengths = _prep(weight, bias, attention_mask, lengths)
    return _HeadScore.apply(hidden, weight, bias, attention_mask, lengths)


def last_token_rewards_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch twin of `last_token_rewards` (fp32, or fp64 for fp64 inputs)."""
    _check_head(hidden, weight, bias, attention_mask, lengths)
    S, T, H = hidden.shape
    if attention_mask is not None:
        positions = torch.arange(T, device=hidden.device).expand(S, T)
        index = torch.where(attention_mask != 0, positions, -1).amax(-1)
    else:
        index = lengths.long() - 1
    valid = (index >= 0) & (index < T)
    acc = acc_dtype(hidden)
    last = hidden[torch.arange(S, device=hidden.device), index.clamp(0, T - 1)].to(acc)  # (S, H)
    r = last @ weight.reshape(-1).to(acc)
    if bias is not None:
        r = r + bias.reshape(()).to(acc)
    return torch.where(valid, r, float("nan"))


def reward_head_pairwise_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    margin: torch.Tensor | float | None = None,
    reduction: str = "mean",
) -> RewardHeadOutput:
    """Pure-PyTorch twin of `reward_head_pairwise_loss`: gather, matmul, logsigmoid."""
    from .pairwise_loss import pairwise_loss_ref

    rewards = last_token_rewards_ref(hidden, weight, bias, attention_mask=attention_mask, lengths=lengths)
    B = hidden.shape[0] // 2
    chosen, rejected = rewards[:B], rewards[B:]
    loss = pairwise_loss_ref(chosen, rejected, margin=margin, reduction=reduction)
    return RewardHeadOutput(loss, chosen, rejected, (chosen > rejected).to(rewards.dtype).mean().detach())
