"""Reward models on tasks that need the prompt: `fastrlhf train-rm` under a configuration vs TRL's RewardTrainer.

For each task of `benchmarks/rm_tasks.py` (length, format, numerals) a reward model is trained on its train
split and scored on its two held-out splits (unseen phrasings, unseen topics): pairwise accuracy and AUC,
and the training time (model load + training, no evaluation). Every run starts from the same backbone.

    python benchmarks/bench_rm.py --out results/rm                          # train-rm's defaults + TRL
    python benchmarks/bench_rm.py --run ours:lr=2e-4,freeze_layers=20 --run ours --tasks length
    python benchmarks/bench_rm.py --run trl                                 # the anchor alone

A run is `ours[:field=value,...]` (RewardConfig fields; no fields: the command's defaults) or `trl`: TRL's
RewardTrainer with its own defaults (lr 1e-4, 3 epochs, 8 pairs a batch, no centering, head N(0, 0.02)),
except on CPU fp32 (TRL's bf16 default needs bf16 hardware) and gradient checkpointing off (its default,
on, only saves memory: the anchor runs at its fastest). Threads: torch's default (all cores).

Writes <out>/runs.jsonl (one line per run and task, appended) and <out>/table.md (all runs in the file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import rm_tasks  # noqa: E402
from fastrlhf.trainer.config import RewardConfig  # noqa: E402
from fastrlhf.trainer.data import load_pairs  # noqa: E402
from fastrlhf.trainer.metrics import pairwise_metrics  # noqa: E402
from fastrlhf.trainer.models import load_reward_model, load_tokenizer, resolve_model_path  # noqa: E402
from fastrlhf.trainer.reward import score_pairs, train_reward_model  # noqa: E402

TESTS = ("test_phrasing", "test_topic")


def parse_run(spec: str) -> tuple[str, dict]:
    """'ours:lr=2e-4,freeze_layers=20' -> ('ours', {'lr': 0.0002, 'freeze_layers': 20}); types from RewardConfig."""
    name, _, rest = spec.partition(":")
    if name not in ("ours", "trl"):
        raise SystemExit(f"--run {spec!r}: a run is ours[:field=value,...] or trl")
    types = {f.name: type(getattr(RewardConfig(), f.name)) for f in fields(RewardConfig)}
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in types or name == "trl":
            raise SystemExit(f"--run {spec!r}: {key!r} is not a RewardConfig field")
        kind = types[key]
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return name, overrides


def metrics_of(chosen, rejected) -> dict:
    m = pairwise_metrics(chosen, rejected)
    return {"accuracy": m["accuracy"], "auc": m["auc_roc"], "gap_mean": m["gap_mean"]}


def run_ours(files: dict[str, Path], overrides: dict, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RewardConfig(pairs=str(files["train"]), out_dir=tmp, split=(1.0, 0.0, 0.0), seed=seed, **overrides)
        t0 = time.perf_counter()
        train_reward_model(cfg)  # includes normalising on the training replies and saving the folder
        seconds = time.perf_counter() - t0
        model_dir = Path(tmp) / "model"
        tokenizer = load_tokenizer(str(model_dir), padding_side="right")
        model = load_reward_model(str(model_dir), tokenizer=tokenizer)
        out = {"seconds": seconds}
        for split in TESTS:
            s = score_pairs(
                model, tokenizer, load_pairs(files[split]), batch_pairs=32, max_length=cfg.max_length, device="cpu"
            )
            out[split] = metrics_of(s["chosen"], s["rejected"])
    return out


@torch.no_grad()
def trl_scores(model, tokenizer, rows: list[dict]) -> tuple[list[float], list[float]]:
    """Rewards as TRL's RewardTrainer trains them: the chat template over prompt + reply, read at the last token."""
    model.eval()
    out = ([], [])
    for row in rows:
        for side, column in zip(out, ("chosen", "rejected")):
            ids = tokenizer.apply_chat_template(row["prompt"] + row[column], tokenize=True, return_dict=True)
            side.append(float(model(input_ids=torch.tensor([ids["input_ids"]])).logits[0, 0]))
    return out


def run_trl(files: dict[str, Path], seed: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    path = resolve_model_path("default")
    rows = {split: [json.loads(line) for line in open(p)] for split, p in files.items()}
    columns = ("prompt", "chosen", "rejected")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        args = TRLRewardConfig(
            output_dir=tmp,
            bf16=False,
            gradient_checkpointing=False,
            report_to=[],
            save_strategy="no",
            logging_steps=1000,
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        train = Dataset.from_list([{c: r[c] for c in columns} for r in rows["train"]])
        RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()
        seconds = time.perf_counter() - t0
    out = {"seconds": seconds}
    for split in TESTS:
        out[split] = metrics_of(*trl_scores(model, tokenizer, rows[split]))
    return out


def provenance() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain")),
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def table(records: list[dict]) -> str:
    lines = [
        "| run | task | acc (unseen phrasing) | AUC | acc (unseen topic) | AUC | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        p, t = r["test_phrasing"], r["test_topic"]
        lines.append(
            f"| `{r['run']}` | {r['task']} | {p['accuracy']:.3f} | {p['auc']:.3f} | {t['accuracy']:.3f} | "
            f"{t['auc']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", help="ours[:field=value,...] or trl (repeatable; default: ours, trl)")
    ap.add_argument("--tasks", default=",".join(rm_tasks.TASKS), help="comma-separated tasks")
    ap.add_argument("--out", default="runs/bench_rm")
    ap.add_argument("--seed", type=int, default=0, help="the data's and the training's seed")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = rm_tasks.write(out / "data", seed=args.seed)
    for spec in args.run or ["ours", "trl"]:
        name, overrides = parse_run(spec)
        for task in args.tasks.split(","):
            result = run_trl(paths[task], args.seed) if name == "trl" else run_ours(paths[task], overrides, args.seed)
            record = {"run": spec, "task": task, "seed": args.seed, **result, **provenance()}
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(table([record]).splitlines()[-1], flush=True)
    records = [json.loads(line) for line in open(out / "runs.jsonl")]
    (out / "table.md").write_text(table(records))


if __name__ == "__main__":
    main()
