"""trainer/data.py: loading every format and form, validation messages, splits, writing, tokenization,
and the shipped demo prompt set."""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from fastrlhf.trainer.data import (
    DEMO_PROMPTS,
    DataError,
    PreferencePair,
    PromptRecord,
    encode_prompt,
    load_demo_prompts,
    load_pairs,
    load_prompts,
    render_prompt,
    split_by_prompt,
    tokenize_pairs,
    write_jsonl,
)

PAIR_ROWS = [
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "source": "a"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon", "source": "b"},
    {"prompt": "What is 2 + 2?", "chosen": "Four.", "rejected": "22", "source": "c"},
]
EXPECTED_PAIRS = [
    PreferencePair([{"role": "user", "content": "What is 2 + 2?"}], "4", "5", None, {"source": "a"}),
    PreferencePair([{"role": "user", "content": "Capital of France?"}], "Paris", "Lyon", None, {"source": "b"}),
    PreferencePair([{"role": "user", "content": "What is 2 + 2?"}], "Four.", "22", None, {"source": "c"}),
]


def write_rows(tmp_path: Path, rows: list[dict], fmt: str, name: str = "data") -> Path:
    """Write rows as JSONL, Parquet (through pandas), a saved Dataset or a saved DatasetDict ('train')."""
    if fmt == "jsonl":
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        import pandas as pd

        path = tmp_path / f"{name}.parquet"
        pd.DataFrame(rows).to_parquet(path)
    elif fmt in ("saved", "saved_dict"):
        import datasets

        path = tmp_path / name
        ds = datasets.Dataset.from_list(rows)
        (datasets.DatasetDict({"train": ds}) if fmt == "saved_dict" else ds).save_to_disk(str(path))
    else:
        raise AssertionError(fmt)
    return path


FORMATS = ["jsonl", "parquet", "saved", "saved_dict"]


