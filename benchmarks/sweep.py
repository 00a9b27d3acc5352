"""Kernel benchmark sweep: op x mode x shape x dtype x provider, with the hardware ceilings measured in
the same run, written as long-format CSV + JSON (with provenance), PNG plots and a markdown summary
whose short form is printed LAST (a GPU host may return only the end of the output).

    python benchmarks/sweep.py --out out/sweep            # full grid, <= ~5 min on one H100
    python benchmarks/sweep.py --out out/sweep --quick    # headline shapes, ~2 min
    python benchmarks/sweep.py --out /tmp/s --smoke       # CPU: tiny shapes through Triton's interpreter

Every cell gets a row: measured ("ok"), "oom", "error", or "skipped" with the reason (no counterpart
op, CUDA-only provider, a slow baseline left out at the largest sizes, the time budget). A time budget
(--budget-s) keeps the whole grid inside its slot: cells are ordered by importance (the headline shape
first), and the ones that would start too late are recorded as skipped. On SIGTERM (e.g. `timeout`)
the sweep stops, records the rest as interrupted and still writes everything.

Output files (five, flat: an offline GPU host returns at most 8 files):
    sweep.csv  sweep.json  summary.md  bandwidth_vs_vocab.png  peak_memory_vs_rows.png
The CSV starts with '# key: value' provenance lines (pandas: `read_csv(path, comment="#")`).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is imported: run the kernels in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases  # noqa: E402
import measure  # noqa: E402
from cases import Case  # noqa: E402

COLUMNS = (
    "op",
    "mode",
    "provider",
    "dtype",
    "rows",
    "vocab",
    "seq",
    "shape",
    "median_ms",
    "gb_s",
    "pct_copy_bw",
    "min_bytes",
    "peak_mb",
    "peak_ratio",
    "speedup_vs_eager",
    "max_abs_err",
    "first_call_s",
    "input_sets",
    "timing",
    "status",
    "reason",
)
FILES = ("sweep.csv", "sweep.json", "summary.md", "bandwidth_vs_vocab.png", "peak_memory_vs_rows.png")

# --------------------------------------------------------------------------------------------- grids
VOCABS = (32000, 49152, 128256, 151936, 262144)
ROWS = (1024, 4096, 8192, 16384, 32768)
SEQ = 1024
HEADLINE = {"rows": 8192, "vocab": 151936, "seq": SEQ, "dtype": "bf16"}
SMOKE_HEADLINE = {"rows": 8, "vocab": 257, "seq": 4, "dtype": "bf16"}
BUDGET_S = {"full": 270.0, "quick": 85.0, "smoke": 120.0}


@dataclass(frozen=True)
class Cell:
    case: Case
    provider: str
    priority: int  # 0 = headline (the targets), then small ops, vocab sweep, rows sweep, fp32
    plan_skip: str | None = None  # a reason decided by the grid itself


def _logits_cases(op: str, dtype: str, shapes: Iterable[tuple[int, int]], seq: int, T: float) -> list[Case]:
    return [Case(op, mode, dtype, rows, vocab, seq, T) for rows, vocab in shapes for mode in cases.MODES]


# torch.compile costs ~10-20 s per (op, mode, dtype) and again per new shape: it runs only at these
# cells (the headline shape, and each small op's first shape), after every other cell of the grid.
COMPILE_AT = {
    "full": {
        ("token_logprobs", "fwd"),
        ("token_logprobs", "fwd_bwd"),
        ("token_logprobs_entropy", "fwd_bwd"),
        ("full_kl", "fwd"),
        ("full_kl", "fwd_bwd"),
        ("kl_estimate", "fwd_bwd"),
        ("pairwise_loss", "fwd_bwd"),
        ("reward_head", "fwd_bwd"),
        ("ppo_head", "fwd_bwd"),
    },
    "quick": {("token_logprobs", "fwd"), ("token_logprobs", "fwd_bwd"), ("full_kl", "fwd_bwd")},
    "smoke": {(op, mode) for op in cases.OPS for mode in cases.MODES},  # (CUDA only; skipped on CPU)
}
QUICK_SLOW_WHY = "quick grid: slow baselines run at the headline shape only"


def _grid_cases(name: str, T: float) -> list[tuple[Case, int]]:
    """(case, priority) for a grid. Priority 0 is the headline shape (the targets), then the PPO head at
    that shape and the small ops, the vocabulary sweep, the rows sweep, fp32."""
    head = SMOKE_HEADLINE if name == "smoke" else HEADLINE
    hshape = [(head["rows"], head["vocab"])]
    out = [(c, 0) for op in cases.LOGITS_OPS for c in _logits_cases(op, head["dtype"], hshape, head["seq"], T)]
    out += [(c, 1) for op in cases.HEAD_OPS for c in _logits_cases(op, head["dtype"], hshape, head["seq"], T)]
    if name == "smoke":
        out += [
            (c, 4) for op in ("token_logprobs", "full_kl") for c in _logits_cases(op, "fp32", hshape, head["seq"], T)
        ]
        small = [
            ("kl_estimate", "fp32", 64, 0, 0),
            ("pairwise_loss", "fp32", 8, 0, 0),
            ("reward_head", "bf16", 4, 32, 8),
        ]
    elif name == "quick":
        ends = [(head["rows"], VOCABS[0]), (head["rows"], VOCABS[-1])]  # the smallest and largest vocabularies
        out += [(c, 2) for c in _logits_cases("token_logprobs", "bf16", ends, SEQ, T)]
        out += [(c, 4) for c in _logits_cases("token_logprobs", "fp32", hshape, SEQ, T)]
        small = [
            ("kl_estimate", "fp32", 1 << 18, 0, 0),
            ("pairwise_loss", "fp32", 4096, 0, 0),
            ("reward_head", "bf16", 16, 2048, 1024),
        ]
    else:
        vocab_sweep = [(head["rows"], v) for v in VOCABS if v != head["vocab"]]
        rows_sweep = [(r, head["vocab"]) for r in ROWS if r != head["rows"]]
        fp32_shapes = hshape + [(head["rows"], VOCABS[0]), (head["rows"], VOCABS[-1])]
        for op in cases.LOGITS_OPS:
            out += [(c, 2) for c in _logits_cases(op, "bf16", vocab_sweep, SEQ, T)]
            out += [(c, 3) for c in _logits_cases(op, "bf16", rows_sweep, SEQ, T)]
            if op != "token_logprobs_entropy":  # entropy: bf16 only
                out += [(c, 4) for c in _logits_cases(op, "fp32", fp32_shapes, SEQ, T)]
        small = [
            ("kl_estimate", "fp32", 1 << 18, 0, 0),
            ("kl_estimate", "fp32", 1 << 22, 0, 0),
            ("pairwise_loss", "fp32", 4096, 0, 0),
            ("pairwise_loss", "fp32", 64, 0, 0),
            ("reward_head", "bf16", 16, 2048, 1024),
            ("reward_head", "bf16", 64, 4096, 2048),
        ]
    out += [(Case(op, mode, dt, rows, vocab, seq, T), 1) for op, dt, rows, vocab, seq in small for mode in cases.MODES]
    return out


def build_grid(name: str, temperature: float) -> list[Cell]:
    """The cells of the 'full', 'quick' or 'smoke' grid: every case x every provider, with the grid's
    own reasons to leave a provider out (torch.compile outside COMPILE_AT; in the quick grid, the slow
    baselines outside the headline shape)."""
    cells, first_shape = [], {}
    for case, priority in _grid_cases(name, temperature):
        first_shape.setdefault(case.op, case.shape)
        for p in cases.PROVIDERS:
            why = None
            if p == "compile":
                at = (case.op, case.mode) in COMPILE_AT[name]
                at = at and (
                    priority == 0
                    or (case.op in cases.SMALL_OPS + cases.HEAD_OPS and case.shape == first_shape[case.op])
                )
                why = (
                    None
                    if at
                    else f"torch.compile runs only at {name}-grid cells listed in sweep.COMPILE_AT (compilation time)"
                )
                priority_p = priority + 10  # after every other cell: compilations must not crowd them out
            else:
                priority_p = priority
                slow = p in ("torch_ref", "selective")
                if name == "quick" and priority > 0 and case.op not in cases.HEAD_OPS and slow:
                    why = QUICK_SLOW_WHY
            cells.append(Cell(case, p, priority_p, why))
    return cells


# ------------------------------------------------------------------------------------------ running
class Interrupted(Exception):
    """SIGTERM arrived (an outer `timeout`): stop measuring, write what we have."""


# "flag": SIGTERM seen (kept even when a library re-raises our Interrupted as its own error);
# "in_cell": a measurement is running, so the handler interrupts it rather than waiting for it.
_TERM = {"flag": False, "in_cell": False}


def _on_sigterm(signum, frame):  # noqa: ARG001
    _TERM["flag"] = True
    if _TERM["in_cell"]:
        raise Interrupted()


def base_row(case: Case, provider: str) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(
        op=case.op,
        mode=case.mode,
        provider=provider,
        dtype=case.dtype,
        rows=case.rows,
        vocab=case.vocab,
        seq=case.seq,
        shape=case.shape,
        min_bytes=cases.min_bytes(case),
    )
    return row


def input_key(case: Case) -> tuple:
    kind = "kl" if case.op == "full_kl" else "tok" if case.op in cases.LOGITS_OPS else case.op  # ppo_head: own inputs
    return (kind, case.dtype, case.rows, case.vocab, case.seq)


def _est_cell_s(cell: Cell, copy_bw: float | None, compiled: set) -> float:
    """Planning estimate of one cell's wall time on a GPU: do_bench's budget, about a dozen calls
    (estimate, warm-up, timing, peak memory, check), and a compilation the first time."""
    s = 0.25 + 10 * cases.est_call_ms(cell.case, cell.provider, copy_bw) / 1e3
    if cell.provider == "compile":  # a first compilation, or a re-specialisation for a new shape
        s += 8.0 if (cell.case.op, cell.case.mode, cell.case.dtype) in compiled else 15.0
    return s


def _free(device: torch.device) -> None:
    gc.collect()
    if measure.on_cuda(device):
        torch.cuda.empty_cache()


def run_grid(cells: list[Cell], device: torch.device, copy_bw: float | None, budget_s: float, log=print) -> list[dict]:
    """Measure every cell (or record why not). Input sets are generated once per shape and dtype and
    shared by the providers and modes that use them."""
    order = sorted(range(len(cells)), key=lambda i: (cells[i].priority, input_key(cells[i].case), i))
    rows: list[dict | None] = [None] * len(cells)
    t_end = time.monotonic() + budget_s
    sets_key, sets = None, None
    compiled: set = set()
    _TERM.update(flag=False, in_cell=False)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for n, i in enumerate(order, 1):
            cell = cells[i]
            row = rows[i] = base_row(cell.case, cell.provider)
            if _TERM["flag"]:
                row.update(status="skipped", reason="interrupted (SIGTERM) before this cell")
                continue
            why = cases.static_skip(cell.case, cell.provider, device, copy_bw) or cell.plan_skip
            if (
                why is None
                and time.monotonic() + (_est_cell_s(cell, copy_bw, compiled) if measure.on_cuda(device) else 0) > t_end
            ):
                why = f"time budget (--budget-s {budget_s:.0f}) exhausted before this cell"
            if why:
                row.update(status="skipped", reason=why)
                continue
            oom = False
            _TERM["in_cell"] = True
            try:
                if sets_key != input_key(cell.case):
                    sets = None
                    _free(device)
                    sets_key = input_key(cell.case)
                    sets = cases.input_sets(cell.case, device)
                row.update(cases.run_cell(cell.case, cell.provider, sets, device, copy_bw), status="ok")
                if cell.provider == "compile":
                    compiled.add((cell.case.op, cell.case.mode, cell.case.dtype))
            except Interrupted:
                pass  # recorded below
            except cases.Skip as e:
                row.update(status="skipped", reason=str(e))
            except torch.OutOfMemoryError as e:
                row.update(status="oom", reason=str(e).splitlines()[0][:200])
                oom = True
            except Exception as e:  # one broken provider must not end the sweep
                row.update(status="error", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            finally:
                _TERM["in_cell"] = False
            if _TERM["flag"] and row["status"] != "ok":
                row.update(status="skipped", reason="interrupted (SIGTERM) during this cell")
            if oom:  # outside the except block, whose traceback still holds the failed call's tensors
                sets, sets_key = None, None
                _free(device)
            log(_progress(n, len(cells), row))
    finally:
        signal.signal(signal.SIGTERM, old)
        sets = None
        _free(device)
    add_speedups(rows)  # type: ignore[arg-type]
    return rows  # type: ignore[return-value]


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_eager = the eager idiom's median / this median, same op, mode, dtype and shape (GPU
    only: on CPU the kernel runs in Triton's interpreter and a ratio would mean nothing)."""
    eager = {_row_key(r): r["median_ms"] for r in rows if r["provider"] == "eager" and r["status"] == "ok"}
    for r in rows:
        e = eager.get(_row_key(r))
        if r["status"] == "ok" and e and r["median_ms"] and r["timing"] == "do_bench":
            r["speedup_vs_eager"] = e / r["median_ms"]


