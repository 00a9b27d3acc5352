"""Per-token KL(pi || pi_ref) over the whole vocabulary between a policy head and a reference head, straight
from their hidden states, never materialising [N, V] logits (the shared tiles, grid, backward chunks and
rounding: `_linear.py`).

Math, per row: p and q are the softmaxes at temperature T of x = W h + b and y = W_ref h_ref + b_ref; with
d_j = log p_j - log q_j and k3(d) = d - 1 + e^-d
    KL = sum_j p_j k3(d_j)   (= sum_j p_j d_j, since sum_j q_j - p_j = 0)
Every term is >= 0 and second order in d (series for |d| < 0.5, see full_kl.py), so near-equal heads keep
relative accuracy, and an error c in the two log-normalisers moves KL only at O(c^2).
Forward, 4 matmuls: pass 1 is `_linear_lse_fwd` on each head (row max, log-sum-exp); pass 2
(`_linear_kl_fwd`) recomputes both tiles and sums p k3(d) and p d~ per vocabulary range, d~_j = log(p_j/q_j)
+ a per-row constant.
Backward (to the policy head only; the reference is frozen): per vocabulary chunk, `_linear_kl_bwd`
recomputes both tiles and forms
    d KL/dz_j = p_j (d~_j - E_p[d~])/T
(E_p[d~] from the forward's d~, bit for bit, as in full_kl.py), then cuBLAS GEMMs give grad hidden, W, b.
Saved for backward: the inputs and four fp32 statistics a row; nothing [N, V]. Masked rows (mask == 0) read
nothing and give 0 and 0 gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import LOG2E, _desc, acc_dtype, check_same_device, check_shape, check_temperature, kernel_range
from ._common import temperature_scale, tl_dtype, use_triton
from ._linear import (
    LN2,
    by_chunks,
    check_head,
    chunked_grads,
    dot_dtype,
    head_args,
    launch_config,
    launch_grid,
    logits_tile,
    row_block,
    row_stats,
    store_grad_z,
    wants_grad,
)
from ._series import SERIES_D, k3_series
from .full_kl import full_kl_ref


@triton.jit
def _kl_tiles(
    h_ptr,
    w_ptr,
    b_ptr,
    rh_ptr,
    rw_ptr,
    rb_ptr,  # the two heads, as in _linear_kl_fwd
    row_off,
    ref_off,
    active,
    cols,
    col_end,
    H,
    s_hh,
    s_wv,
    s_wh,
    RH,
    r_hh,
    r_wv,
    r_wh,
    mp,
    lsp,
    mq,
    inv_t,
    HAS_BIAS: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    REF_DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Both logits tiles -> p (the policy's softmax), d~ = log(p/q) + a per-row constant, reference logits."""
    x = logits_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        row_off,
        active,
        cols,
        col_end,
        H,
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
    y = logits_tile(
        rh_ptr,
        rw_ptr,
        rb_ptr,
        ref_off,
        active,
        cols,
        col_end,
        RH,
        r_hh,
        r_wv,
        r_wh,
        HAS_REF_BIAS,
        ACC,
        REF_DOT_DTYPE,
        BLOCK_M,
        BLOCK_V,
        BLOCK_H,
    )
    p = tl.exp2((x - mp[:, None]) * (inv_t * LOG2E) - lsp[:, None])  # temperature_scale's, to the bit
    d_rel = ((x - y) - (mp - mq)[:, None]) * inv_t  # x - y first: nearly exact for near-equal heads
    return p, d_rel, y


