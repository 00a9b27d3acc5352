"""Pure PPO-for-LM math: masked statistics, KL-shaped rewards, GAE, group advantages (GRPO, RLOO), PPO
losses, KL controllers.

No I/O, no models, torch only. Conventions:

- Token tensors are (B, T) over RESPONSE tokens only (the prompt is not in them).
- `mask` is (B, T) bool or 0/1 float: 1 for real response tokens, including the final EOS token, 0 for the
  padding after them. Real tokens form a prefix of each row, so a row's last real token is at
  `mask.sum(1) - 1`; a row may have no real tokens at all.
- Values at padding positions are ignored: they may be garbage (even inf / NaN) without changing any
  result or gradient. Outputs documented as "0 at padding" are
  exactly 0 there.
- A mean over no entries is 0, not NaN, so an all-padding row (or batch) never poisons a loss.
- Per-token inputs keep their dtype (float32 in training, float64 in tests); scores are (B,).
- Stats dicts hold detached 0-d tensors (`float(v)` gives the number; no GPU sync until then).
- Sign conventions: losses are minimised; `apply_eos_penalty` ADDS its (negative) penalty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


# ------------------------------------------------------------------------------------- masked stats
def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """x (B, T) float, mask (B, T) -> mean of x where mask == 1: a scalar (dim None) or reduced over dim.
    An empty selection gives 0."""
    m = mask.bool()
    total = x.where(m, 0).sum() if dim is None else x.where(m, 0).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """x (B, T) float, mask (B, T) -> scalar variance of x where mask == 1. `unbiased` applies Bessel's
    n / (n - 1) when n > 1; one entry gives 0, no entries give 0."""
    m = mask.bool()
    var = masked_mean((x - masked_mean(x, m)) ** 2, m)
    if unbiased:
        n = m.sum()
        var = var * n / (n - 1).clamp(min=1)  # n = 1 (or 0): no correction
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """x (B, T) float, mask (B, T) -> (B, T): (x - mean) / sqrt(var + eps) over the masked entries (unbiased
    var), 0 at padding. shift_mean=False adds the mean back (scale only: the TRL / InstructGPT convention
    for rewards, which keeps their sign)."""
    m = mask.bool()
    mean = masked_mean(x, m)
    out = (x - mean) * torch.rsqrt(masked_var(x, m) + eps)
    if not shift_mean:
        out = out + mean
    return out.where(m, 0)


# ------------------------------------------------------------------------------------------ rewards
def shaped_rewards(score: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """score (B,) float, kl (B, T) float per-token KL estimate, mask (B, T) -> (B, T) float32 reward:
    -kl_coef * kl at every real token, plus score at the last real token of each row; 0 at padding.
    A row with no real tokens gets all zeros."""
    m = mask.bool()
    rewards = (-kl_coef * kl.float()).where(m, 0)
    last = m.sum(1) - 1  # (B,); -1 for an empty row, which matches no position below
    is_last = torch.arange(m.shape[1], device=m.device) == last[:, None]  # (B, T) bool
    return rewards + torch.where(is_last, score.float()[:, None], 0)


def apply_eos_penalty(score: Tensor, has_eos: Tensor, penalty: float | None) -> Tensor:
    """score (B,) float, has_eos (B,) bool -> (B,): rows that did not end with EOS get score + penalty.
    Our convention: the penalty is ADDED, so it must be <= 0 (e.g. -1.0); TRL's `missing_eos_penalty` is
    a positive number it subtracts. None leaves the score unchanged."""
    if penalty is None:
        return score
    if penalty > 0:
        raise ValueError(f"eos penalty is added to the score and must be <= 0, got {penalty}")
    return torch.where(has_eos.bool(), score, score + penalty)


def clip_scores(score: Tensor, limit: float | None) -> Tensor:
    """score (B,) float -> (B,) clamped to [-limit, limit]; None leaves it unchanged."""
    if limit is None:
        return score
    if limit <= 0:
        raise ValueError(f"score clip limit must be > 0, got {limit}")
    return score.clamp(-limit, limit)


# ---------------------------------------------------------------------------------------------- GAE
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """rewards (B, T) float, values (B, T) float, mask (B, T) -> (advantages, returns), both (B, T) in the
    dtype of rewards, detached (they are targets), 0 at padding.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},  returns = A + V,
    where V and A after the last real token are 0: the episode ends there (padding is terminal)."""
    m = mask.bool()
    rewards, values = rewards.detach().where(m, 0), values.detach().where(m, 0)
    next_value = next_adv = torch.zeros_like(rewards[:, 0])  # (B,)
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv).where(m[:, t], 0)
        next_value = values[:, t]
        advantages.append(next_adv)
    advantages = torch.stack(advantages[::-1], dim=1)
    return advantages, advantages + values


# ------------------------------------------------------------------------------- group advantages
def _groups(scores: Tensor, group_size: int) -> Tensor:
    """scores (B,) -> (B // G, G) float: rows of one prompt are adjacent (`Rollout.prompt_index`)."""
    if group_size < 2:
        raise ValueError(f"group advantages need at least 2 samples per prompt, got {group_size}")
    if scores.dim() != 1 or scores.shape[0] % group_size:
        raise ValueError(
            f"scores must be (B,) with B a multiple of the group size {group_size}, got {tuple(scores.shape)}"
        )
    return scores.detach().view(-1, group_size)


def grpo_advantages(scores: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """scores (B,) float, one per reply, G = group_size adjacent rows per prompt -> (B,) advantages in the
    dtype of scores, detached: A_i = (r_i - mean_g) / (std_g + eps) with the group's unbiased std (Shao et al.
    2024, as TRL computes it); scale_by_std=False gives r_i - mean_g (Liu et al. 2025, "Dr. GRPO"). A group
    whose scores are all equal gets 0 for every row."""
    r = _groups(scores, group_size)
    centred = r - r.mean(1, keepdim=True)
    if scale_by_std:
        centred = centred / (r.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """scores (B,) float, G = group_size adjacent rows per prompt -> (B,) advantages in the dtype of scores,
    detached: A_i = r_i - mean of the OTHER G - 1 rows of its group (Ahmadian et al. 2024), which equals
    G / (G - 1) * (r_i - mean_g). All-equal groups get 0."""
    r = _groups(scores, group_size)
    baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).reshape(-1)


def sequence_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """advantages (B,) float, one per reply, mask (B, T) -> (B, T) float32: each row's advantage at every
    real token of that row, 0 at padding (an all-padding row is all 0)."""
    return advantages.float()[:, None].expand(mask.shape).where(mask.bool(), 0)


def aggregate(x: Tensor, mask: Tensor, how: str = "token") -> Tensor:
    """x (B, T) float per-token loss terms, mask (B, T) -> scalar. "token": the masked mean over every real
    token of the batch (each token weighs the same: long replies weigh more; PPO's and DAPO's convention).
    "sequence": each row's masked mean, then the mean over rows (each reply weighs the same; GRPO's
    original 1/G sum_i 1/|o_i| sum_t). An all-padding row counts as a row of 0 in "sequence"."""
    if how == "token":
        return masked_mean(x, mask)
    if how == "sequence":
        return masked_mean(x, mask, dim=1).mean() if x.shape[0] else x.new_zeros(())
    raise ValueError(f"loss aggregation must be 'token' or 'sequence', got {how!r}")


# ------------------------------------------------------------------------------------------- losses
def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    agg: str = "token",
) -> tuple[Tensor, dict]:
    """logprobs (B, T) float (with grad), old_logprobs (B, T), advantages (B, T), mask (B, T) ->
    (scalar loss, stats). PPO clipped surrogate, ratio = exp(logprobs - old_logprobs):
    loss = masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c))) (agg="token"; "sequence": `aggregate`).
    stats: clipfrac (fraction of tokens where the clipped term is strictly larger), approx_kl
    (masked mean of 0.5 * log_ratio^2), ratio_mean, ratio_max (0 when no token is real)."""
    m = mask.bool()
    log_ratio = (logprobs - old_logprobs).where(m, 0)  # padding: ratio 1, no overflow, no NaN gradient
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return reduce_policy_loss(
        torch.maximum(unclipped, clipped), (clipped > unclipped).to(ratio.dtype), log_ratio, ratio, m, agg
    )


def reduce_policy_loss(
    pg_loss: Tensor, clipped: Tensor, log_ratio: Tensor, ratio: Tensor, mask: Tensor, agg: str = "token"
) -> tuple[Tensor, dict]:
    """Per-token surrogate terms (B, T) -> (scalar loss, stats) as `policy_loss` returns them; shared with
    the fused `fastrlhf.kernels.ppo_head`, which computes the per-token terms in one pass over the logits.
    clipped: 1.0 where the clipped term is strictly larger. Padding entries may hold anything. The loss is
    aggregated per token or per sequence (`aggregate`); the stats are always per-token means."""
    m = mask.bool()
    loss = aggregate(pg_loss, m, agg)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(clipped.to(ratio.dtype), m),
            "approx_kl": masked_mean(0.5 * log_ratio.where(m, 0) ** 2, m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": ratio.where(m, 0).max(),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float | None = 0.2
) -> tuple[Tensor, dict]:
    """values (B, T) float (with grad), old_values (B, T), returns (B, T), mask (B, T) -> (scalar loss,
    stats). Clipped value loss, v_clip = old_values + clamp(values - old_values, -c, c):
    loss = 0.5 * masked_mean(max((values - returns)^2, (v_clip - returns)^2)); clip_range None: the plain
    0.5 * masked_mean((values - returns)^2). stats: vf_clipfrac (fraction of tokens where the clipped term is
    strictly larger; 0 unclipped)."""
    m = mask.bool()
    values = values.where(m, 0)  # padding: garbage in returns / old_values there gives no NaN gradient
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(unclipped, m), {"vf_clipfrac": unclipped.new_zeros(())}
    v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), m)}
    return loss, stats


