"""Policy evaluation: win-rate statistics against hand values, KL to the reference, determinism, outputs,
and a stub rubric whose verdicts are known in advance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastrlhf.trainer import rubric
from fastrlhf.trainer.data import encode_prompt, load_demo_prompts
from fastrlhf.trainer.evaluate import (
    _kl_per_reply,
    _rm_scores,
    evaluate_policy,
    pick_examples,
    win_rate,
    win_rate_interval,
)
from fastrlhf.trainer.models import load_causal_lm, load_reward_model, load_tokenizer, tiny_model_path
from fastrlhf.trainer.rollout import sample

# the end-to-end runs use the kernels' PyTorch twins (fast); test_kl_and_rm_scores_match_direct_forwards
# runs the interpreted Triton kernels on the same code path
SMALL = dict(samples_per_prompt=2, max_new_tokens=5, batch_size=8, device="cpu", n_examples=3, use_kernels=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core test machine, tiny matmuls with 2 threads wait on each other
    (sampling is ~15x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "ref": tiny_model_path(root),
        "other": tiny_model_path(root, seed=1),
        "rm": tiny_model_path(root, kind="reward"),
    }


@pytest.fixture(scope="module")
def prompts():
    return load_demo_prompts()[:4]


# ------------------------------------------------------------------------------------------ pure stats
def test_win_rate_hand_values():
    assert win_rate(["a", "a", "tie", "b"]) == pytest.approx(0.625)  # (2 + 0.5) / 4
    assert win_rate(["b", "b", "b"]) == 0.0
    assert win_rate(["tie"]) == 0.5
    assert win_rate(["a", "tie", "tie", "b", "b"]) == pytest.approx(0.4)  # (1 + 1) / 5
    with pytest.raises(ValueError, match="unknown verdicts"):
        win_rate(["a", "policy"])
    with pytest.raises(ValueError, match="no verdicts"):
        win_rate([])


def test_bootstrap_interval_contains_estimate():
    rng = np.random.default_rng(0)
    verdicts = list(rng.choice(["a", "b", "tie"], size=60, p=[0.5, 0.3, 0.2]))
    groups = np.repeat(np.arange(30), 2).tolist()
    low, high = win_rate_interval(verdicts, groups, seed=3)
    point = win_rate(verdicts)
    assert 0.0 <= low < point < high <= 1.0
    assert high - low < 0.4  # 30 prompts: a real interval, not [0, 1]
    assert win_rate_interval(verdicts, groups, seed=3) == (low, high)  # seeded
    assert win_rate_interval(["a"] * 6, [0, 0, 1, 1, 2, 2]) == (1.0, 1.0)  # no spread when all agree


def test_bootstrap_resamples_prompts_not_pairs():
    # prompt 0 always wins, prompt 1 always loses: a resample of 2 prompts holds both, one of them twice,
    # or the same one twice, so rates are only 0, 0.5 or 1 (pair-level resampling would give other values)
    verdicts, groups = ["a"] * 5 + ["b"] * 5, [0] * 5 + [1] * 5
    low, high = win_rate_interval(verdicts, groups, seed=0)
    assert (low, high) == (0.0, 1.0)


def test_pick_examples_includes_a_win_and_a_loss():
    verdicts = ["tie"] * 9 + ["a", "b"]
    groups = list(range(11))
    for seed in range(5):
        picks = pick_examples(verdicts, groups, 3, seed=seed)
        assert len(picks) == 3 and len(set(picks)) == 3
        assert {verdicts[i] for i in picks} >= {"a", "b"}
    # one pair per prompt while prompts last
    picks = pick_examples(["tie"] * 8, [0, 0, 1, 1, 2, 2, 3, 3], 4, seed=1)
    assert sorted(i // 2 for i in picks) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------- KL and RM wiring
@pytest.mark.parametrize("use_kernels", [False, True])
def test_kl_and_rm_scores_match_direct_forwards(models, prompts, use_kernels):
    """The reply-position logits (response_hidden -> LM head) and the RM read-out agree with plain full
    forwards: logits of the whole sequence shifted by one, and the HF sequence classifier; with the Triton
    kernels (interpreted on CPU) and with their PyTorch twins."""
    tokenizer = load_tokenizer(models["ref"])
    policy, reference = load_causal_lm(models["other"]), load_causal_lm(models["ref"])
    rm = load_reward_model(models["rm"])
    rm.config.reward_gain, rm.config.reward_bias = 2.0, -0.5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rollout = sample(
            policy,
            tokenizer,
            [encode_prompt(tokenizer, r.prompt) for r in prompts[:2]],
            max_new_tokens=4,
            temperature=0.7,
            samples_per_prompt=2,
        )
    rollout.response_mask[0, 2:] = 0  # a short reply: what follows it must not count
    rollout.response_ids[0, 2:] = tokenizer.pad_token_id
    rollout.has_eos[0] = False
    T, P = 0.7, rollout.prompt_ids.shape[1]
    cpu = torch.device("cpu")
    kl = _kl_per_reply(policy, reference, [rollout], temperature=T, use_kernels=use_kernels, device=cpu)
    rewards = _rm_scores(
        rm, [rollout], eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, use_kernels=use_kernels, device=cpu
    )

    inputs = dict(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids)
    scored = rollout.with_eos(tokenizer.eos_token_id, tokenizer.pad_token_id)  # as train-rm: EOS after each reply
    assert not rollout.has_eos[0] and scored.response_ids[0, 2] == tokenizer.eos_token_id
    with torch.no_grad():
        logp = torch.log_softmax(policy(**inputs).logits[:, P - 1 : -1].double() / T, -1)  # (B, R, V)
        logq = torch.log_softmax(reference(**inputs).logits[:, P - 1 : -1].double() / T, -1)
        raw = (
            rm(input_ids=scored.sequences, attention_mask=scored.attention_mask, position_ids=scored.position_ids)
            .logits[:, 0]
            .double()
        )  # (B,)
    mask = rollout.response_mask.bool()
    exact = (logp.exp() * (logp - logq)).sum(-1).where(mask, 0).sum(-1)
    tok = rollout.response_ids.unsqueeze(-1)
    k1 = (logp.gather(-1, tok) - logq.gather(-1, tok)).squeeze(-1).where(mask, 0).sum(-1)
    np.testing.assert_allclose(kl["full"], exact.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(kl["k1"], k1.numpy(), rtol=1e-4, atol=1e-5)
    assert kl["tokens"].tolist() == rollout.response_mask.sum(-1).tolist() and kl["tokens"][0] == 2
    np.testing.assert_allclose(rewards, raw.numpy() * 2.0 - 0.5, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- end to end
def test_same_model_zero_kl_ties_and_determinism(models, prompts, tmp_path):
    rng_before = torch.get_rng_state()
    settings = {**SMALL, "batch_size": 4, "common_random_numbers": True}  # 4 rows a call: 2 calls per model
    first = evaluate_policy(
        models["ref"], models["ref"], models["rm"], prompts, seed=5, out_dir=tmp_path / "a", **settings
    )
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    # identical weights + identical seed -> identical replies: zero KL, every pair a tie
    assert first["kl_per_token"] < 1e-5 and abs(first["kl_k1_per_reply"]) < 1e-5
    assert (first["wins"], first["ties"], first["losses"]) == (0, 8, 0) and first["win_rate"] == 0.5
    assert first["policy_rm_score"] == pytest.approx(first["reference_rm_score"], abs=1e-6)
    assert first["policy_rubric_score"] == first["reference_rubric_score"]
    samples = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == first["pairs"] == 8
    assert all(s["policy_reply"] == s["reference_reply"] for s in samples)
    assert [s["prompt_index"] for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]

    second = evaluate_policy(models["ref"], models["ref"], models["rm"], prompts, seed=5, **settings)
    assert second == first

    # by default the reference draws its own stream (seed + 1): the same model now gives other replies
    independent = evaluate_policy(
        models["ref"],
        models["ref"],
        None,
        prompts,
        seed=5,
        out_dir=tmp_path / "b",
        **{**settings, "common_random_numbers": False},
    )
    assert not independent["common_random_numbers"]
    assert independent["kl_per_token"] < 1e-5  # KL is measured on the policy's replies: still 0
    samples = [json.loads(line) for line in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert any(s["policy_reply"] != s["reference_reply"] for s in samples)


def test_different_policy_outputs(models, prompts, tmp_path):
    out = tmp_path / "eval"
    m = evaluate_policy(models["other"], models["ref"], models["rm"], prompts, seed=0, out_dir=out, **SMALL)
    assert m["policy_reply_tokens"] > 1.5  # enough reply tokens for the KL checks to mean something
    assert m["kl_per_token"] > 1e-3 and m["kl_per_reply"] > 1e-3
    assert m["wins"] + m["ties"] + m["losses"] == m["pairs"] == 8
    assert m["win_rate"] == pytest.approx((m["wins"] + 0.5 * m["ties"]) / 8)
    assert 0.0 <= m["win_rate_ci95"][0] <= m["win_rate"] <= m["win_rate_ci95"][1] <= 1.0
    for side in ("policy", "reference"):
        assert 0.0 <= m[f"{side}_eos_rate"] <= 1.0 and 0.0 <= m[f"{side}_garbage_rate"] <= 1.0
        assert 1.0 <= m[f"{side}_reply_tokens"] <= 5.0
        assert isinstance(m[f"{side}_rm_score"], float)

    saved = json.loads((out / "evaluation.json").read_text())
    assert saved == json.loads(json.dumps(m, allow_nan=False))  # strict JSON, and what was saved
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    # per-pair numbers agree with the summary
    assert np.mean([s["kl_full"] for s in samples]) == pytest.approx(m["kl_per_reply"], rel=1e-6)
    assert np.mean([s["policy_rm_score"] for s in samples]) == pytest.approx(m["policy_rm_score"], rel=1e-6)
    assert np.mean([s["policy_tokens"] for s in samples]) == pytest.approx(m["policy_reply_tokens"])
    assert len(m["examples"]) == 3 and len({e["prompt_index"] for e in m["examples"]}) == 3
    assert all(e["answer"] == prompts[e["prompt_index"]].meta["answer"] for e in m["examples"])
    md = (out / "examples.md").read_text()
    assert md.count("**policy**") == 3 and m["examples"][0]["prompt"] in md
    assert (out / "eval_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stub_rubric_prefers_shorter_replies(models, prompts, monkeypatch, tmp_path):
    calls = []

    def shorter_is_better(record, response):
        calls.append(response)
        return -float(len(response))

    monkeypatch.setitem(rubric.RUBRICS, "shorter", shorter_is_better)
    m = evaluate_policy(models["other"], models["ref"], None, prompts, rubric="shorter", out_dir=tmp_path, **SMALL)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    expected = []
    for s in samples:
        a, b = len(s["policy_reply"]), len(s["reference_reply"])
        expected.append("tie" if a == b else "policy" if a < b else "reference")
        assert s["policy_score"] == -a and s["reference_score"] == -b
    assert len(set(expected)) >= 2  # the two tiny models' replies differ in length (else the test is weak)
    assert [s["verdict"] for s in samples] == expected
    assert (m["wins"], m["ties"], m["losses"]) == tuple(expected.count(v) for v in ("policy", "tie", "reference"))
    assert m["policy_rubric_score"] == pytest.approx(-np.mean([len(s["policy_reply"]) for s in samples]))
    assert m["policy_rm_score"] is None and calls
    with pytest.raises(ValueError, match="unknown rubric"):
        evaluate_policy(models["ref"], models["ref"], None, prompts, rubric="nope", **SMALL)
