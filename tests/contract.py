"""The precision contract, as assertions.

Every kernel computes in fp32, whatever its inputs' dtype. So an output or gradient is judged against an
fp64 reference computed from the same (already rounded) inputs, next to eager PyTorch run in fp32 on those
inputs upcast ("eager32": what a careful fp32 implementation achieves on exactly this data):

    |kernel - ref| <= 2 * max|eager32 - ref| + ULPS fp32 ulps of max|ref|          (the fp32 part, B)
                      + one rounding to the stored dtype, element by element          (bf16/fp16 stores only)

The fp32 part is the same for fp32, bf16 and fp16 inputs: a bf16 input is an exact fp32 number, and the
kernel's arithmetic on it is the fp32 arithmetic it does on fp32 inputs. Only what the kernel itself rounds
gets a low-precision allowance: a gradient stored in the logits' bf16/fp16 is its fp32 value rounded once,
so each element may be off by B plus half an ulp of that dtype at its magnitude -- no more. (Outputs are fp32.)

The one documented exception: Triton's interpreter converts fp32 -> bf16 by truncation (compiled Triton
rounds to nearest even), so there a bf16 store may be off by a whole bf16 ulp instead of half.

`inherited` adds an error an output carries from an earlier rounding or allowed error, derived per kernel:
ppo_head's gradient scales with exp(logp - old), so it inherits the log-prob's allowed error; the fused
linear heads round the logits' gradient to the input dtype before the cuBLAS products, so their bf16
gradients inherit `intermediate_rounding` of it. Non-finite entries must agree exactly.

Every call is recorded: in CHECKS (tests/conftest.py checks that a test which asserts the contract declared,
and ran, the Triton kernels it judges), and, when FASTRLHF_CONTRACT_LOG names a file, as one JSON line of
errors and bounds there (scripts/contract_report.py turns that into the table of bound / error per output).
"""

from __future__ import annotations

import json
import os

import torch

ULPS = 8  # the epsilon: this many fp32 ulps of the reference's largest magnitude

# fp32 -> bf16 stores truncate in Triton's interpreter: one whole bf16 ulp there, half an ulp elsewhere
INTERPRETER_BF16_TRUNCATES = os.environ.get("TRITON_INTERPRET") == "1"

CHECKS: list[str] = []  # the `what` of every assert_contract call since the list was last cleared


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


def rounding(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The most one rounding to `dtype` can move a value of this magnitude (fp64, element-wise): half an ulp
    (subnormal spacing below the smallest normal), a whole ulp for bf16 under the interpreter; 0 for fp32/fp64."""
    if dtype not in (torch.bfloat16, torch.float16):
        return torch.zeros_like(magnitude)
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(magnitude.clamp_min(info.tiny))  # magnitude in [2^(e-1), 2^e)
    ulp = info.eps * torch.ldexp(torch.ones_like(magnitude), exponent - 1)
    return ulp if (dtype == torch.bfloat16 and INTERPRETER_BF16_TRUNCATES) else ulp / 2


def intermediate_rounding(grad_z64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The most rounding each entry of an intermediate gradient (fp64 values grad_z64) to `dtype` can move
    it (element-wise, fp64): multiply by |the other factor| to get what a product inherits."""
    return rounding(grad_z64.detach().double().abs() * (1 + 2.0**-20), dtype)  # the computed value's magnitude


def assert_contract(
    what: str, kernel: torch.Tensor, eager32: torch.Tensor, ref: torch.Tensor, inherited: float | torch.Tensor = 0.0
) -> tuple[float, float]:
    """kernel <= 2 * eager32's error + epsilon (+ `inherited`, a number or a tensor of ref's shape) + one
    rounding to kernel.dtype, element-wise, against the fp64 reference. `eager32` must be fp32 or fp64 (eager
    PyTorch on the upcast inputs). Returns (kernel's max error, eager32's max error)."""
    assert eager32.dtype in (torch.float32, torch.float64), f"{what}: eager must run in fp32, got {eager32.dtype}"
    CHECKS.append(what)
    k, e = max_err(kernel, ref), max_err(eager32, ref)
    assert k != float("inf"), f"{what}: kernel NaN/inf pattern differs from the fp64 reference"
    r = ref.detach().double()
    finite = torch.isfinite(r)
    if isinstance(inherited, torch.Tensor):
        inherited = inherited.detach().double().expand(r.shape)[finite]
    fp32_part = 2 * e + epsilon(ref) + inherited
    err = (kernel.detach().double() - r)[finite].abs()
    bound = fp32_part + rounding(r[finite].abs() + fp32_part, kernel.dtype)
    _log(what, kernel.dtype, err, bound)
    if err.numel() and (err > bound).any():
        i = (err - bound).argmax()
        raise AssertionError(
            f"{what}: kernel error {err[i].item():.3e} at |ref| {r[finite].abs()[i].item():.3e} > bound "
            f"{bound[i].item():.3e} (2 x eager32 error {e:.3e} + {_at(fp32_part, i) - 2 * e:.1e}"
            f"{' + one ' + str(kernel.dtype) + ' rounding' if kernel.dtype != torch.float32 else ''})"
        )
    return k, e


def _at(x: float | torch.Tensor, i) -> float:
    return x[i].item() if isinstance(x, torch.Tensor) else x


def _log(what: str, dtype: torch.dtype, err: torch.Tensor, bound: torch.Tensor) -> None:
    path = os.environ.get("FASTRLHF_CONTRACT_LOG")
    if not path:
        return
    use = (err / bound).max().item() if err.numel() else 0.0  # 1.0 = at the bound
    record = {
        "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
        "what": what,
        "dtype": str(dtype).removeprefix("torch."),
        "max_err": err.max().item() if err.numel() else 0.0,
        "use_of_bound": use,
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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
