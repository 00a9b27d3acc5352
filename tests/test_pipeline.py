"""`fastrlhf pipeline` end to end on a tiny random model: every step runs and the report is complete."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

import fastrlhf.kernels._common as kernels_common
from fastrlhf.trainer import rubric
from fastrlhf.trainer.cli import main as cli_main
from fastrlhf.trainer.data import load_pairs, prompt_key
from fastrlhf.trainer.models import tiny_model_path


# a short step 3 on the CPU: int8 reference through bitsandbytes, eager twins (the kernels' interpreter
# is slow; the kernel path of PPO is covered in test_ppo.py)
PPO_FLAGS = (
    "--ppo-steps",
    "2",
    "--ppo-batch-prompts",
    "4",
    "--ppo-minibatch-size",
    "2",
    "--ppo-epochs",
    "1",
    "--ppo-freeze-layers",
    "1",
    "--eval-samples-per-prompt",
    "1",
    "--no-kernels",
)


def _shorter_is_better(record, response: str) -> float:
    """A rubric for random text: the demo rubric calls almost every pair of a random model's replies a tie
    (never correct, and two replies cut off mid-sentence are equally rambling), which leaves no pairs."""
    return -0.1 * len(response.split())


class _NvtxRecorder:
    """Stands in for the `nvtx` package: records each range's (domain, name)."""

    def __init__(self):
        self.ranges = []

    def annotate(self, name, domain):
        self.ranges.append((domain, name))
        return contextlib.nullcontext()


# the trainer phases' NVTX ranges (README, "Profiling") that one pipeline run opens
PHASE_RANGES = {
    "pipeline/model_setup",
    "pipeline/generate",
    "pipeline/annotate",
    "pipeline/reward_model",
    "pipeline/ppo",
    "pipeline/evaluate",
    "generate-pairs/sample",
    "train-rm/prefix_cache",
    "train-rm/forward",
    "train-rm/backward",
    "train-rm/optimizer",
    "train-rm/validation",
    "train-rm/normalise",
    "train-rm/eval_val",
    "train-rm/eval_test",
    "ppo/generation",
    "ppo/scoring",
    "ppo/policy_eval",
    "ppo/reference",
    "ppo/rewards",
    "ppo/update",
    "eval-policy/sample",
    "eval-policy/kl",
    "eval-policy/rm_scores",
    "eval-policy/judge",
}


def _tiny_run(out, model: str) -> list[str]:
    """`fastrlhf pipeline` on the tiny model: 40 prompts x 4 samples, a 1-epoch reward model, 2 PPO steps."""
    flags = "--limit 40 --samples-per-prompt 4 --max-new-tokens 64 --rm-epochs 1 --rm-batch-pairs 8"
    flags += " --rm-freeze-layers 1 --max-length 160 --split 0.5 0.25 0.25 --device cpu --rubric shorter"
    return ["pipeline", "--out-dir", str(out), "--model", model, *flags.split(), *PPO_FLAGS]


