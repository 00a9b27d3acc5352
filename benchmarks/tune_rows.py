"""Tile sweep of the two row-streaming FORWARD kernels that missed their targets on the H200, on a GPU:
`token_logprobs` (85.5% of copy bandwidth, target 90) and `full_kl` (its forward is the compute-bound
half of fwd+bwd: 51.3%, target 85).

    python benchmarks/tune_rows.py [--rows 8192] [--vocab 151936] [--out tune_rows.json] [--budget-s 90]

Both kernels stream each row through the vocabulary in BLOCK_V chunks, one row per program at large
vocabularies (`_common.row_blocks`: BLOCK_V 4096 on CUDA, num_warps from `num_warps_for`, Triton's default
num_stages). This launches the same kernels under several (BLOCK_V, num_warps, num_stages) and prints
ms and % of the copy bandwidth measured in the same run (minimum bytes: token_logprobs reads the logits
once, N*V*2; full_kl reads both, N*V*4), so the next change to `row_blocks` / `num_warps_for` is a
measured one. Each config's output is checked against the library function's (max |diff|): a faster config
must compute the same thing. The launch code repeats the launchers' `_forward` (on purpose: the library's
launchers take no tile arguments); tests/test_benchmarks_smoke.py runs it on the interpreter against the
library so it cannot drift.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402

from fastrlhf.kernels._common import num_warps_for, row_blocks  # noqa: E402

tlp = importlib.import_module("fastrlhf.kernels.token_logprobs")  # the modules: the package exports functions
fkl = importlib.import_module("fastrlhf.kernels.full_kl")

# (BLOCK_V, num_warps, num_stages); None = the library's own choice (the first row: what ships)
CONFIGS = [
    (None, None, None),
    (2048, 4, 2),
    (2048, 8, 3),
    (4096, 4, 3),
    (4096, 8, 1),
    (4096, 8, 2),
    (4096, 8, 4),
    (4096, 16, 3),
    (8192, 8, 3),
    (8192, 16, 2),
    (8192, 16, 3),
    (16384, 16, 2),
    (16384, 32, 2),
]


def _launch_options(N: int, V: int, device: torch.device, cfg: tuple) -> tuple[int, int, dict]:
    """(BLOCK_R, BLOCK_V, launch kwargs) for `cfg`; (None, None, None) gives the library's."""
    block_r, block_v = row_blocks(N, V, device)
    bv, warps, stages = cfg
    if bv is None:
        return block_r, block_v, {"num_warps": num_warps_for(block_r * block_v)}
    return 1, bv, {"num_warps": warps, "num_stages": stages}


def token_logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, cfg: tuple) -> torch.Tensor:
    """(N, V) logits, (N,) targets -> (N,) fp32 log-probs (T = 1) through `_token_logprobs_fwd` with `cfg`."""
    N, V = logits.shape
    x = logits.view(1, N, V)
    block_r, block_v, opts = _launch_options(N, V, logits.device, cfg)
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    stats = torch.empty((2, N), dtype=torch.float32, device=logits.device)
    tlp._token_logprobs_fwd[(triton.cdiv(N, block_r),)](
        x, targets, logp, logp, stats, N, V, N, x.stride(0), x.stride(1), 1.0, -100,
        COMPUTE_ENTROPY=False, ACC=tl.float32, BLOCK_R=block_r, BLOCK_V=block_v, **opts,
    )  # fmt: skip
    return logp


def full_kl_fwd(logits: torch.Tensor, ref_logits: torch.Tensor, cfg: tuple) -> torch.Tensor:
    """(N, V) policy and reference logits -> (N,) fp32 KL (T = 1) through `_full_kl_fwd` with `cfg`."""
    N, V = logits.shape
    x, y = logits.view(1, N, V), ref_logits.view(1, N, V)
    block_r, block_v, opts = _launch_options(N, V, logits.device, cfg)
    kl = torch.empty(N, dtype=torch.float32, device=logits.device)
    stats = torch.empty((4, N), dtype=torch.float32, device=logits.device)
    fkl._full_kl_fwd[(triton.cdiv(N, block_r),)](
        x, y, kl, kl, stats, N, V, N, x.stride(0), x.stride(1), y.stride(0), y.stride(1), 1.0,
        HAS_MASK=False, ACC=tl.float32, BLOCK_R=block_r, BLOCK_V=block_v, **opts,
    )  # fmt: skip
    return kl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--out", default="tune_rows.json")
    ap.add_argument("--budget-s", type=float, default=90.0, help="stop starting configs after this many seconds")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_rows: needs a CUDA GPU", file=sys.stderr)
        return 2
    t_end = time.monotonic() + args.budget_s
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    N, V = args.rows, args.vocab
    logits = (torch.randn(N, V, device=dev, generator=g) * 2).bfloat16()
    ref_logits = (logits.float() + 0.05 * torch.randn(N, V, device=dev, generator=g)).bfloat16()
    targets = torch.randint(0, V, (N,), device=dev, generator=g)
    copy = measure.copy_bandwidth_gbs(dev)
    print(f"{torch.cuda.get_device_name()}: N x V = {N} x {V} bf16; copy {copy:.0f} GB/s", flush=True)
    ops = {
        "token_logprobs": (lambda cfg: token_logprobs_fwd(logits, targets, cfg), N * V * 2,
                           tlp.token_logprobs(logits, targets)),
        "full_kl": (lambda cfg: full_kl_fwd(logits, ref_logits, cfg), N * V * 4, fkl.full_kl(logits, ref_logits)),
    }  # fmt: skip
    rows = []
    print("| op | BLOCK_V | warps | stages | ms | % of copy bw | max abs diff vs library |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for op, (run, nbytes, want) in ops.items():
        for cfg in CONFIGS:
            if time.monotonic() > t_end:
                rows.append({"op": op, "config": cfg, "status": "skipped: time budget"})
                continue
            label = " | ".join("lib" if c is None else str(c) for c in cfg)
            try:
                diff = (run(cfg) - want).abs().max().item()
                ms = triton.testing.do_bench(lambda: run(cfg), warmup=25, rep=200, return_mode="median")
            except Exception as e:  # out of registers / shared memory: record and go on
                rows.append({"op": op, "config": cfg, "status": f"{type(e).__name__}: {str(e)[:200]}"})
                print(f"| {op} | {label} | - | - | {type(e).__name__} |", flush=True)
                continue
            pct = 100 * nbytes / (ms * 1e-3) / 1e9 / copy
            rows.append({"op": op, "config": cfg, "ms": ms, "pct_copy": pct, "max_abs_diff": diff, "status": "ok"})
            print(f"| {op} | {label} | {ms:.3f} | {pct:.1f} | {diff:.1e} |", flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": measure.git_commit(), "shape": {"N": N, "V": V}, "copy_bw_gbs": copy,
            "config_fields": "BLOCK_V, num_warps, num_stages (None: the library's)",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