def entropy_bonus(entropy: Tensor, mask: Tensor) -> Tensor:
    """entropy (B, T) float per-token entropy, mask (B, T) -> scalar masked mean (the caller multiplies by
    its coefficient and subtracts it from the loss)."""
    return masked_mean(entropy, mask)


# ---------------------------------------------------------------------------- sampler vs trainer
@torch.no_grad()
def truncated_is_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """old_logprobs (B, T) the training forward's log-probs of the sampled tokens, behaviour_logprobs (B, T)
    the sampler's, mask (B, T) -> (B, T) float32 min(exp(old - behaviour), cap) at real tokens, 1 at padding.
    Truncated importance sampling: the replies were drawn from the sampler's distribution while the surrogate
    assumes the trainer's, so each token's policy-gradient term is weighted by the ratio of the two, capped
    at `cap` to bound the variance (Yao et al. 2025). The weights carry no gradient."""
    if cap <= 0:
        raise ValueError(f"the importance-sampling cap must be > 0, got {cap}")
    log_w = (old_logprobs.float() - behaviour_logprobs.float()).where(mask.bool(), 0)
    return log_w.exp().clamp(max=cap)


@torch.no_grad()
def behaviour_mismatch(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor) -> dict:
    """old_logprobs (B, T), behaviour_logprobs (B, T), mask (B, T) -> how far the sampler's log-probs of the
    sampled tokens are from the training forward's, over the real tokens: {"logprob_diff_mean": mean |old -
    behaviour|, "logprob_diff_max": max |old - behaviour|, "ratio_outside": share of tokens whose ratio
    exp(old - behaviour) lies outside [0.9, 1.1]} (all 0 when no token is real)."""
    m = mask.bool()
    d = (old_logprobs.float() - behaviour_logprobs.float()).where(m, 0)
    outside = (d.exp() - 1).abs() > 0.1
    return {
        "logprob_diff_mean": masked_mean(d.abs(), m),
        "logprob_diff_max": d.abs().max() if d.numel() else d.new_zeros(()),
        "ratio_outside": masked_mean(outside.float(), m),
    }


