"""Tile sweep of the two row-streaming FORWARD kernels that missed their targets on the H200, on a GPU:
`token_logprobs` (85.5% of copy bandwidth, target 90) and `full_kl` (its forward is the compute-bound
half of fwd+bwd: 51.3%, target 85).

    python benchmarks/tools/tune_rows.py [--rows 8192] [--vocab 151936] [--out tune_rows.json] [--budget-s 90]

Both kernels stream each row through the vocabulary in BLOCK_V chunks, one row per program at large
vocabularies; each op's `fwd_tiles` is its whole launch (token_logprobs: 4096 columns x 8 warps; full_kl:
2048 x 4 warps at 80 registers). This launches the same kernels under several (BLOCK_V, num_warps, loop
pipelining STAGES, register cap) and prints ms and % of the copy bandwidth measured in the same run
(minimum bytes: token_logprobs reads the logits once, N*V*2; full_kl reads both, N*V*4), so the next change
to the tiles is a measured one. Each config's output is checked against the library function's (max
|diff|): a faster config must compute the same thing. The launch code repeats the launchers' `_forward` (on
purpose: the library's launchers take no tile arguments); tests/test_benchmarks_smoke.py runs it on the
interpreter against the library so it cannot drift.

Without a GPU, `--sass` compiles the same launches for sm_90 (scripts/aot_compile.py's fake device and
the ptxas in the triton wheel) and reads the streaming loop of each cubin: registers, spills, SASS
instructions per element by pipe on the path that skips the loop's `if` blocks (their size per iteration
is the `if-block` column: full_kl's rescale, taken only when a running maximum moves), and from them a
compute floor (the busiest limit: instruction issue, 128 per clock per SM, or one pipe's rate) beside the
memory floor (minimum bytes / copy bandwidth); the library's two backward kernels get a row each too. A
kernel whose compute floor is above its memory floor cannot reach the copy bandwidth with any tiles:

    python benchmarks/tools/tune_rows.py --sass [--arch 90] [--sms 132 --clock-ghz 1.98 --copy-gbs 4246]

The floors are a model, not a measurement: real kernels issue below the peak rate, and the GPU host's
Triton may schedule differently from this one. Calibration (H200, results/2026-11-27-h200, run 1; its
kernels counted the same way here): full_kl's forward
had 73.6 instructions per element, a 2.74 ms issue floor at 1.98 GHz, and ran in 3.89 ms (70% of the
issue rate); token_logprobs' forward, 10.8 per element, is memory-bound (floor 0.59 ms, ran 0.686 ms).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/measure.py
import measure  # noqa: E402

from fastrlhf.kernels._common import row_layout  # noqa: E402

tlp = importlib.import_module("fastrlhf.kernels.token_logprobs")  # the modules: the package exports functions
fkl = importlib.import_module("fastrlhf.kernels.full_kl")

# (BLOCK_V, num_warps, STAGES, maxnreg) per op; the first row, None, is the library's own launch (what
# ships). STAGES is the streaming loop's pipelining depth (1: plain loads; k > 1: Triton's software pipeliner
# copies the next k - 1 blocks to shared memory while one computes); maxnreg caps registers per thread (None:
# the compiler's choice), which sets how many blocks fit on an SM. The launch's own num_stages does nothing
# to these loops (same SASS for 1-4) and keeps Triton's default.
CONFIGS = {
    "token_logprobs": [
        None,  # 4096 x 8 warps, STAGES 1
        (4096, 8, 2, None),
        (4096, 8, 3, None),
        (2048, 4, 1, None),
        (2048, 4, 2, None),
        (8192, 8, 1, None),
        (8192, 16, 1, None),
        (8192, 16, 2, None),
        (16384, 16, 1, None),
        (16384, 32, 1, None),
    ],
    "full_kl": [
        # most telling first: the time budget (an equal share per op) may skip the last rows
        None,  # 2048 x 4 warps, STAGES 1, 80 registers (6 blocks per SM)
        (512, 1, 1, 80),  # one warp a row: no barrier nor shared memory in the loop, 25 warps per SM
        (2048, 4, 1, 88),  # 5 blocks per SM, no spill
        (2048, 4, 1, None),  # 96 registers (triton 3.9 and 3.6): 5 blocks per SM
        (4096, 8, 1, None),  # uncapped: 100-128 registers, 2 blocks per SM (the measured kernel's tiles)
        (2048, 4, 1, 64),  # 8 blocks per SM; both versions spill (84-132 bytes)
        (4096, 4, 1, None),  # 32 elements a thread: 31.2-31.3 per element, 168 registers
        (2048, 4, 2, 80),  # the library's, pipelined
        (4096, 8, 1, 80),  # 3 blocks per SM
        (2048, 4, 2, None),
        (4096, 8, 2, None),
    ],
}


def _launch_options(rows: tuple, cfg: tuple | None, library) -> dict:
    """The launch options of `cfg` for the (A, B, V) row views `rows` (policy, and the reference's for
    full_kl): the library's own (`library`: the op's `fwd_tiles`) for None; for a sweep row one row a program,
    the library's layout (`row_layout`) and the row's BLOCK_V, num_warps, STAGES and register cap."""
    if cfg is None:
        return library(*rows)
    bv, warps, stages, maxnreg = cfg
    return {
        "BLOCK_R": 1,
        "BLOCK_V": bv,
        **row_layout(1, bv, *rows),
        "num_warps": warps,
        "STAGES": stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    }


def token_logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, cfg: tuple | None) -> torch.Tensor:
    """(N, V) logits, (N,) targets -> (N,) fp32 log-probs (T = 1) through `_token_logprobs_fwd` with `cfg`."""
    N, V = logits.shape
    x = logits.view(1, N, V)
    opts = _launch_options((x,), cfg, tlp.fwd_tiles)
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    stats = torch.empty((2, N), dtype=torch.float32, device=logits.device)
    tlp._token_logprobs_fwd[(triton.cdiv(N, opts["BLOCK_R"]),)](
        x,
        targets,
        logp,
        logp,
        stats,
        N,
        V,
        N,
        x.stride(0),
        x.stride(1),
        1.0,
        -100,
        COMPUTE_ENTROPY=False,
        ACC=tl.float32,
        enable_fp_fusion=True,
        **opts,
    )
    return logp


def full_kl_fwd(logits: torch.Tensor, ref_logits: torch.Tensor, cfg: tuple | None) -> torch.Tensor:
    """(N, V) policy and reference logits -> (N,) fp32 KL (T = 1) through `_full_kl_fwd` with `cfg`."""
    N, V = logits.shape
    x, y = logits.view(1, N, V), ref_logits.view(1, N, V)
    opts = _launch_options((x, y), cfg, fkl.fwd_tiles)
    kl = torch.empty(N, dtype=torch.float32, device=logits.device)
    stats = torch.empty((4, N), dtype=torch.float32, device=logits.device)
    fkl._full_kl_fwd[(triton.cdiv(N, opts["BLOCK_R"]),)](
        x,
        y,
        kl,
        kl,
        stats,
        N,
        V,
        N,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        1.0,
        HAS_MASK=False,
        ACC=tl.float32,
        enable_fp_fusion=True,
        **opts,
    )
    return kl


def _shown(op: str, logits: torch.Tensor, cfg: tuple | None) -> tuple:
    """(BLOCK_V, num_warps, STAGES, register cap or '-') of `cfg`'s launch for `op` on the (N, V) `logits`."""
    x = logits.view(1, *logits.shape)
    opts = _launch_options(
        (x,) if op == "token_logprobs" else (x, x), cfg, tlp.fwd_tiles if op == "token_logprobs" else fkl.fwd_tiles
    )
    return opts["BLOCK_V"], opts["num_warps"], opts["STAGES"], opts.get("maxnreg", "-")


