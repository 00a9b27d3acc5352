"""Drop-in replacements for the log-prob / entropy helpers that other RLHF trainers call.

Each function has the signature of the helper it replaces:

    TRL 1.16, `trl.trainer.utils`:         selective_log_softmax, entropy_from_logits,
                                           selective_log_softmax_and_entropy, and the fused LM head
                                           `_ChunkedLogProbFunction` (`ChunkedLogProb`, on linear_logprobs)
    verl, `verl.utils.torch_functional`:   logprobs_from_logits(logits, labels, inplace_backward=True)
    OpenRLHF, `openrlhf.models.utils`:     log_probs_from_logits(logits, labels, temperature=1.0)

Switching over is one call per trainer, never done on import: `switch = compat.use_in_trl()` patches the
names where TRL's trainers hold them (TRL 1.16's GRPO, RLOO, DPO, KTO and SFT trainers compute their
log-probs through the fused LM head; its experimental trainers import `selective_log_softmax` by name) and
`switch.restore()` undoes it (or `with compat.use_in_trl(): ...`); `use_in_verl()` and `use_in_openrlhf()`
likewise (the module that defines the function and every loaded module of the package that imported it by
name). Each refuses a layout it does not know.

What "drop-in" guarantees (docs/drop-in.md has the details):
  - values: fp32 results within the precision contract of the exact value (error <= 2 x the eager
    function's own error in the input dtype + 8 fp32 ulps), gradients in the logits' dtype, likewise;
  - dtype and shape: those the original returns for the same input on the same device (below);
  - outputs are fresh tensors, never views, and the backward reads none of them: a caller may modify them
    in place, detach, slice and write into them, with or without grad, as with the originals;
  - torch.compile(fullgraph=True) traces every adapter, forward and backward, with or without nvtx
    installed (the kernels run as `fastrlhf.kernels.ops` torch.library ops under compile).
What it does not guarantee: bit equality with an eager function that computes in fp16/bf16. Our value is
the fp32 result rounded once to the output dtype; the eager function rounds on the way (e.g. logits / T in
the 16-bit dtype), so the two differ by one unit in the last place in some positions.

The logits adapters run `fastrlhf.kernels.token_logprobs`: one streaming read of the logits, temperature applied
inside the kernel as z / T in fp32, fp32 math, no (..., V) log-softmax materialised, gradients in the
logits' dtype (as the originals').

Output dtype. The kernel's result is fp32. By default each wrapper returns the dtype the ORIGINAL returns
for the same input on the same device, so a drop-in changes nothing downstream:
  - TRL 1.16: fp32 where TRL runs its own Triton kernel (CUDA/XPU, fp16/bf16/fp32 logits with 1-3 dims,
    one int32/int64 index per row; `_trl_uses_its_kernel`), otherwise the logits' dtype (its PyTorch
    path: CPU, 4-D logits, top-K index; also every TRL before the fused kernel existed).
  - verl: fp32 when flash-attn is installed (verl then uses flash-attn's cross entropy, which returns
    fp32), otherwise the logits' dtype.
  - OpenRLHF: the logits' dtype (its bf16/fp16 path is a PyTorch loop; fp32 logits give fp32).
When the default is bf16/fp16, the value is the fp32 kernel result rounded once. Pass `out_dtype=
torch.float32` to keep full precision (recommended: a bf16 log-prob near -3 is off by up to 0.008, which
moves a PPO ratio by ~0.8%), e.g. `functools.partial(compat.selective_log_softmax, out_dtype=torch.float32)`.

Other deliberate differences from the originals:
  - OpenRLHF divides the caller's logits IN PLACE (`logits.div_(temperature)`); we never modify them.
  - verl's `inplace_backward` (flash-attn writes the gradient into the logits' storage) is accepted and
    ignored: we allocate the gradient.
  - TRL's `chunk_size` is accepted and ignored: the kernel streams rows and never holds (chunk, V).
  - A label equal to -100 gives 0 (as flash-attn's cross entropy does) instead of an indexing error, and a
    label outside [0, V) gives NaN instead of an error / device assert (no host sync).
  - TRL's top-K index (..., K) is supported by reading each row K times through a broadcast view (no
    copy of the logits; the backward allocates a (..., K, V) gradient before summing over K).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import sys
from types import ModuleType

import torch

from .linear_logprobs import linear_logprobs
from .token_logprobs import token_logprobs

_IGNORE = -100  # the label value that gives 0 and no gradient (flash-attn's and HF's convention)


def _cast(x: torch.Tensor, out_dtype: torch.dtype | None, default: torch.dtype) -> torch.Tensor:
    dtype = default if out_dtype is None else out_dtype
    return x if x.dtype == dtype else x.to(dtype)


def _trl_uses_its_kernel(logits, index=None, row_mask=None) -> bool:
    """Mirror of `trl.trainer.utils._supports_trl_loss_kernel` (TRL 1.16): where TRL runs its own Triton
    kernel, which returns fp32. Elsewhere TRL's PyTorch path returns the logits' dtype."""
    ok = (
        logits.device.type in ("cuda", "xpu")
        and logits.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and 1 <= logits.dim() <= 3
        and logits.stride(-1) == 1
    )
    if index is not None:
        ok = ok and tuple(index.shape) == tuple(logits.shape[:-1]) and index.dtype in (torch.int32, torch.int64)
    if row_mask is not None:
        ok = ok and index is not None and tuple(row_mask.shape) == tuple(index.shape)
        ok = ok and row_mask.dtype in (torch.bool, torch.int32, torch.int64)
    return ok


@functools.lru_cache(maxsize=1)
def _find_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@torch.compiler.assume_constant_result  # a constant to torch.compile: not traced into (nor its cache)
def _flash_attn_installed() -> bool:
    """verl uses flash-attn's cross entropy (fp32 output) when it can import it; we look, without importing."""
    return _find_flash_attn()


