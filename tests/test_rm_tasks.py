"""The reward-model benchmark's tasks (benchmarks/rm_tasks.py) measure what they claim: a reward model must
read the prompt, and the two test splits hold out what their names say.

Rejected by these tests: a task a reply-only scorer could solve (a reply chosen more often than rejected), a
topic of test_topic or a phrasing of test_phrasing that leaks into train, and rows that the trainer's loader
would read differently from TRL's (conversational prompt and replies)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import rm_tasks  # noqa: E402

from fastrlhf.trainer.data import load_pairs  # noqa: E402


def _request(task: str, prompt: str) -> str:
    """The phrasing (template) a prompt was made with."""
    _, requests, _ = rm_tasks.TASKS[task]
    templates = [t for train, held in requests.values() for t in train + held]
    (match,) = [t for t in templates if _fits(t, prompt)]
    return match


def _fits(template: str, prompt: str) -> bool:
    head, tail = template.split("{q}")
    return prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head) + len(tail)


def _question(task: str, prompt: str) -> str:
    head, tail = _request(task, prompt).split("{q}")
    return prompt[len(head) : len(prompt) - len(tail)]


@pytest.mark.parametrize("task", list(rm_tasks.TASKS))
def test_replies_alone_say_nothing(task):
    """Every reply text is chosen exactly as often as it is rejected over the full task (both requests for
    every question), and the sampled splits stay near balance: a reply-only scorer sits at 0.5."""
    topics, requests, rows = rm_tasks.TASKS[task]
    every = [(kind, c, r) for kind, _, c, r in rows(topics, [(k, t) for k, (tr, _) in requests.items() for t in tr])]
    wins = Counter(c for _, c, _ in every)
    losses = Counter(r for _, _, r in every)
    assert wins == losses
    for split, part in rm_tasks.build(task).items():
        kinds = Counter(row["kind"] for row in part)
        assert len(kinds) == 2 and min(kinds.values()) >= 0.35 * len(part), (split, kinds)


@pytest.mark.parametrize("task", list(rm_tasks.TASKS))
def test_held_out_splits_hold_out(task):
    splits = rm_tasks.build(task)
    prompts = {name: [row["prompt"][0]["content"] for row in part] for name, part in splits.items()}
    questions = {name: {_question(task, p) for p in ps} for name, ps in prompts.items()}
    phrasings = {name: {_request(task, p) for p in ps} for name, ps in prompts.items()}
    assert not questions["test_topic"] & questions["train"]
    assert phrasings["test_topic"] <= phrasings["train"]
    assert not phrasings["test_phrasing"] & phrasings["train"]
    assert not questions["test_phrasing"] & questions["test_topic"]  # unseen phrasings of the train topics
    assert len(splits["train"]) == 160 and len(splits["test_phrasing"]) == len(splits["test_topic"]) == 64


def test_rows_load_as_conversational_pairs(tmp_path):
    paths = rm_tasks.write(tmp_path)
    pairs = load_pairs(paths["numerals"]["train"])
    assert len(pairs) == 160
    assert pairs[0].prompt[0]["role"] == "user" and pairs[0].chosen.startswith("The answer is ")
    assert pairs[0].meta["kind"] in ("digits", "words")


def test_number_words():
    assert [rm_tasks.words(n) for n in (0, 7, 15, 20, 24, 100, 360, 480)] == [
        "zero",
        "seven",
        "fifteen",
        "twenty",
        "twenty-four",
        "one hundred",
        "three hundred and sixty",
        "four hundred and eighty",
    ]
