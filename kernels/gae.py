"""Generalized advantage estimation (GAE) as a reverse linear scan over the sequence.

With m_t the mask, r'_t = m_t ? r_t : 0 and v'_t = m_t ? v_t : 0 (v'_T = 0, A_T = 0):
    delta_t = r'_t + gamma * v'_{t+1} - v'_t
    A_t     = m_t ? delta_t + gamma * lam * A_{t+1} : 0          returns_t = A_t + v'_t
exactly the loop of `fastrlhf.trainer.rl.gae` (copied in `gae_ref`). A masked position resets the
recurrence: its advantage is 0 and the real token before it sees V = 0 and A = 0 after it, so padding is
terminal wherever it sits. Each position is an affine map A_t = c_t * A_{t+1} + d_t with c_t = m_t*gamma*lam
and d_t = m_t*delta_t; composing maps is associative,
    (c1, d1) then (c2, d2)  ->  (c1 * c2, c2 (.) d1 + d2),     c (.) d = 0 if c == 0 else c * d,
so one program per block of rows runs `tl.associative_scan(reverse=True)` over a chunk of T and carries
A at the chunk's first position into the next chunk to the left. The 0-absorbing product makes a reset
exact like the loop's `where`: a non-finite A never crosses a masked position (nor a gamma*lam = 0 step,
where the loop would give 0 * inf = NaN: the only place the two differ, and only for non-finite input).

Bytes: reads rewards, values and mask once (v and m at t+1 are re-read from cache), writes two fp32
(B, T) outputs: B*T*(b_r + b_v + b_m + 8). Rounding: delta_t in fp32 like the fp32 loop; the scan adds
in tree order instead of the loop's chain, so for long T the two differ by a few ulps of max |A|
(the chain's error grows with T, the tree's with log T). fp64 inputs run `gae_ref` in fp64.
No autograd: advantages and returns are targets, detached.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_float,
    check_same_device,
    check_shape,
    kernel_range,
    sm_count,
    use_triton,
)

MAX_BLOCK_T = 2048  # compiled: positions per chunk
INTERPRET_BLOCK_T = 64  # the interpreter scans element by element in Python: short chunks waste less padding
MAX_TILE = 4096  # compiled: rows x positions per program when T is short


@triton.jit
def _compose(c1, d1, c2, d2):
    """(c1, d1): the map of the later positions; (c2, d2): the earlier one, applied on top of it."""
    return c1 * c2, tl.where(c2 == 0, d2, d2 + c2 * d1)


@triton.jit(do_not_specialize=["T", "srb", "svb", "smb"])  # a new T never recompiles
def _gae_fwd(
    rewards_ptr,  # (B, T) float, strides (srb, srt)
    values_ptr,  # (B, T) float, strides (svb, svt)
    mask_ptr,  # (B, T) bool (as uint8) / int / float, strides (smb, smt); nonzero = real token
    adv_ptr,  # (B, T) fp32 out, contiguous
    ret_ptr,  # (B, T) fp32 out, contiguous
    B,
    T,
    srb,
    srt,
    svb,
    svt,
    smb,
    smt,
    gamma,  # fp32
    gamma_lam,  # fp32, gamma * lam rounded once (as the loop's Python product is)
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    row_ok = (rows < B)[:, None]
    r_row, v_row, m_row = (rows * srb)[:, None], (rows * svb)[:, None], (rows * smb)[:, None]
    cols = tl.arange(0, BLOCK_T)[None, :]  # (1, BLOCK_T)
    carry = tl.zeros([BLOCK_B], dtype=tl.float32)  # A at the first position of the chunk to the right
    n_chunks = tl.cdiv(T, BLOCK_T)
    for i in range(n_chunks):  # right to left
        t = ((n_chunks - 1 - i) * BLOCK_T + cols).to(tl.int64)  # (1, BLOCK_T)
        ok = row_ok & (t < T)
        ok_next = row_ok & (t + 1 < T)
        m = ok & (tl.load(mask_ptr + m_row + t * smt, mask=ok, other=0) != 0)
        m_next = ok_next & (tl.load(mask_ptr + m_row + (t + 1) * smt, mask=ok_next, other=0) != 0)
        r = tl.where(m, tl.load(rewards_ptr + r_row + t * srt, mask=ok, other=0.0).to(tl.float32), 0.0)
        v = tl.where(m, tl.load(values_ptr + v_row + t * svt, mask=ok, other=0.0).to(tl.float32), 0.0)
        v_next = tl.load(values_ptr + v_row + (t + 1) * svt, mask=ok_next, other=0.0).to(tl.float32)
        v_next = tl.where(m_next, v_next, 0.0)
        delta = r + gamma * v_next - v
        c = tl.where(m, gamma_lam, 0.0)  # (BLOCK_B, BLOCK_T)
        d = tl.where(m, delta, 0.0)
        # (C_t, D_t): positions t .. chunk end composed, so A_t = C_t (.) carry + D_t
        C, D = tl.associative_scan((c, d), 1, _compose, reverse=True)
        adv = tl.where(C == 0, D, D + C * carry[:, None])
        carry = tl.sum(tl.where(cols == 0, adv, 0.0), axis=1)
        out = rows[:, None] * T + t
        tl.store(adv_ptr + out, adv, mask=ok)
        tl.store(ret_ptr + out, adv + v, mask=ok)


def _blocks(B: int, T: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_T). Compiled: chunks of up to MAX_BLOCK_T positions, several rows per program
    only when T is short and there are rows to spare (each row is a sequential chain of chunks, so one
    row per program is the most parallel). Interpreter: one row, short chunks."""
    if device.type != "cuda":
        return 1, min(triton.next_power_of_2(T), INTERPRET_BLOCK_T)
    block_t = min(triton.next_power_of_2(T), MAX_BLOCK_T)
    block_b = min(triton.next_power_of_2(triton.cdiv(B, 2 * sm_count(device))), max(1, MAX_TILE // block_t))
    return block_b, block_t


def _check_inputs(rewards, values, mask, gamma, lam) -> tuple[float, float]:
    check_float("rewards", rewards)
    check_float("values", values)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D (B, T), got shape {tuple(rewards.shape)}")
    check_shape("values", values, rewards.shape, "rewards")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype not in (torch.bool, *INT_DTYPES, *FLOAT_DTYPES):
        raise TypeError(f"mask must be a bool, integer or float tensor (nonzero = real token), got dtype {mask.dtype}")
    check_shape("mask", mask, rewards.shape, "rewards")
    check_same_device(rewards=rewards, values=values, mask=mask)
    out = []
    for name, x in (("gamma", gamma), ("lam", lam)):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"{name} must be a number in [0, 1], got {type(x).__name__}")
        if not 0.0 <= float(x) <= 1.0:  # NaN fails too
            raise ValueError(f"{name} must be in [0, 1], got {x!r}")
        out.append(float(x))
    return out[0], out[1]


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and value targets, as `fastrlhf.trainer.rl.gae` computes them, in one scan.

    Args:
        rewards: (B, T) float per-token rewards (fp16/bf16/fp32, any strides).
        values: (B, T) float value estimates, same shape.
        mask: (B, T) bool / integer / float; nonzero marks a real token. Any pattern is allowed: a masked
            position gets 0 and ends the episode for the real tokens before it (the loop's semantics).
        gamma: discount in [0, 1]. lam: GAE lambda in [0, 1].
    Returns:
        (advantages, returns), both (B, T) fp32 (fp64 for fp64 inputs), detached, 0 at masked positions;
        returns = advantages + masked values.
    """
    gamma, lam = _check_inputs(rewards, values, mask, gamma, lam)
    if not use_triton(rewards) or torch.float64 in (rewards.dtype, values.dtype):
        return gae_ref(rewards, values, mask, gamma=gamma, lam=lam)
    B, T = rewards.shape
    adv = torch.zeros((B, T), dtype=torch.float32, device=rewards.device)
    ret = torch.zeros_like(adv)
    if B * T == 0:
        return adv, ret
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    block_b, block_t = _blocks(B, T, rewards.device)
    with kernel_range("fastrlhf.gae.fwd"):
        r, v = rewards.detach(), values.detach()
        _gae_fwd[(triton.cdiv(B, block_b),)](
            r,
            v,
            mask,
            adv,
            ret,
            B,
            T,
            *r.stride(),
            *v.stride(),
            *mask.stride(),
            gamma,
            gamma * lam,
            BLOCK_B=block_b,
            BLOCK_T=block_t,
            num_warps=4 if block_b * block_t <= 1024 else 8,
            enable_fp_fusion=True,
        )
    return adv, ret


def gae_ref(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch twin of `gae`: the reverse loop over T of `trainer.rl.gae`, in fp32 (fp64 for fp64
    inputs)."""
    gamma, lam = _check_inputs(rewards, values, mask, gamma, lam)
    acc = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    m = mask.bool()
    rewards = rewards.detach().to(acc).where(m, 0)
    values = values.detach().to(acc).where(m, 0)
    next_value = next_adv = rewards.new_zeros(rewards.shape[0])  # (B,)
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv).where(m[:, t], 0)
        next_value = values[:, t]
        advantages.append(next_adv)
    advantages = torch.stack(advantages[::-1], dim=1) if advantages else torch.zeros_like(rewards)
    return advantages, advantages + values
