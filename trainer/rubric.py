"""The demo's scripted "human" preference: a rubric that STANDS IN FOR HUMAN ANNOTATORS.

No person labels the demo's pairs; this rubric does, so the demo runs unattended and reproducibly. It is
also the independent judge of whether PPO helped: the policy is never judged only
by the reward model it optimized. It scores a response to a prompt-set question (``answer``, ``aliases``
and ``category`` in the record) the way a hurried human would:

1. Garbage loses to everything: empty, symbol soup, mostly non-English (non-Latin) script, or
   repetitive text scores :data:`GARBAGE_SCORE`.
2. A correct answer beats a wrong one: correct scores :data:`CORRECT_BONUS` more.
3. Concise beats rambling: up to +1 for brevity. Up to :data:`CONCISE_WORDS` words is full marks. A
   longer reply that finishes (ends in . ! ? or an ellipsis, maybe inside quotes or brackets) falls
   linearly from 1 to :data:`FINISHED_FLOOR` at :data:`RAMBLING_WORDS`; a longer reply that trails off
   mid-sentence (cut off at the length limit, the usual way a small model rambles) scores 0. Two replies
   that both trail off are equally rambling: a reader does not rank them by a few words of length, and
   neither does the rubric. The bonus never bridges the gap between correct and wrong.

So: correct + concise (3) > correct + rambling (2..2.25) > wrong + concise (1) > wrong + rambling (0..0.25)
> garbage (-1). :func:`prefer` calls two scores within :data:`TIE_TOLERANCE` a tie (a length difference of
a couple of words is no preference).

Correctness: after normalization (case, accents, punctuation, thousands separators, number words to
digits: "Forty-two" -> "42"), the answer or an alias appears as whole words, not right after a negation
("not Paris"), and no conflicting candidate answer appears before it. Candidates are the other answers of
the same category in the shipped prompt set (plus well-known non-capital cities for capitals), minus
words that occur in the question itself ("the opposite of hot is cold" does not assert "hot"). For a
numeric answer every number is a candidate except the question's own numbers ("17 + 25 = 42" is right,
"43, no 42" is wrong). Deterministic, no model, well under a millisecond per call.

Known blind spots, accepted for a demo (they push toward answering first, the preference anyway): a
wrong answer outside the candidate list is no conflict ("Bordeaux is the capital, Paris the largest
city" passes); a number stated before the answer conflicts even when it is a step ("3 feet in a yard,
so 4 yards is 12 feet" fails); Latin-script gibberish is not recognised as garbage.
"""

from __future__ import annotations

import math
import re
import unicodedata
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from .data import PromptRecord, load_demo_prompts
from .errors import UserError

Scorer = Callable[[Any, str], float]

GARBAGE_SCORE = -1.0
CORRECT_BONUS = 2.0
CONCISE_WORDS = 12
RAMBLING_WORDS = 60
FINISHED_FLOOR = 0.25
TIE_TOLERANCE = 0.05

# Big cities that are the capital of no country in the prompt set, but that a small model often gives
# for one; said before the right answer, they make the response wrong.
NON_CAPITAL_CITIES = tuple(
    "Sydney, Melbourne, Toronto, Montreal, Vancouver, New York, Los Angeles, Chicago, Rio de Janeiro, "
    "Sao Paulo, Istanbul, Lagos, Karachi, Mumbai, Kolkata, Shanghai, Hong Kong, Osaka, Auckland, Zurich, "
    "Geneva, Milan, Barcelona, Munich, Frankfurt, Hamburg, Lyon, Marseille, Saint Petersburg, "
    "St Petersburg, Almaty, Dubai, Jeddah, Casablanca, Alexandria, Johannesburg, Cape Town, "
    "Ho Chi Minh City, Guadalajara, Porto, Krakow, Edinburgh, Manchester".split(", ")
)

_SMALL_WORDS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
_TEN_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety"
_SMALL = {word: i for i, word in enumerate((_SMALL_WORDS + " sixteen seventeen eighteen nineteen").split())}
_TENS = {word: 10 * i for i, word in enumerate(_TEN_WORDS.split(), start=2)}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_NEGATIONS = {"not", "no", "never", "t"}  # "t" is what "isn't" / "wasn't" leave after normalization
_FINISHED = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*$")  # ends a sentence: . ! ? ... then closing quotes/brackets


# ------------------------------------------------------------------------------------------ normalization


def _word_kind(word: str) -> str | None:
    if word in _SMALL:
        return "unit" if _SMALL[word] < 10 else "teen"
    if word in _TENS:
        return "ten"
    if word == "hundred":
        return "hundred"
    if word in _SCALES:
        return "scale"
    return None


