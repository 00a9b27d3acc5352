"""trainer/rubric.py: the scripted stand-in for human annotators (correct > wrong, concise > rambling,
garbage last), its normalization, ties and the symmetry of prefer()."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrlhf.trainer.data import PromptRecord, load_demo_prompts
from fastrlhf.trainer.rubric import (
    GARBAGE_SCORE,
    brevity,
    garbage_reason,
    get_rubric,
    is_correct,
    normalize,
    prefer,
    score,
)

FRANCE = {"prompt": "What is the capital of France?", "answer": "Paris", "aliases": [], "category": "capital"}
USA = {
    "prompt": "What is the capital of the United States?",
    "answer": "Washington, D.C.",
    "aliases": ["Washington", "Washington DC"],
    "category": "capital",
}
SUM = {"prompt": "What is 17 + 25?", "answer": "42", "aliases": [], "category": "arithmetic"}
HOT = {"prompt": "What is the opposite of hot?", "answer": "cold", "aliases": [], "category": "opposite"}
MIX = {
    "prompt": "What colour do you get when you mix blue and yellow?",
    "answer": "green",
    "aliases": [],
    "category": "colour",
}

RAMBLING_CORRECT = (
    "The capital of France is Paris. It is a beautiful city on the river Seine with many museums, cafes and "
    "parks, and it has a long history of art, fashion and food that draws millions of visitors from all "
    "around the world every single year."
)
RAMBLING_WRONG = RAMBLING_CORRECT.replace("Paris", "Lyon")
TRAILING_CORRECT = RAMBLING_CORRECT.removesuffix(" year.")  # what a reply cut off at the token limit looks like


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Paris", 3.0),
        ("The capital of France is Paris.", 3.0),  # 6 words: still fully concise
        (RAMBLING_CORRECT, 2.0 + 0.25 + 0.75 * (60 - 45) / 48),  # 45 words, finished
        (TRAILING_CORRECT, 2.0),  # 44 words, cut off mid-sentence: no brevity bonus
        ("Lyon.", 1.0),  # wrong but short
        (RAMBLING_WRONG, 0.25 + 0.75 * (60 - 45) / 48),
        (
            RAMBLING_WRONG + " Rome, Madrid and Berlin are old capitals too, with rivers, bridges, palaces, squares,"
            " markets, gardens and churches that tourists love to visit in spring.",
            0.25,
        ),  # > 60 words: the floor
        ("", GARBAGE_SCORE),
        ("   \n ", GARBAGE_SCORE),
    ],
)
def test_scores(response, expected):
    assert score(FRANCE, response) == pytest.approx(expected)


def test_correct_concise_beats_correct_rambling_beats_wrong_beats_empty():
    ladder = ["Paris.", RAMBLING_CORRECT, "Lyon.", RAMBLING_WRONG, ""]
    scores = [score(FRANCE, r) for r in ladder]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    for better, worse in zip(ladder, ladder[1:]):
        assert prefer(FRANCE, better, worse) == "a"
        assert prefer(FRANCE, worse, better) == "b"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is Forty-Two.", "the answer is 42"),
        ("forty two", "42"),
        ("one hundred and five", "105"),
        ("two thousand and twenty four", "2024"),
        ("Twelve apples and three pears", "12 apples and 3 pears"),
        ("five six", "5 6"),  # two numbers, not eleven
        ("zero", "0"),
        ("5,000 grams", "5000 grams"),
        ("It is 3.5 kg.", "it is 3.5 kg"),
        ("Bogotá, D.C.", "bogota d c"),
        ("H₂O", "h 2 o"),
        ("It's PARIS!!!", "it s paris"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    "response, correct",
    [
        ("42", True),
        ("17 + 25 = 42", True),  # the question's own numbers are not answers
        ("Forty-two.", True),
        ("forty two", True),
        ("The answer is 42.0", True),
        ("43", False),
        ("43, no wait, 42", False),  # a conflicting answer first
        ("42, not 43", True),
        ("four two", False),
        ("The sum is seventeen plus twenty-five, which is 42.", True),
        ("", False),
    ],
)
def test_numeric_correctness(response, correct):
    assert is_correct(SUM, response) is correct


@pytest.mark.parametrize(
    "record, response, correct",
    [
        (FRANCE, "paris", True),
        (FRANCE, "PARIS!", True),
        (FRANCE, "Rome. Just kidding, it is Paris.", False),  # another capital asserted first
        (FRANCE, "Paris, not Rome.", True),
        (FRANCE, "Lyon, not Paris.", False),  # a well-known non-capital city counts as a rival too
        (FRANCE, "It is not Paris.", False),  # negated
        (FRANCE, "It isn't Paris.", False),
        (FRANCE, "Parisian food is great.", False),  # whole words only
        (USA, "Washington, D.C.", True),
        (USA, "washington dc", True),
        (USA, "The capital is Washington.", True),
        (USA, "New York City is the capital.", False),
        (HOT, "The opposite of hot is cold.", True),  # "hot" is in the question, so it is no rival
        (HOT, "Cold", True),
        (HOT, "warm", False),
        (HOT, "The opposite of hot is dry, or cold.", False),
        (MIX, "Mixing blue and yellow gives green.", True),
        (MIX, "You get purple, or maybe green.", False),
        # the documented blind spots
        (FRANCE, "Bordeaux is the capital, Paris the largest city.", True),
        (
            {"prompt": "How many feet are in 4 yards?", "answer": "12"},
            "3 feet in a yard, so 4 yards is 12 feet.",
            False,
        ),
    ],
)
def test_text_correctness(record, response, correct):
    assert is_correct(record, response) is correct


@pytest.mark.parametrize(
    "response, reason",
    [
        ("", "empty"),
        ("?!...", "empty"),
        ("@@@ ### $$$ %%% 1", "symbols"),
        ("巴黎是法国的首都。", "non-English"),
        ("Столица Франции — Париж.", "non-English"),
        ("Paris Paris Paris Paris Paris Paris Paris Paris Paris", "repetitive"),
        ("The capital is Paris. The capital is Paris. The capital is Paris. The capital is Paris.", "repetitive"),
        ("hahahahahahahahahahahahahahahahahahahahahahahahahahahahahahahahahahahaha", "repetitive"),
        ("Paris", None),
        ("17 + 25 = 42", None),
        ("Bogotá is the capital of Colombia.", None),
        (RAMBLING_CORRECT, None),
    ],
)
def test_garbage(response, reason):
    assert garbage_reason(response) == reason


def test_garbage_loses_even_when_it_contains_the_answer():
    assert score(FRANCE, "Paris Paris Paris Paris Paris Paris Paris Paris Paris") == GARBAGE_SCORE
    assert score(FRANCE, "巴黎 (Paris) 是法国的首都。") == GARBAGE_SCORE
    assert prefer(FRANCE, "Lyon", "巴黎 (Paris) 是法国的首都。") == "a"


def test_ties():
    assert prefer(FRANCE, "Paris", "The capital of France is Paris.") == "tie"  # both correct and concise
    assert prefer(FRANCE, "Lyon", "Rome") == "tie"
    assert prefer(FRANCE, "", "$$$$") == "tie"
    long_a = RAMBLING_CORRECT
    long_b = RAMBLING_CORRECT + " Truly."  # one word longer: 1/48 < tolerance
    assert prefer(FRANCE, long_a, long_b) == "tie"
    assert prefer(FRANCE, long_a, long_b, tolerance=0.0) == "a"
    # two replies that both trail off are equally rambling, whatever their length
    assert prefer(FRANCE, TRAILING_CORRECT, "The capital of France is Paris, which is a city with many old") == "tie"


@pytest.mark.parametrize(
    "response, finished",
    [
        ("The capital is Paris, a city with many museums, cafes, parks and a long history of art.", True),
        ("The capital is Paris, a city with many museums, cafes, parks and a long history of", False),
        ('The capital is Paris, which its people call "the City of Light, the capital of fashion."', True),
        ("The capital is Paris (the largest city of France and the seat of its government!)", True),
        ("The capital is Paris, the largest city of France and the seat of its government:", False),
        ("The capital is Paris, the largest city of France and the seat of its government (IAU)", False),
    ],
)
def test_a_long_reply_that_trails_off_gets_no_brevity(response, finished):
    assert len(response.split()) > 12
    assert (brevity(response) > 0) == finished
    assert (brevity(response + "\n ") > 0) == finished  # trailing white space does not matter


def test_finished_beats_trailing_off_at_any_length():
    short_trailing = "The capital of France is Paris, which is a city with many old"  # 13 words
    assert prefer(FRANCE, RAMBLING_CORRECT, short_trailing) == "a"  # 45 words, but it finishes


POOL = [
    "Paris",
    "paris.",
    "Lyon",
    "Rome",
    "",
    "Paris, not Rome.",
    RAMBLING_CORRECT,
    RAMBLING_WRONG,
    "巴黎",
    "Paris " * 10,
]


@settings(max_examples=300, deadline=None)
@given(
    a=st.one_of(st.sampled_from(POOL), st.text(max_size=80)), b=st.one_of(st.sampled_from(POOL), st.text(max_size=80))
)
def test_prefer_is_symmetric(a, b):
    forward, backward = prefer(FRANCE, a, b), prefer(FRANCE, b, a)
    assert (forward == "a") == (backward == "b")
    assert (forward == "b") == (backward == "a")
    assert (forward == "tie") == (backward == "tie")
    assert prefer(FRANCE, a, a) == "tie"


def test_record_forms_agree():
    record = PromptRecord(
        [{"role": "user", "content": FRANCE["prompt"]}], {k: v for k, v in FRANCE.items() if k != "prompt"}
    )
    nested = {"prompt": record.prompt, "meta": record.meta}
    for response in ["Paris", "Lyon", RAMBLING_CORRECT, ""]:
        assert score(record, response) == score(FRANCE, response) == score(nested, response)


def test_record_without_answer_is_a_clear_error():
    with pytest.raises(ValueError, match="no 'answer'"):
        score({"prompt": "What is 2 + 2?"}, "4")
    with pytest.raises(TypeError, match="expected a PromptRecord or a dict"):
        score("What is 2 + 2?", "4")


def test_get_rubric():
    assert get_rubric("demo") is score
    with pytest.raises(ValueError, match=r"unknown rubric 'nope'; known rubrics: \['demo'\]"):
        get_rubric("nope")


@pytest.fixture(scope="module")
def demo_prompts() -> list[PromptRecord]:
    return load_demo_prompts()


def test_every_shipped_answer_is_judged_correct(demo_prompts):
    """The gold answer, bare or in a sentence, scores 3 for every prompt: no answer is shadowed by a rival."""
    for record in demo_prompts:
        answer = record.meta["answer"]
        assert score(record, answer) == 3.0, record.meta["id"]
        assert score(record, f"The answer is {answer}.") == 3.0, record.meta["id"]
        for alias in record.meta["aliases"]:
            assert is_correct(record, alias), (record.meta["id"], alias)


def test_another_prompts_answer_is_judged_wrong(demo_prompts):
    """Answering with the next prompt's (different) answer in the same category is wrong."""
    by_category: dict[str, list[PromptRecord]] = {}
    for record in demo_prompts:
        by_category.setdefault(record.meta["category"], []).append(record)
    checked = 0
    for records in by_category.values():
        for record, other in zip(records, records[1:] + records[:1]):
            gold = {normalize(a) for a in [record.meta["answer"], *record.meta["aliases"]]}
            if normalize(other.meta["answer"]) in gold:
                continue
            assert not is_correct(record, other.meta["answer"]), (record.meta["id"], other.meta["answer"])
            assert score(record, other.meta["answer"]) == 1.0
            checked += 1
    assert checked >= 300
