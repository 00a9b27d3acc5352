"""Fused linear log-probs: `fastrlhf.kernels.linear_logprobs` (per-token log-probs [+ entropy] straight from
hidden states and the LM-head weight, no [M, V] logits) against its chunked-torch twin, the eager idiom that
materialises the logits, and the bf16 matmul of the same shape; `linear_full_kl` against its twin as information.

    python benchmarks/bench_linear.py --out out/linear            # CUDA: 8192 x 4096 x 151936 bf16, <= ~90 s
    python benchmarks/bench_linear.py --out out/linear --quick    # CUDA: linear_logprobs only, ~40 s
    python benchmarks/bench_linear.py --out /tmp/linear --smoke   # CPU: 16 x 32 x 300 fp32, a wiring check

Shape: M rows (tokens) x H hidden x V vocabulary; hidden (M, H) and W (V, H) in one dtype (bf16), random
(hidden ~ N(0, 1), W ~ N(0, 4/H): logits ~ N(0, 2^2)), targets uniform, temperature 0.7.
Cases (op, mode) and providers:
    matmul          fwd      `hidden @ W.T` (torch.matmul, the input dtype): THE MEASURED MATMUL RATE every
                             TFLOP/s below is compared with (same M x H x V, same run)
    linear_logprobs fwd      fastrlhf | torch_ref | eager            (no grad)
    linear_logprobs fwd_bwd  fastrlhf | torch_ref | eager            (forward + grad of hidden and W)
    linear_logprobs fwd+ent  fastrlhf | torch_ref                    (with entropy; full grid only)
    linear_full_kl  fwd, fwd_bwd  fastrlhf | torch_ref               (reference head = a perturbed copy; full grid only)
  fastrlhf   the Triton kernel (`linear_logprobs`, `linear_full_kl`)
  torch_ref  the chunked-PyTorch twin (`*_ref`: fp32 logits for 1024-row chunks, checkpointed under autograd)
  eager      the idiom `torch.log_softmax((hidden @ W.T).float() / T, -1).gather(-1, targets[:, None])`
fwd runs under torch.no_grad(); fwd_bwd is the forward + `torch.autograd.grad` w.r.t. (hidden, W) with a
fixed random upstream gradient (nothing accumulates into .grad).

FLOP convention (stated in the JSON too): TFLOP/s = USEFUL FLOPs / median time, useful = the matmuls the math
needs once: forward 2MVH (the logits); fwd_bwd 6MVH (logits + grad_hidden + grad_W, 2MVH each). The kernel's
backward recomputes the logits, so it EXECUTES 8MVH for fwd_bwd (`tflops_executed`); the recompute is not
credited. linear_full_kl: useful 4MVH forward (both heads' logits), 8MVH fwd_bwd (+ the policy's two
gradients); the kernel executes 8MVH / 16MVH (two forward passes, a recompute of both heads).
`pct_matmul` = TFLOP/s (useful) / the matmul row's TFLOP/s. The 8192^3 bf16 rate (`measure.matmul_tflops`)
is recorded beside it as information.

Timing: CUDA, a call of <= 50 ms: `measure.median_ms` (triton.testing.do_bench median, L2 flushed). A slower
call (the fp32 twins, the eager backward) would cost do_bench >= 8 calls: it is the median of up to 3
CUDA-event-timed calls after a warm-up call instead (`timing` says which). Each provider's first call is
separate: it compiles, gives the outputs for the check and the peak memory (`first_call_s`). One input
set (2.5 GB at the headline shape: far beyond any cache; the op is compute-bound). CPU: one wall-clock call.
Peak memory (CUDA): `max_memory_allocated` during the first call minus what was allocated before it (the
inputs), `peak_extra_mb`; beside it the bf16 logits M*V*2 (`logits_mb`) for comparison. For fwd_bwd the
gradients are O(VH + MH) by nature: `grad_buffers_mb` = the returned gradients (+ the kernel's documented fp32
accumulators), and `peak_beyond_grads_mb` = peak extra - that, which must be O(tile) for the kernel.
Check: every provider's outputs against torch_ref's on the same inputs (its first call runs before the others
and is kept): max abs diff of log-probs (and entropy / KL), and for fwd_bwd of grad_hidden and grad_W
(with the twin's max |grad| for scale).
Time budget (--budget-s, default full 80 s / quick 35 s of cells): each provider's cost is estimated from
the measured matmul time before it starts; one that would not finish is skipped with the reason, cases run
most important first (matmul, linear_logprobs fwd, fwd_bwd, then the information cases). An OOM is caught
and recorded (`status=oom`). On SIGTERM (an outer `timeout`) it stops and still writes both files.
Targets (CUDA, the headline shape; `targets` in the JSON, met / missed / n/a): forward >= 60% of the measured
matmul rate; fwd_bwd (useful 6MVH) >= 50%; peak extra (fwd) and peak beyond the gradients (fwd_bwd) <= 5% of
the bf16 logits (O(tile), not O(M x V)); >= 2x faster than torch_ref, fwd and fwd_bwd.

CPU (--smoke): without TRITON_INTERPRET=1 `linear_logprobs` dispatches to `linear_logprobs_ref`, so fastrlhf
and torch_ref run the same code; with it (tests/conftest.py) the kernel runs in Triton's interpreter.
`kernel_path` in the JSON says which. No CPU number is a performance number: TFLOP/s, speedups, memory and
verdicts are None / n/a there. Output, flat in --out: linear.json (meta, rows, targets), linear.md (also
printed last). A script, not a pytest-benchmark suite: `pytest benchmarks/` collects nothing from it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402

from fastrlhf.kernels import linear_full_kl, linear_full_kl_ref, linear_logprobs, linear_logprobs_ref  # noqa: E402
from fastrlhf.kernels import use_triton  # noqa: E402

FILES = ("linear.json", "linear.md")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = {"full": (8192, 4096, 151936, "bf16"), "quick": (8192, 4096, 151936, "bf16"), "smoke": (16, 32, 300, "fp32")}
BUDGET_S = {"full": 80.0, "quick": 35.0, "smoke": 300.0}
TEMPERATURE = 0.7
LOGIT_STD = 2.0
SLOW_MS = 50.0  # slower calls: median of SLOW_REPEATS event-timed calls instead of do_bench's >= 8
SLOW_REPEATS = 3
TILE_FRACTION = 0.05  # "O(tile)": peak extra (beyond gradients) <= this fraction of the bf16 logits
COMPILE_S = 6.0  # planning allowance for a Triton compilation (a kernel variant's first call)
FLOP_CONVENTION = (
    "TFLOP/s = useful FLOPs / median time; useful: linear_logprobs fwd 2MVH, fwd_bwd 6MVH (logits + grad_hidden "
    "+ grad_W; the kernel's recomputed logits, 2MVH more, are not credited: tflops_executed counts 8MVH); "
    "linear_full_kl fwd 4MVH (both heads), fwd_bwd 8MVH (kernel executes 8MVH / 16MVH); matmul 2MVH"
)

# (op, mode, providers, grids): the cases in priority order
CASES = (
    ("matmul", "fwd", ("torch",), ("full", "quick", "smoke")),
    ("linear_logprobs", "fwd", ("fastrlhf", "torch_ref", "eager"), ("full", "quick", "smoke")),
    ("linear_logprobs", "fwd_bwd", ("fastrlhf", "torch_ref", "eager"), ("full", "quick", "smoke")),
    ("linear_logprobs", "fwd_entropy", ("fastrlhf", "torch_ref"), ("full", "smoke")),
    ("linear_full_kl", "fwd", ("fastrlhf", "torch_ref"), ("full", "smoke")),
    ("linear_full_kl", "fwd_bwd", ("fastrlhf", "torch_ref"), ("full", "smoke")),
)
# useful and kernel-executed FLOPs per case, in units of MVH
USEFUL_MVH = {
    ("matmul", "fwd"): 2,
    ("linear_logprobs", "fwd"): 2,
    ("linear_logprobs", "fwd_entropy"): 2,
    ("linear_logprobs", "fwd_bwd"): 6,
    ("linear_full_kl", "fwd"): 4,
    ("linear_full_kl", "fwd_bwd"): 8,
}
EXECUTED_MVH = {
    **USEFUL_MVH,
    ("linear_logprobs", "fwd_bwd"): 8,
    ("linear_full_kl", "fwd"): 8,
    ("linear_full_kl", "fwd_bwd"): 16,
}
# planning estimate of one call, in units of the measured matmul time (CUDA): the kernel at ~50% of the matmul
# rate, the fp32 twins at ~1/15 of it (no TF32), the eager idiom's elementwise passes over fp32 logits
EST_MATMULS = {
    ("fastrlhf", "fwd"): 2.5,
    ("fastrlhf", "fwd_entropy"): 2.5,
    ("fastrlhf", "fwd_bwd"): 10.0,
    ("torch_ref", "fwd"): 16.0,
    ("torch_ref", "fwd_entropy"): 16.0,
    ("torch_ref", "fwd_bwd"): 64.0,
    ("eager", "fwd"): 2.5,
    ("eager", "fwd_bwd"): 6.0,
    ("torch", "fwd"): 1.0,
}
KL_FACTOR = 2.0  # linear_full_kl does two heads: twice the estimate
TARGETS = (  # (name, case, provider, field, comparison, threshold)
    (
        "linear_logprobs fwd: % of the measured bf16 matmul rate (2MVH)",
        ("linear_logprobs", "fwd"),
        "fastrlhf",
        "pct_matmul",
        ">=",
        60.0,
    ),
    (
        "linear_logprobs fwd+bwd: % of the measured bf16 matmul rate (useful 6MVH)",
        ("linear_logprobs", "fwd_bwd"),
        "fastrlhf",
        "pct_matmul",
        ">=",
        50.0,
    ),
    (
        "linear_logprobs fwd: peak extra memory / bf16 logits (M*V*2)",
        ("linear_logprobs", "fwd"),
        "fastrlhf",
        "peak_vs_logits",
        "<=",
        TILE_FRACTION,
    ),
    (
        "linear_logprobs fwd+bwd: (peak extra - gradient buffers) / bf16 logits",
        ("linear_logprobs", "fwd_bwd"),
        "fastrlhf",
        "peak_vs_logits",
        "<=",
        TILE_FRACTION,
    ),
    (
        "linear_logprobs fwd: speedup vs the chunked-torch twin",
        ("linear_logprobs", "fwd"),
        "fastrlhf",
        "speedup_vs_ref",
        ">=",
        2.0,
    ),
    (
        "linear_logprobs fwd+bwd: speedup vs the chunked-torch twin",
        ("linear_logprobs", "fwd_bwd"),
        "fastrlhf",
        "speedup_vs_ref",
        ">=",
        2.0,
    ),
)


class Interrupted(Exception):
    """SIGTERM arrived: stop measuring, write what there is."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not interrupt the writing
    raise Interrupted()


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    hidden: torch.Tensor  # (M, H) leaf, requires_grad
    weight: torch.Tensor  # (V, H) leaf, requires_grad
    targets: torch.Tensor  # (M,) int64
    grad_out: torch.Tensor  # (M,) fp32 upstream gradient of the per-token output
    ref_hidden: torch.Tensor | None = None  # (M, H) the KL's reference head, frozen
    ref_weight: torch.Tensor | None = None  # (V, H)

    @property
    def nbytes(self) -> int:
        ts = (self.hidden, self.weight, self.targets, self.grad_out, self.ref_hidden, self.ref_weight)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def make_inputs(
    M: int, H: int, V: int, dtype: torch.dtype, device: torch.device, with_ref: bool, seed: int = 0
) -> Inputs:
    """Random inputs generated on the device (a CPU generator would take seconds for a 0.6G-element W)."""
    g = torch.Generator(device=device).manual_seed(seed)
    scale = LOGIT_STD / math.sqrt(H)
    hidden = torch.randn(M, H, device=device, dtype=dtype, generator=g)
    weight = torch.randn(V, H, device=device, dtype=dtype, generator=g).mul_(scale)
    inp = Inputs(
        hidden.requires_grad_(),
        weight.requires_grad_(),
        torch.randint(0, V, (M,), device=device, generator=g),
        torch.randn(M, device=device, dtype=torch.float32, generator=g),
    )
    if with_ref:  # a nearby reference head, as PPO's frozen reference is near the policy
        with torch.no_grad():
            inp.ref_hidden = hidden + 0.1 * torch.randn(M, H, device=device, dtype=dtype, generator=g)
            inp.ref_weight = torch.randn(V, H, device=device, dtype=dtype, generator=g).mul_(0.1 * scale).add_(weight)
    return inp


