"""Measure the GPU's fp32 exp2, division and tl.dot as compiled Triton runs them, against fp64, to calibrate
tests/gpu_math.py (the interpreter's model of ex2.approx.ftz.f32, div.full.f32 and the fp32 dot's FMA chain).

    python benchmarks/tools/gpu_math_probe.py --out probe.json            # on a GPU: the hardware (~5 s)
    python benchmarks/tools/gpu_math_probe.py --model --out probe.json    # on CPU: tests/gpu_math.py's model

One Triton kernel stores tl.exp2(x), 1.0 / b and a / b for:
- exp2: every fp32 on the 2^-23 grid of [-1, 1) (2^24 values; `--quick`: a 2^-13 grid), then the grid's
  fractions k 2^-16 shifted by +8, -9 and -100 (is the relative error a function of frac(x) alone, as the
  model has it?), tiny arguments +-2^-k (k = 24..60, random mantissas: correctly rounded, as the model's
  fixed-point argument makes them?) and the integers -126..127 (exact?);
- 1 / b: every mantissa of [1, 2) (2^23; `--quick`: 2^13), and powers of two (exact?);
- a / b: 2^20 random pairs in [1, 2) x [1, 2) (`--quick`: 2^12).
Reported per function: the largest and mean error in ulps of the exact result, the share of correctly
rounded results (error <= 1/2 ulp) and the exactness checks; for exp2 also the largest relative error per
1/64 of frac(x) (the model assumes one bound for all). Errors against fp64 (exact for these).
A second kernel runs acc = tl.dot(a, b, acc) over K = 256 in slices of 16, as linear_logprobs does, on
(64, 256) @ (256, 64) with logit-like magnitudes, for fp32 operands (input_precision "ieee": FMA units) and
bf16 ones (tensor cores): the share of outputs bit-equal to the model's FMA chain over k (gpu_math.dot) and
to the correctly rounded exact sum, and the error against fp64 relative to sum_k |a_k b_k| (in fp32 eps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def _setup(model: bool):
    """Import triton (the interpreter off CUDA) and, with --model, install tests/gpu_math.py's model."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton
    import triton.language as tl

    if model:
        if torch.cuda.is_available():
            raise SystemExit("--model is the interpreter's model of a GPU: run it without CUDA")
        sys.path.insert(0, str(REPO / "tests"))
        import gpu_math

        gpu_math.install(seed=0)

    @triton.jit
    def probe(x_ptr, a_ptr, b_ptr, e_ptr, r_ptr, q_ptr, N, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        tl.store(e_ptr + i, tl.exp2(tl.load(x_ptr + i, mask=m, other=0.0)), mask=m)
        b = tl.load(b_ptr + i, mask=m, other=1.0)
        tl.store(r_ptr + i, 1.0 / b, mask=m)
        tl.store(q_ptr + i, tl.load(a_ptr + i, mask=m, other=1.0) / b, mask=m)

    @triton.jit
    def dot_probe(a_ptr, b_ptr, o_ptr, K, M: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        i = tl.arange(0, M)
        acc = tl.zeros([M, M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + i[:, None] * K + k[None, :]).to(DOT)
            b = tl.load(b_ptr + k[:, None] * M + i[None, :]).to(DOT)
            if DOT == tl.float32:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        tl.store(o_ptr + i[:, None] * M + i[None, :], acc)

    return triton, probe, dot_probe


def _dot(triton, dot_probe, device: str) -> dict:
    """tl.dot with its accumulator over K = 256 in slices of 16: fp32 (FMA units) and bf16 (tensor cores;
    fp32 operands under the interpreter, whose bf16 dot multiplies bit patterns as integers)."""
    sys.path.insert(0, str(REPO / "tests"))
    import gpu_math
    import triton.language as tl

    rng = np.random.default_rng(1)
    M, K = 64, 256
    out = {}
    for name, dt, tl_dt in (("dot_fp32", torch.float32, tl.float32), ("dot_bf16", torch.bfloat16, tl.bfloat16)):
        a = torch.from_numpy(rng.standard_normal((M, K)) * 8).to(dt).float()  # representable in dt
        b = torch.from_numpy(rng.standard_normal((K, M)) * (3 / K**0.5)).to(dt).float()
        o = torch.empty(M, M, device=device)
        dot = tl_dt if device == "cuda" else tl.float32
        dot_probe[(1,)](a.to(device), b.to(device), o, K, M=M, BLOCK_K=16, DOT=dot)
        y, an, bn = o.cpu().numpy(), a.numpy(), b.numpy()
        exact = an.astype(np.float64) @ bn.astype(np.float64)
        scale = np.abs(an).astype(np.float64) @ np.abs(bn).astype(np.float64) * np.finfo(np.float32).eps
        err = np.abs(y - exact) / scale
        chain = gpu_math.dot(an, bn, np.zeros((M, M), np.float32))
        out[name] = {
            "n": int(y.size),
            "equal_to_fma_chain": float(np.mean(y == chain)),
            "correctly_rounded": float(np.mean(y == exact.astype(np.float32))),
            "max_err_eps_sum_abs": float(err.max()),
            "mean_err_eps_sum_abs": float(err.mean()),
        }
    return out


def _run(triton, probe, x: np.ndarray, a: np.ndarray, b: np.ndarray, device: str) -> tuple[np.ndarray, ...]:
    n = max(len(x), len(b))
    pad = lambda v, fill: np.concatenate([v, np.full(n - len(v), fill, np.float32)])  # noqa: E731
    ins = [torch.from_numpy(pad(v, f)).to(device) for v, f in ((x, 0.0), (a, 1.0), (b, 1.0))]
    outs = [torch.empty(n, dtype=torch.float32, device=device) for _ in range(3)]
    block = 1024 if device == "cuda" else 1 << 16  # the interpreter runs a program per Python call
    probe[(triton.cdiv(n, block),)](*ins, *outs, n, BLOCK=block)
    e, r, q = (o.cpu().numpy() for o in outs)
    return e[: len(x)], r[: len(b)], q[: len(b)]


def _ulps(y: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|y - exact| in ulps of fp32 at exact (normal results only)."""
    e = np.abs(exact)
    ulp = np.exp2(np.floor(np.log2(e)) - 23)
    return np.abs(y.astype(np.float64) - exact) / ulp


def _summary(y: np.ndarray, exact: np.ndarray) -> dict:
    ok = np.isfinite(exact) & (np.abs(exact) >= np.finfo(np.float32).tiny)
    u = _ulps(y[ok], exact[ok])
    return {
        "n": int(ok.sum()),
        "max_ulp": float(u.max()),
        "mean_ulp": float(u.mean()),
        "correctly_rounded": float((u <= 0.5).mean()),
    }


def measure(quick: bool, model: bool) -> dict:
    triton, probe, dot_probe = _setup(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    grid_bits = 13 if quick else 23
    frac = np.arange(1 << grid_bits, dtype=np.float64) / (1 << grid_bits)  # [0, 1) on the grid
    grid = np.concatenate([frac - 1.0, frac]).astype(np.float32)  # [-1, 1)
    step = 1 << max(grid_bits - 16, 0)  # fractions k 2^-16 (or the coarser grid): exact in fp32 up to |x| < 128
    shifted = np.concatenate([frac[::step] + 8.0, frac[::step] - 9.0, frac[::step] - 100.0]).astype(np.float32)
    k = np.repeat(np.arange(24, 61), 64)
    tiny = (np.exp2(-k.astype(np.float64)) * rng.uniform(1, 2, len(k))).astype(np.float32)
    tiny = np.concatenate([tiny, -tiny])
    ints = np.arange(-126, 128, dtype=np.float32)
    x = np.concatenate([grid, shifted, tiny, ints])
    mant = (1.0 + np.arange(1 << grid_bits, dtype=np.float64) / (1 << grid_bits)).astype(np.float32)
    pairs = 1 << (12 if quick else 20)
    p2 = np.exp2(np.arange(-20, 21)).astype(np.float32)
    b = np.concatenate([mant, rng.uniform(1, 2, pairs).astype(np.float32), p2])
    a = np.concatenate(
        [
            np.ones(len(mant), np.float32),
            rng.uniform(1, 2, pairs).astype(np.float32),
            rng.uniform(1, 2, len(p2)).astype(np.float32),
        ]
    )
    e, r, q = _run(triton, probe, x, a, b, device)

    x64, e_exact = x.astype(np.float64), np.exp2(x.astype(np.float64))
    n_grid, n_shift, n_tiny = len(grid), len(shifted), len(tiny)
    sl = {
        "grid": slice(0, n_grid),
        "shifted": slice(n_grid, n_grid + n_shift),
        "tiny": slice(n_grid + n_shift, n_grid + n_shift + n_tiny),
        "ints": slice(len(x) - len(ints), len(x)),
    }
    rel = np.abs(e[sl["grid"]].astype(np.float64) / e_exact[sl["grid"]] - 1)
    bins = np.minimum((np.mod(x64[sl["grid"]], 1.0) * 64).astype(int), 63)
    per_bin = [float(rel[bins == i].max()) for i in range(64)]
    rel_pos = (e[sl["grid"]].astype(np.float64) / e_exact[sl["grid"]] - 1)[n_grid // 2 :]  # frac j / 2^grid_bits
    rel_shift = e[sl["shifted"]].astype(np.float64) / e_exact[sl["shifted"]] - 1
    rel_frac = np.tile(rel_pos[::step], 3)  # the same fractions' errors at [0, 1)
    n_m, n_p2 = len(mant), len(p2)
    r_exact, q_exact = 1.0 / b.astype(np.float64), a.astype(np.float64) / b.astype(np.float64)
    return {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else ("model: tests/gpu_math.py" if model else "interpreter"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "quick": quick,
        "exp2": {
            **_summary(e, e_exact),
            "max_rel_per_frac_64th": per_bin,
            "same_error_at_frac_shifted": float(np.mean(np.abs(rel_shift - rel_frac) < 2.0**-30)),
            "tiny_correctly_rounded": float(np.mean(_ulps(e[sl["tiny"]], e_exact[sl["tiny"]]) <= 0.5)),
            "tiny_max_ulp": float(_ulps(e[sl["tiny"]], e_exact[sl["tiny"]]).max()),
            "integers_exact": bool(np.all(e[sl["ints"]].astype(np.float64) == e_exact[sl["ints"]])),
        },
        "rcp": {
            **_summary(r[:n_m], r_exact[:n_m]),
            "powers_of_two_exact": bool(np.all(r[-n_p2:].astype(np.float64) == r_exact[-n_p2:])),
        },
        "div": {
            **_summary(q[n_m:], q_exact[n_m:]),
            "by_powers_of_two_exact": bool(np.all(q[-n_p2:].astype(np.float64) == q_exact[-n_p2:])),
        },
        **_dot(triton, dot_probe, device),
    }


def table(res: dict) -> str:
    rows = ["| function | n | max ulp | mean ulp | correctly rounded | checks |", "|---|---:|---:|---:|---:|---|"]
    for name in ("exp2", "rcp", "div"):
        s = res[name]
        checks = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in s.items()
            if k not in ("n", "max_ulp", "mean_ulp", "correctly_rounded", "max_rel_per_frac_64th")
        )
        rows.append(
            f"| {name} | {s['n']} | {s['max_ulp']:.3f} | {s['mean_ulp']:.3f} | {s['correctly_rounded']:.4f} | {checks} |"
        )
    rows += [
        "",
        "| dot (K = 256, slices of 16) | n | = FMA chain | correctly rounded | max err | mean err |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("dot_fp32", "dot_bf16"):
        d = res[name]
        rows.append(
            f"| {name} | {d['n']} | {d['equal_to_fma_chain']:.4f} | {d['correctly_rounded']:.4f} | "
            f"{d['max_err_eps_sum_abs']:.3f} | {d['mean_err_eps_sum_abs']:.3f} |"
        )
    worst = max(res["exp2"]["max_rel_per_frac_64th"])
    return (
        f"{res['device']}, triton {res['triton']}: exp2 max relative error {worst:.3g} (2^{math.log2(worst):.2f})\n"
        + "\n".join(rows)
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="coarser grids (the CPU default: the interpreter is slow)")
    ap.add_argument("--model", action="store_true", help="CPU only: measure tests/gpu_math.py's model instead")
    args = ap.parse_args(argv)
    res = measure(args.quick or not torch.cuda.is_available(), args.model)
    args.out.write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
