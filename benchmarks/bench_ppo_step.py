"""PPO step benchmark: the same PPO run twice, fused kernels ON (`kernels=True`) and the eager `*_ref`
twins OFF (`kernels=False`), same seed, same models, same config; tokens/s and peak memory per phase,
the kernels/eager speed ratio per phase, and whether the two training curves agree.

    python benchmarks/bench_ppo_step.py --out out/ppo_step                       # embedded SmolLM2-135M
    python benchmarks/bench_ppo_step.py --model cfg135m --random-init --ref-quant none --out "$OUT"

What is measured. `fastrlhf.trainer.ppo.train_ppo` times its own phases (generation, scoring,
policy_eval, reference, rewards [KL + GAE], update) and writes them per step to metrics.jsonl
(`perf/time/<phase>_s`, `perf/tokens_per_s/<phase>`, `perf/peak_mem_mb/<phase>`); this script runs it once
per mode and summarises:
- s/step: mean seconds per step of each phase over the timed steps. Step 1 is left out when
  --steps > 1 (warm-up: Triton compilation / autotuning, cuBLAS and allocator warm-up); the report says
  which steps were timed.
- tokens/s: total tokens of the timed steps / their total seconds (generation counts reply tokens;
  scoring / policy_eval / reference count prompt + reply tokens; update counts them once per PPO epoch).
- peak MB: the largest per-phase peak over the timed steps. On CUDA that is `max_memory_allocated`
  during the phase (reset at its start; the models resident on the device are included). On CPU it is
  the process's RSS high-water mark (`ru_maxrss`): not per phase, and since both modes run in this one
  process the second mode inherits the first's high-water mark; CPU memory is not comparable.
- speed ratio: kernels tokens/s / eager tokens/s per phase (> 1: the kernels are faster). The modes run
  one after the other in this process (kernels first; --eager-first swaps them), so a busy machine's
  load changes between them: on CPU, where both modes run the same code, the ratio shows that noise.

Where the kernels run. CUDA: compiled Triton. CPU without TRITON_INTERPRET=1: every kernel dispatches to
its `*_ref` twin, so both modes run the SAME eager code and CPU numbers measure the harness only (and
the curves agree bit for bit). CPU with TRITON_INTERPRET=1 (set before triton is imported, as
tests/conftest.py does): the kernel mode runs Triton's interpreter, fine for a correctness smoke run,
meaningless for speed. The kernels matter on CUDA only; the JSON records which path ran (`kernel_path`).

Curve check. For each step, the score, KL, entropy, policy loss and value loss of the two runs are compared
(max abs diff, max rel diff); a value passes when |k - e| <= atol + rtol * |e|.
- CPU (fp32): every step is checked, rtol 1e-3 / atol 1e-4. Generation does not touch the kernels, so the
  step-1 rollouts are identical; the kernels agree with the twins to fp32 rounding, the weights after
  each update differ by rounding only, and the later rollouts stay the same.
- CUDA (bf16 autocast): step 1 is checked (rtol 1e-2 / atol 1e-3: same rollout, bf16 logits, fp32
  reductions in both paths; the per-minibatch losses of step 1 after its first optimizer step see
  weights that differ by rounding). Later steps are reported as information, not checked: sampling is
  chaotic, a bf16 rounding difference in the updated weights flips a sampled token, and from there the
  rollouts, and so every metric, legitimately diverge. `same_rollout` (equal mean reply length and
  score within tolerance) says per step whether the rollouts still looked identical.
--check-steps / --rtol / --atol override the defaults. Exit status 1 when a checked value fails.

Models. --model is a local causal-LM folder or "default" (the embedded SmolLM2-135M-Instruct).
--random-init builds a randomly initialised model (seeded) from the folder's config.json + tokenizer
files only, so a GPU host without the weights can still measure a real configuration: copy config.json,
generation_config.json and the tokenizer files (tokenizer.json, tokenizer_config.json,
chat_template.jinja, special_tokens_map.json...: ~3.5 MB for SmolLM2) into a folder, carry it, and point
--model at it. A random model rarely samples EOS, so its replies run to --max-new-tokens (fixed shapes).
The reward model is --reward-model, or, when omitted, built from the policy folder by
`load_reward_model(path, seed=seed + 1)` (the trunk of the policy, a new random scalar head) and saved
into the work folder. The critic is initialised from it (PPOConfig's default `--critic separate`).

Output, flat in --out (an offline GPU host returns at most 8 files, so nothing big goes there):
    ppo_step.json   environment (benchmarks/measure.py), config, per-mode phase summary, per-step
                    timings, speed ratios, the curve comparison and its verdict
    ppo_step.md     the markdown table, also printed last
    metrics_kernels.jsonl  metrics_eager.jsonl   the two runs' raw metrics.jsonl
The runs themselves (checkpoints, the saved final policy) and any built model go into a temporary work
folder, deleted at the end unless --keep-work (a folder given as --work-dir is kept).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402

PHASES = ("generation", "scoring", "policy_eval", "reference", "rewards", "update")
MODES = ("kernels", "eager")
CHECKED = ("objective/score", "objective/kl", "policy/entropy", "policy/loss", "value/loss")
INFO = ("objective/kl_k3", "policy/approx_kl", "policy/clipfrac", "policy/response_length")  # reported, never gated
TOL = {"cpu": (1e-3, 1e-4), "cuda": (1e-2, 1e-3)}  # (rtol, atol)
FILES = ("ppo_step.json", "ppo_step.md", "metrics_kernels.jsonl", "metrics_eager.jsonl")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse rather than tyro: an offline GPU host may lack tyro (see scripts/gpu/gpu_check.sh)."""
    p = argparse.ArgumentParser(
        prog="benchmarks/bench_ppo_step.py",
        description="Time PPO steps with the fused kernels and with their eager *_ref twins; compare the curves.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="default",
        help='policy (and reference) folder, or "default" for the embedded SmolLM2-135M-Instruct',
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="build a seeded random model from the folder's config.json + tokenizer files (no weights)",
    )
    p.add_argument(
        "--reward-model", default=None, help="reward model folder (default: the policy's trunk with a new random head)"
    )
    p.add_argument("--out", default="out/ppo_step", help="results folder (" + ", ".join(FILES) + ")")
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="PPO steps per mode; step 1 is left out of the timing summary when steps > 1 (warm-up)",
    )
    p.add_argument("--batch-prompts", type=int, default=32, help="prompts per rollout")
    p.add_argument("--minibatch-size", type=int, default=16, help="rows per optimizer step")
    p.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout")
    p.add_argument("--max-new-tokens", type=int, default=24, help="longest reply")
    p.add_argument(
        "--ref-quant",
        choices=("none", "int8", "nf4"),
        default="none",
        help='reference precision ("none" needs no bitsandbytes)',
    )
    p.add_argument(
        "--freeze-layers",
        type=int,
        default=-1,
        help="frozen bottom layers of policy and critic (-1: all but the top 4; 0: full fine-tune)",
    )
    p.add_argument("--critic", choices=("separate", "value-head"), default="separate", help="PPO critic")
    p.add_argument(
        "--kl-estimator",
        choices=("k1", "k3", "full"),
        default="k1",
        help='KL in the reward ("full" adds the full-vocabulary KL kernel to every step)',
    )
    p.add_argument("--prompts", default="demo", help='prompt dataset, or "demo"')
    p.add_argument("--device", default="auto", help='"auto" (CUDA if available), "cuda" or "cpu"')
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (and of --random-init and the reward head)")
    p.add_argument(
        "--check-steps",
        choices=("auto", "all", "first"),
        default="auto",
        help="steps whose metrics must agree: auto = all on CPU, the first on CUDA",
    )
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: 1e-3 CPU, 1e-2 CUDA)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: 1e-4 CPU, 1e-3 CUDA)")
    p.add_argument(
        "--work-dir",
        default=None,
        help="where built models and the two runs go (default: a temporary folder, deleted at the end)",
    )
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="both modes sample with the decode step as CUDA graphs (PPOConfig.cuda_graphs; ignored off CUDA)",
    )
    p.add_argument(
        "--eager-first",
        action="store_true",
        help="run the eager mode first (default: kernels first), to see whether the order biases the times",
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ models
def random_init_model(src: str | Path, dest: Path, seed: int) -> str:
    """A seeded random causal LM from `src`'s config.json + tokenizer files, saved (fp32) into `dest`.
    Every non-weight file of `src` is copied (tokenizer, chat template, generation config); weight files
    and shard indexes are not read."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    src = Path(src)
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copy2(f, dest / f.name)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src, local_files_only=True)
    model.save_pretrained(dest)
    return str(dest)


def build_reward_model(policy_path: str, dest: Path, seed: int) -> str:
    """The policy's trunk with a new seeded random scalar head, saved with the tokenizer into `dest`."""
    from fastrlhf.trainer.models import load_reward_model, load_tokenizer

    tokenizer = load_tokenizer(policy_path)
    load_reward_model(policy_path, seed=seed, tokenizer=tokenizer).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return str(dest)


def kernel_path(device: torch.device) -> str:
    """Which code `kernels=True` actually runs on `device` (see the module docstring)."""
    from fastrlhf.kernels import use_triton

    if device.type == "cuda":
        return "triton (compiled)"
    if use_triton(torch.empty(0, device=device)):
        return "triton interpreter (TRITON_INTERPRET=1: correctness only, no speed meaning)"
    return "eager *_ref (kernels dispatch to their twins on CPU: both modes run the same code)"


# ------------------------------------------------------------------------------------------------ summary
def timed_steps(n_steps: int) -> list[int]:
    """1-based steps that enter the timing summary: all but the first when there is more than one."""
    return list(range(2, n_steps + 1)) if n_steps > 1 else [1]


def summarise(records: list[dict], steps: list[int]) -> dict[str, dict]:
    """Per phase over `steps`: mean s/step, tokens/s (total tokens / total seconds), peak MB (max)."""
    rows = [r for r in records if r["step"] in steps]
    out: dict[str, dict] = {}
    for ph in PHASES:
        secs = [r[f"perf/time/{ph}_s"] for r in rows]
        tokens = [r[f"perf/tokens_per_s/{ph}"] * r[f"perf/time/{ph}_s"] for r in rows]
        out[ph] = {
            "s_per_step": sum(secs) / len(secs),
            "tokens_per_step": sum(tokens) / len(tokens),
            "tokens_per_s": sum(tokens) / max(sum(secs), 1e-12),
            "peak_mem_mb": max(r[f"perf/peak_mem_mb/{ph}"] for r in rows),
        }
    total = sum(out[ph]["s_per_step"] for ph in PHASES)
    out["total"] = {
        "s_per_step": total,
        "tokens_per_step": None,
        "tokens_per_s": None,
        "peak_mem_mb": max(out[ph]["peak_mem_mb"] for ph in PHASES),
    }
    return out


def speed_ratios(summary: dict[str, dict]) -> dict[str, float | None]:
    """kernels / eager tokens/s per phase (the total: eager s/step / kernels s/step)."""
    k, e = summary["kernels"], summary["eager"]
    ratios: dict[str, float | None] = {}
    for ph in PHASES:
        ratios[ph] = k[ph]["tokens_per_s"] / e[ph]["tokens_per_s"] if e[ph]["tokens_per_s"] else None
    ratios["total"] = e["total"]["s_per_step"] / k["total"]["s_per_step"] if k["total"]["s_per_step"] else None
    return ratios


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol + rtol * abs(b)


def compare_curves(runs: dict[str, list[dict]], checked_steps: list[int], rtol: float, atol: float) -> dict:
    """Step-by-step comparison of the two runs' metrics; `passed` is False when a CHECKED metric of a
    checked step is out of tolerance (or a step is missing from either run)."""
    k = {r["step"]: r for r in runs["kernels"]}
    e = {r["step"]: r for r in runs["eager"]}
    steps = sorted(set(k) | set(e))
    missing = [s for s in steps if s not in k or s not in e]
    metrics: dict[str, dict] = {}
    failures: list[str] = [f"step {s} missing from one run" for s in missing]
    for name in CHECKED + INFO:
        per_step = []
        for s in steps:
            if s in missing or name not in k[s] or name not in e[s]:
                continue
            a, b = float(k[s][name]), float(e[s][name])
            diff = abs(a - b)
            rel = diff / abs(b) if b != 0 else (0.0 if diff == 0 else math.inf)
            gated = name in CHECKED and s in checked_steps
            ok = _close(a, b, rtol, atol)
            if gated and not ok:
                failures.append(f"step {s} {name}: kernels {a:.6g} vs eager {b:.6g} (abs {diff:.3g}, rel {rel:.3g})")
            per_step.append(
                {
                    "step": s,
                    "kernels": a,
                    "eager": b,
                    "abs_diff": diff,
                    "rel_diff": rel,
                    "within_tol": ok,
                    "checked": gated,
                }
            )
        chk = [p for p in per_step if p["checked"]]
        metrics[name] = {
            "checked": name in CHECKED,
            "max_abs_diff": max((p["abs_diff"] for p in per_step), default=None),
            "max_rel_diff": max((p["rel_diff"] for p in per_step), default=None),
            "max_abs_diff_checked": max((p["abs_diff"] for p in chk), default=None),
            "max_rel_diff_checked": max((p["rel_diff"] for p in chk), default=None),
            "per_step": per_step,
        }
    same_rollout = {
        s: k[s]["policy/response_length"] == e[s]["policy/response_length"]
        and _close(k[s]["objective/score"], e[s]["objective/score"], rtol, atol)
        for s in steps
        if s not in missing
    }
    return {
        "rtol": rtol,
        "atol": atol,
        "rule": "|kernels - eager| <= atol + rtol * |eager|",
        "checked_metrics": list(CHECKED),
        "info_metrics": list(INFO),
        "checked_steps": checked_steps,
        "same_rollout": same_rollout,
        "metrics": metrics,
        "failures": failures,
        "passed": not failures,
    }


# ------------------------------------------------------------------------------------------------ report
def _f(x: float | None, nd: int = 2) -> str:
    if x is None:
        return "-"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 10**-nd):
        return f"{x:.{nd}e}"
    return f"{x:.{nd}f}"


