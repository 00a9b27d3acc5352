"""Per-token KL(pi || pi_ref) over the whole vocabulary, from two logits tensors in one streaming pass.

Math, per row with policy logits x, reference logits y, temperature T, p = softmax(x/T), q = softmax(y/T):
    KL = sum_j p_j (log p_j - log q_j)
Written naively as E_p[x - y]/T - lse(x/T) + lse(y/T), two O(1) numbers cancel to an O(delta^2) result, so
for near-equal policy and reference (the usual case in PPO) fp32 loses every digit. We instead keep, with the
running maximum m_p = max_j x_j of the raw policy logits and a per-row centre c (below):
    p~_j = exp((x_j - m_p)/T)                             (computed as exp2 of scaled differences)
    d_j  = ((x_j - y_j) - c)/T                            log(p_j/q_j) up to a per-row constant
    q^_j = p~_j e^-d_j = exp((y_j - (m_p - c))/T)         (q up to a per-row factor)
    s = sum_j p~_j,   Q = sum_j q^_j,   M = sum_j p~_j d_j
    D = sum_j p~_j expm1(-d_j)                            (= Q - s, without cancelling)
    K = sum_j p~_j k3(d_j),  k3(d) = d - 1 + e^-d          (>= 0, second order in d)
(for |d_j| < 0.5 one series gives both: expm1(-d) = k3(d) - d, with |k3(d)| < 0.3 |d| there, so the
subtraction is well-conditioned; beyond, q^ - p~ and p~ d + q^ - p~ no longer cancel.)
Then, with eps = D/s and h(e) = e - log(1 + e), two exact formulas (`_full_kl_fwd` picks per row):
    KL = K/s - h(eps)            second order: both terms O(d^2), relative accuracy when pi ~ pi_ref
    KL = M/s + log(1 + eps)      first order, for eps > 1, where the second's two terms would cancel
The centre c is the difference of the first block's log-normalisers, T log(sum e^(x/T) / sum e^(y/T)) over
it (one more pass over that block), so the sums only scale by e^((old m_p - new m_p)/T) when m_p grows
(`_rescale`). It moves (an exact shift of the sums, K's in a form without first-order terms) to m_p - m_q
when the policy's maximum grows so far that everything summed so far weighs < 2^-6 of the new maximum's
term (a confident token after the first block: its log-ratio is then the row's), and when q^'s largest
value would leave 2^(+-RECENTRE) (maxima drifting > 11 T nats apart, rows far from the reference).
Measured on the CPU interpreter (fp32 arithmetic, 2026-12-03), relative error of KL: near the reference
2e-7 (`scripts/kernel_demo.sh`: bf16, reference + 0.05 noise, T = 0.7; in 2,048-column blocks as on a GPU,
1.8e-7) against 1150% for the textbook formula; at delta = 1e-5 in 1,024-column blocks 8e-6; confident
rows whose top token comes after the first block (p_top 0.96-0.9999) 1e-6 to 1.4e-5; far from the
reference eager's accuracy (a confident policy against a near-uniform reference, fp32: 1e-7 at vocabulary
151,936, where the second-order formula alone gave 1e-3). Before 2026-12-03 (centre on the moving maxima,
shifted at first order) those were 2e-5, 1.5e-5, 9e-3, 5e-4 and 1e-3.

Forward: ONE read of both logits tensors (N*V*(bytes_x + bytes_y)); writes KL and four fp32 row stats.
Backward (to the policy logits only; the reference is frozen): one more read of both, one write of
dx (N*V*(bytes_x + bytes_y + bytes_x)):
    dKL/dx_j = p_j (log p_j - log q_j - KL) / T = p_j (w_j - E_p[w]) / T,   w_j = ((x_j - y_j) - c) / T
(the per-row constants cancel; c is the forward's final centre, so w is its d). E_p[w] = M/s is summed in
the forward from the same w_j the backward recomputes, bit for bit, so for a confident row (p_j -> 1) their
rounding cancels as it does in eager autograd; using the forward's KL instead would leave an O(eps |log p/q|)
error, and a centre that moved with the maxima an O(eps |shift|) one (the rare re-centring above costs that).
Differences are taken on the raw logits (x_j - m_p, x_j - y_j: exact or nearly so) and only then scaled,
so neither a large common offset nor near-equal logits lose precision.
Masked rows (mask == 0) read nothing and give 0 and 0 gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    acc_dtype,
    aligned_share,
    as_rows,
    bwd_layout,
    check_logits,
    check_same_device,
    check_shape,
    check_temperature,
    grad_rows,
    num_warps_for,
    nvtx_range,
    row_blocks,
    row_layout,
    tl_dtype,
    use_triton,
    vocab_splits,
    zero_fill,
)
from ._series import SERIES_D, SERIES_EPS, expm1_neg_series, h_series, k3_series

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
RECENTRE = tl.constexpr(16.0)  # log2 of how far q^'s largest value may stray from 1 before the centre moves


@triton.jit
def _rescale(s, D, K, M, Q, mp_old, mp_new, c_old, c_new, inv_t):
    """Move (s, D, K, M, Q) from the policy maximum mp_old and centre c_old to mp_new and c_new. p~ is scaled
    by a = e^((mp_old - mp_new)/T), every d_j shifted by g = (c_old - c_new)/T, and q^ = p~ e^-d scaled by
    b = a e^-g:
        s' = a s,  D' = a (D + Q expm1(-g)),  K' = a (K + s k3(g) + D expm1(-g)),  M' = a (M + g s),  Q' = b Q
    K's shift in its k3 form (= a (K + g s + Q expm1(-g)), as Q = s + D) adds second-order terms only, so it
    rounds at their size, not at g s's. a expm1(-g) = b - a and a k3(g) = a (g - 1) + b stay finite where a
    underflows and e^-g would overflow. g = 0 (the centre kept) is a pure scaling by a: one rounding a sum."""
    a = tl.exp2((mp_old - mp_new) * (inv_t * LOG2E))
    g = (c_old - c_new) * inv_t
    b = tl.exp2(((mp_old - mp_new) - (c_old - c_new)) * (inv_t * LOG2E))
    small = tl.abs(g) < SERIES_D
    a_em1 = tl.where(small, a * expm1_neg_series(g), b - a)  # a * expm1(-g)
    a_k3 = tl.where(small, a * k3_series(g), (a * g - a) + b)  # a * k3(g)
    return a * s, a * D + Q * a_em1, (a * K + s * a_k3) + D * a_em1, a * (M + g * s), b * Q


@triton.jit
def _group_sum(v, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, G: tl.constexpr):
    """(BLOCK_R, BLOCK_V) -> (BLOCK_R, BLOCK_V // G): sums of G adjacent columns."""
    return tl.sum(tl.reshape(v, [BLOCK_R, BLOCK_V // G, G]), 2)


@triton.jit
def _kl_step(x, y, mp, mq, c, s, D, K, M, Q, inv_t, scale, FIRST: tl.constexpr, BLOCK_R: tl.constexpr,
             BLOCK_V: tl.constexpr, G: tl.constexpr):  # fmt: skip
    """One (BLOCK_R, BLOCK_V) block of policy and reference logits (ACC, -inf where masked) into the running
    maxima (mp, mq), the centre c and the partial sums (s, D, K, M, Q: (BLOCK_R, BLOCK_V // G)); FIRST: the
    row's first block, which sets the centre (peeled off the loops, whose code stays without that pass)."""
    bm_p, bm_q = tl.split(tl.max(tl.join(x, y), 1))  # both block maxima in one reduction
    mp_new = tl.maximum(mp, bm_p)  # -inf until the row has had a finite logit
    mq_new = tl.maximum(mq, bm_q)
    mp_c = tl.where(mp_new == -float("inf"), 0.0, mp_new)  # 0 until then (the sums are 0): no inf - inf
    mq_c = tl.where(mq_new == -float("inf"), 0.0, mq_new)
    # The centre c. In the row's first block, the difference of its log-normalisers, T log(sum e^(x/T) /
    # sum e^(y/T)) (one more pass over that block: a q-weighted mean of its log-ratios, where the two maxima's
    # difference alone can be far off, and K/s and h(eps) cancel by the square of that). Later it moves to
    # m_p - m_q when the policy's maximum grows so far that the sums so far weigh < 2^-6 of the new maximum's
    # own term (a confident token after the first block, whose log-ratio that is: the old centre would be
    # off by it); moving rounds M by eps |g| of those sums only, and K and D at second order. And to m_p - m_q
    # when q^'s largest value, 2^((m_q - m_p + c) log2(e)/T), would leave 2^(+-RECENTRE).
    c_new = tl.where(tl.abs((mq_c - mp_c + c) * scale) > RECENTRE, mp_c - mq_c, c)
    if FIRST:  # no sums to move yet
        s1 = tl.sum(tl.exp2((x - mp_c[:, None]) * scale), 1)
        q1 = tl.sum(tl.exp2((y - mq_c[:, None]) * scale), 1)
        both = (s1 > 0) & (q1 > 0)  # else a side has nothing finite yet: the maxima's difference
        c_new = (mp_c - mq_c) + tl.where(both, (tl.log2(s1) - tl.log2(q1)) * (LN2 / inv_t), 0.0)
    else:
        grew = mp_new != mp
        if tl.max((grew | (c_new != c)).to(tl.int32), 0) != 0:  # rare after the first blocks
            mp_old = tl.where(mp == -float("inf"), mp_c, mp)
            old = tl.sum(s, 1) * tl.exp2((mp_old - mp_c) * scale)  # the sums' weight at the new maximum
            c_new = tl.where(grew & (old <= 0.015625), mp_c - mq_c, c_new)
            c = tl.where(old == 0, c_new, c)  # no sums yet (a first block all -inf): nothing to move
            s, D, K, M, Q = _rescale(
                s, D, K, M, Q, mp_old[:, None], mp_c[:, None], c[:, None], c_new[:, None], inv_t
            )
    mp = mp_new
    mq = mq_new
    c = c_new

    pt = tl.exp2((x - mp_c[:, None]) * scale)  # p~
    # q^ = p~ e^-d = 2^((y - m_q + g) log2(e)/T), g = m_q - m_p + c: the logits' own difference y - m_q (exact)
    # and a small per-row g, never y - (m_p - c), which would round y to eps |y| (logits near -100: 1e-5)
    qt = tl.exp2((y - mq_c[:, None]) * scale + ((mq_c - mp_c + c) * scale)[:, None])
    # d against the centre c, which moves only in the rare case above: M = sum p~ d is then summed from the
    # very d_j the backward recomputes (as w), so for a confident row (p~ -> 1 at one token) E_p[d] and that
    # token's d cancel to the bit, as in eager autograd
    d = ((x - y) - c[:, None]) * inv_t  # x - y: exact for close logits
    small = tl.abs(d) < SERIES_D
    # one polynomial per element: expm1(-d) = k3(d) - d, and k3 << |d| there, so no cancellation
    k3d = k3_series(d)
    pd = tl.where(pt > 0, pt * d, 0.0)  # p~ d; d may be infinite where p~ underflows to 0
    d_term = tl.where(small, pt * (k3d - d), qt - pt)
    k_term = tl.where(small, pt * k3d, pd + (qt - pt))
    s += _group_sum(pt, BLOCK_R, BLOCK_V, G)
    M += _group_sum(pd, BLOCK_R, BLOCK_V, G)
    # lanes with p~ = q^ = 0 (padding, a -inf in both) give 0 without a guard: d is NaN there, so `small`
    # is false and q^ - p~ = 0, and `pd` is guarded
    D += _group_sum(d_term, BLOCK_R, BLOCK_V, G)
    K += _group_sum(k_term, BLOCK_R, BLOCK_V, G)
    Q += _group_sum(qt, BLOCK_R, BLOCK_V, G)
    return mp, mq, c, s, D, K, M, Q


@triton.jit
def _full_kl_fwd(
    x_ptr,  # (A, B, V) policy logits, any float; row r at a*sxa + b*sxb; vocab stride 1
    y_ptr,  # (A, B, V) reference logits, any float; row r at a*sya + b*syb; vocab stride 1
    mask_ptr,  # (N,) bool, read when HAS_MASK
    kl_ptr,  # (N,) fp32 out
    stats_ptr,  # (4, N) fp32 out: [m_p, c, log2 s, E_p[d]] for the backward
    N,
    V,
    B,
    sxa,
    sxb,
    sya,
    syb,
    temperature,
    HAS_MASK: tl.constexpr,
    UNIT_T: tl.constexpr,  # temperature == 1: no multiplications by 1 / T (2 instructions per element)
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    G: tl.constexpr,  # columns per partial sum (`fwd_tiles`)
    ALIGN: tl.constexpr,  # > 0: blocks on the 16-byte grid of memory, whole ones unmasked (`fwd_tiles`)
    STAGES: tl.constexpr,  # the whole-block loop's pipelining depth: 1 plain loads, k > 1 Triton's pipeliner
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    row_in = rows < N
    active = row_in
    if HAS_MASK:
        active = active & (tl.load(mask_ptr + rows, mask=row_in, other=0) != 0)
    a_idx = rows // B
    b_idx = rows % B
    x_off = a_idx * sxa + b_idx * sxb
    y_off = a_idx * sya + b_idx * syb
    inv_t = 1.0 if UNIT_T else 1.0 / tl.cast(temperature, ACC)
    scale = LOG2E * inv_t

    mp = tl.full([BLOCK_R], -float("inf"), ACC)
    mq = tl.full([BLOCK_R], -float("inf"), ACC)
    # the four sums stay partial, one per G-column group (G = a thread's 16-byte load, so the partial sums need
    # no cross-thread reduction; BLOCK_V where the loads are scalar, `row_layout`) until the row ends: per
    # block only the two maxima are reduced
    s = tl.zeros([BLOCK_R, BLOCK_V // G], ACC)
    D = tl.zeros([BLOCK_R, BLOCK_V // G], ACC)
    K = tl.zeros([BLOCK_R, BLOCK_V // G], ACC)
    M = tl.zeros([BLOCK_R, BLOCK_V // G], ACC)  # sum p~_j d_j: E_p[d] for the backward and the first order
    Q = tl.zeros([BLOCK_R, BLOCK_V // G], ACC)  # sum q^_j (= D + s, without that sum's cancellation)
    c = tl.zeros([BLOCK_R], ACC)  # d's centre (see _kl_step)
    cols = tl.arange(0, BLOCK_V)
    if ALIGN > 0:  # blocks on memory's 16-byte grid (`fwd_tiles`: both rows start equally far into theirs)
        lead = x_off % ALIGN  # (1,)
        xp = x_ptr + tl.multiple_of(x_off - lead, ALIGN)  # (1,) pointers to the rows' 16-byte groups
        yp = y_ptr + tl.multiple_of(y_off - lead, ALIGN)
        end = V + lead  # the row's end, in columns from its 16-byte group
        n_blocks = tl.max(tl.where(active, tl.cdiv(end, BLOCK_V), 0), 0)  # scalars; 0: an inactive row
        n_whole = tl.max(tl.where(active, end // BLOCK_V, 0), 0)
        if n_blocks > 0:  # the first block, from the 16 bytes the row starts in
            ok = (cols[None, :] >= lead[:, None]) & (cols[None, :] < end[:, None])
            x = tl.load(xp[:, None] + cols[None, :], mask=ok, other=-float("inf")).to(ACC)
            y = tl.load(yp[:, None] + cols[None, :], mask=ok, other=-float("inf")).to(ACC)
            mp, mq, c, s, D, K, M, Q = _kl_step(
                x, y, mp, mq, c, s, D, K, M, Q, inv_t, scale, True, BLOCK_R, BLOCK_V, G
            )
        for start in tl.range(BLOCK_V, n_whole * BLOCK_V, BLOCK_V, num_stages=STAGES):  # whole: no mask
            x = tl.load(xp[:, None] + (start + cols)[None, :]).to(ACC)
            y = tl.load(yp[:, None] + (start + cols)[None, :]).to(ACC)
            mp, mq, c, s, D, K, M, Q = _kl_step(
                x, y, mp, mq, c, s, D, K, M, Q, inv_t, scale, False, BLOCK_R, BLOCK_V, G
            )
        for start in range(tl.maximum(n_whole, 1) * BLOCK_V, n_blocks * BLOCK_V, BLOCK_V):  # the last, partial
            ok = (start + cols)[None, :] < end[:, None]
            x = tl.load(xp[:, None] + (start + cols)[None, :], mask=ok, other=-float("inf")).to(ACC)
            y = tl.load(yp[:, None] + (start + cols)[None, :], mask=ok, other=-float("inf")).to(ACC)
            mp, mq, c, s, D, K, M, Q = _kl_step(
                x, y, mp, mq, c, s, D, K, M, Q, inv_t, scale, False, BLOCK_R, BLOCK_V, G
            )
    else:  # every block from column 0 under a mask; the first (FIRST) peeled off the loop
        mask = active[:, None] & (cols[None, :] < V)
        x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=-float("inf")).to(ACC)
        y = tl.load(y_ptr + y_off[:, None] + cols[None, :], mask=mask, other=-float("inf")).to(ACC)
        mp, mq, c, s, D, K, M, Q = _kl_step(x, y, mp, mq, c, s, D, K, M, Q, inv_t, scale, True, BLOCK_R, BLOCK_V, G)
        for start in tl.range(BLOCK_V, V, BLOCK_V, num_stages=STAGES):
            mask = active[:, None] & ((start + cols)[None, :] < V)
            x = tl.load(x_ptr + x_off[:, None] + (start + cols)[None, :], mask=mask, other=-float("inf")).to(ACC)
            y = tl.load(y_ptr + y_off[:, None] + (start + cols)[None, :], mask=mask, other=-float("inf")).to(ACC)
            mp, mq, c, s, D, K, M, Q = _kl_step(
                x, y, mp, mq, c, s, D, K, M, Q, inv_t, scale, False, BLOCK_R, BLOCK_V, G
            )
    s = tl.sum(s, 1)
    D = tl.sum(D, 1)
    K = tl.sum(K, 1)
    M = tl.sum(M, 1)
    Q = tl.sum(Q, 1)

    # Two exact formulas (module docstring), with eps = D/s = Q/s - 1 and h(e) = e - log(1 + e):
    #   second order  KL = K/s - h(eps)           both terms >= 0 and O(d^2): relative accuracy near pi_ref
    #   first order   KL = M/s + log(1 + eps)     = E_p[d] + log(Q/s), the textbook formula
    # The second order's two terms cancel where the normalisers differ far more than the centre allows for
    # (Q >> s: a confident policy against a near-uniform reference, Q/s ~ V, both terms ~V); there the first
    # order's terms are no larger than the log-ratios, as in eager. log(1 + eps) = log(Q/s): from eps while
    # 1 + eps >= 1/2 (eps keeps its relative accuracy), below from the sums of positive terms Q and s, where
    # 1 + eps would cancel (Q << s: a near-uniform policy against a confident reference).
    eps = D / s
    log_r = tl.where(eps < -0.5, tl.log(Q) - tl.log(s), tl.log(1.0 + eps))
    kl_2 = K / s - tl.where(tl.abs(eps) < SERIES_EPS, h_series(eps), eps - log_r)
    kl_1 = M / s + log_r
    kl = tl.where(eps > 1.0, kl_1, kl_2)
    tl.store(kl_ptr + rows, tl.where(active, kl, 0.0), mask=row_in)
    tl.store(stats_ptr + rows, tl.where(active & (mp > -float("inf")), mp, 0.0), mask=row_in)
    tl.store(stats_ptr + N + rows, tl.where(active, c, 0.0), mask=row_in)
    tl.store(stats_ptr + 2 * N + rows, tl.where(active, tl.log2(s), 0.0), mask=row_in)
    tl.store(stats_ptr + 3 * N + rows, tl.where(active, M / s, 0.0), mask=row_in)


@triton.jit
def _grad_tile(x, y, mp, c, log2_s, mean_w, g_kl, scale, inv_t):
    """g_kl dKL/dx = g_kl p (w - E_p[w]) / T for a (BLOCK_R, BLOCK_V) block of policy / reference logits (ACC);
    g_kl carries the 1/T."""
    p = tl.exp2((x - mp[:, None]) * scale - log2_s[:, None])
    w = ((x - y) - c[:, None]) * inv_t  # d, exactly as in the forward
    return tl.where(p > 0, p * (w - mean_w[:, None]), 0.0) * g_kl[:, None]


@triton.jit
def _full_kl_bwd(
    x_ptr,  # (A, B, V) policy logits, as in forward
    y_ptr,  # (A, B, V) reference logits, as in forward
    mask_ptr,  # (N,) bool, read when HAS_MASK
    stats_ptr,  # (4, N) fp32 row stats from forward
    grad_kl_ptr,  # (N,) upstream gradient
    grad_x_ptr,  # (A, B, V) out, policy logits' dtype; strides gxa, gxb, 1
    N,
    V,
    B,
    sxa,
    sxb,
    sya,
    syb,
    gxa,
    gxb,
    temperature,
    cols_per_split,  # vocabulary columns handled by one program along grid axis 1 (a multiple of BLOCK_V)
    HAS_MASK: tl.constexpr,
    UNIT_T: tl.constexpr,  # temperature == 1
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,  # > 0: blocks on memory's 16-byte grid, whole ones unmasked (`_common.aligned_share`)
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < N
    active = row_in
    if HAS_MASK:
        active = active & (tl.load(mask_ptr + rows, mask=row_in, other=0) != 0)
    a_idx = rows // B
    b_idx = rows % B
    x_off = a_idx * sxa + b_idx * sxb
    y_off = a_idx * sya + b_idx * syb
    g_off = a_idx * gxa + b_idx * gxb
    inv_t = 1.0 if UNIT_T else 1.0 / tl.cast(temperature, ACC)
    scale = LOG2E * inv_t

    mp = tl.load(stats_ptr + rows, mask=active, other=0.0).to(ACC)
    c = tl.load(stats_ptr + N + rows, mask=active, other=0.0).to(ACC)
    log2_s = tl.load(stats_ptr + 2 * N + rows, mask=active, other=0.0).to(ACC)
    mean_w = tl.load(stats_ptr + 3 * N + rows, mask=active, other=0.0).to(ACC)
    g_kl = tl.load(grad_kl_ptr + rows, mask=active, other=0.0).to(ACC) * inv_t

    cols = tl.arange(0, BLOCK_V)
    dt = grad_x_ptr.dtype.element_ty
    if ALIGN > 0:  # one row; x, y and gradient rows equally far into their 16 bytes (`_common.row_layout`)
        lead, on, first, lo, hi, last, f0, f1 = aligned_share(x_off, active, V, cols_per_split, ALIGN, BLOCK_V)
        xp = x_ptr + tl.multiple_of(x_off - lead, ALIGN)  # (1,): to the rows' 16-byte groups
        yp = y_ptr + tl.multiple_of(y_off - lead, ALIGN)
        gp = grad_x_ptr + tl.multiple_of(g_off - lead, ALIGN)
        if on:
            if first:  # block 0, from the 16 bytes the row starts in
                ok = (cols[None, :] >= lead[:, None]) & (cols[None, :] < (V + lead)[:, None])
                x = tl.load(xp[:, None] + cols[None, :], mask=ok, other=0.0).to(ACC)
                y = tl.load(yp[:, None] + cols[None, :], mask=ok, other=0.0).to(ACC)
                g = _grad_tile(x, y, mp, c, log2_s, mean_w, g_kl, scale, inv_t)
                tl.store(gp[:, None] + cols[None, :], g.to(dt), mask=ok)
            for start in range(lo, hi, BLOCK_V):  # whole blocks: no mask
                x = tl.load(xp[:, None] + (start + cols)[None, :]).to(ACC)
                y = tl.load(yp[:, None] + (start + cols)[None, :]).to(ACC)
                g = _grad_tile(x, y, mp, c, log2_s, mean_w, g_kl, scale, inv_t)
                tl.store(gp[:, None] + (start + cols)[None, :], g.to(dt))
            if last >= 0:  # the row's last, partial block
                ok = (last + cols)[None, :] < (V + lead)[:, None]
                x = tl.load(xp[:, None] + (last + cols)[None, :], mask=ok, other=0.0).to(ACC)
                y = tl.load(yp[:, None] + (last + cols)[None, :], mask=ok, other=0.0).to(ACC)
                g = _grad_tile(x, y, mp, c, log2_s, mean_w, g_kl, scale, inv_t)
                tl.store(gp[:, None] + (last + cols)[None, :], g.to(dt), mask=ok)
        else:  # a masked row: reads nothing, gradient 0
            zero_fill(gp, lead, V, f0, f1, BLOCK_R, BLOCK_V)
    else:  # blocks from column 0 under a mask
        col_start = tl.program_id(1).to(tl.int64) * cols_per_split
        col_end = tl.minimum(col_start + cols_per_split, V)
        for start in range(col_start, col_end, BLOCK_V):
            in_bounds = row_in[:, None] & ((start + cols)[None, :] < col_end)
            mask = active[:, None] & ((start + cols)[None, :] < col_end)
            x = tl.load(x_ptr + x_off[:, None] + (start + cols)[None, :], mask=mask, other=0.0).to(ACC)
            y = tl.load(y_ptr + y_off[:, None] + (start + cols)[None, :], mask=mask, other=0.0).to(ACC)
            g = tl.where(mask, _grad_tile(x, y, mp, c, log2_s, mean_w, g_kl, scale, inv_t), 0.0)
            tl.store(grad_x_ptr + g_off[:, None] + (start + cols)[None, :], g.to(dt), mask=in_bounds)


# --------------------------------------------------------------------------------------------- launchers
def _forward(logits, ref_logits, mask, temperature):
    """-> kl (N,), stats (4, N), in the accumulation dtype."""
    with nvtx_range("fastrlhf.full_kl.fwd"):
        x, y = as_rows(logits), as_rows(ref_logits)
        A, B, V = x.shape
        N = A * B
        acc = acc_dtype(logits, ref_logits)
        kl = torch.empty(N, dtype=acc, device=logits.device)
        stats = torch.empty((4, N), dtype=acc, device=logits.device)
        tiles = fwd_tiles(x, y)
        _full_kl_fwd[(triton.cdiv(N, tiles["BLOCK_R"]),)](
            x, y, mask if mask is not None else kl, kl, stats,
            N, V, B, x.stride(0), x.stride(1), y.stride(0), y.stride(1), temperature,
            HAS_MASK=mask is not None, UNIT_T=temperature == 1.0, ACC=tl_dtype(acc), **tiles, enable_fp_fusion=True,
        )  # fmt: skip
        return kl, stats


def fwd_tiles(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Every launch option of the forward but the flags, for the (A, B, V) row views `x` (policy) and `y`
    (reference): BLOCK_R and BLOCK_V (`_common.row_blocks`, at most 2,048 columns on CUDA), G and ALIGN
    (`_common.row_layout`), num_warps, STAGES = 1 (plain loads) and a register cap on NVIDIA GPUs.

    The loop is issue-bound on an H100/H200 (39 SASS instructions per element, `benchmarks/tune_rows.py
    --sass`) and the measured kernel issued at 70% of the peak rate with 2 blocks of 8 warps per SM: more
    resident warps to hide the loads' latency behind is the bet. A block of 2,048 columns and 4 warps runs
    16 elements a thread, as 4,096 x 8 warps does, for the same count, and 88 registers fit 5 such blocks
    (20 warps) per SM; uncapped, 3.9 and 3.6 both take 96 here (vocabulary 151,936: also 5 blocks, so the
    cap only bounds other vocabularies and versions; 4,096 x 8: 111-122). At 88 (sm_90, bf16) the loop
    spills nothing under triton 3.9 nor 3.6 (the GPU host's) at vocabularies 151,936 and 50,257; at 80
    (6 blocks) 3.9 spills 24 bytes and reloads them in the loop (3.6 none), at 64 (8 blocks) 3.9 spills 196
    bytes, 3.6 52 (tune_rows' launch at 72110b3, vocabulary 151,936). fp32 logits: 96 registers (5 blocks).
    Only the 16-byte-grid path (ALIGN) is capped, the one counted: the column-0 path (several rows a
    program, views off 16 bytes) would spill more. No cap for fp64 (gradcheck) nor on ROCm, whose Triton
    has no such option. Not timed on a GPU: tune_rows times this beside 64 and 80 registers, 4,096 x 8
    warps capped at 80 and uncapped, and pipelined loops."""
    A, B, V = x.shape
    block_r, block_v = row_blocks(A * B, V, x.device, max_tile=2048 if x.device.type == "cuda" else None)
    layout = row_layout(block_r, block_v, x, y)
    size = max(x.element_size(), y.element_size())
    capped = layout["ALIGN"] and size <= 4 and torch.version.hip is None
    return {"BLOCK_R": block_r, "BLOCK_V": block_v, **layout, "num_warps": num_warps_for(block_r * block_v),
            "STAGES": 1, **({"maxnreg": 88 if size == 2 else 96} if capped else {})}  # fmt: skip


def _backward(logits, ref_logits, mask, stats, grad_kl, temperature, like_logits=True):
    """-> grad of the policy logits, laid out as they are where that is cheap (`_common.grad_rows`;
    like_logits=False: contiguous)."""
    with nvtx_range("fastrlhf.full_kl.bwd"):
        x, y = as_rows(logits), as_rows(ref_logits)
        A, B, V = x.shape
        N = A * B
        grad = grad_rows(x, like_logits)
        block_r, block_v = row_blocks(N, V, logits.device)
        layout = bwd_layout(block_r, block_v, x, y, grad)
        align = layout["ALIGN"]
        cols = V + max(align - 1, 0)  # on the 16-byte grid a row spans up to ALIGN - 1 more columns
        n_row_programs = triton.cdiv(N, block_r)
        splits = vocab_splits(n_row_programs, triton.cdiv(cols, block_v), logits.device)
        cols_per_split = triton.cdiv(triton.cdiv(cols, splits), block_v) * block_v
        _full_kl_bwd[(n_row_programs, triton.cdiv(cols, cols_per_split))](
            x, y, mask if mask is not None else stats, stats, grad_kl.reshape(N).contiguous(), grad,
            N, V, B, x.stride(0), x.stride(1), y.stride(0), y.stride(1), grad.stride(0), grad.stride(1),
            temperature, cols_per_split,
            HAS_MASK=mask is not None, UNIT_T=temperature == 1.0, ACC=tl_dtype(stats.dtype),
            BLOCK_R=block_r, BLOCK_V=block_v, **layout, num_warps=num_warps_for(block_r * block_v),
            enable_fp_fusion=True,
        )  # fmt: skip
        return grad.view(logits.shape)


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, mask, temperature):
        kl, stats = _forward(logits, ref_logits, mask, temperature)
        ctx.save_for_backward(logits, ref_logits, mask, stats)
        ctx.temperature = temperature
        return kl.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, mask, stats = ctx.saved_tensors
        return _backward(logits, ref_logits, mask, stats, grad_kl, ctx.temperature), None, None, None


# ------------------------------------------------------------------------------------------- public API
def _check_inputs(logits, ref_logits, temperature, mask):
    check_logits("logits", logits)
    check_logits("ref_logits", ref_logits)
    check_shape("ref_logits", ref_logits, logits.shape, "logits")
    check_same_device(logits=logits, ref_logits=ref_logits, mask=mask)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype.is_floating_point or mask.is_complex():
            raise TypeError(f"mask must be a bool or integer tensor, got {getattr(mask, 'dtype', type(mask))}")
        check_shape("mask", mask, logits.shape[:-1], f"logits {tuple(logits.shape)} without its vocab dim")
    return check_temperature(temperature)


def full_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact per-token KL(pi || pi_ref) = sum_v p_v log(p_v / q_v) with p = softmax(logits / T),
    q = softmax(ref_logits / T), in one streaming pass and without materialising either log-softmax.

    Args:
        logits: (..., V) policy logits, fp16/bf16/fp32 (fp64 computes in fp64); vocabulary stride 1.
        ref_logits: (..., V) reference logits, same shape, any float dtype. Treated as frozen: no
            gradient flows to it.
        temperature: > 0, applied to both inside the kernel.
        mask: optional (...) bool/int; positions where it is 0 give 0 and 0 gradient and read nothing.
    Returns:
        (...) fp32 KL, >= 0 up to rounding, accurate relative to its own size even when pi ~ pi_ref.
    """
    temperature = _check_inputs(logits, ref_logits, temperature, mask)
    if not use_triton(logits):
        return full_kl_ref(logits, ref_logits, temperature=temperature, mask=mask)
    mask_rows = None if mask is None else mask.reshape(-1).to(torch.bool)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _FullKL.apply(logits, ref_logits.detach(), mask_rows, temperature)
    kl, _ = _forward(logits, ref_logits, mask_rows, temperature)
    return kl.view(logits.shape[:-1])


def full_kl_ref(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch twin of `full_kl` (fp32 internally, fp64 for fp64 inputs; the reference is
    detached). The textbook formula: materialises both (..., V) log-softmaxes."""
    temperature = _check_inputs(logits, ref_logits, temperature, mask)
    acc = acc_dtype(logits, ref_logits)
    log_p = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    log_q = torch.log_softmax(ref_logits.detach().to(acc) / temperature, dim=-1)
    p = log_p.exp()
    # 0 log(0/q) = 0 with the difference kept out of the product: where(p > 0, p * (log_p - log_q), 0) gives
    # NaN gradients where both are -inf (a vocabulary masked in both), as where's unused branch still
    # back-propagates 0 * NaN
    kl = (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)
    return kl if mask is None else torch.where(mask.bool(), kl, 0.0)
