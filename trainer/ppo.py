"""`fastrlhf ppo`: step 3 of RLHF, one top-to-bottom PPO loop (CleanRL style) for a causal LM.

Each step (`train_ppo`, one labelled block per phase):
    rollout    sample replies to `batch_prompts` prompts at temperature T (top_k=0, top_p=1), stop at EOS
    old policy log-probs (+ entropy) of the rollout and the critic's values, no grad
    score      reward model at the reply's EOS (appended where the reply was cut off: the form it was trained
               on), normalised by its saved gain/bias (or, `--reward rubric|both`, a verifiable check instead of
               or beside it: trainer/verifiable.py); missing-EOS penalty; clipped
    reference  log-probs of the sampled tokens under the frozen reference (bitsandbytes int8 / nf4 above
               the policy's frozen bottom, or the LoRA policy's base with its adapter disabled), once per rollout
    rewards    per-token -beta * KL (k1 by default) plus the score at the last real token; GAE(gamma, lambda);
               whitened advantages. Critic-free (`--advantage grpo|rloo`): each reply's summed reward against
               its prompt's group of `samples_per_prompt` replies, one advantage for all its tokens
    update     `ppo_epochs` passes of shuffled minibatches: clipped surrogate + vf_coef * clipped value
               loss - ent_coef * entropy (+ beta * k3 KL with `--kl-in loss`; aggregated per token or per
               sequence, `--loss-agg`); grad-norm clip; AdamW; linear LR decay
    log        one JSON line per step in metrics.jsonl (and TensorBoard when installed), keys namespaced:
               `objective/` (score, KL estimates, KL coefficient, shaped rewards), `policy/` (its replies'
               entropy, length and EOS rate; the update's loss, approx KL, clip fraction, ratio, gradient
               norm, LR), `value/` (loss, clip fraction, explained variance, gradient norm), `perf/` (seconds,
               tokens/s and peak memory per phase)
    checkpoint every `save_every` steps (trainer/checkpoint.py): `--resume` continues exactly

Every log-prob is taken at the sampling temperature by `fastrlhf.kernels`: from the logits (`token_logprobs`,
`full_kl`), with the update's log-prob, entropy, ratio and clipped surrogate from one `ppo_head` pass; or,
with `fused_linear`, straight from the last hidden state and the LM-head weight (`linear_logprobs`,
`linear_full_kl`: no (B, R, V) logits tensor ever exists). KL estimates via `kl_estimate`, advantages
via the `gae` scan. `kernels=False` swaps in the eager `*_ref` twins (same numbers to float error:
tests/test_ppo.py and benchmarks/bench_ppo_step.py compare them).

Departures from the textbook (Ziegler et al. 2019, Ouyang et al. 2022, Huang et al. 2024), all flags:
- The bottom layers of the policy and critic are frozen by default (`freeze_layers=-1`: all but the
  top 4) and run once per rollout (`cache_frozen`), so a 2-core CPU can run PPO in minutes. With
  `--freeze-layers 0` this is the textbook full fine-tune. When the reward model and the critic have
  bit-identical embeddings and bottom layers (checked on the weights: the pipeline's reward model was
  trained from the policy's base with the same bottom frozen), that bottom runs once for all three.
- The reference shares that frozen bottom too (`ref_shares_bottom`): it is the starting model's, so the
  quantized reference keeps only its layers above it and reads the policy's cached states; its
  quantization error (the logged step-0 KL floor) then comes from the top layers alone.
- The critic is a copy of the reward model (InstructGPT), or a value head on the policy trunk
  (`--critic value-head`); both use the frozen-bottom trick.
- The reward-model score is normalised (gain/bias saved by train-rm) and clipped to +-`score_clip`.
- The step-0 KL floor of a quantized reference is measured and logged (`objective/kl_floor_*`): with the
  policy equal to the unquantized model, the int8/nf4 reference alone already differs from it.

Under torchrun (DDP or FSDP2) each rank samples and evaluates every N-th prompt; the per-row results are
gathered so the rewards, advantages and logs are the whole batch's, and each minibatch trains on the ranks
that hold its rows (`dist.held_rows`, `dist.micro_batches`); FSDP2 also shards the frozen reward-model trunk
and an unquantized reference (`distribute`). Every pass of the policy and the critic is a call of the model
itself (`rollout.forward_reply`: hooks read the head's input and output, and the frozen prefix's states),
which is what lets FSDP2 gather a sharded model's parameters for it.

Sanity checked every step: the first minibatch of each rollout sees the policy that sampled it, so its
ratio is 1 to float error (`policy/logratio_dev_first` = max |log ratio|); a non-finite loss or gradient stops
the run with a message naming the quantity (for a gradient, the parameters), before the optimizer step it
would have poisoned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ..kernels import (
    full_kl,
    full_kl_ref,
    gae,
    kl_estimate,
    kl_estimate_ref,
    last_token_rewards,
    last_token_rewards_ref,
)
from ..kernels import linear_full_kl, linear_full_kl_ref, linear_logprobs, linear_logprobs_ref, ppo_head
from ..kernels import token_logprobs, token_logprobs_ref
from ..kernels._common import nvtx_range
from . import rl
from .checkpoint import append_record, atomic_save, open_run, restore_params, rng_state, set_rng_state
from .config import PPOConfig
from .data import encode_prompt, load_demo_prompts, load_prompts
from .models import (
    autocast,
    fold_reward_normalisation,
    load_causal_lm,
    load_reference_model,
    load_reward_model,
    load_tokenizer,
    resolve_model_path,
    resolve_reward_model_path,
    same_tokenization,
    reward_head,
    reward_head_params,
    reward_trunk,
    save_pretrained_atomic,
)
from .dist import World, deal, full_state, gather_objects, gather_rows, gathered, grad_norm_value, held_rows, init_world
from .dist import fsdp_param_dtype, load_full_state, max_across, micro_batches, param_megabytes, shard_frozen
from .dist import sum_dict_across, wrap
from .errors import UserError
from .family import bottom_modules, bottom_parameters, check_logit_transform, decoder_layers, drop_bottom_layers
from .family import fused_temperature, logit_transform, lora_targets, n_bottom_layers
from .reward import score_texts
from .rollout import Rollout, forward_reply, sample, trunk_hidden
from .verifiable import load_reward_fn, verifiable_scores

log = logging.getLogger("fastrlhf")
DTYPE = torch.float32  # master weights; CUDA computes in bf16 under autocast
# A cached-prefix critic pass gives the critic inputs_embeds; transformers then warns that the pooled reward
# may read a padding position. That pooled value is never used (the critic is read per position): not shown.
logging.getLogger("transformers.modeling_layers").addFilter(
    lambda record: "will not detect padding tokens" not in record.getMessage()
)


class NonFiniteError(FloatingPointError):
    """A loss, gradient or rollout quantity became NaN/inf; the run stopped before the next optimizer step."""


# ------------------------------------------------------------------------------------------------ helpers
def check_finite(name: str, x: torch.Tensor, step: int, module: torch.nn.Module | None = None) -> None:
    """Raise NonFiniteError if `x` has a NaN/inf; for a gradient norm, `module`'s parameters whose gradient
    is not finite are named (the first few), which says where in the network it started."""
    if not torch.isfinite(x).all():
        where = ""
        if module is not None:
            bad = [
                n for n, p in module.named_parameters() if p.grad is not None and not _local(p.grad).isfinite().all()
            ]
            where = f" in {len(bad)} parameters' gradients ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})"
        raise NonFiniteError(
            f"step {step}: {name} is not finite{where} ({x.detach().float().flatten()[:4].tolist()} ...); the run "
            "stopped before the next optimizer step (the last checkpoint is intact: --resume continues from "
            "it). Lower --lr, or check the reward model's scores."
        )


def clip_gradients(name: str, module: torch.nn.Module, params: list, max_norm: float, step: int) -> float:
    """Total gradient norm of `params`, checked finite BEFORE any gradient is scaled (clipping by a NaN
    norm would turn every gradient NaN and hide where it started), then the gradients clipped to it."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # FSDP2: a DTensor
    check_finite(name, torch.tensor(grad_norm_value(norm)), step, module)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return grad_norm_value(norm)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) gradient; a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