def _row_key(r: dict) -> tuple:
    return (r["op"], r["mode"], r["dtype"], r["shape"])


def _fmt(x, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):  # nd >= 0: fixed decimals; -1: scientific; -2: 4 significant digits
        return f"{x:.1e}" if nd == -1 else f"{x:.4g}" if nd == -2 else f"{x:.{nd}f}"
    return str(x)


def _progress(n: int, total: int, r: dict) -> str:
    head = f"[{n:>3}/{total}] {r['op']} {r['mode']} {r['dtype']} {r['shape']} {r['provider']}:"
    if r["status"] != "ok":
        return f"{head} {r['status']} ({r['reason']})"
    return (
        f"{head} {_fmt(r['median_ms'], -2)} ms, {_fmt(r['gb_s'], 0)} GB/s, {_fmt(r['pct_copy_bw'], 1)}% copy, "
        f"peak {_fmt(r['peak_ratio'])}x, err {_fmt(r['max_abs_err'], -1)}, first call {_fmt(r['first_call_s'])} s"
    )


# ------------------------------------------------------------------------------------------ targets
TARGETS = (
    # (what, op, mode, column, comparison, threshold): measured on fastrlhf at the headline shape
    ("token_logprobs fwd (no grad): % of copy bandwidth", "token_logprobs", "fwd", "pct_copy_bw", ">=", 90.0),
    (
        "token_logprobs fwd (no grad): speedup vs the eager idiom",
        "token_logprobs",
        "fwd",
        "speedup_vs_eager",
        ">=",
        12.0,
    ),
    ("token_logprobs fwd+bwd: % of copy bandwidth", "token_logprobs", "fwd_bwd", "pct_copy_bw", ">=", 85.0),
    ("full_kl fwd+bwd: % of copy bandwidth", "full_kl", "fwd_bwd", "pct_copy_bw", ">=", 85.0),
    ("token_logprobs fwd+bwd: peak memory / (logits + gradient)", "token_logprobs", "fwd_bwd", "peak_ratio", "<=", 1.1),
    ("full_kl fwd+bwd: peak memory / (both logits + gradient)", "full_kl", "fwd_bwd", "peak_ratio", "<=", 1.1),
)


