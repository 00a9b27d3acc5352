"""Memory proof for the trainer's LM head: one PPO step's model work on a vocab >= 128k model, three head modes.

    python benchmarks/bench_head_memory.py --arch llama-3.2-1b --out "$OUT"          # one H100: ~2-3 min
    python benchmarks/bench_head_memory.py --arch tiny --device cpu --out /tmp/hm    # CPU wiring check

Model. A seeded random-init `LlamaConfig` with Llama-3.2-1B shapes (vocab 128256, hidden 2048, 16 layers,
32 heads / 8 KV heads, MLP 8192, tied head, rope theta 5e5; the llama3 rope scaling is left out: it changes
no shape), or `Qwen2Config` with Qwen2.5-1.5B shapes (vocab 151936, hidden 1536, 28 layers, 12 / 2 heads,
MLP 8960, tied), or `tiny` (vocab 1000, hidden 64, 2 layers) for CPU. No weights, no files, no hub.
Built on the device; fp32 master weights + bf16 autocast on CUDA as the trainer runs (`--dtype bf16`: bf16
weights). `--freeze-layers` as the trainer's (default 0: full fine-tune, so the tied head trains and the
fused-linear backward pays for its fp32 grad_W buffer); the prefix cache of frozen layers is not used.
Gradient checkpointing (HF, non-reentrant, as `--grad-checkpointing` in the trainer) is ON by default so
the trunk's activations do not hide the head; `--no-grad-checkpointing` turns it off. The output says which.

What is measured: the three model phases of one PPO step on a synthetic rollout (random token ids, B rows
of P prompt + R reply tokens, all real: masks all ones, no padding), each with the trainer's own functions
(`fastrlhf.trainer.ppo.policy_forward`, `kernels.ppo_head`, `rl.policy_loss` / `rl.reduce_policy_loss`):
    policy_eval  no grad: log-probs + entropy of the reply tokens (the logits, if any, are dropped right
                 after, as the trainer does from step 2 on with the default k1 KL)
    reference    no grad: log-probs again, under THE SAME model (a separate reference would add the same
                 resident weights in every mode, so reusing the policy changes no comparison)
    update       forward + backward of the clipped surrogate - ent_coef * entropy on all B rows as one
                 micro-batch, exactly as trainer/ppo.py's update builds it (gradients land in .grad; as
                 there, policy_forward's logits stay referenced through the backward)
Left out, identical in every mode: sampling (generation does not touch the head mode), reward model and
critic/value loss, grad clipping and the optimizer step (no AdamW state unless `--adam-state` allocates
its two fp32 buffers per trainable parameter). Advantages are random (seeded), old log-probs are the
policy_eval ones (ratio 1).
Head modes (fused_linear, kernels): `fused-linear` (True, True): linear_logprobs from hidden + head weight,
no (B, R, V) tensor; `logits` (False, True): token_logprobs on the logits, one `ppo_head` pass in the update;
`eager` (False, False): the *_ref twins, fp32 log_softmax over materialised logits.

Numbers per mode at `--batch` B: median seconds per phase over `--reps` steps after `--warmup`
(torch.cuda.synchronize + perf_counter), tokens/s = B * (P + R) / seconds per phase, 3 B (P + R) / the sum
of the three medians for the step; peak memory = torch.cuda.max_memory_allocated during a phase (reset at its
start), max over phases and timed steps, reported as is AND above the base (memory allocated just before
the step: weights, rollout, no gradients). Then, per mode, the largest batch that fits: the step (all three
phases) is run at 2B, 4B ... until an OOM or `--max-batch`, then bisected between the last fit and the
first OOM until the gap is <= max(1, fit/8), within `--time-budget-s` per mode (a probe started in time
finishes). An OOM is torch.cuda.OutOfMemoryError (or a cuBLAS alloc failure); memory is freed and
empty_cache'd before the next probe. Reported: max fitting batch, first OOM, how the search ended.
Ratios: peak(mode) / peak(eager) at the same B (target for fused-linear <= 0.6) and maxB(mode) / maxB(eager)
(target >= 2; also the conservative maxB(mode) / firstOOM(eager)).
Correctness, checked by the benchmark itself: max |logp - logp_eager| and |entropy - entropy_eager| of
policy_eval over every reply token (gated: CPU 1e-4, CUDA 5e-2 for bf16 logits), plus loss and gradient
norm of the update (reported). Exit status 1 when the gate fails.

CPU: the tiny arch for a wiring check. Without TRITON_INTERPRET=1 the kernel modes dispatch to the *_ref
twins (fused-linear: the chunked linear_logprobs_ref); with it they run Triton's interpreter. No memory numbers (None; the process RSS high-water mark is
in meta), no max-batch search, timings mean nothing. Output, flat in --out: head_memory.json, head_memory.md
(the markdown table, also printed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ppo_step  # noqa: E402  (kernel_path)
import measure  # noqa: E402

MB = 2.0**20
FILES = ("head_memory.json", "head_memory.md")
PHASES = ("policy_eval", "reference", "update")
MODES = {"fused-linear": (True, True), "logits": (False, True), "eager": (False, False)}  # (fused_linear, kernels)
TOL = {"cpu": 1e-4, "cuda": 5e-2}  # max abs diff of log-probs / entropy vs eager
ARCHS = measure.ARCHS  # random-init model configurations


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/bench_head_memory.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--arch", choices=tuple(ARCHS), default="llama-3.2-1b", help="model shapes (random init)")
    p.add_argument("--vocab-size", type=int, default=None, help="override the arch's vocabulary (smoke tests)")
    p.add_argument("--hidden-size", type=int, default=None, help="override the arch's hidden size")
    p.add_argument("--num-layers", type=int, default=None, help="override the arch's layer count")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32: fp32 master weights + bf16 autocast on CUDA (the trainer); bf16: bf16 weights",
    )
    p.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES), help="head modes to run")
    p.add_argument("--batch", type=int, default=8, help="rows B of the same-batch comparison")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens P per row")
    p.add_argument("--reply-len", type=int, default=768, help="reply tokens R per row")
    p.add_argument("--reps", type=int, default=3, help="timed steps per mode (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first (Triton compile)")
    p.add_argument(
        "--search",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="search the largest batch that fits (CUDA only)",
    )
    p.add_argument("--max-batch", type=int, default=512, help="cap of the max-batch search")
    p.add_argument("--time-budget-s", type=float, default=40.0, help="max-batch search budget per mode (s)")
    p.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="HF gradient checkpointing of the trunk in the update",
    )
    p.add_argument(
        "--freeze-layers",
        type=int,
        default=0,
        help="as the trainer: 0 full fine-tune; n > 0 freezes embeddings (+ tied head) and n layers",
    )
    p.add_argument(
        "--adam-state",
        action="store_true",
        help="also hold AdamW's two fp32 buffers per trainable parameter (no step is taken)",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="log-prob temperature (trainer default)")
    p.add_argument("--clip-range", type=float, default=0.2, help="PPO clip range")
    p.add_argument("--ent-coef", type=float, default=0.0, help="entropy bonus coefficient (trainer default)")
    p.add_argument("--device", default="auto", help='"auto" (CUDA if available), "cuda" or "cpu"')
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, tokens and advantages")
    p.add_argument("--out", default="out/head_memory", help="results folder (" + ", ".join(FILES) + ")")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ model and data
def build_model(args, device: torch.device):
    """A seeded random causal LM of the arch's shapes, built on `device` -> (model, config dict)."""
    import transformers

    cls_name, kw = ARCHS[args.arch]
    kw = dict(kw)
    for key, val in (
        ("vocab_size", args.vocab_size),
        ("hidden_size", args.hidden_size),
        ("num_hidden_layers", args.num_layers),
    ):
        if val is not None:
            kw[key] = val
    config = getattr(transformers, cls_name)(**kw)
    model_cls = transformers.LlamaForCausalLM if cls_name == "LlamaConfig" else transformers.Qwen2ForCausalLM
    torch.manual_seed(args.seed)
    with device:
        model = model_cls(config)
    if args.dtype == "bf16":
        model.to(torch.bfloat16)
    return model, {"class": cls_name, **kw, "attn_implementation": getattr(config, "_attn_implementation", None)}