OPS = ("token_logprobs", "full_kl")
# bf16, per element of the N x V logits: the minimum bytes of a forward, and of the backward (read what the
# forward read again, write the logits' gradient)
BYTES_PER_ELEMENT = {
    ("token_logprobs", "fwd"): 2,
    ("full_kl", "fwd"): 4,
    ("token_logprobs", "bwd"): 4,
    ("full_kl", "bwd"): 6,
}


def _library_backward(op: str, logits, ref_logits, targets) -> None:
    """The library's backward launch for `op` (its forward launches too; the caller keeps the `_bwd` one)."""
    x = logits.detach().requires_grad_()
    out = tlp.token_logprobs(x, targets) if op == "token_logprobs" else fkl.full_kl(x, ref_logits)
    torch.autograd.grad(out.sum(), [x])


def sass_report(args) -> int:
    """--sass: every (op, config) forward, and the library's backward, compiled for sm_{arch} without a
    GPU; prints a markdown table, writes JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import aot_compile  # here, not at the top: it must be imported before triton is (no interpreter)
    from triton.backends.compiler import GPUTarget

    reason = aot_compile.unavailable_reason()
    if reason:
        print(f"tune_rows --sass: {reason}", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    # The launches only need the right dtypes, strides and tiles; 16 rows (a multiple of 16, as 8192 is, so
    # the same integer specialisations) and torch.empty: nothing is computed
    n, V = 16, args.vocab
    logits, ref_logits = torch.empty(n, V, dtype=torch.bfloat16), torch.empty(n, V, dtype=torch.bfloat16)
    targets = torch.zeros(n, dtype=torch.long)
    launch = {
        "token_logprobs": lambda cfg: token_logprobs_fwd(logits, targets, cfg),
        "full_kl": lambda cfg: full_kl_fwd(logits, ref_logits, cfg),
    }
    cases = [(op, "fwd", cfg) for op in args.ops for cfg in CONFIGS[op]] + [(op, "bwd", None) for op in args.ops]
    elements = args.rows * V
    print(
        f"sm_{args.arch}, {args.sms} SMs at {args.clock_ghz} GHz, copy {args.copy_gbs:.0f} GB/s; "
        f"N x V = {args.rows} x {V} bf16 (triton {triton.__version__}); bwd: the library's backward"
    )
    print(
        "| op | pass | tiles | BLOCK_V | warps | stages | cap | regs | spill B | instr/elem | fp32 | alu | mufu "
        "| if-block | bound | compute floor ms | memory floor ms | best % of copy |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    rows = []
    for op, mode, cfg in cases:
        if mode == "fwd":
            (rec,) = aot_compile.record(lambda: launch[op](cfg), target)
        else:
            recs = aot_compile.record(lambda: _library_backward(op, logits, ref_logits, targets), target)
            (rec,) = [r for r in recs if r["kernel"].endswith("_bwd")]
        row = {"op": op, "pass": mode, "config": cfg, "launch": aot_compile.describe(rec)}
        try:
            cost = aot_compile.loop_cost(rec, target)
        except Exception as e:  # out of shared memory / registers: record and go on
            rows.append({**row, "status": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        res, loop, per = cost["resources"], cost["loop"], cost["per_element"]
        compute_ms = elements * cost["clocks_per_element"] / (args.sms * args.clock_ghz * 1e9) * 1e3
        memory_ms = elements * BYTES_PER_ELEMENT[(op, mode)] / (args.copy_gbs * 1e9) * 1e3
        row.update(
            status="ok",
            **cost,
            compute_floor_ms=compute_ms,
            memory_floor_ms=memory_ms,
            best_pct_copy=100 * memory_ms / max(compute_ms, memory_ms),
        )
        rows.append(row)
        print(
            f"| {op} | {mode} | {'library' if cfg is None else 'sweep'} | {rec['consts']['BLOCK_V']} "
            f"| {rec['num_warps']} | {rec['consts'].get('STAGES', '-')} | {rec['options'].maxnreg or '-'} "
            f"| {res.get('reg', '?')} "
            f"| {res.get('spill_stores', 0)} | {per['instructions']:.1f} | {per['fp32']:.1f} | {per['alu']:.1f} "
            f"| {per['mufu']:.2f} | {loop['conditional']} | {cost['bound']} | {compute_ms:.3f} | {memory_ms:.3f} "
            f"| {row['best_pct_copy']:.0f} |",
            flush=True,
        )
    meta = {
        "mode": "sass (compiled, not run)",
        "arch": args.arch,
        "sms": args.sms,
        "clock_ghz": args.clock_ghz,
        "copy_gbs": args.copy_gbs,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "commit": measure.git_commit(),
        "shape": {"N": args.rows, "V": V},
        "pipes": {k: {"per_clock_per_sm": r, "opcodes": sorted(o)} for k, (r, o) in aot_compile.PIPES.items()},
        "issue_per_clock_per_sm": aot_compile.ISSUE_PER_CLK,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        print(f"{r['op']} {r['pass']} {r['config']}: {r['status']}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--out", default="tune_rows.json")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=90.0,
        help="stop starting configs after this many seconds (each op gets an equal share)",
    )
    ap.add_argument("--sass", action="store_true", help="no GPU: compile for --arch and count instructions instead")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--arch", type=int, default=90, help="--sass: compute capability (90: H100/H200)")
    ap.add_argument("--sms", type=int, default=132, help="--sass: SMs (H100 SXM / H200: 132)")
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="--sass: SM clock (H100 SXM / H200 boost: 1.98)")
    ap.add_argument(
        "--copy-gbs",
        type=float,
        default=4246.0,
        help="--sass: copy bandwidth for the memory floor (default: the H200's in results/2026-11-27-h200)",
    )
    args = ap.parse_args(argv)
    if args.sass:
        return sass_report(args)
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
        "token_logprobs": (
            lambda cfg: token_logprobs_fwd(logits, targets, cfg),
            N * V * 2,
            tlp.token_logprobs(logits, targets),
        ),
        "full_kl": (lambda cfg: full_kl_fwd(logits, ref_logits, cfg), N * V * 4, fkl.full_kl(logits, ref_logits)),
    }
    ops = {op: ops[op] for op in args.ops}
    rows = []
    print("| op | tiles | BLOCK_V | warps | stages | cap | ms | % of copy bw | max abs diff vs library |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, (op, (run, nbytes, want)) in enumerate(ops.items()):
        op_end = time.monotonic() + (t_end - time.monotonic()) / (len(ops) - i)  # an equal share of what is left
        for cfg in CONFIGS[op]:
            if time.monotonic() > op_end:
                rows.append({"op": op, "config": cfg, "status": "skipped: time budget"})
                continue
            label = ("library | " if cfg is None else "sweep | ") + " | ".join(map(str, _shown(op, logits, cfg)))
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
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": measure.git_commit(),
        "shape": {"N": N, "V": V},
        "copy_bw_gbs": copy,
        "config_fields": "BLOCK_V, num_warps, STAGES (loop pipelining), maxnreg (None: the library's launch)",
        "library": {op: _shown(op, logits, None) for op in ops},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