# -------------------------------------------------------------------------------------------- providers
def eager_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The idiom: materialised logits in the input dtype, an fp32 copy, log_softmax, gather. (M,) fp32."""
    return torch.log_softmax((hidden @ weight.T).float() / temperature, -1).gather(-1, targets[:, None]).squeeze(-1)


def make_call(op: str, mode: str, provider: str, inp: Inputs, temperature: float) -> Callable[[], tuple]:
    """A no-argument call running one provider once; returns the outputs the check compares: the per-token
    output(s) for fwd modes, (grad_hidden, grad_W) for fwd_bwd."""
    h, w, t = inp.hidden, inp.weight, inp.targets
    if op == "matmul":

        def fwd():
            return (h @ w.T,)
    elif op == "linear_logprobs" and provider == "eager":

        def fwd():
            return (eager_logprobs(h, w, t, temperature),)
    elif op == "linear_logprobs":
        fn = linear_logprobs if provider == "fastrlhf" else linear_logprobs_ref
        entropy = mode == "fwd_entropy"

        def fwd():
            out = fn(h, w, t, temperature=temperature, return_entropy=entropy)
            return out if entropy else (out,)
    else:
        fn = linear_full_kl if provider == "fastrlhf" else linear_full_kl_ref

        def fwd():
            return (fn(h, w, inp.ref_hidden, inp.ref_weight, temperature=temperature),)

    if mode != "fwd_bwd":

        def call():
            with torch.no_grad():
                return fwd()
    else:

        def call():
            return torch.autograd.grad(fwd()[0], (h, w), inp.grad_out)

    return call


# ------------------------------------------------------------------------------------------- measuring
def first_call(call: Callable[[], tuple], device: torch.device) -> tuple[tuple, int | None, float]:
    """(outputs, peak bytes allocated over what was alive before (CUDA; None on CPU), seconds incl. compile)."""
    box: dict = {}
    t0 = time.perf_counter()
    peak = measure.peak_extra_bytes(lambda: box.setdefault("out", call()), device)
    if "out" not in box:
        box["out"] = call()
    measure.sync(device)
    return box["out"], peak, time.perf_counter() - t0


def wall_ms(call: Callable[[], tuple], device: torch.device) -> float:
    measure.sync(device)
    t0 = time.perf_counter()
    call()
    measure.sync(device)
    return (time.perf_counter() - t0) * 1e3


def time_call(call: Callable[[], tuple], device: torch.device, remaining_s: float) -> tuple[float, str]:
    """(median ms, method). CUDA: one warm wall-clock call decides: <= SLOW_MS and affordable -> do_bench;
    else the median of up to SLOW_REPEATS event-timed calls that fit in `remaining_s` (at least that warm call).
    CPU: one wall-clock call after the first (interpreter timings mean nothing; the smoke run stays short)."""
    if not measure.on_cuda(device):
        return wall_ms(call, device), "wall_clock_cpu (one call)"
    est = wall_ms(call, device)
    if est <= SLOW_MS and (8 * est + 150) / 1e3 < remaining_s:
        return measure.median_ms(call, device)
    k = int(min(SLOW_REPEATS, remaining_s * 1e3 // max(est, 1e-3)))
    if k < 1:
        return est, "one warm wall-clock call (time budget)"
    times = []
    for _ in range(k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times), f"cuda events, median of {k} (one call > {SLOW_MS:.0f} ms)"


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check(mode: str, outs: tuple, ref: tuple | None) -> dict:
    """Agreement with torch_ref's outputs of the same call."""
    if ref is None:
        return {"check": "no torch_ref output (skipped or failed)"}
    if mode == "fwd_bwd":
        return {
            "check": "vs torch_ref",
            "max_abs_err_grad_hidden": max_abs_diff(outs[0], ref[0]),
            "max_abs_err_grad_weight": max_abs_diff(outs[1], ref[1]),
            "ref_max_abs_grad_hidden": ref[0].float().abs().max().item(),
            "ref_max_abs_grad_weight": ref[1].float().abs().max().item(),
        }
    row = {"check": "vs torch_ref", "max_abs_err": max_abs_diff(outs[0], ref[0])}
    if len(outs) > 1:
        row["max_abs_err_entropy"] = max_abs_diff(outs[1], ref[1])
    row["finite"] = all(bool(torch.isfinite(o).all()) for o in outs)
    return row


