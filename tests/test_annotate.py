"""trainer/annotate.py, step 1 of RLHF: candidate pairs from a model, terminal annotation that survives
kill -9 / Ctrl-C and resumes, the scripted rubric as annotator, and the preference file it all builds."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastrlhf.trainer import annotate as ann
from fastrlhf.trainer.annotate import (
    AnnotationSummary,
    annotate,
    build_preferences,
    generate_pairs,
    make_candidate,
    pair_id,
    pair_responses,
    read_annotations,
)
from fastrlhf.trainer.data import PromptRecord, load_demo_prompts, load_pairs, write_jsonl
from fastrlhf.trainer.errors import UserError

FRANCE = PromptRecord(
    [{"role": "user", "content": "What is the capital of France?"}],
    {"id": "capital-001", "answer": "Paris", "aliases": [], "category": "capital"},
)
GERMANY = PromptRecord(
    [{"role": "user", "content": "What is the capital of Germany?"}],
    {"id": "capital-003", "answer": "Berlin", "aliases": [], "category": "capital"},
)
SUM = PromptRecord(
    [{"role": "user", "content": "What is 17 + 25?"}],
    {"id": "arith-001", "answer": "42", "aliases": [], "category": "arithmetic"},
)


class Keys:
    """A scripted person: returns the given keys in order; raises EOFError when they run out."""

    def __init__(self, *keys: str) -> None:
        self.keys, self.prompts = list(keys), []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.keys:
            raise EOFError
        return self.keys.pop(0)


class Screen:
    """A stand-in for stdout that keeps what was written."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.parts)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def candidates(tmp_path: Path) -> Path:
    """Six hand-made candidate pairs over three prompts, in the generate_pairs format."""
    replies = [
        (FRANCE, [("Paris.", "London is the capital of France."), ("The capital is Paris.", "Lyon")]),
        (GERMANY, [("!!!! ????", "Berlin"), ("Berlin, of course.", "Munich")]),
        (SUM, [("42", "43"), ("17 + 25 = 42", "It is 52.")]),
    ]
    meta = {"model": "hand-made", "temperature": 0.7, "seed": 0}
    rows = [make_candidate(record, a, b, meta) for record, pairs in replies for a, b in pairs]
    return write_jsonl(tmp_path / "candidates.jsonl", rows)


# --------------------------------------------------------------------------------------- generate_pairs


def test_pair_responses_dedupes_and_pairs_disjointly():
    assert pair_responses(["x", "y", "z", "w"]) == ([("x", "y"), ("z", "w")], 0, 0)
    assert pair_responses(["x", "x", "y", "z"]) == ([("x", "y"), ("z", "x")], 0, 1)  # odd one out -> first
    assert pair_responses(["x", "", "  ", "y"]) == ([("x", "y")], 2, 0)
    assert pair_responses(["x", "x", "x"]) == ([], 0, 2)
    assert pair_responses(["x", "y", "z"]) == ([("x", "y"), ("z", "x")], 0, 0)


def test_pair_id_is_stable_and_order_free():
    assert pair_id("p", "a", "b") == pair_id("p", "b", "a")
    assert len(pair_id("p", "a", "b")) == 16
    assert pair_id("p", "a", "b") != pair_id("q", "a", "b") != pair_id("p", "a", "c")


def test_make_candidate_rejects_clashing_fields_and_equal_replies():
    with pytest.raises(ValueError, match="clash"):
        make_candidate(PromptRecord(FRANCE.prompt, {"meta": 1}), "a", "b")
    with pytest.raises(ValueError, match="equal"):
        make_candidate(FRANCE, "Paris", " Paris ")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from fastrlhf.trainer import models

    return models.tiny_model_path(tmp_path_factory.mktemp("tiny"))


