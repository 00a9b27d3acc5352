"""Step 1 of RLHF, the data: prompt and preference datasets, splits, derived files, tokenization.

Formats (chosen by the path): ``*.jsonl`` / ``*.ndjson`` (one JSON object a line), ``*.parquet``, and a
folder written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

Every row form below is normalized into one record type, so nothing downstream cares. A "message" is
``{"role": "system" | "user" | "assistant", "content": "<text>"}`` (other keys are dropped); a prompt
given as messages must end with a user turn; a response given as messages must be assistant turns, whose
contents are joined with a blank line. Forms may mix within a file, row by row.

Preference rows (:func:`load_pairs` -> :class:`PreferencePair`):

- explicit prompt, plain: ``{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}`` (a prompt
  string becomes one user turn)
- explicit prompt, conversational: ``{"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
  "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}``
- explicit prompt, whole conversations (UltraFeedback-binarized): ``{"prompt": "What is 2 + 2?",
  "chosen": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
  ...}``: a response list that starts with the row's whole prompt has those messages removed
- implicit prompt, conversational (no ``prompt`` column): ``{"chosen": [{"role": "user", "content":
  "What is 2 + 2?"}, {"role": "assistant", "content": "4"}], "rejected": [{"role": "user", "content":
  "What is 2 + 2?"}, {"role": "assistant", "content": "5"}]}``: the prompt is the longest run of
  messages both conversations open with (it must end with a user turn), each response the assistant
  turn(s) after it. Errors: no shared opening, a shared opening that ends in a system or assistant
  turn, a non-assistant turn after it, a side with no reply, or identical conversations.
- Anthropic-HH text (``Anthropic/hh-rlhf``; no ``prompt`` column):
  ``{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!\\n\\nHuman: 2 + 2?\\n\\nAssistant: 4",
  "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!\\n\\nHuman: 2 + 2?\\n\\nAssistant: 5"}``,
  recognized by its ``"\\n\\nHuman:"`` opening. The text is cut at each ``"\\n\\nHuman:"`` /
  ``"\\n\\nAssistant:"`` into user / assistant turns, each stripped of the whitespace around it. The
  prompt is every turn up to the last Human one (it must be the same in chosen and rejected, or the row
  is an error), the response the final Assistant turn's text (consecutive Assistant turns at the end are
  joined by a blank line). Every turn must have text; an empty final reply is an error. Plain-text
  chosen / rejected without a prompt that are not HH text are an error: TRL's "standard implicit
  prompt" form (a shared text prefix) is not guessed at.
- any of these with ``score_chosen`` / ``score_rejected`` (TRL, UltraFeedback-binarized):
  ``{"prompt": "...", "chosen": "4", "rejected": "5", "score_chosen": 9.0, "score_rejected": 2.5}``
  gives ``margin = score_chosen - score_rejected`` (6.5) when both are numbers; the scores stay in
  ``meta``. An explicit ``margin`` field (``{..., "margin": 1.0}``, a number or null) wins over the
  scores whenever the row has it, null included. Scores and margins must be finite numbers or null.

Prompt rows (:func:`load_prompts` -> :class:`PromptRecord`):

- ``{"prompt": "What is 2 + 2?"}`` or ``{"prompt": [{"role": "system", ...}, {"role": "user", ...}]}``
- ``{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content":
  "4"}]}`` (a row without ``prompt``): the prompt is the messages up to and including the last user
  turn; the assistant turn(s) after it (only assistant turns may follow) are kept, joined by a blank
  line, in ``meta["reference_reply"]`` (here ``"4"``) rather than dropped, so a reference answer is at
  hand for evaluation. A row with both fields uses ``prompt`` and keeps ``messages`` in meta.

Any other columns (``answer``, ``aliases``, ``category``, ``id``...) are kept as ``meta``. ``columns=``
maps the field names above (``PAIR_FIELDS`` / ``PROMPT_FIELDS``) to a file's own column names.

Models without a chat template (base models): :func:`render_prompt` writes one ``"<role>: <content>"``
line per message, then ``"assistant:"`` with no trailing space or newline, e.g.
``"system: Be brief.\\nuser: What is 2 + 2?\\nassistant:"``. The response's tokens follow directly: prompt
and response are tokenized separately and concatenated, and no space is inserted, so the model reads
``"assistant:4"``. To have ``"assistant: 4"``, start each response with a space (``" 4"``), as TRL's
standard-format examples do; the loaders keep a response's leading whitespace as given (HH turns
excepted: they are stripped).

Handling of bad data (documented choices, each tested):

- Broken rows are errors, never skipped: empty file, malformed JSON line, missing column, wrong type,
  empty or whitespace-only string, non-finite margin or score. One :class:`DataError` lists every bad row
  found (the first ten in full, then a count), each as ``<file>: line <n>: field '<name>': <problem>``
  (``line`` is the 1-based physical line of a JSONL file; ``row`` the 1-based row of other formats).
- A pair whose ``chosen`` equals ``rejected`` (after stripping whitespace) carries no preference. It is
  skipped, and one warning logs how many were skipped and their row numbers. If nothing is left, that is
  an error. Blank lines in JSONL are not rows and are ignored.
- :func:`tokenize_pairs` keeps every response whole: a too-long pair has its prompt cut from the left
  (same cut for chosen and rejected, so both are scored in the same context); a pair whose longer
  response + EOS leaves no room for even one prompt token is dropped. Both are counted and logged, and
  the returned ``kept`` tensor says which input pairs the rows came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import MissingFileError, UserError

log = logging.getLogger(__name__)

DEMO_PROMPTS = Path(__file__).resolve().parent / "assets" / "prompts.jsonl"
"""The shipped demo prompt set (short questions with checkable answers; see :func:`load_prompts`)."""

PROMPT_FIELDS = ("prompt", "messages")
PAIR_FIELDS = ("prompt", "chosen", "rejected", "margin", "score_chosen", "score_rejected")
ROLES = ("system", "user", "assistant")
MAX_LISTED_ERRORS = 10
REFERENCE_REPLY = "reference_reply"
"""Meta key of a prompt record read from ``messages``: the assistant reply after the last user turn."""

HH_OPENING = "\n\nHuman:"
"""How an Anthropic-HH (``Anthropic/hh-rlhf``) conversation string starts."""
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}

Message = dict[str, str]


class DataError(UserError):
    """A dataset file cannot be used as given; the message names the file, the row and the field."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: chat messages (``[{"role", "content"}, ...]``) plus the row's other fields as meta.

    Records compare by value; they are frozen (fields are never reassigned) but not hashable, since they
    hold lists. :func:`prompt_key` gives a hashable key for a prompt.
    """

    prompt: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` was preferred over ``rejected`` as the reply to ``prompt``.

    ``margin`` is an optional strength of preference (a number, or None); ``meta`` holds the row's
    other fields.
    """

    prompt: list[Message]
    chosen: str
    rejected: str
    margin: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


