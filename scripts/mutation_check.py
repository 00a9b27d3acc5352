"""Fault injection: do the tests catch a wrong answer?

Each mutant is one known fault written into the source (a log-prob offset, a scaled KL, a lost flat tail,
a zeroed or halved gradient slice, an off-by-one target column, the temperature missing or doubled in the
backward, a flipped mask, no max subtraction, k3 replaced by k1, GAE's lambda ignored, a ratio clip on the
wrong side, ...). The script writes it, runs the tests that should notice, restores the file and requires
that they failed -- in every dtype those tests cover (fp32, bf16, fp16), not just in one. It first runs the
same tests on the untouched source, which must pass (else a "caught" would mean nothing).

    python scripts/mutation_check.py                 # all mutants; exit 1 if one is not caught
    python scripts/mutation_check.py --only k3 -v    # mutants whose name contains "k3", pytest's output shown
    python scripts/mutation_check.py --markdown results/mutation/table.md

The source files are edited in place and restored in a `finally` (and on SIGTERM / SIGINT); run it on a
clean tree. Each pytest run gets a fresh bytecode cache, so a restored file never runs a mutant's bytecode.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Mutant:
    name: str  # the fault, in a few words
    file: str  # relative to the repository root
    edits: list[tuple[str, str]]  # (old, new): each `old` must occur exactly once in the file
    tests: list[str]  # pytest arguments: files / node ids, then options such as -k
    dtypes: tuple[str, ...] = DTYPES  # each must have a failing test; () = any failure will do
    notes: str = ""


def contract(path: str, k: str) -> list[str]:
    return [f"tests/{path}", "-k", k]


TOKEN = "test_token_logprobs.py"
ROW = "contract and own_tiles and ({})"  # the row kernels' contract tests, in their own tiles
MUTANTS = [
    Mutant(
        "log-probs + 1e-4 nats",
        "kernels/token_logprobs.py",
        [("logp = ((x_t - m) * scale - log2_s) * LN2\n", "logp = ((x_t - m) * scale - log2_s) * LN2 + 1e-4\n")],
        contract(TOKEN, ROW.format("random")),
    ),
    Mutant(
        "log-probs x 1.0001",
        "kernels/token_logprobs.py",
        [("logp = ((x_t - m) * scale - log2_s) * LN2\n", "logp = ((x_t - m) * scale - log2_s) * LN2 * 1.0001\n")],
        contract(TOKEN, ROW.format("random")),
    ),
    Mutant(
        "sum-exp loses a flat tail (terms < 2^-10 of the max)",
        "kernels/token_logprobs.py",
        [
            (
                "    e = tl.exp2(y)\n    if COMPUTE_ENTROPY:",
                "    e = tl.where(y < -10.0, 0.0, tl.exp2(y))\n    if COMPUTE_ENTROPY:",
            )
        ],
        contract(TOKEN, ROW.format("random")),
    ),
    Mutant(
        "no max subtraction (sums of raw exponentials)",
        "kernels/token_logprobs.py",
        [
            ('c = tl.where(m_new == -float("inf"), 0.0, m_new)', "c = tl.zeros_like(m_new)"),
            ('c_row = tl.where(m_row == -float("inf"), 0.0, m_row)', "c_row = tl.zeros_like(m_row)"),
        ],
        contract(TOKEN, ROW.format("random or offset_plus100 or all_negative")),
    ),
    Mutant(
        "target column off by one",
        "kernels/token_logprobs.py",
        [
            (
                "x_t = tl.load(logits_ptr + row_off + tgt, mask=tgt_ok",
                "x_t = tl.load(logits_ptr + row_off + tl.minimum(tgt + 1, V - 1), mask=tgt_ok",
            )
        ],
        contract(TOKEN, ROW.format("random")),
    ),
    Mutant(
        "ignore_index polarity flipped",
        "kernels/token_logprobs.py",
        [
            (
                "active = row_in & (tgt != ignore_index)  # ignored rows read nothing",
                "active = row_in & (tgt == ignore_index)",
            )
        ],
        contract(TOKEN, ROW.format("masked_rows")),
    ),
    Mutant(
        "gradient zeroed at the target column",
        "kernels/token_logprobs.py",
        [("    return g * inv_t\n", "    return tl.where(is_tgt, 0.0, g * inv_t)\n")],
        contract(TOKEN, ROW.format("random")),
    ),
    Mutant(
        "gradient halved where the logit is > 2",
        "kernels/token_logprobs.py",
        [("    return g * inv_t\n", "    return tl.where(x > 2.0, 0.5 * g * inv_t, g * inv_t)\n")],
        contract(TOKEN, ROW.format("random")),
    ),
    Mutant(
        "temperature missing in the backward",
        "kernels/token_logprobs.py",
        [("    return g * inv_t\n", "    return g\n")],
        contract(TOKEN, ROW.format("temperature")),
    ),
    Mutant(
        "temperature applied twice in the backward",
        "kernels/token_logprobs.py",
        [("    return g * inv_t\n", "    return g * inv_t * inv_t\n")],
        contract(TOKEN, ROW.format("temperature")),
    ),
    Mutant(
        "entropy: the p log p term halved",
        "kernels/token_logprobs.py",
        [("ent = (log2_s - div_rn(w, s)) * LN2", "ent = (log2_s - 0.5 * div_rn(w, s)) * LN2")],
        contract(TOKEN, ROW.format("random")),
    ),
    Mutant(
        "full_kl x 1.0001",
        "kernels/full_kl.py",
        [
            (
                "tl.store(kl_ptr + rows, tl.where(active, kl, 0.0), mask=row_in)",
                "tl.store(kl_ptr + rows, tl.where(active, kl * 1.0001, 0.0), mask=row_in)",
            )
        ],
        contract("test_kl.py", "full_kl_contract and own_tiles and (random or near_equal)"),
    ),
    Mutant(
        "full_kl + 1e-5",
        "kernels/full_kl.py",
        [
            (
                "tl.store(kl_ptr + rows, tl.where(active, kl, 0.0), mask=row_in)",
                "tl.store(kl_ptr + rows, tl.where(active, kl + 1e-5, 0.0), mask=row_in)",
            )
        ],
        contract("test_kl.py", "full_kl_contract and own_tiles and (random or near_equal)"),
    ),
    Mutant(
        "full_kl: temperature missing in the backward",
        "kernels/full_kl.py",
        [
            (
                "g_kl = tl.load(grad_kl_ptr + rows, mask=active, other=0.0).to(ACC) * (inv_t * LN2)",
                "g_kl = tl.load(grad_kl_ptr + rows, mask=active, other=0.0).to(ACC) * LN2",
            )
        ],
        contract("test_kl.py", "full_kl_contract and own_tiles and temperature"),
    ),
    Mutant(
        "kl_estimate: k3's gradient with the wrong sign",
        "kernels/kl_estimate.py",
        [("dk = -g * expm1_neg(d)  # 1 - exp(-d)", "dk = g * expm1_neg(d)  # 1 - exp(-d)")],
        contract("test_kl.py", "estimate_contract and k3 and 0.01"),
    ),
    Mutant(
        "kl_estimate: k3 replaced by k1",
        "kernels/kl_estimate.py",
        [("        k = k3(d)\n", "        k = d\n")],
        contract("test_kl.py", "estimate_contract and k3 and 0.01"),
    ),
    Mutant(
        "gae: lambda ignored",
        "kernels/gae.py",
        [("c = tl.where(m, gamma_lam, 0.0)", "c = tl.where(m, gamma, 0.0)")],
        contract("test_gae.py", "contract_dtypes_and_masks"),
    ),
    Mutant(
        "ppo_head: ratio clip on the wrong side (min for max)",
        "kernels/ppo_head.py",
        [("pg = tl.where(k > u, k, u)  # torch.maximum", "pg = tl.where(k > u, u, k)  # torch.maximum")],
        contract("test_ppo_head.py", ROW.format("random")),
    ),
    Mutant(
        "ppo_head: clip range hi bound = 1",
        "kernels/ppo_head.py",
        [("k = -adv * tl.minimum(tl.maximum(ratio, lo), hi)", "k = -adv * tl.minimum(tl.maximum(ratio, lo), 1.0)")],
        contract("test_ppo_head.py", ROW.format("random")),
    ),
    Mutant(
        "ppo_head: surrogate gradient without the ratio factor",
        "kernels/ppo_head.py",
        [
            (
                "dpg = -adv * (w_u + tl.where(in_range, 1.0 - w_u, 0.0)) * ratio",
                "dpg = -adv * (w_u + tl.where(in_range, 1.0 - w_u, 0.0))",
            )
        ],
        contract("test_ppo_head.py", ROW.format("random")),
    ),
    Mutant(
        "gae: values not bootstrapped",
        "kernels/gae.py",
        [("delta = r + gamma * v_next - v", "delta = r - v")],
        contract("test_gae.py", "contract_dtypes_and_masks"),
    ),
    Mutant(
        "linear_logprobs: temperature missing in the backward",
        "kernels/linear_logprobs.py",
        [("(cols[None, :] < col_end), g * inv_t, 0.0)", "(cols[None, :] < col_end), g, 0.0)")],
        contract("test_linear_logprobs.py", "test_contract_forward_backward and temperature"),
    ),
    Mutant(
        "linear_full_kl: temperature missing in the backward",
        "kernels/linear_full_kl.py",
        [
            (
                "g_kl = tl.load(grad_kl_ptr + rows, mask=active, other=0.0).to(ACC) * inv_t",
                "g_kl = tl.load(grad_kl_ptr + rows, mask=active, other=0.0).to(ACC)",
            )
        ],
        contract("test_linear_logprobs.py", "kl_contract and temperature"),
    ),
    Mutant(
        "reward head: last real token off by one",
        "kernels/reward_head.py",
        [("        return tl.max(last, 0)\n", "        return tl.max(last, 0) - 1\n")],
        contract("test_pairwise.py", "reward_head_matches_reference and mask"),
    ),
    Mutant(
        "pairwise: margin added, not subtracted",
        "kernels/pairwise_loss.py",
        [
            (
                "        z -= tl.load(margin_ptr + offs, mask=inb, other=0.0).to(ACC)\n    tl.store(loss_ptr",
                "        z += tl.load(margin_ptr + offs, mask=inb, other=0.0).to(ACC)\n    tl.store(loss_ptr",
            )
        ],
        contract("test_pairwise.py", "pairwise_contract and tensor"),
    ),
    # the trainer's RL math (fp32 only: no dtype axis)
    Mutant(
        "policy loss: clip on the wrong side",
        "trainer/rl.py",
        [
            (
                "    torch.maximum(unclipped, clipped), (clipped > unclipped)",
                "    torch.minimum(unclipped, clipped), (clipped > unclipped)",
            )
        ],
        ["tests/test_rl.py"],
        (),
    ),
    Mutant(
        "value loss: clip on the wrong side",
        "trainer/rl.py",
        [("masked_mean(torch.maximum(unclipped, clipped), m)", "masked_mean(torch.minimum(unclipped, clipped), m)")],
        ["tests/test_rl.py"],
        (),
    ),
    Mutant(
        "whitening without centring",
        "trainer/rl.py",
        [("out = (x - mean) * torch.rsqrt", "out = x * torch.rsqrt")],
        ["tests/test_rl.py"],
        (),
    ),
    Mutant(
        "KL penalty with the wrong sign",
        "trainer/rl.py",
        [("rewards = (-kl_coef * kl.float())", "rewards = (kl_coef * kl.float())")],
        ["tests/test_rl.py"],
        (),
    ),
    Mutant(
        "score on the first token, not the last",
        "trainer/rl.py",
        [("last = m.sum(1) - 1  #", "last = 0 * m.sum(1)  #")],
        ["tests/test_rl.py"],
        (),
    ),
    Mutant(
        "GAE loop: lambda ignored",
        "trainer/rl.py",
        [("next_adv = (delta + gamma * lam * next_adv)", "next_adv = (delta + gamma * next_adv)")],
        ["tests/test_rl.py"],
        (),
    ),
    Mutant(
        "GRPO: the group's std ignored",
        "trainer/rl.py",
        [("centred = centred / (r.std(1, keepdim=True) + eps)", "centred = centred / (1.0 + eps)")],
        ["tests/test_rl.py"],
        (),
    ),
    Mutant(
        "RLOO: the baseline includes the row itself",
        "trainer/rl.py",
        [
            (
                "baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)",
                "baseline = r.sum(1, keepdim=True) / group_size",
            )
        ],
        ["tests/test_rl.py"],
        (),
    ),
    Mutant(
        "importance weights: sampler over trainer, inverted",
        "trainer/rl.py",
        [
            (
                "log_w = (old_logprobs.float() - behaviour_logprobs.float())",
                "log_w = (behaviour_logprobs.float() - old_logprobs.float())",
            )
        ],
        ["tests/test_rl.py"],
        (),
    ),
    Mutant(
        "importance weights never reach the policy gradient",
        "trainer/ppo.py",
        [('adv_l = adv_l * local["is_weight"]', "adv_l = adv_l * 1.0")],
        ["tests/test_ppo.py", "-k", "behaviour"],
        (),
    ),
    Mutant(
        "masked_mean: mask polarity flipped",
        "trainer/rl.py",
        [("    m = mask.bool()\n    total = x.where(m, 0)", "    m = ~mask.bool()\n    total = x.where(m, 0)")],
        ["tests/test_rl.py"],
        (),
    ),
]


@dataclass
class Outcome:
    failed: list[str] = field(default_factory=list)  # test ids that failed or errored
    ran: int = 0
    seconds: float = 0.0

    def caught_in(self, dtype: str) -> list[str]:
        pattern = re.compile(rf"(?<![a-z]){dtype}")  # "float16" must not match "bfloat16"
        return [t for t in self.failed if pattern.search(t)]


def run_pytest(args: list[str], verbose: bool) -> Outcome:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        env = {**os.environ, "PYTHONPYCACHEPREFIX": str(Path(tmp) / "pycache"), "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(xml), *args]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=not verbose, text=True)
        out = Outcome(seconds=time.perf_counter() - start)
        if not xml.exists():
            raise RuntimeError(f"pytest wrote no report (exit {done.returncode}): {done.stdout}{done.stderr}")
        for case in ET.parse(xml).getroot().iter("testcase"):
            if case.find("skipped") is not None:
                continue
            out.ran += 1
            if case.find("failure") is not None or case.find("error") is not None:
                out.failed.append(f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}")
        return out


class Mutation:
    """Writes a mutant's edits into its file; restores the original on exit (also on SIGTERM / SIGINT)."""

    def __init__(self, m: Mutant):
        self.path = REPO / m.file
        self.original = self.path.read_text()
        text = self.original
        for old, new in m.edits:
            if text.count(old) != 1:
                raise SystemExit(f"mutant {m.name!r}: {old!r} occurs {text.count(old)} times in {m.file}, not once")
            text = text.replace(old, new)
        self.mutated = text

    def __enter__(self):
        self.handlers = {s: signal.signal(s, self._interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
        self.path.write_text(self.mutated)
        return self

    def _interrupted(self, signum, frame):
        self.path.write_text(self.original)
        raise SystemExit(f"interrupted; {self.path} restored")

    def __exit__(self, *exc):
        self.path.write_text(self.original)
        for s, h in self.handlers.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the mutants whose name contains this text")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    ap.add_argument("-v", "--verbose", action="store_true", help="show pytest's output")
    ap.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the run on the untouched source (when the whole suite has just passed)",
    )
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only in m.name]

    selections = [] if args.no_baseline else sorted({tuple(m.tests) for m in mutants})
    if selections:
        print(f"baseline: {len(selections)} test selections on the untouched source", flush=True)
    for sel in selections:
        base = run_pytest(list(sel), args.verbose)
        if base.failed or not base.ran:
            print(f"baseline fails or runs nothing ({' '.join(sel)}): {base.failed[:5]}")
            return 1

    rows, missed = [], 0
    for m in mutants:
        with Mutation(m):
            out = run_pytest(m.tests, args.verbose)
        per_dtype = {d: out.caught_in(d) for d in m.dtypes}
        caught = bool(out.failed) and all(per_dtype.values())
        missed += not caught
        first = per_dtype[m.dtypes[0]][0] if m.dtypes and per_dtype[m.dtypes[0]] else (out.failed or ["-"])[0]
        cells = ["yes" if per_dtype.get(d) else ("no" if d in m.dtypes else "n/a") for d in DTYPES]
        rows.append((m.name, m.file, f"{len(out.failed)}/{out.ran}", *cells, first, "CAUGHT" if caught else "MISSED"))
        print(
            f"{'CAUGHT' if caught else 'MISSED'}  {m.name}  ({len(out.failed)}/{out.ran} failed, {out.seconds:.0f} s)",
            flush=True,
        )

    header = ("fault", "file", "tests failed", *DTYPES, "caught by (first)", "verdict")
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(f"`{c}`" if i in (1, 6) else str(c) for i, c in enumerate(r)) + " |" for r in rows]
    print("\n" + "\n".join(table))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(table) + "\n")
    print(f"\n{len(rows) - missed} of {len(rows)} faults caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