def evaluate_targets(rows: list[dict], head: dict, on_gpu: bool) -> list[dict]:
    """Each target: the value measured for fastrlhf at the headline shape, and met / missed / n/a."""
    shape = f"{head['rows'] // head['seq']}x{head['seq']}x{head['vocab']}"
    out = []
    for what, op, mode, col, cmp, thr in TARGETS:
        want = (op, mode, "fastrlhf", head["dtype"], shape)
        r = next((r for r in rows if (r["op"], r["mode"], r["provider"], r["dtype"], r["shape"]) == want), None)
        value = r[col] if r else None
        if not on_gpu:
            verdict = "n/a (CPU smoke run)"
        elif r is None or r["status"] != "ok":
            verdict = f"n/a (cell {r['status'] if r else 'not in grid'})"
        elif value is None:
            verdict = "n/a (not measured)"
        else:
            verdict = "met" if (value >= thr if cmp == ">=" else value <= thr) else "missed"
        out.append(
            {
                "target": what,
                "shape": f"{head['dtype']} {head['rows']} x {head['vocab']}",
                "value": value,
                "threshold": f"{cmp} {thr:g}",
                "verdict": verdict,
            }
        )
    return out


# ------------------------------------------------------------------------------------------ writing
def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    with path.open("w", newline="") as f:
        for k, v in meta.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})


