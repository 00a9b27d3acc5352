"""Step 2 of RLHF: train a scalar reward model on preference pairs, then validate it properly.

Model: a causal-LM trunk + a bias-free scalar head (`AutoModelForSequenceClassification`, one label, head
drawn from N(0, 1/(H+1))), dropout off, sequences right-padded, the score read at the last real token.
Loss: Bradley-Terry, -log sigmoid(r_chosen - r_rejected [- margin]), through the fused kernel
`fastrlhf.kernels.reward_head_pairwise_loss` (last-token gather + head + loss + backward in one launch),
plus an optional reward-centering term coef * mean((r_c + r_r)^2).

After training the reward is normalised so responses of the reference policy (the responses in the
training pairs, which the reference sampled) average 0 with unit spread: r_norm = gain * r + bias, with
`reward_gain` / `reward_bias` stored in the saved config. The folder loads with transformers alone:
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    r = model(input_ids, attention_mask=mask).logits[:, 0] * model.config.reward_gain + model.config.reward_bias

Checkpoints (`checkpoint.pt`, written atomically) hold the trainable weights, optimizer, schedule, RNG
state and step; the data order is a function of (seed, epoch), so `--resume` continues exactly where an
interrupted run stopped and ends with the same weights and metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastrlhf.kernels import (
    last_token_rewards,
    last_token_rewards_ref,
    reward_head_pairwise_loss,
    reward_head_pairwise_loss_ref,
)
from fastrlhf.kernels._common import nvtx_range

from .checkpoint import append_record, atomic_save, open_run, rng_state, set_rng_state
from .config import EvalRewardConfig, RewardConfig
from .data import PreferencePair, encode_prompt, load_pairs, split_by_prompt, tokenize_pairs, write_jsonl
from .dist import World, fsdp_param_dtype, full_state, grad_norm_value, init_world, load_full_state, sum_across, wrap
from .errors import UserError
from .family import bottom_parameters, decoder_layers, lora_targets, n_bottom_layers, replay_bottom
from .metrics import pairwise_metrics, plot_reward_report, reward_distribution
from .models import (
    autocast,
    load_reward_model,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
    resolve_reward_model_path,
    reward_head_params,
    reward_trunk,
    save_pretrained_atomic,
)
from .prefix_cache import build_prefix_cache, cache_bytes, cached_batch

log = logging.getLogger("fastrlhf")


# ------------------------------------------------------------------------------------------------ data
def load_splits(cfg: RewardConfig) -> tuple[list[PreferencePair], list[PreferencePair], list[PreferencePair]]:
    """Train/val/test pairs: separate files if both --val-pairs and --test-pairs are given, otherwise a
    split of --pairs by prompt (no prompt in two splits)."""
    pairs = load_pairs(cfg.pairs)
    if (cfg.val_pairs is None) != (cfg.test_pairs is None):
        raise UserError("give both --val-pairs and --test-pairs, or neither (then --pairs is split by prompt)")
    if cfg.val_pairs is not None:
        return pairs, load_pairs(cfg.val_pairs), load_pairs(cfg.test_pairs)
    train, val, test = split_by_prompt(pairs, cfg.split, seed=cfg.seed)
    if not train:
        raise UserError(f"{cfg.pairs}: no training pairs after the {cfg.split} split")
    return train, val, test


def step_batches(n_pairs: int, step: int, batch_pairs: int, grad_accum: int, seed: int) -> list[torch.Tensor]:
    """Indices of the micro-batches of optimizer step `step`. The order of epoch e is a permutation
    seeded by (seed, e), so any step's data is known without replaying the loader (exact resume)."""
    per_step = batch_pairs * grad_accum
    steps_per_epoch = math.ceil(n_pairs / per_step)
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    idx = order[k * per_step : (k + 1) * per_step]
    return [idx[i : i + batch_pairs] for i in range(0, len(idx), batch_pairs)]


