"""What differs between model families, decided in one place.

The trainer reads a causal LM's log-probs and a reward model's scores from the model's own forward; what
it does beside that forward (running the top layers from stored bottom states, the fused-linear kernels that
never form logits, the attention mask it builds) has to honour what each family does before its first layer
and after its head. Each rule below is read from the model's config or its module tree, never from a list
of class names:

- decoder layers: the trunk's `ModuleList` with `config.num_hidden_layers` entries (`model.layers` for
  Llama / Qwen / Mistral / Gemma / Phi-3, `transformer.h` for GPT-2, `gpt_neox.layers` for GPT-NeoX).
- the bottom: whatever the trunk computes before its first layer (token and position embeddings, an
  embedding scale or norm) is found by running it up to layer 0 and recording which modules finished.
- stored bottom states are replayed by standing in for the bottom layers (`_Skipped`) and handing layer n
  the stored states; the trunk builds masks, positions and rotary tables as usual, and any per-layer
  schedule (Gemma's sliding / full attention, indexed by the layer's position) keeps its indices.
- after the head: `final_logit_softcapping` (Gemma-2/3: c * tanh(z / c)), `logits_scaling` (Granite:
  z / s) and `logit_scale` (Cohere: s * z). The logits path reads the model's returned logits, so it
  is right for any family; the fused-linear kernels take a scale as a temperature and refuse a soft-cap,
  and `check_logit_transform` verifies the rule on a probe before they are used.
- attention: flash-attention 2 when installed and the class supports it, else SDPA, else eager
  (Gemma-2 has no SDPA: it soft-caps attention scores).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass

import torch

from .errors import UserError


def family_name(model_or_config) -> str:
    """The config's `model_type` ("llama", "gemma2", "gpt2", ...) for messages."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", type(config).__name__)


# -------------------------------------------------------------------------------------------- the trunk
def decoder_layers(model) -> torch.nn.ModuleList:
    """The trunk's decoder layers: the one `ModuleList` under `model.base_model` with
    `config.num_hidden_layers` entries (the shallowest, if several). Raises UserError if there is none."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = [
        (name.count("."), name, m)
        for name, m in model.base_model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and n is not None and len(m) == n
    ]
    if not found:
        raise UserError(
            f"{family_name(model)}: cannot find the decoder layers (no list of num_hidden_layers={n} modules under "
            f"{type(model.base_model).__name__}), so the bottom layers cannot be frozen or shared: use --freeze-layers 0"
        )
    return min(found, key=lambda f: f[:2])[2]


def _probe_inputs(model) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {
        "input_ids": torch.tensor([[1, 2, 3]], device=device),
        "attention_mask": torch.ones(1, 3, dtype=torch.long, device=device),
    }


@torch.no_grad()
def bottom_modules(model) -> list[torch.nn.Module]:
    """The modules the trunk runs before its first decoder layer (token and position embeddings, an
    embedding norm), found by running it on a 3-token probe up to layer 0: those that finished."""
    layers = decoder_layers(model)
    inside = {id(m) for m in layers.modules()}
    done: list[torch.nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, a, o: done.append(mod))
        for m in model.base_model.modules()
        if id(m) not in inside
    ]
    hooks.append(layers[0].register_forward_pre_hook(_stop))
    try:
        model.base_model(**_probe_inputs(model))
    except StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    return list({id(m): m for m in done}.values())


def _stop(module, args):
    raise StopForward


def bottom_parameters(model, n: int) -> list[torch.nn.Parameter]:
    """Parameters that shape the states entering decoder layer `n`: the bottom modules' and layers[:n]'s."""
    mods = bottom_modules(model) + list(decoder_layers(model)[:n])
    return list({id(p): p for m in mods for p in m.parameters()}.values())


def n_bottom_layers(model, freeze_layers: int) -> int:
    """How many bottom layers `--freeze-layers` means for this model: -1 all but the top 4, else at most all."""
    if freeze_layers == 0:
        return 0
    total = len(decoder_layers(model))
    return max(0, total - 4) if freeze_layers < 0 else min(freeze_layers, total)


def lora_targets(model, n_frozen: int, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the linear layers above the frozen bottom (every layer's when `n_frozen` is 0), for LoRA:
    `nn.Linear`, and GPT-2's `Conv1D`; those named `exclude` (a new scalar head) left out."""
    from transformers.pytorch_utils import Conv1D

    scope = decoder_layers(model)[n_frozen:] if n_frozen else [model.base_model]
    inside = {id(m) for part in scope for m in part.modules()}
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and id(m) in inside and name.split(".")[-1] not in exclude
    ]