@triton.jit
def _linear_kl_fwd(
    h_ptr,
    w_ptr,
    b_ptr,  # policy (A, B, H), (V, H), (V,) (HAS_BIAS): as in _linear_lse_fwd
    rh_ptr,
    rw_ptr,
    rb_ptr,  # reference (A, B, RH), (V, RH), (V,) (HAS_REF_BIAS); strides r_*
    active_ptr,  # (N,) bool
    stats_ptr,  # (4, N) ACC from pass 1: [max x, log2 sum_p, max y, log2 sum_q]
    part_ptr,  # (2, S, N) ACC out per vocab range: [sum_j p_j k3(d_j), sum_j p_j d~_j]
    N,
    V,
    B,
    H,
    s_ha,
    s_hb,
    s_hh,
    s_wv,
    s_wh,
    RH,
    r_ha,
    r_hb,
    r_hh,
    r_wv,
    r_wh,
    temperature,
    cols_per_split,
    HAS_BIAS: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    REF_DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows, row_in, active, row_off = row_block(active_ptr, N, B, s_ha, s_hb, BLOCK_M)
    ref_off = (rows // B) * r_ha + (rows % B) * r_hb
    inv_t, scale = temperature_scale(temperature, ACC)
    split = tl.program_id(1).to(tl.int64)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, V)
    col_end = tl.where(tl.max(active.to(tl.int32), 0) > 0, col_end, col_start)
    mp = tl.load(stats_ptr + rows, mask=active, other=0.0)
    lsp = tl.load(stats_ptr + N + rows, mask=active, other=0.0)
    mq = tl.load(stats_ptr + 2 * N + rows, mask=active, other=0.0)
    lsq = tl.load(stats_ptr + 3 * N + rows, mask=active, other=0.0)
    c = (lsp - lsq) * LN2  # d_j = d~_j - c = log p_j - log q_j

    K = tl.zeros([BLOCK_M], ACC)
    M = tl.zeros([BLOCK_M], ACC)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        p, d_rel, y = _kl_tiles(
            h_ptr,
            w_ptr,
            b_ptr,
            rh_ptr,
            rw_ptr,
            rb_ptr,
            row_off,
            ref_off,
            active,
            cols,
            col_end,
            H,
            s_hh,
            s_wv,
            s_wh,
            RH,
            r_hh,
            r_wv,
            r_wh,
            mp,
            lsp,
            mq,
            inv_t,
            HAS_BIAS,
            HAS_REF_BIAS,
            ACC,
            DOT_DTYPE,
            REF_DOT_DTYPE,
            BLOCK_M,
            BLOCK_V,
            BLOCK_H,
        )
        q = tl.exp2((y - mq[:, None]) * scale - lsq[:, None])
        d = d_rel - c[:, None]
        k = tl.where(tl.abs(d) < SERIES_D, p * k3_series(d), tl.where(p > 0, p * d, 0.0) + q - p)
        K += tl.sum(tl.where(p + q > 0, k, 0.0), 1)
        M += tl.sum(tl.where(p > 0, p * d_rel, 0.0), 1)
    out = part_ptr + split * N + rows
    tl.store(out, tl.where(active, K, 0.0), mask=row_in)
    tl.store(out + tl.num_programs(1).to(tl.int64) * N, tl.where(active, M, 0.0), mask=row_in)


@triton.jit
def _linear_kl_bwd(
    h_ptr,
    w_ptr,
    b_ptr,
    rh_ptr,
    rw_ptr,
    rb_ptr,  # the two heads, as in _linear_kl_fwd
    active_ptr,  # (N,) bool
    stats_ptr,  # (4, N) ACC from the forward: [max x, log2 sum_p, max y, E_p[d~]]
    grad_kl_ptr,  # (N,) upstream gradient
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
    RH,
    r_ha,
    r_hb,
    r_hh,
    r_wv,
    r_wh,
    temperature,
    col0,
    col_end,
    s_gz,
    HAS_BIAS: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    NEED_DB: tl.constexpr,
    ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    REF_DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """The policy's grad_z of the vocabulary chunk [col0, col_end): one program per (row block, tile)."""
    rows, row_in, active, row_off = row_block(active_ptr, N, B, s_ha, s_hb, BLOCK_M)
    ref_off = (rows // B) * r_ha + (rows % B) * r_hb
    cols = col0 + tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    any_active = tl.max(active.to(tl.int32), 0) > 0  # none: read nothing
    inv_t, _ = temperature_scale(temperature, ACC)
    mp = tl.load(stats_ptr + rows, mask=active, other=0.0)
    lsp = tl.load(stats_ptr + N + rows, mask=active, other=0.0)
    mq = tl.load(stats_ptr + 2 * N + rows, mask=active, other=0.0)
    mean_d = tl.load(stats_ptr + 3 * N + rows, mask=active, other=0.0)
    g_kl = tl.load(grad_kl_ptr + rows, mask=active, other=0.0).to(ACC) * inv_t

    p, d_rel, _ = _kl_tiles(
        h_ptr,
        w_ptr,
        b_ptr,
        rh_ptr,
        rw_ptr,
        rb_ptr,
        row_off,
        ref_off,
        active,
        cols,
        col_end,
        tl.where(any_active, H, 0),
        s_hh,
        s_wv,
        s_wh,
        tl.where(any_active, RH, 0),
        r_hh,
        r_wv,
        r_wh,
        mp,
        lsp,
        mq,
        inv_t,
        HAS_BIAS,
        HAS_REF_BIAS,
        ACC,
        DOT_DTYPE,
        REF_DOT_DTYPE,
        BLOCK_M,
        BLOCK_V,
        BLOCK_H,
    )
    g = tl.where(p > 0, p * (d_rel - mean_d[:, None]), 0.0) * g_kl[:, None]
    g = tl.where(active[:, None] & (cols[None, :] < col_end), g, 0.0)
    store_grad_z(g, gz_ptr, gb_ptr, rows, row_in, cols, col0, col_end, s_gz, NEED_DB)


# --------------------------------------------------------------------------------------------- launchers
def _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, active, temperature):
    """-> kl (N,), stats (4, N): [max x, log2 sum_p, max y, E_p[d~]] for the backward."""
    with kernel_range("fastrlhf.linear_full_kl.fwd"):
        acc = acc_dtype(hidden, ref_hidden)
        mp, lsp, _, _ = row_stats(hidden, weight, bias, active, None, temperature, False, acc)  # pass 1
        mq, lsq, _, _ = row_stats(ref_hidden, ref_weight, ref_bias, active, None, temperature, False, acc)
        stats = torch.where(active, torch.stack([mp, lsp, mq, lsq]), 0.0)
        cfg = launch_config(torch.promote_types(hidden.dtype, ref_hidden.dtype), hidden.device)
        sizes, grid, cols_per_split = launch_grid(hidden, weight, cfg, ranges=True)
        ptrs, head = head_args(hidden, weight, bias)
        ref_ptrs, ref_head = head_args(ref_hidden, ref_weight, ref_bias)
        part = torch.empty((2, grid[1], sizes[0]), dtype=acc, device=hidden.device)
        _linear_kl_fwd[grid](  # pass 2
            *ptrs,
            *ref_ptrs,
            active,
            stats,
            part,
            *sizes,
            *head,
            *ref_head,
            temperature,
            cols_per_split,
            HAS_BIAS=bias is not None,
            HAS_REF_BIAS=ref_bias is not None,
            ACC=tl_dtype(acc),
            DOT_DTYPE=dot_dtype(hidden),
            REF_DOT_DTYPE=dot_dtype(ref_hidden),
            **cfg,
            enable_fp_fusion=True,
        )
        stats[3] = torch.where(active, part[1].sum(0), 0.0)
        return torch.where(active, part[0].sum(0), 0.0), stats


def _backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, active, stats, grad_kl, temperature, needs):
    with kernel_range("fastrlhf.linear_full_kl.bwd"):
        cfg = launch_config(torch.promote_types(hidden.dtype, ref_hidden.dtype), hidden.device)
        sizes, _, _ = launch_grid(hidden, weight, cfg, ranges=False)
        ptrs, head = head_args(hidden, weight, bias)
        ref_ptrs, ref_head = head_args(ref_hidden, ref_weight, ref_bias)
        g_kl = grad_kl.reshape(-1).contiguous()
        need_db = needs[2] and bias is not None

        def fill(gz, gb, col0, col_end):
            grid = (triton.cdiv(sizes[0], cfg["BLOCK_M"]), triton.cdiv(col_end - col0, cfg["BLOCK_V"]))
            _linear_kl_bwd[grid](
                *ptrs,
                *ref_ptrs,
                active,
                stats,
                g_kl,
                gz,
                gb,
                *sizes,
                *head,
                *ref_head,
                temperature,
                col0,
                col_end,
                gz.stride(0),
                HAS_BIAS=bias is not None,
                HAS_REF_BIAS=ref_bias is not None,
                NEED_DB=need_db,
                ACC=tl_dtype(stats.dtype),
                DOT_DTYPE=dot_dtype(hidden),
                REF_DOT_DTYPE=dot_dtype(ref_hidden),
                **cfg,
                enable_fp_fusion=True,
            )

        return chunked_grads(hidden, weight, bias, active, needs, cfg["BLOCK_M"], cfg["BLOCK_V"], fill)


class _LinearFullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, active, temperature):
        kl, stats = _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, active, temperature)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, active, stats)
        ctx.temperature = temperature
        return kl.view(hidden.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        grads = _backward(*ctx.saved_tensors, grad_kl, ctx.temperature, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None)


# ------------------------------------------------------------------------------------------- public API
def _check_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, mask):
    check_head("", hidden, weight, bias)
    check_head("ref_", ref_hidden, ref_weight, ref_bias)
    check_same_device(
        hidden=hidden,
        weight=weight,
        bias=bias,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        mask=mask,
    )
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have weight's vocabulary size {weight.shape[0]}, got {_desc(ref_weight)}")
    lead = f"hidden {tuple(hidden.shape)} without its H dim"
    check_shape("ref_hidden", ref_hidden, (*hidden.shape[:-1], ref_hidden.shape[-1]), lead)
    if (hidden.dtype == torch.float64) != (ref_hidden.dtype == torch.float64):
        raise TypeError(f"fp64 must be on both heads or neither, got {hidden.dtype}, {ref_hidden.dtype}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype.is_floating_point or mask.is_complex():
            raise TypeError(f"mask must be a bool or integer tensor, got {getattr(mask, 'dtype', type(mask))}")
        check_shape("mask", mask, hidden.shape[:-1], lead)
    return check_temperature(temperature)


def linear_full_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) over the whole vocabulary, pi = softmax((hidden @ weight.T + bias) / T),
    pi_ref likewise from (ref_hidden, ref_weight, ref_bias), without materialising either logits tensor.

    Args:
        hidden, weight, bias: the policy head, as in `linear_logprobs`.
        ref_hidden: (..., H_ref) with hidden's leading shape; ref_weight (V, H_ref) in its dtype; ref_bias
            optional (V,). Frozen: no gradient flows to them. fp64 on both heads or neither.
        mask: optional (...) bool/int; positions where it is 0 give 0 and 0 gradient.
    Returns:
        (...) fp32 KL, accurate relative to its own size even when pi ~ pi_ref.
    """
    temperature = _check_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, mask)
    if not use_triton(hidden):
        return linear_full_kl_ref(
            hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias, temperature=temperature, mask=mask
        )
    n_rows = math.prod(hidden.shape[:-1])
    active = torch.ones(n_rows, dtype=torch.bool, device=hidden.device) if mask is None else mask.reshape(-1) != 0
    ref = [t if t is None else t.detach() for t in (ref_hidden, ref_weight, ref_bias)]
    if wants_grad(hidden, weight, bias):
        return _LinearFullKL.apply(hidden, weight, bias, *ref, active, temperature)
    return _forward(hidden, weight, bias, *ref, active, temperature)[0].view(hidden.shape[:-1])


# ---------------------------------------------------------------------------------------- reference twin
def linear_full_kl_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch twin of `linear_full_kl`: fp32 logits (fp64 if both heads are fp64) for chunks of
    REF_CHUNK_ROWS rows, then `full_kl_ref`. The reference head is detached."""
    temperature = _check_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, mask)
    acc = acc_dtype(hidden, ref_hidden)
    rw, rb = ref_weight.detach().to(acc), None if ref_bias is None else ref_bias.detach().to(acc)

    def chunk(h, rh, m, w, b):
        z = F.linear(h.to(acc), w, b)  # (chunk, V)
        with torch.no_grad():
            z_ref = F.linear(rh.detach().to(acc), rw, rb)
        return full_kl_ref(z, z_ref, temperature=temperature, mask=m)

    rows = (
        hidden.reshape(-1, hidden.shape[-1]),
        ref_hidden.reshape(-1, ref_hidden.shape[-1]),
        None if mask is None else mask.reshape(-1),
    )
    outs = by_chunks(chunk, rows, (weight.to(acc), None if bias is None else bias.to(acc)))
    return torch.cat(outs).view(hidden.shape[:-1])