def grad_buffer_bytes(provider: str, M: int, H: int, V: int, itemsize: int) -> int:
    """The fwd_bwd gradients' own bytes: grad_hidden + grad_W in the input dtype, and for fastrlhf its
    documented fp32 accumulation buffers (the same tensors when the input is fp32)."""
    extra = 4 if provider == "fastrlhf" and itemsize != 4 else 0
    return (M * H + V * H) * (itemsize + extra)


def est_call_ms(op: str, mode: str, provider: str, matmul_ms: float) -> float:
    return EST_MATMULS.get((provider, mode), 10.0) * matmul_ms * (KL_FACTOR if op == "linear_full_kl" else 1.0)


def _free(device: torch.device) -> None:
    """Return the cached blocks, so each provider's peak is measured from the same state (CUDA only: on CPU
    gc.collect costs ~0.2 s a call under the interpreter and frees nothing that matters)."""
    if measure.on_cuda(device):
        gc.collect()
        torch.cuda.empty_cache()


def base_row(op: str, mode: str, provider: str) -> dict:
    return {
        "op": op,
        "mode": mode,
        "provider": provider,
        "status": "pending",
        "reason": "",
        "median_ms": None,
        "timing": None,
        "first_call_s": None,
        "flops_useful": None,
        "tflops": None,
        "pct_matmul": None,
        "tflops_executed": None,
        "peak_extra_mb": None,
        "grad_buffers_mb": None,
        "peak_beyond_grads_mb": None,
        "peak_vs_logits": None,
        "speedup_vs_ref": None,
        "speedup_vs_eager": None,
    }