# ------------------------------------------------------------------------------------ diagnostics
@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """values (B, T), returns (B, T), mask (B, T) -> detached scalar 1 - Var[returns - values] / Var[returns]
    over the masked entries: 1 is a perfect critic, 0 no better than a constant, < 0 worse.
    NaN when Var[returns] == 0 (including no real tokens): the ratio is undefined there."""
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    return torch.where(var_returns > 0, 1 - var_residual / var_returns, torch.nan)


@torch.no_grad()
def kl_penalty_stats(kl: Tensor, mask: Tensor) -> dict:
    """kl (B, T) float per-token KL estimate, mask (B, T) -> {"kl_per_token": masked mean,
    "kl_per_sequence": mean over all rows of each row's masked sum (an empty row counts as 0)}."""
    m = mask.bool()
    return {"kl_per_token": masked_mean(kl, m), "kl_per_sequence": kl.where(m, 0).sum(1).mean()}


# ---------------------------------------------------------------------------------- KL controllers
@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient beta (Ziegler et al. 2019): moves beta so the measured KL per sequence
    tracks `target`, by at most 20% of n_steps / horizon per update."""

    value: float
    """Current beta."""
    target: float
    """Target KL per sequence (nats)."""
    horizon: int
    """Steps over which a constant error moves beta by its full proportional amount (e.g. 10000)."""

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: measured KL per sequence (nats); n_steps: samples since the last update (TRL passes
        the batch size)."""
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        self.value, self.target, self.horizon = float(d["value"]), float(d["target"]), int(d["horizon"])


@dataclass
class FixedKLController:
    """Constant KL coefficient beta; same interface as AdaptiveKLController."""

    value: float
    """Beta."""

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: beta is fixed."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
