"""`fastrlhf pipeline`: the main job, top to bottom, on the embedded model and the shipped prompts.

    prompts --split by prompt--> train / val / test
    step 1  generate-pairs (all prompts) -> annotate (scripted rubric standing in for people) -> preferences
    step 2  train-rm on the train prompts' pairs, validated on val, tested on test (unseen prompts)
    step 3  PPO (or critic-free GRPO / RLOO: --algo) on the train prompts against the reward model (or the
            rubric's verifiable check: --reward), KL to an int8 (bitsandbytes) reference
    eval    the trained policy vs the reference policy on the test prompts, judged by the rubric (the
            independent judge), plus reward-model scores and KL to the reference
    report  report.md + metrics.json + PNGs in out_dir

Each step writes its files under out_dir; a rerun reuses finished candidates (the slowest step) and the
annotator resumes where it stopped.

Under `torchrun --nproc-per-node N`: steps 2 and 3 run data-parallel (`parallel`: DDP or FSDP2, as `train-rm`
and `ppo` do); step 1, the evaluation and the report run on rank 0 while the others wait at a barrier (one
node: every rank reads the files rank 0 wrote). A rank that fails ends the job (torchrun stops the others).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from ..kernels._common import nvtx_range
from .annotate import annotate, build_preferences, generate_pairs
from .config import PipelineConfig, PPOConfig, RewardConfig
from .data import load_demo_prompts, load_pairs, load_prompts, prompt_key, split_by_prompt, write_jsonl
from .dist import barrier, init_world
from .errors import UserError
from .evaluate import evaluate_policy
from .metrics import plot_ppo_curves, plot_training_curves
from .models import resolve_model_path
from .ppo import train_ppo
from .reward import train_reward_model

log = logging.getLogger("fastrlhf")


def run_pipeline(cfg: PipelineConfig) -> dict | None:
    """The whole job; the metrics (also in out_dir/metrics.json), or None on ranks other than 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.rubric:  # before joining torchrun's job
        raise SystemExit(
            "`fastrlhf pipeline` with people annotating (--rubric '') runs in one process: under "
            "torchrun run `generate-pairs` and `annotate` first, then `train-rm` and `ppo`."
        )
    world = init_world(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = world.device
    step1 = out / "step1"
    pair_files = {name: step1 / f"preferences_{name}.jsonl" for name in ("train", "val", "test")}
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    if world.main:
        splits, summary, n_prefs, timings = _step1(cfg, out, step1, pair_files, str(device))
    barrier(world)  # the others start step 2 once rank 0 has written step 1's files
    model_path = resolve_model_path(cfg.model)  # rank 0 converted and cached it in _step1

    # step 2: reward model
    rm_cfg = RewardConfig(
        pairs=str(pair_files["train"]),
        val_pairs=str(pair_files["val"]),
        test_pairs=str(pair_files["test"]),
        out_dir=str(out / "step2_reward"),
        model=model_path,
        epochs=cfg.rm_epochs,
        lr=cfg.rm_lr,
        batch_pairs=cfg.rm_batch_pairs,
        freeze_layers=cfg.rm_freeze_layers,
        max_length=cfg.max_length,
        kernels=cfg.kernels,
        seed=cfg.seed,
        device=cfg.device,
        parallel=cfg.parallel,
        fsdp_param_dtype=cfg.fsdp_param_dtype,
    )
    with _timed(timings, "reward_model"):
        rm = train_reward_model(rm_cfg)
        barrier(world)  # rank 0 normalises and saves the reward model after the others have returned
    reward_model = str(out / "step2_reward" / "model")

    # step 3: PPO, then the honest evaluation on the held-out test prompts
    ppo, evaluation = None, None
    rl_seed = cfg.seed if cfg.rl_seed is None else cfg.rl_seed  # step 3 and the evaluation's sampling
    if cfg.ppo:
        ppo_cfg = PPOConfig(
            reward_model=reward_model,
            out_dir=str(out / "step3_ppo"),
            policy=model_path,
            prompts=str(out / "prompts" / "train.jsonl"),
            ref_quant=cfg.ref_quant,
            critic=cfg.critic,
            freeze_layers=cfg.ppo_freeze_layers,
            steps=cfg.ppo_steps,
            batch_prompts=cfg.ppo_batch_prompts
            if cfg.algo == "ppo"
            else max(1, cfg.ppo_batch_prompts // cfg.group_size),
            samples_per_prompt=1 if cfg.algo == "ppo" else cfg.group_size,
            advantage="gae" if cfg.algo == "ppo" else cfg.algo,
            kl_in="reward" if cfg.algo == "ppo" else "loss",
            reward=cfg.reward,
            minibatch_size=cfg.ppo_minibatch_size,
            ppo_epochs=cfg.ppo_epochs,
            lr=cfg.ppo_lr,
            critic_lr=cfg.ppo_critic_lr,
            lr_schedule=cfg.ppo_lr_schedule,
            clip_range_value=cfg.ppo_clip_range_value,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            kl_coef=cfg.kl_coef,
            kernels=cfg.kernels,
            fused_linear=cfg.fused_linear,
            seed=rl_seed,
            device=cfg.device,
            parallel=cfg.parallel,
            fsdp_param_dtype=cfg.fsdp_param_dtype,
        )
        with _timed(timings, "ppo"):
            ppo = train_ppo(ppo_cfg)
    if not world.main:  # rank 0 alone evaluates and reports
        return None
    if ppo is not None:
        with _timed(timings, "evaluate"):
            evaluation = evaluate_policy(
                ppo["policy"],
                model_path,
                reward_model,
                splits["test"],
                rubric=cfg.rubric,
                samples_per_prompt=cfg.eval_samples_per_prompt,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.gen_batch_size,
                seed=rl_seed + 1,
                device=str(device),
                use_kernels=cfg.kernels,
                out_dir=out / "eval",
            )
    timings["total_s"] = time.perf_counter() - t_all

    # report
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_training_curves(out / "step2_reward" / "metrics.jsonl", plots / "reward_training.png")
    for name in ("roc.png", "rewards.png"):
        shutil.copy(out / "step2_reward" / "eval" / "test" / name, plots / f"reward_test_{name}")
    if ppo is not None:
        plot_ppo_curves(out / "step3_ppo" / "metrics.jsonl", plots / "ppo_training.png")
        shutil.copy(out / "eval" / "eval_scores.png", plots / "eval_scores.png")
    metrics = {
        "config": {k: v for k, v in vars(cfg).items()},
        "environment": _environment(device),
        "prompts": {k: len(v) for k, v in splits.items()},
        "annotation": {
            "candidate_pairs": summary.total,
            "chose_a": summary.chose_a,
            "chose_b": summary.chose_b,
            "ties": summary.ties,
            "skips": summary.skips,
            "preference_pairs": n_prefs,
            "annotator": f"rubric:{cfg.rubric}" if cfg.rubric else "human",
        },
        "preference_pairs": {k: len(load_pairs(v)) for k, v in pair_files.items()},
        "reward_model": rm,
        "ppo": _ppo_summary(out / "step3_ppo" / "metrics.jsonl") if ppo is not None else None,
        "evaluation": evaluation,
        "kl_bound": cfg.kl_bound,
        "timings": timings,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(_report(metrics))
    log.info("pipeline finished in %.0f s: %s", timings["total_s"], out / "report.md")
    return metrics


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str):
    """timings[f"{name}_s"] = the block's wall time; the block runs inside the NVTX range f"pipeline/{name}"."""
    t = time.perf_counter()
    with nvtx_range(f"pipeline/{name}"):
        yield
    timings[f"{name}_s"] = time.perf_counter() - t


def _step1(cfg: PipelineConfig, out: Path, step1: Path, pair_files: dict[str, Path], device: str) -> tuple:
    """Split the prompts, sample candidate pairs, annotate them, write each split's preference pairs to
    `pair_files` -> (splits, annotation summary, preference pairs, timings)."""
    timings: dict[str, float] = {}
    # prompts, split once by prompt: every later split follows it
    prompts = load_demo_prompts() if cfg.prompts == "demo" else load_prompts(cfg.prompts)
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    splits = dict(zip(("train", "val", "test"), split_by_prompt(prompts, cfg.split, seed=cfg.seed)))
    for name, part in splits.items():
        write_jsonl(out / "prompts" / f"{name}.jsonl", part)
    log.info("prompts: %s", {k: len(v) for k, v in splits.items()})

    with _timed(timings, "model_setup"):
        model_path = resolve_model_path(cfg.model)  # converts and caches the embedded model on first use

    candidates = step1 / "candidates.jsonl"
    with _timed(timings, "generate"):
        if candidates.exists():
            log.info("step 1: reusing %s (delete it to sample again)", candidates)
        else:
            generate_pairs(
                model_path,
                prompts,
                candidates,
                samples_per_prompt=cfg.samples_per_prompt,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.gen_batch_size,
                seed=cfg.seed,
                device=device,
            )
    with _timed(timings, "annotate"):
        summary = annotate(candidates, step1 / "annotations.jsonl", rubric=cfg.rubric)
        n_prefs = build_preferences(candidates, step1 / "annotations.jsonl", step1 / "preferences.jsonl")

    if n_prefs == 0:
        raise UserError(f"step 1 gave no preference pairs: all {summary.total} candidate pairs were ties or skips")
    pairs = load_pairs(step1 / "preferences.jsonl")
    part_of = {prompt_key(p.prompt): name for name, part in splits.items() for p in part}
    for name in splits:
        part = [p for p in pairs if part_of[prompt_key(p.prompt)] == name]
        if not part:
            raise RuntimeError(
                f"step 1 gave no preference pairs for the {name} prompts ({n_prefs} pairs in all, "
                f"{summary.ties} ties dropped): use more prompts (--limit) or samples (--samples-per-prompt)"
            )
        write_jsonl(pair_files[name], part)
    return splits, summary, n_prefs, timings


def _ppo_summary(log_path: Path) -> dict:
    """First and last PPO step, the step-0 KL floor of the quantized reference, mean time per phase."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    phases = [k.removeprefix("perf/tokens_per_s/") for k in rows[0] if k.startswith("perf/tokens_per_s/")]  # loop order
    keep = (
        "objective/score",
        "objective/kl",
        "objective/kl_k3",
        "policy/entropy",
        "policy/response_length",
        "policy/eos_rate",
        "policy/approx_kl",
        "policy/clipfrac",
        "value/explained_variance",
        "policy/logratio_dev_first",
    )
    return {
        "steps": len(rows),
        "first": {k: rows[0][k] for k in keep if k in rows[0]},  # no value/ keys without a critic
        "last": {k: rows[-1][k] for k in keep if k in rows[-1]},
        "kl_floor": {k: rows[0].get(f"objective/kl_floor_{k}") for k in ("k1", "k3", "full")},
        "phases": {
            p: {
                "seconds_per_step": sum(r[f"perf/time/{p}_s"] for r in rows) / len(rows),
                "tokens_per_s": sum(r[f"perf/tokens_per_s/{p}"] for r in rows) / len(rows),
                "peak_mem_mb": max(r[f"perf/peak_mem_mb/{p}"] for r in rows),
            }
            for p in phases
        },
    }


def _environment(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _row(name: str, m: dict) -> str:
    return (
        f"| {name} | {m['pairs']} | {m['accuracy']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} "
        f"| {m['auc_roc']:.3f} | {m['ece']:.3f} | {m['brier']:.3f} |"
    )


def _report(m: dict) -> str:
    rm, ann, tm = m["reward_model"], m["annotation"], m["timings"]
    lines = [
        "# fastrlhf pipeline report",
        "",
        f"{m['environment']['date']} on {m['environment']['device']}, torch {m['environment']['torch']}; "
        f"model `{m['config']['model']}`, prompts `{m['config']['prompts']}`.",
        "",
        f"The annotator is **{ann['annotator']}**: a scripted rubric standing in for people (correct beats wrong,"
        " concise beats rambling, a reply that trails off unfinished counts as rambling, garbage loses). It is also"
        " the independent judge used to evaluate policies.",
        "",
        "## Step 1: preference data",
        "",
        f"Prompts split by prompt: {m['prompts']['train']} train / {m['prompts']['val']} val / {m['prompts']['test']} test. "
        f"{ann['candidate_pairs']} candidate pairs sampled at temperature {m['config']['temperature']}; the rubric "
        f"preferred A {ann['chose_a']}x and B {ann['chose_b']}x, tied {ann['ties']}x (dropped). "
        f"Preference pairs: {m['preference_pairs']['train']} train / {m['preference_pairs']['val']} val / "
        f"{m['preference_pairs']['test']} test.",
        "",
        "## Step 2: reward model",
        "",
        f"{rm['step']} steps; raw reward mean {rm['reward_mean_raw']:.3f}, std {rm['reward_std_raw']:.3f} on the "
        "reference policy's responses, normalised to 0 / 1 (gain and bias saved in the model config).",
        "",
        "| split | pairs | accuracy | precision | recall | F1 | AUC-ROC | ECE | Brier |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split in ("val", "test"):
        if split in rm:
            lines.append(_row(split, rm[split]))
    if "test" in rm:
        lines += [
            "",
            "Test accuracy by the model's reward gap |r_c - r_r| (quartiles):",
            "",
            "| gap range | pairs | accuracy |",
            "|---|---|---|",
        ]
        lines += [
            f"| {b['low']:.2f} - {b['high']:.2f} | {b['pairs']} | {b['accuracy']:.3f} |"
            for b in rm["test"]["accuracy_by_gap"]
        ]
    lines += [
        "",
        "![training](plots/reward_training.png) ![ROC](plots/reward_test_roc.png) ![rewards](plots/reward_test_rewards.png)",
        "",
    ]
    if m.get("evaluation"):
        lines += _ppo_report(m)
    lines += [
        "## Time",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k.removesuffix('_s')} | {v:.0f} |" for k, v in tm.items()],
        "",
    ]
    return "\n".join(lines)


def _ppo_report(m: dict) -> list[str]:
    c, p, e = m["config"], m["ppo"], m["evaluation"]
    lo, hi = e["win_rate_ci95"]
    floor = p["kl_floor"]
    kl_ok = e["kl_per_token"] <= m["kl_bound"]
    rows = [
        ("rubric score", "rubric_score", ".3f"),
        ("correct", "correct_rate", ".3f"),
        ("garbage", "garbage_rate", ".3f"),
        ("reward-model score", "rm_score", ".3f"),
        ("reply length, tokens", "reply_tokens", ".1f"),
        ("reply length, words", "reply_words", ".1f"),
        ("ends with EOS", "eos_rate", ".3f"),
    ]

    algo = c.get("algo", "ppo").upper()
    if algo == "PPO":
        clip = c.get("ppo_clip_range_value", 0.2)
        clip = "none" if clip is None else clip
        critic = f"critic: {c['critic']}, lr {c.get('ppo_critic_lr', 5e-5)}, value clip {clip}"
        setup, kl = f"{c['ppo_batch_prompts']} train prompts, {critic}", "k1 per token in the reward"
    else:
        n = max(1, c["ppo_batch_prompts"] // c["group_size"])
        setup, kl = f"{n} train prompts x {c['group_size']} replies, no critic", "k3 per token in the loss"

    seeded = "" if c.get("rl_seed") is None else f"RL seed {c['rl_seed']}, "  # step 3 seeded apart from steps 1-2

    def cell(key: str, fmt: str) -> str:
        return "-" if key not in e or e[key] is None else format(e[key], fmt)

    return [
        f"## Step 3: {algo}",
        "",
        f"{p['steps']} {algo} steps of {setup}, {c['ppo_epochs']} epochs, minibatch {c['ppo_minibatch_size']}, lr "
        f"{c['ppo_lr']} ({c.get('ppo_lr_schedule', 'linear')}), KL coefficient {c['kl_coef']} ({kl}), "
        f"reward: {c.get('reward', 'rm')}, {seeded}reference: "
        f"**{c['ref_quant']}** (bitsandbytes). Step-0 KL floor of the quantized "
        f"reference, with the policy still equal to the original model: {floor['full']:.2e} nats/token exact "
        f"({floor['k3']:.2e} k3); step-0 sanity max |log ratio| on the first minibatch "
        f"{p['first']['policy/logratio_dev_first']:.1e}.",
        "",
        "| | score | KL/token | entropy | reply tokens | EOS rate |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {r['objective/score']:.3f} | {r['objective/kl']:.4f} | {r['policy/entropy']:.3f} | "
            f"{r['policy/response_length']:.1f} | {r['policy/eos_rate']:.2f} |"
            for name, r in (("first step", p["first"]), ("last step", p["last"]))
        ],
        "",
        "Per phase (mean per step; peak memory: CUDA allocator peak, or the process's RSS high-water mark on CPU):",
        "",
        "| phase | s/step | tokens/s | peak MB |",
        "|---|---|---|---|",
        *[
            f"| {k} | {v['seconds_per_step']:.1f} | {v['tokens_per_s']:.0f} | {v['peak_mem_mb']:.0f} |"
            for k, v in p["phases"].items()
        ],
        "",
        "![ppo](plots/ppo_training.png)",
        "",
        "## Evaluation on held-out prompts (judged by the rubric, not the reward model)",
        "",
        f"{algo} policy vs the reference policy (the original, unquantized model) on the {m['prompts']['test']} test "
        f"prompts, {c['eval_samples_per_prompt']} sampled replies each at temperature {c['temperature']}, each "
        f"model with its own random stream. **Win rate {e['win_rate']:.3f}** (ties count half; 95% bootstrap interval "
        f"over prompts {lo:.3f} - {hi:.3f}): {e['wins']} wins, {e['ties']} ties, {e['losses']} losses.",
        "",
        f"KL(policy || reference) on the policy's replies: **{e['kl_per_token']:.4f} nats/token** exact "
        f"({e['kl_per_reply']:.3f} per reply); bound {m['kl_bound']} nats/token: "
        f"{'within' if kl_ok else '**exceeded**'}.",
        "",
        f"| | {algo} policy | reference |",
        "|---|---|---|",
        *[f"| {name} | {cell('policy_' + key, fmt)} | {cell('reference_' + key, fmt)} |" for name, key, fmt in rows],
        "",
        "Before / after, side by side (held-out prompts; more in [eval/examples.md](eval/examples.md), every pair"
        " in eval/samples.jsonl):",
        "",
        f"| prompt | expected | reference (before) | {algo} policy (after) | rubric prefers |",
        "|---|---|---|---|---|",
        *[
            f"| {_cell(x['prompt'])} | {_cell(x['answer'] or '')} | {_cell(x['reference_reply'])} | "
            f"{_cell(x['policy_reply'])} | {x['verdict']} |"
            for x in e["examples"]
        ],
        "",
        "![eval](plots/eval_scores.png)",
        "",
    ]


def _cell(text: str) -> str:
    """One markdown table cell: a single line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"