# Which number word may follow which ("twenty one", "one hundred and five", "two thousand", ...)
_FOLLOWS = {
    None: {"unit", "teen", "ten"},
    "unit": {"hundred", "scale"},
    "teen": {"hundred", "scale"},
    "ten": {"unit", "scale"},
    "hundred": {"unit", "teen", "ten", "scale"},
    "scale": {"unit", "teen", "ten"},
}


def _is_joining_and(words: list[str], i: int, prev: str | None) -> bool:
    """Is words[i] the "and" inside a number ("one hundred and five", "two thousand and one")?"""
    return (
        words[i] == "and"
        and prev in ("hundred", "scale")
        and i + 1 < len(words)
        and _word_kind(words[i + 1]) in ("unit", "teen", "ten")
    )


def _read_number(words: list[str], start: int) -> tuple[int | None, int]:
    """Parse the longest number-word phrase at ``words[start]``; -> (value or None, index after it)."""
    total, current, prev = 0, 0, None
    value, end, i = None, start, start
    while i < len(words):
        if _is_joining_and(words, i, prev):
            i += 1
            continue
        word, kind = words[i], _word_kind(words[i])
        if kind not in _FOLLOWS[prev] or (prev == "ten" and word == "zero"):
            break
        if kind in ("unit", "teen"):
            current += _SMALL[word]
        elif kind == "ten":
            current += _TENS[word]
        elif kind == "hundred":
            current *= 100
        else:  # thousand, million, billion close a group
            total, current = total + current * _SCALES[word], 0
        prev, i = kind, i + 1
        value, end = total + current, i
    return value, end


def _numbers_to_digits(words: list[str]) -> list[str]:
    """Replace each number-word phrase by its digits: ["forty", "two", "apples"] -> ["42", "apples"]."""
    out, i = [], 0
    while i < len(words):
        value, end = _read_number(words, i)
        if value is None:
            out.append(words[i])
            i += 1
        else:
            out.append(str(value))
            i = end
    return out


def normalize(text: str) -> str:
    """Lower-case words separated by single spaces: accents, punctuation and number words resolved.

    "The answer is Forty-Two." -> "the answer is 42"; "Bogotá, D.C." -> "bogota d c"; "5,000 g" ->
    "5000 g"; "H2O" -> "h 2 o" (digits and letters are split, on both sides of a comparison alike).
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # thousands separators
    text = re.sub(r"[^a-z0-9.]+", " ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # a dot survives only inside a number
    text = re.sub(r"(?<=\d)(?=[a-z])|(?<=[a-z])(?=\d)", " ", text)
    return " ".join(_numbers_to_digits(text.split()))


def _as_number(normalized: str) -> float | None:
    return float(normalized) if _NUMBER.fullmatch(normalized) else None


# ---------------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class _Question:
    """What the rubric needs from a record, normalized once."""

    text: str  # normalized question text (all prompt messages)
    gold: tuple[str, ...]  # normalized answer and aliases
    category: str | None
    number: float | None  # the answer as a number when it is one


def _question(record: PromptRecord | Mapping[str, Any]) -> _Question:
    """Read prompt, answer, aliases and category from a PromptRecord, a prompt-set row or {..., "meta"}."""
    if isinstance(record, PromptRecord):
        fields: Mapping[str, Any] = {**record.meta, "prompt": record.prompt}
    elif isinstance(record, Mapping):
        fields = {**(record.get("meta") or {}), **record}
    else:
        raise TypeError(f"rubric: expected a PromptRecord or a dict, got {type(record).__name__}")
    answer = fields.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("rubric: the record has no 'answer' (a non-empty string, as in the prompt set)")
    prompt = fields.get("prompt", "")
    text = prompt if isinstance(prompt, str) else "\n".join(m.get("content", "") for m in prompt)
    gold = tuple(dict.fromkeys(g for g in map(normalize, [answer, *(fields.get("aliases") or [])]) if g))
    if not gold:
        raise ValueError(f"rubric: the answer {answer!r} has no letters or digits to match")
    return _Question(normalize(text), gold, fields.get("category"), _as_number(gold[0]))


@lru_cache(maxsize=1)
def _candidates_by_category() -> dict[str, frozenset[str]]:
    """Every normalized answer and alias of the shipped prompt set, grouped by category."""
    table: dict[str, set[str]] = {}
    for record in load_demo_prompts():
        names = [record.meta["answer"], *record.meta.get("aliases", [])]
        table.setdefault(record.meta["category"], set()).update(filter(None, map(normalize, names)))
    table.setdefault("capital", set()).update(map(normalize, NON_CAPITAL_CITIES))
    return {category: frozenset(names) for category, names in table.items()}


# -------------------------------------------------------------------------------------------------- checks


def _spans(phrase: str, text: str) -> list[tuple[int, int]]:
    """Whole-word occurrences of ``phrase`` in ``text`` (both normalized), as (start, end) offsets."""
    padded, needle, spans, at = f" {text} ", f" {phrase} ", [], 0
    while (at := padded.find(needle, at)) != -1:
        spans.append((at, at + len(phrase)))
        at += 1
    return spans


def _negated(text: str, start: int) -> bool:
    """Is the word before offset ``start`` of ``text`` a negation ("not Paris", "isn't Paris")?"""
    before = text[: max(start - 1, 0)].split()
    return bool(before) and before[-1] in _NEGATIONS


def is_correct(record: PromptRecord | Mapping[str, Any], response: str) -> bool:
    """Does the response give the record's answer (or an alias) before any conflicting answer?"""
    question, text = _question(record), normalize(response)
    if question.number is not None:
        prompt_numbers = {float(w) for w in question.text.split() if _NUMBER.fullmatch(w)} - {question.number}
        said = [float(w) for w in text.split() if _NUMBER.fullmatch(w) and float(w) not in prompt_numbers]
        return bool(said) and math.isclose(said[0], question.number, rel_tol=1e-9, abs_tol=1e-9)
    gold_spans = [span for phrase in question.gold for span in _spans(phrase, text)]
    asserted = [start for start, _ in gold_spans if not _negated(text, start)]
    if not asserted:
        return False
    first_gold = min(asserted)
    pool = _candidates_by_category().get(question.category or "", frozenset())
    rivals = [c for c in pool if c not in question.gold and not _spans(c, question.text)]
    for rival in rivals:
        for start, end in _spans(rival, text):
            inside_gold = any(start < g_end and g_start < end for g_start, g_end in gold_spans)
            if start < first_gold and not inside_gold:
                return False
    return True


