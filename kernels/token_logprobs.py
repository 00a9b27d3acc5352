"""Per-token log-probabilities (and entropy) straight from logits: a fused log-softmax + gather.

Math, per row (one token position) with logits x in R^V, target t, temperature T:
    z = x / T,   lse = log sum_j exp(z_j),   logp = z_t - lse,   H = lse - sum_j p_j z_j,  p = softmax(z)
We work in base 2: exp(z_j - z_max) = 2^((x_j - x_max) * log2(e) / T). The running max is kept on the
raw logits, so x_j - x_max is exact and only that (small) difference is scaled and rounded: an offset of
-60 on every logit costs no precision (scaling x first would round each logit to eps * 60 * log2(e)).

Forward: ONE streaming read of the logits (N*V*bytes), online max / sum-exp / entropy sums in fp32,
writes logp, optionally H, and two row statistics (max, log2 sum) (N*4 bytes each; with H, H once more
as a third, which the backward reads, so the returned H is the caller's). Nothing [N, V].
Backward: recomputes p from the saved fp32 row statistics; reads the logits once and writes their
gradient once (2*N*V*bytes):
    d logp / dx_j = (1[j=t] - p_j) / T          d H / dx_j = -p_j (log p_j + H) / T
Rounding: logits are upcast to fp32 on load (fp64 inputs compute in fp64, for gradcheck); outputs are
fp32; the gradient is rounded once, to the logits' dtype, when stored.

Rows whose target equals `ignore_index` read nothing and give 0 outputs and 0 gradients. A target
outside [0, V) gives a NaN log-prob (and NaN gradients) and never reads out of bounds; NaN logits give
NaN outputs. Both are left for the caller to catch without a host sync.
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
    row_layout,
    temperature_scale,
    tl_dtype,
    use_triton,
    vocab_splits,
    zero_fill,
)

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _lse_step(
    x, m, s, w, scale, COMPUTE_ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr, NG: tl.constexpr, G: tl.constexpr
):
    """One (BLOCK_R, BLOCK_V) block of logits (ACC, -inf where masked) into the running (m, s, w) of its
    (BLOCK_R, NG) column groups of G."""
    x = tl.reshape(x, [BLOCK_R, NG, G])
    m_new = tl.maximum(m, tl.max(x, 2))
    c = tl.where(m_new == -float("inf"), 0.0, m_new)  # the centre: nothing finite yet keeps inf - inf away
    shift = (tl.where(m == -float("inf"), c, m) - c) * scale  # <= 0
    alpha = tl.exp2(shift)
    y = (x - c[:, :, None]) * scale  # (BLOCK_R, NG, G)
    e = tl.exp2(y)
    if COMPUTE_ENTROPY:
        w = alpha * (w + shift * s) + tl.sum(tl.where(e > 0, e * y, 0.0), 2)
    return m_new, s * alpha + tl.sum(e, 2), w


@triton.jit
def online_lse(
    logits_ptr,
    row_off,
    active,
    V,
    scale,
    COMPUTE_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    G: tl.constexpr,
    ALIGN: tl.constexpr,
    STAGES: tl.constexpr,
):
    """The one streaming pass over BLOCK_R rows of logits (row_off: int64 offsets, active: rows to read).
    -> m (max of the raw logits; 0 for a row with nothing finite), s = sum_j 2^y_j, w = sum_j 2^y_j * y_j
    (0 unless COMPUTE_ENTROPY), with y_j = (x_j - m) * scale <= 0; each (BLOCK_R,) in ACC. Shared with
    ppo_head.py.

    Every group of G adjacent columns (G = one thread's 16-byte load) keeps its own running max and sums, so
    the loop has no cross-thread reduction -- no shuffle, no barrier, and nothing that makes a warp wait for
    the others between two loads; the groups are merged once, at the row's end. A group holds m = -inf
    until it sees a finite logit (its sums are 0 until then).

    ALIGN > 0 (one row per program, the logits on 16 bytes: `fwd_tiles`): the blocks sit on memory's
    16-byte grid, not on column 0 -- the first starts up to ALIGN - 1 columns before the row (masked), the
    whole blocks after it load with no mask at all, as 16-byte vectors whatever the vocabulary (GPT-2's
    50,257 included), and the last is masked again. An inactive row reads and computes nothing.
    ALIGN = 0: every block from column 0 under a mask (several rows per program); vectors only where
    Triton can prove them (`_common.load_group`: else G = BLOCK_V, the classic block-wide pass).
    STAGES > 1 hands the whole-block loop (ALIGN > 0; else the one loop) to Triton's software pipeliner
    (`tl.range(num_stages=)`: the next STAGES - 1 blocks copied to shared memory while one computes)."""
    NG: tl.constexpr = BLOCK_V // G
    m = tl.full([BLOCK_R, NG], -float("inf"), ACC)
    s = tl.zeros([BLOCK_R, NG], ACC)
    w = tl.zeros([BLOCK_R, NG], ACC)
    cols = tl.arange(0, BLOCK_V)
    if ALIGN > 0:
        lead = row_off % ALIGN  # (1,): the row's columns start this far into a 16-byte group
        ptr = logits_ptr + tl.multiple_of(row_off - lead, ALIGN)  # (1,): to the row's 16-byte group
        end = V + lead  # the row's end, in columns from its 16-byte group
        n_blocks = tl.max(tl.where(active, tl.cdiv(end, BLOCK_V), 0), 0)  # scalars; 0: an inactive row
        n_whole = tl.max(tl.where(active, end // BLOCK_V, 0), 0)
        if n_blocks > 0:  # the first block, from the 16 bytes the row starts in
            ok = (cols[None, :] >= lead[:, None]) & (cols[None, :] < end[:, None])
            x = tl.load(ptr[:, None] + cols[None, :], mask=ok, other=-float("inf")).to(ACC)
            m, s, w = _lse_step(x, m, s, w, scale, COMPUTE_ENTROPY, BLOCK_R, NG, G)
        for start in tl.range(BLOCK_V, n_whole * BLOCK_V, BLOCK_V, num_stages=STAGES):  # whole: no mask
            x = tl.load(ptr[:, None] + (start + cols)[None, :]).to(ACC)
            m, s, w = _lse_step(x, m, s, w, scale, COMPUTE_ENTROPY, BLOCK_R, NG, G)
        for start in range(tl.maximum(n_whole, 1) * BLOCK_V, n_blocks * BLOCK_V, BLOCK_V):  # the last, partial
            ok = (start + cols)[None, :] < end[:, None]
            x = tl.load(ptr[:, None] + (start + cols)[None, :], mask=ok, other=-float("inf")).to(ACC)
            m, s, w = _lse_step(x, m, s, w, scale, COMPUTE_ENTROPY, BLOCK_R, NG, G)
    else:
        for start in tl.range(0, V, BLOCK_V, num_stages=STAGES):
            mask = active[:, None] & ((start + cols)[None, :] < V)
            x = tl.load(logits_ptr + row_off[:, None] + (start + cols)[None, :], mask=mask, other=-float("inf"))
            m, s, w = _lse_step(x.to(ACC), m, s, w, scale, COMPUTE_ENTROPY, BLOCK_R, NG, G)
    # merge the groups at the row's max (the same rescale as above, once)
    m_row = tl.max(m, 1)
    c_row = tl.where(m_row == -float("inf"), 0.0, m_row)
    shift = (tl.where(m == -float("inf"), c_row[:, None], m) - c_row[:, None]) * scale
    alpha = tl.exp2(shift)
    if COMPUTE_ENTROPY:
        w = alpha * (w + shift * s)
    return c_row, tl.sum(s * alpha, 1), tl.sum(w, 1)


@triton.jit
def _token_logprobs_fwd(
    logits_ptr,  # (A, B, V) any float; row r = a*B + b at a*stride_a + b*stride_b; vocab stride 1
    targets_ptr,  # (N,) int, N = A*B
    logp_ptr,  # (N,) fp32 out
    ent_ptr,  # (N,) fp32 out, written when COMPUTE_ENTROPY
    stats_ptr,  # (2, N) fp32 out: [max_j x_j, log2 sum_j 2^((x_j - max) log2(e)/T)], for the backward;
    # (3, N) when COMPUTE_ENTROPY, row 2 the entropy again: the backward reads it there, so the returned
    # entropy is the caller's to modify in place
    N,
    V,
    B,
    stride_a,
    stride_b,
    temperature,
    ignore_index,
    COMPUTE_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32 (tl.float64 for fp64 inputs)
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    G: tl.constexpr,  # columns per partial max/sum in the loop (online_lse, `fwd_tiles`)
    ALIGN: tl.constexpr,  # > 0: blocks on the 16-byte grid of memory (online_lse)
    STAGES: tl.constexpr,  # the loop's pipelining depth (online_lse)
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    row_in = rows < N
    tgt = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
    active = row_in & (tgt != ignore_index)  # ignored rows read nothing
    row_off = (rows // B) * stride_a + (rows % B) * stride_b  # int64
    _, scale = temperature_scale(temperature, ACC)

    m, s, w = online_lse(
        logits_ptr, row_off, active, V, scale, COMPUTE_ENTROPY, ACC, BLOCK_R, BLOCK_V, G, ALIGN, STAGES
    )
    log2_s = tl.log2(s)
    tgt_ok = active & (tgt >= 0) & (tgt < V)
    x_t = tl.load(logits_ptr + row_off + tgt, mask=tgt_ok, other=0.0).to(ACC)
    logp = ((x_t - m) * scale - log2_s) * LN2
    logp = tl.where(tgt_ok, logp, tl.where(active, float("nan"), 0.0))
    tl.store(logp_ptr + rows, logp, mask=row_in)
    tl.store(stats_ptr + rows, tl.where(active, m, 0.0), mask=row_in)
    tl.store(stats_ptr + N + rows, tl.where(active, log2_s, 0.0), mask=row_in)
    if COMPUTE_ENTROPY:
        ent = (log2_s - div_rn(w, s)) * LN2
        ent = tl.where(active, ent, 0.0)
        tl.store(ent_ptr + rows, ent, mask=row_in)
        tl.store(stats_ptr + 2 * N + rows, ent, mask=row_in)


@triton.jit
def _is_col(cols, col, start):
    """(BLOCK_R, BLOCK_V) mask of column `col` (BLOCK_R,) int64 in the block of `cols` (int32 arange) starting
    at `start`: one 32-bit compare per element instead of 64-bit index arithmetic."""
    rel = col - start
    rel = tl.where((rel >= 0) & (rel < cols.shape[0]), rel, -1).to(tl.int32)
    return cols[None, :] == rel[:, None]


@triton.jit
def _grad_tile(
    x, is_tgt, m, log2_s, g_lp, g_h, ent, scale, inv_t, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr
):
    """d(g_lp . logp + g_h . H)/dx for a (BLOCK_R, BLOCK_V) block of logits x (ACC); is_tgt marks the target."""
    y = (x - m[:, None]) * scale - log2_s[:, None]  # log2 p_j
    p = tl.exp2(y)  # softmax(x / T), recomputed in fp32
    g = -p * g_lp[:, None]
    if HAS_GRAD_LOGP:
        g += tl.where(is_tgt, g_lp[:, None], 0.0)
    if HAS_GRAD_ENT:
        g -= tl.where(p > 0, p * (y * LN2 + ent[:, None]), 0.0) * g_h[:, None]
    return g * inv_t


@triton.jit
def _grad_pass(
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
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """A backward program's share of its rows' gradient (`_grad_tile` per block), shared with ppo_head.py:
    on memory's 16-byte grid (ALIGN > 0, `_common.aligned_share`) or from column 0 under a mask."""
    cols = tl.arange(0, BLOCK_V)
    dt = grad_logits_ptr.dtype.element_ty
    if ALIGN > 0:  # one row; logits and gradient rows equally far into their 16 bytes (`_common.row_layout`)
        lead, on, first, lo, hi, last, f0, f1 = aligned_share(row_off, active, V, cols_per_split, ALIGN, BLOCK_V)
        xp = logits_ptr + tl.multiple_of(row_off - lead, ALIGN)  # (1,): to the row's 16-byte group
        gp = grad_logits_ptr + tl.multiple_of(grad_off - lead, ALIGN)
        t_f = tgt + lead  # the target's column counted from there
        if on:
            if first:  # block 0, from the 16 bytes the row starts in
                ok = (cols[None, :] >= lead[:, None]) & (cols[None, :] < (V + lead)[:, None])
                x = tl.load(xp[:, None] + cols[None, :], mask=ok, other=0.0).to(ACC)
                g = _grad_tile(
                    x, _is_col(cols, t_f, 0), m, log2_s, g_lp, g_h, ent, scale, inv_t, HAS_GRAD_LOGP, HAS_GRAD_ENT
                )
                tl.store(gp[:, None] + cols[None, :], g.to(dt), mask=ok)
            for start in range(lo, hi, BLOCK_V):  # whole blocks: no mask
                x = tl.load(xp[:, None] + (start + cols)[None, :]).to(ACC)
                g = _grad_tile(
                    x, _is_col(cols, t_f, start), m, log2_s, g_lp, g_h, ent, scale, inv_t, HAS_GRAD_LOGP, HAS_GRAD_ENT
                )
                tl.store(gp[:, None] + (start + cols)[None, :], g.to(dt))
            if last >= 0:  # the row's last, partial block
                ok = (last + cols)[None, :] < (V + lead)[:, None]
                x = tl.load(xp[:, None] + (last + cols)[None, :], mask=ok, other=0.0).to(ACC)
                g = _grad_tile(
                    x, _is_col(cols, t_f, last), m, log2_s, g_lp, g_h, ent, scale, inv_t, HAS_GRAD_LOGP, HAS_GRAD_ENT
                )
                tl.store(gp[:, None] + (last + cols)[None, :], g.to(dt), mask=ok)
        else:  # an ignored row: reads nothing, gradient 0
            zero_fill(gp, lead, V, f0, f1, BLOCK_R, BLOCK_V)
    else:  # blocks from column 0 under a mask
        col_start = tl.program_id(1).to(tl.int64) * cols_per_split
        col_end = tl.minimum(col_start + cols_per_split, V)
        for start in range(col_start, col_end, BLOCK_V):
            in_bounds = row_in[:, None] & ((start + cols)[None, :] < col_end)
            mask = active[:, None] & ((start + cols)[None, :] < col_end)
            x = tl.load(logits_ptr + row_off[:, None] + (start + cols)[None, :], mask=mask, other=0.0).to(ACC)
            g = _grad_tile(
                x, _is_col(cols, tgt, start), m, log2_s, g_lp, g_h, ent, scale, inv_t, HAS_GRAD_LOGP, HAS_GRAD_ENT
            )
            g = tl.where(mask, g, 0.0)
            tl.store(grad_logits_ptr + grad_off[:, None] + (start + cols)[None, :], g.to(dt), mask=in_bounds)


@triton.jit
def _token_logprobs_bwd(
    logits_ptr,  # (A, B, V) any float, as in forward
    targets_ptr,  # (N,) int
    stats_ptr,  # (2, N) fp32 row statistics from forward: max, log2 sum
    ent_ptr,  # (N,) fp32 entropy from forward (read when HAS_GRAD_ENT): row 2 of its (3, N) statistics
    grad_logp_ptr,  # (N,) upstream gradient of logp (read when HAS_GRAD_LOGP)
    grad_ent_ptr,  # (N,) upstream gradient of entropy (read when HAS_GRAD_ENT)
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
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENT: tl.constexpr,
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
    g_lp = tl.zeros([BLOCK_R], ACC)
    g_h = tl.zeros([BLOCK_R], ACC)
    ent = tl.zeros([BLOCK_R], ACC)
    if HAS_GRAD_LOGP:
        g_lp = tl.load(grad_logp_ptr + rows, mask=active, other=0.0).to(ACC)
        g_lp = tl.where(tgt_ok | ~active, g_lp, float("nan"))  # bad target id: NaN gradient, like logp
    if HAS_GRAD_ENT:
        g_h = tl.load(grad_ent_ptr + rows, mask=active, other=0.0).to(ACC)
        ent = tl.load(ent_ptr + rows, mask=active, other=0.0).to(ACC)

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
        HAS_GRAD_LOGP,
        HAS_GRAD_ENT,
        ACC,
        BLOCK_R,
        BLOCK_V,
        ALIGN,
    )


# --------------------------------------------------------------------------------------------- launchers
def _forward(logits, targets, temperature, ignore_index, return_entropy):
    """logits (..., V), targets (...) -> logp (...), entropy (...) or None, stats (2, N), or (3, N) with the
    entropy as row 2 (acc dtype). logp and entropy are fresh tensors, not views: autograd lets a caller
    modify a custom Function's outputs in place only when they are not views."""
    with kernel_range("fastrlhf.token_logprobs.fwd"):
        x = as_rows(logits)  # (A, B, V)
        A, B, V = x.shape
        N = A * B
        acc = acc_dtype(logits)
        tgt = targets.reshape(N)
        lead = logits.shape[:-1]
        logp = torch.empty(lead, dtype=acc, device=logits.device)  # contiguous: row i at offset i
        ent = torch.empty(lead, dtype=acc, device=logits.device) if return_entropy else None
        stats = torch.empty((3 if return_entropy else 2, N), dtype=acc, device=logits.device)
        tiles = fwd_tiles(x)
        _token_logprobs_fwd[(triton.cdiv(N, tiles["BLOCK_R"]),)](
            x,
            tgt,
            logp,
            ent if ent is not None else logp,
            stats,
            N,
            V,
            B,
            x.stride(0),
            x.stride(1),
            temperature,
            ignore_index,
            COMPUTE_ENTROPY=return_entropy,
            ACC=tl_dtype(acc),
            **tiles,
            enable_fp_fusion=True,
        )
        return logp, ent, stats


def fwd_tiles(x: torch.Tensor) -> dict:
    """Every launch option of a forward pass through `online_lse` over the (A, B, V) row view `x` (this
    module's and ppo_head's) but the flags: BLOCK_R and BLOCK_V (`_common.row_blocks`), G and ALIGN
    (`_common.row_layout`), num_warps, and STAGES = 1, plain loads. On sm_90 pipelining costs an instruction
    per element (8.1 -> 9.1, with a barrier pair per block) and only the GPU can say what it buys:
    `benchmarks/tools/tune_rows.py` times both."""
    A, B, V = x.shape
    block_r, block_v = row_blocks(A * B, V, x.device)
    return {
        "BLOCK_R": block_r,
        "BLOCK_V": block_v,
        **row_layout(block_r, block_v, x),
        "num_warps": num_warps_for(block_r * block_v),
        "STAGES": 1,
    }


def _backward(logits, targets, stats, ent, grad_logp, grad_ent, temperature, ignore_index, like_logits=True):
    """-> grad_logits with logits' shape and dtype, laid out as the logits are where that is cheap
    (`_common.grad_rows`; like_logits=False: contiguous)."""
    with kernel_range("fastrlhf.token_logprobs.bwd"):
        x = as_rows(logits)
        A, B, V = x.shape
        N = A * B
        grad = grad_rows(x, like_logits)
        block_r, block_v = row_blocks(N, V, logits.device)
        layout = bwd_layout(block_r, block_v, x, grad)
        align = layout["ALIGN"]
        cols = V + max(align - 1, 0)  # on the 16-byte grid a row spans up to ALIGN - 1 more columns
        n_row_programs = triton.cdiv(N, block_r)
        splits = vocab_splits(n_row_programs, triton.cdiv(cols, block_v), logits.device)
        cols_per_split = triton.cdiv(triton.cdiv(cols, splits), block_v) * block_v
        splits = triton.cdiv(cols, cols_per_split)
        dummy = stats
        _token_logprobs_bwd[(n_row_programs, splits)](
            x,
            targets.reshape(N),
            stats,
            ent if ent is not None else dummy,
            grad_logp.reshape(N).contiguous() if grad_logp is not None else dummy,  # .sum() gives stride 0
            grad_ent.reshape(N).contiguous() if grad_ent is not None else dummy,
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
            HAS_GRAD_LOGP=grad_logp is not None,
            HAS_GRAD_ENT=grad_ent is not None,
            ACC=tl_dtype(stats.dtype),
            BLOCK_R=block_r,
            BLOCK_V=block_v,
            **layout,
            num_warps=num_warps_for(block_r * block_v),
            enable_fp_fusion=True,
        )
        return grad.view(logits.shape)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, return_entropy):
        logp, ent, stats = _forward(logits, targets, temperature, ignore_index, return_entropy)
        # per-row stats only (the entropy among them); logits are the input. No output is saved, so a caller
        # may modify both in place before calling backward.
        ctx.save_for_backward(logits, targets, stats)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        logits, targets, stats = ctx.saved_tensors
        ent = stats[2] if stats.shape[0] == 3 else None
        grad = _backward(
            logits,
            targets,
            stats,
            ent,
            grad_logp,
            grad_ent if ent is not None else None,
            ctx.temperature,
            ctx.ignore_index,
        )
        return grad, None, None, None, None


