"""`fastrlhf pipeline`: the main job, top to bottom, on the embedded model and the shipped prompts.

    prompts --split by prompt--> train / val / test
    step 1  generate-pairs (all prompts) -> annotate (scripted rubric standing in for people) -> preferences
    step 2  train-rm on the train prompts' pairs, validated on val, tested on test (unseen prompts)
    report  report.md + metrics.json + PNGs in out_dir

Each step writes its files under out_dir; a rerun reuses finished candidates (the slowest step) and the
annotator resumes where it stopped. Step 3 (PPO with a quantized reference, and the policy evaluation)
joins this file when it lands.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from pathlib import Path

import torch

from .annotate import annotate, build_preferences, generate_pairs
from .config import PipelineConfig, RewardConfig
from .data import load_demo_prompts, load_pairs, load_prompts, prompt_key, split_by_prompt, write_jsonl
from .metrics import plot_training_curves
from .models import resolve_model_path
from .reward import resolve_device, train_reward_model

log = logging.getLogger("fastrlhf")


def run_pipeline(cfg: PipelineConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # prompts, split once by prompt: every later split follows it
    prompts = load_demo_prompts() if cfg.prompts == "demo" else load_prompts(cfg.prompts)
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    splits = dict(zip(("train", "val", "test"), split_by_prompt(prompts, cfg.split, seed=cfg.seed)))
    for name, part in splits.items():
        write_jsonl(out / "prompts" / f"{name}.jsonl", part)
    log.info("prompts: %s", {k: len(v) for k, v in splits.items()})

    t = time.perf_counter()
    model_path = resolve_model_path(cfg.model)  # converts and caches the embedded model on first use
    timings["model_setup_s"] = time.perf_counter() - t

    # step 1: sample, annotate, build preferences
    step1 = out / "step1"
    candidates = step1 / "candidates.jsonl"
    t = time.perf_counter()
    if candidates.exists():
        log.info("step 1: reusing %s (delete it to sample again)", candidates)
    else:
        generate_pairs(
            model_path, prompts, candidates, samples_per_prompt=cfg.samples_per_prompt, temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, seed=cfg.seed, device=str(device),
        )  # fmt: skip
    timings["generate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = annotate(candidates, step1 / "annotations.jsonl", rubric=cfg.rubric)
    n_prefs = build_preferences(candidates, step1 / "annotations.jsonl", step1 / "preferences.jsonl")
    timings["annotate_s"] = time.perf_counter() - t

    if n_prefs == 0:
        raise RuntimeError(f"step 1 gave no preference pairs: all {summary.total} candidate pairs were ties or skips")
    pairs = load_pairs(step1 / "preferences.jsonl")
    part_of = {prompt_key(p.prompt): name for name, part in splits.items() for p in part}
    pair_files = {}
    for name in splits:
        pair_files[name] = step1 / f"preferences_{name}.jsonl"
        part = [p for p in pairs if part_of[prompt_key(p.prompt)] == name]
        if not part:
            raise RuntimeError(
                f"step 1 gave no preference pairs for the {name} prompts ({n_prefs} pairs in all, "
                f"{summary.ties} ties dropped): use more prompts (--limit) or samples (--samples-per-prompt)"
            )
        write_jsonl(pair_files[name], part)

    # step 2: reward model
    t = time.perf_counter()
    rm_cfg = RewardConfig(
        pairs=str(pair_files["train"]), val_pairs=str(pair_files["val"]), test_pairs=str(pair_files["test"]),
        out_dir=str(out / "step2_reward"), model=model_path, epochs=cfg.rm_epochs, lr=cfg.rm_lr,
        batch_pairs=cfg.rm_batch_pairs, freeze_layers=cfg.rm_freeze_layers, max_length=cfg.max_length,
        seed=cfg.seed, device=cfg.device,
    )  # fmt: skip
    rm = train_reward_model(rm_cfg)
    timings["reward_model_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    # report
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_training_curves(out / "step2_reward" / "metrics.jsonl", plots / "reward_training.png")
    for name in ("roc.png", "rewards.png"):
        shutil.copy(out / "step2_reward" / "eval" / "test" / name, plots / f"reward_test_{name}")
    metrics = {
        "config": {k: v for k, v in vars(cfg).items()},
        "environment": _environment(device),
        "prompts": {k: len(v) for k, v in splits.items()},
        "annotation": {"candidate_pairs": summary.total, "chose_a": summary.chose_a, "chose_b": summary.chose_b,
                       "ties": summary.ties, "skips": summary.skips, "preference_pairs": n_prefs,
                       "annotator": f"rubric:{cfg.rubric}" if cfg.rubric else "human"},  # fmt: skip
        "preference_pairs": {k: len(load_pairs(v)) for k, v in pair_files.items()},
        "reward_model": rm,
        "timings": timings,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(_report(metrics))
    log.info("pipeline finished in %.0f s: %s", timings["total_s"], out / "report.md")
    return metrics


def _environment(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip


def _row(name: str, m: dict) -> str:
    return (f"| {name} | {m['pairs']} | {m['accuracy']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} "
            f"| {m['auc_roc']:.3f} | {m['ece']:.3f} | {m['brier']:.3f} |")  # fmt: skip


def _report(m: dict) -> str:
    rm, ann, tm = m["reward_model"], m["annotation"], m["timings"]
    lines = [
        "# fastrlhf pipeline report",
        "",
        f"{m['environment']['date']} on {m['environment']['device']}, torch {m['environment']['torch']}; "
        f"model `{m['config']['model']}`, prompts `{m['config']['prompts']}`.",
        "",
        f"The annotator is **{ann['annotator']}**: a scripted rubric standing in for people (correct beats wrong,"
        " concise beats rambling, garbage loses). It is also the independent judge used to evaluate policies.",
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
    ]  # fmt: skip
    for split in ("val", "test"):
        if split in rm:
            lines.append(_row(split, rm[split]))
    if "test" in rm:
        lines += ["", "Test accuracy by the model's reward gap |r_c - r_r| (quartiles):", "",
                  "| gap range | pairs | accuracy |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {b['low']:.2f} - {b['high']:.2f} | {b['pairs']} | {b['accuracy']:.3f} |" for b in rm["test"]["accuracy_by_gap"]]
    lines += [
        "",
        "![training](plots/reward_training.png) ![ROC](plots/reward_test_roc.png) ![rewards](plots/reward_test_rewards.png)",
        "",
        "## Time",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k.removesuffix('_s')} | {v:.0f} |" for k, v in tm.items()],
        "",
    ]
    return "\n".join(lines)