def test_generate_pairs_on_tiny_model(tiny_model, tmp_path, caplog):
    prompts = load_demo_prompts()[:3]
    kwargs = {"samples_per_prompt": 3, "max_new_tokens": 8, "batch_size": 16, "seed": 0}
    caplog.set_level(logging.INFO, logger="fastrlhf.trainer.annotate")
    t0 = time.perf_counter()
    first = generate_pairs(tiny_model, prompts, tmp_path / "one.jsonl", **kwargs)
    elapsed = time.perf_counter() - t0
    print(f"generate_pairs, tiny model, 3 prompts x 3 samples x 8 tokens: {elapsed:.2f} s")
    rows = lines(first)
    # a random model's replies are 8 random tokens: all distinct, so 3 per prompt -> (0,1) and (2,0)
    assert len(rows) == 6
    assert [r["id"] for r in rows] == [p.meta["id"] for p in prompts for _ in range(2)]
    for row, prompt in zip(rows, [p for p in prompts for _ in range(2)]):
        assert list(row)[:3] == ["pair_id", "id", "prompt"]
        assert row["prompt"] == prompt.prompt
        assert (row["answer"], row["aliases"], row["category"]) == (
            prompt.meta["answer"],
            prompt.meta["aliases"],
            prompt.meta["category"],
        )
        assert row["response_a"] and row["response_b"] and row["response_a"] != row["response_b"]
        assert row["response_a"] == row["response_a"].strip()
        assert "<|im_end|>" not in row["response_a"] + row["response_b"]  # special tokens decoded away
        assert row["pair_id"] == pair_id(row["id"], row["response_a"], row["response_b"])
        assert row["meta"] == {
            "model": str(Path(tiny_model).resolve()),
            "temperature": 0.7,
            "seed": 0,
            "samples_per_prompt": 3,
            "max_new_tokens": 8,
        }
    assert rows[1]["response_b"] == rows[0]["response_a"]  # the odd one out meets the first reply
    assert len({r["pair_id"] for r in rows}) == 6
    assert "3 prompts, 9 samples" in caplog.text and "0 duplicate" in caplog.text and "-> 6 pairs" in caplog.text

    again = generate_pairs(tiny_model, prompts, tmp_path / "two.jsonl", **kwargs)
    assert again.read_bytes() == first.read_bytes()  # same seed: same replies, same pair ids
    other = lines(generate_pairs(tiny_model, prompts, tmp_path / "three.jsonl", **(kwargs | {"seed": 1})))
    assert {r["pair_id"] for r in other}.isdisjoint({r["pair_id"] for r in rows})


def test_generate_pairs_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="samples_per_prompt"):
        generate_pairs("unused", [FRANCE], tmp_path / "x.jsonl", samples_per_prompt=1)
    with pytest.raises(ValueError, match="temperature"):
        generate_pairs("unused", [FRANCE], tmp_path / "x.jsonl", temperature=0.0)
    assert not (tmp_path / "x.jsonl").exists()


# -------------------------------------------------------------------------------------------- annotate


def test_annotate_scripted_keys(candidates, tmp_path):
    out_path, screen = tmp_path / "ann.jsonl", Screen()
    keys = Keys("a", "b", "t", "s", "x", "A", "q")  # "x" is invalid and re-prompts; "A" is "a"
    summary = annotate(candidates, out_path, input_fn=keys, out=screen, seed=0)
    cands, got = lines(candidates), lines(out_path)
    assert [r["pair_id"] for r in got] == [c["pair_id"] for c in cands[:5]]
    assert [r["index"] for r in got] == [0, 1, 2, 3, 4]
    swapped = [r["swapped"] for r in got]
    assert True in swapped and False in swapped  # seed 0 shows both orders in these five pairs
    flip = {"a": "b", "b": "a"}
    shown_keys = ["a", "b", "tie", "skip", "a"]
    assert [r["choice"] for r in got] == [flip.get(k, k) if s else k for k, s in zip(shown_keys, swapped)]
    assert all(r["annotator"] == f"human:{os.environ.get('USER') or 'unknown'}" for r in got)
    assert all(r["seconds"] >= 0 and r["time"].endswith("Z") for r in got)
    choices = [r["choice"] for r in got]
    assert summary == AnnotationSummary(
        total=6,
        answered_before=0,
        annotated=5,
        chose_a=choices.count("a"),
        chose_b=choices.count("b"),
        ties=1,
        skips=1,
        remaining=1,
        stopped="quit",
    )
    text = screen.text
    assert all(f"pair {n}/6" in text for n in range(1, 7))
    assert "unknown key 'x'" in text and text.count("pair 5/6") == 1  # re-prompted, not redrawn
    assert "annotated 5 pairs" in text and "To resume" in text
    # the screen shows response_b as A exactly when the line says swapped
    first_screen = text.split("pair 1/6")[1].split("pair 2/6")[0]
    shown_a = first_screen.split("response A")[1].split("response B")[0]
    expected_a = cands[0]["response_b"] if swapped[0] else cands[0]["response_a"]
    assert expected_a in shown_a
    assert len(keys.prompts) == 7


