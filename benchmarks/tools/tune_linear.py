"""Tile sweep of the fused linear log-probs kernels on a GPU: the forward (`_linear_lse_fwd` in
`kernels/_linear.py`) or, with --backward, the backward's grad_z kernel (`_linear_logprobs_bwd` in
`kernels/linear_logprobs.py`).

    python benchmarks/tools/tune_linear.py [--rows 8192] [--hidden 4096] [--vocab 151936] [--out tune_linear.json]
    python benchmarks/tools/tune_linear.py --backward [--budget-s 30]   # grad_z of one vocabulary chunk

Why: on an H200 the shipped tiles (BLOCK_M=64, BLOCK_V=128, BLOCK_H=32, 8 warps, 3 stages) reached 146 TFLOP/s,
21% of a bf16 matmul of the same shape (2MVH FLOPs), 2.9x slower than matmul + token_logprobs. This launches
the same kernel, with the same vocabulary split rule, under several (BLOCK_M, BLOCK_V, BLOCK_H, num_warps,
num_stages) and prints ms, TFLOP/s and % of the measured torch matmul for each, so the next change to
`launch_config` is a measured one. Each config's output is checked against the first config's (max |diff| of
the log-sum-exp): a faster config must compute the same thing. The launch code repeats `row_stats`
(on purpose: the library's launchers take no tile arguments).
--backward: the grad_z kernel recomputes a (BLOCK_M, BLOCK_V) logits tile and writes d logp / dz for one
chunk of the vocabulary, as `_backward` launches it per chunk (GRAD_Z_CHUNK_BYTES of bf16 grad_z); it ships
the forward's tiles by analogy, and they spill 184-312 B on sm_90. FLOPs: the recomputed matmul,
2 x rows x chunk x H; % of a torch matmul of the same shape. Outputs are checked against the first config's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import torch
import triton
import triton.language as tl

from fastrlhf.kernels import _linear as lin
from fastrlhf.kernels._common import vocab_splits

ll = importlib.import_module("fastrlhf.kernels.linear_logprobs")  # the module: the package exports the function

# (BLOCK_M, BLOCK_V, BLOCK_H, num_warps, num_stages); the H200 run in results/2026-11-27-h200/ chose the
# (128, 256, 64, 8, 3) row for the forward
CONFIGS = [
    (64, 128, 32, 8, 3),
    (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 256, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (128, 256, 32, 8, 4),
]


def lse(hidden: torch.Tensor, weight: torch.Tensor, cfg: tuple, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Row log-sum-exp (base 2, T = 1) of hidden @ weight.T through `_linear_lse_fwd` with tiles `cfg`; with
    `targets` ((N,) int64) the kernel also gathers the target logit and sums the entropy term, as
    `linear_logprobs(..., return_entropy=True)` runs it (more registers live in the epilogue)."""
    bm, bv, bh, warps, stages = cfg
    N, H = hidden.shape
    V = weight.shape[0]
    n_rows, n_tiles = triton.cdiv(N, bm), triton.cdiv(V, bv)
    cols_per_split = triton.cdiv(n_tiles, vocab_splits(n_rows, n_tiles, hidden.device)) * bv
    grid = (n_rows, triton.cdiv(V, cols_per_split))
    x = hidden.view(1, N, H)
    active = torch.ones(N, dtype=torch.bool, device=hidden.device)
    part = torch.empty((4, grid[1], N), dtype=torch.float32, device=hidden.device)
    lin._linear_lse_fwd[grid](
        x,
        weight,
        weight,
        active,
        active if targets is None else targets,
        part,
        N,
        V,
        N,
        H,
        *x.stride(),
        *weight.stride(),
        1.0,
        cols_per_split,
        HAS_BIAS=False,
        HAS_TARGETS=targets is not None,
        COMPUTE_ENTROPY=targets is not None,
        ACC=tl.float32,
        DOT_DTYPE=lin.dot_dtype(hidden),
        BLOCK_M=bm,
        BLOCK_V=bv,
        BLOCK_H=bh,
        num_warps=warps,
        num_stages=stages,
        enable_fp_fusion=True,
    )
    m_k, s_k = part[0], part[1]
    m = torch.where(s_k > 0, m_k, -float("inf")).amax(0)
    return m * lin.LOG2E.value + torch.log2((torch.exp2((m_k - m) * lin.LOG2E.value) * s_k).sum(0))


# the backward's grad_z kernel: the first is what `launch_config(one_head=True)` ships for it (the forward's tiles)
BWD_CONFIGS = [
    (128, 256, 64, 8, 3),
    (64, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 32, 8, 3),
]


def row_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(2, N) fp32 [max z, log2 sum 2^y]: what the library's forward saves for the backward (T = 1)."""
    active = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    m, log2_s, _, _ = lin.row_stats(hidden, weight, None, active, targets, 1.0, False, torch.float32)
    return torch.stack([m, log2_s])


