"""Per-token KL estimators from sampled log-probabilities (Schulman, "Approximating KL divergence").

With d = logp - ref_logp (the log-ratio log pi(a)/pi_ref(a) at the sampled token a ~ pi):
    k1 = d                       unbiased, can be negative
    k2 = d^2 / 2                 biased, low variance
    k3 = exp(-d) - 1 + d         unbiased, >= 0
Gradients flow to both inputs: dk/dlogp = k'(d), dk/dref_logp = -k'(d), with k1' = 1, k2' = d,
k3' = 1 - exp(-d). k3 and k3' are evaluated by series for |d| < 0.5, where the closed forms cancel (for
d = 1e-4 the textbook fp32 k3 is ~100% wrong; ours is exact to rounding).

Elementwise: reads both inputs once, writes one fp32 output (N*(bytes_a + bytes_b + 4)); the backward
reads both again and writes the two gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_float, check_same_device, check_shape, kernel_range, tl_dtype, use_triton
from ._series import expm1_neg, k3

ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}
BLOCK = 1024


@triton.jit
def _kl_estimate_fwd(
    logp_ptr,  # (N,) float, contiguous
    ref_ptr,  # (N,) float, contiguous
    out_ptr,  # (N,) fp32 out
    N,
    ESTIMATOR: tl.constexpr,  # 1, 2 or 3
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    d = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(ACC) - tl.load(ref_ptr + offs, mask=inb, other=0.0).to(ACC)
    if ESTIMATOR == 1:
        k = d
    elif ESTIMATOR == 2:
        k = 0.5 * d * d
    else:
        k = k3(d)
    tl.store(out_ptr + offs, k, mask=inb)


@triton.jit
def _kl_estimate_bwd(
    logp_ptr,  # (N,) float
    ref_ptr,  # (N,) float
    grad_out_ptr,  # (N,) upstream gradient
    grad_logp_ptr,  # (N,) out, logp's dtype
    grad_ref_ptr,  # (N,) out, ref_logp's dtype
    N,
    ESTIMATOR: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    d = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(ACC) - tl.load(ref_ptr + offs, mask=inb, other=0.0).to(ACC)
    g = tl.load(grad_out_ptr + offs, mask=inb, other=0.0).to(ACC)
    if ESTIMATOR == 1:
        dk = g
    elif ESTIMATOR == 2:
        dk = g * d
    else:
        dk = -g * expm1_neg(d)  # 1 - exp(-d)
    tl.store(grad_logp_ptr + offs, dk.to(grad_logp_ptr.dtype.element_ty), mask=inb)
    tl.store(grad_ref_ptr + offs, (-dk).to(grad_ref_ptr.dtype.element_ty), mask=inb)


class _KLEstimate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, estimator):
        with kernel_range("fastrlhf.kl_estimate.fwd"):
            a, b = logp.reshape(-1).contiguous(), ref_logp.reshape(-1).contiguous()
            out = torch.empty(logp.shape, dtype=acc_dtype(a, b), device=a.device)  # not a view: see the docstring
            _kl_estimate_fwd[(triton.cdiv(a.numel(), BLOCK),)](
                a, b, out, a.numel(), ESTIMATOR=estimator, ACC=tl_dtype(out.dtype), BLOCK=BLOCK, enable_fp_fusion=True
            )
        ctx.save_for_backward(a, b)
        ctx.estimator, ctx.shape = estimator, logp.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        with kernel_range("fastrlhf.kl_estimate.bwd"):
            ga, gb = torch.empty_like(a), torch.empty_like(b)
            _kl_estimate_bwd[(triton.cdiv(a.numel(), BLOCK),)](
                a,
                b,
                grad_out.reshape(-1).contiguous(),
                ga,
                gb,
                a.numel(),
                ESTIMATOR=ctx.estimator,
                ACC=tl_dtype(acc_dtype(a, b)),
                BLOCK=BLOCK,
                enable_fp_fusion=True,
            )
        return ga.view(ctx.shape), gb.view(ctx.shape), None


def _check_inputs(logp, ref_logp, estimator) -> int:
    check_float("logp", logp)
    check_float("ref_logp", ref_logp)
    check_shape("ref_logp", ref_logp, logp.shape, "logp")
    check_same_device(logp=logp, ref_logp=ref_logp)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
    return ESTIMATORS[estimator]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k3") -> torch.Tensor:
    """Elementwise KL estimate from the policy's and the reference's log-prob of each sampled token.

    Args:
        logp: (...) log pi(a), any float dtype (fp32 from `token_logprobs`).
        ref_logp: (...) log pi_ref(a), same shape.
        estimator: "k1" (log-ratio), "k2" (half squared log-ratio) or "k3" (exp(-d) - 1 + d).
    Returns:
        (...) fp32 (fp64 for fp64 inputs); differentiable w.r.t. both inputs. A fresh tensor (not a view),
        safe to modify in place. Under torch.compile this runs `ops.kl_estimate`.
    """
    if torch.compiler.is_compiling():  # the traceable op: Dynamo cannot trace a Triton launcher
        from . import ops

        return ops.kl_estimate(logp, ref_logp, estimator=estimator)
    code = _check_inputs(logp, ref_logp, estimator)
    if not use_triton(logp):
        return kl_estimate_ref(logp, ref_logp, estimator=estimator)
    if logp.numel() == 0:
        return torch.zeros(logp.shape, dtype=acc_dtype(logp, ref_logp), device=logp.device)
    return _KLEstimate.apply(logp, ref_logp, code)


def kl_estimate_ref(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k3") -> torch.Tensor:
    """Pure-PyTorch twin of `kl_estimate` (fp32, or fp64 for fp64 inputs)."""
    _check_inputs(logp, ref_logp, estimator)
    acc = acc_dtype(logp, ref_logp)
    d = logp.to(acc) - ref_logp.to(acc)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.expm1(-d) + d