def synthetic_rollout(B: int, P: int, R: int, vocab: int, seed: int, device: torch.device):
    """(Rollout of random tokens, every one real; whitened random advantages (B, R) fp32)."""
    from fastrlhf.trainer import rl
    from fastrlhf.trainer.rollout import Rollout

    g = torch.Generator().manual_seed(seed)
    ones = lambda n: torch.ones(B, n, dtype=torch.long)  # noqa: E731
    ro = Rollout(
        prompt_ids=torch.randint(0, vocab, (B, P), generator=g),
        prompt_mask=ones(P),
        response_ids=torch.randint(0, vocab, (B, R), generator=g),
        response_mask=ones(R),
        has_eos=torch.zeros(B, dtype=torch.bool),
        prompt_index=torch.arange(B),
    ).to(device)
    adv = rl.masked_whiten(torch.randn(B, R, generator=g), torch.ones(B, R)).to(device)
    return ro, adv


# ------------------------------------------------------------------------------------------------ one step
@contextlib.contextmanager
def phase(name: str, rec: dict, device: torch.device):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize()
    rec[name] = {
        "s": time.perf_counter() - t0,
        "peak_mb": torch.cuda.max_memory_allocated() / MB if cuda else None,
        "reserved_mb": torch.cuda.max_memory_reserved() / MB if cuda else None,
    }