class _Skipped(torch.nn.Module):
    """Stands in for a decoder layer whose output is supplied from stored states: returns its input. Keeps
    the attributes some families' layer loops read (`attention_type`, ...)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        for name in ("attention_type", "layer_type", "layer_idx", "is_sliding", "sliding_window"):
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def drop_bottom_layers(model, n: int) -> None:
    """Replace the bottom `n` decoder layers by stand-ins, for good (their memory is freed): the model is
    then only run with `replay_bottom` states for those layers (a reference on the policy's frozen bottom)."""
    layers = decoder_layers(model)
    for i in range(n):
        if not isinstance(layers[i], _Skipped):
            layers[i] = _Skipped(layers[i])


@contextlib.contextmanager
def replay_bottom(model, n: int, states: torch.Tensor):
    """Within this block a call of `model` (or its trunk) skips the bottom `n` decoder layers and hands
    layer n `states` (B, T, H): the states that entered it in an earlier pass (`capture_states`). Whatever
    the trunk computes before its layers still runs and is discarded; masks, positions and per-layer
    schedules are built as in a full pass."""
    layers = decoder_layers(model)
    kept = [layers[i] for i in range(n)]

    def swap_in(module, args, kwargs):
        if args:
            return (states, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": states}

    for i in range(n):
        layers[i] = _Skipped(kept[i])
    handle = layers[n].register_forward_pre_hook(swap_in, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i in range(n):
            layers[i] = kept[i]


def states_hook(model, n: int, seen: dict, key: str = "states", stop: bool = False):
    """A hook on decoder layer `n` that stores the hidden states entering it in `seen[key]` (and, with
    `stop`, ends the pass there by raising `StopForward`) -> the hook handle."""

    def grab(module, args, kwargs):
        seen[key] = args[0] if args else kwargs["hidden_states"]
        if stop:
            raise StopForward

    return decoder_layers(model)[n].register_forward_pre_hook(grab, with_kwargs=True)


class StopForward(Exception):
    """Raised by a hook once the pass has given what is needed; the caller catches it."""


# -------------------------------------------------------------------------------------- after the head
@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM's forward does to its head's output z: logits = softcap(scale * z), where
    softcap(x) = c * tanh(x / c) when `softcap` is set."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        x = z * self.scale if self.scale != 1.0 else z
        return x if self.softcap is None else torch.tanh(x / self.softcap) * self.softcap


def logit_transform(config) -> LogitTransform:
    """The transform a family applies after its LM head, read from the config (see the module docstring)."""
    scale = 1.0
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    cap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale, float(cap) if cap else None)


def fused_temperature(model, temperature: float, what: str = "--fused-linear") -> float:
    """The temperature to give the fused-linear kernels so that they compute softmax(logits / T) of the
    model's own logits: T / scale. UserError for a family that soft-caps its logits (no kernel computes it)."""
    t = logit_transform(model.config)
    if t.softcap is not None:
        raise UserError(
            f"{what}: {family_name(model)} soft-caps its logits (final_logit_softcapping = {t.softcap:g}), "
            "which the fused-linear kernels do not compute; run without --fused-linear (the logits path "
            "reads the model's own logits)"
        )
    return temperature / t.scale


@torch.no_grad()
def check_logit_transform(model, what: str = "--fused-linear") -> LogitTransform:
    """The logit transform of `model` when the fused-linear kernels can compute it (a scale, taken as a
    temperature), checked on a probe against the model's own forward; UserError naming the family, the
    reason and what works otherwise when they cannot (a soft-cap, or a transform the config does not state)."""
    fused_temperature(model, 1.0, what)  # refuses a soft-cap
    t, name = logit_transform(model.config), family_name(model)
    seen = {}
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: seen.__setitem__("z", out))
    try:
        logits = model(**_probe_inputs(model)).logits
    finally:
        handle.remove()
    expected = t(seen["z"].float())
    if not torch.allclose(logits.float(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-6):
        raise UserError(
            f"{what}: {name}'s forward changes its LM head's output in a way its config does not state "
            "(not a known scale or soft-cap); run without --fused-linear"
        )
    return t


# ------------------------------------------------------------------------------------------- attention
def attn_implementation(model_class, device: str | torch.device, dtype: torch.dtype) -> str:
    """ "flash_attention_2" on CUDA in fp16 / bf16 when `flash_attn` imports and the class supports it (it has no
    fp32 kernels); else "sdpa" where the class supports it; else "eager" (e.g. Gemma-2)."""
    if (
        torch.device(device).type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and getattr(model_class, "_supports_flash_attn", False)
    ):
        try:
            importlib.import_module("flash_attn")
            return "flash_attention_2"
        except Exception:  # missing, or built against another torch / CUDA
            pass
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def sliding_window(config) -> int | None:
    """The attention window of the model's sliding-window layers, or None if every layer attends to the
    whole prefix."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)
