"""Reward model: metrics against hand-computed values, training, normalisation, resume, bad input."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fastrlhf.trainer import reward as R
from fastrlhf.trainer.cli import main as cli_main
from fastrlhf.trainer.config import RewardConfig
from fastrlhf.trainer.data import load_demo_prompts, load_pairs, tokenize_pairs
from fastrlhf.trainer.metrics import expected_calibration_error, pairwise_metrics
from fastrlhf.trainer.models import load_tokenizer, tiny_model_path


# --------------------------------------------------------------------------------------------- metrics
def test_ece_hand_computed():
    y = np.array([1, 0, 1, 1])
    prob = np.array([0.9, 0.2, 0.6, 0.4])  # bins 9, 2, 6, 4: |1-.9|, |0-.2|, |1-.6|, |1-.4|
    assert expected_calibration_error(y, prob) == pytest.approx((0.1 + 0.2 + 0.4 + 0.6) / 4)
    y2 = np.array([1, 0])
    prob2 = np.array([0.55, 0.58])  # one bin: |0.5 - 0.565|
    assert expected_calibration_error(y2, prob2) == pytest.approx(0.065)


def test_pairwise_metrics_hand_computed():
    chosen = np.array([2.0, 1.0, 0.0, 3.0, 0.5, -1.0])
    rejected = np.array([1.0, 2.0, -1.0, 0.0, 0.0, 1.0])  # gaps 1, -1, 1, 3, 0.5, -2: 4 of 6 right
    m = pairwise_metrics(chosen, rejected, seed=0)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # the A/B order is np.random.default_rng(seed).random(B) < 0.5 -> A is the rejected response
    flip = np.random.default_rng(0).random(6) < 0.5
    y = (~flip).astype(int)
    pred = np.where(flip, -(chosen - rejected), chosen - rejected) > 0
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["brier"] == pytest.approx(
        np.mean((1 / (1 + np.exp(-np.where(flip, rejected - chosen, chosen - rejected))) - y) ** 2)
    )
    # |gap| = .5, 1, 1, 1, 2, 3 -> quartile edges .5, 1, 1.75, 3 (the duplicate 1 merged)
    assert [(b["low"], b["high"], b["pairs"]) for b in m["accuracy_by_gap"]] == [
        (0.5, 1.0, 1),
        (1.0, 1.75, 3),
        (1.75, 3.0, 2),
    ]
    assert [b["accuracy"] for b in m["accuracy_by_gap"]] == pytest.approx([1.0, 2 / 3, 0.5])
    assert m["reward_chosen_mean"] == pytest.approx(chosen.mean())


def test_pairwise_metrics_perfect_and_random():
    rng = np.random.default_rng(1)
    r = rng.normal(size=400)
    perfect = pairwise_metrics(r + 5, r, seed=3)
    assert perfect["accuracy"] == 1 and perfect["auc_roc"] == 1 and perfect["f1"] == 1
    noise = pairwise_metrics(rng.normal(size=4000), rng.normal(size=4000), seed=3)
    assert abs(noise["auc_roc"] - 0.5) < 0.05 and abs(noise["accuracy"] - 0.5) < 0.05


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with the real tokenizer, and an easy preference set: the right answer,
    briefly, beats a long wrong one."""
    root = tmp_path_factory.mktemp("rm")
    model = tiny_model_path(root)
    prompts = load_demo_prompts()
    rnd = random.Random(0)
    rows = []
    for rec in prompts[:64]:
        wrong = rnd.choice(prompts).meta["answer"]
        rows.append(
            {
                "prompt": rec.prompt,
                "chosen": f"{rec.meta['answer']}.",
                "rejected": f"Well, I believe it might be {wrong}, though I am not sure at all.",
            }
        )
    pairs = root / "prefs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, pairs


def _cfg(tiny, out, **kw):
    root, model, pairs = tiny
    base = dict(
        pairs=str(pairs),
        out_dir=str(root / out),
        model=model,
        epochs=2,
        batch_pairs=8,
        lr=2e-3,
        max_length=64,
        freeze_layers=0,
        save_every=3,
        device="cpu",
    )
    base.update(kw)
    return RewardConfig(**base)


