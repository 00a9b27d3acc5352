"""Per-token KL(pi || pi_ref) over the whole vocabulary, from two logits tensors in one streaming pass.

Per row, with policy logits x, reference logits y, temperature T, p = softmax(x/T), q = softmax(y/T):
    KL = sum_j p_j (log p_j - log q_j)
The textbook E_p[x - y]/T - lse(x/T) + lse(y/T) cancels two O(1) numbers to an O(delta^2) result, so fp32
loses every digit when pi ~ pi_ref (the usual case in PPO). The kernel instead accumulates second-order sums
about a per-row centre E, with lam = log2(e)/T, p~_j = 2^((x_j - m_p) lam), t_j = (x_j - y_j) lam - E:
    s = sum p~,  Q = sum q^,  M = sum p~ t,  K = sum p~ k3(t ln 2),  k3(d) = d - 1 + e^-d
and finishes per row with KL = K/s - h(D/s) (second order) or M ln2/s + log(1 + D/s) (first order, where the
second would cancel), D = K - M ln 2, h(e) = e - log(1 + e). The derivation, the centre's rules and the
measured accuracy are in docs/precision.md ("full_kl").

Forward: ONE read of both logits tensors (N*V*(bytes_x + bytes_y)); writes KL and four fp32 row stats.
Backward (to the policy logits only; the reference is frozen): one more read of both, one write of dx:
    dKL/dx_j = p_j (t_j - E_p[t]) ln 2 / T,   E_p[t] = M/s from the forward, recomputed bit for bit
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
    div_rn,
    grad_rows,
    load_whole,
    num_warps_for,
    kernel_range,
    row_blocks,
    row_layout,
    temperature_scale,
    tl_dtype,
    use_triton,
    vocab_splits,
    zero_fill,
)
from ._series import SERIES_D, SERIES_EPS, SERIES_T, expm1_neg_series, h_series, k3_series, k3_series_base2

LN2 = tl.constexpr(0.6931471805599453)
RECENTRE = tl.constexpr(16.0)  # log2 of how far q^'s largest value may stray from 1 before the centre moves


@triton.jit
def _rescale(s, K, M, Q, da, g2, empty):
    """Move the partial sums (s, K, M, Q) to a new policy maximum and centre. da: the old maximum minus the new
    one as an exp2 argument ((m_p_old - m_p_new) log2(e)/T), g2 = E_old - E_new; (BLOCK_R, 1) each. p~
    scales by a = 2^da, q^ by b = 2^(da - g2) = a e^-g, and every t moves by g2 (d by g = g2 ln 2):
        s' = a s,  K' = a (K + s k3(g) + D expm1(-g)),  M' = a (M + g2 s),  Q' = b Q,   D = K - M ln 2
    K's shift in its k3 form (= a (K + g s + Q expm1(-g)), as Q = s + D) adds second-order terms only, so it
    rounds at their size, not at g s's. a expm1(-g) = b - a and a k3(g) = a (g - 1) + b stay finite where a
    underflows and e^-g would overflow. g = 0 (the centre kept) is a pure scaling by a: one rounding a sum.
    `empty`: rows without a finite policy logit yet, where s = M = 0 and K = Q = sum q^ to the bit (a may
    overflow there): K' = Q' = b Q. An empty Q stays 0 (b may overflow)."""
    a = tl.exp2(da)
    b = tl.exp2(da - g2)
    g = g2 * LN2
    small = tl.abs(g) < SERIES_D
    a_em1 = tl.where(small, a * expm1_neg_series(g), b - a)  # a * expm1(-g)
    a_k3 = tl.where(small, a * k3_series(g), (a * g - a) + b)  # a * k3(g)
    bQ = tl.where(Q == 0, 0.0, b * Q)
    K = tl.where(empty, bQ, (a * K + s * a_k3) + (K - M * LN2) * a_em1)
    M = tl.where(empty, 0.0, a * (M + g2 * s))
    return tl.where(empty, 0.0, a * s), K, M, bQ


@triton.jit
def _group_sum(v, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, G: tl.constexpr):
    """(BLOCK_R, BLOCK_V) -> (BLOCK_R, BLOCK_V // G): sums of G adjacent columns."""
    return tl.sum(tl.reshape(v, [BLOCK_R, BLOCK_V // G, G]), 2)


@triton.jit
def _log_ratio(x, y, scale, E):
    """t = (x - y) log2(e)/T - E = log2(p/q) up to a per-row constant, for a block (x, y: (BLOCK_R, BLOCK_V),
    ACC; E: (BLOCK_R,)): x - y is exact for close logits, then one rounding. The forward's M and the
    backward's gradient take this very value, bit for bit."""
    return tl.fma(x - y, scale, -E[:, None])


@triton.jit
def _kl_step(
    x,
    y,
    mp,
    mq,
    E,
    s,
    K,
    M,
    Q,
    scale,
    FIRST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    G: tl.constexpr,
):
    """One (BLOCK_R, BLOCK_V) block of policy and reference logits (ACC, -inf where masked) into the running
    maxima (mp, mq), the centre E ((BLOCK_R,) each) and the partial sums (s, K, M, Q: (BLOCK_R, BLOCK_V // G));
    FIRST: the row's first block, which sets the centre (peeled off the loops, whose code stays without that
    pass)."""
    bm_p, bm_q = tl.split(tl.max(tl.join(x, y), 1))  # both block maxima in one reduction
    # The centre E of t. In the row's first block, the difference of its base-2 log-normalisers,
    # log2(sum 2^(x lam) / sum 2^(y lam)) over it, lam = `scale` (one more pass over that block: a q-weighted
    # mean of its log-ratios, where the two maxima's difference alone can be far off, and K/s and h(eps)
    # cancel by the square of that). Later it moves to (m_p - m_q) lam when the policy's maximum grows so far
    # that the sums so far weigh < 2^-6 of the new maximum's own term (a confident token after the first
    # block, whose log-ratio that is: the old centre would be off by it); moving rounds M by eps |g| of those
    # sums only, and K at second order. And to (m_p - m_q) lam when q^'s largest value, 2^((m_q - m_p) lam + E),
    # would leave 2^(+-RECENTRE). All of that can change only when a maximum grows: the loop's blocks where
    # neither does (nearly all, after the first few) run none of it.
    if FIRST:  # no sums to move yet
        mp = tl.maximum(mp, bm_p)  # -inf until the row has had a finite logit
        mq = tl.maximum(mq, bm_q)
        mp_c = tl.where(mp == -float("inf"), 0.0, mp)
        mq_c = tl.where(mq == -float("inf"), 0.0, mq)
        s1 = tl.sum(tl.exp2((x - mp_c[:, None]) * scale), 1)
        q1 = tl.sum(tl.exp2((y - mq_c[:, None]) * scale), 1)
        both = (s1 > 0) & (q1 > 0)  # else a side has nothing finite yet: the maxima's difference
        E = (mp_c - mq_c) * scale + tl.where(both, tl.log2(s1) - tl.log2(q1), 0.0)
    elif tl.max(((bm_p > mp) | (bm_q > mq)).to(tl.int32), 0) != 0:  # rare after the first blocks
        mp_new = tl.maximum(mp, bm_p)
        mq_new = tl.maximum(mq, bm_q)
        mp_c = tl.where(mp_new == -float("inf"), 0.0, mp_new)  # 0 until finite (the sums are 0): no inf - inf
        mq_c = tl.where(mq_new == -float("inf"), 0.0, mq_new)
        E_new = tl.where(tl.abs(tl.fma(mq_c - mp_c, scale, E)) > RECENTRE, (mp_c - mq_c) * scale, E)
        empty = mp == -float("inf")  # no finite policy logit before this block: its sums used m_p = 0
        da = (tl.where(empty, 0.0, mp) - mp_c) * scale
        old = tl.where(empty, 0.0, tl.sum(s, 1) * tl.exp2(da))  # the sums' weight at the new maximum
        E_new = tl.where((mp_new != mp) & (old <= 0.015625), (mp_c - mq_c) * scale, E_new)
        # a no-op, bit for bit, where only m_q grew and E stays (a = 1, g = 0)
        s, K, M, Q = _rescale(s, K, M, Q, da[:, None], (E - E_new)[:, None], empty[:, None])
        mp = mp_new
        mq = mq_new
        E = E_new
    mp_c = tl.where(mp == -float("inf"), 0.0, mp)
    mq_c = tl.where(mq == -float("inf"), 0.0, mq)

    pt = tl.exp2((x - mp_c[:, None]) * scale)  # p~: exactly 1 at the maximum (see M below)
    # q^ = p~ 2^-t = 2^((y - m_q) lam + g), g = (m_q - m_p) lam + E: the logits' own difference y - m_q (exact)
    # and a small per-row g (one rounding), never y - m_p + E / lam, which would round y to eps |y| (logits near
    # -100: 1e-5); g's rounding is a mismatch of q^ and p~ 2^-t, which K's terms beyond the series take
    qt = tl.exp2(tl.fma(y - mq_c[:, None], scale, tl.fma(mq_c - mp_c, scale, E)[:, None]))
    # t against the centre E, which moves only in the rare case above: M = sum p~ t is then summed from the
    # very t_j the backward recomputes, so for a confident row (p~ = 1 at one token, the rest negligible) E_p[t]
    # and that token's t cancel to the bit, as in eager autograd
    t = _log_ratio(x, y, scale, E)
    pt_t = tl.where(pt > 0, pt * t, 0.0)  # t may be infinite where p~ underflows to 0
    # p~ k3(d), d = t ln 2: the series where |d| < 0.5, else p~ d + q^ - p~, which no longer cancels there.
    # Lanes with p~ = q^ = 0 (padding, a -inf in both) give 0 without a guard: t is NaN there (second branch)
    k_term = tl.where(tl.abs(t) < SERIES_T, pt_t * k3_series_base2(t), tl.fma(pt_t, LN2, qt - pt))
    s += _group_sum(pt, BLOCK_R, BLOCK_V, G)
    M += _group_sum(pt_t, BLOCK_R, BLOCK_V, G)
    K += _group_sum(k_term, BLOCK_R, BLOCK_V, G)
    Q += _group_sum(qt, BLOCK_R, BLOCK_V, G)
    return mp, mq, E, s, K, M, Q


@triton.jit
def _full_kl_fwd(
    x_ptr,  # (A, B, V) policy logits, any float; row r at a*sxa + b*sxb; vocab stride 1
    y_ptr,  # (A, B, V) reference logits, any float; row r at a*sya + b*syb; vocab stride 1
    mask_ptr,  # (N,) bool, read when HAS_MASK
    kl_ptr,  # (N,) fp32 out
    stats_ptr,  # (4, N) fp32 out: [m_p, E, log2 s, E_p[t]] for the backward
    N,
    V,
    B,
    sxa,
    sxb,
    sya,
    syb,
    temperature,
    HAS_MASK: tl.constexpr,
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
    _, scale = temperature_scale(temperature, ACC)  # logits -> exp2 arguments, as the backward's to the bit

    mp = tl.full([BLOCK_R], -float("inf"), ACC)
    mq = tl.full([BLOCK_R], -float("inf"), ACC)
    # the four sums stay partial, one per G-column group (G = a thread's 16-byte load, so the partial sums need
    # no cross-thread reduction; BLOCK_V where the loads are scalar, `row_layout`) until the row ends: per
    # block only the two maxima are reduced
    s = tl.zeros([BLOCK_R, BLOCK_V // G], ACC)
    K = tl.zeros([BLOCK_R, BLOCK_V // G], ACC)
    M = tl.zeros([BLOCK_R, BLOCK_V // G], ACC)  # sum p~_j t_j: E_p[t] for the backward and the first order
    Q = tl.zeros([BLOCK_R, BLOCK_V // G], ACC)  # sum q^_j (= s + K - M ln 2, without that sum's cancellation)
    E = tl.zeros([BLOCK_R], ACC)  # t's centre (see _kl_step)
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
            mp, mq, E, s, K, M, Q = _kl_step(x, y, mp, mq, E, s, K, M, Q, scale, True, BLOCK_R, BLOCK_V, G)
        for start in tl.range(BLOCK_V, n_whole * BLOCK_V, BLOCK_V, num_stages=STAGES):  # whole: no mask
            x = load_whole(xp + start, BLOCK_R, BLOCK_V, ACC)
            y = load_whole(yp + start, BLOCK_R, BLOCK_V, ACC)
            mp, mq, E, s, K, M, Q = _kl_step(x, y, mp, mq, E, s, K, M, Q, scale, False, BLOCK_R, BLOCK_V, G)
        for start in range(tl.maximum(n_whole, 1) * BLOCK_V, n_blocks * BLOCK_V, BLOCK_V):  # the last, partial
            ok = (start + cols)[None, :] < end[:, None]
            x = tl.load(xp[:, None] + (start + cols)[None, :], mask=ok, other=-float("inf")).to(ACC)
            y = tl.load(yp[:, None] + (start + cols)[None, :], mask=ok, other=-float("inf")).to(ACC)
            mp, mq, E, s, K, M, Q = _kl_step(x, y, mp, mq, E, s, K, M, Q, scale, False, BLOCK_R, BLOCK_V, G)
    else:  # every block from column 0 under a mask; the first (FIRST) peeled off the loop
        mask = active[:, None] & (cols[None, :] < V)
        x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=-float("inf")).to(ACC)
        y = tl.load(y_ptr + y_off[:, None] + cols[None, :], mask=mask, other=-float("inf")).to(ACC)
        mp, mq, E, s, K, M, Q = _kl_step(x, y, mp, mq, E, s, K, M, Q, scale, True, BLOCK_R, BLOCK_V, G)
        for start in tl.range(BLOCK_V, V, BLOCK_V, num_stages=STAGES):
            mask = active[:, None] & ((start + cols)[None, :] < V)
            x = tl.load(x_ptr + x_off[:, None] + (start + cols)[None, :], mask=mask, other=-float("inf")).to(ACC)
            y = tl.load(y_ptr + y_off[:, None] + (start + cols)[None, :], mask=mask, other=-float("inf")).to(ACC)
            mp, mq, E, s, K, M, Q = _kl_step(x, y, mp, mq, E, s, K, M, Q, scale, False, BLOCK_R, BLOCK_V, G)
    s = tl.sum(s, 1)
    K = tl.sum(K, 1)
    M = tl.sum(M, 1)  # sum p~ t
    mean_t = div_rn(M, s)  # correctly rounded, as every division here (see _common)
    M = M * LN2  # sum p~ d
    Q = tl.sum(Q, 1)

    # Two exact formulas (module docstring), with eps = D/s = Q/s - 1, D = K - M, and h(e) = e - log(1 + e):
    #   second order  KL = K/s - h(eps)           both terms >= 0 and O(d^2): relative accuracy near pi_ref
    #   first order   KL = M/s + log(1 + eps)     = E_p[d] + log(Q/s), the textbook formula
    # The second order's two terms cancel where the normalisers differ far more than the centre allows for
    # (Q >> s: a confident policy against a near-uniform reference, Q/s ~ V, both terms ~V); there the first
    # order's terms are no larger than the log-ratios, as in eager. log(1 + eps) = log(Q/s): from eps while
    # 1 + eps >= 1/2 (eps keeps its relative accuracy), below from the sums of positive terms Q and s, where
    # 1 + eps would cancel (Q << s: a near-uniform policy against a confident reference).
    eps = div_rn(K - M, s)
    log_r = tl.where(eps < -0.5, tl.log(Q) - tl.log(s), tl.log(1.0 + eps))
    kl_2 = div_rn(K, s) - tl.where(tl.abs(eps) < SERIES_EPS, h_series(eps), eps - log_r)
    kl_1 = div_rn(M, s) + log_r
    kl = tl.where(eps > 1.0, kl_1, kl_2)
    kl = tl.where(K == float("inf"), K, kl)  # p > 0 where q = 0 (a -inf reference logit): K - M is inf - inf
    kl = tl.where(kl < 0.0, 0.0, kl)  # KL >= 0: rounding below 0 is off by less than that (t's last rounding
    # leaves a vocabulary of 1 with t ~ 1e-7 where its KL is 0: -3e-23)
    tl.store(kl_ptr + rows, tl.where(active, kl, 0.0), mask=row_in)
    tl.store(stats_ptr + rows, tl.where(active & (mp > -float("inf")), mp, 0.0), mask=row_in)
    tl.store(stats_ptr + N + rows, tl.where(active, E, 0.0), mask=row_in)
    tl.store(stats_ptr + 2 * N + rows, tl.where(active, tl.log2(s), 0.0), mask=row_in)
    tl.store(stats_ptr + 3 * N + rows, tl.where(active, mean_t, 0.0), mask=row_in)


@triton.jit
def _grad_tile(x, y, mp, E, log2_s, mean_t, g_kl, scale):
    """g_kl dKL/dx = g_kl p (t - E_p[t]) ln 2 / T for a (BLOCK_R, BLOCK_V) block of policy / reference logits
    (ACC); g_kl carries the ln 2 / T."""
    p = tl.exp2((x - mp[:, None]) * scale - log2_s[:, None])
    t = _log_ratio(x, y, scale, E)  # exactly as in the forward
    return tl.where(p > 0, p * (t - mean_t[:, None]), 0.0) * g_kl[:, None]


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
    inv_t, scale = temperature_scale(temperature, ACC)

    mp = tl.load(stats_ptr + rows, mask=active, other=0.0).to(ACC)
    E = tl.load(stats_ptr + N + rows, mask=active, other=0.0).to(ACC)
    log2_s = tl.load(stats_ptr + 2 * N + rows, mask=active, other=0.0).to(ACC)
    mean_t = tl.load(stats_ptr + 3 * N + rows, mask=active, other=0.0).to(ACC)
    g_kl = tl.load(grad_kl_ptr + rows, mask=active, other=0.0).to(ACC) * (inv_t * LN2)

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
                g = _grad_tile(x, y, mp, E, log2_s, mean_t, g_kl, scale)
                tl.store(gp[:, None] + cols[None, :], g.to(dt), mask=ok)
            for start in range(lo, hi, BLOCK_V):  # whole blocks: no mask
                x = tl.load(xp[:, None] + (start + cols)[None, :]).to(ACC)
                y = tl.load(yp[:, None] + (start + cols)[None, :]).to(ACC)
                g = _grad_tile(x, y, mp, E, log2_s, mean_t, g_kl, scale)
                tl.store(gp[:, None] + (start + cols)[None, :], g.to(dt))
            if last >= 0:  # the row's last, partial block
                ok = (last + cols)[None, :] < (V + lead)[:, None]
                x = tl.load(xp[:, None] + (last + cols)[None, :], mask=ok, other=0.0).to(ACC)
                y = tl.load(yp[:, None] + (last + cols)[None, :], mask=ok, other=0.0).to(ACC)
                g = _grad_tile(x, y, mp, E, log2_s, mean_t, g_kl, scale)
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
            g = tl.where(mask, _grad_tile(x, y, mp, E, log2_s, mean_t, g_kl, scale), 0.0)
            tl.store(grad_x_ptr + g_off[:, None] + (start + cols)[None, :], g.to(dt), mask=in_bounds)


# --------------------------------------------------------------------------------------------- launchers
def _forward(logits, ref_logits, mask, temperature):
    """-> kl (...) (a fresh tensor, not a view: the caller may modify it in place), stats (4, N), in the
    accumulation dtype."""
    with kernel_range("fastrlhf.full_kl.fwd"):
        x, y = as_rows(logits), as_rows(ref_logits)
        A, B, V = x.shape
        N = A * B
        acc = acc_dtype(logits, ref_logits)
        kl = torch.empty(logits.shape[:-1], dtype=acc, device=logits.device)  # contiguous: row i at offset i
        stats = torch.empty((4, N), dtype=acc, device=logits.device)
        tiles = fwd_tiles(x, y)
        _full_kl_fwd[(triton.cdiv(N, tiles["BLOCK_R"]),)](
            x,
            y,
            mask if mask is not None else kl,
            kl,
            stats,
            N,
            V,
            B,
            x.stride(0),
            x.stride(1),
            y.stride(0),
            y.stride(1),
            temperature,
            HAS_MASK=mask is not None,
            ACC=tl_dtype(acc),
            **tiles,
            enable_fp_fusion=True,
        )
        return kl, stats


def fwd_tiles(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Every launch option of the forward but the flags, for the (A, B, V) row views `x` (policy) and `y`
    (reference): BLOCK_R and BLOCK_V (`_common.row_blocks`, at most 2,048 columns on CUDA), G and ALIGN
    (`_common.row_layout`), num_warps, STAGES = 1 (plain loads) and a register cap on NVIDIA GPUs.

    The loop is issue-bound on an H100/H200 (33 SASS instructions per element, `benchmarks/tools/tune_rows.py
    --sass`): more resident warps to hide the loads' latency behind is the bet. A block of 2,048 columns and
    4 warps runs 16 elements a thread, as 4,096 x 8 warps does, for the same count, and 80 registers fit 6
    such blocks (24 warps) per SM with no spill in the loop (sm_90, bf16; results/2026-12-03-sm90-sass).
    fp32 logits: 96 registers (5 blocks). Only the 16-byte-grid path (ALIGN)
    is capped, the one counted: the column-0 path (several rows a program, views off 16 bytes) would spill
    more. No cap for fp64 (gradcheck) nor on ROCm, whose Triton has no such option. Not timed on a GPU:
    tune_rows times this beside 64 and 88 registers, 4,096 x 8 warps capped at 80 and uncapped, pipelined
    loops and one warp a row (512 columns: no barrier in the loop)."""
    A, B, V = x.shape
    block_r, block_v = row_blocks(A * B, V, x.device, max_tile=2048 if x.device.type == "cuda" else None)
    layout = row_layout(block_r, block_v, x, y)
    size = max(x.element_size(), y.element_size())
    capped = layout["ALIGN"] and size <= 4 and torch.version.hip is None
    return {
        "BLOCK_R": block_r,
        "BLOCK_V": block_v,
        **layout,
        "num_warps": num_warps_for(block_r * block_v),
        "STAGES": 1,
        **({"maxnreg": 80 if size == 2 else 96} if capped else {}),
    }


def _backward(logits, ref_logits, mask, stats, grad_kl, temperature, like_logits=True):
    """-> grad of the policy logits, laid out as they are where that is cheap (`_common.grad_rows`;
    like_logits=False: contiguous)."""
    with kernel_range("fastrlhf.full_kl.bwd"):
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
            x,
            y,
            mask if mask is not None else stats,
            stats,
            grad_kl.reshape(N).contiguous(),
            grad,
            N,
            V,
            B,
            x.stride(0),
            x.stride(1),
            y.stride(0),
            y.stride(1),
            grad.stride(0),
            grad.stride(1),
            temperature,
            cols_per_split,
            HAS_MASK=mask is not None,
            ACC=tl_dtype(stats.dtype),
            BLOCK_R=block_r,
            BLOCK_V=block_v,
            **layout,
            num_warps=num_warps_for(block_r * block_v),
            enable_fp_fusion=True,
        )
        return grad.view(logits.shape)


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, mask, temperature):
        kl, stats = _forward(logits, ref_logits, mask, temperature)
        ctx.save_for_backward(logits, ref_logits, mask, stats)
        ctx.temperature = temperature
        return kl

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
    logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None
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
        (...) fp32 KL, >= 0 up to rounding, accurate relative to its own size even when pi ~ pi_ref. A fresh
        tensor (not a view), safe to modify in place. Under torch.compile this runs `ops.full_kl`.
    """
    if torch.compiler.is_compiling():  # the traceable op: Dynamo cannot trace a Triton launcher
        from . import ops

        return ops.full_kl(logits, ref_logits, temperature=temperature, mask=mask)
    temperature = _check_inputs(logits, ref_logits, temperature, mask)
    if not use_triton(logits):
        return full_kl_ref(logits, ref_logits, temperature=temperature, mask=mask)
    mask_rows = None if mask is None else mask.reshape(-1).to(torch.bool)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _FullKL.apply(logits, ref_logits.detach(), mask_rows, temperature)
    return _forward(logits, ref_logits, mask_rows, temperature)[0]


def full_kl_ref(
    logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None
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
