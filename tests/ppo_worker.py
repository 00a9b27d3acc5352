"""PPO with replies that depend only on each prompt, for tests/test_distributed.py: run in-process, or
under torchrun as `python tests/ppo_worker.py CONFIG.json`.

Sampling draws from the global RNG in an order set by the batch a prompt lands in, so a 2-process run
cannot sample what a 1-process run samples. Everything after sampling is deterministic: with the same
replies, the two runs must agree to float rounding. `fixed_replies` stands in for `rollout.sample`.
"""

from __future__ import annotations

import json
import sys
import zlib

import torch

from fastrlhf.trainer import ppo as ppo_module
from fastrlhf.trainer.config import PPOConfig
from fastrlhf.trainer.rollout import Rollout, left_pad, mask_after_stop, stop_token_ids


def fixed_replies(
    model,
    tokenizer,
    prompts,
    *,
    max_new_tokens,
    temperature,
    samples_per_prompt=1,
    device="cpu",
    synced_gpus=False,
    compile=False,
):
    """`rollout.sample`'s signature and output; reply s of prompt p is a function of (p, s) alone."""
    stop, k = stop_token_ids(model), samples_per_prompt
    replies = []
    for p in prompts:
        for s in range(k):
            g = torch.Generator().manual_seed(zlib.crc32(repr((list(p), s)).encode()))
            tokens = torch.randint(3, model.config.vocab_size - 1, (max_new_tokens,), generator=g)
            n = int(torch.randint(1, max_new_tokens + 1, (1,), generator=g))
            if n < max_new_tokens:
                tokens[n] = stop[0]
            replies.append(tokens)
    response, response_mask, has_eos = mask_after_stop(torch.stack(replies), stop, tokenizer.pad_token_id)
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(k, 0),
        prompt_mask=prompt_mask.repeat_interleave(k, 0),
        response_ids=response,
        response_mask=response_mask,
        has_eos=has_eos,
        prompt_index=torch.arange(len(prompts)).repeat_interleave(k),
    ).to(device)


def run(cfg: PPOConfig) -> dict:
    real = ppo_module.sample
    ppo_module.sample = fixed_replies
    try:
        return ppo_module.train_ppo(cfg)
    finally:
        ppo_module.sample = real


if __name__ == "__main__":
    run(PPOConfig(**json.loads(open(sys.argv[1]).read())))