def ppo_step(model, ro, adv, mode: str, args, device: torch.device) -> tuple[dict, dict]:
    """The three phases as trainer/ppo.py runs them -> ({phase: {s, peak_mb, reserved_mb}}, outputs)."""
    from fastrlhf.kernels import ppo_head
    from fastrlhf.trainer import rl
    from fastrlhf.trainer.models import autocast
    from fastrlhf.trainer.ppo import _targets, policy_forward
    from fastrlhf.trainer.rollout import forward_reply

    fused, kernels = MODES[mode]
    one_pass = kernels and not fused  # trainer: the update's head is one ppo_head pass over the logits
    T, mask, rec = args.temperature, ro.response_mask.float(), {}
    model.eval()
    with torch.no_grad(), autocast(device):
        with phase("policy_eval", rec, device):
            old_logp, entropy, hidden, logits, _ = policy_forward(model, ro, T, kernels, fused_linear=fused)
            logits = None  # trainer: freed before the reference's logits exist (k1 KL, step >= 2)
        with phase("reference", rec, device):
            ref_logp = policy_forward(model, ro, T, kernels, fused_linear=fused)[0]
    model.train()
    with phase("update", rec, device):
        with autocast(device):
            if one_pass:
                h, logits, _ = forward_reply(model, model.get_output_embeddings(), ro)
                head = ppo_head(logits, _targets(ro), old_logp, adv, clip_range=args.clip_range, temperature=T)
                logp, ent = head.logprobs, head.entropy
            else:  # as the trainer, the (B, R, V) logits (eager) stay referenced through the backward
                logp, ent, h, logits, _ = policy_forward(model, ro, T, kernels, fused_linear=fused)
        if one_pass:
            pg_loss, _ = rl.reduce_policy_loss(head.pg_loss, head.clipped, logp - old_logp, head.ratio, mask)
        else:
            pg_loss, _ = rl.policy_loss(logp, old_logp, adv, mask, args.clip_range)
        loss = pg_loss - args.ent_coef * rl.entropy_bonus(ent, mask)
        loss.backward()
    del logits, h, hidden, ref_logp
    return rec, {
        "logp": old_logp.detach().float().cpu(),
        "entropy": entropy.detach().float().cpu(),
        "loss": float(loss.detach()),
    }