# ----------------------------------------------------------------------------------------------- model
def pair_forward(
    model, batch: dict[str, torch.Tensor], margin: torch.Tensor | None, use_kernels: bool, n_frozen: int = 0
):
    """Trunk + fused head + per-pair Bradley-Terry loss. batch: input_ids / attention_mask (2B, T),
    chosen rows first -- or inputs_embeds (2B, T, H): stored states of the frozen bottom n_frozen layers.
    -> RewardHeadOutput with loss (B,) fp32, chosen / rejected rewards (B,) fp32."""
    trunk = reward_trunk(model)
    if "inputs_embeds" in batch:
        with replay_bottom(trunk, n_frozen, batch["inputs_embeds"]):
            hidden = trunk(
                inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
    else:
        hidden = trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    weight, bias = reward_head_params(model)  # (1, H), None for Llama
    head = reward_head_pairwise_loss if use_kernels else reward_head_pairwise_loss_ref
    return head(hidden, weight, bias, attention_mask=batch["attention_mask"], margin=margin, reduction="none")


class PairModel(torch.nn.Module):
    """`pair_forward` as a module, so DDP / FSDP2 see the training forward (they hook `__call__`): holds
    the reward model as `.model`; its parameter names are the checkpoints' keys at any world size."""

    def __init__(self, model, use_kernels: bool, n_frozen: int):
        super().__init__()
        self.model, self.use_kernels, self.n_frozen = model, use_kernels, n_frozen

    def forward(self, batch: dict[str, torch.Tensor], margin: torch.Tensor | None):
        return pair_forward(self.model, batch, margin, self.use_kernels, self.n_frozen)


@torch.no_grad()
def score_pairs(model, tokenizer, pairs, *, batch_pairs: int, max_length: int, device, use_kernels=True, desc=None):
    """Rewards of every pair (no gradient) -> dict of numpy arrays: chosen, rejected, loss (B,) and
    kept (indices into `pairs`; pairs too long for max_length are dropped and logged by tokenize_pairs)."""
    model.eval()
    out = {"chosen": [], "rejected": [], "loss": [], "kept": []}
    for start in tqdm(range(0, len(pairs), batch_pairs), desc=desc, leave=False, disable=desc is None):
        chunk = pairs[start : start + batch_pairs]
        batch = tokenize_pairs(tokenizer, chunk, max_length)
        kept = batch.pop("kept")
        if len(kept) == 0:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device):
            res = pair_forward(model, batch, None, use_kernels)
        out["chosen"].append(res.chosen_rewards.float().cpu())
        out["rejected"].append(res.rejected_rewards.float().cpu())
        out["loss"].append(res.loss.float().cpu())
        out["kept"].append(kept + start)
    return {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in out.items()}