def write_json(path: Path, rows: list[dict], meta: dict, targets: list[dict]) -> None:
    doc = {"meta": meta, "targets": targets, "columns": list(COLUMNS), "rows": rows}
    path.write_text(json.dumps(measure.json_safe(doc), indent=1))


def _table(rows: list[dict], cols: list[tuple[str, str, int]]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c], nd) if c in r else "-" for _, c, nd in cols) + " |")
    return lines


def markdown(rows: list[dict], meta: dict, targets: list[dict], head: dict, full: bool) -> str:
    """The summary: provenance, the headline table, the small ops, the targets; with full=True also
    every row (skips and errors with their reasons)."""
    on_gpu = meta["device"].startswith("cuda")
    m = [
        f"## fastrlhf kernel sweep ({meta['grid']} grid) - {meta['gpu_name'] or 'CPU (no GPU)'}",
        "",
        (
            f"copy bandwidth {_fmt(meta['copy_bw_gbs'], 0)} GB/s (read + write, measured this run), "
            f"bf16 matmul {_fmt(meta['matmul_bf16_tflops'], 0)} TFLOP/s; driver {meta['gpu_driver']}, "
            f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
            f"liger {meta['liger_kernel']}; commit {meta['git_commit'][:12]}; {meta['date_utc']}; "
            f"temperature {meta['temperature']}."
        ),
    ]
    if not on_gpu:
        m += [
            "",
            (
                "CPU smoke run: times are wall-clock medians of Triton's *interpreter* (a wiring check, not "
                "performance); GB/s, % of copy bandwidth, peak memory and speedups are not applicable."
            ),
        ]
    cols = [
        ("op", "op", 0),
        ("mode", "mode", 0),
        ("provider", "provider", 0),
        ("ms", "median_ms", -2),
        ("GB/s", "gb_s", 0),
        ("% copy", "pct_copy_bw", 1),
        ("peak/ess.", "peak_ratio", 2),
        ("x eager", "speedup_vs_eager", 1),
        ("max err", "max_abs_err", -1),
        ("status", "status", 0),
    ]
    shape = f"{head['rows'] // head['seq']}x{head['seq']}x{head['vocab']}"
    hrows = [r for r in rows if r["shape"] == shape and r["dtype"] == head["dtype"] and _shown(r)]
    m += ["", f"### Headline: {head['dtype']}, {head['rows']} rows x vocab {head['vocab']} (B x T x V = {shape})", ""]
    m += _table(hrows, cols)
    first_shape: dict[str, str] = {}
    for r in rows:
        first_shape.setdefault(r["op"], r["shape"])
    srows = [r for r in rows if r["op"] in cases.SMALL_OPS and r["shape"] == first_shape[r["op"]] and _shown(r)]
    m += ["", "### Small ops (launch-bound; each op's first size, the others in summary.md)", ""]
    m += _table(srows, [("shape", "shape", 0)] + cols)
    m += ["", "### Targets (fastrlhf, headline shape; % of the copy bandwidth measured in this run)", ""]
    m += ["| target | value | threshold | verdict |", "|---|---|---|---|"]
    m += [f"| {t['target']} | {_fmt(t['value'])} | {t['threshold']} | **{t['verdict']}** |" for t in targets]
    n_status = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "oom", "error")}
    m += ["", "cells: " + ", ".join(f"{v} {k}" for k, v in n_status.items()) + f"; wall {meta.get('wall_s', 0):.0f} s."]
    errors = [r for r in rows if r["status"] in ("error", "oom")]
    if errors:
        m += ["", "errors / OOM:"] + [
            f"- {r['op']} {r['mode']} {r['dtype']} {r['shape']} {r['provider']}: {r['status']} {r['reason']}"
            for r in errors[:12]
        ]
    if full:
        m += ["", "### All cells", ""]
        m += _table(rows, [("dtype", "dtype", 0), ("shape", "shape", 0)] + cols + [("reason", "reason", 0)])
    return "\n".join(m) + "\n"


