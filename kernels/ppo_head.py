"""One-pass PPO head: log-prob, entropy, ratio, clipped surrogate, clip flag and k3 KL from the logits.

Math, per row (one token position) with logits x in R^V, target t, temperature T, old log-prob o,
advantage A, clip range c and (optionally) reference log-prob q:
    z = x / T,  lse = log sum_j exp(z_j),  logp = z_t - lse,  H = lse - sum_j p_j z_j,  p = softmax(z)
    r = exp(logp - o)
    u = -A r,  k = -A clamp(r, 1 - c, 1 + c),   pg = max(u, k),   clipped = 1[k > u]
    d = logp - q,  kl = exp(-d) - 1 + d   (Schulman's k3; by series for |d| < 0.5, no cancellation)
These are exactly the per-token quantities of `trainer.rl.policy_loss` (and `kl_estimate(..., "k3")`),
so loss = masked_mean(pg) - ent_coef * masked_mean(H) (+ beta * masked_mean(kl)) trains identically;
clipfrac = masked_mean(clipped), approx_kl = masked_mean(0.5 * (logp - o)^2).

Forward: ONE streaming read of the logits (N*V*bytes; online max / sum-exp / entropy sums in fp32, as in
`token_logprobs`) plus the per-token inputs (N*(8 + 4*3) bytes for int64 targets and fp32 inputs);
writes five or six fp32 outputs (N*4 bytes each) and, when a backward will follow, a (6, N) fp32 block of row statistics: [max_j x_j, log2 sum_j 2^((x_j - max) log2(e) / T),
d pg/d logp, d r/d logp, d kl/d logp, H]. Nothing [N, V] is saved; under no_grad nothing is saved.
Backward: one read of the logits and one write of their gradient (2*N*V*bytes). Per row
    g = g_logp + g_pg * dpg/dlogp + g_ratio * r + g_kl * (1 - exp(-d)),     then
    dL/dx_j = [g (1[j=t] - p_j) - g_H p_j (log p_j + H)] / T
with dpg/dlogp = -A r (w_u + w_k 1[1-c <= r <= 1+c]), where (w_u, w_k) = (1, 0) if u > k, (0, 1) if
u < k and (1/2, 1/2) on a tie: torch.maximum's and torch.clamp's autograd conventions, so the fused and
unfused gradients agree even at ties (inside the clip range u == k exactly and the halves add up).
old_logprobs, advantages and ref_logprobs are constants: no gradient flows to them (the reference
detaches them too).

Rounding: logits are upcast to fp32 on load (fp64 inputs compute in fp64, for gradcheck); all outputs
are fp32; 1 - c, 1 + c and T are rounded to fp32 once, as torch.clamp does with Python scalars on fp32
tensors (also for fp64 logits, whose reference clamps at the exact 1 +- c); the gradient is rounded
once, to the logits' dtype, when stored.

Rows whose target equals `ignore_index` read nothing and give 0 for every output (ratio included:
`rl.policy_loss` uses ratio 1 there, but masks it out of every statistic, so nothing downstream differs)
and a 0 gradient. A target outside [0, V) gives NaN logp / ratio / pg / kl (and NaN gradients through
them; the entropy stays finite) without reading out of bounds; NaN logits give NaN outputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (
    acc_dtype,
    as_rows,
    bwd_layout,
    check_float,
    check_int,
    check_logits,
    check_same_device,
    check_shape,
    check_temperature,
    div_rn,
    grad_rows,
    num_warps_for,
    kernel_range,
    row_blocks,
    temperature_scale,
    tl_dtype,
    use_triton,
    vocab_splits,
)
from ._series import expm1_neg, k3
from .token_logprobs import _grad_pass, fwd_tiles, online_lse, token_logprobs_ref

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _ppo_head_fwd(
    logits_ptr,  # (A, B, V) any float; row r = a*B + b at a*stride_a + b*stride_b; vocab stride 1
    targets_ptr,  # (N,) int, N = A*B
    old_ptr,  # (N,) float: old_logprobs
    adv_ptr,  # (N,) float: advantages
    ref_ptr,  # (N,) float: ref_logprobs (read when HAS_REF)
    logp_ptr,  # (N,) fp32 out
    ent_ptr,  # (N,) fp32 out
    ratio_ptr,  # (N,) fp32 out
    pg_ptr,  # (N,) fp32 out
    clipped_ptr,  # (N,) fp32 out, 0.0 / 1.0
    kl_ptr,  # (N,) fp32 out, written when HAS_REF
    stats_ptr,  # (6, N) fp32 out (when SAVE): max, log2 sum, dpg/dlogp, dratio/dlogp, dkl/dlogp, entropy
    N,
    V,
    B,
    stride_a,
    stride_b,
    temperature,
    clip_lo,  # 1 - c, fp32
    clip_hi,  # 1 + c, fp32
    ignore_index,
    HAS_REF: tl.constexpr,
    SAVE: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32 (tl.float64 for fp64 logits)
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    G: tl.constexpr,  # columns per partial max/sum in the loop (online_lse, `token_logprobs.fwd_tiles`)
    ALIGN: tl.constexpr,  # > 0: blocks on the 16-byte grid of memory (online_lse)
    STAGES: tl.constexpr,  # the loop's pipelining depth (online_lse)
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    row_in = rows < N
    tgt = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
    active = row_in & (tgt != ignore_index)  # ignored rows read nothing
    row_off = (rows // B) * stride_a + (rows % B) * stride_b  # int64
    _, scale = temperature_scale(temperature, ACC)

    # ---- the one streaming pass (token_logprobs.py's): running max m, s = sum 2^y, w = sum 2^y * y
    m, s, w = online_lse(logits_ptr, row_off, active, V, scale, True, ACC, BLOCK_R, BLOCK_V, G, ALIGN, STAGES)

    log2_s = tl.log2(s)
    tgt_ok = active & (tgt >= 0) & (tgt < V)
    x_t = tl.load(logits_ptr + row_off + tgt, mask=tgt_ok, other=0.0).to(ACC)
    logp = ((x_t - m) * scale - log2_s) * LN2
    logp = tl.where(tgt_ok, logp, float("nan"))
    ent = (log2_s - div_rn(w, s)) * LN2

    # ---- the PPO algebra, per row (rl.policy_loss's expressions, in the same order)
    old = tl.load(old_ptr + rows, mask=active, other=0.0).to(ACC)
    adv = tl.load(adv_ptr + rows, mask=active, other=0.0).to(ACC)
    lo = tl.cast(clip_lo, ACC)
    hi = tl.cast(clip_hi, ACC)
    ratio = tl.exp(logp - old)
    u = -adv * ratio
    k = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    pg = tl.where(k > u, k, u)  # torch.maximum; NaN ratio -> NaN u -> NaN pg
    clipped = tl.where(k > u, 1.0, 0.0)
    tl.store(logp_ptr + rows, tl.where(active, logp, 0.0), mask=row_in)
    tl.store(ent_ptr + rows, tl.where(active, ent, 0.0), mask=row_in)
    tl.store(ratio_ptr + rows, tl.where(active, ratio, 0.0), mask=row_in)
    tl.store(pg_ptr + rows, tl.where(active, pg, 0.0), mask=row_in)
    tl.store(clipped_ptr + rows, tl.where(active, clipped, 0.0), mask=row_in)
    d = tl.zeros([BLOCK_R], ACC)
    if HAS_REF:
        d = logp - tl.load(ref_ptr + rows, mask=active, other=0.0).to(ACC)
        tl.store(kl_ptr + rows, tl.where(active, k3(d), 0.0), mask=row_in)
    if SAVE:
        w_u = tl.where(u > k, 1.0, tl.where(u == k, 0.5, 0.0))  # torch.maximum splits ties 1/2, 1/2
        in_range = (ratio >= lo) & (ratio <= hi)  # torch.clamp passes the gradient on [lo, hi]
        dpg = -adv * (w_u + tl.where(in_range, 1.0 - w_u, 0.0)) * ratio  # d pg / d logp
        tl.store(stats_ptr + rows, tl.where(active, m, 0.0), mask=row_in)
        tl.store(stats_ptr + N + rows, tl.where(active, log2_s, 0.0), mask=row_in)
        tl.store(stats_ptr + 2 * N + rows, tl.where(active, dpg, 0.0), mask=row_in)
        tl.store(stats_ptr + 3 * N + rows, tl.where(active, ratio, 0.0), mask=row_in)
        tl.store(stats_ptr + 4 * N + rows, tl.where(active, -expm1_neg(d), 0.0), mask=row_in)
        tl.store(stats_ptr + 5 * N + rows, tl.where(active, ent, 0.0), mask=row_in)


@triton.jit
def _ppo_head_bwd(
    logits_ptr,  # (A, B, V) any float, as in forward
    targets_ptr,  # (N,) int
    stats_ptr,  # (6, N) fp32 row statistics from forward
    g_logp_ptr,  # (N,) upstream gradients, each read only when its flag is set
    g_ent_ptr,
    g_ratio_ptr,
    g_pg_ptr,
    g_kl_ptr,
    grad_logits_ptr,  # (A, B, V) out, logits dtype; strides gstride_a, gstride_b, 1
    N,
    V,
    B,
    stride_a,
    stride_b,
    gstride_a,
    gstride_b,
    temperature,
    ignore_index,
    cols_per_split,  # vocabulary columns handled by one program along grid axis 1 (a multiple of BLOCK_V)
    HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    HAS_G_RATIO: tl.constexpr,
    HAS_G_PG: tl.constexpr,
    HAS_G_KL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,  # > 0: blocks on memory's 16-byte grid, whole ones unmasked (`_common.aligned_share`)
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    row_in = rows < N
    tgt = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
    active = row_in & (tgt != ignore_index)
    tgt_ok = active & (tgt >= 0) & (tgt < V)
    a = rows // B
    b = rows % B
    row_off = a * stride_a + b * stride_b
    grad_off = a * gstride_a + b * gstride_b
    inv_t, scale = temperature_scale(temperature, ACC)

    m = tl.load(stats_ptr + rows, mask=active, other=0.0).to(ACC)
    log2_s = tl.load(stats_ptr + N + rows, mask=active, other=0.0).to(ACC)
    # d loss / d logp, per row, in closed form from the saved coefficients
    g_lp = tl.zeros([BLOCK_R], ACC)
    if HAS_G_LOGP:
        g_lp += tl.load(g_logp_ptr + rows, mask=active, other=0.0).to(ACC)
    if HAS_G_PG:  # * d pg / d logp
        g_lp += tl.load(g_pg_ptr + rows, mask=active, other=0.0).to(ACC) * tl.load(
            stats_ptr + 2 * N + rows, active, 0.0
        )
    if HAS_G_RATIO:  # * d ratio / d logp = ratio
        g_lp += tl.load(g_ratio_ptr + rows, mask=active, other=0.0).to(ACC) * tl.load(
            stats_ptr + 3 * N + rows, active, 0.0
        )
    if HAS_G_KL:  # * d kl / d logp
        g_lp += tl.load(g_kl_ptr + rows, mask=active, other=0.0).to(ACC) * tl.load(
            stats_ptr + 4 * N + rows, active, 0.0
        )
    if HAS_G_LOGP or HAS_G_PG or HAS_G_RATIO or HAS_G_KL:
        g_lp = tl.where(tgt_ok | ~active, g_lp, float("nan"))  # bad target id: NaN gradient, like logp
    g_h = tl.zeros([BLOCK_R], ACC)
    ent = tl.zeros([BLOCK_R], ACC)
    if HAS_G_ENT:
        g_h = tl.load(g_ent_ptr + rows, mask=active, other=0.0).to(ACC)
        ent = tl.load(stats_ptr + 5 * N + rows, mask=active, other=0.0)

    _grad_pass(
        logits_ptr,
        grad_logits_ptr,
        row_off,
        grad_off,
        row_in,
        active,
        tgt,
        V,
        cols_per_split,
        m,
        log2_s,
        g_lp,
        g_h,
        ent,
        scale,
        inv_t,
        True,
        HAS_G_ENT,
        ACC,
        BLOCK_R,
        BLOCK_V,
        ALIGN,
    )


# --------------------------------------------------------------------------------------------- launchers
def _forward(logits, targets, old_logprobs, advantages, ref_logprobs, clip_range, temperature, ignore_index, save):
    """-> outputs [logp, entropy, ratio, pg, clipped, kl or None] (targets' shape, acc dtype), and the
    (6, N) row statistics when `save` (else None)."""
    with kernel_range("fastrlhf.ppo_head.fwd"):
        N, acc = targets.numel(), acc_dtype(logits)
        n_out = 6 if ref_logprobs is not None else 5
        outs = [torch.empty(logits.shape[:-1], dtype=acc, device=logits.device) for _ in range(n_out)]
        stats = torch.empty((6, N), dtype=acc, device=logits.device) if save else outs[0]
        if N > 0:
            x = as_rows(logits)  # (A, B, V)
            A, B, V = x.shape
            flat = [t.reshape(N).contiguous() for t in (targets, old_logprobs, advantages)]
            ref = ref_logprobs.reshape(N).contiguous() if ref_logprobs is not None else flat[1]
            tiles = fwd_tiles(x)
            _ppo_head_fwd[(triton.cdiv(N, tiles["BLOCK_R"]),)](
                # without a reference, kl_ptr gets a dummy (never written)
                x,
                *flat,
                ref,
                *outs[:5],
                outs[n_out - 1],
                stats,
                N,
                V,
                B,
                x.stride(0),
                x.stride(1),
                temperature,
                1.0 - clip_range,
                1.0 + clip_range,
                ignore_index,
                HAS_REF=ref_logprobs is not None,
                SAVE=save,
                ACC=tl_dtype(acc),
                **tiles,
                enable_fp_fusion=True,
            )
        return outs + [None] * (6 - n_out), (stats if save else None)


def _backward(logits, targets, stats, grads, temperature, ignore_index):
    """grads: upstream (logp, entropy, ratio, pg, kl), each a tensor or None -> grad_logits (logits' shape,
    laid out as the logits are where that is cheap: `_common.grad_rows`)."""
    with kernel_range("fastrlhf.ppo_head.bwd"):
        if logits.numel() == 0:
            return torch.zeros_like(logits)
        x = as_rows(logits)
        A, B, V = x.shape
        N = A * B
        grad = grad_rows(x)
        block_r, block_v = row_blocks(N, V, logits.device)
        layout = bwd_layout(block_r, block_v, x, grad)
        align = layout["ALIGN"]
        cols = V + max(align - 1, 0)  # on the 16-byte grid a row spans up to ALIGN - 1 more columns
        n_row_programs = triton.cdiv(N, block_r)
        splits = vocab_splits(n_row_programs, triton.cdiv(cols, block_v), logits.device)
        cols_per_split = triton.cdiv(triton.cdiv(cols, splits), block_v) * block_v
        splits = triton.cdiv(cols, cols_per_split)
        flat = [g.reshape(N).contiguous() if g is not None else stats for g in grads]  # .sum() gives stride 0
        g_logp, g_ent, g_ratio, g_pg, g_kl = (g is not None for g in grads)
        _ppo_head_bwd[(n_row_programs, splits)](
            x,
            targets.reshape(N),
            stats,
            *flat,
            grad,
            N,
            V,
            B,
            x.stride(0),
            x.stride(1),
            grad.stride(0),
            grad.stride(1),
            temperature,
            ignore_index,
            cols_per_split,
            HAS_G_LOGP=g_logp,
            HAS_G_ENT=g_ent,
            HAS_G_RATIO=g_ratio,
            HAS_G_PG=g_pg,
            HAS_G_KL=g_kl,
            ACC=tl_dtype(stats.dtype),
            BLOCK_R=block_r,
            BLOCK_V=block_v,
            **layout,
            num_warps=num_warps_for(block_r * block_v),
            enable_fp_fusion=True,
        )
        return grad.view(logits.shape)


class _PPOHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, old_logprobs, advantages, ref_logprobs, clip_range, temperature, ignore_index):
        args = (logits, targets, old_logprobs, advantages, ref_logprobs, clip_range, temperature, ignore_index)
        (logp, ent, ratio, pg, clipped, kl), stats = _forward(*args, True)
        ctx.save_for_backward(logits, targets, stats)  # per-row stats only (outputs stay free for in-place use)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.mark_non_differentiable(clipped)
        ctx.set_materialize_grads(False)  # unused outputs arrive as None: their terms are skipped
        return logp, ent, ratio, pg, clipped, kl

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_ratio, g_pg, g_clipped, g_kl):
        logits, targets, stats = ctx.saved_tensors
        grads = (g_logp, g_ent, g_ratio, g_pg, g_kl)
        grad = _backward(logits, targets, stats, grads, ctx.temperature, ctx.ignore_index)
        return grad, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------- public API
class PPOHeadOutput(NamedTuple):
    """Per-token PPO quantities, each fp32 with the targets' shape (0 at ignored positions)."""

    logprobs: torch.Tensor  # log pi(t | x) at temperature T
    entropy: torch.Tensor  # H(softmax(x / T))
    ratio: torch.Tensor  # exp(logprobs - old_logprobs)
    pg_loss: torch.Tensor  # max(-A r, -A clamp(r, 1 - c, 1 + c))
    clipped: torch.Tensor  # 1.0 where the clipped term is strictly larger, else 0.0 (no gradient)
    kl: torch.Tensor | None  # k3(logprobs - ref_logprobs), None without ref_logprobs


def _check_inputs(logits, targets, old_logprobs, advantages, ref_logprobs, clip_range, temperature):
    check_logits("logits", logits)
    check_int("targets", targets)
    lead, against = logits.shape[:-1], f"logits {tuple(logits.shape)} without its vocab dim"
    check_shape("targets", targets, lead, against)
    per_token = {"old_logprobs": old_logprobs, "advantages": advantages}
    if ref_logprobs is not None:
        per_token["ref_logprobs"] = ref_logprobs
    for name, t in per_token.items():
        check_float(name, t)
        check_shape(name, t, lead, against)
    check_same_device(logits=logits, targets=targets, **per_token)
    c = float(clip_range)
    if not (0.0 <= c < math.inf):
        raise ValueError(f"clip_range must be a finite number >= 0, got {clip_range!r}")
    return c, check_temperature(temperature)


def ppo_head(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    clip_range: float = 0.2,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> PPOHeadOutput:
    """Every per-token quantity of the PPO policy loss in one read of the logits (see module docstring).

    Args:
        logits: (..., V) fp16/bf16/fp32 (fp64 computes in fp64); vocabulary stride 1; leading dims may be
            a strided view such as `logits[:, :-1]`. Differentiable.
        targets: (...) integer token ids; `ignore_index` marks positions to skip.
        old_logprobs, advantages: (...) float, the rollout's log-probs and advantages (constants).
        ref_logprobs: optional (...) float reference log-probs for the k3 KL (a constant).
        clip_range: c >= 0 of the clipped surrogate.
        temperature: > 0, applied inside the kernel in fp32 (the caller's logits are never modified).
    Returns:
        PPOHeadOutput(logprobs, entropy, ratio, pg_loss, clipped, kl), fp32 (...) each; kl is None
        without ref_logprobs. Gradients reach the logits through logprobs, entropy, ratio, pg_loss, kl.
    """
    clip_range, temperature = _check_inputs(
        logits, targets, old_logprobs, advantages, ref_logprobs, clip_range, temperature
    )
    if not use_triton(logits):
        return ppo_head_ref(
            logits,
            targets,
            old_logprobs,
            advantages,
            ref_logprobs=ref_logprobs,
            clip_range=clip_range,
            temperature=temperature,
            ignore_index=ignore_index,
        )
    args = (logits, targets, old_logprobs, advantages, ref_logprobs, clip_range, temperature, int(ignore_index))
    if torch.is_grad_enabled() and logits.requires_grad:
        return PPOHeadOutput(*_PPOHead.apply(*args))
    return PPOHeadOutput(*_forward(*args, False)[0])


def ppo_head_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    clip_range: float = 0.2,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> PPOHeadOutput:
    """Pure-PyTorch twin of `ppo_head` (log_softmax in fp32, fp64 for fp64 logits; the expressions of
    `rl.policy_loss`): the spec, the CPU fallback, the test oracle. Materialises (..., V) fp32."""
    clip_range, temperature = _check_inputs(
        logits, targets, old_logprobs, advantages, ref_logprobs, clip_range, temperature
    )
    acc = acc_dtype(logits)
    logp, ent = token_logprobs_ref(
        logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    active = targets != ignore_index
    log_ratio = (logp - old_logprobs.detach().to(acc)).where(active, 0)  # padding: no overflow, no NaN grad
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(acc)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    pg = torch.maximum(unclipped, clipped)
    kl = None
    if ref_logprobs is not None:
        d = (logp - ref_logprobs.detach().to(acc)).where(active, 0)
        kl = (torch.expm1(-d) + d).where(active, 0)
    zero = torch.zeros((), dtype=acc, device=logits.device)
    return PPOHeadOutput(
        logp,
        ent,
        ratio.where(active, zero),
        pg.where(active, zero),
        (clipped > unclipped).where(active, False).to(acc),
        kl,
    )