def test_help_key_prints_help(candidates, tmp_path):
    screen = Screen()
    annotate(candidates, tmp_path / "ann.jsonl", input_fn=Keys("?", "q"), out=screen)
    assert "a or 1" in screen.text and "skip" in screen.text
    assert not (tmp_path / "ann.jsonl").read_text()  # q answers nothing


def test_annotate_resumes_at_first_unanswered_pair(candidates, tmp_path):
    out_path = tmp_path / "ann.jsonl"
    annotate(candidates, out_path, input_fn=Keys("a", "s", "q"), out=Screen())
    screen = Screen()
    summary = annotate(candidates, out_path, input_fn=Keys("t", "q"), out=screen)
    assert "pair 3/6" in screen.text and "pair 1/6" not in screen.text and "pair 2/6" not in screen.text
    assert (summary.answered_before, summary.annotated, summary.ties, summary.remaining) == (2, 1, 1, 3)
    summary = annotate(candidates, out_path, input_fn=Keys("b", "b", "b"), out=Screen())
    assert (summary.answered_before, summary.annotated, summary.remaining, summary.stopped) == (3, 3, 0, None)
    assert [r["pair_id"] for r in lines(out_path)] == [c["pair_id"] for c in lines(candidates)]

    def nobody(prompt: str) -> str:
        raise AssertionError("a finished file must not prompt")

    summary = annotate(candidates, out_path, input_fn=nobody, out=Screen())
    assert (summary.annotated, summary.remaining, summary.stopped) == (0, 0, None)


def test_eof_and_ctrl_c_in_process_exit_cleanly(candidates, tmp_path):
    out_path, screen = tmp_path / "ann.jsonl", Screen()
    summary = annotate(candidates, out_path, input_fn=Keys("a"), out=screen)  # EOFError after one key
    assert (summary.annotated, summary.stopped) == (1, "eof")
    assert "Input ended: annotated 1 pairs" in screen.text

    def ctrl_c(prompt: str) -> str:
        raise KeyboardInterrupt

    screen = Screen()
    summary = annotate(candidates, out_path, input_fn=ctrl_c, out=screen)
    assert (summary.answered_before, summary.annotated, summary.stopped) == (1, 0, "interrupt")
    assert "Interrupted" in screen.text and "To resume" in screen.text


def test_a_second_session_on_the_same_file_is_refused(candidates, tmp_path):
    out_path = tmp_path / "ann.jsonl"
    held = ann._open_for_append(out_path)  # as a running session holds it
    try:
        with pytest.raises(UserError, match="another annotate session"):
            annotate(candidates, out_path, input_fn=Keys("a"), out=Screen())
    finally:
        os.close(held)
    assert annotate(candidates, out_path, input_fn=Keys("a"), out=Screen()).annotated == 1