@torch.no_grad()
def score_texts(
    model, tokenizer, prompts, replies: list[str], *, use_kernels: bool = True, batch_size: int = 32
) -> torch.Tensor:
    """Normalised reward of each (prompt messages, reply text) as the reward model's own tokenizer and chat
    template render it: `encode_prompt(prompt) + encode(reply) + [EOS]`, as `tokenize_pairs` trains it (a
    reply cut off at the token limit gets its EOS too), right-padded, read at the EOS. For a reward model
    whose tokenizer differs from the policy's. -> (N,) fp32 on the model's device."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    rows = [
        encode_prompt(tokenizer, p) + list(tokenizer.encode(r, add_special_tokens=False)) + [eos]
        for p, r in zip(prompts, replies)
    ]
    weight, bias = reward_head_params(model)
    head = last_token_rewards if use_kernels else last_token_rewards_ref
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        T = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), T), tokenizer.pad_token_id, dtype=torch.long)  # (b, T) right-padded
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        ids, mask = ids.to(device), mask.to(device)
        with autocast(device):
            hidden = reward_trunk(model)(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, T, H)
        out.append(head(hidden, weight, bias, attention_mask=mask).float())
    cfg = model.config
    return torch.cat(out) * getattr(cfg, "reward_gain", 1.0) + getattr(cfg, "reward_bias", 0.0)


def _freeze_and_adapt(model, cfg: RewardConfig):
    """Freeze the embeddings and the bottom layers; optionally put LoRA on the trainable layers' linears
    (peft injects the adapters in place; we train the plain HF model and merge at the end).
    -> (model, number of frozen layers, the peft wrapper or None)."""
    n_frozen = n_bottom_layers(model, cfg.freeze_layers)
    n_layers = getattr(model.config, "num_hidden_layers", 0)
    if n_frozen:  # the embeddings (and whatever else runs before layer 0) and the bottom layers
        for p in bottom_parameters(model, n_frozen):
            p.requires_grad_(False)
    peft_model = None
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model, n_frozen, exclude=("score",))
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets)
        peft_model = get_peft_model(model, lora)
        reward_head_params(model)[0].requires_grad_(True)  # peft froze the head; it is new, so train it
        model = peft_model.get_base_model()
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "reward model: %d of %d layers frozen, LoRA r=%d; %.1fM of %.1fM parameters train",
        n_frozen,
        n_layers,
        cfg.lora_r,
        n_train / 1e6,
        n_all / 1e6,
    )
    return model, n_frozen, peft_model


def _prefix_cache(model, tokenizer, train, n_frozen: int, cfg: RewardConfig, device):
    """Stored frozen-prefix states of the training pairs, if enabled and exact on a first batch."""
    if not (cfg.cache_frozen and 0 < n_frozen < len(decoder_layers(model))):
        return None
    t0 = time.perf_counter()
    with autocast(device):  # as the training steps run the frozen bottom: bf16 on CUDA
        cache = build_prefix_cache(
            reward_trunk(model),
            tokenizer,
            train,
            n_frozen=n_frozen,
            max_length=cfg.max_length,
            batch_pairs=cfg.batch_pairs * 2,
            device=device,
        )
    probe = [i for i, c in enumerate(cache) if c is not None][: cfg.batch_pairs]
    with torch.no_grad(), autocast(device):
        full = pair_forward(
            model, _token_batch(tokenizer, [train[i] for i in probe], cfg.max_length, device)[0], None, cfg.kernels
        )
        fast = pair_forward(model, cached_batch(cache, probe, device), None, cfg.kernels, n_frozen)
    err = (full.chosen_rewards - fast.chosen_rewards).abs().max().item()
    scale = full.chosen_rewards.abs().max().item() + 1e-6
    # bf16 autocast (CUDA): other batch shapes may pick other GEMM kernels and differ by bf16 rounding through
    # the trunk (0.0 measured on an H200); a wrong cache (positions, masks) is off by O(scale), far above
    rel = 1e-2 if torch.device(device).type == "cuda" else 1e-3
    if err > rel * scale + 1e-4:
        log.warning("frozen-prefix cache disagrees with the full trunk (%.2e); training without it", err)
        return None
    log.info(
        "cached the frozen prefix of %d pairs in %.1f s (%.0f MB; check: max |diff| %.1e)",
        len(train),
        time.perf_counter() - t0,
        cache_bytes(cache) / 2**20,
        err,
    )
    return cache


def _token_batch(tokenizer, chunk, max_length: int, device):
    batch = tokenize_pairs(tokenizer, chunk, max_length)
    kept = batch.pop("kept")
    return {k: v.to(device) for k, v in batch.items()}, kept


def _pair_batch(train, idx: list[int], cache, tokenizer, cfg: RewardConfig, device):
    """-> (model inputs, kept (positions in idx of the pairs that fit), the pairs idx)."""
    chunk = [train[i] for i in idx]
    if cache is not None:
        batch = cached_batch(cache, idx, device)
        return batch, batch.pop("kept"), chunk
    batch, kept = _token_batch(tokenizer, chunk, cfg.max_length, device)
    return batch, kept, chunk


@torch.no_grad()
def _training_rewards(model, tokenizer, train, cache, n_frozen: int, cfg: RewardConfig, device) -> np.ndarray:
    """Rewards of every training response (chosen and rejected), from the prefix cache when there is one."""
    if cache is None:
        scores = score_pairs(
            model,
            tokenizer,
            train,
            batch_pairs=cfg.batch_pairs * 2,
            max_length=cfg.max_length,
            device=device,
            use_kernels=cfg.kernels,
            desc="normalise",
        )
        return np.concatenate([scores["chosen"], scores["rejected"]])
    model.eval()
    out = []
    for start in range(0, len(train), cfg.batch_pairs * 2):
        batch = cached_batch(cache, list(range(start, min(start + cfg.batch_pairs * 2, len(train)))), device)
        if len(batch.pop("kept")) == 0:
            continue
        with autocast(device):
            res = pair_forward(model, batch, None, cfg.kernels, n_frozen)
        out += [res.chosen_rewards.float().cpu(), res.rejected_rewards.float().cpu()]
    return torch.cat(out).numpy()


def _save_checkpoint(path: Path, module, optimizer, scheduler, step: int, cfg: RewardConfig, world: World) -> None:
    """Every rank calls this (FSDP2 gathers the shards); rank 0 writes full, unsharded state."""
    params, optim = full_state(module, optimizer)
    if not world.main:
        return
    cpu_rng, cuda_rng = rng_state()
    atomic_save(
        {
            "step": step,
            "trainable": params,
            "optimizer": optim,
            "scheduler": scheduler.state_dict(),
            "rng": cpu_rng,
            "cuda_rng": cuda_rng,
            "config": asdict(cfg),
            "world_size": world.size,
        },
        path,
    )


def _restore_checkpoint(ckpt: dict, module, optimizer, scheduler) -> int:
    """`_save_checkpoint`'s state back into the training objects -> the step it was saved at."""
    load_full_state(module, optimizer, ckpt["trainable"], ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"], ckpt["cuda_rng"])
    return ckpt["step"]


def save_reward_model(model, tokenizer, folder: Path, *, gain: float, bias: float, n_responses: int) -> None:
    """save_pretrained into a temp folder, then rename into place; gain/bias go into the config."""
    model.config.reward_gain = gain
    model.config.reward_bias = bias
    model.config.reward_normalized_on = f"{n_responses} responses of the reference policy (training pairs)"
    save_pretrained_atomic(model, tokenizer, folder)


# ---------------------------------------------------------------------------------------------- train
def train_reward_model(cfg: RewardConfig) -> dict:
    """The training loop, top to bottom. Returns the final summary (also in out_dir/summary.json).
    Under torchrun every rank runs it (trainer/dist.py); rank 0 writes the files."""
    world = init_world(cfg.device)
    device = world.device
    out = Path(cfg.out_dir)
    (out / "splits").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    train, val, test = load_splits(cfg)  # seeded: the same split on every rank
    if world.main:
        for name, part in (("train", train), ("val", val), ("test", test)):
            write_jsonl(out / "splits" / f"{name}.jsonl", part)
    log.info("pairs: %d train, %d val, %d test", len(train), len(val), len(test))

    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, padding_side="right")
    model = load_reward_model(model_path, device=device, tokenizer=tokenizer, seed=cfg.seed)
    model, n_frozen, peft_model = _freeze_and_adapt(model, cfg)
    with nvtx_range("train-rm/prefix_cache"):
        cache = _prefix_cache(model, tokenizer, train, n_frozen, cfg, device)  # every rank: all pairs
    sharded = world.size > 1 and cfg.parallel == "fsdp2"
    param_dtype = fsdp_param_dtype(cfg.fsdp_param_dtype, device)
    module = wrap(PairModel(model, cfg.kernels, n_frozen), world, cfg.parallel, decoder_layers(model), param_dtype)
    if world.size > 1:
        log.info(
            "rank %d of %d on %s, %s%s",
            world.rank,
            world.size,
            device,
            cfg.parallel,
            f" (parameters gathered in {param_dtype})" if sharded else "",
        )
    spare = None  # a pair every rank can fall back on (at zero weight) when its share of a micro-batch is empty
    if world.size > 1:
        spare = next(i for i in range(len(train)) if len(_pair_batch(train, [i], cache, tokenizer, cfg, device)[1]))
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-8)
    steps_per_epoch = math.ceil(len(train) / (cfg.batch_pairs * cfg.grad_accum))
    total_steps = cfg.epochs * steps_per_epoch
    warmup = max(1, total_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )

    ckpt_path, log_path = out / "checkpoint.pt", out / "metrics.jsonl"
    step = 0
    ckpt = open_run(ckpt_path, log_path, cfg.resume, world)
    if ckpt is not None:
        step = _restore_checkpoint(ckpt, module, optimizer, scheduler)
        log.info("resumed from %s at step %d of %d", ckpt_path, step, total_steps)
    stop = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    eval_every = cfg.eval_every or steps_per_epoch

    bar = tqdm(total=stop, initial=step, desc="train-rm", unit="step", disable=not world.main)
    t_start = time.perf_counter()
    if sharded and val:
        log.info("FSDP2: the validation set is scored at the end only (the sharded model has no single copy)")
    while step < stop:
        module.train()
        micro = step_batches(len(train), step, cfg.batch_pairs, cfg.grad_accum, cfg.seed)
        n_step = sum(len(m) for m in micro)
        # loss, correct, pairs, sum r, sum r^2, sum gap: one sync per step. fp64, as the std is
        # sqrt(E[r^2] - E[r]^2): in fp32 that difference loses ~4 digits once |mean| >> std.
        stats = torch.zeros(6, dtype=torch.float64, device=device)
        for idx in micro:
            # this rank's share of the micro-batch; the loss is scaled so the averaged gradient is 1-process's
            batch, kept, chunk = _pair_batch(
                train, idx[world.rank :: world.size].tolist(), cache, tokenizer, cfg, device
            )
            scale = world.size / n_step
            if len(kept) == 0:
                if world.size == 1:
                    continue
                # every rank must run the same forwards and backwards (the engine's collectives)
                batch, kept, chunk = _pair_batch(train, [spare], cache, tokenizer, cfg, device)
                scale = 0.0
            margin = None
            if cfg.use_margin:
                margin = torch.tensor([chunk[i].margin or 0.0 for i in kept.tolist()], device=device)
            with autocast(device), nvtx_range("train-rm/forward"):
                res = module(batch, margin)
            loss = res.loss.sum() * scale
            if cfg.center_coef:
                loss = loss + cfg.center_coef * (res.chosen_rewards + res.rejected_rewards).pow(2).sum() * scale
            with nvtx_range("train-rm/backward"):
                loss.backward()
            if scale == 0.0:
                continue
            rewards = torch.cat([res.chosen_rewards, res.rejected_rewards]).detach().double()  # (2B,)
            gap = (res.chosen_rewards - res.rejected_rewards).detach()
            stats += torch.stack(
                [
                    res.loss.detach().sum(),
                    (gap > 0).float().sum(),
                    torch.tensor(float(len(kept)), device=device),
                    rewards.sum(),
                    rewards.pow(2).sum(),
                    gap.sum(),
                ]
            )
        loss_sum, correct, n, r_sum, r_sq, gap_sum = sum_across(stats, world).tolist()
        if not math.isfinite(loss_sum + r_sq):
            raise FloatingPointError(
                f"step {step}: non-finite reward-model loss ({loss_sum / max(n, 1)}), sum of squared rewards {r_sq}; "
                "weights were not updated"
            )
        with nvtx_range("train-rm/optimizer"):
            grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1

        n = max(n, 1)
        r_mean = r_sum / (2 * n)
        record = {
            "step": step,
            "epoch": (step - 1) // steps_per_epoch,
            "split": "train",
            "loss": loss_sum / n,
            "accuracy": correct / n,
            "reward_mean": r_mean,
            "reward_std": math.sqrt(max(r_sq / (2 * n) - r_mean**2, 0.0)),
            "gap_mean": gap_sum / n,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "elapsed_s": time.perf_counter() - t_start,
        }
        if world.main:
            append_record(log_path, record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")

        # rank 0 scores the val pairs on its full copy (DDP: the others wait in the next step's all-reduce)
        if val and world.main and not sharded and (step % eval_every == 0 or step == total_steps):
            with nvtx_range("train-rm/validation"):
                scores = score_pairs(
                    model,
                    tokenizer,
                    val,
                    batch_pairs=cfg.batch_pairs * 2,
                    max_length=cfg.max_length,
                    device=device,
                    use_kernels=cfg.kernels,
                )
            metrics = pairwise_metrics(scores["chosen"], scores["rejected"], seed=cfg.seed)
            val_record = {"step": step, "split": "val", "loss": float(scores["loss"].mean())}
            val_record.update({k: metrics[k] for k in ("accuracy", "auc_roc", "ece", "brier")})
            append_record(log_path, val_record)
            tqdm.write(
                f"step {step}: val loss {val_record['loss']:.3f} accuracy {metrics['accuracy']:.3f} "
                f"AUC {metrics['auc_roc']:.3f}"
            )
        if step % cfg.save_every == 0 or step == stop:
            _save_checkpoint(ckpt_path, module, optimizer, scheduler, step, cfg, world)
    bar.close()

    if step < total_steps:
        log.info("stopped at step %d of %d (--max-steps); continue with --resume", step, total_steps)
        return {"step": step, "total_steps": total_steps, "finished": False}
    if sharded:  # gather the trained parameters into a plain copy on rank 0 for what follows
        params, _ = full_state(module, optimizer)
        if world.main:
            model = load_reward_model(model_path, device=device, tokenizer=tokenizer, seed=cfg.seed)
            model, _, peft_model = _freeze_and_adapt(model, cfg)
            missing, unexpected = PairModel(model, cfg.kernels, n_frozen).load_state_dict(params, strict=False)
            trained = {n for n, p in PairModel(model, cfg.kernels, n_frozen).named_parameters() if p.requires_grad}
            if unexpected or trained & set(missing):
                raise RuntimeError(
                    f"FSDP2 gather: unexpected {unexpected[:3]}, missing {sorted(trained & set(missing))[:3]}"
                )
    if not world.main:  # rank 0 alone normalises, saves and evaluates: no collectives below
        return {"step": step, "total_steps": total_steps, "finished": True, "rank": world.rank}

    # normalise on the reference policy's responses, save, and evaluate on val and test
    with nvtx_range("train-rm/normalise"):
        all_rewards = _training_rewards(model, tokenizer, train, cache, n_frozen, cfg, device)
    mean, std = float(all_rewards.mean()), float(all_rewards.std()) or 1.0
    if peft_model is not None:
        model = peft_model.merge_and_unload()  # plain weights: the saved folder needs no peft to load
    save_reward_model(model, tokenizer, out / "model", gain=1.0 / std, bias=-mean / std, n_responses=len(all_rewards))
    summary = {
        "step": step,
        "total_steps": total_steps,
        "finished": True,
        "reward_mean_raw": mean,
        "reward_std_raw": std,
        "train_pairs": len(train),
        "val_pairs": len(val),
        "test_pairs": len(test),
        "train_seconds": time.perf_counter() - t_start,
    }
    for name, part in (("val", val), ("test", test)):
        if part:
            eval_cfg = EvalRewardConfig(
                model=str(out / "model"),
                pairs=str(out / "splits" / f"{name}.jsonl"),
                out_dir=str(out / "eval" / name),
                batch_pairs=cfg.batch_pairs * 2,
                max_length=cfg.max_length,
                seed=cfg.seed,
                device=cfg.device,
            )
            with nvtx_range(f"train-rm/eval_{name}"):
                summary[name] = evaluate_reward_model(eval_cfg, model=model, tokenizer=tokenizer)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------------------------- eval
def evaluate_reward_model(cfg: EvalRewardConfig, *, model=None, tokenizer=None) -> dict:
    """Validation report: pairwise-decision accuracy / precision / recall / F1 / AUC-ROC, calibration
    (ECE, Brier), accuracy by reward-gap bucket, reward distributions; metrics.json, roc.png, rewards.png."""
    device = resolve_device(cfg.device)
    if model is None:
        path = resolve_reward_model_path(cfg.model, "--model")
        tokenizer = load_tokenizer(path, padding_side="right")
        model = load_reward_model(path, device=device, tokenizer=tokenizer)
    pairs = load_pairs(cfg.pairs)
    scores = score_pairs(
        model,
        tokenizer,
        pairs,
        batch_pairs=cfg.batch_pairs,
        max_length=cfg.max_length,
        device=device,
        desc=f"eval {Path(cfg.pairs).name}",
    )
    # decisions and calibration from the raw rewards (the Bradley-Terry probabilities the model was
    # trained to output); distributions from the normalised ones (what PPO will see)
    margins = [pairs[i].margin for i in scores["kept"]]
    metrics = pairwise_metrics(
        scores["chosen"],
        scores["rejected"],
        seed=cfg.seed,
        margins=np.array(margins, dtype=float) if all(m is not None for m in margins) else None,
    )
    gain = getattr(model.config, "reward_gain", 1.0)
    bias = getattr(model.config, "reward_bias", 0.0)
    chosen, rejected = scores["chosen"] * gain + bias, scores["rejected"] * gain + bias
    metrics.update(reward_distribution(chosen, rejected))
    metrics["loss"] = float(scores["loss"].mean()) if len(scores["loss"]) else float("nan")
    metrics["pairs"] = int(len(chosen))
    metrics["dropped_too_long"] = len(pairs) - int(len(chosen))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_reward_report(chosen, rejected, metrics, out)
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "roc"}, indent=2))
    return {k: v for k, v in metrics.items() if k != "roc"}