# ------------------------------------------------------------------------------------------- public API
def _check_inputs(logits, targets, temperature):
    check_logits("logits", logits)
    check_int("targets", targets)
    check_same_device(logits=logits, targets=targets)
    check_shape("targets", targets, logits.shape[:-1], f"logits {tuple(logits.shape)} without its vocab dim")
    return check_temperature(temperature)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Log-probability of each target token under softmax(logits / temperature), and optionally the
    entropy of that distribution, without materialising a log-softmax.

    Args:
        logits: (..., V) fp16/bf16/fp32 (fp64 computes in fp64); vocabulary stride 1; leading dims may be
            a strided view such as `logits[:, :-1]`.
        targets: (...) integer token ids; `ignore_index` marks positions to skip.
        temperature: > 0, applied inside the kernel in fp32 (the caller's logits are never modified).
        return_entropy: also return the entropy of softmax(logits / temperature).
    Returns:
        logp (...) fp32, or (logp, entropy), both (...) fp32. Ignored positions are 0; a target id
        outside [0, V) or NaN logits give NaN at that position. Fresh contiguous tensors (no views, nothing
        the backward reads): a caller may modify them in place, with or without grad. Under torch.compile
        this runs `fastrlhf.kernels.ops.token_logprobs`, the same kernels as one traceable op.
    """
    if torch.compiler.is_compiling():  # the traceable op: Dynamo cannot trace a Triton launcher
        from . import ops

        return ops.token_logprobs(
            logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    temperature = _check_inputs(logits, targets, temperature)
    if not use_triton(logits):
        return token_logprobs_ref(
            logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenLogprobs.apply(logits, targets, temperature, int(ignore_index), bool(return_entropy))
    logp, ent, _ = _forward(logits, targets, temperature, int(ignore_index), bool(return_entropy))
    return (logp, ent) if return_entropy else logp


def token_logprobs_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Pure-PyTorch twin of `token_logprobs` (fp32 internally, fp64 for fp64 inputs): the spec, the CPU
    fallback, the test oracle and the eager benchmark baseline. Materialises (..., V) fp32."""
    temperature = _check_inputs(logits, targets, temperature)
    acc = acc_dtype(logits)
    log_p = torch.log_softmax(logits.to(acc) / temperature, dim=-1)  # (..., V)
    V = logits.shape[-1]
    active = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)
    safe = torch.where(in_range, targets, 0).long()
    logp = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(active, torch.where(in_range, logp, float("nan")), 0.0)
    if not return_entropy:
        return logp
    p = log_p.exp()
    # 0 log 0 = 0, with the -inf kept out of the product: where(p > 0, p * log_p, 0) would give the whole row
    # NaN gradients at a -inf logit (a masked vocabulary), as where's unused branch still back-propagates 0 * inf
    ent = -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)
    return logp, torch.where(active, ent, 0.0)