Record = TypeVar("Record", PromptRecord, PreferencePair)


class _RowError(Exception):
    """A problem in one field of one row; turned into a line of a DataError by the loaders."""

    def __init__(self, field_name: str | None, problem: str) -> None:
        super().__init__(problem if field_name is None else f"field '{field_name}': {problem}")


# ----------------------------------------------------------------------------------------------- reading


def _read_rows(path: Path, split: str) -> tuple[str, Iterator[tuple[int, Any]], list[str] | None]:
    """-> (unit, iterator of (1-based row number, raw row), column names or None when rows may differ).

    JSONL rows are numbered by physical line (``unit`` = "line"); other formats by row ("row").
    """
    if path.is_dir():
        return "row", *_read_saved_dataset(path, split)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "line", _read_jsonl(path), None
    if suffix == ".parquet":
        return "row", *_read_parquet(path)
    raise DataError(
        f"{path}: unknown format '{suffix or '(no suffix)'}'; expected .jsonl, .ndjson, .parquet "
        "or a folder written by datasets' save_to_disk"
    )


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; a malformed line is a DataError."""
    with path.open("r", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: malformed JSON ({exc.msg} at column {exc.colno})") from None


def _read_parquet(path: Path) -> tuple[Iterator[tuple[int, Any]], list[str]]:
    """Rows of a Parquet file as Python objects; pyarrow failures become one clear DataError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return enumerate(table.to_pylist(), start=1), list(table.column_names)


