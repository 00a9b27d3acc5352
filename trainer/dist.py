"""Data parallelism for the training loops on PyTorch's own engines: DDP or FSDP2 (`fully_shard`).

Launch a training command with `torchrun --nproc-per-node N` (or `accelerate launch`, which sets the same
environment variables) and it runs on N processes, one device each (CUDA: NCCL; CPU: gloo):

- The global batch is the one a single process would use. Each micro-batch is dealt out across ranks
  (rank r takes pairs r, r + N, ...) and every rank scales its loss by N / (pairs in the step), so the
  gradient the engine averages is the single-process gradient: the curves match a 1-process run to float
  rounding (tests/test_distributed.py).
- The engine does every collective: DDP all-reduces gradients; FSDP2 shards parameters, gradients and
  optimizer state per transformer layer (plus one root group) and all-gathers a layer for its forward.
  Nothing here sums tensors itself except the step's logging statistics (one all_reduce).
- Rank 0 alone writes files and shows progress bars. Checkpoints hold the full (unsharded) trainable
  parameters and optimizer state keyed by parameter name (torch.distributed.checkpoint.state_dict), so a
  run saved on 2 processes resumes on 1, or on 4.

A single process (no WORLD_SIZE, or WORLD_SIZE=1) takes none of these paths: `wrap` returns the module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .models import resolve_device

ENGINES = ("ddp", "fsdp2")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """The one process that writes files and logs."""
        return self.rank == 0


def init_world(device: str) -> World:
    """Join the job torchrun started (WORLD_SIZE > 1), else a world of one on `device`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if size == 1:
        return World(0, 1, dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), dev)


def require_single_process(command: str) -> None:
    """Stop a command that does not run data-parallel yet when torchrun started several copies of it
    (each would write the same files)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1:
        raise SystemExit(f"`fastrlhf {command}` runs in one process (WORLD_SIZE is {size}); under torchrun only "
                         f"`fastrlhf train-rm` is data-parallel so far. Launch it with plain `fastrlhf {command}`.")  # fmt: skip


def wrap(module: torch.nn.Module, world: World, engine: str, layers=()) -> torch.nn.Module:
    """`module` under DDP, or sharded by FSDP2 (each of `layers` its own group, the rest in the root's);
    `module` itself in a world of one."""
    if engine not in ENGINES:
        raise ValueError(f"parallel engine must be one of {ENGINES}, got {engine!r}")
    if world.size == 1:
        return module
    if engine == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    return module


def sum_across(t: torch.Tensor, world: World) -> torch.Tensor:
    """In place: the sum of `t` over all ranks (for logging statistics)."""
    if world.size > 1:
        dist.all_reduce(t)
    return t


def full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Trainable parameters and optimizer state, unsharded, on the CPU, keyed by parameter name (the
    same keys with or without DDP / FSDP2). A collective under FSDP2: every rank calls it; with more than
    one process only rank 0 gets the tensors."""
    return get_state_dict(module, optimizer, options=FULL)


def load_full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, params: dict, optim: dict) -> None:
    """Inverse of `full_state` at any world size (every rank passes the full dicts; FSDP2 keeps its shard)."""
    set_state_dict(module, optimizer, model_state_dict=params, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True, strict=False))  # fmt: skip


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (under FSDP2 it is a replicated DTensor)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
