"""Per-token log-probabilities (and entropy) straight from hidden states and the LM head, and the
whole-vocabulary KL between a policy head and a reference head, never materialising [N, V] logits.

Math, per row (token position) with hidden state h in R^H, head W in R^(V x H), bias b, target t, temperature T:
    z = W h + b,  p = softmax(z/T),  lse = log sum_j e^(z_j/T),  logp = z_t/T - lse,  H = lse - sum_j p_j z_j/T
in base 2 as in token_logprobs.py, the running max kept on the raw fp32 logits. For the KL, p and q come from
(h, W, b) and (h_ref, W_ref, b_ref); with d_j = log p_j - log q_j and k3(d) = d - 1 + e^-d
    KL = sum_j p_j k3(d_j)   (= sum_j p_j d_j, since sum_j q_j - p_j = 0)
Every term is >= 0 and second order in d (series for |d| < 0.5, see full_kl.py), so near-equal heads keep
relative accuracy, and an error c in the two log-normalisers moves KL only at O(c^2).

Grid: row blocks of BLOCK_M on axis 0 (int64 offsets), the vocabulary on axis 1. A (BLOCK_M, BLOCK_V) logits
tile is a tl.dot loop over H in BLOCK_H steps into an fp32 accumulator; the epilogue works on that fp32 tile,
which is never rounded nor stored. The floor here is FLOPs (2NVH per matmul), not bytes.
- linear_logprobs forward, 1 matmul: axis 1 cuts the vocabulary into S ranges so short batches fill the GPU;
  each program keeps online (max, sum 2^y, sum 2^y y, target logit) over its range and writes them to a
  (4, S, N) fp32 buffer (16NS bytes), merged by a few torch ops on [S, N] (the online update's rescaling).
  Reads hidden S times and W once per row block (N/BLOCK_M times, mostly from L2).
- linear_full_kl forward, 4 matmuls: pass 1 is that kernel on each head (row max, log-sum-exp); pass 2
  recomputes both tiles and sums p k3(d) and p d~ per range, d~_j = log(p_j/q_j) + a per-row constant.
- backward, 1 recompute + 2 cuBLAS GEMMs per vocabulary chunk: the chunk's grad_z kernel (one program per
  (row block, vocab tile)) recomputes its tile(s) and forms grad_z from the saved fp32 row statistics,
      d logp/dz_j = (1[j=t] - p_j)/T     d H/dz_j = -p_j (log p_j + H)/T     d KL/dz_j = p_j (d~_j - E_p[d~])/T
  (E_p[d~] from the forward's d~, bit for bit, as in full_kl.py), and stores it into an (N, chunk) buffer
  (at most GRAD_Z_CHUNK_BYTES on CUDA) with its per-row-block column sums (grad_b); then
  grad_hidden += grad_z @ W[chunk] and grad_W[chunk] = grad_z^T @ hidden run as cuBLAS GEMMs with fp32
  output (`_mm_fp32`). Why not the earlier single kernel with fp32 atomic adds of both products: on an H200
  its atomic traffic (each grad_hidden entry added V/BLOCK_V times) made it 5x slower than eager; the GEMMs
  run near the tensor-core rate, need no fp32 (V, H) buffer, and the result is deterministic.
Rounding: hidden and W are read in their dtype; products accumulate in fp32 (fp32 inputs in full fp32, no
TF32, summed in BLOCK_H slices added by TwoSum: logits within ~1 ulp; fp64 inputs in fp64, for gradcheck);
per-token outputs are fp32. The one extra rounding: grad_z is rounded to the input dtype so the gradient GEMMs
run on tensor cores (a no-op for fp32; grad_b sums the unrounded tile); gradients accumulate in fp32 and are
rounded to the parameters' dtypes once, at the end.
Saved for backward: the inputs and fp32 per-row statistics (2 or 4 a row, and the entropy); nothing [N, V].
Rows whose target is `ignore_index` (or whose mask is 0) read nothing and give 0 and 0 gradient; a row block
with none active is skipped. A target outside [0, V) gives a NaN log-prob and a NaN grad_hidden row, and
through the sums over rows NaN in grad_W and grad_b: a non-finite loss for the trainer's guard to stop on,
never an out-of-bounds read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

from ._common import _desc, acc_dtype, as_rows, check_float, check_int, check_same_device, check_shape
from ._common import LOG2E, check_temperature, nvtx_range, temperature_scale, tl_dtype, use_triton, vocab_splits
from ._series import SERIES_D, k3_series
from .full_kl import full_kl_ref
from .token_logprobs import token_logprobs_ref

# Instantiated constexprs: compiled Triton rejects globals merely annotated `x: tl.constexpr = ...` (triton
# PR #5961; seen compiling for sm_90 with 3.9). The interpreter does not check, so CPU tests cannot tell.
LN2 = tl.constexpr(0.6931471805599453)
REF_CHUNK_ROWS = 1024  # rows per chunk in the *_ref twins: their memory is O(REF_CHUNK_ROWS x V) fp32
GRAD_Z_CHUNK_BYTES = 256 << 20  # the backward's (N, chunk) grad_z buffer on CUDA (see _chunk_cols)


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr):
    """acc + a @ b in acc's dtype (fp32; fp64 for fp64), operands cast to DOT_DTYPE; fp32 operands in full fp32.
    The accumulator goes into tl.dot, as the compiler would put it anyway (`acc + tl.dot(a, b)` is rewritten to
    `tl.dot(a, b, acc)`), so the interpreter sums in the compiled order. fp64 (gradcheck only) is a broadcast
    multiply and sum, not tl.dot: Triton 3.6's fp64 MMA asserts "fp64 don't support largeK MMA" for these tiles
    on sm_90 (seen on an H200)."""
    if DOT_DTYPE == tl.float64:
        return acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    elif DOT_DTYPE == tl.float32:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")  # no TF32
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def _rows(active_ptr, N, B, s_ha, s_hb, BLOCK_M: tl.constexpr):
    """This program's rows (int64), in-range and active masks, and the hidden-state offset of each row."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < N
    active = tl.load(active_ptr + rows, mask=row_in, other=0) != 0
    return rows, row_in, active, (rows // B) * s_ha + (rows % B) * s_hb


@triton.jit
def _logits_tile(
    h_ptr,  # (A, B, H) hidden, any float; row offsets row_off, feature stride s_hh
    w_ptr,  # (V, H) head weight, hidden's dtype; strides s_wv, s_wh
    b_ptr,  # (V,) bias, any float, read when HAS_BIAS
    row_off, rows_on, cols, col_end, H, s_hh, s_wv, s_wh, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_V) logits hidden[rows] @ W[cols]^T + b[cols] in ACC, -inf where cols >= col_end.
    Rows not in rows_on read no hidden state; H = 0 skips the matmul.
    fp32 inputs: each BLOCK_H slice's products go into a fresh accumulator (an FMA chain of BLOCK_H), which
    TwoSum adds exactly to a running (acc, lo) pair that starts at the bias: the logits come out within about
    an ulp whatever H. One chain over all of H (tl.dot's accumulator; bf16's tensor cores here) rounds H times
    at the running sum's scale. Cost on sm_90: 7 FADD per element per slice, 112 next to 256 FFMA a thread."""
    col_on = cols < col_end
    acc = tl.zeros([BLOCK_M, BLOCK_V], ACC)
    TWO_SUM: tl.constexpr = h_ptr.dtype.element_ty == tl.float32
    if TWO_SUM and HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_on, other=0.0).to(ACC)[None, :]
    lo = tl.zeros([BLOCK_M, BLOCK_V], ACC)  # TWO_SUM: the rounding errors of the running sum acc
    for k0 in range(0, H, BLOCK_H):
        k = k0 + tl.arange(0, BLOCK_H)
        k_on = k < H
        h = tl.load(h_ptr + row_off[:, None] + k[None, :] * s_hh, mask=rows_on[:, None] & k_on[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * s_wv + k[:, None] * s_wh, mask=col_on[None, :] & k_on[:, None], other=0.0)
        if TWO_SUM:  # acc + part = hi + its rounding error, exactly (Knuth's TwoSum)
            part = _dot(h, w, tl.zeros([BLOCK_M, BLOCK_V], ACC), DOT_DTYPE)
            hi = acc + part
            part_in_hi = hi - acc
            lo += (acc - (hi - part_in_hi)) + (part - part_in_hi)
            acc = hi
        else:
            acc = _dot(h, w, acc, DOT_DTYPE)  # (BLOCK_M, BLOCK_H) @ (BLOCK_H, BLOCK_V)
    if TWO_SUM:
        acc += lo
    elif HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_on, other=0.0).to(ACC)[None, :]
    return tl.where(col_on[None, :], acc, -float("inf"))