def _read_saved_dataset(path: Path, split: str) -> tuple[Iterator[tuple[int, Any]], list[str]]:
    """Rows of a ``save_to_disk`` folder; for a DatasetDict, the rows of ``split``."""
    if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        raise DataError(
            f"{path}: a folder, but not one written by datasets' save_to_disk "
            "(it has neither state.json nor dataset_dict.json)"
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises a zoo of types for a damaged folder
        raise DataError(f"{path}: cannot read the saved dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split '{split}'; the folder has splits {sorted(loaded)}")
        loaded = loaded[split]
    return enumerate(loaded.to_list(), start=1), list(loaded.column_names)


# -------------------------------------------------------------------------------------------- validation


def _resolve_columns(columns: Mapping[str, str] | None, known: Sequence[str]) -> dict[str, str]:
    """Map each canonical field name to its column in the file; unknown keys are a clear error."""
    mapping = {name: name for name in known}
    for name, column in (columns or {}).items():
        if name not in known:
            raise UserError(f"columns: unknown field '{name}'; fields that can be mapped: {list(known)}")
        if not isinstance(column, str) or not column:
            raise ValueError(f"columns['{name}'] must be a non-empty column name, got {column!r}")
        mapping[name] = column
    return mapping


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_text(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise _RowError(label, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise _RowError(label, "empty string")
    return value


def _check_messages(value: Any, label: str) -> list[Message]:
    """A non-empty list of {"role", "content"} dicts; keeps only those two keys."""
    if not value:
        raise _RowError(label, "empty list of messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{label}[{i}]"
        if not isinstance(message, Mapping):
            raise _RowError(where, f"expected a message {{'role', 'content'}}, got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _RowError(f"{where}.role", f"expected one of {list(ROLES)}, got {role!r}")
        messages.append({"role": role, "content": _check_text(content, f"{where}.content")})
    return messages


def _to_prompt(value: Any, label: str) -> list[Message]:
    """A prompt as messages: a string becomes one user turn; a list must be messages ending in a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": _check_text(value, label)}]
    if isinstance(value, list):
        messages = _check_messages(value, label)
        if messages[-1]["role"] != "user":
            raise _RowError(label, f"the last prompt message must have role 'user', got '{messages[-1]['role']}'")
        return messages
    raise _RowError(label, f"expected a string or a list of messages, got {_type_name(value)}")


def _join_replies(messages: list[Message]) -> str:
    return "\n\n".join(m["content"] for m in messages)


def _to_response(value: Any, label: str, prompt: list[Message] | None = None) -> str:
    """A response as text: a string, or assistant messages whose contents are joined by a blank line.

    A list that starts with the row's whole ``prompt`` (a full conversation, as UltraFeedback-binarized
    writes it) has those messages removed first.
    """
    if isinstance(value, str):
        return _check_text(value, label)
    if isinstance(value, list):
        messages = _check_messages(value, label)
        start = 0
        if prompt and len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
            start = len(prompt)
        for i, message in enumerate(messages[start:], start=start):
            if message["role"] != "assistant":
                raise _RowError(f"{label}[{i}].role", f"response messages must be 'assistant', got '{message['role']}'")
        return _join_replies(messages[start:])
    raise _RowError(label, f"expected a string or a list of assistant messages, got {_type_name(value)}")


def _to_number(value: Any, label: str) -> float | None:
    """A margin or a score: a finite number, or None for null."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _RowError(label, f"expected a number or null, got {_type_name(value)}")
    if not math.isfinite(value):
        raise _RowError(label, f"expected a finite number, got {value}")
    return float(value)


def _field(row: Mapping[str, Any], column: str) -> Any:
    if column not in row:
        present = ", ".join(map(str, row)) or "none"
        raise _RowError(column, f"missing (fields present: {present})")
    return row[column]


def _prompt_from_messages(value: Any, label: str) -> tuple[list[Message], str | None]:
    """A ``messages`` conversation -> (its turns up to and including the last user turn, the reply after).

    The reply is the trailing assistant turns joined by a blank line, or None if the conversation ends
    with the user turn.
    """
    if not isinstance(value, list):
        raise _RowError(label, f"expected a list of messages, got {_type_name(value)}")
    messages = _check_messages(value, label)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise _RowError(label, "no user turn (the prompt is the messages up to and including the last user turn)")
    rest = messages[users[-1] + 1 :]
    for i, message in enumerate(rest, start=users[-1] + 1):
        if message["role"] != "assistant":
            raise _RowError(
                f"{label}[{i}].role",
                f"after the last user turn only 'assistant' turns may follow, got '{message['role']}'",
            )
    return messages[: users[-1] + 1], (_join_replies(rest) if rest else None)


def _parse_prompt_row(row: Mapping[str, Any], cols: dict[str, str], mapped: set[str]) -> PromptRecord:
    p_col, m_col = cols["prompt"], cols["messages"]
    if "prompt" in mapped or ("messages" not in mapped and p_col in row):
        prompt = _to_prompt(_field(row, p_col), p_col)
        return PromptRecord(prompt=prompt, meta={k: v for k, v in row.items() if k != p_col})
    if m_col not in row:
        present = ", ".join(map(str, row)) or "none"
        raise _RowError(
            p_col if "messages" not in mapped else m_col,
            f"missing (a prompt row needs '{p_col}' or '{m_col}'; fields present: {present})",
        )
    prompt, reply = _prompt_from_messages(row[m_col], m_col)
    meta = {k: v for k, v in row.items() if k != m_col}
    if reply is not None:
        if REFERENCE_REPLY in meta:
            raise _RowError(
                REFERENCE_REPLY,
                f"the row has its own '{REFERENCE_REPLY}' column, where the reply that ends "
                f"'{m_col}' would be kept; rename one",
            )
        meta[REFERENCE_REPLY] = reply
    return PromptRecord(prompt=prompt, meta=meta)


# Implicit prompts: the prompt is read out of whole conversations in 'chosen' and 'rejected'.


def _hh_turns(text: str, label: str) -> list[tuple[str, str]]:
    """Anthropic-HH text -> [(speaker, text)], each turn's text stripped; every turn must have text."""
    parts = _HH_TURN.split(text)  # ['', 'Human', ' q', 'Assistant', ' a', ...]: text starts with a marker
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    for number, (speaker, content) in enumerate(turns, start=1):
        if not content:
            if number == len(turns) and speaker == "Assistant":
                raise _RowError(label, f"empty final Assistant reply (turn {number})")
            raise _RowError(label, f"Anthropic-HH turn {number} ({speaker}) is empty")
    if turns[-1][0] != "Assistant":
        raise _RowError(label, f"Anthropic-HH text must end with an Assistant turn; turn {len(turns)} is Human")
    return turns


def _hh_split(text: str, label: str) -> tuple[list[Message], str]:
    """Anthropic-HH text -> (the turns up to the last Human one as messages, the Assistant reply after).

    Consecutive Assistant turns at the end (rare in HH) are one reply, joined by a blank line.
    """
    turns = _hh_turns(text, label)
    last_human = max(i for i, (speaker, _) in enumerate(turns) if speaker == "Human")
    prompt = [{"role": _HH_ROLES[who], "content": content} for who, content in turns[: last_human + 1]]
    return prompt, "\n\n".join(content for _, content in turns[last_human + 1 :])


def _hh_pair(chosen: Any, rejected: Any, c_col: str, r_col: str) -> tuple[list[Message], str, str]:
    for value, label, other in ((chosen, c_col, r_col), (rejected, r_col, c_col)):
        if not (isinstance(value, str) and value.startswith(HH_OPENING)):
            shown = f"str starting {value[:20]!r}" if isinstance(value, str) else _type_name(value)
            raise _RowError(
                label, f"'{other}' is Anthropic-HH text, so this must be too (starting {HH_OPENING!r}); got {shown}"
            )
    prompt, chosen_reply = _hh_split(chosen, c_col)
    rejected_prompt, rejected_reply = _hh_split(rejected, r_col)
    if rejected_prompt != prompt:
        turn = next(
            (i for i, (a, b) in enumerate(zip(prompt, rejected_prompt), start=1) if a != b),
            min(len(prompt), len(rejected_prompt)) + 1,
        )
        raise _RowError(
            r_col, f"the conversation before the final Assistant reply differs from '{c_col}' (at turn {turn})"
        )
    return prompt, chosen_reply, rejected_reply


def _conversation_pair(chosen: Any, rejected: Any, c_col: str, r_col: str) -> tuple[list[Message], str, str]:
    """Two whole conversations -> (their shared opening turns, the assistant reply after them in each)."""
    for value, label in ((chosen, c_col), (rejected, r_col)):
        if not isinstance(value, list):
            raise _RowError(
                label,
                f"expected a list of messages (a whole conversation, like the other side), got {_type_name(value)}",
            )
    chosen, rejected = _check_messages(chosen, c_col), _check_messages(rejected, r_col)
    if chosen == rejected:
        raise _RowError(r_col, f"the same conversation as '{c_col}': no prompt and replies to tell apart")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise _RowError(
            r_col,
            f"no opening turns in common with '{c_col}'; without a prompt column, the prompt is the messages "
            "both conversations start with",
        )
    if chosen[shared - 1]["role"] != "user":
        raise _RowError(
            r_col,
            f"the turns shared with '{c_col}' end with message {shared}, "
            f"role '{chosen[shared - 1]['role']}'; "
            "an implicit prompt must end with a user turn",
        )
    replies = []
    for messages, label in ((chosen, c_col), (rejected, r_col)):
        if len(messages) == shared:
            raise _RowError(label, "no reply after the prompt the two conversations share")
        for i, message in enumerate(messages[shared:], start=shared):
            if message["role"] != "assistant":
                raise _RowError(
                    f"{label}[{i}].role",
                    f"after the shared prompt only 'assistant' turns may follow, got '{message['role']}'",
                )
        replies.append(_join_replies(messages[shared:]))
    return chosen[:shared], replies[0], replies[1]


def _implicit_pair(row: Mapping[str, Any], cols: dict[str, str]) -> tuple[list[Message], str, str]:
    """-> (prompt, chosen, rejected) of a row without a prompt column."""
    c_col, r_col = cols["chosen"], cols["rejected"]
    chosen, rejected = _field(row, c_col), _field(row, r_col)
    if any(isinstance(v, str) and v.startswith(HH_OPENING) for v in (chosen, rejected)):
        return _hh_pair(chosen, rejected, c_col, r_col)
    if isinstance(chosen, list) or isinstance(rejected, list):
        return _conversation_pair(chosen, rejected, c_col, r_col)
    present = ", ".join(map(str, row)) or "none"
    raise _RowError(
        cols["prompt"],
        f"missing (fields present: {present}); without it, '{c_col}' and '{r_col}' must be whole "
        f"conversations (lists of messages) that share their opening turns, or Anthropic-HH text "
        f"starting {HH_OPENING!r}",
    )


def _pair_margin(row: Mapping[str, Any], cols: dict[str, str]) -> float | None:
    """An explicit margin column wins (null included); else score_chosen - score_rejected if both are set."""
    scores = [_to_number(row.get(cols[name]), cols[name]) for name in ("score_chosen", "score_rejected")]
    if cols["margin"] in row:
        return _to_number(row[cols["margin"]], cols["margin"])
    if scores[0] is None or scores[1] is None:
        return None
    return scores[0] - scores[1]


def _parse_pair_row(row: Mapping[str, Any], cols: dict[str, str], mapped: set[str]) -> PreferencePair:
    for name in PAIR_FIELDS:  # a field mapped explicitly must be there
        if name in mapped:
            _field(row, cols[name])
    if cols["prompt"] in row:
        prompt = _to_prompt(row[cols["prompt"]], cols["prompt"])
        chosen = _to_response(_field(row, cols["chosen"]), cols["chosen"], prompt)
        rejected = _to_response(_field(row, cols["rejected"]), cols["rejected"], prompt)
    else:
        prompt, chosen, rejected = _implicit_pair(row, cols)
    margin = _pair_margin(row, cols)
    used = {cols["prompt"], cols["chosen"], cols["rejected"], cols["margin"]}  # the scores stay in meta
    meta = {k: v for k, v in row.items() if k not in used}
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=margin, meta=meta)


def _load(
    path: str | os.PathLike, split: str, required: Sequence[str], parse, one_of: Sequence[str] = ()
) -> list[tuple[int, Any]]:
    """Read, validate and parse every row; -> [(row number, record)], or one DataError listing bad rows.

    ``required`` columns must all be there; of ``one_of`` (if given), at least one.
    """
    path = Path(path)
    unit, rows, column_names = _read_rows(path, split)
    if column_names is not None:  # tabular formats: a missing column is one error, not one per row
        missing = [c for c in required if c not in column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; columns present: {column_names}")
        if one_of and not any(c in column_names for c in one_of):
            wanted = " or ".join(f"'{c}'" for c in one_of)
            raise DataError(f"{path}: missing column {wanted}; columns present: {column_names}")
    parsed, errors, n_rows = [], [], 0
    for number, row in rows:
        n_rows += 1
        try:
            if not isinstance(row, Mapping):
                raise _RowError(None, f"expected a JSON object, got {_type_name(row)}")
            parsed.append((number, parse(row)))
        except _RowError as exc:
            errors.append(f"{path}: {unit} {number}: {exc}")
    if n_rows == 0:
        raise DataError(f"{path}: empty file (no rows)")
    if errors:
        listing = _first_few(errors, "\n  ")
        raise DataError(f"{path}: {len(errors)} of {n_rows} rows are invalid:\n  {listing}")
    return parsed


def _first_few(items: Iterable[str], sep: str) -> str:
    """The first MAX_LISTED_ERRORS items joined by ``sep``, then "... and N more" if there are more."""
    items = list(items)
    more = len(items) - MAX_LISTED_ERRORS
    return sep.join(items[:MAX_LISTED_ERRORS] + ([f"... and {more} more"] if more > 0 else []))


def load_prompts(
    path: str | os.PathLike, *, columns: Mapping[str, str] | None = None, split: str = "train"
) -> list[PromptRecord]:
    """Load a prompt dataset (JSONL, Parquet or a save_to_disk folder) into PromptRecords.

    A row's prompt is its ``prompt`` field (a string or messages ending in a user turn) or, in a row
    without one, its ``messages`` conversation cut after the last user turn; the assistant reply that
    followed, if any, is kept in ``meta["reference_reply"]``. ``columns`` maps the field names ``prompt``
    / ``messages`` to the file's columns (e.g. ``{"prompt": "question"}``); a mapped field is the one
    used and must be in every row. Every other column is kept in ``meta``. ``split`` picks the split of
    a saved DatasetDict.
    """
    cols = _resolve_columns(columns, PROMPT_FIELDS)
    mapped = set(columns or {})
    if "prompt" in mapped or "messages" in mapped:
        required, one_of = [cols["prompt" if "prompt" in mapped else "messages"]], []
    else:
        required, one_of = [], [cols["prompt"], cols["messages"]]
    parsed = _load(path, split, required, lambda row: _parse_prompt_row(row, cols, mapped), one_of)
    return [record for _, record in parsed]


def load_pairs(
    path: str | os.PathLike, *, columns: Mapping[str, str] | None = None, split: str = "train"
) -> list[PreferencePair]:
    """Load a preference dataset (JSONL, Parquet or a save_to_disk folder) into PreferencePairs.

    Rows may take any form of the module docstring: an explicit ``prompt`` with plain or conversational
    responses, or no prompt and whole conversations (an implicit prompt, or Anthropic-HH text) in
    ``chosen`` / ``rejected``. ``columns`` maps ``prompt`` / ``chosen`` / ``rejected`` / ``margin`` /
    ``score_chosen`` / ``score_rejected`` to the file's columns; a mapped field must be in every row,
    the others (but ``chosen`` and ``rejected``) are optional. ``margin`` is the margin column's value
    where the row has one, else ``score_chosen - score_rejected`` where both are numbers, else None; the
    scores stay in ``meta``. Pairs with chosen == rejected are skipped and counted in one warning (see the
    module docstring); every other problem is a :class:`DataError`.
    """
    cols = _resolve_columns(columns, PAIR_FIELDS)
    mapped = set(columns or {})
    required = [cols["chosen"], cols["rejected"]] + [cols[f] for f in PAIR_FIELDS if f in mapped]
    required = list(dict.fromkeys(required))
    parsed = _load(path, split, required, lambda row: _parse_pair_row(row, cols, mapped))
    return _skip_identical(path, parsed)


def _skip_identical(path: str | os.PathLike, parsed: list[tuple[int, PreferencePair]]) -> list[PreferencePair]:
    """Drop pairs whose chosen == rejected (they state no preference); log how many and which rows."""
    same = [number for number, pair in parsed if pair.chosen.strip() == pair.rejected.strip()]
    if same:
        rows = _first_few(map(str, same), ", ")
        log.warning("%s: skipped %d of %d pairs whose chosen == rejected (rows %s)", path, len(same), len(parsed), rows)
    if len(same) == len(parsed):
        raise DataError(f"{path}: no usable pairs: all {len(parsed)} rows have chosen == rejected")
    return [pair for _, pair in parsed if pair.chosen.strip() != pair.rejected.strip()]


def load_demo_prompts() -> list[PromptRecord]:
    """The shipped demo prompt set: short questions with ``answer``, ``aliases``, ``category`` in meta."""
    return load_prompts(DEMO_PROMPTS)


# ------------------------------------------------------------------------------------------------ splits


def prompt_key(prompt: list[Message]) -> str:
    """A canonical string for a prompt (its messages), equal for equal prompts whatever the key order."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of n * fractions: non-negative ints summing exactly to n."""
    raw = [n * f for f in fractions]
    counts = [math.floor(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_by_prompt(
    records: Sequence[Record], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[list[Record], ...]:
    """Split records into len(fractions) parts BY PROMPT: all records of one prompt land in one part.

    The distinct prompts are ordered by a seeded hash of their content and cut at exact counts
    (``fractions`` of the number of distinct prompts, largest-remainder rounded), so the split is
    deterministic, depends only on the set of prompts (not on input order) and matches the fractions to
    within one prompt per part. Within a part, records keep their input order.
    """
    if not fractions or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    keys = {prompt_key(r.prompt) for r in records}

    def digest(key: str) -> tuple[str, str]:
        return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest(), key

    ordered = sorted(keys, key=digest)
    part_of: dict[str, int] = {}
    start = 0
    for part, count in enumerate(_split_counts(len(ordered), fractions)):
        part_of.update((key, part) for key in ordered[start : start + count])
        start += count
    parts: tuple[list[Record], ...] = tuple([] for _ in fractions)
    for record in records:
        parts[part_of[prompt_key(record.prompt)]].append(record)
    return parts


# ------------------------------------------------------------------------------------------------ writing


def _to_row(record: PromptRecord | PreferencePair | Mapping[str, Any]) -> dict[str, Any]:
    """The JSONL row for a record; load_prompts / load_pairs read it back to an equal record."""
    if isinstance(record, Mapping):
        return dict(record)
    if isinstance(record, PromptRecord):
        row: dict[str, Any] = {"prompt": record.prompt}
    elif isinstance(record, PreferencePair):
        row = {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected}
        if record.margin is not None:
            row["margin"] = record.margin
    else:
        raise TypeError(f"write_jsonl: cannot write a {type(record).__name__}")
    clash = sorted(set(row) & set(record.meta))
    if clash:
        raise ValueError(f"write_jsonl: meta keys {clash} clash with the record's own fields")
    return row | record.meta


def write_jsonl(path: str | os.PathLike, records: Iterable[PromptRecord | PreferencePair | Mapping[str, Any]]) -> Path:
    """Write records as JSONL atomically: a temp file in the same folder, fsync, then os.replace.

    A reader never sees a half-written file, and a crash leaves the old file (if any) intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(_to_row(record), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------- tokenization


def render_prompt(tokenizer: Any, messages: list[Message]) -> str:
    """The prompt text the model sees, ending where the assistant's reply begins.

    With a chat template: ``apply_chat_template(..., add_generation_prompt=True)``. Without one, a plain
    fallback: one ``"<role>: <content>"`` line per message, then ``"assistant:"`` with nothing after it
    (the response's tokens follow directly; see the module docstring).
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def encode_prompt(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of the rendered prompt, with no special tokens added (the chat template has its own).

    Prompt and response are tokenized separately and concatenated, exactly as in generation, so the
    reward model is trained on the same token boundaries it will score during PPO.
    """
    return list(tokenizer.encode(render_prompt(tokenizer, messages), add_special_tokens=False))


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    """-> (eos_id, pad_id); pad must exist and differ from EOS so the last real token is unambiguous."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None:
        raise ValueError("tokenizer has no eos_token_id; sequences must end in EOS")
    if pad_id is None or pad_id == eos_id:
        raise ValueError(
            f"tokenizer pad_token_id ({pad_id}) must be set and differ from eos_token_id ({eos_id}); "
            "set a dedicated pad token before tokenizing"
        )
    return eos_id, pad_id


def _pair_ids(
    tokenizer: Any, pair: PreferencePair, max_length: int, eos_id: int
) -> tuple[list[int], list[int], bool] | None:
    """-> (chosen ids, rejected ids, whether the prompt was cut), or None if the pair cannot fit.

    Both sequences share one prompt, cut from the left by the same amount; responses stay whole.
    """
    prompt_ids = encode_prompt(tokenizer, pair.prompt)
    chosen_ids = list(tokenizer.encode(pair.chosen, add_special_tokens=False)) + [eos_id]
    rejected_ids = list(tokenizer.encode(pair.rejected, add_special_tokens=False)) + [eos_id]
    room = max_length - max(len(chosen_ids), len(rejected_ids))
    if room < 1:
        return None
    cut = len(prompt_ids) > room
    prompt_ids = prompt_ids[-room:]
    return prompt_ids + chosen_ids, prompt_ids + rejected_ids, cut


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (N, T) int64 padded on the right with pad_id, attention_mask (N, T) int64."""
    width = max((len(row) for row in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, T)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def tokenize_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int) -> dict[str, torch.Tensor]:
    """Reward-model batch: chosen and rejected sequences, right-padded, stacked chosen-first.

    Each sequence is ``encode_prompt(prompt) + encode(response) + [EOS]``. A pair longer than
    ``max_length`` has its prompt cut from the left by the same amount on both sides, keeping both
    responses whole; a pair whose longer response + EOS leaves no room for one prompt token is dropped.
    Both are counted and logged. Padding is always on the right here, whatever
    ``tokenizer.padding_side`` says (that setting is for generation, which pads left).

    Returns (B = pairs kept, T = longest kept sequence, at most ``max_length``):
        input_ids       (2B, T) int64  rows [0, B) chosen, [B, 2B) rejected; right-padded with pad_token_id
        attention_mask  (2B, T) int64  1 on real tokens; the last 1 of each row is the EOS
        kept            (B,)    int64  index into ``pairs`` of each kept pair (to align margins, meta)
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one prompt token + EOS), got {max_length}")
    eos_id, pad_id = _special_ids(tokenizer)
    chosen_rows, rejected_rows, kept, n_cut = [], [], [], 0
    for index, pair in enumerate(pairs):
        ids = _pair_ids(tokenizer, pair, max_length, eos_id)
        if ids is None:
            continue
        chosen_rows.append(ids[0])
        rejected_rows.append(ids[1])
        kept.append(index)
        n_cut += ids[2]
    if n_cut:
        log.info(
            "tokenize_pairs: cut the prompt from the left in %d of %d pairs (max_length=%d)",
            n_cut,
            len(pairs),
            max_length,
        )
    if len(kept) < len(pairs):
        log.warning(
            "tokenize_pairs: dropped %d of %d pairs whose response + EOS alone fill max_length=%d",
            len(pairs) - len(kept),
            len(pairs),
            max_length,
        )
    input_ids, attention_mask = _right_pad(chosen_rows + rejected_rows, pad_id)  # (2B, T) each
    kept_index = torch.tensor(kept, dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "kept": kept_index}
