"""Reward-model training under torchrun on CPU (gloo, 2 processes, a tiny model): DDP and FSDP2 give the
1-process curve to float rounding, and a checkpoint written by 2 processes resumes in 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fastrlhf.trainer import reward as R
from fastrlhf.trainer.config import PPOConfig, RewardConfig
from fastrlhf.trainer.data import load_demo_prompts
from fastrlhf.trainer.models import tiny_model_path
from fastrlhf.trainer.ppo import train_ppo

COMPARED = ("loss", "accuracy", "reward_mean", "reward_std", "gap_mean", "grad_norm", "lr")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama and 48 pairs (right answer vs a wrong one): 39 train pairs, so the steps of
    8 pairs end with a 7-pair step whose micro-batches split unevenly over 2 ranks."""
    root = tmp_path_factory.mktemp("dist")
    prompts = load_demo_prompts()[:48]
    rows = [{"prompt": p.prompt, "chosen": f"{p.meta['answer']}.", "rejected": f"Maybe {q.meta['answer']}?"}
            for p, q in zip(prompts, prompts[1:] + prompts[:1])]  # fmt: skip
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, tiny_model_path(root)


def _args(setup, out: str, freeze: int, **kw) -> dict:
    root, model = setup
    args = dict(pairs=str(root / "prefs.jsonl"), out_dir=str(root / out), model=model, epochs=1, batch_pairs=4,
                grad_accum=2, lr=2e-3, max_length=48, freeze_layers=freeze, save_every=3, device="cpu")  # fmt: skip
    return {**args, **kw}


def _torchrun(args: dict, parallel: str, nproc: int = 2) -> None:
    flags = []
    for k, v in args.items():
        name = "--" + k.replace("_", "-")
        flags += ([name] if v else [f"--no-{k.replace('_', '-')}"]) if isinstance(v, bool) else [name, str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "fastrlhf.trainer.cli", "train-rm", *flags, "--parallel", parallel]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _train_log(out) -> list[dict]:
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    return [{k: r[k] for k in COMPARED} for r in rows if r["split"] == "train"]


def _assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (k, ra, rb)


@pytest.mark.parametrize(("parallel", "freeze"), [("ddp", 1), ("fsdp2", 0)])  # with / without the prefix cache
def test_two_processes_match_one(setup, parallel, freeze):
    R.train_reward_model(RewardConfig(**_args(setup, f"one-{parallel}", freeze)))
    _torchrun(_args(setup, f"two-{parallel}", freeze), parallel)
    root = setup[0]
    _assert_same_curve(_train_log(root / f"two-{parallel}"), _train_log(root / f"one-{parallel}"))
    one = AutoModelForSequenceClassification.from_pretrained(root / f"one-{parallel}" / "model").state_dict()
    two = AutoModelForSequenceClassification.from_pretrained(root / f"two-{parallel}" / "model").state_dict()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    summary = json.loads((root / f"two-{parallel}" / "summary.json").read_text())
    assert summary["finished"] and summary["test"]["pairs"] > 0
    assert torch.load(root / f"two-{parallel}" / "checkpoint.pt", weights_only=False)["world_size"] == 2


def test_checkpoint_from_two_processes_resumes_in_one(setup):
    root = setup[0]
    _torchrun(_args(setup, "resume", 1, max_steps=3), "ddp")
    ckpt = torch.load(root / "resume" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    summary = R.train_reward_model(RewardConfig(**_args(setup, "resume", 1, resume=True)))
    assert summary["finished"]
    R.train_reward_model(RewardConfig(**_args(setup, "straight", 1)))
    _assert_same_curve(_train_log(root / "resume"), _train_log(root / "straight"))


def test_ppo_refuses_several_processes(monkeypatch):
    """Not data-parallel yet: under torchrun each copy would write the same files, so it stops at once."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="runs in one process .WORLD_SIZE is 2.*plain `fastrlhf ppo`"):
        train_ppo(PPOConfig())