class Phase:
    """Times phases, records peak memory and tokens/s per phase, and marks each with an NVTX range."""

    def __init__(self, device: torch.device):
        self.device, self.stats = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with nvtx_range(f"ppo/{name}"):
            yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:  # process high-water mark: on CPU there is no per-phase allocator peak
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.stats[f"perf/time/{name}_s"] = time.perf_counter() - t0
        self.stats[f"perf/peak_mem_mb/{name}"] = peak

    def throughput(self, tokens: dict[str, int]) -> dict[str, float]:
        return {f"perf/tokens_per_s/{k}": n / max(self.stats[f"perf/time/{k}_s"], 1e-9) for k, n in tokens.items()}


def freeze_bottom(model, freeze_layers: int) -> int:
    """Freeze what runs before the first decoder layer (embeddings, and so a tied LM head), the bottom
    layers and the LM head -> how many layers are frozen (-1: all but the top 4)."""
    n = n_bottom_layers(model, freeze_layers)  # full fine-tune (0): any causal LM, with or without a layer list
    if n:
        for p in bottom_parameters(model, n):
            p.requires_grad_(False)
        if model.get_output_embeddings() is not None:  # an LM head (tied or not) stays frozen too
            model.get_output_embeddings().requires_grad_(False)
    return n


def shares_bottom(a, b, n: int) -> bool:
    """Do models `a` and `b` compute bit-identical states entering layer n (the same modules before the
    first layer with the same weights, and bit-identical bottom `n` layers)? Then those states are computed
    once for both. In the pipeline they are: the reward model (and so the critic copied from it) was trained
    from the policy's base with the same bottom frozen. Checked on the weights themselves, never assumed."""
    if n == 0 or len(decoder_layers(a)) < n or len(decoder_layers(b)) < n:
        return False
    ma, mb = bottom_modules(a) + list(decoder_layers(a)[:n]), bottom_modules(b) + list(decoder_layers(b)[:n])
    if len(ma) != len(mb):
        return False
    for x, y in zip(ma, mb):
        sa, sb = x.state_dict(), y.state_dict()
        if type(x) is not type(y) or sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def keep_top_layers(model, n: int) -> None:
    """Drop the bottom `n` decoder layers of `model` (their memory is freed): from then on it is fed the
    states entering layer n (`forward_reply(prefix=...)`), e.g. a reference model on the policy's frozen,
    cached bottom."""
    drop_bottom_layers(model, n)
    log.info(
        "reference: its bottom %d layers dropped (the policy's frozen bottom feeds it); %d kept, %.1f MB",
        n,
        len(decoder_layers(model)) - n,
        model.get_memory_footprint() / 2**20,
    )