def test_train_normalise_and_reload_with_transformers_alone(tiny):
    cfg = _cfg(tiny, "full")
    summary = R.train_reward_model(cfg)
    assert summary["finished"] and summary["test"]["accuracy"] >= 0.9
    lines = [json.loads(x) for x in open(f"{cfg.out_dir}/metrics.jsonl")]
    train_loss = [x["loss"] for x in lines if x["split"] == "train"]
    assert train_loss[-1] < 0.5 * train_loss[0]
    # reload with transformers alone; normalised rewards of the training responses: mean 0, std 1
    folder = f"{cfg.out_dir}/model"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = load_tokenizer(folder, padding_side="right")
    train = load_pairs(f"{cfg.out_dir}/splits/train.jsonl")
    batch = tokenize_pairs(tok, train, cfg.max_length)
    with torch.no_grad():
        raw = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    r = raw * model.config.reward_gain + model.config.reward_bias
    assert abs(r.mean().item()) < 1e-3 and abs(r.std(unbiased=False).item() - 1) < 1e-3
    # the fused-kernel scores the trainer uses agree with transformers' own scoring
    scores = R.score_pairs(model, tok, train, batch_pairs=16, max_length=cfg.max_length, device="cpu")
    np.testing.assert_allclose(
        np.concatenate([scores["chosen"], scores["rejected"]]), raw.numpy(), rtol=1e-4, atol=1e-4
    )
    for name in ("roc.png", "rewards.png", "metrics.json"):
        assert (tiny[0] / "full" / "eval" / "test" / name).stat().st_size > 0


def test_resume_matches_uninterrupted_run(tiny):
    full = R.train_reward_model(_cfg(tiny, "a"))
    stopped = R.train_reward_model(_cfg(tiny, "b", max_steps=5))
    assert not stopped["finished"] and stopped["step"] == 5
    resumed = R.train_reward_model(_cfg(tiny, "b", resume=True))
    assert resumed["finished"]

    def train_log(run):
        rows = [json.loads(x) for x in open(tiny[0] / run / "metrics.jsonl")]
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]

    assert train_log("a") == train_log("b")
    a = AutoModelForSequenceClassification.from_pretrained(tiny[0] / "a" / "model").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tiny[0] / "b" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["test"] == resumed["test"]


def test_kernels_off_gives_the_same_training(tiny):
    on = R.train_reward_model(_cfg(tiny, "on", epochs=1))
    off = R.train_reward_model(_cfg(tiny, "off", epochs=1, kernels=False))
    assert on["val"]["accuracy"] == off["val"]["accuracy"]
    assert on["reward_mean_raw"] == pytest.approx(off["reward_mean_raw"], rel=1e-4, abs=1e-4)


def test_frozen_prefix_cache_is_exact(tiny):
    """Training the top layer from stored bottom-layer states = recomputing them every step."""
    cached = R.train_reward_model(_cfg(tiny, "cache", epochs=1, freeze_layers=1))
    plain = R.train_reward_model(_cfg(tiny, "nocache", epochs=1, freeze_layers=1, cache_frozen=False))

    def losses(run):
        return [json.loads(x)["loss"] for x in open(tiny[0] / run / "metrics.jsonl")]

    np.testing.assert_allclose(losses("cache"), losses("nocache"), rtol=1e-4, atol=1e-5)
    assert cached["reward_mean_raw"] == pytest.approx(plain["reward_mean_raw"], rel=1e-3, abs=1e-4)


def test_lora_and_gradient_checkpointing(tiny):
    lora = R.train_reward_model(_cfg(tiny, "lora", epochs=1, lora_r=4, freeze_layers=1))
    ckpt = R.train_reward_model(_cfg(tiny, "gc", epochs=1, grad_checkpointing=True, cache_frozen=False))
    assert lora["finished"] and ckpt["finished"] and lora["test"]["accuracy"] >= 0.75
    merged = AutoModelForSequenceClassification.from_pretrained(tiny[0] / "lora" / "model")
    assert not [n for n, _ in merged.named_parameters() if "lora" in n]  # merged: loads without peft
    plain = R.train_reward_model(_cfg(tiny, "plain_gc_ref", epochs=1, cache_frozen=False))
    assert ckpt["reward_mean_raw"] == pytest.approx(plain["reward_mean_raw"], rel=1e-4, abs=1e-4)  # same math


def test_non_finite_loss_stops_before_the_update(tiny, monkeypatch):
    real = R.pair_forward

    def poisoned(*args, **kw):
        out = real(*args, **kw)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(R, "pair_forward", poisoned)
    with pytest.raises(FloatingPointError, match="step 0: non-finite reward-model loss.*not updated"):
        R.train_reward_model(_cfg(tiny, "nan", epochs=1))
    assert not (tiny[0] / "nan" / "checkpoint.pt").exists()  # stopped before the first optimizer step


def test_bad_configs(tiny):
    with pytest.raises(ValueError, match="both --val-pairs and --test-pairs"):
        R.train_reward_model(_cfg(tiny, "bad", val_pairs=str(tiny[2])))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        R.train_reward_model(_cfg(tiny, "never", resume=True))


def test_cli_help_lists_documented_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["train-rm", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--center-coef" in text and "Reward-centering" in text and "--resume" in text