def _masked(index: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    return index if row_mask is None else index.masked_fill(row_mask == 0, _IGNORE)


# ------------------------------------------------------------------------------------------------ TRL
def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """TRL's `selective_log_softmax`: log_softmax(logits / temperature) gathered at `index`.

    Switched in by `use_in_trl()`.

    Args:
        logits: (..., V) fp16/bf16/fp32/fp64.
        index: (...) or (..., K) integer ids (K gathers per position, e.g. top-K).
        temperature: > 0.
        row_mask: optional, shape of `index`; where 0, the output is 0 (and no gradient).
        out_dtype: None = TRL's own output dtype (see the module docstring); torch.float32 = full precision.
    Returns:
        log-probs with the shape of `index`.
    """
    default = torch.float32 if _trl_uses_its_kernel(logits, index, row_mask) else logits.dtype
    x = logits
    if index.dim() == logits.dim():  # (..., K): a broadcast view, each row read K times
        x = logits.unsqueeze(-2).expand(*logits.shape[:-1], index.shape[-1], logits.shape[-1])
    logp = token_logprobs(x, _masked(index, row_mask), temperature=temperature, ignore_index=_IGNORE)
    return _cast(logp, out_dtype, default)


def entropy_from_logits(
    logits: torch.Tensor, chunk_size: int = 128, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """TRL's `entropy_from_logits`: Shannon entropy (nats) of softmax(logits) per row, shape logits.shape[:-1].

    Switched in by `use_in_trl()`.

    `chunk_size` is accepted for compatibility and ignored (the kernel streams; nothing (chunk, V) is held).
    `out_dtype` as in `selective_log_softmax`. The same function fits verl's `entropy_from_logits(logits)`
    call, but verl returns the logits' dtype there while this returns fp32 on CUDA (TRL's rule).
    """
    default = torch.float32 if _trl_uses_its_kernel(logits) else logits.dtype
    any_ids = torch.zeros(logits.shape[:-1], dtype=torch.int32, device=logits.device)  # entropy ignores them
    _, ent = token_logprobs(logits, any_ids, return_entropy=True)
    return _cast(ent, out_dtype, default)


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's `selective_log_softmax_and_entropy`: both from ONE read of the logits (index shape (...)).

    Switched in by `use_in_trl()`.

    Entropy is that of softmax(logits / temperature); rows where `row_mask` is 0 give 0 for both.
    """
    default = torch.float32 if _trl_uses_its_kernel(logits, index, row_mask) else logits.dtype
    logp, ent = token_logprobs(
        logits, _masked(index, row_mask), temperature=temperature, ignore_index=_IGNORE, return_entropy=True
    )
    if not entropy_requires_grad:
        ent = ent.detach()
    return _cast(logp, out_dtype, default), _cast(ent, out_dtype, default)


# ------------------------------------------------------------------------------------- verl / OpenRLHF
def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inplace_backward: bool = True,
    *,
    temperature: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """verl's `logprobs_from_logits(logits, labels, inplace_backward=True)`: per-token log-probs (...).

    Switched in by `use_in_verl()`.

    `inplace_backward` is accepted and ignored. `temperature` (keyword-only, default 1.0: verl divides the
    logits itself before calling) is applied inside the kernel. Labels equal to -100 give 0, as with
    verl's flash-attn path. Default output dtype: fp32 if flash-attn is installed, else the logits' dtype.
    """
    default = torch.float32 if _flash_attn_installed() else logits.dtype
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=_IGNORE)
    return _cast(logp, out_dtype, default)


def log_probs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    inplace_backward: bool | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """OpenRLHF's `log_probs_from_logits(logits, labels, temperature=1.0)`: per-token log-probs (...).

    Switched in by `use_in_openrlhf()`.

    Unlike OpenRLHF, the caller's logits are NOT divided in place. `inplace_backward` (newer OpenRLHF
    versions take it) is accepted and ignored. Default output dtype: the logits'
    dtype, as OpenRLHF returns.
    """
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=_IGNORE)
    return _cast(logp, out_dtype, logits.dtype)


# ------------------------------------------------------------------------------- TRL's fused LM head
class ChunkedLogProb:
    """TRL 1.16's `trl.kernels.ChunkedLogProbFunction` on `fastrlhf.kernels.linear_logprobs`: per-token
    log-probs (and entropy) of `hidden @ weight.T (+ bias)` without the (N, V) logits. TRL's `add_fused_lm_head`
    (the LM head of its GRPO, RLOO, DPO, KTO and SFT trainers) calls `_ChunkedLogProbFunction.apply(...)` in
    `trl.trainer.utils`; `use_in_trl()` puts an instance of this class there.

    `apply` takes TRL's arguments and returns TRL's 5-tuple (log_probs, entropy, log_sum_sq_probs, mean_logits,
    is_top1), fp32, the fields not asked for in `outputs` None. `chunk_size` is ignored (the kernel tiles
    itself); `logit_scale` s > 0 is folded into the temperature (z s / T = z / (T / s)). What the kernel does
    not compute -- a final logit soft-cap, the outputs "log_sum_sq_probs", "mean_logits", "is_top1", a
    logit_scale <= 0 -- runs TRL's own function (`original`), so the switch never changes what a trainer gets.
    Under autocast, hidden and weight are cast to the autocast dtype first, as TRL's function does.
    """

    OURS = ("log_probs", "entropy")

    def __init__(self, original):
        self.original = original  # TRL's autograd Function

    def apply(
        self,
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        final_logit_softcapping=None,
        logit_scale=1.0,
        outputs=("log_probs",),
    ):
        if final_logit_softcapping is not None or set(outputs) - set(self.OURS) or not logit_scale > 0:
            return self.original.apply(
                hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs
            )
        kind = hidden.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
        with_entropy = "entropy" in outputs
        with torch.autocast(kind, enabled=False):
            out = linear_logprobs(
                hidden.to(dtype),
                weight.to(dtype),
                targets,
                bias=bias,
                temperature=temperature / logit_scale,
                return_entropy=with_entropy,
            )
        logp, ent = out if with_entropy else (out, None)
        return logp, ent, None, None, None


# ---------------------------------------------------------------------------------------- the switch
@dataclasses.dataclass
class Switch:
    """What a `use_in_*` call replaced: (module, name, original) for every name it patched. `restore()` puts
    the originals back (once; later calls do nothing). Also a context manager: `with compat.use_in_trl(): ...`
    restores on exit."""

    patched: list[tuple[ModuleType, str, object]]

    def restore(self) -> None:
        for module, name, original in reversed(self.patched):
            setattr(module, name, original)
        self.patched = []

    def __enter__(self) -> "Switch":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _import(name: str, peer: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"fastrlhf: cannot switch {peer} over: importing {name} failed ({exc})") from exc


def _switch(package: str, home: ModuleType, replacements: dict[str, object]) -> Switch:
    """Replace each name in `home` and in every loaded module of `package` that holds the same object under
    that name (`from home import name` copies the reference); modules imported later see `home`'s new one."""
    originals = {name: getattr(home, name) for name in replacements}
    patched = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == package or mod_name.startswith(package + ".")):
            continue
        for name, new in replacements.items():
            if getattr(module, name, None) is originals[name] and (module is home or name in vars(module)):
                patched.append((module, name, originals[name]))
                setattr(module, name, new)
    return Switch(patched)


