"""Step 1 of RLHF: sample candidate response pairs, have each pair judged, build the preference dataset.

Three plain functions, one file each way (all JSONL, one JSON object a line):

1. :func:`generate_pairs` samples ``samples_per_prompt`` replies per prompt from a causal LM and writes
   the **candidates** file: one line per pair of distinct replies to the same prompt. Written atomically
   (temp file + rename), so it is either complete or absent::

     {"pair_id": "5c0d...", "id": "capital-001", "prompt": [{"role": "user", "content": "What is the
      capital of France?"}], "answer": "Paris", "aliases": [], "category": "capital",
      "response_a": "The capital of France is Paris.", "response_b": "Lyon.",
      "meta": {"model": "/path/model", "temperature": 0.7, "seed": 0, "samples_per_prompt": 4,
               "max_new_tokens": 48}}

   The prompt record's own fields sit at the top level (so a candidate line is also a valid input of
   :func:`fastrlhf.trainer.rubric.prefer`); ``meta`` says how the replies were sampled.

2. :func:`annotate` shows each pair to a person in the terminal (or asks the scripted demo rubric) and
   appends one **annotation** line per answer, flushed and fsynced at once, so killing the process loses
   at most the pair on screen and a rerun resumes at the first unanswered pair::

     {"pair_id": "5c0d...", "choice": "a", "swapped": true, "annotator": "human:alice", "index": 11,
      "seconds": 4.2, "time": "2025-01-01T12:00:00Z"}

   ``choice`` is "a" | "b" | "tie" | "skip" and always refers to the candidate's ``response_a`` /
   ``response_b``, whatever order they were shown in; ``swapped: true`` means ``response_b`` was shown
   first (as "A"). Rubric lines have ``"annotator": "rubric:demo"``, ``"scores": [score_a, score_b]``
   and no ``seconds``.

3. :func:`build_preferences` joins the two into a **preference** file that
   :func:`fastrlhf.trainer.data.load_pairs` reads; ties and skips carry no preference and are dropped::

     {"prompt": [{"role": "user", "content": "..."}], "chosen": "The capital of France is Paris.",
      "rejected": "Lyon.", "id": "capital-001", "answer": "Paris", "aliases": [], "category": "capital",
      "pair_id": "5c0d...", "annotator": "human:alice", "source": "human-annotated",
      "generation": {"model": "...", "temperature": 0.7, "seed": 0, ...}}

Choices (each documented where it is made):

- Pairing: replies are deduplicated (exact string after stripping; empty replies dropped, since a
  preference row cannot hold one), then paired as consecutive disjoint pairs (0, 1), (2, 3), ...; an odd
  one out is paired with the first reply. So with 4 samples a prompt gives at most 2 pairs, every distinct
  reply is judged at least once, and no comparison repeats: annotator time goes to new information rather
  than to the correlated all-pairs set (a prompt with one distinct reply gives no pair).
- ``pair_id`` = first 16 hex digits of sha256 over (prompt id, the two replies in sorted order): stable
  across runs and independent of which reply is "a".
- A/B order shown to a person is randomized per pair by a hash of (seed, pair_id), so it is the same on
  every resume and independent of the order of the file; the rubric is symmetric and sees the stored order.
- Ctrl-C, EOF on stdin and ``q`` end the session normally: :func:`annotate` prints how many pairs were
  annotated and how to resume, and returns (a ``python -c`` / CLI process exits 0, not 130). Every answer
  is already on disk, so stopping is not an error; :attr:`AnnotationSummary.stopped` says why it stopped.
- One session at a time per annotations file (an flock, released even on kill -9). If a file still holds
  several lines for one pair (e.g. files concatenated by hand), the last one wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from .data import DataError, PreferencePair, PromptRecord, load_prompts, prompt_key, render_prompt, write_jsonl
from .errors import MissingFileError, UserError
from .rubric import Scorer, get_rubric, prefer

log = logging.getLogger(__name__)

CHOICES = ("a", "b", "tie", "skip")
"""The answers an annotation line may hold (in terms of the candidate's response_a / response_b)."""

KEYS = {"a": "a", "1": "a", "b": "b", "2": "b", "t": "tie", "s": "skip"}
"""Keys a person may press, mapped to what they mean on screen ("a" = the response shown as A)."""

CANDIDATE_FIELDS = ("pair_id", "prompt", "response_a", "response_b", "meta")
"""Fields of a candidate line set by this module; a prompt record's meta may not use these names."""

MAX_WIDTH = 100  # wrap width cap for the terminal screen

HELP = """\
Compare the two responses to the prompt and press a key, then Enter:
  a or 1   response A is better         t   tie (both equally good or bad)
  b or 2   response B is better         s   skip (cannot judge this pair)
  q        quit (all answers so far are saved)
  ?        this help
Every answer is saved at once. Run the same command again to continue where you stopped;
skipped and tied pairs count as answered and are not asked again."""

PROMPT_LINE = "Which is better?  [a/1] A   [b/2] B   [t] tie   [s] skip   [q] quit   [?] help  > "


# ------------------------------------------------------------------------------------- 1. pair generation


def pair_id(prompt_id: str, response_a: str, response_b: str) -> str:
    """Stable id of a pair: sha256 of (prompt id, the two responses in sorted order), 16 hex digits."""
    key = json.dumps([prompt_id, *sorted((response_a, response_b))], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def record_id(record: PromptRecord) -> str:
    """The record's ``id`` field, or ``p-<hash of the prompt messages>`` when it has none."""
    given = record.meta.get("id")
    if given is not None and str(given).strip():
        return str(given)
    return "p-" + hashlib.sha256(prompt_key(record.prompt).encode("utf-8")).hexdigest()[:12]


def _check_fields(record: PromptRecord) -> None:
    clash = sorted(set(record.meta) & set(CANDIDATE_FIELDS))
    if clash:
        raise ValueError(f"prompt record {record_id(record)!r}: fields {clash} clash with candidate fields")


def make_candidate(
    record: PromptRecord, response_a: str, response_b: str, meta: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One candidates-file line: pair id, the record's id / prompt messages / other fields, the two
    responses and ``meta`` (how they were produced). Raises ValueError if the record's fields clash with
    the names this module uses (:data:`CANDIDATE_FIELDS`) or the two responses are equal."""
    _check_fields(record)
    if response_a.strip() == response_b.strip():
        raise ValueError(f"prompt record {record_id(record)!r}: the two responses are equal")
    pid = record_id(record)
    extra = {k: v for k, v in record.meta.items() if k != "id"}
    return {
        "pair_id": pair_id(pid, response_a, response_b),
        "id": pid,
        "prompt": record.prompt,
        **extra,
        "response_a": response_a,
        "response_b": response_b,
        "meta": dict(meta or {}),
    }


def pair_responses(responses: Sequence[str]) -> tuple[list[tuple[str, str]], int, int]:
    """Pair the distinct, non-empty responses to one prompt -> (pairs, empty dropped, duplicates dropped).

    Consecutive disjoint pairs (0, 1), (2, 3), ... of the distinct responses in sampling order; an odd
    one out (with at least 3 distinct) is paired with the first. ["x", "x", "y", "z"] -> [("x", "y"),
    ("z", "x")], 0 empty, 1 duplicate."""
    non_empty = [r for r in responses if r.strip()]
    distinct = list(dict.fromkeys(non_empty))
    pairs = [(distinct[i], distinct[i + 1]) for i in range(0, len(distinct) - 1, 2)]
    if len(distinct) >= 3 and len(distinct) % 2 == 1:
        pairs.append((distinct[-1], distinct[0]))
    return pairs, len(responses) - len(non_empty), len(non_empty) - len(distinct)


def _stop_ids(model: Any) -> list[int]:
    """Token ids that end a reply: the model's generation-config EOS id(s)."""
    eos = model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError("the model's generation config has no eos_token_id; replies could never stop")
    return ids


def _sample_responses(
    model: Any,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    *,
    samples_per_prompt: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    device: str,
) -> tuple[list[list[str]], int]:
    """Sample replies -> (per record, its `samples_per_prompt` decoded replies; how many hit max_new_tokens).

    Prompts are batched by token length (less padding), `batch_size // samples_per_prompt` prompts per
    `generate` call, each repeated with `num_return_sequences`. Sampling is pure softmax(z / T): top_k=0,
    top_p=1 and no repetition penalty, whatever the model's generation config says. The global RNG is
    seeded inside a fork, so the caller's RNG state is untouched and the result depends only on the
    seed, the prompts and the batch size."""
    import torch

    stop_ids = _stop_ids(model)
    encoded = [tokenizer.encode(render_prompt(tokenizer, r.prompt), add_special_tokens=False) for r in records]
    order = sorted(range(len(records)), key=lambda i: (len(encoded[i]), i))
    per_batch = max(1, batch_size // samples_per_prompt)
    replies: list[list[str]] = [[] for _ in records]
    n_unfinished = 0
    fork_devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with (
        torch.random.fork_rng(devices=fork_devices),
        torch.inference_mode(),
        tqdm(total=len(records), desc="sampling", unit="prompt") as bar,
    ):
        torch.manual_seed(seed)
        for start in range(0, len(order), per_batch):
            batch = order[start : start + per_batch]
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")  # left-padded
            input_ids = padded["input_ids"].to(device)  # (P, T) int64
            attention_mask = padded["attention_mask"].to(device)  # (P, T) int64
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                typical_p=1.0,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples_per_prompt,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )  # (P * k, T + new) int64; row j belongs to prompt j // k
            new_tokens = out[:, input_ids.shape[1] :].tolist()
            for j, ids in enumerate(new_tokens):
                end = next((t for t, tok in enumerate(ids) if tok in stop_ids), None)
                n_unfinished += end is None
                text = tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
                replies[batch[j // samples_per_prompt]].append(text)
            bar.update(len(batch))
    return replies, n_unfinished


def generate_pairs(
    model_path: str | os.PathLike | None,
    prompts: Sequence[PromptRecord] | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    samples_per_prompt: int = 4,
    temperature: float = 0.7,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Sample replies to each prompt and write candidate pairs of distinct replies to `out_path` (JSONL).

    `model_path` is anything :func:`fastrlhf.trainer.models.resolve_model_path` accepts ("default" or a
    local folder); `prompts` is a list of PromptRecords or a prompt-dataset path. Each prompt gets
    `samples_per_prompt` replies at `temperature` (top_k=0, top_p=1, stop at EOS, at most
    `max_new_tokens`), rendered with the chat template and left-padded; `batch_size` is the number of
    sequences (prompts x samples) per `generate` call. Deterministic given the seed, prompts and batch
    size. The pairing scheme and the line format are in the module docstring. Returns `out_path`."""
    if samples_per_prompt < 2:
        raise UserError(f"samples_per_prompt must be >= 2 to make a pair, got {samples_per_prompt}")
    if not temperature > 0:
        raise UserError(f"temperature must be > 0 (sampling), got {temperature}")
    if max_new_tokens < 1 or batch_size < 1:
        raise UserError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    # imported here, not at the top: transformers takes ~10 s to import and annotate() does not need it
    from ..kernels._common import nvtx_range
    from . import models

    records = list(prompts) if not isinstance(prompts, (str, os.PathLike)) else load_prompts(prompts)
    if not records:
        raise UserError("no prompts to sample from")
    for record in records:  # before the slow part
        _check_fields(record)
    path = models.resolve_model_path(None if model_path is None else str(model_path))
    t0 = time.perf_counter()
    tokenizer = models.load_tokenizer(path, padding_side="left")
    model = models.load_causal_lm(path, device=device, tokenizer=tokenizer)
    with nvtx_range("generate-pairs/sample"):
        replies, n_unfinished = _sample_responses(
            model,
            tokenizer,
            records,
            samples_per_prompt=samples_per_prompt,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
    meta = {
        "model": path,
        "temperature": temperature,
        "seed": seed,
        "samples_per_prompt": samples_per_prompt,
        "max_new_tokens": max_new_tokens,
    }
    rows, seen, n_empty, n_duplicate, n_without_pair = [], set(), 0, 0, 0
    for record, texts in zip(records, replies):
        pairs, empty, duplicate = pair_responses(texts)
        n_empty, n_duplicate, n_without_pair = n_empty + empty, n_duplicate + duplicate, n_without_pair + (not pairs)
        for response_a, response_b in pairs:
            row = make_candidate(record, response_a, response_b, meta)
            if row["pair_id"] in seen:  # only if the prompt set repeats an id with the same replies
                n_duplicate += 1
                continue
            seen.add(row["pair_id"])
            rows.append(row)
    write_jsonl(out_path, rows)
    n_samples = len(records) * samples_per_prompt
    log.info(
        "generate_pairs: %d prompts, %d samples (%d hit max_new_tokens=%d), dropped %d empty and %d duplicate "
        "replies, %d prompts gave no pair -> %d pairs in %s (%.1f s)",
        len(records),
        n_samples,
        n_unfinished,
        max_new_tokens,
        n_empty,
        n_duplicate,
        n_without_pair,
        len(rows),
        out_path,
        time.perf_counter() - t0,
    )
    return Path(out_path)


# ------------------------------------------------------------------------------------------- reading files


def read_candidates(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a candidates file. It was written atomically, so a bad line is a DataError (naming
    the line), not something to skip; so is a repeated pair_id."""
    path = Path(path)
    rows, seen = [], set()
    with path.open("r", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: malformed JSON ({exc.msg})") from None
            needed = ("pair_id", "response_a", "response_b")
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in needed):
                raise DataError(f"{path}: line {number}: not a candidate pair (needs pair_id, response_a, response_b)")
            if not isinstance(row.get("prompt"), list):
                raise DataError(f"{path}: line {number}: field 'prompt': expected a list of messages")
            if row["pair_id"] in seen:
                raise DataError(f"{path}: line {number}: pair_id {row['pair_id']} repeats an earlier line")
            seen.add(row["pair_id"])
            rows.append(row)
    return rows


def _parse_annotation(line: str) -> dict[str, Any] | None:
    """An annotation line as a dict, or None if it is not a complete, valid one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    valid = (
        isinstance(row, dict)
        and isinstance(row.get("pair_id"), str)
        and row.get("choice") in CHOICES
        and isinstance(row.get("annotator"), str)
    )
    return row if valid else None


def read_annotations(path: str | os.PathLike, *, warn: bool = True) -> dict[str, dict[str, Any]]:
    """pair_id -> its annotation line (the last one when a pair has several). A missing file is empty.

    Lines that are not a complete, valid annotation (a line cut short by a crash or power loss) are
    skipped, with one logged warning per line when `warn`: they lose at most that one answer."""
    path = Path(path)
    answers: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return answers
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = _parse_annotation(line)
            if row is None:
                if warn:
                    log.warning("%s: line %d is not a complete annotation (%r); skipped", path, number, line[:60])
                continue
            answers[row["pair_id"]] = row
    return answers


# ------------------------------------------------------------------------------------------- 2. annotation


@dataclass
class AnnotationSummary:
    """What one :func:`annotate` call did, counted from the annotations file after it stopped."""

    total: int
    """Pairs in the candidates file."""
    answered_before: int
    """Pairs that already had an answer when the call started (a resumed session)."""
    annotated: int
    """Answers this call wrote (chose_a + chose_b + ties + skips)."""
    chose_a: int
    """Of those, how many preferred the candidate's response_a."""
    chose_b: int
    """... preferred response_b."""
    ties: int
    """... were ties."""
    skips: int
    """... were skipped (no judgement; not asked again)."""
    remaining: int
    """Pairs still without an answer; 0 when the file is done."""
    stopped: str | None
    """Why the call ended early: "quit" (q), "interrupt" (Ctrl-C) or "eof" (stdin closed); None if done."""


def _open_for_append(path: Path) -> int:
    """A raw O_APPEND file descriptor for `path`, exclusively locked (flock, where the OS has it) so two
    sessions cannot annotate one file at once; the lock dies with the process, even on kill -9.

    If a crash left the last line without its newline, one is written first, so the cut line stays a
    line of its own (skipped on reading) and the next answer starts on a fresh line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one session per file is up to the user
            pass
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{path} is open in another annotate session; stop that one first") from None
        size = os.fstat(fd).st_size
        if size:
            with path.open("rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(fd, b"\n")
        if created:  # make the new directory entry durable too
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _append_line(fd: int, row: Mapping[str, Any]) -> None:
    """Write one JSON line with a single write() and fsync it: once this returns, the answer survives
    a kill -9 (and, after fsync, a power loss)."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    while data:
        data = data[os.write(fd, data) :]
    os.fsync(fd)


def _is_swapped(seed: int, pid: str) -> bool:
    """Show response_b as "A"? A fair coin from (seed, pair_id): the same on every resume."""
    return random.Random(f"{seed}:{pid}").random() < 0.5


def _wrap(text: str, width: int, indent: str = "  ") -> str:
    """Wrap each line of `text` to `width`, keeping the author's line breaks; empty text shown as such."""
    if not text.strip():
        return indent + "(empty)"
    lines = []
    for raw in text.splitlines():
        wrapped = textwrap.wrap(raw, width=width, initial_indent=indent, subsequent_indent=indent)
        lines.extend(wrapped or [""])
    return "\n".join(lines)


def _screen(candidate: Mapping[str, Any], number: int, total: int, shown: tuple[str, str]) -> str:
    """The text shown for one pair: progress, the prompt messages, then responses A and B."""
    width = max(40, min(MAX_WIDTH, shutil.get_terminal_size((MAX_WIDTH, 24)).columns))

    def rule(title: str = "", char: str = "-") -> str:
        return (f"{char * 4} {title} " if title else "").ljust(width, char)

    parts = ["", rule(f"pair {number}/{total}", "="), "PROMPT"]
    messages = candidate["prompt"]
    for message in messages:
        label = f"[{message.get('role', '?')}] " if len(messages) > 1 else ""
        parts.append(_wrap(label + str(message.get("content", "")), width))
    parts += [rule("response A"), _wrap(shown[0], width), rule("response B"), _wrap(shown[1], width), rule()]
    return "\n".join(parts)


def _ask(input_fn: Callable[[str], str], out: TextIO) -> str | None:
    """Read keys until a valid one -> "a" | "b" | "tie" | "skip" (as shown on screen), or None for quit.
    EOFError / KeyboardInterrupt propagate to the caller."""
    while True:
        key = input_fn(PROMPT_LINE).strip().lower()
        if key in KEYS:
            return KEYS[key]
        if key == "q":
            return None
        if key in ("?", "h", "help"):
            print(HELP, file=out, flush=True)
        else:
            print(f"unknown key {key!r}: press a/1, b/2, t, s or q (? for help)", file=out, flush=True)


def _judge(
    todo: Sequence[tuple[int, dict[str, Any]]],
    total: int,
    fd: int,
    *,
    scorer: Scorer | None,
    annotator: str,
    input_fn: Callable[[str], str],
    out: TextIO,
    seed: int,
) -> str | None:
    """Judge the (index, candidate) pairs of `todo` in order, appending each answer through `fd` as
    soon as it is given -> why it stopped early ("quit", "interrupt", "eof"), or None when all are done."""
    try:
        for index, candidate in todo:
            response_a, response_b = candidate["response_a"], candidate["response_b"]
            row: dict[str, Any] = {"pair_id": candidate["pair_id"]}
            if scorer is not None:
                try:
                    choice = prefer(candidate, response_a, response_b, scorer=scorer)
                except ValueError as exc:  # e.g. a prompt set without answers
                    raise ValueError(f"pair {candidate['pair_id']} (prompt {candidate.get('id')}): {exc}") from None
                row |= {
                    "choice": choice,
                    "swapped": False,
                    "annotator": annotator,
                    "index": index,
                    "scores": [scorer(candidate, response_a), scorer(candidate, response_b)],
                }
            else:
                swapped = _is_swapped(seed, candidate["pair_id"])
                shown = (response_b, response_a) if swapped else (response_a, response_b)
                print(_screen(candidate, index + 1, total, shown), file=out, flush=True)
                started = time.monotonic()
                key = _ask(input_fn, out)
                if key is None:
                    return "quit"
                choice = {"a": "b", "b": "a"}.get(key, key) if swapped else key
                row |= {
                    "choice": choice,
                    "swapped": swapped,
                    "annotator": annotator,
                    "index": index,
                    "seconds": round(time.monotonic() - started, 2),
                }
            row["time"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            _append_line(fd, row)
    except KeyboardInterrupt:
        return "interrupt"
    except EOFError:
        return "eof"
    return None


def annotate(
    candidates_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    rubric: str | None = None,
    input_fn: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    seed: int = 0,
) -> AnnotationSummary:
    """Judge every candidate pair that has no answer in `out_path` yet, appending one line per answer.

    With `rubric=None` a person judges each pair in the terminal: keys are read with `input_fn` and the
    screens written to `out` (both replaceable for tests and other front ends); the order in which the
    two responses are shown is randomized per pair by `seed` (see the module docstring). With
    `rubric="demo"` the scripted rubric (:func:`fastrlhf.trainer.rubric.prefer`) answers instead, with
    no prompting, and lines say ``"annotator": "rubric:demo"``.

    Every answer (skips and ties included) is fsynced before the next pair is shown, and a rerun with the
    same paths resumes at the first pair without one. q, Ctrl-C and end of input stop the session
    cleanly with a message saying how many pairs were annotated and how to resume; they raise nothing.
    A second session on the same `out_path` while one runs is a RuntimeError.
    """
    candidates = read_candidates(candidates_path)
    scorer = get_rubric(rubric) if rubric is not None else None  # an unknown name fails before any work
    out_path = Path(out_path)
    fd = _open_for_append(out_path)  # locked before reading, so what is read stays what is on disk
    try:
        answered = read_annotations(out_path)
        ids = {c["pair_id"] for c in candidates}
        if set(answered) - ids:
            log.warning(
                "%s: %d annotations match no pair in %s (a different candidates file?)",
                out_path,
                len(set(answered) - ids),
                candidates_path,
            )
        todo = [(i, c) for i, c in enumerate(candidates) if c["pair_id"] not in answered]
        if rubric is None and todo:
            print(
                f"{len(candidates)} pairs, {len(candidates) - len(todo)} already answered; {len(todo)} to go. "
                "Press ? for help.",
                file=out,
                flush=True,
            )
        annotator = f"rubric:{rubric}" if rubric is not None else f"human:{os.environ.get('USER') or 'unknown'}"
        stopped = _judge(
            todo, len(candidates), fd, scorer=scorer, annotator=annotator, input_fn=input_fn, out=out, seed=seed
        )
    finally:
        os.close(fd)
    summary, next_number = _summarize(candidates, out_path, set(answered), stopped)
    _report(summary, next_number, candidates_path, out_path, rubric, out)
    return summary


def _summarize(
    candidates: list[dict[str, Any]], out_path: Path, before: set[str], stopped: str | None
) -> tuple[AnnotationSummary, int | None]:
    """-> (the summary, 1-based number of the first pair still without an answer or None). Counted from
    the file itself, so the numbers are right even if Ctrl-C hit between a write and the line after it."""
    now = read_annotations(out_path, warn=False)
    new = Counter(now[c["pair_id"]]["choice"] for c in candidates if c["pair_id"] in now and c["pair_id"] not in before)
    missing = [i for i, c in enumerate(candidates, start=1) if c["pair_id"] not in now]
    summary = AnnotationSummary(
        total=len(candidates),
        answered_before=sum(c["pair_id"] in before for c in candidates),
        annotated=sum(new.values()),
        chose_a=new["a"],
        chose_b=new["b"],
        ties=new["tie"],
        skips=new["skip"],
        remaining=len(missing),
        stopped=stopped if missing else None,
    )
    return summary, (missing[0] if missing else None)


def _report(
    summary: AnnotationSummary,
    next_number: int | None,
    candidates_path: Any,
    out_path: Path,
    rubric: str | None,
    out: TextIO,
) -> None:
    """The closing message: what was done, where it is saved, and how to go on."""
    why = {"quit": "Quit", "interrupt": "Interrupted", "eof": "Input ended", None: "Done"}[summary.stopped]
    done = summary.total - summary.remaining
    lines = [
        f"\n{why}: annotated {summary.annotated} pairs this session (a {summary.chose_a}, b {summary.chose_b}, "
        + f"tie {summary.ties}, skip {summary.skips}); {done} of {summary.total} answered in total. "
        + f"Answers are saved in {out_path}."
    ]
    if next_number is not None:
        call = f"annotate({str(candidates_path)!r}, {str(out_path)!r}" + (f", rubric={rubric!r})" if rubric else ")")
        lines.append(
            f"{summary.remaining} pairs left. To resume, run the same command again ({call}); "
            f"it continues at pair {next_number}/{summary.total}."
        )
    else:
        lines.append(f"All pairs answered. Next: build_preferences({str(candidates_path)!r}, {str(out_path)!r}, OUT).")
    print("\n".join(lines), file=out, flush=True)
    log.info("annotate: %s", summary)


# --------------------------------------------------------------------------------- 3. preference dataset


def _preference(candidate: Mapping[str, Any], answer: Mapping[str, Any]) -> PreferencePair:
    """The preference row for an answered pair ("a" or "b"), prompt fields and provenance in meta."""
    response_a, response_b = candidate["response_a"], candidate["response_b"]
    chosen, rejected = (response_a, response_b) if answer["choice"] == "a" else (response_b, response_a)
    annotator = answer["annotator"]
    prompt_fields = {k: v for k, v in candidate.items() if k not in CANDIDATE_FIELDS}
    meta = prompt_fields | {
        "pair_id": candidate["pair_id"],
        "annotator": annotator,
        "source": _preference_source(answer),
        "generation": candidate.get("meta") or {},
    }
    return PreferencePair(prompt=candidate["prompt"], chosen=chosen, rejected=rejected, meta=meta)


def build_preferences(
    candidates_path: str | os.PathLike, annotations_path: str | os.PathLike, out_path: str | os.PathLike
) -> int:
    """Join candidates with their annotations into a preference JSONL (the format `data.load_pairs`
    reads; see the module docstring) written atomically -> the number of pairs written.

    Ties and skips state no preference and are dropped; pairs without an answer are left out; invalid
    annotation lines (e.g. cut short by a crash) are skipped with a warning. All counted and logged."""
    candidates = read_candidates(candidates_path)
    if not Path(annotations_path).is_file():
        raise MissingFileError(f"{annotations_path}: no annotations file (run annotate first)")
    answers = read_annotations(annotations_path)
    pairs: list[PreferencePair] = []
    counts: Counter[str] = Counter()
    for candidate in candidates:
        answer = answers.get(candidate["pair_id"])
        if answer is None:
            counts["unanswered"] += 1
        elif answer["choice"] in ("tie", "skip"):
            counts[answer["choice"]] += 1
        else:
            pairs.append(_preference(candidate, answer))
            counts[_preference_source(answer)] += 1
    write_jsonl(out_path, pairs)
    log.info(
        "build_preferences: %d candidate pairs -> %d preferences (%d human, %d rubric) in %s; dropped %d ties "
        "and %d skips; %d pairs not annotated yet",
        len(candidates),
        len(pairs),
        counts["human-annotated"],
        counts["rubric-annotated"],
        out_path,
        counts["tie"],
        counts["skip"],
        counts["unanswered"],
    )
    if not pairs:
        log.warning("build_preferences: no preferences written to %s (nothing annotated a or b)", out_path)
    return len(pairs)


def _preference_source(answer: Mapping[str, Any]) -> str:
    return "rubric-annotated" if answer["annotator"].startswith("rubric:") else "human-annotated"
