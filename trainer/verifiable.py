"""Verifiable rewards for `fastrlhf ppo --reward rubric|both`: a checker instead of, or beside, the reward model.

A reward function takes the batch's prompts (each a list of chat messages), replies (decoded text, the stop
token stripped) and the prompt rows' metadata (`PromptRecord.meta`: for the demo set `answer`, `aliases`,
`category`), and returns one float per reply. The default is the demo rubric's correctness
(`trainer.rubric.is_correct`): 1.0 for a correct answer, 0.0 otherwise. `--reward-fn module:function` names
another, imported once at start-up.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence

import torch

from .data import Message, PromptRecord
from .errors import UserError
from .rubric import is_correct

RewardFn = Callable[[list[list[Message]], list[str], list[dict]], Sequence[float]]


def rubric_correct(prompts: list[list[Message]], replies: list[str], metadata: list[dict]) -> list[float]:
    """The demo rubric's verifiable check: 1.0 where the reply gives the row's `answer` (or an alias) before any
    rival answer, else 0.0. Needs `answer` in every row's metadata."""
    return [float(is_correct({"prompt": p, **m}, r)) for p, r, m in zip(prompts, replies, metadata)]


def load_reward_fn(spec: str | None) -> RewardFn:
    """ "module:function" (a module on the import path, or in the working directory: the `fastrlhf` command's
    import path does not hold it) -> that callable; None -> `rubric_correct`."""
    if spec is None:
        return rubric_correct
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise UserError(f"--reward-fn {spec!r}: expected module:function, e.g. my_rewards:exact_match")
    saved = list(sys.path)
    sys.path.append(os.getcwd())  # for the import only
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"--reward-fn {spec!r}: {exc}") from exc
    finally:
        sys.path[:] = saved
    if not callable(fn):
        raise UserError(f"--reward-fn {spec!r} is not callable")
    return fn


def verifiable_scores(fn: RewardFn, records: list[PromptRecord], replies: list[str], device) -> torch.Tensor:
    """One reward per reply, (b,) fp32 on `device`: `fn(prompts, replies, metadata)` for rows `records`
    (one per reply). A result of the wrong length or with a non-finite entry is refused."""
    out = list(fn([r.prompt for r in records], list(replies), [dict(r.meta) for r in records]))
    if len(out) != len(replies):
        raise UserError(f"the reward function returned {len(out)} rewards for {len(replies)} replies")
    out = [float(x) for x in out]
    if not all(math.isfinite(x) for x in out):
        raise UserError(f"the reward function returned a non-finite reward: {out[:8]}")
    return torch.tensor(out, dtype=torch.float32, device=device)
