"""The kernels as `torch.library` ops, so `torch.compile(fullgraph=True)` traces them (forward and backward)
without a graph break: `fastrlhf.kernels.ops.token_logprobs`, `.full_kl`, `.kl_estimate`, with the
signatures, checks and outputs of the public functions of the same names.

API: `torch.library.custom_op` + `register_fake` + `register_autograd` (torch >= 2.4: the GPU host's 2.11
and the CPU machines' 2.13 both have them). Not `torch.library.triton_op`: it only lets the compiler look
inside kernels launched through `wrap_triton`, which our launchers do not use (and must not be changed
for this), and we want one op that serves CPU tensors too. A custom op is opaque to the compiler and
dispatches at run time exactly like the public function: CUDA -> compiled Triton, CPU -> Triton's
interpreter under TRITON_INTERPRET=1, otherwise the `*_ref` PyTorch path.

Each kernel is two ops, `fastrlhf::<name>` and `fastrlhf::<name>_backward`. The forward op also returns
the kernel's fp32 per-row statistics, so the backward needs no second forward pass (the wrapper drops
them). The fake impls allocate empty outputs of the right shape/dtype (symbolic sizes work, so a new
sequence length does not recompile under `dynamic=True`). On the `*_ref` path the statistics are a zero
placeholder and the backward op recomputes the softmax in PyTorch.

Scalars (temperature, ignore_index, estimator) are op arguments, so under torch.compile they are graph
constants: a new temperature value recompiles (sizes stay dynamic). No double backward.
"""

import math
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ._common import acc_dtype, use_triton
from .full_kl import _backward as _fkl_backward
from .full_kl import _check_inputs as _fkl_check
from .full_kl import _forward as _fkl_forward
from .full_kl import full_kl_ref
from .kl_estimate import ESTIMATORS, _KLEstimate, kl_estimate_ref
from .kl_estimate import _check_inputs as _kle_check
from .kl_estimate import kl_estimate as _kl_estimate_eager
from .token_logprobs import _backward as _tlp_backward
from .token_logprobs import _check_inputs as _tlp_check
from .token_logprobs import _forward as _tlp_forward
from .token_logprobs import token_logprobs_ref

_ESTIMATOR_NAMES = {code: name for name, code in ESTIMATORS.items()}


def _rows(mask: Optional[Tensor]) -> Optional[Tensor]:
    return None if mask is None else mask.reshape(-1).to(torch.bool)