# The layout use_in_trl() knows (TRL 1.16): these names in trl.trainer.utils, with these parameters first.
_TRL_LAYOUT = {
    "selective_log_softmax": ("logits", "index", "temperature", "row_mask"),
    "entropy_from_logits": ("logits", "chunk_size"),
    "selective_log_softmax_and_entropy": ("logits", "index", "entropy_requires_grad", "temperature", "row_mask"),
    "_ChunkedLogProbFunction": (
        "ctx",
        "hidden",
        "weight",
        "bias",
        "targets",
        "temperature",
        "chunk_size",
        "final_logit_softcapping",
        "logit_scale",
        "outputs",
    ),
}


def _params(obj) -> tuple[str, ...]:
    fn = obj.forward if inspect.isclass(obj) else obj
    return tuple(inspect.signature(fn).parameters)


def _check_layout(caller: str, home: ModuleType, layout: dict[str, tuple[str, ...]], known: str) -> None:
    """RuntimeError unless `home` holds every name of `layout` with (at least) those leading parameters."""
    package = home.__name__.split(".")[0]
    version = getattr(sys.modules.get(package), "__version__", "?")
    for name, want in layout.items():
        try:
            have = _params(getattr(home, name))
        except (AttributeError, TypeError, ValueError):
            have = None
        if have is None or have[: len(want)] != want:
            raise RuntimeError(
                f"fastrlhf.kernels.compat.{caller}: unknown {package} layout ({package} {version}): "
                f"{home.__name__}.{name} {'is missing' if have is None else f'takes {have}'}, expected "
                f"parameters {want} ({known})"
            )


