"""Kernel-on vs kernel-off: a small model trained with every kernel gives the same loss curve as the
same model trained with the `*_ref` twins (docs/precision.md: fused kernels elsewhere have
silently changed the objective)."""

from __future__ import annotations

import torch

from fastrlhf import kernels as K

V, H, T, B = 97, 24, 6, 4


def train(use_kernels: bool, steps: int = 8) -> list[float]:
    torch.manual_seed(0)
    embed = torch.nn.Embedding(V, H)
    lm_head = torch.nn.Linear(H, V)
    score = torch.nn.Linear(H, 1)
    ref_head = torch.nn.Linear(H, V).requires_grad_(False)
    params = [*embed.parameters(), *lm_head.parameters(), *score.parameters()]
    opt = torch.optim.Adam(params, lr=3e-2)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (2 * B, T + 1), generator=g)
    advantages = torch.randn(2 * B, T, generator=g)
    mask = torch.ones(2 * B, T, dtype=torch.long)
    mask[::3, -2:] = 0  # some right padding
    targets = torch.where(mask.bool(), tokens[:, 1:], -100)

    logprobs = K.token_logprobs if use_kernels else K.token_logprobs_ref
    kl_est = K.kl_estimate if use_kernels else K.kl_estimate_ref
    kl_full = K.full_kl if use_kernels else K.full_kl_ref
    head = K.reward_head_pairwise_loss if use_kernels else K.reward_head_pairwise_loss_ref

    losses = []
    for _ in range(steps):
        hidden = torch.tanh(embed(tokens[:, :-1]))  # (2B, T, H)
        logits = lm_head(hidden)  # (2B, T, V)
        ref_logits = ref_head(hidden.detach())
        lp, ent = logprobs(logits, targets, temperature=0.7, return_entropy=True)
        ref_lp = logprobs(ref_logits, targets, temperature=0.7)
        m = mask.float()
        pg = -(lp * advantages * m).sum() / m.sum()
        kl = (kl_est(lp, ref_lp, estimator="k3") * m).sum() / m.sum()
        fkl = (kl_full(logits, ref_logits, temperature=0.7, mask=mask) * m).sum() / m.sum()
        rm = head(hidden, score.weight, score.bias, attention_mask=mask, margin=0.1).loss
        loss = pg + 0.1 * kl + 0.05 * fkl - 0.01 * (ent * m).sum() / m.sum() + rm
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_kernel_on_off_loss_curves_match():
    on, off = train(True), train(False)
    assert abs(on[0] - on[-1]) > 1e-2, "the run must actually train for the comparison to mean anything"
    for step, (a, b) in enumerate(zip(on, off)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {step}: kernels {a} vs reference {b}"