def test_resume_after_truncated_last_line(candidates, tmp_path, caplog):
    """A crash in the middle of a write (power loss) leaves a cut line: that pair is asked again and the
    next answer still lands on a line of its own."""
    out_path = tmp_path / "ann.jsonl"
    annotate(candidates, out_path, input_fn=Keys("a", "q"), out=Screen())
    cands = lines(candidates)
    with out_path.open("a") as f:
        f.write(json.dumps({"pair_id": cands[1]["pair_id"], "choice": "b", "annotator": "human:x"})[:30])
    screen = Screen()
    summary = annotate(candidates, out_path, input_fn=Keys("b", "q"), out=screen)
    assert "pair 2/6" in screen.text and "not a complete annotation" in caplog.text
    assert (summary.answered_before, summary.annotated) == (1, 1)
    assert list(read_annotations(out_path)) == [cands[0]["pair_id"], cands[1]["pair_id"]]


SUBPROCESS = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background test run may inherit SIG_IGN
from fastrlhf.trainer.annotate import annotate
annotate(sys.argv[1], sys.argv[2])
"""


def start_annotator(candidates: Path, out_path: Path, tmp_path: Path, keys: str) -> subprocess.Popen:
    """The annotator in its own process, reading keys from a pipe that stays open (so it waits on the
    next pair), stdout/stderr to files."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBPROCESS, str(candidates), str(out_path)],
        stdin=subprocess.PIPE,
        stdout=(tmp_path / "stdout.txt").open("w"),
        stderr=(tmp_path / "stderr.txt").open("w"),
        env=env,
        text=True,
    )
    proc.stdin.write(keys)
    proc.stdin.flush()
    return proc


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            time.sleep(0.2)  # let it draw the next screen and block on input
            return
        assert proc.poll() is None, f"annotator exited early: {proc.returncode}"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"annotator wrote fewer than {n} lines in {timeout} s")


def test_kill_9_loses_no_answer_and_rerun_resumes_after_them(candidates, tmp_path):
    out_path = tmp_path / "ann.jsonl"
    proc = start_annotator(candidates, out_path, tmp_path, "a\nb\nt\n")
    try:
        wait_for_lines(out_path, 3, proc)
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    cands = lines(candidates)
    answers = read_annotations(out_path)
    assert list(answers) == [c["pair_id"] for c in cands[:3]]
    assert [a["choice"] for a in answers.values()][2] == "tie"
    screen = Screen()
    summary = annotate(candidates, out_path, input_fn=Keys("s", "q"), out=screen)
    assert "pair 4/6" in screen.text and "pair 3/6" not in screen.text
    assert (summary.answered_before, summary.annotated, summary.remaining) == (3, 1, 2)