@triton.jit
def _store_grad_z(
    g,  # (BLOCK_M, BLOCK_V) grad_z in ACC, 0 outside active rows and valid columns
    gz_ptr,  # (N, chunk) out, hidden's dtype; row stride s_gz; column c holds vocabulary column col0 + c
    gb_ptr,  # (row blocks, chunk) ACC out: grad_z summed over this program's rows (NEED_DB)
    rows, row_in, cols, col0, col_end, s_gz, NEED_DB: tl.constexpr,
):  # fmt: skip
    """Store a grad_z tile for the chunk's cuBLAS products (grad_hidden += gz @ W[chunk], grad_W[chunk] =
    gz^T @ hidden), rounded to the input dtype (the documented rounding: tensor cores; a no-op for fp32),
    and, for grad_b, its unrounded column sums."""
    col_on = cols < col_end
    local = cols - col0
    if NEED_DB:
        tl.store(gb_ptr + tl.program_id(0).to(tl.int64) * s_gz + local, tl.sum(g, 0), mask=col_on)
    mask = row_in[:, None] & col_on[None, :]
    tl.store(gz_ptr + rows[:, None] * s_gz + local[None, :], g.to(gz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_lse_fwd(
    h_ptr,  # (A, B, H) hidden, any float; row r = a*B + b at a*s_ha + b*s_hb; feature stride s_hh
    w_ptr,  # (V, H) head weight, hidden's dtype; strides s_wv, s_wh
    b_ptr,  # (V,) bias, any float, read when HAS_BIAS
    active_ptr,  # (N,) bool: rows to compute
    tgt_ptr,  # (N,) int target ids, read when HAS_TARGETS
    part_ptr,  # (4, S, N) ACC out per vocab range: [max z, sum 2^y, target z or 0, sum 2^y y]; y = (z-max) log2(e)/T
    N, V, B, H, s_ha, s_hb, s_hh, s_wv, s_wh, temperature, cols_per_split,
    HAS_BIAS: tl.constexpr, HAS_TARGETS: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, row_in, active, row_off = _rows(active_ptr, N, B, s_ha, s_hb, BLOCK_M)
    _, scale = temperature_scale(temperature, ACC)
    split = tl.program_id(1).to(tl.int64)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, V)
    col_end = tl.where(tl.max(active.to(tl.int32), 0) > 0, col_end, col_start)  # no active row: read nothing
    tgt = tl.full([BLOCK_M], -1, tl.int64)
    if HAS_TARGETS:
        tgt = tl.load(tgt_ptr + rows, mask=row_in, other=-1).to(tl.int64)

    m = tl.full([BLOCK_M], -float("inf"), ACC)  # running max of the raw logits
    s = tl.zeros([BLOCK_M], ACC)  # sum 2^y
    w = tl.zeros([BLOCK_M], ACC)  # sum 2^y y, entropy only
    z_t = tl.zeros([BLOCK_M], ACC)  # the target's logit, if it falls in this range
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, row_off, active, cols, col_end, H, s_hh, s_wv, s_wh,
                         HAS_BIAS, ACC, DOT_DTYPE, BLOCK_M, BLOCK_V, BLOCK_H)  # fmt: skip
        m_new = tl.maximum(m, tl.max(z, 1))
        m_new = tl.where(m_new == -float("inf"), 0.0, m_new)  # nothing finite yet: keep inf - inf away
        shift = (tl.where(m == -float("inf"), m_new, m) - m_new) * scale  # <= 0
        alpha = tl.exp2(shift)
        y = (z - m_new[:, None]) * scale
        e = tl.exp2(y)
        if COMPUTE_ENTROPY:
            w = alpha * (w + shift * s) + tl.sum(tl.where(e > 0, e * y, 0.0), 1)
        s = s * alpha + tl.sum(e, 1)
        m = m_new
        if HAS_TARGETS:
            z_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)

    out = part_ptr + split * N + rows
    SN = tl.num_programs(1).to(tl.int64) * N
    tl.store(out, tl.where(active, m, 0.0), mask=row_in)
    tl.store(out + SN, tl.where(active, s, 0.0), mask=row_in)
    tl.store(out + 2 * SN, tl.where(active, z_t, 0.0), mask=row_in)
    tl.store(out + 3 * SN, tl.where(active, w, 0.0), mask=row_in)