class Runner:
    """Runs the cases in order within a deadline; fills one row per (case, provider)."""

    def __init__(self, inp: Inputs, shape: tuple, device: torch.device, deadline: float, temperature: float):
        self.inp, self.device, self.deadline, self.temperature = inp, device, deadline, temperature
        self.M, self.H, self.V, self.itemsize = *shape, inp.hidden.element_size()
        self.matmul_ms: float | None = None
        self.compiled: set = set()

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def planned_s(self, op: str, mode: str, provider: str) -> float:
        """Estimated seconds for one provider: first call (+ compile) + warm call + timing."""
        if not measure.on_cuda(self.device) or self.matmul_ms is None:
            return 0.0
        est = est_call_ms(op, mode, provider, self.matmul_ms)
        calls = 2 + (SLOW_REPEATS if est > SLOW_MS else max(8, 6 + 125 / max(est, 1e-3)))
        key = (op, mode)
        compile_s = COMPILE_S if provider == "fastrlhf" and key not in self.compiled else 0.0
        return compile_s + calls * est / 1e3

    def run_case(self, op: str, mode: str, rows: list[dict]) -> None:
        """rows: this case's rows, one per provider. torch_ref's first call runs first (its outputs are the
        check for the others), then every other provider is measured, then torch_ref is timed."""
        by = {r["provider"]: r for r in rows}
        ref = by.get("torch_ref")
        ref_outs = self._guarded(ref, lambda: self._first(op, mode, ref)) if ref is not None else None
        if ref_outs is not None:
            ref.update(check(mode, ref_outs, ref_outs), check="reference")
        for provider, row in by.items():
            if provider != "torch_ref":
                self._guarded(row, lambda: self._measure(op, mode, row, ref_outs))
        ref_outs = None
        _free(self.device)
        if ref is not None and ref["status"] == "pending":
            call = make_call(op, mode, "torch_ref", self.inp, self.temperature)
            self._guarded(ref, lambda: self._time(op, row=ref, call=call))

    def _guarded(self, row: dict, fn: Callable[[], tuple | None]) -> tuple | None:
        """fn(), recording an OOM or an error in the row instead of ending the run."""
        try:
            return fn()
        except torch.OutOfMemoryError as e:
            row.update(status="oom", reason=str(e).splitlines()[0][:200])
        except Interrupted:
            raise
        except Exception as e:  # one broken provider must not end the run
            row.update(status="error", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        finally:
            _free(self.device)  # after the except block: its traceback no longer holds the failed call's tensors
        return None

    def _first(self, op: str, mode: str, row: dict) -> tuple | None:
        """One provider's first call (compile, outputs, peak memory); None when the budget says skip."""
        provider = row["provider"]
        plan = self.planned_s(op, mode, provider)
        if self.remaining_s() <= 0 or plan > self.remaining_s():
            left = max(self.remaining_s(), 0.0)
            row.update(status="skipped", reason=f"time budget: ~{plan:.0f} s planned, {left:.0f} s left")
            return None
        outs, peak, first_s = first_call(make_call(op, mode, provider, self.inp, self.temperature), self.device)
        if provider == "fastrlhf":
            self.compiled.add((op, mode))
        row.update(first_call_s=first_s)
        if peak is not None:
            row["peak_extra_mb"] = peak / measure.MB
            beyond = peak
            if mode == "fwd_bwd":
                grads = grad_buffer_bytes(provider, self.M, self.H, self.V, self.itemsize)
                beyond = peak - grads
                row.update(grad_buffers_mb=grads / measure.MB, peak_beyond_grads_mb=beyond / measure.MB)
            row["peak_vs_logits"] = beyond / (self.M * self.V * 2)
        return outs

    def _measure(self, op: str, mode: str, row: dict, ref_outs: tuple | None) -> None:
        outs = self._first(op, mode, row)
        if outs is None:
            return
        if op != "matmul":
            row.update(check(mode, outs, ref_outs))
        del outs
        self._time(op, row, make_call(op, mode, row["provider"], self.inp, self.temperature))

    def _time(self, op: str, row: dict, call: Callable[[], tuple]) -> None:
        if self.remaining_s() <= 0:
            row.update(status="skipped", reason="time budget exhausted before the timing (first call done)")
            return
        ms, method = time_call(call, self.device, self.remaining_s())
        row.update(median_ms=ms, timing=method, status="ok")
        if op == "matmul":
            self.matmul_ms = ms


def derive(rows: list[dict], M: int, H: int, V: int, cuda: bool) -> None:
    """TFLOP/s, % of the matmul row, speedups vs torch_ref and eager (CUDA only: on CPU they would mean nothing)."""
    mvh = M * V * H
    mm = next((r for r in rows if r["op"] == "matmul" and r["status"] == "ok"), None)
    for r in rows:
        key = (r["op"], r["mode"])
        r["flops_useful"] = USEFUL_MVH[key] * mvh
        if not cuda or r["status"] != "ok":
            continue
        r["tflops"] = r["flops_useful"] / r["median_ms"] / 1e9
        if r["provider"] == "fastrlhf":
            r["tflops_executed"] = EXECUTED_MVH[key] * mvh / r["median_ms"] / 1e9
        if mm is not None:
            r["pct_matmul"] = 100.0 * r["tflops"] / mm["tflops"] if mm is not r else 100.0
        for other, field in (("torch_ref", "speedup_vs_ref"), ("eager", "speedup_vs_eager")):
            o = next((x for x in rows if (x["op"], x["mode"], x["provider"]) == (*key, other)), None)
            if o is not None and o["status"] == "ok" and o is not r:
                r[field] = o["median_ms"] / r["median_ms"]


def evaluate_targets(rows: list[dict], cuda: bool, headline: bool) -> list[dict]:
    out = []
    for name, case, provider, field, cmp, threshold in TARGETS:
        r = next((x for x in rows if (x["op"], x["mode"], x["provider"]) == (*case, provider)), None)
        value = None if r is None else r.get(field)
        if not cuda:
            verdict = "n/a (CPU smoke run)"
        elif value is None:
            verdict = f"n/a ({'not run' if r is None else r['status'] + (': ' + r['reason'] if r['reason'] else '')})"
        else:
            met = value >= threshold if cmp == ">=" else value <= threshold
            verdict = ("met" if met else "missed") + ("" if headline else " (not the headline shape)")
        out.append({"target": name, "threshold": f"{cmp} {threshold:g}", "value": value, "verdict": verdict})
    return out


# ------------------------------------------------------------------------------------------------ output
def _f(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 10**digits else f"{x:.{digits}g}"
    return str(x)


def markdown(doc: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    mm = meta["matmul"]
    lines = [
        f"### Fused linear log-probs (bench_linear, {meta['grid']})",
        "",
        f"{meta['gpu_name'] or 'CPU'}; M x H x V = {meta['M']} x {meta['H']} x {meta['V']} {meta['dtype']}, "
        f"T={meta['temperature']}; kernel path: {meta['kernel_path']}; measured matmul (hidden @ W.T): "
        f"{_f(mm['median_ms'])} ms = {_f(mm['tflops'], 4)} TFLOP/s "
        f"(8192^3 bf16: {_f(meta['matmul_bf16_tflops_8192'], 4)}); "
        f"bf16 logits would be {_f(meta['logits_mb'], 4)} MB; torch {meta['torch']}, triton {meta['triton']}, "
        f"git {meta['git_commit']}.",
        "",
        "| op | mode | provider | ms | TFLOP/s | % matmul | peak extra MB | beyond grads MB | vs ref | vs eager "
        "| max abs err | timing / status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        err = r.get("max_abs_err")
        if r["mode"] == "fwd_bwd" and r.get("max_abs_err_grad_hidden") is not None:
            err_s = f"dh {_f(r['max_abs_err_grad_hidden'], 2)} / dW {_f(r['max_abs_err_grad_weight'], 2)}"
        else:
            err_s = _f(err, 2)
            if r.get("max_abs_err_entropy") is not None:
                err_s += f" / ent {_f(r['max_abs_err_entropy'], 2)}"
        status = r["timing"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['provider']} | {_f(r['median_ms'])} | {_f(r['tflops'])} "
            f"| {_f(r['pct_matmul'], 3)} | {_f(r['peak_extra_mb'], 4)} | {_f(r['peak_beyond_grads_mb'], 3)} "
            f"| {_f(r['speedup_vs_ref'])} | {_f(r['speedup_vs_eager'])} | {err_s} | {status} |"
        )
    lines += ["", "| target | threshold | value | verdict |", "|---|---|---:|---|"]
    for t in doc["targets"]:
        lines.append(f"| {t['target']} | {t['threshold']} | {_f(t['value'], 3)} | {t['verdict']} |")
    lines += ["", f"FLOPs: {FLOP_CONVENTION}. Wall {meta['wall_s']:.1f} s (budget {meta['budget_s']:.0f} s)."]
    return "\n".join(lines)


def kernel_path(device: torch.device) -> str:
    """Which code the `fastrlhf` provider runs on `device`."""
    if device.type == "cuda":
        return "triton (compiled)"
    if use_triton(torch.empty(0, device=device)):
        return "triton interpreter (TRITON_INTERPRET=1: correctness only, no speed meaning)"
    return "torch_ref (CPU without TRITON_INTERPRET=1: the kernels dispatch to their *_ref twins, as torch_ref)"


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/bench_linear.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="folder for " + " and ".join(FILES))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="linear_logprobs only (fwd, fwd_bwd): ~40 s on one H100")
    g.add_argument("--smoke", action="store_true", help="tiny fp32 shape, every case: a CPU wiring check")
    p.add_argument("--budget-s", type=float, default=None, help=f"seconds for the cells (default {BUDGET_S})")
    p.add_argument("--rows", type=int, default=None, help="M (default: the grid's)")
    p.add_argument("--hidden", type=int, default=None, help="H")
    p.add_argument("--vocab", type=int, default=None, help="V")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="hidden / W dtype")
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = measure.on_cuda(device)
    if not cuda and grid != "smoke":
        print("[bench_linear] no CUDA device: only --smoke runs here", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    M0, H0, V0, dt0 = SHAPES[grid]
    M, H, V, dtype_name = args.rows or M0, args.hidden or H0, args.vocab or V0, args.dtype or dt0
    headline = (M, H, V, dtype_name) == SHAPES["full"]
    budget = args.budget_s if args.budget_s is not None else BUDGET_S[grid]
    cases = [(op, mode, provs) for op, mode, provs, grids in CASES if grid in grids]
    meta = measure.environment(device)
    meta.update(
        command=" ".join(["benchmarks/bench_linear.py", *(sys.argv[1:] if argv is None else argv)]),
        grid=grid,
        M=M,
        H=H,
        V=V,
        dtype=dtype_name,
        temperature=args.temperature,
        budget_s=budget,
        headline=headline,
        kernel_path=kernel_path(device),
        flop_convention=FLOP_CONVENTION,
        logits_mb=M * V * 2 / measure.MB,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        matmul_bf16_tflops_8192=measure.matmul_tflops(device),
    )
    print(
        f"[bench_linear] {meta['gpu_name'] or 'CPU'}: {grid}, M x H x V = {M} x {H} x {V} {dtype_name}, "
        f"budget {budget:.0f} s; kernel path: {meta['kernel_path']}",
        flush=True,
    )
    rows = [base_row(op, mode, p) for op, mode, provs in cases for p in provs]
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with_ref = any(op == "linear_full_kl" for op, _, _ in cases)
        inp = make_inputs(M, H, V, DTYPES[dtype_name], device, with_ref=with_ref)
        meta["inputs_mb"] = inp.nbytes / measure.MB
        runner = Runner(inp, (M, H, V), device, t0 + budget, args.temperature)
        for op, mode, _ in cases:
            case_rows = [r for r in rows if (r["op"], r["mode"]) == (op, mode)]
            runner.run_case(op, mode, case_rows)
            for r in case_rows:
                print(
                    f"[bench_linear] {op} {mode} {r['provider']}: {r['status']} {_f(r['median_ms'])} ms "
                    f"{r['timing'] or r['reason']}",
                    flush=True,
                )
    except Interrupted:
        stop = "interrupted (SIGTERM) before this cell finished"
        print("[bench_linear] SIGTERM: stopping, writing what was measured", flush=True)
    except torch.OutOfMemoryError as e:  # the inputs themselves
        stop = "OOM allocating the inputs: " + str(e).splitlines()[0][:200]
        print(f"[bench_linear] {stop}", flush=True)
    else:
        stop = "not reached"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # writing takes milliseconds: let nothing cut it short
    for r in rows:
        if r["status"] == "pending":
            r.update(status="skipped", reason=r["reason"] or stop)
    derive(rows, M, H, V, cuda)
    mm = next((r for r in rows if r["op"] == "matmul"), {})
    meta["matmul"] = {
        "what": f"hidden @ W.T, {dtype_name}, torch.matmul",
        "median_ms": mm.get("median_ms"),
        "tflops": mm.get("tflops"),
        "timing": mm.get("timing"),
    }
    meta["wall_s"] = time.monotonic() - t0
    doc = {"meta": meta, "rows": rows, "targets": evaluate_targets(rows, cuda, headline)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linear.json").write_text(json.dumps(measure.json_safe(doc), indent=2, default=str))
    md = markdown(doc)
    (args.out / "linear.md").write_text(md + "\n")
    print(f"[bench_linear] wrote {', '.join(FILES)} to {args.out}", flush=True)
    print("\n" + md, flush=True)
    signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