def grad_z(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    stats: torch.Tensor,
    grad_logp: torch.Tensor,
    chunk: int,
    cfg: tuple,
) -> torch.Tensor:
    """(N, chunk) d logp / dz (times grad_logp) for vocabulary columns [0, chunk) (T = 1, no entropy, no bias)
    through `_linear_logprobs_bwd` with tiles `cfg`, from the forward's `row_stats`."""
    bm, bv, bh, warps, stages = cfg
    N, H = hidden.shape
    V = weight.shape[0]
    active = torch.ones(N, dtype=torch.bool, device=hidden.device)
    x = hidden.view(1, N, H)
    gz = torch.empty((N, chunk), dtype=hidden.dtype, device=hidden.device)
    ll._linear_logprobs_bwd[(triton.cdiv(N, bm), triton.cdiv(chunk, bv))](
        x,
        weight,
        weight,
        active,
        targets,
        stats,
        stats,
        grad_logp,
        stats,
        gz,
        gz,
        N,
        V,
        N,
        H,
        *x.stride(),
        *weight.stride(),
        1.0,
        0,
        chunk,
        gz.stride(0),
        HAS_BIAS=False,
        HAS_GRAD_LOGP=True,
        HAS_GRAD_ENT=False,
        NEED_DB=False,
        ACC=tl.float32,
        DOT_DTYPE=lin.dot_dtype(hidden),
        BLOCK_M=bm,
        BLOCK_V=bv,
        BLOCK_H=bh,
        num_warps=warps,
        num_stages=stages,
        enable_fp_fusion=True,
    )
    return gz


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--out", default="tune_linear.json")
    ap.add_argument("--entropy", action="store_true", help="with targets and the entropy sum (the trainer's launch)")
    ap.add_argument("--backward", action="store_true", help="the backward's grad_z kernel instead of the forward")
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop starting configs after this many seconds")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_linear: needs a CUDA GPU", file=sys.stderr)
        return 2
    t_end = time.monotonic() + args.budget_s
    g = torch.Generator(device="cuda").manual_seed(0)
    M, H, V = args.rows, args.hidden, args.vocab
    hidden = torch.randn(M, H, device="cuda", generator=g).div_(H**0.5).bfloat16()
    weight = torch.randn(V, H, device="cuda", generator=g).bfloat16()
    targets = torch.randint(0, V, (M,), device="cuda", generator=g) if args.entropy or args.backward else None
    if args.backward:  # one chunk of grad_z, as the library sizes it; the forward's statistics computed once
        chunk = lin.chunk_cols(M, V, 256, hidden.device, hidden.element_size())
        grad_logp, stats = torch.randn(M, device="cuda", generator=g), row_stats(hidden, weight, targets)
        configs, flops = BWD_CONFIGS, 2 * M * chunk * H
        mm_ms = triton.testing.do_bench(lambda: hidden @ weight[:chunk].T, warmup=50, rep=300, return_mode="median")
        run = lambda cfg: grad_z(hidden, weight, targets, stats, grad_logp, chunk, cfg)  # noqa: E731
        what = f"grad_z of {chunk} columns"
    else:
        configs, flops = CONFIGS, 2 * M * V * H
        mm_ms = triton.testing.do_bench(lambda: hidden @ weight.T, warmup=50, rep=300, return_mode="median")
        run = lambda cfg: lse(hidden, weight, cfg, targets)  # noqa: E731
        what = f"targets + entropy {args.entropy}"
    print(
        f"{torch.cuda.get_device_name()}: M x H x V = {M} x {H} x {V} bf16, {what}; torch matmul {mm_ms:.2f} ms = "
        f"{flops / mm_ms / 1e9:.0f} TFLOP/s",
        flush=True,
    )
    base = run(configs[0]).float()
    rows = []
    print("| BLOCK_M | BLOCK_V | BLOCK_H | warps | stages | ms | TFLOP/s | % matmul | max abs diff vs the first |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cfg in configs:
        if time.monotonic() > t_end:
            rows.append({"config": cfg, "status": "skipped: time budget"})
            continue
        try:
            diff = (run(cfg).float() - base).abs().max().item()
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=25, rep=300, return_mode="median")
        except Exception as e:  # out of shared memory / registers: record and go on
            rows.append({"config": cfg, "status": f"{type(e).__name__}: {str(e)[:200]}"})
            print(f"| {' | '.join(map(str, cfg))} | - | - | - | {type(e).__name__} |", flush=True)
            continue
        tf = flops / ms / 1e9
        rows.append(
            {
                "config": cfg,
                "ms": ms,
                "tflops": tf,
                "pct_matmul": 100 * mm_ms / ms,
                "max_abs_diff": diff,
                "status": "ok",
            }
        )
        print(
            f"| {' | '.join(map(str, cfg))} | {ms:.2f} | {tf:.0f} | {100 * mm_ms / ms:.1f} | {diff:.1e} |", flush=True
        )
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"M": M, "H": H, "V": V},
        "entropy": args.entropy,
        "backward": args.backward,
        "what": what,
        "matmul_ms": mm_ms,
        "config_fields": "BLOCK_M, BLOCK_V, BLOCK_H, num_warps, num_stages",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
