"""GAE: the Triton reverse scan (`fastrlhf.kernels.gae.gae`) vs the Python loop over T (`gae_ref`, the
same loop as `fastrlhf.trainer.rl.gae`), for B in (8, 64) and T in (512 ... 8192).

    python benchmarks/bench_gae.py --out out/gae          # CUDA: the grid, markdown table + gae.json
    python benchmarks/bench_gae.py --out /tmp/gae         # no CUDA: says so, times only the loop, small case

Timing is `measure.median_ms` (on CUDA `triton.testing.do_bench`, median, L2 flushed before each call)
over a closure rotating among pre-allocated input sets. Minimum bytes = read rewards, values and mask
once + write the two fp32 outputs = B*T*(b_r + b_v + 1 + 8); achieved GB/s and % of the device-to-device
copy bandwidth measured in the same run (`measure.copy_bandwidth_gbs`). At these sizes (<= 9 MB) the scan
is latency-bound (one sequential chain of chunks per row), so % of copy bandwidth is low by nature; the
number to read is the time and the speedup over the loop. `max_abs_err` is the kernel against the fp32
loop on the first input set (their rounding orders differ: a few ulps of max |A| is expected).

This is a script, not a pytest-benchmark suite: it defines no test functions, so `pytest benchmarks/`
collects nothing from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402

from fastrlhf.kernels.gae import gae, gae_ref  # noqa: E402

BATCHES = (8, 64)
SEQS = (512, 1024, 2048, 4096, 8192)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GAMMA, LAM = 1.0, 0.95


def input_sets(B: int, T: int, dtype: torch.dtype, device: torch.device, n: int, seed: int = 0) -> list[tuple]:
    """n sets of right-padded (rewards, values, mask): lengths uniform in [T/2, T], a terminal reward at
    the last real token on top of small per-token (KL-shaped) rewards; random, never zeros."""
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(n):
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        rewards = 0.05 * torch.randn(B, T, generator=gen)
        rewards[torch.arange(B), lengths - 1] += torch.randn(B, generator=gen)
        values = torch.randn(B, T, generator=gen)
        sets.append((rewards.to(device, dtype), values.to(device, dtype), mask.to(device)))
    return sets


def min_bytes(B: int, T: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return B * T * (2 * itemsize + 1 + 2 * 4)


def run_cell(
    B: int, T: int, dtype: torch.dtype, device: torch.device, copy_bw: float | None, ref_max_t: int, kernel: bool = True
) -> dict:
    nbytes = min_bytes(B, T, dtype)
    sets = input_sets(B, T, dtype, device, measure.n_input_sets(nbytes))
    row: dict = {"B": B, "T": T, "dtype": str(dtype).removeprefix("torch."), "min_bytes": nbytes}
    providers = {"triton": gae} if kernel else {}
    if T <= ref_max_t:
        providers["loop"] = gae_ref
    outs = {}
    for name, fn in providers.items():
        outs[name] = fn(*sets[0], gamma=GAMMA, lam=LAM)[0]  # first call: compile, and the error check
        ms, method = measure.median_ms(
            measure.rotating(lambda i: fn(*sets[i], gamma=GAMMA, lam=LAM), len(sets)), device
        )
        gbs = measure.gb_per_s(nbytes, ms)
        row.update(
            {
                f"{name}_ms": ms,
                f"{name}_gb_s": gbs,
                "timing": method,
                f"{name}_pct_copy_bw": 100 * gbs / copy_bw if gbs and copy_bw else None,
            }
        )
    if "triton" in outs and "loop" in outs:
        row["speedup"] = row["loop_ms"] / row["triton_ms"]
        row["max_abs_err"] = (outs["triton"] - outs["loop"]).abs().max().item()
    return row


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def markdown(rows: list[dict], meta: dict) -> str:
    head = (
        f"GAE (gamma={GAMMA}, lam={LAM}) on {meta['gpu_name'] or 'CPU'}, torch {meta['torch']}, "
        f"triton {meta['triton']}; copy bandwidth {_f(meta['copy_bw_gbs'], 4)} GB/s"
    )
    lines = [
        head,
        "",
        "| B | T | dtype | triton ms | GB/s | % copy bw | loop ms | speedup | max abs err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} | {r['T']} | {r['dtype']} | {_f(r.get('triton_ms'))} | {_f(r.get('triton_gb_s'))} "
            f"| {_f(r.get('triton_pct_copy_bw'), 2)} | {_f(r.get('loop_ms'))} | {_f(r.get('speedup'))} "
            f"| {_f(r.get('max_abs_err'), 2)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="folder for gae.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="rewards / values dtype")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--seqs", type=int, nargs="+", default=list(SEQS))
    p.add_argument("--ref-max-t", type=int, default=max(SEQS), help="time the Python loop only up to this T")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = measure.environment(device)
    meta["copy_bw_gbs"] = measure.copy_bandwidth_gbs(device)
    rows = []
    if device.type == "cuda":
        for B in args.batches:
            for T in args.seqs:
                rows.append(run_cell(B, T, DTYPES[args.dtype], device, meta["copy_bw_gbs"], args.ref_max_t))
                print(f"[bench_gae] B={B} T={T}: {rows[-1]}", flush=True)
    else:
        print(
            "[bench_gae] no CUDA device: the Triton kernel is not timed (the interpreter's timings mean "
            "nothing); timing only the Python loop (gae_ref) on B=8, T=512 on the CPU.",
            flush=True,
        )
        rows.append(run_cell(8, 512, DTYPES[args.dtype], device, None, 512, kernel=False))
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "gamma": GAMMA, "lam": LAM, "rows": rows}
    (args.out / "gae.json").write_text(json.dumps(doc, indent=2))
    print("\n" + markdown(rows, meta), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
