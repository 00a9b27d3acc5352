"""Shared plumbing for the kernel modules: backend choice, input checks, row views, block sizes, NVTX.

Nothing here computes; every op's math lives in its own file.

Every launch passes `enable_fp_fusion=True`: the kernels' polynomials (Horner's rule, one FMA a term) and
their products-then-sums were written, tested against the contract and counted (`benchmarks/tools/tune_rows.py
--sass`) with FMA contraction. A Triton whose default is no contraction (TRITON_DEFAULT_FP_FUSION)
would otherwise change every kernel's rounding and cost full_kl's forward ~16% more instructions.
TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off.

Divisions in the kernels are correctly rounded (`div_rn` below): a plain fp32 `/` in Triton is div.full.f32
on NVIDIA GPUs, a * rcp(b) (MUFU.RCP) and a rounded product, ~2 ulp off, while the interpreter divides
exactly. There are few divisions (a program's 1/T, a row's final ratios): the correctly rounded ones cost
nothing, and both backends, forward and backward, agree on them to the bit. exp2 stays the hardware's
ex2.approx.ftz.f32 (one or two an element: not free to replace); tests/gpu_math.py models it (and div.full)
in the interpreter, and the fp32 contract tests pass under that model too (tests/test_gpu_math.py).
"""

from __future__ import annotations

import collections
import contextlib
import os

import torch
import triton
import triton.language as tl

try:  # the `nvtx` package annotates ranges for Nsight Systems; a no-op when no profiler listens
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a declared dependency, kept optional for drop-in users
    _nvtx = None

# An instantiated constexpr: compiled Triton rejects a global merely annotated `LOG2E: tl.constexpr = ...`
# (the interpreter does not check; tests/test_compile_gpu.py does)
LOG2E = tl.constexpr(1.4426950408889634)

# Read once, like triton itself does: TRITON_INTERPRET=1 must be set before triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run compiled Triton; CPU tensors run Triton's interpreter only under TRITON_INTERPRET=1."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def nvtx_range(name: str):
    """An NVTX range in the `fastrlhf` domain (see README, "Profiling"); none while torch.compile traces
    (Dynamo cannot trace the nvtx package) or when nvtx is not installed."""
    if _nvtx is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _nvtx.annotate(name, domain="fastrlhf")


# Triton kernel launches by name ("fastrlhf.full_kl.fwd", ...) since import. Tests read it to assert that the
# Triton body ran and not the `*_ref` twin; one dict increment a launch, always on.
LAUNCHES: collections.Counter[str] = collections.Counter()


def kernel_range(name: str):
    """Wraps one Triton launch: counts it in LAUNCHES (not while torch.compile traces: the count then
    belongs to the compiled graph's runs, which do not pass here) and opens its NVTX range."""
    if not torch.compiler.is_compiling():
        LAUNCHES[name] += 1
    return nvtx_range(name)


# ----------------------------------------------------------------------------------------------- checks
def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {_desc(t)}")


def check_int(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (token ids), got {_desc(t)}")


def check_logits(name: str, t: torch.Tensor) -> None:
    """Logits: float, at least 1-D, non-empty vocabulary with stride 1."""
    check_float(name, t)
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last (vocabulary) dim, got {_desc(t)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(
            f"{name} must have stride 1 along the vocabulary (last) dim, got strides {tuple(t.stride())} "
            f"for {_desc(t)}; pass a view whose last dim is contiguous (e.g. not a transpose)"
        )


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {seen}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], against: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} to match {against}, got {_desc(t)}")


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0.0 or t == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