def markdown(doc: dict) -> str:
    meta, summ, ratio, curves = doc["meta"], doc["phases"], doc["speed_ratio"], doc["curves"]
    where = meta["gpu_name"] or f"CPU ({meta['host_cpu_count']} cores)"
    lines = [
        "## PPO step: fused kernels vs eager `*_ref` twins",
        "",
        f"{where}, {meta['device']}, kernel path: {meta['kernel_path']}; model {meta['model_label']}; "
        f"run order {' then '.join(meta['order'])}; {meta['steps']} steps, timed steps {meta['timed_steps']}"
        + (" (step 1 = warm-up, left out)" if meta["steps"] > 1 else " (only one step: includes warm-up)")
        + f"; batch {meta['config']['batch_prompts']} prompts, minibatch {meta['config']['minibatch_size']}, "
        f"{meta['config']['ppo_epochs']} PPO epochs, max {meta['config']['max_new_tokens']} new tokens, "
        f"ref {meta['config']['ref_quant']}, freeze {meta['config']['freeze_layers']}; "
        f"git {meta['git_commit']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date_utc']}.",
        "",
        "| phase | kernels s/step | eager s/step | kernels tok/s | eager tok/s | speed ratio | "
        "kernels peak MB | eager peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ph in (*PHASES, "total"):
        k, e = summ["kernels"][ph], summ["eager"][ph]
        lines.append(
            f"| {ph} | {_f(k['s_per_step'], 3)} | {_f(e['s_per_step'], 3)} | {_f(k['tokens_per_s'], 0)} | "
            f"{_f(e['tokens_per_s'], 0)} | {_f(ratio[ph], 2)}x | {_f(k['peak_mem_mb'], 0)} | {_f(e['peak_mem_mb'], 0)} |"
        )
    mem_note = (
        "peak MB = max_memory_allocated per phase"
        if meta["device"].startswith("cuda")
        else f"peak MB = process RSS high-water mark (CPU: not per phase; {meta['order'][1]} runs second and "
        "inherits it)"
    )
    lines += [
        "",
        f"speed ratio = kernels tok/s / eager tok/s (total: eager s/step / kernels s/step); {mem_note}.",
        "",
        f"### Curves (checked steps {curves['checked_steps']}, rtol {curves['rtol']:g}, atol {curves['atol']:g}: "
        f"**{'PASS' if curves['passed'] else 'FAIL'}**)",
        "",
        "| metric | gated | max abs diff (checked) | max rel diff (checked) | max abs diff (all) | max rel diff (all) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, m in curves["metrics"].items():
        lines.append(
            f"| {name} | {'yes' if m['checked'] else 'info'} | {_f(m['max_abs_diff_checked'], 2)} | "
            f"{_f(m['max_rel_diff_checked'], 2)} | {_f(m['max_abs_diff'], 2)} | {_f(m['max_rel_diff'], 2)} |"
        )
    same = ", ".join(f"{s}: {'yes' if v else 'no'}" for s, v in curves["same_rollout"].items())
    lines += ["", f"same rollout per step: {same}."]
    for f in curves["failures"]:
        lines.append(f"- FAIL {f}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main
def run_mode(mode: str, common: dict, work: Path) -> list[dict]:
    from fastrlhf.trainer.config import PPOConfig
    from fastrlhf.trainer.ppo import train_ppo

    run_dir = work / f"run_{mode}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"[bench_ppo_step] mode {mode}: {common['steps']} steps", flush=True)
    t0 = time.perf_counter()
    train_ppo(PPOConfig(**common, out_dir=str(run_dir), kernels=mode == "kernels"))
    print(f"[bench_ppo_step] mode {mode} done in {time.perf_counter() - t0:.1f} s", flush=True)
    gc.collect()  # the finished run's models must not stay allocated into the next run's peak memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_ppo_step-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        return _run(args, argv, device, out, work, t_start)
    finally:
        if not args.keep_work and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _run(
    args: argparse.Namespace, argv: list[str] | None, device: torch.device, out: Path, work: Path, t_start: float
) -> int:
    """Build the models, run both modes, compare, write the files -> exit status."""
    from fastrlhf.trainer.models import resolve_model_path

    src = args.model
    if args.random_init:
        src_dir = resolve_model_path(src)
        policy = random_init_model(src_dir, work / "policy_random_init", args.seed)
        label = f"{src} (random init, seed {args.seed})"
    else:
        policy = resolve_model_path(src)
        label = src if src != "default" else "default (SmolLM2-135M-Instruct)"
    if args.reward_model is not None:
        reward = resolve_model_path(args.reward_model)
    else:
        reward = build_reward_model(policy, work / "reward_model", args.seed + 1)
    common = dict(
        policy=policy,
        reward_model=reward,
        prompts=args.prompts,
        ref_quant=args.ref_quant,
        critic=args.critic,
        kl_estimator=args.kl_estimator,
        freeze_layers=args.freeze_layers,
        steps=args.steps,
        batch_prompts=args.batch_prompts,
        minibatch_size=args.minibatch_size,
        ppo_epochs=args.ppo_epochs,
        max_new_tokens=args.max_new_tokens,
        save_every=args.steps,
        seed=args.seed,
        device=str(device),
        cuda_graphs=args.cuda_graphs,
    )
    order = MODES[::-1] if args.eager_first else MODES
    runs = {mode: run_mode(mode, common, work) for mode in order}
    steps = timed_steps(args.steps)
    summary = {mode: summarise(runs[mode], steps) for mode in MODES}
    dev_kind = "cuda" if device.type == "cuda" else "cpu"
    check = args.check_steps if args.check_steps != "auto" else ("all" if dev_kind == "cpu" else "first")
    checked_steps = list(range(1, args.steps + 1)) if check == "all" else [1]
    rtol = args.rtol if args.rtol is not None else TOL[dev_kind][0]
    atol = args.atol if args.atol is not None else TOL[dev_kind][1]
    curves = compare_curves(runs, checked_steps, rtol, atol)

    meta = measure.environment(device)
    meta.update(
        command=" ".join(["benchmarks/bench_ppo_step.py", *(sys.argv[1:] if argv is None else argv)]),
        kernel_path=kernel_path(device),
        model=args.model,
        model_label=label,
        random_init=args.random_init,
        reward_model=args.reward_model or f"built from the policy (new head, seed {args.seed + 1})",
        steps=args.steps,
        order=list(order),
        timed_steps=steps,
        warmup_step_skipped=args.steps > 1,
        config={k: v for k, v in common.items() if k not in ("policy", "reward_model")},
        wall_s=time.perf_counter() - t_start,
    )
    if device.type == "cuda":
        meta["gpu_memory_total_mb"] = torch.cuda.get_device_properties(device).total_memory / 2**20
    per_step = {
        mode: [
            {k: v for k, v in r.items() if k == "step" or (k.startswith("perf/") and k != "perf/elapsed_s")}
            for r in runs[mode]
        ]
        for mode in MODES
    }
    doc = {
        "meta": meta,
        "args": vars(args),
        "phases": summary,
        "speed_ratio": speed_ratios(summary),
        "curves": curves,
        "per_step": per_step,
    }
    (out / "ppo_step.json").write_text(json.dumps(measure.json_safe(doc), indent=2, default=str, allow_nan=False))
    for mode in MODES:
        shutil.copy2(work / f"run_{mode}" / "metrics.jsonl", out / f"metrics_{mode}.jsonl")
    md = markdown(doc)
    (out / "ppo_step.md").write_text(md)
    print(f"[bench_ppo_step] wrote {', '.join(str(out / f) for f in FILES)}", flush=True)
    print(md, flush=True)
    return 0 if curves["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