def garbage_reason(response: str) -> str | None:
    """Why the response is garbage ("empty", "symbols", "non-English", "repetitive"), or None if it is not."""
    stripped = response.strip()
    if not any(ch.isalnum() for ch in stripped):
        return "empty"
    visible = [ch for ch in stripped if not ch.isspace()]
    if sum(ch.isalnum() for ch in visible) < 0.5 * len(visible):
        return "symbols"
    letters = [ch for ch in unicodedata.normalize("NFKD", stripped) if ch.isalpha()]
    if letters and sum(ch.isascii() for ch in letters) < 0.8 * len(letters):
        return "non-English"
    words = re.findall(r"\w+", stripped.lower())
    trigrams = list(zip(words, words[1:], words[2:]))
    if len(trigrams) >= 6 and len(set(trigrams)) < 0.5 * len(trigrams):
        return "repetitive"
    data = stripped.encode()
    if len(data) >= 64 and len(zlib.compress(data, 9)) < 0.25 * len(data):
        return "repetitive"
    return None


def brevity(response: str) -> float:
    """1.0 up to CONCISE_WORDS words. Longer: 0.0 if the reply trails off (no sentence-ending punctuation
    at the end); otherwise falling linearly from 1.0 to FINISHED_FLOOR at RAMBLING_WORDS words and beyond."""
    n_words = len(response.split())
    if n_words <= CONCISE_WORDS:
        return 1.0
    if not _FINISHED.search(response.rstrip()):
        return 0.0
    fraction = min(1.0, (RAMBLING_WORDS - min(n_words, RAMBLING_WORDS)) / (RAMBLING_WORDS - CONCISE_WORDS))
    return FINISHED_FLOOR + (1.0 - FINISHED_FLOOR) * fraction


# --------------------------------------------------------------------------------------------- the rubric


def score(record: PromptRecord | Mapping[str, Any], response: str) -> float:
    """The demo rubric's score of ``response``: garbage -1; otherwise brevity (0..1), plus 2 if correct."""
    if garbage_reason(response) is not None:
        return GARBAGE_SCORE
    return (CORRECT_BONUS if is_correct(record, response) else 0.0) + brevity(response)


def prefer(
    record: PromptRecord | Mapping[str, Any],
    response_a: str,
    response_b: str,
    *,
    scorer: Scorer = score,
    tolerance: float = TIE_TOLERANCE,
) -> Literal["a", "b", "tie"]:
    """Which response the scripted annotator prefers; "tie" when the scores differ by <= ``tolerance``.

    Symmetric by construction: prefer(r, a, b) == "a" exactly when prefer(r, b, a) == "b".
    """
    score_a, score_b = scorer(record, response_a), scorer(record, response_b)
    if abs(score_a - score_b) <= tolerance:
        return "tie"
    return "a" if score_a > score_b else "b"


RUBRICS: dict[str, Scorer] = {"demo": score}


def get_rubric(name: str) -> Scorer:
    """The scoring function registered as ``name`` (``score(record, response) -> float``)."""
    try:
        return RUBRICS[name]
    except KeyError:
        raise UserError(f"unknown rubric {name!r}; known rubrics: {sorted(RUBRICS)}") from None
