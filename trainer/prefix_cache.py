"""Compute a frozen bottom of the trunk once per training sequence, then train the top from stored states.

With the embeddings and the bottom k layers frozen (the reward model's default on small machines), their
output for a given sequence never changes between epochs, yet an ordinary loop recomputes it every step:
on a 2-core CPU with k = 26 of 30 that is ~85% of a training step. Here it runs once (no grad); training
steps hand the stored states to layer k in a call of the trunk itself (`family.replay_bottom`: the bottom
layers stand aside), so masks, positions, rotary tables and per-layer schedules are built exactly as
usual (right padding: positions start at 0 either way). The result is checked against the full trunk
on the first batch and the cache is dropped, with a warning, if they disagree.

Memory: tokens x H x 4 bytes (SmolLM2: 2.3 KB a token; 400 pairs of 70 tokens ~ 130 MB).
"""

from __future__ import annotations

import logging

import torch

from .data import tokenize_pairs
from .family import StopForward, states_hook

log = logging.getLogger("fastrlhf")


@torch.no_grad()
def prefix_states(
    trunk,
    n_frozen: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states entering layer `n_frozen` (the output of the frozen prefix): (S, T, H). Pass
    `position_ids` (S, T) for left-padded rows (PPO rollouts); right-padded rows need none."""
    seen: dict = {}
    handle = states_hook(trunk, n_frozen, seen, stop=True)
    try:
        trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen["states"]


def build_prefix_cache(trunk, tokenizer, pairs, *, n_frozen: int, max_length: int, batch_pairs: int, device) -> list:
    """For each pair: (chosen (Tc, H), rejected (Tr, H)) prefix states on the CPU, unpadded; None for a
    pair too long for max_length (tokenize_pairs drops and logs it)."""
    cache: list = [None] * len(pairs)
    for start in range(0, len(pairs), batch_pairs):
        batch = tokenize_pairs(tokenizer, pairs[start : start + batch_pairs], max_length)
        kept = batch["kept"].tolist()
        if not kept:
            continue
        mask = batch["attention_mask"]
        states = prefix_states(trunk, n_frozen, batch["input_ids"].to(device), mask.to(device)).cpu()
        lengths = mask.sum(-1).tolist()
        B = len(kept)
        for j, i in enumerate(kept):
            cache[start + i] = (states[j, : lengths[j]].clone(), states[B + j, : lengths[B + j]].clone())
    return cache


def cached_batch(cache: list, idx: list[int], device) -> dict[str, torch.Tensor]:
    """Stored states of pairs `idx` as a right-padded batch: inputs_embeds (2B, T, H), attention_mask
    (2B, T), kept (B,) positions in `idx` of the pairs that have states."""
    kept = [k for k, i in enumerate(idx) if cache[i] is not None]
    if not kept:
        return {"kept": torch.zeros(0, dtype=torch.long)}
    rows = [cache[idx[k]][0] for k in kept] + [cache[idx[k]][1] for k in kept]
    T = max(r.shape[0] for r in rows)
    H = rows[0].shape[1]
    embeds = torch.zeros(len(rows), T, H, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for r, row in enumerate(rows):
        embeds[r, : row.shape[0]] = row
        mask[r, : row.shape[0]] = 1
    return {"inputs_embeds": embeds.to(device), "attention_mask": mask.to(device), "kept": torch.tensor(kept)}


def cache_bytes(cache: list) -> int:
    return sum(c.numel() * c.element_size() for pair in cache if pair is not None for c in pair)
