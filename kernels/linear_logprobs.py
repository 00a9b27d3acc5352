"""Per-token log-probabilities (and entropy) straight from hidden states and the LM head, never materialising
[N, V] logits (the shared tiles, grid, backward chunks and rounding: `_linear.py`).

Math, per row with hidden state h in R^H, head W in R^(V x H), bias b, target t, temperature T:
    z = W h + b,  p = softmax(z/T),  lse = log sum_j e^(z_j/T),  logp = z_t/T - lse,  H = lse - sum_j p_j z_j/T
in base 2 as in token_logprobs.py, the running max kept on the raw fp32 logits.
Forward, 1 matmul: `_linear_lse_fwd` gives each row's (max z, log2 sum 2^y, z_t, sum_j p_j y_j), and logp and
the entropy follow from those by a few torch ops.
Backward: per vocabulary chunk, `_linear_logprobs_bwd` recomputes its logits tile and forms
    d logp/dz_j = (1[j=t] - p_j)/T     d H/dz_j = -p_j (log p_j + H)/T
then cuBLAS GEMMs give grad hidden, W (and grad b from the tiles' column sums).
Saved for backward: the inputs and fp32 per-row statistics (max z, log2 sum 2^y, and the entropy); nothing
[N, V]. Rows whose target is `ignore_index` read nothing and give 0 and 0 gradient. A target outside [0, V)
gives a NaN log-prob and a NaN grad_hidden row, and through the sums over rows NaN in grad_W and grad_b: a
non-finite loss for the trainer's guard to stop on, never an out-of-bounds read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import acc_dtype, check_int, check_same_device, check_shape, check_temperature, kernel_range
from ._common import temperature_scale, tl_dtype, use_triton
from ._linear import (
    LN2,
    by_chunks,
    check_head,
    chunked_grads,
    dot_dtype,
    exp2_scale,
    head_args,
    launch_config,
    launch_grid,
    logits_tile,
    row_block,
    row_stats,
    store_grad_z,
    wants_grad,
)
from .token_logprobs import token_logprobs_ref


@triton.jit
def _linear_logprobs_bwd(
    h_ptr,
    w_ptr,
    b_ptr,  # (A, B, H), (V, H), (V,): as in _linear_lse_fwd
    active_ptr,  # (N,) bool
    tgt_ptr,  # (N,) int target ids
    stats_ptr,  # (2, N) ACC row statistics from the forward: max z, log2 sum 2^y
    ent_ptr,  # (N,) ACC entropy from the forward, read when HAS_GRAD_ENT
    grad_logp_ptr,  # (N,) upstream gradient of logp, read when HAS_GRAD_LOGP
    grad_ent_ptr,  # (N,) upstream gradient of the entropy, read when HAS_GRAD_ENT
    gz_ptr,
    gb_ptr,  # (N, chunk), (row blocks, chunk) out, see store_grad_z
    N,
    V,
    B,
    H,
    s_ha,
    s_hb,
    s_hh,
    s_wv,
    s_wh,
    temperature,
    col0,
    col_end,
    s_gz,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENT: tl.constexpr,
    NEED_DB: tl.constexpr,
    ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """grad_z of the vocabulary chunk [col0, col_end): one program per (row block, BLOCK_V tile)."""
    rows, row_in, active, row_off = row_block(active_ptr, N, B, s_ha, s_hb, BLOCK_M)
    tgt = tl.load(tgt_ptr + rows, mask=active, other=-1).to(tl.int64)
    cols = col0 + tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    h_end = tl.where(tl.max(active.to(tl.int32), 0) > 0, H, 0)  # no active row: read nothing
    inv_t, scale = temperature_scale(temperature, ACC)
    m = tl.load(stats_ptr + rows, mask=active, other=0.0)
    log2_s = tl.load(stats_ptr + N + rows, mask=active, other=0.0)
    g_lp = tl.zeros([BLOCK_M], ACC)
    g_h = tl.zeros([BLOCK_M], ACC)
    ent = tl.zeros([BLOCK_M], ACC)
    if HAS_GRAD_LOGP:
        g_lp = tl.load(grad_logp_ptr + rows, mask=active, other=0.0).to(ACC)
        g_lp = tl.where((tgt >= 0) & (tgt < V) | ~active, g_lp, float("nan"))  # bad target id: NaN, like logp
    if HAS_GRAD_ENT:
        g_h = tl.load(grad_ent_ptr + rows, mask=active, other=0.0).to(ACC)
        ent = tl.load(ent_ptr + rows, mask=active, other=0.0)

    z = logits_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        row_off,
        active,
        cols,
        col_end,
        h_end,
        s_hh,
        s_wv,
        s_wh,
        HAS_BIAS,
        ACC,
        DOT_DTYPE,
        BLOCK_M,
        BLOCK_V,
        BLOCK_H,
    )
    y = (z - m[:, None]) * scale - log2_s[:, None]  # log2 p_j
    p = tl.exp2(y)
    g = -p * g_lp[:, None]
    if HAS_GRAD_LOGP:
        g += tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0)
    if HAS_GRAD_ENT:
        g -= tl.where(p > 0, p * (y * LN2 + ent[:, None]), 0.0) * g_h[:, None]
    g = tl.where(active[:, None] & (cols[None, :] < col_end), g * inv_t, 0.0)
    store_grad_z(g, gz_ptr, gb_ptr, rows, row_in, cols, col0, col_end, s_gz, NEED_DB)


# --------------------------------------------------------------------------------------------- launchers
def _forward(hidden, weight, bias, targets, temperature, ignore_index, return_entropy):
    """-> logp (...), entropy (...) or None, stats (2, N) [max z, log2 sum 2^y] (with the entropy: (3, N), the
    entropy as row 2, where the backward reads it), active (N,) bool. logp and entropy are fresh tensors of
    hidden's leading shape, not views: autograd lets a caller modify a Function's outputs in place only then."""
    with kernel_range("fastrlhf.linear_logprobs.fwd"):
        tgt = targets.reshape(-1)
        active = tgt != ignore_index
        acc = acc_dtype(hidden)
        m, log2_s, z_t, mean_y = row_stats(hidden, weight, bias, active, tgt, temperature, return_entropy, acc)
        lead = hidden.shape[:-1]
        on = active.view(lead)  # the last where of each output writes a new (...) tensor: no view
        logp = ((z_t - m) * exp2_scale(temperature, acc) - log2_s) * LN2.value
        in_range = (tgt >= 0) & (tgt < weight.shape[0])
        logp = torch.where(on, torch.where(in_range, logp, float("nan")).view(lead), 0.0)
        ent = torch.where(on, ((log2_s - mean_y) * LN2.value).view(lead), 0.0) if return_entropy else None
        rows = [m, log2_s] + ([ent.view(-1)] if return_entropy else [])  # stack copies: row 2 is not ent itself
        return logp, ent, torch.where(active, torch.stack(rows), 0.0), active


def _backward(hidden, weight, bias, tgt, active, stats, ent, grad_logp, grad_ent, temperature, needs):
    with kernel_range("fastrlhf.linear_logprobs.bwd"):
        cfg = launch_config(hidden.dtype, hidden.device, one_head=True)
        sizes, _, _ = launch_grid(hidden, weight, cfg, ranges=False)
        ptrs, head = head_args(hidden, weight, bias)
        # (N,) views; contiguous because .sum()'s upstream gradient has stride 0
        flat = [t.reshape(-1).contiguous() if t is not None else stats for t in (ent, grad_logp, grad_ent)]
        need_db = needs[2] and bias is not None

        def fill(gz, gb, col0, col_end):
            grid = (triton.cdiv(sizes[0], cfg["BLOCK_M"]), triton.cdiv(col_end - col0, cfg["BLOCK_V"]))
            _linear_logprobs_bwd[grid](
                *ptrs,
                active,
                tgt,
                stats,
                *flat,
                gz,
                gb,
                *sizes,
                *head,
                temperature,
                col0,
                col_end,
                gz.stride(0),
                HAS_BIAS=bias is not None,
                HAS_GRAD_LOGP=grad_logp is not None,
                HAS_GRAD_ENT=grad_ent is not None,
                NEED_DB=need_db,
                ACC=tl_dtype(stats.dtype),
                DOT_DTYPE=dot_dtype(hidden),
                **cfg,
                enable_fp_fusion=True,
            )

        return chunked_grads(hidden, weight, bias, active, needs, cfg["BLOCK_M"], cfg["BLOCK_V"], fill)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, return_entropy):
        logp, ent, stats, active = _forward(hidden, weight, bias, targets, temperature, ignore_index, return_entropy)
        # row stats only (the entropy among them): no output is saved, so a caller may modify them in place
        ctx.save_for_backward(hidden, weight, bias, targets.reshape(-1), active, stats)
        ctx.temperature = temperature
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, tgt, active, stats = ctx.saved_tensors
        ent = stats[2] if stats.shape[0] == 3 else None
        grad_ent = grad_ent if ent is not None else None
        needs = ctx.needs_input_grad[:3]
        grads = _backward(hidden, weight, bias, tgt, active, stats, ent, grad_logp, grad_ent, ctx.temperature, needs)
        return (*grads, None, None, None, None)


# ------------------------------------------------------------------------------------------- public API
def _check_inputs(hidden, weight, targets, bias, temperature):
    check_head("", hidden, weight, bias)
    check_int("targets", targets)
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    check_shape("targets", targets, hidden.shape[:-1], f"hidden {tuple(hidden.shape)} without its H dim")
    return check_temperature(temperature)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Log-probability of each target token under softmax((hidden @ weight.T + bias) / temperature), and
    optionally that distribution's entropy, without materialising the logits.

    Args:
        hidden: (..., H) fp16/bf16/fp32 (fp64 computes in fp64); any strides.
        weight: (V, H) the LM head, in hidden's dtype. bias: optional (V,), any float dtype.
        targets: (...) integer token ids, hidden's leading shape; `ignore_index` marks positions to skip.
        temperature: > 0, applied in fp32 inside the kernel.
    Returns:
        logp (...) fp32, or (logp, entropy). Ignored positions are 0; a target id outside [0, V) gives NaN.
        Fresh tensors (no views, nothing the backward reads): a caller may modify them in place.
        Gradients flow to hidden, weight and bias.
    """
    temperature = _check_inputs(hidden, weight, targets, bias, temperature)
    if not use_triton(hidden):
        return linear_logprobs_ref(
            hidden,
            weight,
            targets,
            bias=bias,
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
        )
    args = (hidden, weight, bias, targets, temperature, int(ignore_index), bool(return_entropy))
    if wants_grad(hidden, weight, bias):
        return _LinearLogprobs.apply(*args)
    logp, ent, _, _ = _forward(*args)
    return (logp, ent) if return_entropy else logp


# ---------------------------------------------------------------------------------------- reference twin
def linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Pure-PyTorch twin of `linear_logprobs`: fp32 logits (fp64 for fp64 inputs) for chunks of REF_CHUNK_ROWS
    rows, then `token_logprobs_ref`. Memory O(chunk x V), plus an fp32 copy of a 16-bit weight."""
    temperature = _check_inputs(hidden, weight, targets, bias, temperature)
    acc = acc_dtype(hidden)

    def chunk(h, t, w, b):
        z = F.linear(h.to(acc), w, b)  # (chunk, V)
        out = token_logprobs_ref(z, t, temperature=temperature, ignore_index=ignore_index, return_entropy=True)
        return out if return_entropy else out[0]

    rows = (hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))
    outs = by_chunks(chunk, rows, (weight.to(acc), None if bias is None else bias.to(acc)))
    lead = hidden.shape[:-1]
    if not return_entropy:
        return torch.cat(outs).view(lead)
    return torch.cat([o[0] for o in outs]).view(lead), torch.cat([o[1] for o in outs]).view(lead)