def add_lora(model, r: int, alpha: int, n_frozen: int):
    """LoRA on the linears of the trainable layers (peft injects in place) -> the peft wrapper."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, n_frozen)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))


def prompt_batch(n_prompts: int, step: int, batch: int, seed: int) -> list[int]:
    """Prompt indices of rollout `step`: a fresh seeded permutation per pass over the prompts, so the
    loader's position is a function of the step alone (resume needs no loader state)."""
    out = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(k, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return out


# ----------------------------------------------------------------------------------------- forward pieces
def _targets(rollout: Rollout) -> torch.Tensor:
    """(B, R) int64: reply tokens, -100 at padding (skipped by token_logprobs)."""
    return rollout.response_ids.masked_fill(rollout.response_mask == 0, -100)


def head_inputs(model, hidden: torch.Tensor):
    """(hidden, weight, bias) of the LM head in the dtype it would run in (autocast's, if on): the inputs of
    the fused-linear kernels. The head of a bitsandbytes reference stays unquantized, so it serves too."""
    head = model.get_output_embeddings()
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    bias = getattr(head, "bias", None)
    return hidden.to(dtype), head.weight.to(dtype), None if bias is None else bias.to(dtype)


class PolicyPass(NamedTuple):
    """One pass of a causal LM over a rollout (B rows, reply width R)."""

    logp: torch.Tensor
    """(B, R) fp32: log-probs of the reply tokens at the sampling temperature (0 at padding)."""
    entropy: torch.Tensor
    """(B, R) fp32: entropy of the next-token distribution at the same temperature."""
    hidden: torch.Tensor
    """(B, R, H): the LM head's input at the positions that predict the reply tokens."""
    logits: torch.Tensor | None
    """(B, R, V), unscaled; None with `fused_linear`."""
    states: torch.Tensor | None
    """(B, P + R, H): the states entering layer `capture` (the frozen prefix's output), or None."""


def policy_forward(
    model,
    rollout: Rollout,
    temperature: float,
    kernels: bool,
    prefix=None,
    n_frozen: int = 0,
    fused_linear: bool = False,
    capture: int = 0,
) -> PolicyPass:
    """Log-probs and entropy of the reply tokens from one call of `model` (rollout.forward_reply): from the
    logits, or with `fused_linear` straight from the hidden states and the head weight."""
    hidden, logits, states = forward_reply(
        model,
        model.get_output_embeddings(),
        rollout,
        prefix=prefix,
        n_frozen=n_frozen,
        capture=capture,
        head_output=not fused_linear,
    )
    if fused_linear:  # the kernels see the head's output: a family's logit scale is folded into the temperature
        fn = linear_logprobs if kernels else linear_logprobs_ref
        h, weight, bias = head_inputs(model, hidden)
        logp, entropy = fn(
            h,
            weight,
            _targets(rollout),
            bias=bias,
            temperature=fused_temperature(model, temperature),
            return_entropy=True,
        )
        return PolicyPass(logp, entropy, hidden, None, states)
    fn = token_logprobs if kernels else token_logprobs_ref
    logp, entropy = fn(logits, _targets(rollout), temperature=temperature, return_entropy=True)
    return PolicyPass(logp, entropy, hidden, logits, states)


def exact_kl(policy, reference, pol: tuple, ref: tuple, temperature: float, mask: torch.Tensor, kernels: bool):
    """Full-vocabulary KL(policy || reference) per reply token, (B, R) fp32, 0 at padding. pol / ref are
    (hidden, logits) from `policy_forward`: from the logits when there are some, else fused-linear."""
    (hidden, logits), (ref_hidden, ref_logits) = pol, ref
    if logits is not None:
        return (full_kl if kernels else full_kl_ref)(logits, ref_logits, temperature=temperature, mask=mask)
    h, w, b = head_inputs(policy, hidden)
    rh, rw, rb = head_inputs(reference, ref_hidden)
    fn = linear_full_kl if kernels else linear_full_kl_ref
    if logit_transform(policy.config) != logit_transform(reference.config):
        raise UserError("--fused-linear: the policy and the reference scale their logits differently")
    return fn(h, w, rh, rw, bias=b, ref_bias=rb, temperature=fused_temperature(policy, temperature), mask=mask)


def critic_values(
    critic, value_head, rollout: Rollout, policy_hidden, prefix=None, n_frozen: int = 0, capture: int = 0
):
    """Values of the states that predict each reply token: (B, R) fp32, from one call of the separate
    critic (its scalar head read at every position), or from `value_head` on the policy's hidden states.
    -> (values, the critic's states entering layer `capture`, or None)."""
    if value_head is not None:
        return value_head(policy_hidden).squeeze(-1).float(), None
    _, values, states = forward_reply(
        critic, reward_head(critic), rollout, prefix=prefix, n_frozen=n_frozen, capture=capture
    )
    return values.squeeze(-1).float(), states


@torch.no_grad()
def reward_scores(reward_model, rollout: Rollout, kernels: bool, prefix=None, n_frozen: int = 0) -> torch.Tensor:
    """Normalised reward-model score of each prompt + reply, read at the last real token: (B,) fp32. PPO
    gives it `rollout.with_eos(eos)`, the form train-rm trains on. `prefix` ((B, P + R, H)) replaces the
    bottom `n_frozen` layers when the reward model shares them."""
    hidden = trunk_hidden(reward_model, rollout, prefix=prefix, n_frozen=n_frozen)
    weight, bias = reward_head_params(reward_model)
    fn = last_token_rewards if kernels else last_token_rewards_ref
    raw = fn(hidden, weight, bias, attention_mask=rollout.attention_mask)
    cfg = reward_model.config
    return raw * getattr(cfg, "reward_gain", 1.0) + getattr(cfg, "reward_bias", 0.0)


class UpdateModel(torch.nn.Module):
    """One micro-batch's forward in the update (policy log-probs and entropy, or the one-pass PPO head;
    the critic's values) as a module, so that DDP, which hooks `__call__`, sees it. (FSDP2 shards the
    policy and the critic themselves, and every pass calls them: this module stays unwrapped.)"""

    def __init__(self, policy, critic, value_head, cfg: PPOConfig, n_frozen: int, n_frozen_critic: int, one_pass: bool):
        super().__init__()
        self.policy, self.critic, self.value_head, self.cfg = policy, critic, value_head, cfg
        self.n_frozen, self.n_frozen_critic, self.one_pass = n_frozen, n_frozen_critic, one_pass

    def forward(
        self,
        sub: Rollout,
        prefix,
        cprefix,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        ref_logp: torch.Tensor | None = None,
    ):
        """-> logp (b, R), entropy (b, R), values (b, R) or None (no critic), the PPOHeadOutput (one-pass; its
        k3 KL per token when given the reference's `ref_logp` (b, R)) or None."""
        cfg, head = self.cfg, None
        if self.one_pass:
            h, logits, _ = forward_reply(
                self.policy, self.policy.get_output_embeddings(), sub, prefix=prefix, n_frozen=self.n_frozen
            )
            head = ppo_head(
                logits,
                _targets(sub),
                old_logp,
                advantages,
                ref_logprobs=ref_logp,
                clip_range=cfg.clip_range,
                temperature=cfg.temperature,
            )
            logp, ent = head.logprobs, head.entropy
        else:
            logp, ent, h = policy_forward(
                self.policy, sub, cfg.temperature, cfg.kernels, prefix, self.n_frozen, cfg.fused_linear
            )[:3]
        values = None
        if self.critic is not None or self.value_head is not None:
            values, _ = critic_values(self.critic, self.value_head, sub, h, cprefix, self.n_frozen_critic)
        return logp, ent, values, head


# ------------------------------------------------------------------------------------------------- setup
def _check_policy_source(path: str, cfg: PPOConfig) -> None:
    """Refuse what would silently train against the wrong reference."""
    if (Path(path) / "adapter_config.json").exists():
        if cfg.ref_from_adapter:
            raise UserError(
                f"--ref-from-adapter: {path} is an already-trained LoRA adapter, so its base with the adapter "
                "disabled is NOT the starting policy and the KL penalty would pull toward the wrong model. "
                "Use --ref-quant int8|nf4|none (a separate reference) instead."
            )
        raise UserError(f"{path} is a LoRA adapter folder: merge it into its base (peft merge_and_unload) first")
    if cfg.ref_from_adapter and cfg.lora_r <= 0:
        raise UserError("--ref-from-adapter needs a LoRA policy (--lora-r > 0)")


def _load_policy(path: str, cfg: PPOConfig, device: torch.device, dtype: torch.dtype, tokenizer):
    """-> (policy model to call, peft wrapper or None, number of frozen layers)."""
    policy = load_causal_lm(path, dtype=dtype, device=device, tokenizer=tokenizer)
    n_frozen = freeze_bottom(policy, cfg.freeze_layers)
    peft_model = None
    if cfg.lora_r > 0:
        peft_model = add_lora(policy, cfg.lora_r, cfg.lora_alpha, n_frozen)
        policy = peft_model.get_base_model()  # adapters live inside it; we call the plain HF model
    if cfg.grad_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, peft_model, n_frozen


@dataclass
class Models:
    """The models of a run (`load_models`; wrapped for DDP / FSDP2 by `distribute`) and which of them read
    the policy's frozen bottom, computed once per rollout."""

    policy: torch.nn.Module
    """The causal LM the loop calls (with LoRA, its adapters inside it)."""
    peft_model: object | None
    """The policy's peft wrapper (LoRA), or None."""
    n_frozen: int
    """The policy's frozen bottom layers."""
    reference: torch.nn.Module | None
    """The frozen reference (int8 / nf4 / unquantized); None with `ref_from_adapter`."""
    reward_model: torch.nn.Module | None
    """The frozen reward model; None with `--reward rubric` (the check alone scores)."""
    rm_tokenizer: object | None
    rm_retokenize: bool
    """The reward model tokenizes differently from the policy: it scores the replies' re-tokenized text."""
    critic: torch.nn.Module | None
    """A copy of the reward model (`--critic separate`), or None (also for grpo / rloo: no critic)."""
    value_head: torch.nn.Linear | None
    """A value head on the policy trunk (`--critic value-head`), or None."""
    n_frozen_critic: int
    cache: bool
    """The policy's frozen bottom runs once per rollout; its states feed every later pass."""
    ref_shares: bool
    """The reference keeps its top layers only and reads those states."""
    rm_shares: bool
    """The reward model reads them (bit-identical bottom, checked on the weights)."""
    critic_shares: bool
    """The critic reads them (idem)."""
    update: torch.nn.Module
    """The update's forward (`UpdateModel`; under DDP, wrapped)."""
    frozen_sharded: dict = field(default_factory=dict)
    """FSDP2 roots of the frozen models, resharded after their no-grad passes."""

    @property
    def value_module(self) -> torch.nn.Module | None:
        """What the value optimizer trains: the critic, the value head, or None (critic-free)."""
        return self.critic if self.critic is not None else self.value_head


def needs_reward_model(cfg: PPOConfig) -> bool:
    """A reward model is read unless the check alone scores (`--reward rubric`) and no critic copies it."""
    return cfg.reward != "rubric" or (cfg.advantage == "gae" and cfg.critic == "separate")


def load_models(cfg: PPOConfig, policy_path: str, rm_path: str | None, tokenizer, device: torch.device) -> Models:
    """Load the policy (bottom frozen, LoRA), the reference, the reward model (unless `--reward rubric`) and
    the critic, and decide what shares the policy's frozen bottom. `rm_path` None: no reward model is needed
    (`needs_reward_model`)."""
    policy, peft_model, n_frozen = _load_policy(policy_path, cfg, device, DTYPE, tokenizer)
    if cfg.fused_linear:  # the kernels compute softmax(scale * head(h) / T): refuse what they cannot reproduce
        check_logit_transform(policy)
    reference = None
    if not cfg.ref_from_adapter:
        reference = load_reference_model(policy_path, quant=cfg.ref_quant, device=device, tokenizer=tokenizer)
    rm_tokenizer = load_tokenizer(rm_path, padding_side="right") if rm_path is not None else None
    rm_retokenize = rm_path is not None and not same_tokenization(tokenizer, rm_tokenizer)  # reads the text its way
    if rm_retokenize:
        log.info("reward model %s tokenizes differently from the policy: it scores re-tokenized text", rm_path)
        if cfg.critic == "separate" and cfg.advantage == "gae":
            raise UserError(
                "--critic separate copies the reward model, whose tokenizer differs from the policy's "
                "(it could not value the policy's tokens); use --critic value-head"
            )
    reward_model = None
    if cfg.reward != "rubric":  # the check alone needs no reward model
        rm_tok = tokenizer if not rm_retokenize else rm_tokenizer
        reward_model = load_reward_model(rm_path, device=device, tokenizer=rm_tok).requires_grad_(False)
    critic, value_head, n_frozen_critic = None, None, 0
    if cfg.advantage != "gae":  # critic-free: each reply's group of samples is its baseline
        pass
    elif cfg.critic == "separate":
        critic = load_reward_model(rm_path, device=device, tokenizer=tokenizer)
        fold_reward_normalisation(critic)  # values in the units of the normalised scores (the returns')
        n_frozen_critic = freeze_bottom(critic, cfg.freeze_layers)
    else:
        H = policy.config.hidden_size
        value_head = torch.nn.Linear(H, 1, device=device)
        with torch.no_grad():
            value_head.weight.copy_(
                torch.randn(1, H, generator=torch.Generator().manual_seed(cfg.seed)) / math.sqrt(H + 1)
            )
            value_head.bias.zero_()
    cache = cfg.cache_frozen and 0 < n_frozen < len(decoder_layers(policy))
    ref_shares = cache and reference is not None and cfg.ref_shares_bottom
    if ref_shares:  # its bottom would recompute the policy's frozen bottom (the starting model's), quantized
        keep_top_layers(reference, n_frozen)
    rm_shares = (
        cache and reward_model is not None and not rm_retokenize and shares_bottom(policy, reward_model, n_frozen)
    )
    critic_shares = (
        cache and critic is not None and n_frozen_critic == n_frozen and shares_bottom(policy, critic, n_frozen)
    )
    if cache:
        log.info(
            "frozen bottom (%d layers) computed once per rollout for the policy%s%s",
            n_frozen,
            ", the reward model" if rm_shares else "",
            ", the critic" if critic_shares else "",
        )
    one_pass = cfg.kernels and not cfg.fused_linear
    update = UpdateModel(policy, critic, value_head, cfg, n_frozen, n_frozen_critic, one_pass)
    return Models(
        policy,
        peft_model,
        n_frozen,
        reference,
        reward_model,
        rm_tokenizer,
        rm_retokenize,
        critic,
        value_head,
        n_frozen_critic,
        cache,
        ref_shares,
        rm_shares,
        critic_shares,
        update,
    )


def distribute(models: Models, cfg: PPOConfig, world: World) -> None:
    """Under torchrun: FSDP2 shards the policy and the value model (each its own root, a group per layer;
    every pass calls the model itself) and the frozen reward-model trunk and unquantized reference; DDP
    wraps the update's forward. In a world of one nothing changes."""
    param_dtype = fsdp_param_dtype(cfg.fsdp_param_dtype, world.device)
    sharded = world.size > 1 and cfg.parallel == "fsdp2"
    reward_model, reference, frozen = models.reward_model, models.reference, models.frozen_sharded
    if sharded:
        wrap(models.policy, world, "fsdp2", decoder_layers(models.policy), param_dtype)
        critic_layers = decoder_layers(models.critic) if models.critic is not None else ()
        if models.value_module is not None:
            wrap(models.value_module, world, "fsdp2", critic_layers, param_dtype)
        # the frozen models too, so a rank holds 1/N of them: the reference's passes call the model itself, the
        # reward model's its trunk (its scalar head stays whole). bitsandbytes' int8 / nf4 weights do not shard.
        if reward_model is not None:
            trunk = reward_trunk(reward_model)
            frozen["reward model trunk"] = shard_frozen(trunk, world, decoder_layers(reward_model), param_dtype)
        if reference is not None and cfg.ref_quant == "none":
            frozen["reference"] = shard_frozen(reference, world, decoder_layers(reference), param_dtype)
    else:
        models.update = wrap(models.update, world, "ddp")
    if world.size > 1:
        log.info(
            "rank %d of %d on %s, %s%s",
            world.rank,
            world.size,
            world.device,
            cfg.parallel,
            f" (parameters gathered in {param_dtype})" if sharded else "",
        )
    if sharded:
        held = ", ".join("%s %.2f of %.2f MB" % (name, *param_megabytes(mod)) for name, mod in frozen.items())
        whole = f"; the {cfg.ref_quant} reference whole" if reference is not None and cfg.ref_quant != "none" else ""
        log.info("frozen models sharded too (in %s), rank %d holds: %s%s", param_dtype, world.rank, held, whole)


class Optimizers(NamedTuple):
    """AdamW on the policy's and on the value model's trainable parameters, each with the run's LR schedule
    (linear decay to 0 or constant) stepped once per rollout. Critic-free (grpo / rloo): no value parameters,
    vopt and vsched None."""

    policy_params: list
    value_params: list
    opt: torch.optim.Optimizer
    vopt: torch.optim.Optimizer | None
    sched: torch.optim.lr_scheduler.LRScheduler
    vsched: torch.optim.lr_scheduler.LRScheduler | None


def make_optimizers(cfg: PPOConfig, models: Models) -> Optimizers:
    """The optimizers of the trainable parameters (frozen ones excluded; under FSDP2, this rank's shards)."""
    if cfg.lr_schedule == "linear":
        factor = lambda s: max(0.0, 1.0 - s / cfg.steps)  # noqa: E731  (stepped once per rollout)
    else:
        factor = lambda s: 1.0  # noqa: E731
    policy_params = [p for p in models.policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(policy_params, lr=cfg.lr, eps=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if models.value_module is None:  # critic-free
        return Optimizers(policy_params, [], opt, None, sched, None)
    value_params = [p for p in models.value_module.parameters() if p.requires_grad]
    vopt = torch.optim.AdamW(value_params, lr=cfg.critic_lr, eps=1e-5)
    vsched = torch.optim.lr_scheduler.LambdaLR(vopt, factor)
    return Optimizers(policy_params, value_params, opt, vopt, sched, vsched)


# ------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(
    path: Path, step: int, models: Models, optim: Optimizers, kl_ctl, cfg: PPOConfig, world: World
) -> None:
    """Every rank calls this (FSDP2 gathers the shards); rank 0 writes the full trainable state keyed by
    parameter name, the schedules, the KL controller and every rank's RNG state."""
    rng = rng_state()
    rngs = gather_objects(rng, world)
    params, opt_state = full_state(models.policy, optim.opt)  # rank 0 gets the tensors
    vparams, vopt_state = full_state(models.value_module, optim.vopt) if optim.vopt is not None else (None, None)
    if world.main:
        atomic_save(
            {
                "step": step,
                "policy": params,
                "value": vparams,
                "opt": opt_state,
                "vopt": vopt_state,
                "sched": optim.sched.state_dict(),
                "vsched": optim.vsched.state_dict() if optim.vsched is not None else None,
                "kl_ctl": kl_ctl.state_dict(),
                "rng": rng[0],
                "cuda_rng": rng[1],
                "rng_per_rank": rngs,
                "world_size": world.size,
                "config": asdict(cfg),
            },
            path,
        )


def resume(ckpt: dict, models: Models, optim: Optimizers, kl_ctl, cfg: PPOConfig, world: World) -> int:
    """`save_checkpoint`'s state back into the run, whatever world size and engine wrote it -> its step. On
    as many processes as wrote it the sampling streams continue exactly; on another number, fresh streams
    that are still a function of (seed, step, rank)."""
    load_full_state(models.policy, optim.opt, ckpt["policy"], ckpt["opt"])
    if (optim.vopt is None) != (ckpt["vopt"] is None):
        raise UserError(
            "--resume: the checkpoint was written with%s a critic and this run has%s one (--advantage "
            "differs)" % (("out", "") if ckpt["vopt"] is None else ("", " no"))
        )
    if optim.vopt is not None:
        load_full_state(models.value_module, optim.vopt, ckpt["value"], ckpt["vopt"])
    for obj, key in ((optim.sched, "sched"), (optim.vsched, "vsched"), (kl_ctl, "kl_ctl")):
        if obj is not None:
            obj.load_state_dict(ckpt[key])
    rngs = ckpt.get("rng_per_rank", [(ckpt["rng"], ckpt["cuda_rng"])])
    if len(rngs) == world.size:
        set_rng_state(*rngs[world.rank])
    else:
        torch.manual_seed(cfg.seed + 1_000_003 * world.rank + 7919 * ckpt["step"])
        log.info("checkpoint written by %d processes, resumed on %d: new sampling streams", len(rngs), world.size)
    return ckpt["step"]


# ------------------------------------------------------------------------------------------ loop pieces
class OldPolicy(NamedTuple):
    """This rank's rollout rows under the policy that sampled them (no grad)."""

    logp: torch.Tensor
    """(b, R) fp32 log-probs of the reply tokens at the sampling temperature."""
    entropy: torch.Tensor
    """(b, R) fp32."""
    values: torch.Tensor | None
    """(b, R) fp32: the critic's values (None: critic-free)."""
    hidden: torch.Tensor
    """(b, R, H): the LM head's input."""
    prefix: torch.Tensor | None
    """(b, P + R, H): the states entering the policy's first trained layer (the cache), or None."""
    cprefix: torch.Tensor | None
    """The same for the critic."""
    prefix_scored: torch.Tensor | None
    """(b, P + R + 1, H): `prefix` over the reward model's input (the appended EOS) when it shares the bottom."""


def old_policy_pass(models: Models, ro: Rollout, scored: Rollout, cfg: PPOConfig, keep_logits: bool):
    """One pass of the policy and one of the critic over the rollout -> (OldPolicy, the (b, R, V) logits if
    `keep_logits` (and any exist), else None). With the cache the pass also keeps the states entering layer
    n_frozen, from which every epoch of the update runs the top layers only. When the reward model shares
    that bottom the pass reads `scored` (causal: the reply's columns are the same) so that the appended EOS
    has its states too; its own column is then dropped."""
    m = models
    R, P = ro.response_ids.shape[1], ro.prompt_ids.shape[1]
    logp, entropy, hidden, logits, prefix_scored = policy_forward(
        m.policy,
        scored if m.rm_shares else ro,
        cfg.temperature,
        cfg.kernels,
        fused_linear=cfg.fused_linear,
        capture=m.n_frozen if m.cache else 0,
    )
    logp, entropy, hidden = logp[:, :R], entropy[:, :R], hidden[:, :R]
    logits = logits[:, :R] if logits is not None and keep_logits else None  # (b, R, V): freed before the reference's
    prefix = prefix_scored[:, : P + R] if prefix_scored is not None else None
    values, cprefix = None, None
    if m.value_module is not None:
        capture = m.n_frozen_critic if m.critic is not None and cfg.cache_frozen and not m.critic_shares else 0
        values, cprefix = critic_values(
            m.critic, m.value_head, ro, hidden, prefix if m.critic_shares else None, m.n_frozen_critic, capture=capture
        )
        if m.critic_shares:
            cprefix = prefix
    return OldPolicy(logp, entropy, values, hidden, prefix, cprefix, prefix_scored), logits


def rollout_scores(
    models: Models, ro: Rollout, scored: Rollout, old: OldPolicy, rows: list, tokenizer, cfg: PPOConfig, check_fn
) -> tuple[torch.Tensor, dict]:
    """-> (b,) fp32 score of each reply, and its parts for the log ({} for the reward model alone).
    The reward model's normalised score is read at each reply's EOS (`scored`), over the policy's cached
    bottom when it shares it; one that tokenizes differently reads the decoded reply after its row's prompt
    (`rows`: the PromptRecord of each reply), rendered with its own chat template. With a verifiable check
    (`check_fn`, --reward rubric|both) the score is the check (no reward model loaded), or the weighted sum."""
    if models.reward_model is None:  # --reward rubric
        check = verifiable_scores(check_fn, rows, ro.texts(tokenizer), ro.response_ids.device)
        return check, {"check": check}
    if models.rm_retokenize:
        prompts = [r.prompt for r in rows]
        score = score_texts(
            models.reward_model, models.rm_tokenizer, prompts, ro.texts(tokenizer), use_kernels=cfg.kernels
        )
    else:
        shared = old.prefix_scored if models.rm_shares else None
        score = reward_scores(models.reward_model, scored, cfg.kernels, shared, models.n_frozen)
    score = score.float()
    if check_fn is None:
        return score, {}
    check = verifiable_scores(check_fn, rows, ro.texts(tokenizer), score.device)
    return cfg.rm_weight * score + cfg.check_weight * check, {"rm_score": score, "check": check}


def reference_pass(models: Models, ro: Rollout, old: OldPolicy, cfg: PPOConfig, keep_logits: bool):
    """The reply tokens under the frozen reference -> ((b, R) fp32 log-probs, the exact KL's (hidden, logits)
    if `keep_logits`, else None): the LoRA policy with its adapter disabled, or the reference model (with
    `ref_shares`, its top layers on the policy's cached bottom)."""
    if cfg.ref_from_adapter:
        with models.peft_model.disable_adapter():  # LoRA sits on the unfrozen layers only: reuse the prefix
            ref = policy_forward(
                models.policy, ro, cfg.temperature, cfg.kernels, old.prefix, models.n_frozen, cfg.fused_linear
            )
    else:
        ref = policy_forward(
            models.reference,
            ro,
            cfg.temperature,
            cfg.kernels,
            old.prefix if models.ref_shares else None,
            fused_linear=cfg.fused_linear,
        )
    return ref.logp, (ref.hidden, ref.logits) if keep_logits else None


def batch_stats(
    g: dict, kl_g, penalized, rewards, returns, beta: float, kl_seq: float, beta_reward: float, is_cap=None
) -> dict[str, float]:
    """A step's `objective/`, `policy/` (its replies) and `value/` statistics over the whole batch: `g` the
    gathered rows (`gather_rows`), `kl_g` the KL estimate, `beta` its coefficient, `beta_reward` the one in the
    reward (beta, or 0 with the KL in the loss); `returns` None (critic-free): no `value/` keys. `sampler/`:
    the sampler's log-probs against the training forward's, and the weights of `--behaviour-is-cap` (`is_cap`)."""
    stats = {
        "objective/score": float(g["score"].mean()),
        "objective/score_penalized": float(penalized.mean()),
        "objective/kl": float(rl.masked_mean(g["kl_k1"], g["mask"])),
        "objective/kl_k3": float(rl.masked_mean(g["kl_k3"], g["mask"])),
        "objective/kl_seq": kl_seq,
        "objective/non_score_reward": float((-beta_reward * kl_g).sum(-1).mean()),
        "objective/rlhf_reward": float(rewards.sum(-1).mean()),
        "objective/kl_coef": beta,
        "policy/entropy": float(rl.masked_mean(g["entropy"], g["mask"])),
        "policy/response_length": float(g["length"].float().mean()),
        "policy/eos_rate": float(g["has_eos"].float().mean()),
    }
    if returns is not None:
        stats["value/explained_variance"] = float(rl.explained_variance(g["values"], returns, g["mask"]))
    if "kl_full" in g:
        stats["objective/kl_full"] = float(rl.masked_mean(g["kl_full"], g["mask"]))
    if "behaviour_logp" in g:  # the sampler's log-probs against the training forward's (old) ones
        mismatch = rl.behaviour_mismatch(g["old_logp"], g["behaviour_logp"], g["mask"])
        stats.update({f"sampler/{key}": float(v) for key, v in mismatch.items()})
    if "is_weight" in g:  # --behaviour-is-cap: the weights' mean and the share of tokens at the cap
        stats["sampler/is_weight_mean"] = float(rl.masked_mean(g["is_weight"], g["mask"]))
        stats["sampler/is_capped"] = float(rl.masked_mean((g["is_weight"] >= is_cap).float(), g["mask"]))
    if "check" in g:  # --reward rubric|both: each part of the score
        stats["objective/check"] = float(g["check"].mean())
    if "rm_score" in g:
        stats["objective/rm_score"] = float(g["rm_score"].mean())
    return stats


def batch_advantages(cfg: PPOConfig, g: dict, beta: float):
    """Rewards and advantages of the whole batch `g` (`gather_rows`; rows of a prompt adjacent), `beta` the
    KL coefficient: -beta * KL per token (unless the KL is in the loss) + the penalised, clipped score at the
    last token; GAE (whitened) against the critic's values, or one advantage per reply from its prompt's group.
    -> (the KL estimate, penalised scores (B,), beta in the reward, rewards (B, R), advantages (B, R),
    returns (B, R) or None without a critic)."""
    kl_g = {"k1": g["kl_k1"], "k3": g["kl_k3"], "full": g.get("kl_full")}[cfg.kl_estimator]
    penalized = rl.clip_scores(rl.apply_eos_penalty(g["score"], g["has_eos"], cfg.missing_eos_penalty), cfg.score_clip)
    beta_reward = beta if cfg.kl_in == "reward" else 0.0
    rewards = rl.shaped_rewards(penalized, kl_g, g["mask"], beta_reward)  # (B, R)
    if cfg.advantage == "gae":
        gae_fn = gae if cfg.kernels else rl.gae
        advantages, returns = gae_fn(rewards, g["values"], g["mask"], gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = rl.masked_whiten(advantages, g["mask"])
        return kl_g, penalized, beta_reward, rewards, advantages, returns
    k, seq_reward = cfg.samples_per_prompt, rewards.sum(-1)  # each reply's total reward, (B,)
    if cfg.advantage == "grpo":
        seq_adv = rl.grpo_advantages(seq_reward, k, cfg.grpo_scale_std)
    else:
        seq_adv = rl.rloo_advantages(seq_reward, k)
    return kl_g, penalized, beta_reward, rewards, rl.sequence_to_tokens(seq_adv, g["mask"]), None


def phase_tokens(ro: Rollout, ppo_epochs: int) -> dict[str, int]:
    """Tokens each phase processed (for its tokens/s): the replies, or the whole sequences."""
    n_seq, n_reply = int(ro.attention_mask.sum()), int(ro.response_mask.sum())
    return dict(
        generation=n_reply,
        policy_eval=n_seq,
        scoring=n_seq,
        reference=n_seq,
        rewards=n_reply,
        update=n_seq * ppo_epochs,
    )


def log_setup(cfg: PPOConfig, models: Models, optim: Optimizers) -> None:
    log.info(
        "policy: %d bottom layers frozen, LoRA r=%d, %.1fM trainable; critic: %s (%.1fM trainable); reference: %s",
        models.n_frozen,
        cfg.lora_r,
        sum(p.numel() for p in optim.policy_params) / 1e6,
        cfg.critic if models.value_module is not None else f"none ({cfg.advantage})",
        sum(p.numel() for p in optim.value_params) / 1e6,
        "policy base, adapter disabled" if cfg.ref_from_adapter else cfg.ref_quant,
    )


def log_kl_floor(record: dict, cfg: PPOConfig) -> None:
    """Step 0 (the policy still equals the starting model): the KL is the reference's own error."""
    for est, key in (("k1", "objective/kl"), ("k3", "objective/kl_k3"), ("full", "objective/kl_full")):
        record[f"objective/kl_floor_{est}"] = record[key]
    log.info(
        "step-0 KL floor of the %s reference: %.2e per token (exact), %.2e (k3)",
        "adapter-disabled" if cfg.ref_from_adapter else cfg.ref_quant,
        record["objective/kl_full"],
        record["objective/kl_k3"],
    )


POSTFIX = ("objective/score", "objective/kl", "policy/eos_rate", "policy/response_length")
"""The progress bar's numbers."""


def optimizer_step(optim: Optimizers, policy, value_module, max_norm: float, step: int) -> dict[str, float]:
    """Clip each model's gradients (their norm checked finite first), step both optimizers and clear the
    gradients -> the gradient norms before clipping."""
    norms = {"policy/grad_norm": clip_gradients("policy gradient norm", policy, optim.policy_params, max_norm, step)}
    opts = [optim.opt]
    if optim.vopt is not None:
        norms["value/grad_norm"] = clip_gradients(
            "value gradient norm", value_module, optim.value_params, max_norm, step
        )
        opts.append(optim.vopt)
    for opt in opts:
        opt.step()
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    return norms


def _rows(x: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return x[rows] if x is not None else None


# ----------------------------------------------------------------------------------------------- the loop
def train_ppo(cfg: PPOConfig) -> dict:
    """The PPO loop, top to bottom. Returns the summary (also in out_dir/summary.json).
    Under torchrun (DDP / FSDP2, trainer/dist.py) each rank samples and evaluates its share of the prompts; the
    per-row results are gathered so rewards, advantages, whitening and the logs are the whole batch's, and
    the update runs each minibatch's rows on the ranks that hold them; rank 0 writes the files."""
    world = init_world(cfg.device)
    device = world.device
    if world.size > 1 and cfg.batch_prompts < world.size:
        raise UserError(f"--batch-prompts {cfg.batch_prompts} < {world.size} processes: every rank needs a prompt")
    sharded = world.size > 1 and cfg.parallel == "fsdp2"
    if sharded and cfg.fused_linear:  # the fused kernels read the LM-head weight outside the model's own call
        raise UserError("--fused-linear does not run under FSDP2 (the head weight is sharded): use --parallel ddp")
    if cfg.advantage != "gae" and cfg.samples_per_prompt < 2:
        raise UserError(
            f"--advantage {cfg.advantage} compares each reply with its prompt's other replies: "
            f"it needs --samples-per-prompt >= 2 (got {cfg.samples_per_prompt})"
        )
    if cfg.behaviour_is_cap is not None and cfg.behaviour_is_cap <= 0:
        raise UserError(f"--behaviour-is-cap must be > 0 (a weight's upper bound), got {cfg.behaviour_is_cap}")
    one_pass = cfg.kernels and not cfg.fused_linear  # the update's head is one `ppo_head` pass over the logits
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + 1_000_003 * world.rank)  # each rank samples its own replies
    T, k = cfg.temperature, cfg.samples_per_prompt

    # ---- data, models, optimizers
    records = load_demo_prompts() if cfg.prompts == "demo" else load_prompts(cfg.prompts)
    _check_policy_source(cfg.policy, cfg)
    policy_path = resolve_model_path(cfg.policy)
    rm_path = resolve_reward_model_path(cfg.reward_model) if needs_reward_model(cfg) else None  # checked early
    check_fn = load_reward_fn(cfg.reward_fn) if cfg.reward != "rm" else None  # the verifiable reward
    tokenizer = load_tokenizer(policy_path)  # left padding for generation
    prompts = [encode_prompt(tokenizer, r.prompt) for r in records]
    models = load_models(cfg, policy_path, rm_path, tokenizer, device)
    distribute(models, cfg, world)
    policy, value_module = models.policy, models.value_module
    optim = make_optimizers(cfg, models)
    kl_ctl = rl.FixedKLController(cfg.kl_coef)
    if cfg.adaptive_kl:
        kl_ctl = rl.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    log_setup(cfg, models, optim)
    ckpt_path, log_path = out / "checkpoint.pt", out / "metrics.jsonl"
    ckpt = open_run(ckpt_path, log_path, cfg.resume, world)  # None: a fresh run
    step = 0
    if ckpt is not None:
        step = resume(ckpt, models, optim, kl_ctl, cfg, world)
        log.info("resumed from %s at step %d of %d", ckpt_path, step, cfg.steps)
    writer = _tensorboard(out) if world.main else None

    stop = cfg.steps if cfg.max_steps is None else min(cfg.steps, cfg.max_steps)
    sampling = dict(
        max_new_tokens=cfg.max_new_tokens, temperature=T, samples_per_prompt=k, device=device, compile=cfg.cuda_graphs
    )
    bar = tqdm(total=stop, initial=step, desc="ppo", unit="step", disable=not world.main)
    t_start = time.perf_counter()
    summary: dict = {}
    while step < stop:
        phase = Phase(device)
        idx = prompt_batch(len(prompts), step, cfg.batch_prompts, cfg.seed)
        mine = deal(len(idx), world)  # this rank's prompts: every N-th of the batch

        # ---- rollout: k replies to each of this rank's prompts
        with phase("generation"), autocast(device), gathered(decoder_layers(policy)):
            ro = sample(policy, tokenizer, [prompts[idx[j]] for j in mine], synced_gpus=sharded, **sampling)
        mask = ro.response_mask.float()  # (b, R) this rank's rows
        policy.eval()
        # the reward model reads each reply as train-rm trained it: ending in EOS, appended (one more column)
        # where the policy was cut off at the token limit; the missing-EOS penalty judges the cut
        scored = ro.with_eos(tokenizer.eos_token_id, tokenizer.pad_token_id)
        need_full_kl = cfg.kl_estimator == "full" or step == 0  # step 0: the exact KL floor
        with torch.no_grad(), autocast(device):
            # ---- old policy: log-probs, entropy and values of the rollout
            with phase("policy_eval"):
                old, logits = old_policy_pass(models, ro, scored, cfg, keep_logits=need_full_kl)

            # ---- score: the reward model at each reply's EOS
            with phase("scoring"):
                t_rm = time.perf_counter()
                row_records = [records[idx[j]] for j in mine for _ in range(k)]
                score, score_parts = rollout_scores(models, ro, scored, old, row_records, tokenizer, cfg, check_fn)
                if models.rm_retokenize:  # decoding, its chat template and re-tokenizing (and any check) included
                    phase.stats["perf/time/rm_retokenized_s"] = time.perf_counter() - t_rm

            # ---- reference: log-probs of the sampled tokens under the frozen reference
            with phase("reference"):
                ref_logp, ref_out = reference_pass(models, ro, old, cfg, keep_logits=need_full_kl)
            for frozen in models.frozen_sharded.values():  # FSDP2 leaves a root's own parameters gathered
                frozen.reshard()

            # ---- rewards and advantages: -beta * KL per token (unless the KL is in the loss) + the score at the
            #      last token; GAE (whitened), or one advantage per reply from its prompt's group (grpo / rloo)
            with phase("rewards"):
                kl_fn = kl_estimate if cfg.kernels else kl_estimate_ref
                kl_k1 = kl_fn(old.logp, ref_logp, estimator="k1") * mask  # (b, R)
                kl_k3 = kl_fn(old.logp, ref_logp, estimator="k3") * mask
                ref_model = models.reference if models.reference is not None else policy
                kl_full = (
                    exact_kl(policy, ref_model, (old.hidden, logits), ref_out, T, ro.response_mask, cfg.kernels)
                    if need_full_kl
                    else None
                )
                del logits, ref_out
                check_finite("reward-model score", score, step)
                check_finite("old-policy log-probs", old.logp, step)
                check_finite("reference log-probs", ref_logp, step)
                # the whole batch on every rank (a world of one: these same tensors), (B, R) / (B,)
                local = dict(score=score, has_eos=ro.has_eos, mask=mask, kl_k1=kl_k1, kl_k3=kl_k3, entropy=old.entropy)
                local["length"] = ro.response_lengths
                if old.values is not None:  # gae: the critic's values
                    local["values"] = old.values
                local.update(score_parts)  # --reward rubric|both: the reward model's score and the check
                if kl_full is not None:
                    local["kl_full"] = kl_full
                if ro.behaviour_logprobs is not None:  # the sampler's log-probs, to compare with the trainer's
                    local.update(behaviour_logp=ro.behaviour_logprobs, old_logp=old.logp)
                if cfg.behaviour_is_cap is not None:  # (b, R) truncated importance weights, sampler -> trainer
                    if ro.behaviour_logprobs is None:
                        raise UserError("--behaviour-is-cap needs the sampler's log-probs, and these replies have none")
                    local["is_weight"] = rl.truncated_is_weights(
                        old.logp, ro.behaviour_logprobs, mask, cfg.behaviour_is_cap
                    )
                g = gather_rows(local, world, len(idx), k)
                kl_g, penalized, beta_reward, rewards, advantages, returns = batch_advantages(cfg, g, kl_ctl.value)
                check_finite("advantages", advantages, step)
                held = held_rows(len(idx), k, world, device)  # global row -> this rank's row, or -1
                R = mask.shape[1]
                adv_l = advantages[held >= 0, :R]  # this rank's rows
                if "is_weight" in local:  # w > 0, so max(-wA r, -wA clip(r)) = w max(-A r, -A clip(r))
                    adv_l = adv_l * local["is_weight"]
                ret_l = returns[held >= 0, :R] if returns is not None else None
                ref_l = ref_logp if cfg.kl_in == "loss" else None  # (b, R): the KL term of the loss

        # ---- update: ppo_epochs passes of shuffled minibatches, each row on the rank that holds it
        policy.train()
        if value_module is not None:
            value_module.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        B = len(held)  # rows in the whole batch
        mb_stats: list[dict] = []
        first_dev = 0.0
        lr_used = optim.sched.get_last_lr()[0]
        with phase("update"):
            for epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(B, generator=gen).to(device)  # the same minibatches on every rank
                for start in range(0, B, cfg.minibatch_size):
                    rows = perm[start : start + cfg.minibatch_size]
                    mb_tokens = g["mask"][rows].sum().clamp(min=1)
                    acc: dict[str, float] = {}
                    for micro in micro_batches(rows, held, cfg.grad_accum, world):
                        idle = micro is None  # nothing here for this micro-batch: row 0 at weight 0
                        micro = torch.zeros(1, dtype=torch.long, device=device) if idle else micro
                        sub, m = ro.select(micro), mask[micro]
                        if cfg.loss_agg == "token":  # micro-batch share of the minibatch's tokens
                            w = m.sum() / mb_tokens * (0.0 if idle else 1.0)
                        else:  # ... of its rows
                            w = torch.tensor((0.0 if idle else len(micro)) / len(rows), device=device)
                        old_m, adv_m, prefix, cprefix = old.logp[micro], adv_l[micro], old.prefix, old.cprefix
                        with autocast(device):
                            logp, ent, values, head = models.update(
                                sub, _rows(prefix, micro), _rows(cprefix, micro), old_m, adv_m, _rows(ref_l, micro)
                            )
                        if one_pass:
                            log_ratio = logp - old_m
                            pg_loss, pg = rl.reduce_policy_loss(
                                head.pg_loss, head.clipped, log_ratio, head.ratio, m, cfg.loss_agg
                            )
                        else:
                            pg_loss, pg = rl.policy_loss(logp, old_m, adv_m, m, cfg.clip_range, cfg.loss_agg)
                        terms = {**{f"policy/{key}": v for key, v in pg.items()}, "policy/loss": pg_loss}
                        checks, loss = [("policy loss", pg_loss)], pg_loss
                        if values is not None:  # the critic's clipped value loss (gae)
                            vf_loss, vf = rl.value_loss(
                                values, old.values[micro], ret_l[micro], m, cfg.clip_range_value
                            )
                            checks.append(("value loss", vf_loss))
                            loss = pg_loss + cfg.vf_coef * vf_loss
                            terms.update({"value/clipfrac": vf["vf_clipfrac"], "value/loss": vf_loss})
                        ent_mean = rl.entropy_bonus(ent, m)
                        loss = loss - cfg.ent_coef * ent_mean
                        if ref_l is not None:  # k3 of the policy being updated to the reference, per token
                            kl_tok = head.kl if one_pass else kl_fn(logp, ref_l[micro], estimator="k3")
                            kl_loss = rl.aggregate(kl_tok, m, cfg.loss_agg)
                            checks.append(("KL loss", kl_loss))
                            loss = loss + kl_ctl.value * kl_loss
                            terms["policy/kl_loss"] = kl_loss
                        for name, x in (*checks, ("entropy", ent_mean)):
                            check_finite(name, x, step)
                        # DDP / FSDP2 average the ranks' gradients: x N gives the sum, the 1-process gradient
                        loss = loss * w * world.size
                        loss.backward()
                        for key, v in terms.items():
                            acc[key] = acc.get(key, 0.0) + float(v.detach()) * float(w)
                        if not mb_stats and not idle:  # nothing updated yet: the policy is the one that sampled
                            first_dev = max(first_dev, float(((logp.detach() - old_m) * m).abs().max()))
                    acc = sum_dict_across(acc, world)
                    if not mb_stats:
                        first_dev = max_across(first_dev, world)
                    acc.update(optimizer_step(optim, policy, value_module, cfg.max_grad_norm, step))
                    mb_stats.append(acc)
        optim.sched.step()
        if optim.vsched is not None:
            optim.vsched.step()
        policy.eval()

        # ---- log: the whole batch's statistics, one JSON line per step
        kl_seq = float(g["kl_k1"].sum(-1).mean())
        beta = kl_ctl.value
        kl_ctl.update(kl_seq, B)
        record = {
            "step": step + 1,
            **batch_stats(g, kl_g, penalized, rewards, returns, beta, kl_seq, beta_reward, cfg.behaviour_is_cap),
            "policy/lr": lr_used,
            "policy/logratio_dev_first": first_dev,
            **{key: sum(s[key] for s in mb_stats) / len(mb_stats) for key in mb_stats[0]},  # minibatch means
            **phase.stats,
            **phase.throughput(phase_tokens(ro, cfg.ppo_epochs)),
            "perf/elapsed_s": time.perf_counter() - t_start,
        }
        if step == 0:  # the policy still equals the starting model: this is the reference's own error
            log_kl_floor(record, cfg)
        if world.main:
            append_record(log_path, record)
        if writer is not None:
            for key, v in record.items():
                writer.add_scalar(key, v, step + 1)
        step += 1
        bar.update(1)
        bar.set_postfix({key.split("/")[1]: f"{record[key]:.3g}" for key in POSTFIX})
        summary = record

        # ---- checkpoint
        if step % cfg.save_every == 0 or step == stop:
            save_checkpoint(ckpt_path, step, models, optim, kl_ctl, cfg, world)
    bar.close()
    if writer is not None:
        writer.close()
    if step < cfg.steps:
        log.info("stopped at step %d of %d (--max-steps); continue with --resume", step, cfg.steps)
        return {"policy": None, "steps": step, "final": summary, "seconds": time.perf_counter() - t_start}
    peft_model = models.peft_model
    if sharded:  # the trained parameters gathered into a plain copy of the policy on rank 0
        params, _ = full_state(policy, optim.opt)
        if world.main:
            policy, peft_model, _ = _load_policy(policy_path, cfg, device, DTYPE, tokenizer)
            restore_params(policy, params)
    if not world.main:
        return {"policy": str(out / "policy"), "steps": step, "final": summary, "rank": world.rank}

    final = peft_model.merge_and_unload() if peft_model is not None else policy  # LoRA merged: a plain model
    save_pretrained_atomic(final, tokenizer, out / "policy")
    result = {"policy": str(out / "policy"), "steps": step, "final": summary, "seconds": time.perf_counter() - t_start}
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    log.info("PPO finished: %d steps; policy saved to %s", step, out / "policy")
    return result


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: JSONL only
        return None
    return SummaryWriter(str(out / "tensorboard"))