# ------------------------------------------------------------------------------------------ token_logprobs
@torch.library.custom_op("fastrlhf::token_logprobs", mutates_args=())
def _tlp_op(
    logits: Tensor, targets: Tensor, temperature: float, ignore_index: int, return_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """-> logp (...), entropy (...) or an empty (0,) tensor, row stats (2, N) or, with the entropy, (3, N) (row
    2: the entropy, which the backward reads there); all in the accumulation dtype, all fresh (no views)."""
    lead, acc = logits.shape[:-1], acc_dtype(logits)
    if use_triton(logits):
        logp, ent, stats = _tlp_forward(logits, targets, temperature, ignore_index, return_entropy)
        return logp, ent if return_entropy else logits.new_empty(0, dtype=acc), stats
    out = token_logprobs_ref(
        logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )
    logp, ent = out if return_entropy else (out, logits.new_empty(0, dtype=acc))
    stats = logits.new_zeros((3 if return_entropy else 2, math.prod(lead)), dtype=acc)
    return logp.contiguous(), ent.contiguous(), stats


@_tlp_op.register_fake
def _tlp_fake(logits, targets, temperature, ignore_index, return_entropy):
    lead, acc = logits.shape[:-1], acc_dtype(logits)
    ent = logits.new_empty(lead if return_entropy else (0,), dtype=acc)
    stats = logits.new_empty((3 if return_entropy else 2, math.prod(lead)), dtype=acc)
    return logits.new_empty(lead, dtype=acc), ent, stats


@torch.library.custom_op("fastrlhf::token_logprobs_backward", mutates_args=())
def _tlp_bwd_op(
    logits: Tensor,
    targets: Tensor,
    stats: Tensor,
    ent: Tensor,
    grad_logp: Optional[Tensor],
    grad_ent: Optional[Tensor],
    temperature: float,
    ignore_index: int,
) -> Tensor:
    """-> grad of the logits, logits' shape and dtype (contiguous)."""
    if use_triton(logits):
        ent_rows = ent.reshape(-1) if grad_ent is not None else None
        return _tlp_backward(
            logits, targets, stats, ent_rows, grad_logp, grad_ent, temperature, ignore_index, like_logits=False
        )  # contiguous, as the fake impl's
    acc = acc_dtype(logits)  # reference path: recompute the softmax, apply the formulas in the module docstring
    log_p = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    p = log_p.exp()
    active = targets != ignore_index
    in_range = (targets >= 0) & (targets < logits.shape[-1])
    g = torch.zeros_like(log_p)
    if grad_logp is not None:  # d logp / dz_j = 1[j=t] - p_j  (NaN for an out-of-range target, as the kernel)
        gl = torch.where(active, torch.where(in_range, grad_logp.to(acc), float("nan")), 0.0).unsqueeze(-1)
        g = (g - p * gl).scatter_add(-1, torch.where(in_range, targets, 0).long().unsqueeze(-1), gl)
    if grad_ent is not None:  # dH / dz_j = -p_j (log p_j + H)
        plogp = torch.where(p > 0, p * log_p, 0.0)
        gh = torch.where(active, grad_ent.to(acc), 0.0).unsqueeze(-1)
        g = g - (plogp - p * plogp.sum(-1, keepdim=True)) * gh
    return (g / temperature).to(logits.dtype)


@_tlp_bwd_op.register_fake
def _tlp_bwd_fake(logits, targets, stats, ent, grad_logp, grad_ent, temperature, ignore_index):
    return logits.new_empty(logits.shape)


def _tlp_setup(ctx, inputs, output):
    logits, targets, temperature, ignore_index, return_entropy = inputs
    ctx.save_for_backward(logits, targets, output[2])  # no output: the caller may modify them in place
    ctx.args = (temperature, ignore_index, return_entropy)


def _tlp_grad(ctx, grad_logp, grad_ent, _grad_stats):
    logits, targets, stats = ctx.saved_tensors
    temperature, ignore_index, return_entropy = ctx.args
    ent = stats[2] if return_entropy else stats.new_empty(0)  # the entropy, as the forward wrote it in the stats
    grad_ent = grad_ent if return_entropy else None
    grad = _tlp_bwd_op(logits, targets, stats, ent, grad_logp, grad_ent, temperature, ignore_index)
    return grad, None, None, None, None


_tlp_op.register_autograd(_tlp_grad, setup_context=_tlp_setup)


def token_logprobs(
    logits: Tensor, targets: Tensor, *, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False
):
    """`fastrlhf.kernels.token_logprobs` as one traceable op (same arguments, checks and fp32 outputs)."""
    temperature = _tlp_check(logits, targets, temperature)
    logp, ent, _ = _tlp_op(logits, targets, temperature, int(ignore_index), bool(return_entropy))
    return (logp, ent) if return_entropy else logp


# ------------------------------------------------------------------------------------------------ full_kl
@torch.library.custom_op("fastrlhf::full_kl", mutates_args=())
def _fkl_op(logits: Tensor, ref_logits: Tensor, mask: Optional[Tensor], temperature: float) -> tuple[Tensor, Tensor]:
    """-> kl (...), row stats (4, N); accumulation dtype."""
    lead, acc = logits.shape[:-1], acc_dtype(logits, ref_logits)
    if use_triton(logits):
        return _fkl_forward(logits, ref_logits, _rows(mask), temperature)  # kl is (...), not a view
    kl = full_kl_ref(logits, ref_logits, temperature=temperature, mask=mask)
    return kl.contiguous(), logits.new_zeros((4, math.prod(lead)), dtype=acc)


@_fkl_op.register_fake
def _fkl_fake(logits, ref_logits, mask, temperature):
    lead, acc = logits.shape[:-1], acc_dtype(logits, ref_logits)
    return logits.new_empty(lead, dtype=acc), logits.new_empty((4, math.prod(lead)), dtype=acc)


@torch.library.custom_op("fastrlhf::full_kl_backward", mutates_args=())
def _fkl_bwd_op(
    logits: Tensor, ref_logits: Tensor, mask: Optional[Tensor], stats: Tensor, grad_kl: Tensor, temperature: float
) -> Tensor:
    """-> grad of the policy logits (the reference is frozen)."""
    if use_triton(logits):
        return _fkl_backward(logits, ref_logits, _rows(mask), stats, grad_kl, temperature, like_logits=False)
    acc = acc_dtype(logits, ref_logits)  # dKL/dz_j = p_j (log p_j - log q_j - KL)
    log_p = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    d = log_p - torch.log_softmax(ref_logits.to(acc) / temperature, dim=-1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * d, 0.0).sum(-1, keepdim=True)
    g = torch.where(p > 0, p * (d - kl), 0.0) * grad_kl.to(acc).unsqueeze(-1)
    if mask is not None:
        g = torch.where(mask.bool().unsqueeze(-1), g, 0.0)
    return (g / temperature).to(logits.dtype)


@_fkl_bwd_op.register_fake
def _fkl_bwd_fake(logits, ref_logits, mask, stats, grad_kl, temperature):
    return logits.new_empty(logits.shape)


def _fkl_setup(ctx, inputs, output):
    logits, ref_logits, mask, temperature = inputs
    ctx.save_for_backward(logits, ref_logits, mask, output[1])
    ctx.temperature = temperature


def _fkl_grad(ctx, grad_kl, _grad_stats):
    logits, ref_logits, mask, stats = ctx.saved_tensors
    return _fkl_bwd_op(logits, ref_logits, mask, stats, grad_kl, ctx.temperature), None, None, None


_fkl_op.register_autograd(_fkl_grad, setup_context=_fkl_setup)


def full_kl(logits: Tensor, ref_logits: Tensor, *, temperature: float = 1.0, mask: Optional[Tensor] = None) -> Tensor:
    """`fastrlhf.kernels.full_kl` as one traceable op (gradient to the policy logits only)."""
    temperature = _fkl_check(logits, ref_logits, temperature, mask)
    return _fkl_op(logits, ref_logits.detach(), mask, temperature)[0]


# -------------------------------------------------------------------------------------------- kl_estimate
@torch.library.custom_op("fastrlhf::kl_estimate", mutates_args=())
def _kle_op(logp: Tensor, ref_logp: Tensor, estimator: int) -> Tensor:
    """estimator: 1, 2, 3 for "k1", "k2", "k3". No autograd is recorded inside an op's impl."""
    return _kl_estimate_eager(logp, ref_logp, estimator=_ESTIMATOR_NAMES[estimator]).contiguous()


@_kle_op.register_fake
def _kle_fake(logp, ref_logp, estimator):
    return logp.new_empty(logp.shape, dtype=acc_dtype(logp, ref_logp))


@torch.library.custom_op("fastrlhf::kl_estimate_backward", mutates_args=())
def _kle_bwd_op(logp: Tensor, ref_logp: Tensor, grad: Tensor, estimator: int) -> tuple[Tensor, Tensor]:
    """-> (grad of logp, grad of ref_logp), each in its input's dtype."""
    if use_triton(logp) and logp.numel() > 0:  # the autograd.Function's own backward, given a plain ctx
        a, b = logp.reshape(-1).contiguous(), ref_logp.reshape(-1).contiguous()
        ctx = SimpleNamespace(saved_tensors=(a, b), estimator=estimator, shape=logp.shape)
        ga, gb, _ = _KLEstimate.backward(ctx, grad)
        return ga, gb
    acc = acc_dtype(logp, ref_logp)  # k1' = 1, k2' = d, k3' = 1 - exp(-d)
    d = logp.to(acc) - ref_logp.to(acc)
    dk = torch.ones_like(d) if estimator == 1 else d if estimator == 2 else -torch.expm1(-d)
    g = grad.to(acc) * dk
    return g.to(logp.dtype), (-g).to(ref_logp.dtype)


@_kle_bwd_op.register_fake
def _kle_bwd_fake(logp, ref_logp, grad, estimator):
    return logp.new_empty(logp.shape), ref_logp.new_empty(ref_logp.shape)


def _kle_setup(ctx, inputs, output):
    logp, ref_logp, estimator = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.estimator = estimator


def _kle_grad(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    ga, gb = _kle_bwd_op(logp, ref_logp, grad, ctx.estimator)
    return ga, gb, None


_kle_op.register_autograd(_kle_grad, setup_context=_kle_setup)


def kl_estimate(logp: Tensor, ref_logp: Tensor, *, estimator: str = "k3") -> Tensor:
    """`fastrlhf.kernels.kl_estimate` as one traceable op (gradients to both inputs)."""
    return _kle_op(logp, ref_logp, _kle_check(logp, ref_logp, estimator))


__all__ = ["token_logprobs", "full_kl", "kl_estimate", "token_logprobs_ref", "full_kl_ref", "kl_estimate_ref"]
