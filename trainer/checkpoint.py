"""Run folders shared by `train-rm` and `ppo`: an atomically written `checkpoint.pt`, a `metrics.jsonl` log
of one JSON record per line (each with its "step"), and the RNG state that lets `--resume` continue exactly.

On `--resume` the checkpoint is loaded and the log cut back to its step (the later lines are written again);
a fresh run starts a fresh log. Checkpoint contents are each trainer's own (trainable state keyed by
parameter name, from `dist.full_state`, so any world size can resume them).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .dist import World
from .errors import MissingFileError

log = logging.getLogger("fastrlhf")


def atomic_save(obj, path: Path) -> None:
    """torch.save into `path`.tmp, then rename: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def append_record(path: Path, record: dict) -> None:
    """One JSON line appended to the log."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the log's records written after step `last_step` (they will be written again)."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
        path.write_text("".join(ln + "\n" for ln in keep))


def open_run(ckpt_path: Path, log_path: Path, resume: bool, world: World) -> dict | None:
    """Start of a run: with `resume`, the checkpoint (on the CPU; the log cut back to its step), else None
    and no log (a fresh run's log starts empty). Rank 0 alone touches the log."""
    if not resume:
        if log_path.exists() and world.main:
            log_path.unlink()
        return None
    if not ckpt_path.exists():
        raise MissingFileError(f"--resume: no checkpoint at {ckpt_path}")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if world.main:
        truncate_log(log_path, ckpt["step"])
    return ckpt


def rng_state() -> tuple:
    """(CPU generator state, every CUDA device's state or None): what sampling and dropout draw from."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_rng_state(cpu: torch.Tensor, cuda: list | None) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def restore_params(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (parameter name -> tensor, as `dist.full_state` gives) into `module`'s parameters."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