def _shown(r: dict) -> bool:
    """Rows worth a line in the short tables: measured or failed ones (not 'no such op' skips)."""
    return r["status"] != "skipped" or r["reason"].startswith(("slow baseline", "time budget", "interrupted"))


def plot(rows: list[dict], out: Path, head: dict, on_gpu: bool) -> None:
    """bandwidth_vs_vocab.png: achieved GB/s (right axis: % of copy bandwidth) against the vocabulary,
    per provider, at the headline rows in bf16. peak_memory_vs_rows.png: peak memory against the rows
    at the headline vocabulary, with the essential bytes (inputs + gradient) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(op, mode) for op in cases.LOGITS_OPS for mode in cases.MODES]
    copy_bw = next((r["gb_s"] / r["pct_copy_bw"] * 100 for r in rows if r["gb_s"] and r["pct_copy_bw"]), None)

    def figure(title: str):
        fig, axes = plt.subplots(len(cases.LOGITS_OPS), len(cases.MODES), figsize=(11, 10), squeeze=False)
        fig.suptitle(title, fontsize=10)
        return fig, axes

    # 1) GB/s vs vocab
    fig, axes = figure(
        f"achieved GB/s vs vocabulary ({head['dtype']}, {head['rows']} rows)"
        if on_gpu
        else "CPU smoke: wall-clock ms of the interpreter (not performance)"
    )
    for ax, (op, mode) in zip(axes.flat, panels):
        sel = [
            r
            for r in rows
            if (r["op"], r["mode"], r["dtype"], r["rows"]) == (op, mode, head["dtype"], head["rows"])
            and r["status"] == "ok"
        ]
        y = "gb_s" if on_gpu else "median_ms"
        for p in cases.PROVIDERS:
            pts = sorted((r["vocab"], r[y]) for r in sel if r["provider"] == p and r[y] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        if on_gpu and copy_bw and sel:
            ax.axhline(copy_bw, color="k", ls="--", lw=0.8, label="copy bw")
            sec = ax.secondary_yaxis("right", functions=(lambda g: 100 * g / copy_bw, lambda pc: pc * copy_bw / 100))
            sec.set_ylabel("% of copy bw")
        ax.set_title(f"{op} {mode}", fontsize=9)
        ax.set_xlabel("vocab")
        if on_gpu and sel:
            ax.set_xscale("log", base=2)
        ax.set_ylabel("GB/s" if on_gpu else "ms (interpreter)")
        if not sel:
            ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bandwidth_vs_vocab.png", dpi=80)
    plt.close(fig)

    # 2) peak memory vs rows
    fig, axes = figure(f"peak memory vs rows ({head['dtype']}, vocab {head['vocab']})")
    for ax, (op, mode) in zip(axes.flat, panels):
        ax.set_title(f"{op} {mode}", fontsize=9)
        want = (op, mode, head["dtype"], head["vocab"])
        sel = [
            r
            for r in rows
            if (r["op"], r["mode"], r["dtype"], r["vocab"]) == want and r["status"] == "ok" and r["peak_mb"] is not None
        ]
        if not sel:
            ax.text(
                0.5,
                0.5,
                "peak memory is measured on CUDA only" if not on_gpu else "no data",
                ha="center",
                transform=ax.transAxes,
            )
            continue
        for p in cases.PROVIDERS:
            pts = sorted((r["rows"], r["peak_mb"] / 1024) for r in sel if r["provider"] == p)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        ess = sorted(
            {
                (r["rows"], cases.essential_bytes(Case(op, mode, r["dtype"], r["rows"], r["vocab"], r["seq"])) / 2**30)
                for r in sel
            }
        )
        ax.plot(*zip(*ess), "k--", lw=0.8, label="inputs + grad" if mode == "fwd_bwd" else "inputs")
        ax.set_xlabel("rows")
        ax.set_xscale("log", base=2)
        ax.set_ylabel("peak GiB")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "peak_memory_vs_rows.png", dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("out/sweep"), help="output folder (created)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="headline shapes only (~2 min on one H100)")
    g.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU through Triton's interpreter (seconds)")
    ap.add_argument("--ops", nargs="+", choices=cases.OPS, help="only these ops")
    ap.add_argument("--providers", nargs="+", choices=cases.PROVIDERS, help="only these providers (others: skipped)")
    ap.add_argument("--budget-s", type=float, help=f"wall-time budget for the cells (default {BUDGET_S})")
    ap.add_argument("--temperature", type=float, default=cases.TEMPERATURE)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not measure.on_cuda(device) and grid != "smoke":
        print("no CUDA device: only --smoke runs here (tiny shapes through Triton's interpreter)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    head = SMOKE_HEADLINE if grid == "smoke" else HEADLINE
    meta = measure.environment(device)
    command = " ".join(["benchmarks/sweep.py", *(sys.argv[1:] if argv is None else argv)])
    meta.update(grid=grid, temperature=args.temperature, headline=head, command=command)
    meta.update(measure.ceilings(device))
    print(
        f"[sweep] {meta['gpu_name'] or 'CPU'}: copy {_fmt(meta['copy_bw_gbs'], 0)} GB/s, bf16 matmul "
        f"{_fmt(meta['matmul_bf16_tflops'], 0)} TFLOP/s",
        flush=True,
    )
    cells = build_grid(grid, args.temperature)
    if args.ops:
        cells = [c for c in cells if c.case.op in args.ops]
    if args.providers:
        cells = [
            c if c.provider in args.providers else Cell(c.case, c.provider, c.priority, "not selected (--providers)")
            for c in cells
        ]
    budget = args.budget_s if args.budget_s is not None else BUDGET_S[grid]
    rows = run_grid(
        cells, device, meta["copy_bw_gbs"], budget - (time.monotonic() - t0), log=lambda s: print(s, flush=True)
    )
    meta["wall_s"] = time.monotonic() - t0
    targets = evaluate_targets(rows, head, measure.on_cuda(device))
    write_csv(out / "sweep.csv", rows, meta)
    write_json(out / "sweep.json", rows, meta, targets)
    (out / "summary.md").write_text(markdown(rows, meta, targets, head, full=True))
    try:
        plot(rows, out, head, measure.on_cuda(device))
    except Exception as e:  # a plotting problem must not lose the measurements
        print(f"[sweep] plotting failed: {type(e).__name__}: {e}", flush=True)
    print(f"[sweep] wrote {', '.join(FILES)} to {out}", flush=True)
    print("\n" + markdown(rows, meta, targets, head, full=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
