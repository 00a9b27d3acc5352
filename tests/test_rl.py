"""trainer/rl.py against hand-worked examples: every expected number is worked out in the comments.

Padding positions hold garbage (9, 100, inf, NaN) on purpose: a result that reads them changes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from fastrlhf.trainer.rl import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    apply_eos_penalty,
    behaviour_mismatch,
    clip_scores,
    entropy_bonus,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty_stats,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    sequence_to_tokens,
    shaped_rewards,
    truncated_is_weights,
    value_loss,
)

NAN, INF = float("nan"), float("inf")


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# Two rows: 2 real tokens, then 1 real token. Real entries in X: 1, 3, 5.
MASK = t([[1, 1, 0], [1, 0, 0]], torch.bool)
X = t([[1.0, 3.0, 100.0], [5.0, NAN, INF]])


# ------------------------------------------------------------------------------------- masked stats
def test_masked_mean_all_and_per_dim():
    assert masked_mean(X, MASK).item() == pytest.approx(3.0)  # (1 + 3 + 5) / 3
    assert_close(masked_mean(X, MASK, dim=1), t([2.0, 5.0]))  # (1 + 3) / 2, 5 / 1
    assert_close(masked_mean(X, MASK, dim=0), t([3.0, 3.0, 0.0]))  # (1 + 5) / 2, 3 / 1, empty -> 0


def test_masked_mean_float_mask_equals_bool_mask():
    assert masked_mean(X, MASK.double()).item() == pytest.approx(3.0)


def test_masked_mean_empty_is_zero_not_nan():
    empty = torch.zeros(2, 3, dtype=torch.bool)
    x = X.clone().requires_grad_()
    out = masked_mean(x, empty)
    out.backward()
    assert out.item() == 0.0
    assert_close(x.grad, torch.zeros(2, 3, dtype=torch.float64))


def test_masked_var_unbiased_and_biased():
    # mean 3, squared deviations 4, 0, 4 -> sum 8
    assert masked_var(X, MASK).item() == pytest.approx(4.0)  # 8 / (3 - 1)
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(8 / 3)


def test_masked_var_second_example():
    # entries 1, 2, 4: mean 7/3, deviations -4/3, -1/3, 5/3, squares sum (16 + 1 + 25) / 9 = 14/3
    x = t([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    assert masked_var(x, MASK).item() == pytest.approx(7 / 3)  # (14/3) / 2
    assert masked_var(x, MASK, unbiased=False).item() == pytest.approx(14 / 9)  # (14/3) / 3


def test_masked_var_one_or_no_entries_is_zero():
    one = t([[1, 0, 0], [0, 0, 0]], torch.bool)
    assert masked_var(X, one).item() == 0.0  # no Bessel correction for n = 1, no NaN
    assert masked_var(X, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_masked_whiten():
    # entries 1, 3, 5: mean 3, unbiased var 4, std 2 -> -1, 0, 1
    assert_close(masked_whiten(X, MASK, eps=0.0), t([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    # shift_mean=False adds the mean 3 back: 2, 3, 4; padding still exactly 0
    out = masked_whiten(X, MASK, shift_mean=False, eps=0.0)
    assert_close(out, t([[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]]))
    assert out[0, 2].item() == 0.0 and out[1, 1:].eq(0).all()


def test_masked_whiten_eps():
    # var 4 + eps 5 = 9 -> std 3: (1 - 3) / 3, 0, (5 - 3) / 3
    assert_close(masked_whiten(X, MASK, eps=5.0), t([[-2 / 3, 0.0, 0.0], [2 / 3, 0.0, 0.0]]))


# ------------------------------------------------------------------------------------------ rewards
def test_shaped_rewards():
    score = t([2.0, 5.0, 7.0])
    kl = t([[0.5, 1.0, 2.0], [4.0, -1.0, 8.0], [1.0, 1.0, 1.0]])
    mask = t([[1, 1, 1], [1, 1, 0], [0, 0, 0]], torch.bool)
    out = shaped_rewards(score, kl, mask, kl_coef=0.25)
    assert out.dtype == torch.float32 and out.shape == (3, 3)
    expected = torch.tensor(
        [
            [-0.125, -0.25, -0.5 + 2.0],  # -0.25 * kl, score 2 at the last token (index 2)
            [-1.0, 0.25 + 5.0, 0.0],  # last real token at index 1; padding 0 (not -2)
            [0.0, 0.0, 0.0],  # no real tokens: nothing, not even the score
        ]
    )
    assert_close(out, expected)


def test_shaped_rewards_float_mask_and_garbage_padding():
    # row 0: -0.5 * 2 + score 3 at index 0; row 1 has no real tokens, so its NaN score is never read
    out = shaped_rewards(t([3.0, NAN]), t([[2.0, NAN], [INF, 1.0]]), t([[1.0, 0.0], [0.0, 0.0]]), kl_coef=0.5)
    assert_close(out, torch.tensor([[-1.0 + 3.0, 0.0], [0.0, 0.0]]))


def test_apply_eos_penalty():
    score = t([1.0, 2.0, -0.5])
    has_eos = torch.tensor([True, False, False])
    assert_close(apply_eos_penalty(score, has_eos, -1.0), t([1.0, 1.0, -1.5]))
    assert_close(apply_eos_penalty(score, has_eos, None), score)
    assert_close(apply_eos_penalty(score, has_eos, 0.0), score)
    with pytest.raises(ValueError, match="must be <= 0"):
        apply_eos_penalty(score, has_eos, 1.0)


def test_clip_scores():
    score = t([-5.0, -1.0, 0.5, 3.0])
    assert_close(clip_scores(score, 2.0), t([-2.0, -1.0, 0.5, 2.0]))
    assert_close(clip_scores(score, None), score)
    with pytest.raises(ValueError):
        clip_scores(score, -1.0)


# ---------------------------------------------------------------------------------------------- GAE
def test_gae_one_row():
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72); r = 1, 0, 2; V = 0.5, 1.0, 1.5; V after the end = 0
    # t=2: delta = 2 + 0.9*0 - 1.5 = 0.5                    A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35                 A1 = 0.35 + 0.72*0.5 = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4                  A0 = 1.4 + 0.72*0.71 = 1.9112
    adv, ret = gae(t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]]), torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert_close(adv, t([[1.9112, 0.71, 0.5]]))
    assert_close(ret, t([[1.9112 + 0.5, 0.71 + 1.0, 0.5 + 1.5]]))


def test_gae_ragged_rows_padding_is_terminal():
    # Row 0: the example above plus one padding token (r = 5, V = 4) that must not be bootstrapped from
    # (reading it would make delta at t=2 equal 2 + 0.9*4 - 1.5). Row 1: one real token, delta = 3 - 1 = 2.
    rewards = t([[1.0, 0.0, 2.0, 5.0], [3.0, 9.0, NAN, 9.0]])
    values = t([[0.5, 1.0, 1.5, 4.0], [1.0, 7.0, 7.0, INF]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]], torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(adv, t([[1.9112, 0.71, 0.5, 0.0], [2.0, 0.0, 0.0, 0.0]]))
    assert_close(ret, t([[2.4112, 1.71, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))


def test_gae_gamma_lam_one_is_monte_carlo():
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t; returns = reward-to-go
    adv, ret = gae(t([[1.0, 2.0, 3.0]]), t([[1.0, 1.0, 1.0]]), torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert_close(adv, t([[6.0 - 1, 5.0 - 1, 3.0 - 1]]))
    assert_close(ret, t([[6.0, 5.0, 3.0]]))


def test_gae_lam_zero_is_one_step_td():
    # lam = 0: A_t = delta_t = r_t + gamma*V_{t+1} - V_t; gamma 0.5: 1 + 0.5*4 - 2 = 1, 0 + 0.5*0 - 4 = -4
    adv, _ = gae(t([[1.0, 0.0]]), t([[2.0, 4.0]]), torch.ones(1, 2), gamma=0.5, lam=0.0)
    assert_close(adv, t([[1.0, -4.0]]))


def test_gae_empty_row_and_detached():
    values = t([[1.0, 2.0]]).requires_grad_()
    adv, ret = gae(t([[1.0, 2.0]]), values, torch.zeros(1, 2), gamma=0.9, lam=0.8)
    assert_close(adv, torch.zeros(1, 2, dtype=torch.float64))
    assert_close(ret, torch.zeros(1, 2, dtype=torch.float64))
    assert not adv.requires_grad and not ret.requires_grad


# ------------------------------------------------------------------------------------- policy loss
# Tokens (c = 0.2, so ratios are clamped to [0.8, 1.2]); loss term = max(-A*r, -A*clamp(r)):
#   r=1.1, A= 2: max(-2.2, -2.2) = -2.2   not clipped   d/dlogp = -A*r = -2.2
#   r=1.5, A= 1: max(-1.5, -1.2) = -1.2   clipped       d/dlogp = 0
#   r=0.5, A=-1: max( 0.5,  0.8) =  0.8   clipped       d/dlogp = 0
#   r=0.5, A= 1: max(-0.5, -0.8) = -0.5   not clipped   d/dlogp = -0.5
#   r=1.5, A=-1: max( 1.5,  1.2) =  1.5   not clipped   d/dlogp = 1.5
#   padding: r=3 (and garbage), ignored
# loss = (-2.2 - 1.2 + 0.8 - 0.5 + 1.5) / 5 = -1.6 / 5 = -0.32; clipfrac 2/5; gradients divided by 5.
RATIOS = [[1.1, 1.5, 0.5], [0.5, 1.5, 3.0]]
ADV = t([[2.0, 1.0, -1.0], [1.0, -1.0, 5.0]])
MASK23 = t([[1, 1, 1], [1, 1, 0]], torch.bool)


def _policy_inputs():
    old = t([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.0]])
    logprobs = (old + t(RATIOS).log()).requires_grad_()
    return logprobs, old


def test_policy_loss_hand_worked():
    logprobs, old = _policy_inputs()
    loss, stats = policy_loss(logprobs, old, ADV, MASK23, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.32)
    assert float(stats["clipfrac"]) == pytest.approx(0.4)
    assert float(stats["ratio_mean"]) == pytest.approx((1.1 + 1.5 + 0.5 + 0.5 + 1.5) / 5)  # 1.02
    assert float(stats["ratio_max"]) == pytest.approx(1.5)  # not the padding's 3.0
    kl = 0.5 * (math.log(1.1) ** 2 + 2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 5
    assert float(stats["approx_kl"]) == pytest.approx(kl)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_policy_loss_gradient():
    logprobs, old = _policy_inputs()
    loss, _ = policy_loss(logprobs, old, ADV, MASK23, clip_range=0.2)
    loss.backward()
    assert_close(logprobs.grad, t([[-2.2, 0.0, 0.0], [-0.5, 1.5, 0.0]]) / 5)


def test_policy_loss_wider_clip_range_unclips():
    # c = 0.6 -> [0.4, 1.6]: no ratio above is clipped, loss = mean(-A*r) = (-2.2-1.5+0.5-0.5+1.5)/5
    logprobs, old = _policy_inputs()
    loss, stats = policy_loss(logprobs, old, ADV, MASK23, clip_range=0.6)
    assert loss.item() == pytest.approx(-2.2 / 5)
    assert float(stats["clipfrac"]) == 0.0


def test_policy_loss_step_zero():
    # logprobs == old_logprobs: ratio 1, loss = -mean(A) = -(2 + 1 - 1 + 1 - 1) / 5, nothing clipped
    old = t([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.0]])
    loss, stats = policy_loss(old.clone(), old, ADV, MASK23)
    assert loss.item() == pytest.approx(-0.4)
    assert float(stats["clipfrac"]) == 0.0 and float(stats["approx_kl"]) == 0.0
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["ratio_max"]) == 1.0


def test_policy_loss_tie_is_not_clipped():
    # A = 0 with r = 3 (far outside [0.8, 1.2]): both terms are 0, so clipping is not "active" (not
    # strictly larger); the other token (r = 3, A = 1: max(-3, -1.2) = -1.2) is. clipfrac = 1/2.
    old = t([[0.0, 0.0]])
    _, stats = policy_loss(old + math.log(3.0), old, t([[0.0, 1.0]]), t([[1, 1]], torch.bool))
    assert float(stats["clipfrac"]) == pytest.approx(0.5)


def test_policy_loss_garbage_padding_and_empty_batch_are_nan_free():
    logprobs = t([[-1.0, 50.0], [NAN, -INF]]).requires_grad_()
    old = t([[-1.0, -INF], [0.0, NAN]])
    adv = t([[2.0, NAN], [INF, 1.0]])
    mask = t([[1, 0], [0, 0]], torch.bool)  # row 1 has no real tokens
    loss, stats = policy_loss(logprobs, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)  # ratio 1, A = 2
    assert_close(logprobs.grad, t([[-2.0, 0.0], [0.0, 0.0]]))
    assert all(math.isfinite(float(v)) for v in stats.values())

    logprobs = logprobs.detach().requires_grad_()
    loss, stats = policy_loss(logprobs, old, adv, torch.zeros(2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and logprobs.grad.eq(0).all()
    assert {k: float(v) for k, v in stats.items()} == {
        "clipfrac": 0.0,
        "approx_kl": 0.0,
        "ratio_mean": 0.0,
        "ratio_max": 0.0,
    }


# -------------------------------------------------------------------------------------- value loss
# c = 0.2; v_clip = old + clamp(v - old, -0.2, 0.2); term = max((v - R)^2, (v_clip - R)^2):
#   old 1.0, v  1.1, R 2.0: v_clip  1.1; max(0.81, 0.81) = 0.81  not clipped  d/dv = 2*(1.1-2) = -1.8
#   old 1.0, v  1.5, R 2.0: v_clip  1.2; max(0.25, 0.64) = 0.64  clipped      d/dv = 0
#   old 1.0, v  1.5, R 1.0: v_clip  1.2; max(0.25, 0.04) = 0.25  not clipped  d/dv = 2*(1.5-1) = 1.0
#   old 0.0, v -1.0, R 0.5: v_clip -0.2; max(2.25, 0.49) = 2.25  not clipped  d/dv = 2*(-1-0.5) = -3.0
# loss = 0.5 * (0.81 + 0.64 + 0.25 + 2.25) / 4 = 0.49375; vf_clipfrac 1/4; gradients times 0.5 / 4.
def test_value_loss_hand_worked_and_gradient():
    values = t([[1.1, 1.5, 1.5], [-1.0, NAN, 3.0]]).requires_grad_()
    old = t([[1.0, 1.0, 1.0], [0.0, 9.0, INF]])
    returns = t([[2.0, 2.0, 1.0], [0.5, NAN, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]], torch.bool)
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.49375)
    assert float(stats["vf_clipfrac"]) == pytest.approx(0.25)
    assert not stats["vf_clipfrac"].requires_grad
    loss.backward()
    assert_close(values.grad, t([[-1.8, 0.0, 1.0], [-3.0, 0.0, 0.0]]) * 0.5 / 4)


def test_value_loss_unclipped():
    # the hand-worked rows above without the clip: 0.5 * (0.81 + 0.25 + 0.25 + 2.25) / 4 = 0.445, and the
    # clipped row (v 1.5, R 2.0) gets its gradient 2 * (1.5 - 2) = -1.0 back
    values = t([[1.1, 1.5, 1.5], [-1.0, NAN, 3.0]]).requires_grad_()
    old = t([[1.0, 1.0, 1.0], [0.0, 9.0, INF]])
    returns = t([[2.0, 2.0, 1.0], [0.5, NAN, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]], torch.bool)
    loss, stats = value_loss(values, old, returns, mask, clip_range=None)
    assert loss.item() == pytest.approx(0.445) and float(stats["vf_clipfrac"]) == 0.0
    loss.backward()
    assert_close(values.grad, t([[-1.8, -1.0, 1.0], [-3.0, 0.0, 0.0]]) * 0.5 / 4)


def test_value_loss_empty_batch():
    values = t([[1.0, 2.0]]).requires_grad_()
    loss, stats = value_loss(values, t([[0.0, 0.0]]), t([[5.0, 5.0]]), torch.zeros(1, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and float(stats["vf_clipfrac"]) == 0.0 and values.grad.eq(0).all()


# ------------------------------------------------------------------------------------ diagnostics
def test_entropy_bonus():
    assert entropy_bonus(t([[1.0, 2.0, 9.0], [3.0, 9.0, NAN]]), MASK).item() == pytest.approx(2.0)  # 6 / 3


def test_explained_variance():
    returns = t([[1.0, 3.0, 100.0], [5.0, NAN, 9.0]])  # real entries 1, 3, 5: Var (biased) 8/3
    # residuals R - V = 0, 1, -1: mean 0, Var 2/3 -> EV = 1 - (2/3) / (8/3) = 0.75
    assert explained_variance(t([[1.0, 2.0, 0.0], [6.0, 0.0, 0.0]]), returns, MASK).item() == pytest.approx(0.75)
    assert explained_variance(returns, returns, MASK).item() == pytest.approx(1.0)  # perfect critic
    assert explained_variance(returns - 7.0, returns, MASK).item() == pytest.approx(1.0)  # constant offset
    assert explained_variance(torch.zeros(2, 3, dtype=torch.float64), returns, MASK).item() == pytest.approx(0.0)
    # V = 1, 3, 7: residuals 0, 0, -2, mean -2/3, Var (4/9 + 4/9 + 16/9) / 3 = 8/9 -> 1 - 1/3
    assert explained_variance(t([[1.0, 3.0, 0.0], [7.0, 0.0, 0.0]]), returns, MASK).item() == pytest.approx(2 / 3)


def test_explained_variance_undefined_is_nan():
    const = t([[2.0, 2.0, 9.0], [2.0, 0.0, 0.0]])  # Var[returns] = 0 over the real entries
    assert math.isnan(explained_variance(t([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]), const, MASK).item())
    assert math.isnan(explained_variance(const, const, torch.zeros(2, 3, dtype=torch.bool)).item())


def test_kl_penalty_stats():
    stats = kl_penalty_stats(t([[1.0, 2.0, 9.0], [4.0, NAN, 9.0]]), MASK)
    assert float(stats["kl_per_token"]) == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    assert float(stats["kl_per_sequence"]) == pytest.approx(3.5)  # rows sum to 3 and 4


def test_kl_penalty_stats_empty_row_counts_as_zero():
    mask = t([[1, 1, 0], [0, 0, 0]], torch.bool)
    stats = kl_penalty_stats(t([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]]), mask)
    assert float(stats["kl_per_token"]) == pytest.approx(1.5)  # (1 + 2) / 2
    assert float(stats["kl_per_sequence"]) == pytest.approx(1.5)  # (3 + 0) / 2 rows


# ---------------------------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=1000)  # error 9/6 - 1 = 0.5, clipped to 0.2: x (1 + 0.2 * 0.1)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(current_kl=5.4, n_steps=500)  # error 0.9 - 1 = -0.1: x (1 - 0.1 * 0.05) = x 0.995
    assert ctl.value == pytest.approx(0.10149)
    ctl.update(current_kl=6.0, n_steps=500)  # on target: unchanged
    assert ctl.value == pytest.approx(0.10149)
    ctl.update(current_kl=0.0, n_steps=10000)  # error -1 clipped to -0.2: x 0.8
    assert ctl.value == pytest.approx(0.10149 * 0.8)


def test_adaptive_kl_controller_state_roundtrip():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=1000)
    state = json.loads(json.dumps(ctl.state_dict()))
    assert state == {"value": pytest.approx(0.102), "target": 6.0, "horizon": 10000}
    fresh = AdaptiveKLController(value=1.0, target=1.0, horizon=1)
    fresh.load_state_dict(state)
    assert fresh == ctl
    fresh.update(current_kl=9.0, n_steps=1000)
    assert fresh.value == pytest.approx(0.102 * 1.02)


def test_fixed_kl_controller():
    ctl = FixedKLController(value=0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    assert ctl.state_dict() == {"value": 0.05}
    fresh = FixedKLController(value=1.0)
    fresh.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert fresh.value == 0.05


# ------------------------------------------------------------------------------- group advantages
def test_grpo_normalises_within_each_adjacent_group():
    # group 1 (rows 0-2): 1, 2, 3: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> -1, 0, 1 over (1 + eps)
    # group 2 (rows 3-5): all 5: every deviation 0 -> 0, not 0 / 0
    a = grpo_advantages(t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3)
    assert_close(a, t([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / t([1 + 1e-4, 1, 1 + 1e-4, 1, 1, 1]))
    # adjacency is the contract: 1, 5, 2 | 5, 3, 5 (not 1, 2, 3 | 5, 5, 5 interleaved, which gives -1, 0, 1 | 0s)
    # group 1: mean 8/3, deviations -5/3, 7/3, -2/3, unbiased var (25 + 49 + 4) / 9 / 2 = 13/3
    # group 2: mean 13/3, deviations 2/3, -4/3, 2/3, unbiased var (4 + 16 + 4) / 9 / 2 = 4/3
    s1, s2 = math.sqrt(13 / 3), math.sqrt(4 / 3)
    expected = t([-5 / 3 / s1, 7 / 3 / s1, -2 / 3 / s1, 2 / 3 / s2, -4 / 3 / s2, 2 / 3 / s2])
    assert_close(grpo_advantages(t([1.0, 5.0, 2.0, 5.0, 3.0, 5.0]), 3, eps=0.0), expected)


def test_grpo_ties_and_no_std_scaling():
    # 0, 0, 1, 1: mean 1/2, deviations -+1/2; unbiased var = 4 * (1/4) / 3 = 1/3 -> A = -+(1/2) * sqrt(3)
    r = t([0.0, 0.0, 1.0, 1.0])
    h = 0.5 * math.sqrt(3)
    assert_close(grpo_advantages(r, 4, eps=0.0), t([-h, -h, h, h]))  # tied scores, equal advantages
    assert_close(grpo_advantages(r, 4, scale_by_std=False), t([-0.5, -0.5, 0.5, 0.5]))  # mean-centred only


def test_grpo_groups_of_two():
    # 3, 1: mean 2, unbiased std sqrt(1 + 1) = sqrt 2 -> +-1 / (sqrt 2 + eps); -10, 10: +-10 / (10 sqrt 2 + eps),
    # +-1 / sqrt 2 whatever the gap once eps is negligible; 4, 4: 0 / (0 + eps) = 0 (with eps = 0 it is 0 / 0)
    a = grpo_advantages(t([3.0, 1.0, 4.0, 4.0, -10.0, 10.0]), 2)
    s, s10 = 1 / (math.sqrt(2) + 1e-4), 10 / (10 * math.sqrt(2) + 1e-4)
    assert_close(a, t([s, -s, 0.0, 0.0, -s10, s10]))


def test_rloo_leave_one_out_baseline():
    # 1, 2, 3: baselines (2 + 3) / 2, (1 + 3) / 2, (1 + 2) / 2 = 2.5, 2, 1.5 -> -1.5, 0, 1.5
    # ties 0, 0, 1 | all-equal 7, 7, 7: baselines 1/2, 1/2, 0 -> -1/2, -1/2, 1 | 0, 0, 0
    a = rloo_advantages(t([1.0, 2.0, 3.0, 0.0, 0.0, 1.0, 7.0, 7.0, 7.0]), 3)
    assert_close(a, t([-1.5, 0.0, 1.5, -0.5, -0.5, 1.0, 0.0, 0.0, 0.0]))
    # groups of 2: each row's baseline is the other row -> r1 - r2, r2 - r1
    assert_close(rloo_advantages(t([3.0, 1.0, 4.0, 4.0]), 2), t([2.0, -2.0, 0.0, 0.0]))


def test_group_advantages_are_detached_and_keep_dtype():
    r = t([1.0, 2.0]).requires_grad_()
    for a in (grpo_advantages(r, 2), rloo_advantages(r, 2)):
        assert not a.requires_grad and a.dtype == torch.float64


def test_group_advantages_refuse_bad_groups():
    for fn in (grpo_advantages, rloo_advantages):
        with pytest.raises(ValueError, match="at least 2"):
            fn(t([1.0, 2.0]), 1)  # one sample: no group statistic (GRPO's std is NaN, RLOO divides by 0)
        with pytest.raises(ValueError, match="multiple"):
            fn(t([1.0, 2.0, 3.0]), 2)


def test_sequence_to_tokens_masks_padding_and_empty_rows():
    mask = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]], torch.bool)  # 2 real tokens, 1, none
    out = sequence_to_tokens(t([2.0, -1.0, 0.5]), mask)
    assert out.dtype == torch.float32
    assert_close(out, t([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], torch.float32))


def test_aggregate_per_token_and_per_sequence():
    # real entries: row 0 -> 1, 3; row 1 -> 5. token: (1 + 3 + 5) / 3 = 3; sequence: (2 + 5) / 2 = 3.5
    assert aggregate(X, MASK, "token").item() == pytest.approx(3.0)
    assert aggregate(X, MASK, "sequence").item() == pytest.approx(3.5)
    # an all-padding third row: a row of 0 in "sequence" (7 / 3), nothing in "token"
    x3, m3 = torch.cat([X, t([[NAN, 1.0, 1.0]])]), torch.cat([MASK, t([[0, 0, 0]], torch.bool)])
    assert aggregate(x3, m3, "token").item() == pytest.approx(3.0)
    assert aggregate(x3, m3, "sequence").item() == pytest.approx(7 / 3)
    with pytest.raises(ValueError, match="token"):
        aggregate(X, MASK, "batch")


def test_policy_loss_sequence_aggregation_and_finite_gradient():
    # ratio 1 everywhere: the per-token term is -A; A = 1, 3 | 5 -> token -3, sequence -3.5
    logp = X.where(MASK, 0).clone().requires_grad_()
    adv = t([[1.0, 3.0, NAN], [5.0, INF, 9.0]])
    loss_tok, _ = policy_loss(logp, X.where(MASK, 0), adv, MASK, agg="token")
    loss_seq, stats = policy_loss(logp, X.where(MASK, 0), adv, MASK, agg="sequence")
    assert loss_tok.item() == pytest.approx(-3.0) and loss_seq.item() == pytest.approx(-3.5)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    loss_seq.backward()
    # d/dlogp of -A r / |o_i| / n_rows: row 0 -> -1/4, -3/4; row 1 -> -5/2; padding 0
    assert_close(logp.grad, t([[-0.25, -0.75, 0.0], [-2.5, 0.0, 0.0]]))


# ------------------------------------------------------------------------------- sampler vs trainer
OLD_LP = t([[0.0, -1.0, -2.0], [-0.5, -3.0, 7.0]])
BEH_LP = t([[0.0, -2.0, -1.0], [-0.4, NAN, INF]])  # row 1: one real token, garbage padding
LP_MASK = t([[1, 1, 0], [1, 0, 0]], torch.bool)


def test_truncated_is_weights_hand_worked():
    """w = min(exp(old - behaviour), cap) at real tokens, 1 at padding (whatever it holds), no gradient."""
    w = truncated_is_weights(OLD_LP.requires_grad_(), BEH_LP, LP_MASK, cap=2.0)
    assert_close(w, t([[1.0, 2.0, 1.0], [math.exp(-0.1), 1.0, 1.0]], torch.float32))  # e^1 capped at 2
    assert not w.requires_grad
    assert_close(truncated_is_weights(OLD_LP, BEH_LP, LP_MASK, cap=3.0)[0, 1], torch.tensor(math.e))
    with pytest.raises(ValueError, match="> 0"):
        truncated_is_weights(OLD_LP, BEH_LP, LP_MASK, cap=0.0)


def test_behaviour_mismatch_hand_worked():
    """|old - behaviour| over the 3 real tokens: 0, 1, 0.1; the ratios 1, e, e^-0.1 = 0.905 -> one outside."""
    stats = behaviour_mismatch(OLD_LP, BEH_LP, LP_MASK)
    assert_close(stats["logprob_diff_mean"], torch.tensor(1.1 / 3))
    assert_close(stats["logprob_diff_max"], torch.tensor(1.0))
    assert_close(stats["ratio_outside"], torch.tensor(1 / 3))
    empty = behaviour_mismatch(OLD_LP, BEH_LP, torch.zeros_like(LP_MASK))
    assert all(float(v) == 0.0 for v in empty.values())
