"""The main job across seeds: `fastrlhf pipeline` once per RL seed, on the same data and reward model.

    python benchmarks/pipeline_seeds.py --seeds 0 1 2 3 4 --out runs/seeds               # ~12 min a seed, 2 CPU cores
    python benchmarks/pipeline_seeds.py --seeds 0 1 --out runs/seeds -- --algo grpo --reward both
    python benchmarks/pipeline_seeds.py --summarize runs/seeds --out runs/seeds          # tables and plot only

Steps 1 and 2 (the candidate pairs, the split, the reward model) keep `--seed 0`; each run sets `--rl-seed S`,
which seeds step 3 (PPO's or GRPO's sampling, shuffling and initialisation) and the evaluation's sampling.
So the spread measured is the spread of RL and of its evaluation, not of the data. The first seed's run
samples step 1; later runs start from a copy of its candidates and rubric verdicts (the pipeline reuses
them) and retrain the same reward model (deterministic on CPU, ~1.5 min). Runs go one at a time, each in
`OUT/seed-S/`; a seed whose metrics.json exists is not rerun. Arguments after `--` go to every run.

Writes OUT/seeds.json (per seed: win rate and its 95% interval, correct rates of policy and reference, KL
and whether it is within the run's bound, step 3's and the whole run's seconds, the reward model's test
accuracy and, with a critic, its explained variance at the middle and last step; and their mean, standard
deviation, minimum and maximum over seeds; correct answers pooled over the seeds, with an interval),
OUT/seeds.md (the table) and OUT/seeds.png (win rate with its interval and the correct rates, per seed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEP1_FILES = ("candidates.jsonl", "annotations.jsonl")  # what the pipeline reuses instead of sampling again


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="RL seeds (--rl-seed)")
    p.add_argument("--out", default="runs/seeds", help="one folder per seed, and the summary files")
    p.add_argument("--summarize", metavar="DIR", help="only read DIR/seed-*/metrics.json and write the summary")
    return p.parse_args(argv), extra


def run_seed(seed: int, out: Path, first: Path | None, extra: list[str]) -> Path:
    """One pipeline run with --rl-seed `seed` in out/seed-S; step 1 copied from `first` when given."""
    run = out / f"seed-{seed}"
    if (run / "metrics.json").exists():
        print(f"seed {seed}: {run / 'metrics.json'} exists, not rerun", flush=True)
        return run
    if first is not None:
        (run / "step1").mkdir(parents=True, exist_ok=True)
        for name in STEP1_FILES:
            shutil.copy2(first / "step1" / name, run / "step1" / name)
    cmd = [sys.executable, "-m", "fastrlhf.trainer.cli", "pipeline", "--out-dir", str(run), "--rl-seed", str(seed)]
    print(f"seed {seed}: {' '.join(cmd + extra)}", flush=True)
    t0 = time.perf_counter()
    with open(out / f"seed-{seed}.log", "w") as log:
        done = subprocess.run(cmd + extra, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: the pipeline failed (exit {done.returncode}); see {out / f'seed-{seed}.log'}")
    print(f"seed {seed}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return run


def seed_row(metrics: dict, ppo_log: Path | None = None) -> dict:
    """The numbers of one run's metrics.json that the summary keeps; with step 3's per-step log (PPO), the
    critic's explained variance at the middle step and the last, and the first step where it is above 0."""
    ev, cfg = metrics["evaluation"], metrics["config"]
    row = {
        "rl_seed": cfg.get("rl_seed") if cfg.get("rl_seed") is not None else cfg["seed"],
        "algo": cfg.get("algo", "ppo"),
        "win_rate": ev["win_rate"],
        "win_rate_ci95": ev["win_rate_ci95"],
        "policy_correct_rate": ev["policy_correct_rate"],
        "reference_correct_rate": ev["reference_correct_rate"],
        "kl_per_token": ev["kl_per_token"],
        "kl_within_bound": ev["kl_per_token"] <= metrics.get("kl_bound", float("inf")),
        "rm_test_accuracy": metrics["reward_model"]["test"]["accuracy"],
        "rl_s": metrics["timings"]["ppo_s"],
        "total_s": metrics["timings"]["total_s"],
    }
    if ppo_log is not None and ppo_log.exists():
        steps = [json.loads(line) for line in ppo_log.read_text().splitlines() if line.strip()]
        evs = [r["value/explained_variance"] for r in steps if "value/explained_variance" in r]
        if evs:  # a critic (GRPO / RLOO have none)
            row["ev_mid"], row["ev_last"] = evs[(len(evs) - 1) // 2], evs[-1]
            row["ev_first_positive_step"] = next((i + 1 for i, v in enumerate(evs) if v > 0), None)
    return row


KEYS = ("win_rate", "policy_correct_rate", "reference_correct_rate", "kl_per_token", "rl_s", "total_s")


def summarize(rows: list[dict]) -> dict:
    """Per-key mean, standard deviation (0 for one seed), min and max over the seeds' rows."""
    out = {}
    for k in KEYS:
        xs = [r[k] for r in rows]
        out[k] = {
            "mean": statistics.fmean(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs),
            "max": max(xs),
        }
    out["correct_above_reference"] = sum(r["policy_correct_rate"] > r["reference_correct_rate"] for r in rows)
    out["kl_within_bound"] = sum(r["kl_within_bound"] for r in rows)
    return out


def pooled_correct(runs: list[Path], n_resamples: int = 1000) -> dict | None:
    """Correct answers pooled over the seeds' held-out replies (each run's eval/samples.jsonl): the policy's and
    the reference's rate, their difference and its 95% percentile-bootstrap interval over prompts (a drawn
    prompt brings its replies from every seed; seeded). One seed's 76 prompts x 2 replies cannot resolve a
    difference of a few points; the seeds together can. None when a run has no samples file."""
    import numpy as np

    files = [run / "eval" / "samples.jsonl" for run in runs]
    if not all(f.exists() for f in files):
        return None
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    ids = sorted({r["id"] for r in rows})
    index = {pid: i for i, pid in enumerate(ids)}
    group = np.array([index[r["id"]] for r in rows])  # (N,) the prompt of each reply pair
    diff = np.array([float(r["policy_correct"]) - float(r["reference_correct"]) for r in rows])  # (N,)
    per_prompt = np.bincount(group, weights=diff, minlength=len(ids))  # (P,) summed differences
    counts = np.bincount(group, minlength=len(ids)).astype(float)  # (P,) reply pairs
    drawn = np.random.default_rng(0).integers(0, len(ids), size=(n_resamples, len(ids)))
    low, high = np.quantile(per_prompt[drawn].sum(1) / counts[drawn].sum(1), [0.025, 0.975])
    return {
        "replies": len(rows),
        "prompts": len(ids),
        "policy_correct_rate": statistics.fmean(float(r["policy_correct"]) for r in rows),
        "reference_correct_rate": statistics.fmean(float(r["reference_correct"]) for r in rows),
        "difference": float(diff.mean()),
        "difference_ci95": [float(low), float(high)],
    }


def markdown(rows: list[dict], summary: dict) -> str:
    critic = all("ev_mid" in r for r in rows)
    ev_head = " critic EV: mid / last (first > 0) |" if critic else ""
    lines = [
        f"{rows[0]['algo'].upper()} over {len(rows)} RL seeds (steps 1-2 at seed 0)",
        "",
        f"| RL seed | win rate (95% interval) | correct: policy / reference | KL nats/token |{ev_head} RL s | run s |",
        "|---|---|---|---:|" + ("---|" if critic else "") + "---:|---:|",
    ]
    for r in rows:
        lo, hi = r["win_rate_ci95"]
        ev = f" {r['ev_mid']:.2f} / {r['ev_last']:.2f} ({r['ev_first_positive_step'] or '-'}) |" if critic else ""
        lines.append(
            f"| {r['rl_seed']} | {r['win_rate']:.3f} ({lo:.3f}-{hi:.3f}) | {r['policy_correct_rate']:.3f} / "
            f"{r['reference_correct_rate']:.3f} | {r['kl_per_token']:.3f} |{ev} {r['rl_s']:.0f} | {r['total_s']:.0f} |"
        )
    s = summary
    lines += [
        f"| mean ± std | {s['win_rate']['mean']:.3f} ± {s['win_rate']['std']:.3f} (min {s['win_rate']['min']:.3f}) | "
        f"{s['policy_correct_rate']['mean']:.3f} / {s['reference_correct_rate']['mean']:.3f} | "
        f"{s['kl_per_token']['mean']:.3f} |" + (" |" if critic else "") + f" {s['rl_s']['mean']:.0f} | "
        f"{s['total_s']['mean']:.0f} |",
        "",
        f"Policy more often correct than the reference on {s['correct_above_reference']} of {len(rows)} seeds; "
        f"KL per token within the run's bound on {s['kl_within_bound']} of {len(rows)}.",
    ]
    pooled = s.get("pooled_correct")
    if pooled is not None:
        lo, hi = pooled["difference_ci95"]
        lines += [
            "",
            f"Correct answers pooled over the seeds ({pooled['replies']} replies each, {pooled['prompts']} prompts): "
            f"policy {pooled['policy_correct_rate']:.3f}, reference {pooled['reference_correct_rate']:.3f}, "
            f"difference {pooled['difference']:+.3f} (95% bootstrap interval over prompts {lo:+.3f} to {hi:+.3f}).",
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    wr = [r["win_rate"] for r in rows]
    err = [[r["win_rate"] - r["win_rate_ci95"][0] for r in rows], [r["win_rate_ci95"][1] - r["win_rate"] for r in rows]]
    a.errorbar(x, wr, yerr=err, fmt="o", capsize=4)
    a.axhline(0.5, color="grey", lw=0.8, ls=":")
    a.axhline(statistics.fmean(wr), color="C0", lw=0.8, ls="--", label=f"mean {statistics.fmean(wr):.3f}")
    a.set(title="win rate vs the reference (95% interval)", xlabel="RL seed", ylim=(0.3, 1.0))
    a.legend(loc="lower right")
    b.plot(x, [r["policy_correct_rate"] for r in rows], "o", label="policy")
    b.plot(x, [r["reference_correct_rate"] for r in rows], "s", label="reference")
    b.set(title="held-out correct rate", xlabel="RL seed")
    b.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: the points may fill any corner
    for ax in (a, b):
        ax.set_xticks(x, [str(r["rl_seed"]) for r in rows])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(runs: list[Path], out: Path) -> str:
    rows = [
        seed_row(json.loads((run / "metrics.json").read_text()), run / "step3_ppo" / "metrics.jsonl") for run in runs
    ]
    summary = summarize(rows)
    summary["pooled_correct"] = pooled_correct(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps({"seeds": rows, "summary": summary}, indent=1) + "\n")
    md = markdown(rows, summary)
    (out / "seeds.md").write_text(md)
    plot(rows, out / "seeds.png")
    return md


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    out = Path(args.out)
    if args.summarize:
        runs = sorted(Path(args.summarize).glob("seed-*/metrics.json"), key=lambda p: int(p.parent.name[5:]))
        print(write_summary([p.parent for p in runs], out))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Path] = []
    for seed in args.seeds:
        runs.append(run_seed(seed, out, runs[0] if runs else None, extra))
    print(write_summary(runs, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