@triton.jit
def _linear_logprobs_bwd(
    h_ptr, w_ptr, b_ptr,  # (A, B, H), (V, H), (V,): as in _linear_lse_fwd
    active_ptr,  # (N,) bool
    tgt_ptr,  # (N,) int target ids
    stats_ptr,  # (2, N) ACC row statistics from the forward: max z, log2 sum 2^y
    ent_ptr,  # (N,) ACC entropy from the forward, read when HAS_GRAD_ENT
    grad_logp_ptr,  # (N,) upstream gradient of logp, read when HAS_GRAD_LOGP
    grad_ent_ptr,  # (N,) upstream gradient of the entropy, read when HAS_GRAD_ENT
    gz_ptr, gb_ptr,  # (N, chunk), (row blocks, chunk) out, see _store_grad_z
    N, V, B, H, s_ha, s_hb, s_hh, s_wv, s_wh, temperature, col0, col_end, s_gz,
    HAS_BIAS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr, NEED_DB: tl.constexpr,
    ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """grad_z of the vocabulary chunk [col0, col_end): one program per (row block, BLOCK_V tile)."""
    rows, row_in, active, row_off = _rows(active_ptr, N, B, s_ha, s_hb, BLOCK_M)
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

    z = _logits_tile(h_ptr, w_ptr, b_ptr, row_off, active, cols, col_end, h_end, s_hh, s_wv, s_wh,
                     HAS_BIAS, ACC, DOT_DTYPE, BLOCK_M, BLOCK_V, BLOCK_H)  # fmt: skip
    y = (z - m[:, None]) * scale - log2_s[:, None]  # log2 p_j
    p = tl.exp2(y)
    g = -p * g_lp[:, None]
    if HAS_GRAD_LOGP:
        g += tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0)
    if HAS_GRAD_ENT:
        g -= tl.where(p > 0, p * (y * LN2 + ent[:, None]), 0.0) * g_h[:, None]
    g = tl.where(active[:, None] & (cols[None, :] < col_end), g * inv_t, 0.0)
    _store_grad_z(g, gz_ptr, gb_ptr, rows, row_in, cols, col0, col_end, s_gz, NEED_DB)