def grad_norm(model) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _free(model, device: torch.device, empty_cache: bool = True) -> None:
    """Drop the gradients (and, between modes and probes, return cached blocks: no mode inherits another's)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda" and empty_cache:
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "ALLOC_FAILED" in str(e))
    )


def measure_mode(model, mode: str, args, device: torch.device, vocab: int) -> tuple[dict, dict | None]:
    """Warm-up + timed steps at --batch -> (summary, outputs of the first step for the agreement check)."""
    B, P, R = args.batch, args.prompt_len, args.reply_len
    ro, adv = synthetic_rollout(B, P, R, vocab, args.seed, device)
    recs, first = [], None
    try:
        for i in range(args.warmup + args.reps):
            _free(model, device, empty_cache=i == 0)
            base = torch.cuda.memory_allocated() / MB if device.type == "cuda" else None
            rec, outs = ppo_step(model, ro, adv, mode, args, device)
            if first is None:
                first = {**outs, "grad_norm": grad_norm(model)}
            if i >= args.warmup:
                recs.append((base, rec))
    except Exception as e:  # noqa: BLE001
        if not _is_oom(e):
            raise
        oom = True
    else:
        oom = False
    _free(model, device)
    if oom:
        return {"batch": B, "oom": True}, None
    tokens = B * (P + R)
    out: dict = {"batch": B, "oom": False, "tokens_per_phase": tokens, "phases": {}}
    for ph in PHASES:
        s = statistics.median(r[ph]["s"] for _, r in recs)
        peak, reserved = ([r[ph][k] for _, r in recs] for k in ("peak_mb", "reserved_mb"))
        out["phases"][ph] = {
            "median_s": s,
            "tokens_per_s": tokens / s,
            "peak_mb": None if None in peak else max(peak),
            "reserved_mb": None if None in reserved else max(reserved),
        }
    step_s = sum(out["phases"][ph]["median_s"] for ph in PHASES)
    base = recs[0][0]
    peak = max(v["peak_mb"] for v in out["phases"].values()) if base is not None else None
    out["step"] = {
        "s": step_s,
        "tokens_per_s": 3 * tokens / step_s,
        "base_mb": base,
        "peak_mb": peak,
        "peak_over_base_mb": None if base is None else peak - base,
    }
    return out, first


def max_batch(model, mode: str, args, device: torch.device, vocab: int, start_fits: bool) -> dict:
    """Largest B whose whole step fits: doubling from --batch, then bisection (see the module docstring)."""
    deadline, probes = time.perf_counter() + args.time_budget_s, []

    def fits(b: int) -> bool:
        t0, ok, rec = time.perf_counter(), True, {}
        try:
            ro, adv = synthetic_rollout(b, args.prompt_len, args.reply_len, vocab, args.seed, device)
            rec = ppo_step(model, ro, adv, mode, args, device)[0]
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            ok = False
        _free(model, device)
        peak = max((r["peak_mb"] for r in rec.values()), default=None)
        probes.append({"batch": b, "fits": ok, "s": time.perf_counter() - t0, "peak_mb": peak})
        print(f"[bench_head_memory] {mode} B={b}: {'fits' if ok else 'OOM'}", flush=True)
        return ok

    lo, hi, ended = (args.batch, None, "") if start_fits else (0, args.batch, "")
    while hi is None and not ended:  # doubling
        if lo >= args.max_batch:
            ended = "capped at --max-batch"
        elif time.perf_counter() > deadline:
            ended = "time budget (lower bound)"
        elif fits(b := min(2 * lo, args.max_batch)):
            lo = b
        else:
            hi = b
    while hi is not None and hi - lo > max(1, lo // 8) and not ended:  # bisection
        if time.perf_counter() > deadline:
            ended = "time budget (gap not closed)"
        elif fits(mid := (lo + hi) // 2):
            lo = mid
        else:
            hi = mid
    return {"max_batch": lo, "first_oom": hi, "ended": ended or "converged", "probes": probes}


# ------------------------------------------------------------------------------------------------ report
def _ratio(a, b):
    return a / b if a is not None and b else None


def compare(modes: dict, outputs: dict, tol: float) -> tuple[dict, bool, dict, dict]:
    """-> (agreement of each mode with eager, gate passed, ratios to eager, the targets)."""
    ref, e = outputs.get("eager"), modes.get("eager")
    agreement, ratios, targets = {}, {}, {}
    for mode, o in outputs.items():
        if ref is None or o is None:
            continue
        gn = abs(o["grad_norm"] / ref["grad_norm"] - 1) if ref["grad_norm"] else None
        agreement[mode] = {
            "logp": float((o["logp"] - ref["logp"]).abs().max()),
            "entropy": float((o["entropy"] - ref["entropy"]).abs().max()),
            "loss": o["loss"],
            "loss_abs_diff": abs(o["loss"] - ref["loss"]),
            "grad_norm": o["grad_norm"],
            "grad_norm_rel_diff": gn,
        }
    passed = all(a["logp"] <= tol and a["entropy"] <= tol for a in agreement.values())
    for mode, r in modes.items():
        if e is None or r["oom"] or e["oom"]:
            continue
        st, est, mb, emb = r["step"], e["step"], r.get("max_batch") or {}, e.get("max_batch") or {}
        q = ratios[mode] = {
            "peak": _ratio(st["peak_mb"], est["peak_mb"]),
            "peak_over_base": _ratio(st["peak_over_base_mb"], est["peak_over_base_mb"]),
            "tokens_per_s": _ratio(st["tokens_per_s"], est["tokens_per_s"]),
            "max_batch": _ratio(mb.get("max_batch"), emb.get("max_batch")),
            "max_batch_conservative": _ratio(mb.get("max_batch"), emb.get("first_oom")),
        }
        if mode != "eager":
            targets[mode] = {
                "peak_ratio": q["peak"],
                "peak_ok": None if q["peak"] is None else q["peak"] <= 0.6,
                "max_batch_ratio": q["max_batch"],
                "max_batch_ok": None if q["max_batch"] is None else q["max_batch"] >= 2,
                "max_batch_ratio_conservative": q["max_batch_conservative"],
            }
    return agreement, passed, ratios, targets


def _f(x, nd: int = 2) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def markdown(doc: dict) -> str:
    m, cfg, agree = doc["meta"], doc["meta"]["model_config"], doc["agreement"]
    where = m["gpu_name"] or f"CPU ({m['host_cpu_count']} cores; timings and memory meaningless)"
    lines = [
        "## Head memory: one PPO step (policy_eval + reference + update), fused-linear vs logits vs eager",
        "",
        f"{where}; {m['arch']} shapes (random init: vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, "
        f"{cfg['num_hidden_layers']} layers), weights {m['weights']}; B={m['batch']} x (P={m['prompt_len']} + "
        f"R={m['reply_len']}); grad checkpointing {'ON' if m['grad_checkpointing'] else 'OFF'}; freeze layers "
        f"{m['freeze_layers']}; AdamW state {'held' if m['adam_state'] else 'not held'}; reference = the policy "
        f"re-run; kernel path: {m['kernel_path']}; git {m['git_commit']}, torch {m['torch']}, triton {m['triton']}, "
        f"{m['date_utc']}.",
        "",
        "| mode | eval s | ref s | update s | step tok/s | peak MB | over base MB | peak / eager | max B | "
        "first OOM | maxB / eager | max abs dlogp vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in doc["modes"].items():
        if r["oom"]:
            lines.append(f"| {mode} | OOM at B={r['batch']} | | | | | | | | | | |")
            continue
        ph, st, mb, rt = r["phases"], r["step"], r.get("max_batch") or {}, doc["ratios"].get(mode, {})
        lines.append(
            f"| {mode} | {_f(ph['policy_eval']['median_s'], 3)} | {_f(ph['reference']['median_s'], 3)} | "
            f"{_f(ph['update']['median_s'], 3)} | {_f(st['tokens_per_s'], 0)} | {_f(st['peak_mb'], 0)} | "
            f"{_f(st['peak_over_base_mb'], 0)} | {_f(rt.get('peak'))} | {mb.get('max_batch', '-')} | "
            f"{mb.get('first_oom') or '-'} | {_f(rt.get('max_batch'))} | "
            f"{_f(agree.get(mode, {}).get('logp'), 6)} |"
        )
    lines += [
        "",
        f"base = memory allocated before the step ({_f(m.get('base_mb'), 0)} MB for the first mode: weights"
        " + rollout, no grads); peak = max_memory_allocated over the phases; tok/s = 3 B (P + R) / step s.",
        f"Agreement gate (log-probs and entropy vs eager, atol {m['tol']:g}): "
        f"**{'PASS' if doc['agreement_passed'] else 'FAIL'}**.",
        "",
    ]
    for mode, r in doc["modes"].items():
        if r.get("max_batch"):
            mb = r["max_batch"]
            lines.append(
                f"- max-batch search, {mode}: {mb['ended']}, {len(mb['probes'])} probes in "
                f"{sum(p['s'] for p in mb['probes']):.0f} s"
            )
    ok = lambda v: "n/a" if v is None else ("MET" if v else "NOT met")  # noqa: E731
    for mode, t in doc["targets"].items():
        over = doc["ratios"][mode]["peak_over_base"]
        lines.append(
            f"- {mode}: peak/eager {_f(t['peak_ratio'])} (target <= 0.6: {ok(t['peak_ok'])}; above base "
            f"{_f(over)}), "
            f"maxB/eager {_f(t['max_batch_ratio'])} (target >= 2: {ok(t['max_batch_ok'])}; conservative "
            f"maxB/eager-first-OOM {_f(t['max_batch_ratio_conservative'])})"
        )
    if not doc["targets"]:
        lines.append("- no ratios: eager was not run or did not fit at this batch")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    from fastrlhf.trainer.ppo import freeze_bottom

    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, cfg = build_model(args, device)
    n_frozen = freeze_bottom(model, args.freeze_layers)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    adam = [torch.zeros_like(p) for p in trainable for _ in range(2)] if args.adam_state else []  # exp_avg(_sq)
    vocab = cfg["vocab_size"]
    modes, outputs = {}, {}
    for mode in args.modes:
        print(f"[bench_head_memory] {mode}: B={args.batch}, {args.warmup} + {args.reps} steps", flush=True)
        modes[mode], outputs[mode] = measure_mode(model, mode, args, device, vocab)
    if cuda and args.search:
        for mode in args.modes:
            modes[mode]["max_batch"] = max_batch(model, mode, args, device, vocab, not modes[mode]["oom"])

    tol = TOL["cuda" if cuda else "cpu"]
    agreement, passed, ratios, targets = compare(modes, outputs, tol)
    meta = measure.environment(device)
    first = next((r for r in modes.values() if not r["oom"]), {})
    meta.update(
        command=" ".join(["benchmarks/bench_head_memory.py", *(sys.argv[1:] if argv is None else argv)]),
        kernel_path=bench_ppo_step.kernel_path(device),
        arch=args.arch,
        model_config=cfg,
        n_params=sum(p.numel() for p in model.parameters()),
        n_frozen_layers=n_frozen,
        n_trainable=sum(p.numel() for p in trainable),
        weights="fp32 master + bf16 autocast" if args.dtype == "fp32" and cuda else args.dtype,
        batch=args.batch,
        prompt_len=args.prompt_len,
        reply_len=args.reply_len,
        grad_checkpointing=args.grad_checkpointing,
        freeze_layers=args.freeze_layers,
        adam_state=args.adam_state,
        reference="the policy itself, run again (no second model resident)",
        generation="not measured",
        tol=tol,
        base_mb=first.get("step", {}).get("base_mb"),
        gpu_memory_total_mb=torch.cuda.get_device_properties(device).total_memory / MB if cuda else None,
        memory_note=None if cuda else "CPU: no allocator statistics; memory fields are None",
        process_max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        wall_s=time.perf_counter() - t_start,
    )
    del adam
    doc = {
        "meta": meta,
        "args": vars(args),
        "modes": modes,
        "ratios": ratios,
        "targets": targets,
        "agreement": agreement,
        "agreement_passed": passed,
    }
    (out / "head_memory.json").write_text(json.dumps(measure.json_safe(doc), indent=2, default=str))
    md = markdown(doc)
    (out / "head_memory.md").write_text(md)
    print(f"[bench_head_memory] wrote {', '.join(str(out / f) for f in FILES)}", flush=True)
    print(md, flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
