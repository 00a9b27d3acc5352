"""The precision contract (DESIGN.md section 3), as assertions.

For an output or gradient, compare against an fp64 reference computed from the same (already rounded)
inputs: the kernel's max abs error must be at most twice eager PyTorch's error in the input dtype, plus
a few fp32 ulps of the result's scale. Non-finite entries must agree exactly in position and value.
`mask_vocab` makes the one input pattern the row kernels' contract tests share.
"""

from __future__ import annotations

import os

import torch

ULPS = 8  # the epsilon: this many fp32 ulps of the reference's largest magnitude

# Triton's interpreter converts fp32 -> bf16 by truncation (compiled Triton rounds to nearest even), so a
# bf16 output there may be off by one whole bf16 ulp instead of half. Only there, allow that one ulp.
INTERPRETER_BF16_ULP = os.environ.get("TRITON_INTERPRET") == "1"


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error over the reference's finite entries; inf if the NaN/inf patterns differ."""
    x, ref = x.detach().double(), ref.detach().double()
    assert x.shape == ref.shape, f"shape {tuple(x.shape)} vs reference {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    if not (torch.equal(torch.isfinite(x), finite) and torch.equal(x[~finite].nan_to_num(), ref[~finite].nan_to_num())):
        return float("inf")
    return (x[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0


def epsilon(ref: torch.Tensor) -> float:
    r = ref.detach().double()
    r = r[torch.isfinite(r)]
    scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
    return ULPS * torch.finfo(torch.float32).eps * scale


def assert_contract(what: str, kernel: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor,
                    inherited: float = 0.0) -> tuple[float, float]:  # fmt: skip
    """kernel error <= 2 * eager error + epsilon (+ `inherited`: an error the output carries from an earlier
    output's allowed error), against the fp64 reference. Returns both errors."""
    k, e = max_err(kernel, ref), max_err(eager, ref)
    assert k != float("inf"), f"{what}: kernel NaN/inf pattern differs from the fp64 reference"
    eps = epsilon(ref) + inherited
    if INTERPRETER_BF16_ULP and kernel.dtype == torch.bfloat16:
        eps += 2.0**-7 * ref.detach().double().abs().nan_to_num(posinf=0, neginf=0).max().item()
    assert k <= 2 * e + eps, f"{what}: kernel error {k:.3e} > 2 x eager error {e:.3e} + {eps:.1e}"
    return k, e


def mask_vocab(x: torch.Tensor, targets: torch.Tensor | None = None) -> None:
    """-inf logits where a vocabulary mask puts them (banned tokens, padding of the vocabulary), in place
    on a contiguous (..., V) tensor with V >= 1,700: columns 500-699 and the last 3 of every row, and the
    first 1,100 of the first row, more than one 1,024-column block (`tiles`), so that a row's first block
    holds nothing finite. Targets on those columns move to columns 1,200-1,699 (finite in every row)."""
    V = x.shape[-1]
    x[..., 500:700] = -float("inf")
    x[..., V - 3 :] = -float("inf")
    x.view(-1, V)[0, :1100] = -float("inf")
    if targets is not None:
        rows = x.view(-1, V)
        t = targets.view(-1)
        hit = torch.isinf(rows.gather(1, t.clamp(0, V - 1).unsqueeze(1)).squeeze(1)) & (t >= 0)
        t[hit] = 1200 + t[hit] % 500