@triton.jit
def _kl_tiles(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr,  # the two heads, as in _linear_kl_fwd
    row_off, ref_off, active, cols, col_end, H, s_hh, s_wv, s_wh, RH, r_hh, r_wv, r_wh, mp, lsp, mq, inv_t,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    REF_DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Both logits tiles -> p (the policy's softmax), d~ = log(p/q) + a per-row constant, reference logits."""
    x = _logits_tile(h_ptr, w_ptr, b_ptr, row_off, active, cols, col_end, H, s_hh, s_wv, s_wh,
                     HAS_BIAS, ACC, DOT_DTYPE, BLOCK_M, BLOCK_V, BLOCK_H)  # fmt: skip
    y = _logits_tile(rh_ptr, rw_ptr, rb_ptr, ref_off, active, cols, col_end, RH, r_hh, r_wv, r_wh,
                     HAS_REF_BIAS, ACC, REF_DOT_DTYPE, BLOCK_M, BLOCK_V, BLOCK_H)  # fmt: skip
    p = tl.exp2((x - mp[:, None]) * (inv_t * LOG2E) - lsp[:, None])  # temperature_scale's, to the bit
    d_rel = ((x - y) - (mp - mq)[:, None]) * inv_t  # x - y first: nearly exact for near-equal heads
    return p, d_rel, y


@triton.jit
def _linear_kl_fwd(
    h_ptr, w_ptr, b_ptr,  # policy (A, B, H), (V, H), (V,) (HAS_BIAS): as in _linear_lse_fwd
    rh_ptr, rw_ptr, rb_ptr,  # reference (A, B, RH), (V, RH), (V,) (HAS_REF_BIAS); strides r_*
    active_ptr,  # (N,) bool
    stats_ptr,  # (4, N) ACC from pass 1: [max x, log2 sum_p, max y, log2 sum_q]
    part_ptr,  # (2, S, N) ACC out per vocab range: [sum_j p_j k3(d_j), sum_j p_j d~_j]
    N, V, B, H, s_ha, s_hb, s_hh, s_wv, s_wh, RH, r_ha, r_hb, r_hh, r_wv, r_wh, temperature, cols_per_split,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    REF_DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, row_in, active, row_off = _rows(active_ptr, N, B, s_ha, s_hb, BLOCK_M)
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
        p, d_rel, y = _kl_tiles(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, row_off, ref_off, active, cols, col_end,
                                H, s_hh, s_wv, s_wh, RH, r_hh, r_wv, r_wh, mp, lsp, mq, inv_t, HAS_BIAS, HAS_REF_BIAS,
                                ACC, DOT_DTYPE, REF_DOT_DTYPE, BLOCK_M, BLOCK_V, BLOCK_H)  # fmt: skip
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
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr,  # the two heads, as in _linear_kl_fwd
    active_ptr,  # (N,) bool
    stats_ptr,  # (4, N) ACC from the forward: [max x, log2 sum_p, max y, E_p[d~]]
    grad_kl_ptr,  # (N,) upstream gradient
    gz_ptr, gb_ptr,  # (N, chunk), (row blocks, chunk) out, see _store_grad_z
    N, V, B, H, s_ha, s_hb, s_hh, s_wv, s_wh, RH, r_ha, r_hb, r_hh, r_wv, r_wh, temperature, col0, col_end, s_gz,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, NEED_DB: tl.constexpr, ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, REF_DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """The policy's grad_z of the vocabulary chunk [col0, col_end): one program per (row block, tile)."""
    rows, row_in, active, row_off = _rows(active_ptr, N, B, s_ha, s_hb, BLOCK_M)
    ref_off = (rows // B) * r_ha + (rows % B) * r_hb
    cols = col0 + tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    any_active = tl.max(active.to(tl.int32), 0) > 0  # none: read nothing
    inv_t, _ = temperature_scale(temperature, ACC)
    mp = tl.load(stats_ptr + rows, mask=active, other=0.0)
    lsp = tl.load(stats_ptr + N + rows, mask=active, other=0.0)
    mq = tl.load(stats_ptr + 2 * N + rows, mask=active, other=0.0)
    mean_d = tl.load(stats_ptr + 3 * N + rows, mask=active, other=0.0)
    g_kl = tl.load(grad_kl_ptr + rows, mask=active, other=0.0).to(ACC) * inv_t

    p, d_rel, _ = _kl_tiles(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, row_off, ref_off, active, cols, col_end,
                            tl.where(any_active, H, 0), s_hh, s_wv, s_wh, tl.where(any_active, RH, 0), r_hh, r_wv,
                            r_wh, mp, lsp, mq, inv_t, HAS_BIAS, HAS_REF_BIAS, ACC, DOT_DTYPE, REF_DOT_DTYPE,
                            BLOCK_M, BLOCK_V, BLOCK_H)  # fmt: skip
    g = tl.where(p > 0, p * (d_rel - mean_d[:, None]), 0.0) * g_kl[:, None]
    g = tl.where(active[:, None] & (cols[None, :] < col_end), g, 0.0)
    _store_grad_z(g, gz_ptr, gb_ptr, rows, row_in, cols, col0, col_end, s_gz, NEED_DB)


# --------------------------------------------------------------------------------------------- launchers
def _config(dtype: torch.dtype, device: torch.device, one_head: bool = False) -> dict:
    """Block sizes and launch options for inputs of `dtype`; tl.dot needs every block dim >= 16. On CUDA these
    compile for sm_90 (scripts/aot_compile.py, in CI); only the one-head bf16 tiles were tuned on a GPU. The interpreter
    runs each program in Python: there, tiles are larger (fewer programs), yet small enough that the CPU tests
    still cross row blocks, vocab tiles and ranges, and a partial H block; H slices of 16 as fp32 on CUDA, so
    the fp32 logits are summed in the same order as there (tests/gpu_math.py models the dot's FMA chain)."""
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_V=256, BLOCK_H=16)
    if dtype == torch.float64:  # gradcheck only: (BLOCK_M, BLOCK_H, BLOCK_V) products in registers
        return dict(BLOCK_M=16, BLOCK_V=32, BLOCK_H=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # full-fp32 products run on FMA units, not tensor cores: smaller tiles
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_H=16, num_warps=8, num_stages=2)
    if one_head:  # one logits tile a program, then an epilogue: the LSE pass (H200, 8192 x 4096 x 151936,
        # benchmarks/tune_linear.py: 74.5% of matmul, was 36.6%, 192 B spilled with targets + entropy) and, by
        # analogy, not measured yet, the log-probs backward's grad_z kernel (184-312 B spilled on sm_90)
        return dict(BLOCK_M=128, BLOCK_V=256, BLOCK_H=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3)


def _dot_dtype(t: torch.Tensor):
    """tl.dot's operand dtype: the input's. Under the interpreter bf16 runs as fp32 (exact: a bf16 product fits
    in fp32), because Triton 3.9's interpreter multiplies bf16 bit patterns as integers."""
    if t.dtype == torch.bfloat16 and t.device.type != "cuda":
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}.get(t.dtype, tl.float64)


def _head(hidden, weight, bias):
    """One head's kernel arguments: pointers (hidden rows (A, B, H), weight, bias or a dummy) and
    (H, s_ha, s_hb, s_hh, s_wv, s_wh)."""
    x = as_rows(hidden)
    return (x, weight, bias if bias is not None else weight), (x.shape[2], *x.stride(), *weight.stride())


def _grid(hidden, weight, cfg, ranges):
    """(N, V, B) and the launch grid: row blocks x (vocab ranges for the forwards | vocab tiles)."""
    x = as_rows(hidden)
    N, V = x.shape[0] * x.shape[1], weight.shape[0]
    n_rows, n_tiles = triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_V"])
    if not ranges:
        return (N, V, x.shape[1]), (n_rows, n_tiles), 0
    # forward: on the interpreter, ranges of 2 tiles so the CPU tests cross both the online update and the merge
    splits = vocab_splits(n_rows, n_tiles, hidden.device) if hidden.is_cuda else triton.cdiv(n_tiles, 2)
    cols_per_split = triton.cdiv(n_tiles, splits) * cfg["BLOCK_V"]
    return (N, V, x.shape[1]), (n_rows, triton.cdiv(V, cols_per_split)), cols_per_split


def _exp2_scale(temperature: float, acc: torch.dtype) -> torch.Tensor:
    """log2(e)/T exactly as the kernels' `temperature_scale` makes it (T an fp32 argument, 1/T correctly
    rounded in acc, then times log2(e)), for the torch ops that merge their partial sums: () in acc, on CPU."""
    return torch.tensor(temperature, dtype=torch.float32).to(acc).reciprocal() * LOG2E.value


def _row_stats(hidden, weight, bias, active, targets, temperature, entropy, acc):
    """One pass over the vocabulary -> (max z, log2 sum 2^y, z_target, sum_j p_j y_j), each (N,) in acc."""
    cfg = _config(hidden.dtype, hidden.device, one_head=True)
    sizes, grid, cols_per_split = _grid(hidden, weight, cfg, ranges=True)
    ptrs, head = _head(hidden, weight, bias)
    part = torch.empty((4, grid[1], sizes[0]), dtype=acc, device=hidden.device)
    _linear_lse_fwd[grid](
        *ptrs, active, targets if targets is not None else active, part, *sizes, *head, temperature, cols_per_split,
        HAS_BIAS=bias is not None, HAS_TARGETS=targets is not None, COMPUTE_ENTROPY=entropy, ACC=tl_dtype(acc),
        DOT_DTYPE=_dot_dtype(hidden), **cfg,
        enable_fp_fusion=True,
    )  # fmt: skip
    m_k, s_k, z_k, w_k = part.unbind(0)  # merge the ranges: the online update's rescaling, once
    m = torch.where(s_k > 0, m_k, -float("inf")).amax(0)
    shift = (m_k - m) * _exp2_scale(temperature, acc)  # <= 0
    alpha = torch.where(s_k > 0, torch.exp2(shift), 0.0)
    s = (alpha * s_k).sum(0)
    return m, torch.log2(s), z_k.sum(0), (alpha * (w_k + shift * s_k)).sum(0) / s


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (fp64 for fp64). bf16 / fp16 operands on CUDA: cuBLAS's
    fp32-output GEMM (`out_dtype`, torch >= 2.8); elsewhere (the CPU backend has no such kernel) on fp32
    copies: the same products, a 16-bit product being exact in fp32."""
    acc = torch.promote_types(a.dtype, torch.float32)
    if a.dtype != acc and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (RuntimeError, TypeError):  # an older torch; or scripts/aot_compile.py's CPU tensors posing as CUDA
            pass
    return torch.mm(a.to(acc), b.to(acc))


def _chunk_cols(N: int, V: int, block_v: int, device: torch.device, elem_bytes: int) -> int:
    """Vocabulary columns per backward chunk, whole BLOCK_V tiles: on CUDA the (N, chunk) grad_z buffer stays
    under GRAD_Z_CHUNK_BYTES (fewer, larger cuBLAS products above that buy little); on the interpreter two
    tiles, so the CPU tests cross chunks."""
    if device.type != "cuda":
        return 2 * block_v
    cols = GRAD_Z_CHUNK_BYTES // max(N * elem_bytes, 1) // block_v * block_v
    return max(block_v, min(cols, triton.cdiv(V, block_v) * block_v))


def _chunked_grads(hidden, weight, bias, active, needs, block_m, block_v, fill):
    """Gradients of hidden (..., H), weight (V, H), bias (V,) (None where not needed), one vocabulary chunk at a
    time: fill(gz, gb, col0, col_end) launches the grad_z kernel for columns [col0, col_end), writing gz
    ((N, chunk), hidden's dtype) and, when grad_b is needed, gb's per-row-block column sums; then cuBLAS:
    grad_hidden += gz @ W[chunk] (fp32 across chunks) and grad_W[chunk] = gz^T @ hidden (fp32 inside the GEMM,
    rounded once). No atomics: deterministic, and no fp32 (V, H) buffer. Inactive rows' hidden states are
    zeroed for grad_W (they may hold garbage, and 0 x NaN is NaN)."""
    H, V = hidden.shape[-1], weight.shape[0]
    h2 = hidden.reshape(-1, H)
    N = h2.shape[0]
    if needs[1]:
        h2 = h2.masked_fill(~active[:, None], 0)
    acc = acc_dtype(hidden)
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    gh = torch.zeros((N, H), dtype=acc, device=hidden.device) if need_h else None
    gw = torch.empty_like(weight) if need_w else None
    gb = torch.empty(V, dtype=bias.dtype, device=bias.device) if need_b else None
    width = min(_chunk_cols(N, V, block_v, hidden.device, hidden.element_size()), V)
    gz = torch.empty((N, width), dtype=hidden.dtype, device=hidden.device)
    part = torch.empty((triton.cdiv(N, block_m), width), dtype=acc, device=hidden.device) if need_b else gz
    for col0 in range(0, V, width):
        col_end = min(col0 + width, V)
        fill(gz, part, col0, col_end)
        g = gz[:, : col_end - col0]
        if need_h:
            gh += _mm_fp32(g, weight[col0:col_end])
        if need_w:
            gw[col0:col_end] = _mm_fp32(g.t(), h2)
        if need_b:
            gb[col0:col_end] = part[:, : col_end - col0].sum(0)
    return (None if gh is None else gh.to(hidden.dtype).view(hidden.shape)), gw, gb


def _forward(hidden, weight, bias, targets, temperature, ignore_index, return_entropy):
    """-> logp (N,), entropy (N,) or None, stats (2, N) [max z, log2 sum 2^y], active (N,) bool."""
    with nvtx_range("fastrlhf.linear_logprobs.fwd"):
        tgt = targets.reshape(-1)
        active = tgt != ignore_index
        acc = acc_dtype(hidden)
        m, log2_s, z_t, mean_y = _row_stats(hidden, weight, bias, active, tgt, temperature, return_entropy, acc)
        logp = ((z_t - m) * _exp2_scale(temperature, acc) - log2_s) * LN2.value
        logp = torch.where(active, torch.where((tgt >= 0) & (tgt < weight.shape[0]), logp, float("nan")), 0.0)
        ent = torch.where(active, (log2_s - mean_y) * LN2.value, 0.0) if return_entropy else None
        return logp, ent, torch.where(active, torch.stack([m, log2_s]), 0.0), active


def _backward(hidden, weight, bias, tgt, active, stats, ent, grad_logp, grad_ent, temperature, needs):
    with nvtx_range("fastrlhf.linear_logprobs.bwd"):
        cfg = _config(hidden.dtype, hidden.device, one_head=True)
        sizes, _, _ = _grid(hidden, weight, cfg, ranges=False)
        ptrs, head = _head(hidden, weight, bias)
        # (N,) views; contiguous because .sum()'s upstream gradient has stride 0
        flat = [t.reshape(-1).contiguous() if t is not None else stats for t in (ent, grad_logp, grad_ent)]
        need_db = needs[2] and bias is not None

        def fill(gz, gb, col0, col_end):
            grid = (triton.cdiv(sizes[0], cfg["BLOCK_M"]), triton.cdiv(col_end - col0, cfg["BLOCK_V"]))
            _linear_logprobs_bwd[grid](
                *ptrs, active, tgt, stats, *flat, gz, gb, *sizes, *head, temperature, col0, col_end, gz.stride(0),
                HAS_BIAS=bias is not None, HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENT=grad_ent is not None,
                NEED_DB=need_db, ACC=tl_dtype(stats.dtype), DOT_DTYPE=_dot_dtype(hidden), **cfg,
                enable_fp_fusion=True,
            )  # fmt: skip

        return _chunked_grads(hidden, weight, bias, active, needs, cfg["BLOCK_M"], cfg["BLOCK_V"], fill)


def _kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, active, temperature):
    """-> kl (N,), stats (4, N): [max x, log2 sum_p, max y, E_p[d~]] for the backward."""
    with nvtx_range("fastrlhf.linear_full_kl.fwd"):
        acc = acc_dtype(hidden, ref_hidden)
        mp, lsp, _, _ = _row_stats(hidden, weight, bias, active, None, temperature, False, acc)  # pass 1
        mq, lsq, _, _ = _row_stats(ref_hidden, ref_weight, ref_bias, active, None, temperature, False, acc)
        stats = torch.where(active, torch.stack([mp, lsp, mq, lsq]), 0.0)
        cfg = _config(torch.promote_types(hidden.dtype, ref_hidden.dtype), hidden.device)
        sizes, grid, cols_per_split = _grid(hidden, weight, cfg, ranges=True)
        (ptrs, head), (ref_ptrs, ref_head) = _head(hidden, weight, bias), _head(ref_hidden, ref_weight, ref_bias)
        part = torch.empty((2, grid[1], sizes[0]), dtype=acc, device=hidden.device)
        _linear_kl_fwd[grid](  # pass 2
            *ptrs, *ref_ptrs, active, stats, part, *sizes, *head, *ref_head, temperature, cols_per_split,
            HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, ACC=tl_dtype(acc),
            DOT_DTYPE=_dot_dtype(hidden), REF_DOT_DTYPE=_dot_dtype(ref_hidden), **cfg,
            enable_fp_fusion=True,
        )  # fmt: skip
        stats[3] = torch.where(active, part[1].sum(0), 0.0)
        return torch.where(active, part[0].sum(0), 0.0), stats


def _kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, active, stats, grad_kl, temperature,
                 needs):  # fmt: skip
    with nvtx_range("fastrlhf.linear_full_kl.bwd"):
        cfg = _config(torch.promote_types(hidden.dtype, ref_hidden.dtype), hidden.device)
        sizes, _, _ = _grid(hidden, weight, cfg, ranges=False)
        (ptrs, head), (ref_ptrs, ref_head) = _head(hidden, weight, bias), _head(ref_hidden, ref_weight, ref_bias)
        g_kl = grad_kl.reshape(-1).contiguous()
        need_db = needs[2] and bias is not None

        def fill(gz, gb, col0, col_end):
            grid = (triton.cdiv(sizes[0], cfg["BLOCK_M"]), triton.cdiv(col_end - col0, cfg["BLOCK_V"]))
            _linear_kl_bwd[grid](
                *ptrs, *ref_ptrs, active, stats, g_kl, gz, gb, *sizes, *head, *ref_head, temperature, col0, col_end,
                gz.stride(0), HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, NEED_DB=need_db,
                ACC=tl_dtype(stats.dtype), DOT_DTYPE=_dot_dtype(hidden), REF_DOT_DTYPE=_dot_dtype(ref_hidden),
                **cfg,
                enable_fp_fusion=True,
            )  # fmt: skip

        return _chunked_grads(hidden, weight, bias, active, needs, cfg["BLOCK_M"], cfg["BLOCK_V"], fill)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, return_entropy):
        logp, ent, stats, active = _forward(hidden, weight, bias, targets, temperature, ignore_index, return_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets.reshape(-1), active, stats, ent)  # row stats only
        ctx.temperature = temperature
        lead = hidden.shape[:-1]
        return (logp.view(lead), ent.view(lead)) if return_entropy else logp.view(lead)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, tgt, active, stats, ent = ctx.saved_tensors
        grad_ent = grad_ent if ent is not None else None
        needs = ctx.needs_input_grad[:3]
        grads = _backward(hidden, weight, bias, tgt, active, stats, ent, grad_logp, grad_ent, ctx.temperature, needs)
        return (*grads, None, None, None, None)


class _LinearFullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, active, temperature):
        kl, stats = _kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, active, temperature)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, active, stats)
        ctx.temperature = temperature
        return kl.view(hidden.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        grads = _kl_backward(*ctx.saved_tensors, grad_kl, ctx.temperature, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None)


# ------------------------------------------------------------------------------------------- public API
def _check_head(prefix, hidden, weight, bias):
    """hidden (..., H), weight (V, H) in hidden's dtype, bias (V,) any float or None."""
    check_float(f"{prefix}hidden", hidden)
    check_float(f"{prefix}weight", weight)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}weight must be (V, H) with V > 0 and H = {prefix}hidden.shape[-1], got {prefix}weight "
            f"{_desc(weight)} for {prefix}hidden {_desc(hidden)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}weight must have {prefix}hidden's dtype {hidden.dtype}, got {_desc(weight)}")
    if bias is not None:
        check_float(f"{prefix}bias", bias)
        check_shape(f"{prefix}bias", bias, (weight.shape[0],), f"{prefix}weight {tuple(weight.shape)}")


def _check_inputs(hidden, weight, targets, bias, temperature):
    _check_head("", hidden, weight, bias)
    check_int("targets", targets)
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    check_shape("targets", targets, hidden.shape[:-1], f"hidden {tuple(hidden.shape)} without its H dim")
    return check_temperature(temperature)


def _check_kl_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, mask):
    _check_head("", hidden, weight, bias)
    _check_head("ref_", ref_hidden, ref_weight, ref_bias)
    check_same_device(hidden=hidden, weight=weight, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias, mask=mask)  # fmt: skip
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


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
        Gradients flow to hidden, weight and bias.
    """
    temperature = _check_inputs(hidden, weight, targets, bias, temperature)
    if not use_triton(hidden):
        return linear_logprobs_ref(hidden, weight, targets, bias=bias, temperature=temperature,
                                   ignore_index=ignore_index, return_entropy=return_entropy)  # fmt: skip
    args = (hidden, weight, bias, targets, temperature, int(ignore_index), bool(return_entropy))
    if _wants_grad(hidden, weight, bias):
        return _LinearLogprobs.apply(*args)
    logp, ent, _, _ = _forward(*args)
    lead = hidden.shape[:-1]
    return (logp.view(lead), ent.view(lead)) if return_entropy else logp.view(lead)


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
    temperature = _check_kl_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, mask)
    if not use_triton(hidden):
        return linear_full_kl_ref(hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias,
                                  temperature=temperature, mask=mask)  # fmt: skip
    n_rows = math.prod(hidden.shape[:-1])
    active = torch.ones(n_rows, dtype=torch.bool, device=hidden.device) if mask is None else mask.reshape(-1) != 0
    ref = [t if t is None else t.detach() for t in (ref_hidden, ref_weight, ref_bias)]
    if _wants_grad(hidden, weight, bias):
        return _LinearFullKL.apply(hidden, weight, bias, *ref, active, temperature)
    return _kl_forward(hidden, weight, bias, *ref, active, temperature)[0].view(hidden.shape[:-1])


# ---------------------------------------------------------------------------------------- reference twins
def _by_chunks(fn, rows, shared):
    """[fn(*row_chunk, *shared)] over REF_CHUNK_ROWS-row chunks of the (N, ...) tensors `rows`; under autograd
    each chunk is recomputed in the backward (checkpoint) instead of keeping its (chunk, V) intermediates."""
    outs = []
    for i in range(0, rows[0].shape[0], REF_CHUNK_ROWS):
        args = [None if t is None else t[i : i + REF_CHUNK_ROWS] for t in rows] + list(shared)
        grad = _wants_grad(*[a for a in args if isinstance(a, torch.Tensor)])
        outs.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    return outs


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
    outs = _by_chunks(chunk, rows, (weight.to(acc), None if bias is None else bias.to(acc)))
    lead = hidden.shape[:-1]
    if not return_entropy:
        return torch.cat(outs).view(lead)
    return torch.cat([o[0] for o in outs]).view(lead), torch.cat([o[1] for o in outs]).view(lead)


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
    temperature = _check_kl_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, mask)
    acc = acc_dtype(hidden, ref_hidden)
    rw, rb = ref_weight.detach().to(acc), None if ref_bias is None else ref_bias.detach().to(acc)

    def chunk(h, rh, m, w, b):
        z = F.linear(h.to(acc), w, b)  # (chunk, V)
        with torch.no_grad():
            z_ref = F.linear(rh.detach().to(acc), rw, rb)
        return full_kl_ref(z, z_ref, temperature=temperature, mask=m)

    rows = (hidden.reshape(-1, hidden.shape[-1]), ref_hidden.reshape(-1, ref_hidden.shape[-1]),
            None if mask is None else mask.reshape(-1))  # fmt: skip
    outs = _by_chunks(chunk, rows, (weight.to(acc), None if bias is None else bias.to(acc)))
    return torch.cat(outs).view(hidden.shape[:-1])