def error_of(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    return str(info.value)


# ------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_pairs_each_format(tmp_path, fmt):
    assert load_pairs(write_rows(tmp_path, PAIR_ROWS, fmt)) == EXPECTED_PAIRS


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_prompts_each_format_keeps_extra_fields_as_meta(tmp_path, fmt):
    rows = [
        {"prompt": "What is 17 + 25?", "answer": "42", "category": "arithmetic"},
        {"prompt": "Capital of Peru?", "answer": "Lima", "category": "capital"},
    ]
    records = load_prompts(write_rows(tmp_path, rows, fmt))
    assert records == [
        PromptRecord([{"role": "user", "content": "What is 17 + 25?"}], {"answer": "42", "category": "arithmetic"}),
        PromptRecord([{"role": "user", "content": "Capital of Peru?"}], {"answer": "Lima", "category": "capital"}),
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_column_mapping(tmp_path, fmt):
    rows = [
        {"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "source": r["source"]} for r in PAIR_ROWS
    ]
    path = write_rows(tmp_path, rows, fmt)
    pairs = load_pairs(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert pairs == EXPECTED_PAIRS  # mapped columns are not repeated in meta
    prompts = load_prompts(path, columns={"prompt": "question"})
    assert prompts[1] == PromptRecord(
        [{"role": "user", "content": "Capital of France?"}], {"good": "Paris", "bad": "Lyon", "source": "b"}
    )


def test_column_mapping_rejects_unknown_field(tmp_path):
    path = write_rows(tmp_path, PAIR_ROWS, "jsonl")
    with pytest.raises(
        ValueError,
        match=r"unknown field 'answer'.*"
        r"\['prompt', 'chosen', 'rejected', 'margin', 'score_chosen', 'score_rejected'\]",
    ):
        load_pairs(path, columns={"answer": "x"})


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_margin_column(tmp_path, fmt):
    rows = [dict(r, margin=m) for r, m in zip(PAIR_ROWS, [1.5, None, 3])]
    pairs = load_pairs(write_rows(tmp_path, rows, fmt))
    assert [p.margin for p in pairs] == [1.5, None, 3.0]
    assert all("margin" not in p.meta for p in pairs)
    assert isinstance(pairs[2].margin, float)


def test_mapped_margin_column_is_required_and_typed(tmp_path):
    rows = [dict(r, strength=2.0) for r in PAIR_ROWS]
    path = write_rows(tmp_path, rows, "jsonl")
    assert [p.margin for p in load_pairs(path, columns={"margin": "strength"})] == [2.0, 2.0, 2.0]
    message = error_of(
        lambda: load_pairs(write_rows(tmp_path, PAIR_ROWS, "jsonl", "nomargin"), columns={"margin": "strength"})
    )
    assert "line 1: field 'strength': missing" in message
    bad = write_rows(
        tmp_path,
        [dict(PAIR_ROWS[0], margin="high"), dict(PAIR_ROWS[1], margin=True), dict(PAIR_ROWS[2], margin=float("nan"))],
        "jsonl",
        "bad",
    )
    message = error_of(lambda: load_pairs(bad))
    assert "line 1: field 'margin': expected a number or null, got str" in message
    assert "line 2: field 'margin': expected a number or null, got bool" in message
    assert "line 3: field 'margin': expected a finite number, got nan" in message


def as_chat(row: dict) -> dict:
    """The conversational form of a plain row: prompt as a user turn, responses as assistant turns."""
    return dict(
        row,
        prompt=[{"role": "user", "content": row["prompt"]}],
        chosen=[{"role": "assistant", "content": row["chosen"]}],
        rejected=[{"role": "assistant", "content": row["rejected"]}],
    )


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_conversational_and_plain_forms_give_identical_records(tmp_path, fmt):
    plain = load_pairs(write_rows(tmp_path, PAIR_ROWS, fmt, "plain"))
    chat = load_pairs(write_rows(tmp_path, [as_chat(r) for r in PAIR_ROWS], fmt, "chat"))
    assert chat == plain == EXPECTED_PAIRS


def test_forms_may_mix_within_a_jsonl_file(tmp_path):
    chat = [as_chat(r) for r in PAIR_ROWS]
    rows = [chat[0], dict(chat[1], chosen="Paris"), dict(PAIR_ROWS[2], chosen=chat[2]["chosen"])]
    assert load_pairs(write_rows(tmp_path, rows, "jsonl")) == EXPECTED_PAIRS


def test_multi_turn_prompt_and_multi_message_response(tmp_path):
    row = {
        "prompt": [
            {"role": "system", "content": "Be brief.", "name": "ignored"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Capital of Peru?"},
        ],
        "chosen": [{"role": "assistant", "content": "Lima."}, {"role": "assistant", "content": "It is on the coast."}],
        "rejected": "Cusco",
    }
    (pair,) = load_pairs(write_rows(tmp_path, [row], "jsonl"))
    assert [m["role"] for m in pair.prompt] == ["system", "user", "assistant", "user"]
    assert pair.prompt[0] == {"role": "system", "content": "Be brief."}  # only role and content are kept
    assert pair.chosen == "Lima.\n\nIt is on the coast."


# ------------------------------------------------------- implicit prompts, Anthropic-HH, scores, messages


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def lines_of(message: str, path: Path) -> list[str]:
    """The per-row lines of a DataError, without the '<path>: ' each starts with."""
    return [line.removeprefix(f"  {path}: ") for line in message.splitlines()[1:]]


IMPLICIT_ROWS = [
    {  # a system turn belongs to the prompt
        "chosen": [msg("system", "Be brief."), msg("user", "Capital of Peru?"), msg("assistant", "Lima.")],
        "rejected": [msg("system", "Be brief."), msg("user", "Capital of Peru?"), msg("assistant", "Cusco.")],
        "id": 1,
    },
    {  # earlier turns stay in the prompt; the replies after the last shared user turn may be several
        "chosen": [
            msg("user", "Hi"),
            msg("assistant", "Hello!"),
            msg("user", "What is 2 + 2?"),
            msg("assistant", "4"),
            msg("assistant", "Anything else?"),
        ],
        "rejected": [
            msg("user", "Hi"),
            msg("assistant", "Hello!"),
            msg("user", "What is 2 + 2?"),
            msg("assistant", "5"),
        ],
        "id": 2,
    },
]
EXPECTED_IMPLICIT = [
    PreferencePair([msg("system", "Be brief."), msg("user", "Capital of Peru?")], "Lima.", "Cusco.", None, {"id": 1}),
    PreferencePair(
        [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "What is 2 + 2?")],
        "4\n\nAnything else?",
        "5",
        None,
        {"id": 2},
    ),
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_implicit_prompt_conversations(tmp_path, fmt):
    assert load_pairs(write_rows(tmp_path, IMPLICIT_ROWS, fmt)) == EXPECTED_IMPLICIT


def test_implicit_prompt_column_mapping(tmp_path):
    rows = [{"good": r["chosen"], "bad": r["rejected"], "id": r["id"]} for r in IMPLICIT_ROWS]
    path = write_rows(tmp_path, rows, "parquet")
    assert load_pairs(path, columns={"chosen": "good", "rejected": "bad"}) == EXPECTED_IMPLICIT
    # a prompt column mapped explicitly is required, not inferred
    assert "missing column(s) ['question']" in error_of(
        lambda: load_pairs(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    )


def test_implicit_prompt_errors_name_row_and_field(tmp_path):
    u, a = "user", "assistant"
    rows = [
        {"chosen": [msg(u, "a"), msg(a, "x")], "rejected": [msg(u, "b"), msg(a, "y")]},
        {
            "chosen": [msg(u, "q"), msg(a, "x"), msg(u, "more"), msg(a, "y")],
            "rejected": [msg(u, "q"), msg(a, "x"), msg(u, "other"), msg(a, "z")],
        },
        {"chosen": [msg(u, "q"), msg(a, "x"), msg(u, "again")], "rejected": [msg(u, "q"), msg(a, "y")]},
        {"chosen": [msg(u, "q"), msg(a, "x")], "rejected": [msg(u, "q"), msg(a, "x")]},
        {"chosen": [msg(u, "q")], "rejected": [msg(u, "q"), msg(a, "y")]},
        {"chosen": [msg("system", "s"), msg(a, "x")], "rejected": [msg("system", "s"), msg(a, "y")]},
        {"chosen": "The sky is blue.", "rejected": "The sky is green.", "id": 7},
        {"chosen": [msg(u, "q"), msg(a, "x")], "rejected": "y"},
        {"chosen": [msg(u, "q"), msg(a, "")], "rejected": [msg(u, "q"), msg(a, "y")]},
    ]
    path = write_rows(tmp_path, rows, "jsonl")
    assert lines_of(error_of(lambda: load_pairs(path)), path) == [
        "line 1: field 'rejected': no opening turns in common with 'chosen'; without a prompt column, "
        "the prompt is the messages both conversations start with",
        "line 2: field 'rejected': the turns shared with 'chosen' end with message 2, role 'assistant'; "
        "an implicit prompt must end with a user turn",
        "line 3: field 'chosen[2].role': after the shared prompt only 'assistant' turns may follow, got 'user'",
        "line 4: field 'rejected': the same conversation as 'chosen': no prompt and replies to tell apart",
        "line 5: field 'chosen': no reply after the prompt the two conversations share",
        "line 6: field 'rejected': the turns shared with 'chosen' end with message 1, role 'system'; "
        "an implicit prompt must end with a user turn",
        "line 7: field 'prompt': missing (fields present: chosen, rejected, id); without it, 'chosen' and "
        "'rejected' must be whole conversations (lists of messages) that share their opening turns, "
        "or Anthropic-HH text starting '\\n\\nHuman:'",
        "line 8: field 'rejected': expected a list of messages (a whole conversation, like the other side), got str",
        "line 9: field 'chosen[1].content': empty string",
    ]


def hh(*turns: str) -> str:
    """Anthropic-HH text from alternating turns, Human first, as the dataset writes it."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


HH_ROWS = [
    {
        "chosen": hh("Hi there", "Hello! How can I help?", "Name two primes.", "2 and 3.\n\nBoth are prime."),
        "rejected": hh("Hi there", "Hello! How can I help?", "Name two primes.", "4 and 6."),
    },
    {  # the text around a turn is stripped; one turn
        "chosen": "\n\nHuman:  What is 2 + 2? \n\nAssistant:4 ",
        "rejected": "\n\nHuman:  What is 2 + 2? \n\nAssistant: 5\n",
    },
]
EXPECTED_HH = [
    PreferencePair(
        [msg("user", "Hi there"), msg("assistant", "Hello! How can I help?"), msg("user", "Name two primes.")],
        "2 and 3.\n\nBoth are prime.",  # a blank line inside a reply is not a turn boundary
        "4 and 6.",
    ),
    PreferencePair([msg("user", "What is 2 + 2?")], "4", "5"),
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_anthropic_hh_text(tmp_path, fmt):
    assert load_pairs(write_rows(tmp_path, HH_ROWS, fmt)) == EXPECTED_HH


def test_anthropic_hh_errors_name_row_and_field(tmp_path):
    rows = [
        {"chosen": hh("q", ""), "rejected": hh("q", "b")},
        {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": hh("q", "b")},
        {"chosen": hh("q", "a", "again"), "rejected": hh("q", "b")},
        {"chosen": hh("hi", "hello", "q", "a"), "rejected": hh("hi", "hey", "q", "b")},
        {"chosen": hh("q", "a"), "rejected": hh("other q", "b")},
        {"chosen": hh("q", "a"), "rejected": "Human: q\n\nAssistant: b"},
        {"chosen": [msg("user", "q"), msg("assistant", "a")], "rejected": hh("q", "b")},
        {"chosen": hh("", "a"), "rejected": hh("q", "b")},
        {"chosen": hh("q", "a"), "rejected": hh("q", "a", "more") + "\n\nAssistant: b"},
    ]
    path = write_rows(tmp_path, rows, "jsonl")
    assert lines_of(error_of(lambda: load_pairs(path)), path) == [
        "line 1: field 'chosen': empty final Assistant reply (turn 2)",
        "line 2: field 'chosen': empty final Assistant reply (turn 2)",
        "line 3: field 'chosen': Anthropic-HH text must end with an Assistant turn; turn 3 is Human",
        "line 4: field 'rejected': the conversation before the final Assistant reply differs from 'chosen' (at turn 2)",
        "line 5: field 'rejected': the conversation before the final Assistant reply differs from 'chosen' (at turn 1)",
        "line 6: field 'rejected': 'chosen' is Anthropic-HH text, so this must be too (starting "
        "'\\n\\nHuman:'); got str starting 'Human: q\\n\\nAssistant:'",
        "line 7: field 'chosen': 'rejected' is Anthropic-HH text, so this must be too (starting "
        "'\\n\\nHuman:'); got list",
        "line 8: field 'chosen': Anthropic-HH turn 1 (Human) is empty",
        "line 9: field 'rejected': the conversation before the final Assistant reply differs from 'chosen' (at turn 2)",
    ]


def test_anthropic_hh_with_equal_replies_is_skipped_like_any_equal_pair(tmp_path, caplog):
    rows = [HH_ROWS[0], {"chosen": hh("q", "same"), "rejected": hh("q", " same ")}]
    path = write_rows(tmp_path, rows, "jsonl")
    with caplog.at_level(logging.WARNING, logger="fastrlhf.trainer.data"):
        assert load_pairs(path) == EXPECTED_HH[:1]
    assert "skipped 1 of 2 pairs whose chosen == rejected (rows 2)" in caplog.text


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_scores_give_the_margin_unless_a_margin_is_given(tmp_path, fmt):
    rows = [
        dict(PAIR_ROWS[0], score_chosen=9.0, score_rejected=2.5),
        dict(PAIR_ROWS[1], score_chosen=7, score_rejected=None),  # one score missing: no margin
        dict(PAIR_ROWS[2], score_chosen=1.0, score_rejected=4.0),  # a worse "chosen": the margin says so
    ]
    pairs = load_pairs(write_rows(tmp_path, rows, fmt))
    assert [p.margin for p in pairs] == [6.5, None, -3.0]
    assert [p.meta for p in pairs] == [
        {"source": "a", "score_chosen": 9.0, "score_rejected": 2.5},
        {"source": "b", "score_chosen": 7, "score_rejected": None},
        {"source": "c", "score_chosen": 1.0, "score_rejected": 4.0},
    ]
    with_margin = [dict(r, margin=m) for r, m in zip(rows, [1.0, 2.0, None])]
    pairs = load_pairs(write_rows(tmp_path, with_margin, fmt, "with_margin"))
    assert [p.margin for p in pairs] == [1.0, 2.0, None]  # the margin column wins, null included


def test_ultrafeedback_binarized_row(tmp_path):
    """prompt string + whole conversations in chosen / rejected + scores + a messages column."""
    question = "Name a prime."
    row = {
        "prompt": question,
        "prompt_id": "abc",
        "chosen": [msg("user", question), msg("assistant", "7")],
        "rejected": [msg("user", question), msg("assistant", "8")],
        "messages": [msg("user", question), msg("assistant", "7")],
        "score_chosen": 8.5,
        "score_rejected": 3.0,
    }
    (pair,) = load_pairs(write_rows(tmp_path, [row], "parquet"))
    assert pair == PreferencePair(
        [msg("user", question)],
        "7",
        "8",
        5.5,
        {"prompt_id": "abc", "messages": row["messages"], "score_chosen": 8.5, "score_rejected": 3.0},
    )


def test_score_errors_and_mapped_score_columns(tmp_path):
    rows = [
        dict(PAIR_ROWS[0], score_chosen="high", score_rejected=1.0),
        dict(PAIR_ROWS[1], score_chosen=1.0, score_rejected=True),
        dict(PAIR_ROWS[2], score_chosen=float("inf"), score_rejected=1.0),
        dict(PAIR_ROWS[2], margin=1.0, score_chosen=[1], score_rejected=1.0),  # checked even when margin wins
    ]
    path = write_rows(tmp_path, rows, "jsonl")
    assert lines_of(error_of(lambda: load_pairs(path)), path) == [
        "line 1: field 'score_chosen': expected a number or null, got str",
        "line 2: field 'score_rejected': expected a number or null, got bool",
        "line 3: field 'score_chosen': expected a finite number, got inf",
        "line 4: field 'score_chosen': expected a number or null, got list",
    ]
    mapped = [dict(PAIR_ROWS[0], rating_good=3, rating_bad=1), dict(PAIR_ROWS[1], rating_good=2)]
    path = write_rows(tmp_path, mapped, "jsonl", "mapped")
    columns = {"score_chosen": "rating_good", "score_rejected": "rating_bad"}
    assert lines_of(error_of(lambda: load_pairs(path, columns=columns)), path) == [
        "line 2: field 'rating_bad': missing (fields present: prompt, chosen, rejected, source, rating_good)"
    ]
    assert load_pairs(path, columns={"score_chosen": "rating_good"})[0].margin is None  # no rejected score
    assert load_pairs(write_rows(tmp_path, mapped[:1], "jsonl", "ok"), columns=columns)[0].margin == 2.0


MESSAGES_ROWS = [
    {"messages": [msg("user", "What is 2 + 2?")], "id": 1},
    {"messages": [msg("system", "Be brief."), msg("user", "Capital of Peru?"), msg("assistant", "Lima.")], "id": 2},
    {
        "messages": [
            msg("user", "Hi"),
            msg("assistant", "Hello!"),
            msg("user", "Name a prime."),
            msg("assistant", "7"),
            msg("assistant", "Or 11."),
        ],
        "id": 3,
    },
]
EXPECTED_MESSAGES = [
    PromptRecord([msg("user", "What is 2 + 2?")], {"id": 1}),
    PromptRecord([msg("system", "Be brief."), msg("user", "Capital of Peru?")], {"id": 2, "reference_reply": "Lima."}),
    PromptRecord(
        [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Name a prime.")],
        {"id": 3, "reference_reply": "7\n\nOr 11."},
    ),
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_prompts_from_messages(tmp_path, fmt):
    assert load_prompts(write_rows(tmp_path, MESSAGES_ROWS, fmt)) == EXPECTED_MESSAGES


def test_prompts_from_messages_round_trip_mapping_and_precedence(tmp_path):
    records = load_prompts(write_rows(tmp_path, MESSAGES_ROWS, "jsonl"))
    assert load_prompts(write_jsonl(tmp_path / "again.jsonl", records)) == records
    renamed = [{"conversation": r["messages"], "id": r["id"]} for r in MESSAGES_ROWS]
    path = write_rows(tmp_path, renamed, "parquet", "renamed")
    assert load_prompts(path, columns={"messages": "conversation"}) == EXPECTED_MESSAGES
    both = {"prompt": "Explicit?", "messages": [msg("user", "From messages?")]}
    assert load_prompts(write_rows(tmp_path, [both], "jsonl", "both")) == [
        PromptRecord([msg("user", "Explicit?")], {"messages": [msg("user", "From messages?")]})
    ]


def test_prompts_from_messages_errors(tmp_path):
    rows = [
        {"messages": [msg("system", "s"), msg("assistant", "a")]},
        {"messages": [msg("user", "q"), msg("system", "late")]},
        {"messages": "What is 2 + 2?"},
        {"id": 4},
        {"messages": [msg("user", "q"), msg("assistant", "a")], "reference_reply": "x"},
        {"messages": []},
    ]
    path = write_rows(tmp_path, rows, "jsonl")
    assert lines_of(error_of(lambda: load_prompts(path)), path) == [
        "line 1: field 'messages': no user turn (the prompt is the messages up to and including the last user turn)",
        "line 2: field 'messages[1].role': after the last user turn only 'assistant' turns may follow, got 'system'",
        "line 3: field 'messages': expected a list of messages, got str",
        "line 4: field 'prompt': missing (a prompt row needs 'prompt' or 'messages'; fields present: id)",
        "line 5: field 'reference_reply': the row has its own 'reference_reply' column, where the reply that "
        "ends 'messages' would be kept; rename one",
        "line 6: field 'messages': empty list of messages",
    ]
    neither = write_rows(tmp_path, [{"text": "x"}], "parquet")
    assert error_of(lambda: load_prompts(neither)) == (
        f"{neither}: missing column 'prompt' or 'messages'; columns present: ['text']"
    )


# ---------------------------------------------------------------------------------------------- bad input


def test_empty_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert error_of(lambda: load_pairs(empty)) == f"{empty}: empty file (no rows)"
    import pandas as pd

    parquet = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(parquet)
    assert error_of(lambda: load_prompts(parquet)) == f"{parquet}: empty file (no rows)"


def test_malformed_json_line_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIR_ROWS[0]) + "\n\n" + '{"prompt": "x", "chosen": \n')
    message = error_of(lambda: load_pairs(path))
    assert message.startswith(f"{path}: line 3: malformed JSON (")


def test_missing_field_jsonl_names_line_and_field(tmp_path):
    rows = [PAIR_ROWS[0], {"prompt": "p", "chosen": "c"}]
    message = error_of(lambda: load_pairs(write_rows(tmp_path, rows, "jsonl")))
    assert "1 of 2 rows are invalid" in message
    assert "line 2: field 'rejected': missing (fields present: prompt, chosen)" in message


@pytest.mark.parametrize("fmt", ["parquet", "saved"])
def test_missing_column_tabular(tmp_path, fmt):
    rows = [{"prompt": "p", "chosen": "c"}]
    message = error_of(lambda: load_pairs(write_rows(tmp_path, rows, fmt)))
    assert "missing column(s) ['rejected']; columns present: ['prompt', 'chosen']" in message


def test_wrong_types_and_empty_strings_name_row_and_field(tmp_path):
    rows = [
        {"prompt": "p", "chosen": 3, "rejected": "r"},
        {"prompt": "   ", "chosen": "c", "rejected": "r"},
        {"prompt": "p", "chosen": "c", "rejected": ""},
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "c", "rejected": "r"},
        {"prompt": [{"role": "user", "content": 5}], "chosen": "c", "rejected": "r"},
        {
            "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "chosen": "c",
            "rejected": "r",
        },
        {"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
        ["not", "an", "object"],
        {"prompt": None, "chosen": "c", "rejected": "r"},
        {"prompt": [], "chosen": "c", "rejected": "r"},
    ]
    message = error_of(lambda: load_pairs(write_rows(tmp_path, rows, "jsonl")))
    lines = message.splitlines()[1:]
    assert lines == [
        f"  {tmp_path / 'data.jsonl'}: line {n}: {problem}"
        for n, problem in [
            (1, "field 'chosen': expected a string or a list of assistant messages, got int"),
            (2, "field 'prompt': empty string"),
            (3, "field 'rejected': empty string"),
            (4, "field 'prompt[0].role': expected one of ['system', 'user', 'assistant'], got 'robot'"),
            (5, "field 'prompt[0].content': expected a string, got int"),
            (6, "field 'prompt': the last prompt message must have role 'user', got 'assistant'"),
            (7, "field 'chosen[0].role': response messages must be 'assistant', got 'user'"),
            (8, "expected a JSON object, got list"),
            (9, "field 'prompt': expected a string or a list of messages, got null"),
            (10, "field 'prompt': empty list of messages"),
        ]
    ]
    assert message.splitlines()[0].endswith("10 of 10 rows are invalid:")


def test_wrong_type_in_parquet_names_row(tmp_path):
    rows = [dict(PAIR_ROWS[0]), dict(PAIR_ROWS[1], chosen=None)]
    message = error_of(lambda: load_pairs(write_rows(tmp_path, rows, "parquet")))
    assert "row 2: field 'chosen': expected a string or a list of assistant messages, got null" in message


def test_many_errors_are_counted_not_all_listed(tmp_path):
    rows = [{"prompt": "", "chosen": "c", "rejected": "r"}] * 25
    message = error_of(lambda: load_pairs(write_rows(tmp_path, rows, "jsonl")))
    assert "25 of 25 rows are invalid" in message
    assert message.count("empty string") == 10
    assert message.endswith("... and 15 more")


def test_unreadable_inputs_give_clear_errors_not_library_traces(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"corrupt.parquet: not a readable Parquet file") as info:
        load_pairs(corrupt)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    odd = tmp_path / "data.csv"
    odd.write_text("prompt\nx\n")
    assert "unknown format '.csv'" in error_of(lambda: load_prompts(odd))
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "not one written by datasets' save_to_disk" in error_of(lambda: load_prompts(folder))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")
    saved = write_rows(tmp_path, PAIR_ROWS, "saved_dict")
    assert "no split 'test'; the folder has splits ['train']" in error_of(lambda: load_pairs(saved, split="test"))


def test_identical_chosen_and_rejected_are_skipped_counted_and_logged(tmp_path, caplog):
    rows = [
        PAIR_ROWS[0],
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        PAIR_ROWS[1],
        {"prompt": "q", "chosen": "same ", "rejected": " same"},  # equal after stripping
    ]
    path = write_rows(tmp_path, rows, "jsonl")
    with caplog.at_level(logging.WARNING, logger="fastrlhf.trainer.data"):
        pairs = load_pairs(path)
    assert pairs == EXPECTED_PAIRS[:2]
    (warning,) = caplog.records
    assert warning.getMessage() == f"{path}: skipped 2 of 4 pairs whose chosen == rejected (rows 2, 4)"
    all_same = write_rows(tmp_path, [rows[1]], "jsonl", "same")
    assert "no usable pairs: all 1 rows have chosen == rejected" in error_of(lambda: load_pairs(all_same))


# -------------------------------------------------------------------------------------------------- splits


def make_pairs(n_prompts: int, seed: int = 1) -> list[PreferencePair]:
    """1-4 pairs for each of n_prompts prompts, interleaved."""
    rng = random.Random(seed)
    pairs = [
        PreferencePair([{"role": "user", "content": f"question {i}"}], f"good {j}", f"bad {j}", None, {"i": i})
        for i in range(n_prompts)
        for j in range(rng.randint(1, 4))
    ]
    rng.shuffle(pairs)
    return pairs


def prompt_sets(parts) -> list[set[int]]:
    return [{p.meta["i"] for p in part} for part in parts]


def test_split_by_prompt_never_splits_a_prompt_and_keeps_every_record():
    pairs = make_pairs(200)
    parts = split_by_prompt(pairs)
    sets = prompt_sets(parts)
    assert len(parts) == 3
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sorted(map(id, sum(parts, []))) == sorted(map(id, pairs))
    assert [len(s) for s in sets] == [160, 20, 20]  # exact fractions of the distinct prompts


def test_split_by_prompt_is_deterministic_and_order_independent():
    pairs = make_pairs(97)
    first = split_by_prompt(pairs, seed=3)
    shuffled = list(pairs)
    random.Random(0).shuffle(shuffled)
    again = split_by_prompt(shuffled, seed=3)
    assert prompt_sets(first) == prompt_sets(again)
    assert [p for p in first[1]] == [p for p in pairs if p.meta["i"] in prompt_sets(first)[1]]  # input order kept
    assert prompt_sets(split_by_prompt(pairs, seed=4)) != prompt_sets(first)
    assert [len(s) for s in prompt_sets(first)] == [77, 10, 10]  # 77.6, 9.7, 9.7: the two .7s round up


def test_split_by_prompt_other_fractions_and_prompt_records():
    records = [PromptRecord([{"role": "user", "content": f"q{i}"}], {"i": i}) for i in range(10)]
    train, test = split_by_prompt(records, fractions=(0.7, 0.3))
    assert (len(train), len(test)) == (7, 3)
    for bad in [(0.5, 0.4), (1.2, -0.2), ()]:
        with pytest.raises(ValueError, match="fractions must be non-negative and sum to 1"):
            split_by_prompt(records, fractions=bad)


# ------------------------------------------------------------------------------------------------- writing


def test_write_jsonl_round_trips_and_is_atomic(tmp_path):
    pairs = [
        EXPECTED_PAIRS[0],
        PreferencePair(
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "c", "r", 0.5, {"k": [1]}
        ),
    ]
    path = write_jsonl(tmp_path / "sub" / "pairs.jsonl", pairs)
    assert load_pairs(path) == pairs
    prompts = load_prompts(DEMO_PROMPTS)[:5]
    assert load_prompts(write_jsonl(tmp_path / "prompts.jsonl", prompts)) == prompts
    before = path.read_text()
    with pytest.raises(TypeError):  # not JSON-serializable: the old file stays whole
        write_jsonl(path, [pairs[0], PreferencePair(pairs[0].prompt, "c", "r", None, {"bad": object()})])
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl"]  # no temp file left behind


def test_write_jsonl_refuses_meta_that_clashes_with_fields(tmp_path):
    with pytest.raises(ValueError, match=r"meta keys \['chosen'\] clash"):
        write_jsonl(
            tmp_path / "x.jsonl", [PreferencePair([{"role": "user", "content": "p"}], "c", "r", None, {"chosen": 1})]
        )


# ---------------------------------------------------------------------------------------------- tokenizing

WORDS = (
    "<pad> <eos> <unk> <system> <user> <assistant> user: assistant: "
    "what is two plus four paris lyon the capital of france a b c d e"
).split()
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def make_tokenizer(chat_template: str | None = TEMPLATE):
    """A word-level tokenizer built offline: one id per word in WORDS, <pad>=0, <eos>=1, <unk>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_render_prompt_uses_chat_template_or_plain_fallback(tokenizer):
    messages = [{"role": "system", "content": "a"}, {"role": "user", "content": "what is two plus two"}]
    assert render_prompt(tokenizer, messages) == "<system> a <user> what is two plus two <assistant> "
    assert encode_prompt(tokenizer, messages) == ids("<system> a <user> what is two plus two <assistant>")
    plain = make_tokenizer(chat_template=None)
    assert render_prompt(plain, messages) == "system: a\nuser: what is two plus two\nassistant:"


@pytest.fixture(scope="module")
def base_tokenizer():
    """The default model's real (BPE) tokenizer with its chat template removed, as a base model's is."""
    from fastrlhf.trainer.models import default_model_path, load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    tokenizer.chat_template = None
    return tokenizer


def test_no_chat_template_renders_plain_lines_and_the_reply_follows_without_a_space(base_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    text = "system: Be brief.\nuser: What is 2 + 2?\nassistant:"
    assert render_prompt(base_tokenizer, messages) == text
    batch = tokenize_pairs(base_tokenizer, [PreferencePair(messages, "4", " 5")], max_length=64)

    def encode(s: str) -> list[int]:
        return base_tokenizer.encode(s, add_special_tokens=False)

    eos = base_tokenizer.eos_token_id
    rows = [ids_[mask.bool()].tolist() for ids_, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert rows == [encode(text) + encode("4") + [eos], encode(text) + encode(" 5") + [eos]]
    # no space is added: the model reads "assistant:4" unless the response starts with one
    assert [base_tokenizer.decode(row[:-1]) for row in rows] == [text + "4", text + " 5"]
    assert encode(text) + encode("4") != encode(text + " 4")


def test_tokenize_pairs_shapes_right_padding_and_eos(tokenizer):
    pairs = [
        PreferencePair(user("what is two plus two"), "four", "a b c d"),
        PreferencePair(user("the capital of france"), "paris", "lyon"),
    ]
    batch = tokenize_pairs(tokenizer, pairs, max_length=32)
    expected = [
        ids("<user> what is two plus two <assistant> four <eos>"),
        ids("<user> the capital of france <assistant> paris <eos>"),
        ids("<user> what is two plus two <assistant> a b c d <eos>"),
        ids("<user> the capital of france <assistant> lyon <eos>"),
    ]
    width = max(map(len, expected))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, width)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    for row, want in enumerate(expected):
        assert batch["input_ids"][row].tolist() == want + [0] * (width - len(want))  # right-padded with <pad>
        assert batch["attention_mask"][row].tolist() == [1] * len(want) + [0] * (width - len(want))
    last_real = batch["attention_mask"].sum(1) - 1
    assert batch["input_ids"].gather(1, last_real[:, None]).squeeze(1).tolist() == [1, 1, 1, 1]  # EOS
    assert batch["kept"].tolist() == [0, 1]


def test_tokenize_pairs_cuts_prompt_from_left_keeping_responses(tokenizer, caplog):
    pairs = [PreferencePair(user("what is two plus two"), "four", "a b c")]  # prompt 7 tokens, responses 2 / 4
    with caplog.at_level(logging.INFO, logger="fastrlhf.trainer.data"):
        batch = tokenize_pairs(tokenizer, pairs, max_length=8)
    assert batch["input_ids"].tolist() == [
        ids("two plus two <assistant> four <eos>") + [0, 0],  # the same 4 prompt tokens on both sides
        ids("two plus two <assistant> a b c <eos>"),
    ]
    assert "cut the prompt from the left in 1 of 1 pairs (max_length=8)" in caplog.text


def test_tokenize_pairs_drops_pairs_that_cannot_fit_and_says_which(tokenizer, caplog):
    pairs = [
        PreferencePair(user("a"), "b c d e", "b"),  # response + EOS = 5 tokens: no room for a prompt token
        PreferencePair(user("a"), "b", "c"),
    ]
    with caplog.at_level(logging.WARNING, logger="fastrlhf.trainer.data"):
        batch = tokenize_pairs(tokenizer, pairs, max_length=5)
    assert batch["kept"].tolist() == [1]
    assert batch["input_ids"].tolist() == [ids("<user> a <assistant> b <eos>"), ids("<user> a <assistant> c <eos>")]
    assert "dropped 1 of 2 pairs" in caplog.text


def test_tokenize_pairs_requires_pad_distinct_from_eos(tokenizer):
    same = make_tokenizer()
    same.pad_token = "<eos>"
    with pytest.raises(ValueError, match="pad_token_id .* must be set and differ from eos_token_id"):
        tokenize_pairs(same, EXPECTED_PAIRS, max_length=16)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        tokenize_pairs(tokenizer, EXPECTED_PAIRS, max_length=1)


# ---------------------------------------------------------------------------------------- shipped prompt set


@pytest.fixture(scope="module")
def demo_prompts() -> list[PromptRecord]:
    return load_demo_prompts()


def test_demo_prompt_set_shape(demo_prompts):
    assert len(demo_prompts) >= 300
    ids_ = [r.meta["id"] for r in demo_prompts]
    assert len(set(ids_)) == len(ids_)
    texts = [r.prompt[-1]["content"] for r in demo_prompts]
    assert len(set(texts)) == len(texts)
    for r in demo_prompts:
        assert set(r.meta) == {"id", "answer", "aliases", "category"}
        assert isinstance(r.meta["answer"], str) and r.meta["answer"].strip()
        assert all(isinstance(a, str) and a.strip() for a in r.meta["aliases"])
        assert len(r.prompt) == 1 and r.prompt[0]["content"].endswith("?")


def test_demo_prompt_categories_are_balanced(demo_prompts):
    counts = Counter(r.meta["category"] for r in demo_prompts)
    assert set(counts) == {"capital", "arithmetic", "unit_conversion", "opposite", "colour", "animal", "fact"}
    for category, n in counts.items():
        assert 0.08 <= n / len(demo_prompts) <= 0.2, (category, n)


def test_demo_arithmetic_answers_are_right(demo_prompts):
    ops = {"+": "+", "-": "-", "times": "*", "divided by": "/"}
    checked = 0
    for r in demo_prompts:
        if r.meta["category"] != "arithmetic":
            continue
        a, op, b = re.fullmatch(r"What is (\d+) (\+|-|times|divided by) (\d+)\?", r.prompt[0]["content"]).groups()
        value = eval(f"{a} {ops[op]} {b}")  # noqa: S307 - digits and one operator, matched above
        assert value == int(value) and str(int(value)) == r.meta["answer"], r.meta["id"]
        assert r.meta["answer"] not in (a, b)  # an echo of an operand can never look right
        checked += 1
    assert checked >= 60


def test_demo_unit_conversion_answers_are_right(demo_prompts):
    factor = {
        ("meters", "centimeters"): 100,
        ("kilometers", "meters"): 1000,
        ("centimeters", "millimeters"): 10,
        ("kilograms", "grams"): 1000,
        ("liters", "milliliters"): 1000,
        ("hours", "minutes"): 60,
        ("minutes", "seconds"): 60,
        ("days", "hours"): 24,
        ("weeks", "days"): 7,
        ("years", "months"): 12,
        ("feet", "inches"): 12,
        ("yards", "feet"): 3,
        ("pounds", "ounces"): 16,
        ("gallons", "quarts"): 4,
        ("dollars", "cents"): 100,
        ("dozen", "eggs"): 12,
        ("decades", "years"): 10,
        ("centuries", "years"): 100,
    }
    rows = [r for r in demo_prompts if r.meta["category"] == "unit_conversion"]
    for r in rows:
        to_unit, n, from_unit = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", r.prompt[0]["content"]).groups()
        assert int(r.meta["answer"]) == int(n) * factor[from_unit, to_unit], r.meta["id"]
    assert len(rows) >= 50


def test_demo_capitals_spot_check(demo_prompts):
    answers = {r.prompt[0]["content"]: r.meta["answer"] for r in demo_prompts if r.meta["category"] == "capital"}
    assert answers["What is the capital of Australia?"] == "Canberra"
    assert answers["What is the capital of Canada?"] == "Ottawa"
    assert answers["What is the capital of Turkey?"] == "Ankara"
    assert answers["What is the capital of Nigeria?"] == "Abuja"
    assert answers["What is the capital of Brazil?"] == "Brasília"
    for contested in ("Bolivia", "the Netherlands", "South Africa", "Israel", "Switzerland", "Sri Lanka"):
        assert f"What is the capital of {contested}?" not in answers