def test_ctrl_c_exits_0_without_traceback_and_keeps_the_file(candidates, tmp_path):
    out_path = tmp_path / "ann.jsonl"
    proc = start_annotator(candidates, out_path, tmp_path, "a\n2\n")
    try:
        wait_for_lines(out_path, 2, proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "Interrupted: annotated 2 pairs" in stdout and "it continues at pair 3/6" in stdout
    assert "pair 3/6" in stdout
    raw = out_path.read_text()
    assert raw.endswith("\n") and len(raw.splitlines()) == 2
    assert len(read_annotations(out_path)) == 2


# ---------------------------------------------------------------------------------- rubric + preferences


def test_rubric_mode_labels_annotator_and_source(candidates, tmp_path):
    out_path, pref_path, screen = tmp_path / "ann.jsonl", tmp_path / "prefs.jsonl", Screen()

    def nobody(prompt: str) -> str:
        raise AssertionError("the rubric answers alone")

    summary = annotate(candidates, out_path, rubric="demo", input_fn=nobody, out=screen)
    got = lines(out_path)
    # Paris > London; "The capital is Paris." vs "Lyon"; garbage < Berlin; "Berlin, of course." > Munich;
    # 42 > 43; "17 + 25 = 42" > "It is 52."
    assert [r["choice"] for r in got] == ["a", "a", "b", "a", "a", "a"]
    assert all(r["annotator"] == "rubric:demo" and r["swapped"] is False for r in got)
    assert got[2]["scores"] == [-1.0, 3.0]
    assert summary == AnnotationSummary(6, 0, 6, 5, 1, 0, 0, 0, None)
    assert "pair 1/6" not in screen.text and "Done: annotated 6 pairs" in screen.text

    assert build_preferences(candidates, out_path, pref_path) == 6
    pairs = load_pairs(pref_path)
    assert [p.chosen for p in pairs] == [
        "Paris.",
        "The capital is Paris.",
        "Berlin",
        "Berlin, of course.",
        "42",
        "17 + 25 = 42",
    ]
    assert {p.meta["source"] for p in pairs} == {"rubric-annotated"}
    assert {p.meta["annotator"] for p in pairs} == {"rubric:demo"}


def test_rubric_tie_and_unknown_rubric(tmp_path):
    cand = write_jsonl(tmp_path / "c.jsonl", [make_candidate(FRANCE, "Paris", "The capital is Paris, a lovely city.")])
    summary = annotate(cand, tmp_path / "a.jsonl", rubric="demo", out=Screen())
    assert (summary.ties, summary.annotated) == (1, 1)
    with pytest.raises(ValueError, match="unknown rubric"):
        annotate(cand, tmp_path / "b.jsonl", rubric="nope", out=Screen())
    assert not (tmp_path / "b.jsonl").exists()


def test_build_preferences_drops_ties_skips_and_a_truncated_line(candidates, tmp_path, caplog):
    out_path, pref_path = tmp_path / "ann.jsonl", tmp_path / "prefs.jsonl"
    annotate(candidates, out_path, input_fn=Keys("1", "2", "t", "s", "a"), out=Screen())  # 5 of 6, then EOF
    cands, answers = lines(candidates), lines(out_path)
    with out_path.open("a") as f:  # the process died while writing the 6th answer
        f.write(json.dumps({"pair_id": cands[5]["pair_id"], "choice": "a", "annotator": "human:x"})[:40])
    caplog.set_level(logging.INFO, logger="fastrlhf.trainer.annotate")
    assert build_preferences(candidates, out_path, pref_path) == 3
    assert "line 6 is not a complete annotation" in caplog.text
    assert "dropped 1 ties and 1 skips; 1 pairs not annotated yet" in caplog.text

    pairs = load_pairs(pref_path)
    kept = [0, 1, 4]
    assert [p.meta["pair_id"] for p in pairs] == [cands[i]["pair_id"] for i in kept]
    for pair, i in zip(pairs, kept):
        cand, answer = cands[i], answers[i]
        winner = cand["response_a"] if answer["choice"] == "a" else cand["response_b"]
        loser = cand["response_b"] if answer["choice"] == "a" else cand["response_a"]
        assert (pair.chosen, pair.rejected, pair.margin) == (winner, loser, None)
        assert pair.prompt == cand["prompt"]
        assert {k: pair.meta[k] for k in ("id", "answer", "aliases", "category")} == {
            k: cand[k] for k in ("id", "answer", "aliases", "category")
        }
        assert pair.meta["source"] == "human-annotated" and pair.meta["annotator"].startswith("human:")
        assert pair.meta["generation"] == {"model": "hand-made", "temperature": 0.7, "seed": 0}


def test_build_preferences_needs_the_annotations_file(candidates, tmp_path):
    with pytest.raises(FileNotFoundError, match="run annotate first"):
        build_preferences(candidates, tmp_path / "missing.jsonl", tmp_path / "p.jsonl")


def test_last_annotation_of_a_pair_wins(candidates, tmp_path):
    cands = lines(candidates)
    ann_path = tmp_path / "ann.jsonl"
    rows = [{"pair_id": cands[0]["pair_id"], "choice": c, "annotator": "human:x"} for c in ("a", "b")]
    ann_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert build_preferences(candidates, ann_path, tmp_path / "p.jsonl") == 1
    assert load_pairs(tmp_path / "p.jsonl")[0].chosen == cands[0]["response_b"]
