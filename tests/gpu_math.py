"""A model of an NVIDIA GPU's approximate fp32 arithmetic for Triton's interpreter (opt-in: FASTRLHF_GPU_MATH=1).

Compiled for an NVIDIA GPU, Triton evaluates fp32 `tl.exp2` as ex2.approx.ftz.f32 (MUFU.EX2), `tl.exp(x)` as that
of the rounded product x * log2(e), and `a / b` as div.full.f32 (MUFU.RCP, then a rounded product); the
interpreter takes numpy's (division correctly rounded, exp2 nearly so). So a kernel can meet the precision
contract on CPU and miss it on a GPU. `install()` replaces the interpreter's exp2, exp, division and fp32
tl.dot with models of the hardware:
- exp2: the argument in fixed point with 2^-23 resolution (2^x is exact at integers, 2^-tiny is 1), times a
  relative error of at most 2^-23.5, subnormal results flushed to 0 (.ftz).
- a / b: a * rcp(b), rcp within 1 ulp (exact for powers of two), the product rounded: within ~2 ulp.
- tl.dot of fp32 operands (input_precision "ieee"): Triton lowers it to FMA instructions, one chain per output
  element over k in order from the accumulator passed in, acc = fma(a[:, k], b[k, :], acc); the interpreter
  takes numpy's matmul (whatever order the BLAS picks) and then adds the accumulator. Modelled exactly, up to a
  rare double rounding (each step's exact sum is rounded to fp64, then to fp32). OpenBLAS's small-tile kernels
  chain FMAs over k too (on this project's tiles the two agree), but the model does not depend on a BLAS.
  Under the interpreter bf16 operands run as fp32 (_linear.dot_dtype): there the chain stands in for
  the tensor cores' fp32 accumulation.
Each error is a fixed pseudo-random function of the operands (the hardware's are deterministic too: identical
inputs still give identical outputs); FASTRLHF_GPU_MATH_SEED picks another function. tl.log / tl.log2 (libdevice
on a GPU, accurate), `tl.div_rn` and everything else keep the interpreter's exact rounding. FMA contraction of
a separate multiply and add, which the GPU build also applies (`enable_fp_fusion=True`), is not modelled.

It is a model, not the hardware's tables: the bounds are the documented ones, the error within them a guess
(benchmarks/tools/gpu_math_probe.py measures the real functions on a GPU, and this model's on CPU). The one check
against a GPU is the H200 run in results/2026-11-27-h200: under this model those kernels pass
every test of tests/test_gpu_math.py's selection, as they did there. Cruder models failed tests the H200
passed: a full 2^-22 on every exp2 (2^0 included: confident rows' gradients), and rcp within 2 ulp (two
ppo_head tests at T = 0.7). The fp32 dot explains the two fp32 contract failures of linear_logprobs on the H200
(that run): the logits as compiled then (one chain over H = 40 from 0, the bias last) give, under
the model, errors of 2.06e-5 (KL "confident", grad hidden) and 3.31e-6 (logp "offset_plus20", grad bias) where
the H200 measured 2.01e-5 and 3.42e-6. The test failed there because cuBLAS's eager logits were 3-5x better
than a chain (6.85e-6, 6.55e-7; the CPU's BLAS: 2.08e-5, 3.31e-6); the kernel now sums H in compensated slices.
"""

from __future__ import annotations

import os

import numpy as np

F32 = np.float32
QBITS = 23  # the exp2 argument's fixed-point fraction bits
TABLE_ERR = 2.0**-23.5  # exp2's relative error beyond the argument's quantisation
RCP_ULPS = 0.5  # rcp's error before its rounding, in ulps of 1/b: within 1 ulp after it


def _noise(bits: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random number in [-1, 1) for each uint64 key, always the same for the same key and seed."""
    h = (bits.astype(np.uint64) ^ np.uint64(seed * 7919 + 12345)) * np.uint64(0x9E3779B97F4A7C15)
    return (h >> np.uint64(40)).astype(np.float64) / 2.0**23 - 1.0


def exp2(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """ex2.approx.ftz.f32 as modelled above; other dtypes exactly."""
    if x.dtype != F32:
        return np.exp2(x)
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        xq = np.where(np.abs(x64) < 2.0**20, np.round(x64 * 2.0**QBITS) / 2.0**QBITS, x64)
        frac = xq - np.floor(xq)
        key = np.nan_to_num(frac * 2.0**QBITS).astype(np.uint64)
        y = np.exp2(xq) * (1.0 + np.where(frac == 0, 0.0, _noise(key, seed) * TABLE_ERR))
    y = y.astype(F32)
    return np.where(np.abs(y) < np.finfo(F32).tiny, F32(0), y)


def exp(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """tl.exp: exp2 of x * log2(e), the product rounded to fp32."""
    if x.dtype != F32:
        return np.exp(x)
    return exp2((x * F32(1.4426950408889634)).astype(F32), seed)


def div(a, b, seed: int = 0):
    """div.full.f32 as a * rcp(b), modelled above; other dtypes exactly."""
    with np.errstate(divide="ignore", invalid="ignore"):
        exact = np.divide(a, b)
    if not isinstance(exact, np.ndarray) or exact.dtype != F32:
        return exact
    b32 = np.broadcast_to(np.asarray(b, F32), exact.shape)
    bits = b32.view(np.uint32)
    power_of_two = (bits & np.uint32(0x7FFFFF)) == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rcp = 1.0 / b32.astype(np.float64)
        ulp = np.exp2(np.floor(np.log2(np.abs(rcp))) - 23)
        rcp = np.where(power_of_two, rcp, rcp + _noise(bits, seed) * RCP_ULPS * ulp).astype(F32)
        out = (np.asarray(a, F32) * rcp).astype(F32)
    return np.where(np.isfinite(exact) & np.isfinite(out), out, exact)


def dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """(M, K) @ (K, N) + acc for fp32 operands and accumulator as a GPU's FMA chain: for k = 0, 1, ..., K - 1,
    acc = fma(a[:, k], b[k, :], acc), one rounding a step (here: the product exact in fp64, the sum rounded to
    fp64 and then to fp32; a double rounding changes the last bit once in a long while)."""
    out = acc.astype(F32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    for k in range(a.shape[-1]):
        out = (out + a64[..., :, k, None] * b64[..., None, k, :]).astype(F32)
    return out


def install(seed: int | None = None) -> dict:
    """Patch Triton's interpreter; returns what it replaced (for `uninstall`)."""
    from triton.runtime.interpreter import InterpreterBuilder as B
    from triton.runtime.interpreter import TensorHandle

    seed = int(os.environ.get("FASTRLHF_GPU_MATH_SEED", "0")) if seed is None else seed
    old = {name: getattr(B, name) for name in ("create_exp2", "create_exp", "create_fdiv", "create_dot")}
    B.create_exp2 = lambda self, arg: self.unary_op(arg, lambda x: exp2(x, seed))
    B.create_exp = lambda self, arg: self.unary_op(arg, lambda x: exp(x, seed))
    B.create_fdiv = lambda self, lhs, rhs: self.binary_op(lhs, rhs, lambda a, b: div(a, b, seed))
    plain_dot = old["create_dot"]

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (a.data.dtype == b.data.dtype == d.data.dtype == F32 and "IEEE" in str(input_precision)):
            return plain_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        return TensorHandle(dot(a.data, b.data, d.data), d.dtype.scalar)

    B.create_dot = create_dot
    return old


def uninstall(old: dict) -> None:
    from triton.runtime.interpreter import InterpreterBuilder as B

    for name, fn in old.items():
        setattr(B, name, fn)