def test_pipeline_end_to_end_tiny(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(rubric.RUBRICS, "shorter", _shorter_is_better)
    nvtx = _NvtxRecorder()
    monkeypatch.setattr(kernels_common, "_nvtx", nvtx)
    model = tiny_model_path(tmp_path)
    out = tmp_path / "run"
    flags = "--gen-batch-size 40 --ppo-critic-lr 1e-4 --ppo-lr-schedule linear --ppo-clip-range-value None"
    cli_main([*_tiny_run(out, model), *flags.split()])
    printed = capsys.readouterr().out
    assert "report:" in printed
    assert {domain for domain, _ in nvtx.ranges} == {"fastrlhf"}
    assert PHASE_RANGES <= {name for _, name in nvtx.ranges}, sorted(PHASE_RANGES - {name for _, name in nvtx.ranges})

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == {"train": 20, "val": 10, "test": 10}
    assert metrics["annotation"]["annotator"] == "rubric:shorter"
    assert metrics["reward_model"]["finished"]
    for key in ("accuracy", "precision", "recall", "f1", "auc_roc", "ece", "brier"):
        assert 0.0 <= metrics["reward_model"]["test"][key] <= 1.0, key  # NaN fails too
    assert set(metrics["timings"]) >= {"generate_s", "annotate_s", "reward_model_s", "ppo_s", "evaluate_s", "total_s"}
    assert metrics["ppo"]["steps"] == 2 and metrics["config"]["ref_quant"] == "int8"
    # measured and >= 0 up to rounding: only the tiny model's top layer is int8 (the reference reads the
    # policy's frozen bottom), and there its error fell below the KL's fp32 rounding (-1.2e-8 in one run)
    assert math.isfinite(metrics["ppo"]["kl_floor"]["full"]) and metrics["ppo"]["kl_floor"]["full"] > -1e-6
    assert set(metrics["ppo"]["phases"]) == {"generation", "scoring", "policy_eval", "reference", "rewards", "update"}
    ev = metrics["evaluation"]
    assert ev["prompts"] == 10 and ev["wins"] + ev["ties"] + ev["losses"] == ev["pairs"] == 10
    assert 0.0 <= ev["win_rate"] <= 1.0 and ev["kl_per_token"] > -1e-6  # >= 0 up to rounding
    eval_ids = {r["id"] for r in map(json.loads, (out / "eval" / "samples.jsonl").open())}
    train_ids = {r["id"] for r in map(json.loads, (out / "prompts" / "train.jsonl").open())}
    assert len(eval_ids) == 10 and not eval_ids & train_ids  # judged on prompts PPO never saw

    report = (out / "report.md").read_text()
    assert "rubric" in report and "| test |" in report and "Win rate" in report and "KL floor" in report
    assert "critic: separate, lr 0.0001, value clip none" in report and "lr 5e-05 (linear)" in report
    ppo_rows = [json.loads(line) for line in (out / "step3_ppo" / "metrics.jsonl").open()]
    assert [r["policy/lr"] for r in ppo_rows] == [5e-5, 2.5e-5]  # the default, constant, gives 5e-5 twice
    for png in (
        "reward_training.png",
        "reward_test_roc.png",
        "reward_test_rewards.png",
        "ppo_training.png",
        "eval_scores.png",
    ):
        assert (out / "plots" / png).stat().st_size > 1000

    # no prompt's pairs straddle two splits
    split_of = {}
    for name in ("train", "val", "test"):
        path = out / "step1" / f"preferences_{name}.jsonl"
        for pair in load_pairs(path):
            assert split_of.setdefault(prompt_key(pair.prompt), name) == name

    # too few pairs for a split: one line and exit 2, not a stack trace from deep inside
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli_main(
            [
                "pipeline",
                "--out-dir",
                str(tmp_path / "small"),
                "--model",
                model,
                "--limit",
                "2",
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
                "--no-ppo",
            ]
        )
    err = capsys.readouterr().err
    assert info.value.code == 2 and "fastrlhf pipeline: error: step 1 gave no preference pairs" in err, err
    assert "Traceback" not in err

    # a rerun reuses the sampled candidates and the finished annotations
    before = (out / "step1" / "candidates.jsonl").stat().st_mtime_ns
    cli_main([*_tiny_run(out, model), "--algo", "grpo", "--group-size", "2", "--reward", "both", "--rl-seed", "7"])
    assert (out / "step1" / "candidates.jsonl").stat().st_mtime_ns == before
    # ... and step 3 ran critic-free: GRPO over 2 prompts x 2 replies, the rubric's check beside the reward model
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["algo"] == "grpo" and metrics["ppo"]["steps"] == 2
    assert "value/explained_variance" not in metrics["ppo"]["last"]
    step = json.loads((out / "step3_ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert "objective/check" in step and "value/loss" not in step
    report = (out / "report.md").read_text()
    assert "## Step 3: GRPO" in report and "2 train prompts x 2 replies, no critic" in report
    # --rl-seed seeds step 3 and the evaluation alone
    assert "RL seed 7, reference" in report and metrics["evaluation"]["seed"] == 8
    assert torch.load(out / "step3_ppo" / "checkpoint.pt", weights_only=False)["config"]["seed"] == 7
