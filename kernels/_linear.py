"""What the fused-linear ops (`linear_logprobs.py`, `linear_full_kl.py`) share: logits computed tile by tile
from hidden states and an LM head inside the kernel, used in its epilogue and never stored.

Per row (token position) with hidden state h in R^H, head W in R^(V x H), bias b, temperature T: z = W h + b.
Grid: row blocks of BLOCK_M on axis 0 (int64 offsets), the vocabulary on axis 1. A (BLOCK_M, BLOCK_V) logits
tile (`logits_tile`) is a tl.dot loop over H in BLOCK_H steps into an fp32 accumulator; the epilogue works on
that fp32 tile, which is never rounded nor stored. The floor here is FLOPs (2NVH per matmul), not bytes.
- Row statistics (`_linear_lse_fwd`, `row_stats`), one matmul: axis 1 cuts the vocabulary into S ranges so
  short batches fill the GPU; each program keeps online (max, sum 2^y, sum 2^y y, target logit) over its range,
  y = (z - max) log2(e)/T, the max kept on the raw fp32 logits, and writes them to a (4, S, N) fp32 buffer
  (16NS bytes), merged by a few torch ops on [S, N] (the online update's rescaling). Reads hidden S times and
  W once per row block (N/BLOCK_M times, mostly from L2).
- Backward, 1 recompute + 2 cuBLAS GEMMs per vocabulary chunk (`chunked_grads`): the op's grad_z kernel (one
  program per (row block, vocab tile)) recomputes its tile(s) and forms grad_z from the saved fp32 row
  statistics, stores it into an (N, chunk) buffer (at most GRAD_Z_CHUNK_BYTES on CUDA) with its per-row-block
  column sums (grad_b, `store_grad_z`); then grad_hidden += grad_z @ W[chunk] and grad_W[chunk] = grad_z^T @
  hidden run as cuBLAS GEMMs with fp32 output (`mm_fp32`). Why not the earlier single kernel with fp32 atomic
  adds of both products: on an H200 its atomic traffic (each grad_hidden entry added V/BLOCK_V times) made it
  5x slower than eager; the GEMMs run near the tensor-core rate, need no fp32 (V, H) buffer, and the result is
  deterministic.
Rounding: hidden and W are read in their dtype; products accumulate in fp32 (fp32 inputs in full fp32, no
TF32, summed in BLOCK_H slices added by TwoSum: logits within ~1 ulp; fp64 inputs in fp64, for gradcheck);
per-token outputs are fp32. The one extra rounding: grad_z is rounded to the input dtype so the gradient GEMMs
run on tensor cores (a no-op for fp32; grad_b sums the unrounded tile); gradients accumulate in fp32 and are
rounded to the parameters' dtypes once, at the end.
Inactive rows read nothing and give 0 and 0 gradient; a row block with none active is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

from ._common import LOG2E, _desc, acc_dtype, as_rows, check_float, check_shape, temperature_scale, tl_dtype
from ._common import vocab_splits

# Instantiated constexprs: compiled Triton rejects globals merely annotated `x: tl.constexpr = ...` (seen
# compiling for sm_90). The interpreter does not check, so CPU tests cannot tell.
LN2 = tl.constexpr(0.6931471805599453)
REF_CHUNK_ROWS = 1024  # rows per chunk in the *_ref twins: their memory is O(REF_CHUNK_ROWS x V) fp32
GRAD_Z_CHUNK_BYTES = 256 << 20  # the backward's (N, chunk) grad_z buffer on CUDA (see chunk_cols)


@triton.jit
def dot_acc(a, b, acc, DOT_DTYPE: tl.constexpr):
    """acc + a @ b in acc's dtype (fp32; fp64 for fp64), operands cast to DOT_DTYPE; fp32 operands in full fp32.
    The accumulator goes into tl.dot, as the compiler would put it anyway (`acc + tl.dot(a, b)` is rewritten to
    `tl.dot(a, b, acc)`), so the interpreter sums in the compiled order. fp64 (gradcheck only) is a broadcast
    multiply and sum, not tl.dot: Triton 3.6's fp64 MMA asserts "fp64 don't support largeK MMA" for these tiles
    on sm_90."""
    if DOT_DTYPE == tl.float64:
        return acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    elif DOT_DTYPE == tl.float32:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")  # no TF32
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def row_block(active_ptr, N, B, s_ha, s_hb, BLOCK_M: tl.constexpr):
    """This program's rows (int64), in-range and active masks, and the hidden-state offset of each row."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < N
    active = tl.load(active_ptr + rows, mask=row_in, other=0) != 0
    return rows, row_in, active, (rows // B) * s_ha + (rows % B) * s_hb


@triton.jit
def logits_tile(
    h_ptr,  # (A, B, H) hidden, any float; row offsets row_off, feature stride s_hh
    w_ptr,  # (V, H) head weight, hidden's dtype; strides s_wv, s_wh
    b_ptr,  # (V,) bias, any float, read when HAS_BIAS
    row_off,
    rows_on,
    cols,
    col_end,
    H,
    s_hh,
    s_wv,
    s_wh,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
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
            part = dot_acc(h, w, tl.zeros([BLOCK_M, BLOCK_V], ACC), DOT_DTYPE)
            hi = acc + part
            part_in_hi = hi - acc
            lo += (acc - (hi - part_in_hi)) + (part - part_in_hi)
            acc = hi
        else:
            acc = dot_acc(h, w, acc, DOT_DTYPE)  # (BLOCK_M, BLOCK_H) @ (BLOCK_H, BLOCK_V)
    if TWO_SUM:
        acc += lo
    elif HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_on, other=0.0).to(ACC)[None, :]
    return tl.where(col_on[None, :], acc, -float("inf"))


@triton.jit
def store_grad_z(
    g,  # (BLOCK_M, BLOCK_V) grad_z in ACC, 0 outside active rows and valid columns
    gz_ptr,  # (N, chunk) out, hidden's dtype; row stride s_gz; column c holds vocabulary column col0 + c
    gb_ptr,  # (row blocks, chunk) ACC out: grad_z summed over this program's rows (NEED_DB)
    rows,
    row_in,
    cols,
    col0,
    col_end,
    s_gz,
    NEED_DB: tl.constexpr,
):
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
    cols_per_split,
    HAS_BIAS: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows, row_in, active, row_off = row_block(active_ptr, N, B, s_ha, s_hb, BLOCK_M)
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
        z = logits_tile(
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


# --------------------------------------------------------------------------------------------- launchers
def launch_config(dtype: torch.dtype, device: torch.device, one_head: bool = False) -> dict:
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
        # benchmarks/tools/tune_linear.py: 74.5% of matmul, 192 B spilled with targets + entropy) and, by
        # analogy, unmeasured, the log-probs backward's grad_z kernel (184-312 B spilled on sm_90)
        return dict(BLOCK_M=128, BLOCK_V=256, BLOCK_H=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3)


def dot_dtype(t: torch.Tensor):
    """tl.dot's operand dtype: the input's. Under the interpreter bf16 runs as fp32 (exact: a bf16 product fits
    in fp32), because Triton's interpreter multiplies bf16 bit patterns as integers."""
    if t.dtype == torch.bfloat16 and t.device.type != "cuda":
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}.get(t.dtype, tl.float64)


def head_args(hidden, weight, bias):
    """One head's kernel arguments: pointers (hidden rows (A, B, H), weight, bias or a dummy) and
    (H, s_ha, s_hb, s_hh, s_wv, s_wh)."""
    x = as_rows(hidden)
    return (x, weight, bias if bias is not None else weight), (x.shape[2], *x.stride(), *weight.stride())


def launch_grid(hidden, weight, cfg, ranges):
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


def exp2_scale(temperature: float, acc: torch.dtype) -> torch.Tensor:
    """log2(e)/T exactly as the kernels' `temperature_scale` makes it (T an fp32 argument, 1/T correctly
    rounded in acc, then times log2(e)), for the torch ops that merge their partial sums: () in acc, on CPU."""
    return torch.tensor(temperature, dtype=torch.float32).to(acc).reciprocal() * LOG2E.value


def row_stats(hidden, weight, bias, active, targets, temperature, entropy, acc):
    """One pass over the vocabulary -> (max z, log2 sum 2^y, z_target, sum_j p_j y_j), each (N,) in acc."""
    cfg = launch_config(hidden.dtype, hidden.device, one_head=True)
    sizes, grid, cols_per_split = launch_grid(hidden, weight, cfg, ranges=True)
    ptrs, head = head_args(hidden, weight, bias)
    part = torch.empty((4, grid[1], sizes[0]), dtype=acc, device=hidden.device)
    _linear_lse_fwd[grid](
        *ptrs,
        active,
        targets if targets is not None else active,
        part,
        *sizes,
        *head,
        temperature,
        cols_per_split,
        HAS_BIAS=bias is not None,
        HAS_TARGETS=targets is not None,
        COMPUTE_ENTROPY=entropy,
        ACC=tl_dtype(acc),
        DOT_DTYPE=dot_dtype(hidden),
        **cfg,
        enable_fp_fusion=True,
    )
    m_k, s_k, z_k, w_k = part.unbind(0)  # merge the ranges: the online update's rescaling, once
    m = torch.where(s_k > 0, m_k, -float("inf")).amax(0)
    shift = (m_k - m) * exp2_scale(temperature, acc)  # <= 0
    alpha = torch.where(s_k > 0, torch.exp2(shift), 0.0)
    s = (alpha * s_k).sum(0)
    return m, torch.log2(s), z_k.sum(0), (alpha * (w_k + shift * s_k)).sum(0) / s


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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


def chunk_cols(N: int, V: int, block_v: int, device: torch.device, elem_bytes: int) -> int:
    """Vocabulary columns per backward chunk, whole BLOCK_V tiles: on CUDA the (N, chunk) grad_z buffer stays
    under GRAD_Z_CHUNK_BYTES (fewer, larger cuBLAS products above that buy little); on the interpreter two
    tiles, so the CPU tests cross chunks."""
    if device.type != "cuda":
        return 2 * block_v
    cols = GRAD_Z_CHUNK_BYTES // max(N * elem_bytes, 1) // block_v * block_v
    return max(block_v, min(cols, triton.cdiv(V, block_v) * block_v))


def chunked_grads(hidden, weight, bias, active, needs, block_m, block_v, fill):
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
    width = min(chunk_cols(N, V, block_v, hidden.device, hidden.element_size()), V)
    gz = torch.empty((N, width), dtype=hidden.dtype, device=hidden.device)
    part = torch.empty((triton.cdiv(N, block_m), width), dtype=acc, device=hidden.device) if need_b else gz
    for col0 in range(0, V, width):
        col_end = min(col0 + width, V)
        fill(gz, part, col0, col_end)
        g = gz[:, : col_end - col0]
        if need_h:
            gh += mm_fp32(g, weight[col0:col_end])
        if need_w:
            gw[col0:col_end] = mm_fp32(g.t(), h2)
        if need_b:
            gb[col0:col_end] = part[:, : col_end - col0].sum(0)
    return (None if gh is None else gh.to(hidden.dtype).view(hidden.shape)), gw, gb


# ------------------------------------------------------------------- argument checks, the *_ref twins' chunks
def check_head(prefix, hidden, weight, bias):
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


def wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def by_chunks(fn, rows, shared):
    """[fn(*row_chunk, *shared)] over REF_CHUNK_ROWS-row chunks of the (N, ...) tensors `rows`; under autograd
    each chunk is recomputed in the backward (checkpoint) instead of keeping its (chunk, V) intermediates."""
    outs = []
    for i in range(0, rows[0].shape[0], REF_CHUNK_ROWS):
        args = [None if t is None else t[i : i + REF_CHUNK_ROWS] for t in rows] + list(shared)
        grad = wants_grad(*[a for a in args if isinstance(a, torch.Tensor)])
        outs.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    return outs
