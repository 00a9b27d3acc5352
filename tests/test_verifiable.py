"""trainer/verifiable.py: the rubric's correctness as a reward, `--reward-fn module:function` loading, and the
checks on what a reward function returns."""

import pytest
import torch

from fastrlhf.trainer.data import load_demo_prompts
from fastrlhf.trainer.errors import UserError
from fastrlhf.trainer.verifiable import load_reward_fn, rubric_correct, verifiable_scores


def test_rubric_correct_scores_the_answer():
    france = load_demo_prompts()[0]  # "What is the capital of France?", answer Paris
    assert france.meta["answer"] == "Paris"
    replies = ["Paris.", "The capital is Lyon.", "Paris, not Lyon", "Lyon, not Paris"]
    rows = [france] * len(replies)
    got = rubric_correct([r.prompt for r in rows], replies, [r.meta for r in rows])
    assert got == [1.0, 0.0, 1.0, 0.0]


def test_load_reward_fn(tmp_path, monkeypatch):
    assert load_reward_fn(None) is rubric_correct
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, replies, meta):\n    return [len(r) for r in replies]\n"
    )
    monkeypatch.chdir(tmp_path)  # the working directory, which the `fastrlhf` command's import path lacks
    fn = load_reward_fn("my_rewards:length")
    assert fn([[]], ["abc"], [{}]) == [3]
    for bad, why in (
        ("my_rewards", "module:function"),
        ("my_rewards:missing", "missing"),
        ("no_such_module_for_fastrlhf:f", "no_such_module"),
    ):
        with pytest.raises(UserError, match=why):
            load_reward_fn(bad)


def test_verifiable_scores_checks_the_result():
    rows = load_demo_prompts()[:2]
    out = verifiable_scores(lambda p, r, m: [m[0]["answer"] == "Paris", 0.5], rows, ["a", "b"], "cpu")
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.5]
    with pytest.raises(UserError, match="1 rewards for 2 replies"):
        verifiable_scores(lambda p, r, m: [1.0], rows, ["a", "b"], "cpu")
    with pytest.raises(UserError, match="non-finite"):
        verifiable_scores(lambda p, r, m: [1.0, float("nan")], rows, ["a", "b"], "cpu")
