"""Data parallelism for the training loops on PyTorch's own engines: DDP or FSDP2 (`fully_shard`).

Launch `fastrlhf train-rm` or `fastrlhf ppo` with `torchrun --nproc-per-node N` and it runs on N processes,
one device each (CUDA: NCCL; CPU: gloo); both take DDP or FSDP2 (`--parallel`).

- The global batch is the one a single process would use. `deal` gives each rank every N-th item of it;
  `train-rm` scales each rank's loss by N / (pairs in the step), so the gradient the engine averages is the
  single-process gradient; `ppo` gathers its per-row results with `gather_rows`, so rewards, advantages
  and the logs are the whole batch's, and trains each minibatch's rows on the rank that holds them
  (`held_rows`, `micro_batches`). Both match a 1-process run to float rounding
  (tests/test_distributed.py).
- The engine does every gradient collective: DDP all-reduces gradients; FSDP2 shards parameters,
  gradients and optimizer state per transformer layer (plus one root group) and all-gathers a layer for its
  forward, in bf16 by default on CUDA (`fsdp_param_dtype`; the shards stay fp32). PPO shards its frozen
  models the same way (`shard_frozen`: the reward model's trunk and an unquantized reference), their shards
  stored in the gathers' dtype. The helpers here only move statistics and per-row results (all_reduce,
  all_gather_object) and wait at barriers (the pipeline's rank-0 steps).
- Rank 0 alone writes files and shows progress bars. Checkpoints hold full (unsharded) trainable state
  keyed by parameter name, so a run saved on 2 processes resumes on 1, or on 4.

A single process (no WORLD_SIZE, or WORLD_SIZE=1) takes none of these paths: `wrap` returns the module and
the gathers return their input.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .models import resolve_device

ENGINES = ("ddp", "fsdp2")
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
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


def barrier(world: World) -> None:
    """Wait until every rank gets here (a world of one: return)."""
    if world.size > 1:
        dist.barrier(device_ids=[world.device.index] if world.device.type == "cuda" else None)


def fsdp_param_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The dtype FSDP2 gathers and computes a layer's parameters in for a config's `fsdp_param_dtype`: "auto"
    is bf16 on CUDA (where autocast computes in bf16 anyway) and fp32 elsewhere."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if choice not in PARAM_DTYPES:
        raise ValueError(f"fsdp_param_dtype must be 'auto' or one of {sorted(PARAM_DTYPES)}, got {choice!r}")
    return PARAM_DTYPES[choice]


def wrap(module: torch.nn.Module, world: World, engine: str, layers=(), param_dtype=torch.float32) -> torch.nn.Module:
    """`module` under DDP, or sharded by FSDP2 (each of `layers` its own group, the rest in the root's);
    `module` itself in a world of one. FSDP2 all-gathers the parameters in `param_dtype` and computes in it
    (MixedPrecisionPolicy: bf16 halves the gathers' bytes and the gathered layers' memory); gradients are
    reduce-scattered in fp32 into the fp32 shards, which the optimizer updates."""
    if engine not in ENGINES:
        raise ValueError(f"parallel engine must be one of {ENGINES}, got {engine!r}")
    if world.size == 1:
        return module
    if engine == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()  # fp32: FSDP2's default, which casts nothing
    if param_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def shard_frozen(module: torch.nn.Module, world: World, layers, param_dtype: torch.dtype) -> torch.nn.Module:
    """A frozen module (no gradients, no optimizer) sharded by FSDP2 as `wrap` shards a trained one, its
    shards stored in `param_dtype`: what each gather would cast them to anyway, so the same numbers in half
    the memory for bf16. Only parameters are cast (buffers such as rotary frequencies keep their dtype)."""
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.to(param_dtype)
    return wrap(module, world, "fsdp2", layers, param_dtype)


def param_megabytes(module: torch.nn.Module) -> tuple[float, float]:
    """(MB of `module`'s parameters held by this rank, MB of all of them): an FSDP2 shard holds ~1/N."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for p in module.parameters():
        here = p.to_local() if isinstance(p, DTensor) else p
        local += here.numel() * here.element_size()
        full += p.numel() * p.element_size()
    return local / 2**20, full / 2**20


@contextlib.contextmanager
def gathered(layers):
    """FSDP2: within this block each of `layers` keeps its parameters gathered after its forward, so a
    loop of forwards (generation: one per token) gathers each layer once, not once per call; resharded on
    exit. Memory in the block: the whole model, as under DDP. Anything else: no effect."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in layers if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def sum_across(t: torch.Tensor, world: World) -> torch.Tensor:
    """In place: the sum of `t` over all ranks (for logging statistics)."""
    if world.size > 1:
        dist.all_reduce(t)
    return t


def max_across(x: float, world: World) -> float:
    """The largest `x` over all ranks."""
    if world.size == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def sum_dict_across(d: dict[str, float], world: World) -> dict[str, float]:
    """Sum of each value over all ranks; every rank must hold the same keys."""
    if world.size == 1:
        return d
    keys = sorted(d)
    t = torch.tensor([d[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def deal(n: int, world: World) -> list[int]:
    """Positions 0..n-1 of a global batch that this rank takes: rank r takes r, r + N, r + 2N, ..."""
    return list(range(world.rank, n, world.size))


def gather_objects(obj, world: World) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (pickled: small things only)."""
    if world.size == 1:
        return [obj]
    parts: list = [None] * world.size
    dist.all_gather_object(parts, obj)
    return parts


def gather_rows(local: dict[str, torch.Tensor], world: World, n: int, k: int = 1) -> dict[str, torch.Tensor]:
    """Per-row tensors of this rank's share of a global batch of `n` items with `k` rows each (the rows of
    item `deal(n)[i]` at local rows i*k .. i*k+k-1) -> the whole batch on every rank, rows in global order,
    2-D tensors right-padded with zeros to the widest rank's width. A world of one returns `local`."""
    if world.size == 1:
        return local
    parts: list = [None] * world.size
    dist.all_gather_object(parts, {name: t.detach().cpu() for name, t in local.items()})
    device = next(iter(local.values())).device
    out = {}
    for name in local:
        width = max(p[name].shape[1] for p in parts) if local[name].dim() == 2 else 0
        rows = []
        for j in range(n):  # item j lives on rank j % N, as its (j // N)-th item there
            t = parts[j % world.size][name][(j // world.size) * k : (j // world.size + 1) * k]
            if width:
                t = torch.nn.functional.pad(t, (0, width - t.shape[1]))
            rows.append(t)
        out[name] = torch.cat(rows).to(device)
    return out


def full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Trainable parameters and optimizer state, unsharded, on the CPU, keyed by parameter name (the
    same keys with or without DDP / FSDP2). A collective under FSDP2: every rank calls it; with more than
    one process only rank 0 gets the tensors."""
    params, optim = get_state_dict(module, optimizer, options=FULL)
    # A tied parameter (lm_head.weight = embed_tokens.weight) comes under both names, frozen or not
    # (ignore_frozen_params drops one name): keep the one `named_parameters` gives, and only if trainable
    inner = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    keep = {n for n, p in inner.named_parameters() if p.requires_grad}
    drop = {n for n, _ in inner.named_parameters(remove_duplicate=False)} - keep
    return {k: v for k, v in params.items() if k not in drop}, optim


def load_full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, params: dict, optim: dict) -> None:
    """Inverse of `full_state` at any world size (every rank passes the full dicts; FSDP2 keeps its shard)."""
    set_state_dict(
        module,
        optimizer,
        model_state_dict=params,
        optim_state_dict=optim,
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (under FSDP2 it is a replicated DTensor)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def held_rows(n: int, k: int, world: World, device) -> torch.Tensor:
    """Where the rows of a global batch of `n` items x `k` rows live (`gather_rows`' layout): (n*k,) int64,
    each global row's row on this rank (the rows of `deal(n)`'s items, in global order), -1 where another
    rank holds it. `held >= 0` selects this rank's rows of a batch-wide tensor, in its own order."""
    own = torch.tensor([j * k + s for j in deal(n, world) for s in range(k)], device=device)
    held = torch.full((n * k,), -1, dtype=torch.long, device=device)
    held[own] = torch.arange(len(own), device=device)
    return held


def micro_batches(rows: torch.Tensor, held: torch.Tensor, n: int, world: World) -> list:
    """A minibatch's global `rows` -> the local rows of those this rank holds, in `n` micro-batches (fewer
    when it holds fewer rows). With more than one process the list is padded with None to `n`: every rank
    runs the same forward and backward passes (the engine's collectives run in each), an idle one at
    weight 0."""
    local = held[rows][held[rows] >= 0]
    chunks: list = list(local.chunk(n)) if len(local) else []
    if world.size > 1:
        chunks += [None] * (n - len(chunks))
    return chunks