# -------------------------------------------------------------------------------------------- row views
def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View (..., V) as (A, B, V) so that row r = a*B + b sits at a*stride(0) + b*stride(1).

    Two leading strides cover the common strided views (`logits[:, :-1]`, `logits[..., k:, :]`) without a
    copy; only exotic layouts with three or more non-collapsible leading dims make `reshape` copy.
    """
    V = x.shape[-1]
    B = x.shape[-2] if x.dim() >= 2 else 1
    return x.reshape(-1, B, V)


# ------------------------------------------------------------------------------------------ block sizes
def row_blocks(n_rows: int, n_cols: int, device: torch.device, max_tile: int | None = None) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_V): a [rows, vocab] tile. Large vocabularies stream one row per program in
    BLOCK_V chunks; small vocabularies pack several rows per program so short rows still fill a tile.
    The interpreter runs each program in Python, so there we use big tiles to keep the grid short."""
    if max_tile is None:
        max_tile = 65536 if device.type == "cpu" else 4096
    block_v = min(triton.next_power_of_2(max(n_cols, 1)), max_tile)
    block_r = max(1, min(triton.next_power_of_2(max(n_rows, 1)), max_tile // block_v))
    return block_r, block_v


def load_group(block_v: int, *rows: torch.Tensor) -> int:
    """Columns per partial max / sum in the forward streaming loops (token_logprobs, ppo_head, full_kl) for
    the (A, B, V) row views `rows` they read, where those stream every row from column 0 (several rows a
    program, or views whose data does not start on 16 bytes; otherwise the ops' `fwd_tiles` put the blocks
    on memory's 16-byte grid and G is one vector). When every view starts on 16 bytes and both row strides are
    multiples of 16, Triton proves the alignment and loads 16-byte vectors: a group is then one thread's
    vector (8 bf16/fp16, 4 fp32, 2 fp64; at most BLOCK_V), so each group's partials live in one thread and
    the loop needs no cross-thread reduction. Otherwise (an odd vocabulary such as GPT-2's 50,257, a view at
    an odd offset) the loads are scalar and adjacent columns sit on adjacent threads, where small groups
    would cost shuffles and an exponential per column (sm_90: 15 -> 31 instructions per element): then
    one group of BLOCK_V columns, a block-wide reduction per block. Any G is correct: it only sets the
    summation order (so the rounding)."""
    if not provably_aligned(*rows):
        return block_v
    return min(block_v, 16 // max(t.element_size() for t in rows))


def provably_aligned(*rows: torch.Tensor) -> bool:
    """Whether Triton can prove every row of the (A, B, V) views `rows` starts on 16 bytes (data on 16 bytes,
    row strides multiples of 16 elements: its launch specialisation), so that loads from column 0 vectorise."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 and t.stride(1) % 16 == 0 for t in rows)


def bwd_layout(block_r: int, block_v: int, *rows: torch.Tensor) -> dict:
    """{"ALIGN"[, "maxnreg"]} of the backward streaming loops (token_logprobs, ppo_head, full_kl) over the
    (A, B, V) row views `rows` (the logits, the reference's, the gradient). The 16-byte-grid path
    (`aligned_share`) where blocks from column 0 would load scalars: an odd vocabulary (GPT-2's 50,257) or
    a view off 16 bytes (sm_90, bf16, vocabulary 50,257: token_logprobs 10.6 instructions per element
    instead of 30.9 from column 0, full_kl 15.1 instead of 33.8: memory-bound, not compute-bound). Rows Triton can prove aligned keep the
    column-0 path: its loads are vectors already and it ran at 90-97% of copy bandwidth on the H200. On
    NVIDIA GPUs the grid path is capped at 64 registers for 16-bit logits (4 blocks of 8 warps per SM)
    and 80 for fp32 (3 blocks): no spill at these (results/2026-12-03-sm90-sass)."""
    if provably_aligned(*rows):
        return {"ALIGN": 0}
    align = row_layout(block_r, block_v, *rows)["ALIGN"]
    size = max(t.element_size() for t in rows)
    capped = align and rows[0].device.type == "cuda" and torch.version.hip is None and size <= 4
    return {"ALIGN": align, **({"maxnreg": 64 if size == 2 else 80} if capped else {})}


def row_layout(block_r: int, block_v: int, *rows: torch.Tensor) -> dict:
    """{"G", "ALIGN"} of the forward streaming loops (token_logprobs, ppo_head, full_kl) over the (A, B, V) row
    views `rows`. One row per program, every view's data on 16 bytes, and every row equally far into its 16
    bytes in all views (row strides equal modulo one 16-byte vector): ALIGN = G = one vector (8 bf16), and
    the loops put their blocks on memory's 16-byte grid, so whole blocks load unmasked as vectors whatever
    the vocabulary. Otherwise ALIGN = 0, blocks from column 0, G from `load_group`."""
    vec = 16 // max(t.element_size() for t in rows)
    x = rows[0]
    same_lead = all(
        t.element_size() == x.element_size()
        and (t.stride(0) - x.stride(0)) % vec == 0
        and (t.stride(1) - x.stride(1)) % vec == 0
        for t in rows
    )
    if block_r == 1 and block_v >= vec and same_lead and all(t.data_ptr() % 16 == 0 for t in rows):
        return {"G": vec, "ALIGN": vec}
    return {"G": load_group(block_v, *rows), "ALIGN": 0}


def grad_rows(x: torch.Tensor, like_x: bool = True) -> torch.Tensor:
    """An empty gradient for the (A, B, V) row view `x`. With `like_x`, laid out as `x` is (its strides) when
    its rows do not overlap and that costs at most 1/8 more memory than a contiguous tensor (a
    `logits[:, :-1]` view: one row in T), so every gradient row starts as far into its 16 bytes as its
    logits row and a backward can stream both on memory's 16-byte grid (`row_layout`). Otherwise
    contiguous (what `torch.library` fake impls assume: ops.py passes like_x=False)."""
    A, B, V = x.shape
    sa, sb = x.stride(0), x.stride(1)
    apart = x.stride(2) == 1 and (B == 1 or sb >= V) and (A == 1 or sa >= (B - 1) * sb + V)
    span = (A - 1) * sa + (B - 1) * sb + V
    if like_x and x.numel() > 0 and apart and 8 * span <= 9 * x.numel():
        return torch.empty_strided((A, B, V), (sa, sb, 1), dtype=x.dtype, device=x.device)
    return torch.empty((A, B, V), dtype=x.dtype, device=x.device)


@triton.jit
def temperature_scale(temperature, ACC: tl.constexpr):
    """(1/T, log2(e)/T) in ACC, a program's scales of the logits to natural and to exp2 arguments; every
    kernel's forward and backward take them from here, so they agree to the bit. 1/T correctly rounded."""
    inv_t = div_rn(1.0, tl.cast(temperature, ACC))
    return inv_t, inv_t * LOG2E


@triton.jit
def div_rn(a, b):
    """a / b correctly rounded, for fp32 (`tl.div_rn`; a plain `/` is div.full.f32 on NVIDIA GPUs, see above)
    and fp64 (whose `/` already is)."""
    if b.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def aligned_share(row_off, active, V, cols_per_split, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    """A backward program's share of its one row (BLOCK_R = 1) on memory's 16-byte grid. Columns count from
    the 16 bytes the row starts in (f = j + lead, lead = row_off % ALIGN; the row ends at f = V + lead) in
    blocks of BLOCK_V; the program takes f in [f0, f0 + cols_per_split), a whole number of blocks.
    -> (lead (1,); scalars:) on (the row is active), first (this program holds block 0, which starts
    before the row: masked), [lo, hi) (its whole blocks: unmasked), last (the start of the row's last,
    partial block if this program holds it, else -1: masked), and [f0, f1) (its columns, for zero-filling
    an inactive row)."""
    lead = row_off % ALIGN  # (1,)
    end = tl.max(V + lead, 0)  # scalar
    on = tl.max(active.to(tl.int32), 0) != 0
    f0 = tl.program_id(1).to(tl.int64) * cols_per_split
    f1 = tl.minimum(f0 + cols_per_split, end)
    n_whole = end // BLOCK_V
    last = tl.maximum(n_whole, 1) * BLOCK_V  # the block after the whole ones (block 0 is always masked)
    last = tl.where((last < end) & (last >= f0) & (last < f1), last, -1)
    return lead, on, f0 == 0, tl.maximum(f0, BLOCK_V), tl.minimum(f1, n_whole * BLOCK_V), last, f0, f1


@triton.jit
def zero_fill(gp, lead, V, f0, f1, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Zeros into a backward program's columns [f0, f1) of a row on the 16-byte grid (`aligned_share`): the
    gradient of a row that reads nothing (ignored target, masked row). gp (1,): the row's 16-byte group."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(f0, f1, BLOCK_V):
        ok = ((start + cols)[None, :] >= lead[:, None]) & ((start + cols)[None, :] < (V + lead)[:, None])
        zeros = tl.zeros([BLOCK_R, BLOCK_V], gp.dtype.element_ty)
        tl.store(gp[:, None] + (start + cols)[None, :], zeros, mask=ok)


def num_warps_for(tile: int) -> int:
    return 4 if tile <= 2048 else 8 if tile <= 8192 else 16


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def vocab_splits(n_row_programs: int, n_col_blocks: int, device: torch.device) -> int:
    """How many programs share one row block in a backward pass, so that short batches still put
    about four programs on every SM. On the interpreter: one (fewest programs)."""
    if device.type != "cuda":
        return 1
    want = triton.cdiv(4 * sm_count(device), max(n_row_programs, 1))
    return max(1, min(want, n_col_blocks))


# ------------------------------------------------------------------------------------ accumulation dtype
def acc_dtype(*tensors) -> torch.dtype:
    """fp32, the accumulation and output dtype for fp16/bf16/fp32 inputs; fp64 if any input is fp64
    (so gradcheck and fp64 oracles can run the same kernels)."""
    return (
        torch.float64
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


def tl_dtype(dtype: torch.dtype):
    """The triton dtype for an accumulation dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def load_whole(p, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_R,) pointers to whole, 16-byte-aligned blocks of BLOCK_V logits -> (BLOCK_R, BLOCK_V) in ACC,
    unmasked. bf16 -> fp32 by hand: each 32-bit word holds two bf16, and a bf16 is the top half of the fp32
    it rounds, so the pair is (w << 16, w & 0xffff0000), one instruction each. The compiler's conversion
    moves the high half down first and shifts it back (PRMT + SHF: 1.5 instructions per value). Used where
    instructions are the bound: full_kl's forward (one instruction per element fewer on sm_90).
    token_logprobs' forward, under its memory floor by count, keeps the compiler's (fewer registers)."""
    if p.dtype.element_ty == tl.bfloat16 and ACC == tl.float32:
        w = tl.load(p.to(tl.pointer_type(tl.int32))[:, None] + tl.arange(0, BLOCK_V // 2)[None, :])
        lo = (w << 16).to(tl.float32, bitcast=True)  # the even columns
        hi = (w & -65536).to(tl.float32, bitcast=True)  # the odd ones
        return tl.reshape(tl.join(lo, hi), [BLOCK_R, BLOCK_V])
    else:
        return tl.load(p[:, None] + tl.arange(0, BLOCK_V)[None, :]).to(ACC)
