"""Does SDPA's backward give NaN for a query row that attends to nothing (a left-padding row)? Per backend.

    python benchmarks/tools/sdpa_masked_rows.py

Why: `fastrlhf pipeline` on an H200 (torch 2.11, bf16 autocast) stopped at PPO step 2 with a NaN policy
gradient while every loss was finite. Left-padded prompts leave their first rows with no visible key under
the causal + padding mask that transformers builds; `trainer.rollout.attention_mask_4d` now lets every row
see itself. This script checks the cause directly: one (B=2, heads=4, T=16, d=64) attention with row 0 of
batch 1 fully masked, run through each SDPA backend with the plain mask and with the fixed mask, reporting
whether the output and the gradients are finite. Output loss reads only unmasked rows, as PPO's does.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def masks(T: int, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 1, T, T) bool masks: causal + padding (batch 1 has `pad` left pads), and the same with the diagonal."""
    keys = torch.ones(2, T, dtype=torch.bool, device=device)
    keys[1, :pad] = False
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    plain = causal & keys[:, None, None, :]
    return plain, plain | torch.eye(T, dtype=torch.bool, device=device)


def run(backend, mask, dtype, device) -> str:
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 64, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    real = torch.ones(2, 16, dtype=torch.bool, device=device)
    real[1, :3] = False
    try:
        with contextlib.nullcontext() if backend is None else sdpa_kernel([backend]):  # None: torch's own choice
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out.transpose(1, 2)[real].float().square().sum().backward()
    except RuntimeError as e:
        return f"not available ({str(e).splitlines()[0][:60]})"
    fin = lambda t: "ok" if t.isfinite().all() else "NaN"  # noqa: E731
    return f"out {fin(out)}, dq {fin(q.grad)}, dk {fin(k.grad)}, dv {fin(v.grad)}"


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain, fixed = masks(16, 3, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}: batch 1 has 3 left pads (its rows 0-2 see no key under the plain mask)")
    print("| backend | dtype | plain mask | every row sees itself |\n|---|---|---|---|")
    for backend in (None, SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        for dtype in (torch.bfloat16, torch.float32):
            print(
                f"| {'default' if backend is None else backend.name} | {str(dtype)[6:]} | {run(backend, plain, dtype, device)} | "
                f"{run(backend, fixed, dtype, device)} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