def use_in_trl(*, fused_lm_head: bool = True) -> Switch:
    """Switch TRL's trainers over to fastrlhf's kernels; returns a `Switch` that undoes it.

        switch = compat.use_in_trl()      # or: with compat.use_in_trl(): trainer.train()
        trainer = GRPOTrainer(...); trainer.train()
        switch.restore()

    Replaces, in `trl.trainer.utils` and in every loaded `trl.*` module that imported them by name (TRL's
    experimental trainers do): `selective_log_softmax`, `entropy_from_logits`,
    `selective_log_softmax_and_entropy` (this module's adapters) and, with `fused_lm_head`,
    `_ChunkedLogProbFunction`, the fused LM head through which TRL 1.16's GRPO, RLOO, DPO, KTO and SFT trainers
    compute every per-token log-prob and entropy (`ChunkedLogProb`). Call it before or after creating a
    trainer; nothing is patched on import. Refuses (RuntimeError) a TRL whose `trl.trainer.utils` does not hold
    these names with the parameters above: patching an unknown layout could silently reach nothing.
    """
    utils = _import("trl.trainer.utils", "TRL")
    layout = {n: p for n, p in _TRL_LAYOUT.items() if fused_lm_head or n != "_ChunkedLogProbFunction"}
    _check_layout("use_in_trl", utils, layout, "TRL 1.16")
    replacements = {
        "selective_log_softmax": selective_log_softmax,
        "entropy_from_logits": entropy_from_logits,
        "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    }
    if fused_lm_head:
        replacements["_ChunkedLogProbFunction"] = ChunkedLogProb(utils._ChunkedLogProbFunction)
    return _switch("trl", utils, replacements)


def use_in_verl() -> Switch:
    """Switch verl over: `logprobs_from_logits` in `verl.utils.torch_functional` (which verl's actors call as
    `verl_F.logprobs_from_logits`) and in every loaded `verl.*` module that imported it by name (verl's
    `dp_actor` does); returns a `Switch` that undoes it. Refuses (RuntimeError) a verl whose
    `verl.utils.torch_functional.logprobs_from_logits` does not take (logits, labels, inplace_backward).
    verl's `entropy_from_logits` is left alone (it returns the logits' dtype, the adapter TRL's)."""
    home = _import("verl.utils.torch_functional", "verl")
    _check_layout("use_in_verl", home, {"logprobs_from_logits": ("logits", "labels", "inplace_backward")}, "verl")
    return _switch("verl", home, {"logprobs_from_logits": logprobs_from_logits})


def use_in_openrlhf() -> Switch:
    """Switch OpenRLHF over: `log_probs_from_logits` in `openrlhf.models.utils` and in every loaded
    `openrlhf.*` module that imported it by name (its actor does); returns a `Switch` that undoes it. Refuses
    (RuntimeError) an OpenRLHF whose function does not take (logits, labels, temperature)."""
    home = _import("openrlhf.models.utils", "OpenRLHF")
    _check_layout("use_in_openrlhf", home, {"log_probs_from_logits": ("logits", "labels", "temperature")}, "OpenRLHF")
    return _switch("openrlhf", home, {"log_probs_from_logits": log_probs_from_logits})


__all__ = [
    "use_in_trl",
    "use_in_verl",
    "use_in_openrlhf",
    "Switch",
    "ChunkedLogProb",
    "selective_log_softmax",
    "entropy_from_logits",
    "selective_log_softmax_and_entropy",
    "logprobs_from_logits",
    "log_probs_from_logits",
]
