"""benchmarks/bench_linear.py works end to end on a CPU, so time on a GPU host goes to
measuring: the --smoke run (the kernel through Triton's interpreter, tests/conftest.py sets
TRITON_INTERPRET=1) writes every case and provider with finite numbers and agreeing outputs; and the
CUDA-only arithmetic (TFLOP/s, % of the matmul, speedups, peak memory vs the logits, target verdicts, the
time-budget skips, OOM rows) is rehearsed with a fake device whose timer and allocator are stubs.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "benchmarks" / "tools"))
import bench_linear as bl  # noqa: E402
import measure  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="smoke checks of the benchmark tooling run on CPU (interpreter)"
)
GPU_ONLY = (
    "tflops",
    "pct_matmul",
    "tflops_executed",
    "peak_extra_mb",
    "grad_buffers_mb",
    "peak_beyond_grads_mb",
    "peak_vs_logits",
    "speedup_vs_ref",
    "speedup_vs_eager",
)


def _key(r: dict) -> tuple:
    return r["op"], r["mode"], r["provider"]


def _expected(grid: str) -> set:
    return {(op, mode, p) for op, mode, provs, grids in bl.CASES if grid in grids for p in provs}


def test_smoke_run_writes_every_case(tmp_path, capsys):
    out = tmp_path / "linear"
    assert bl.main(["--smoke", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(bl.FILES)
    doc = json.loads((out / "linear.json").read_text())
    meta = doc["meta"]
    for key in (
        "gpu_name",
        "gpu_driver",
        "torch",
        "triton",
        "transformers",
        "git_commit",
        "date_utc",
        "kernel_path",
        "flop_convention",
        "matmul",
        "matmul_bf16_tflops_8192",
        "logits_mb",
        "inputs_mb",
        "wall_s",
    ):
        assert key in meta, key
    assert (meta["M"], meta["H"], meta["V"], meta["dtype"], meta["grid"]) == (16, 32, 300, "fp32", "smoke")
    assert "interpreter" in meta["kernel_path"] and meta["gpu_name"] is None
    assert meta["logits_mb"] == pytest.approx(16 * 300 * 2 / measure.MB)
    assert "6MVH" in meta["flop_convention"] and meta["matmul_bf16_tflops_8192"] is None
    rows = doc["rows"]
    assert [_key(r) for r in rows] == [(op, mode, p) for op, mode, provs, _ in bl.CASES for p in provs]
    assert {_key(r) for r in rows} == _expected("smoke")
    for r in rows:
        assert r["status"] == "ok", r
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and r["first_call_s"] > 0
        assert r["timing"].startswith("wall_clock_cpu")
        assert all(r[c] is None for c in GPU_ONLY), f"a GPU-only number on CPU: {r}"
        assert r["flops_useful"] == bl.USEFUL_MVH[(r["op"], r["mode"])] * 16 * 300 * 32
        if r["op"] == "matmul":
            continue
        assert r["check"] in ("vs torch_ref", "reference"), r
        errs = [v for k, v in r.items() if k.startswith("max_abs_err")]
        assert errs and all(math.isfinite(e) for e in errs), r
        # fp32: the kernel (interpreter) and the eager idiom agree with the twin to fp32 rounding
        assert max(errs) < 1e-4, r
        if r["mode"] == "fwd_bwd":
            assert r["ref_max_abs_grad_hidden"] > 0 and r["ref_max_abs_grad_weight"] > 0
        else:
            assert r["finite"]
    assert [t["verdict"] for t in doc["targets"]] == ["n/a (CPU smoke run)"] * len(bl.TARGETS)
    md = (out / "linear.md").read_text()
    assert "| linear_logprobs | fwd_bwd | fastrlhf |" in md and "6MVH" in md and "n/a (CPU smoke run)" in md
    assert capsys.readouterr().out.rstrip().endswith(md.rstrip().splitlines()[-1])


@pytest.fixture
def fake_cuda(monkeypatch):
    """A 'CUDA' device with stub timer and allocator: matmul 10 ms, fastrlhf 20 ms, eager 40 ms, torch_ref 100 ms
    per call; every call's peak extra memory 1000 bytes. The providers run on CPU, the kernels as their twins."""
    ms = {"torch": 10.0, "fastrlhf": 20.0, "eager": 40.0, "torch_ref": 100.0}
    make_call = bl.make_call

    def tagged(op, mode, provider, inp, temperature):
        call = make_call(op, mode, provider, inp, temperature)
        call.provider = provider
        return call

    env = {**measure.environment(bl.torch.device("cpu")), "device": "cuda:fake", "gpu_name": "FAKE"}
    monkeypatch.setattr(measure, "environment", lambda d: dict(env))
    monkeypatch.setattr(measure, "on_cuda", lambda d: True)
    monkeypatch.setattr(measure, "sync", lambda d: None)
    monkeypatch.setattr(measure, "matmul_tflops", lambda d, n=8192: 800.0)
    monkeypatch.setattr(measure, "peak_extra_bytes", lambda fn, d: (fn(), 1000)[1])
    monkeypatch.setattr(bl, "make_call", tagged)
    # the kernels' wiring is the smoke run's business: here their twins stand in (no interpreter time)
    monkeypatch.setattr(bl, "linear_logprobs", bl.linear_logprobs_ref)
    monkeypatch.setattr(bl, "linear_full_kl", bl.linear_full_kl_ref)
    monkeypatch.setattr(bl, "_free", lambda d: None)  # gc.collect: ~0.2 s a call here
    monkeypatch.setattr(bl, "time_call", lambda call, d, rem: (call(), (ms[call.provider], "do_bench"))[1])
    return ms


def test_gpu_arithmetic_with_a_fake_device(tmp_path, fake_cuda):
    M, H, V = 16, 32, 300
    out = tmp_path / "fake"
    argv = ["--quick", "--rows", str(M), "--hidden", str(H), "--vocab", str(V), "--dtype", "fp32", "--out", str(out)]
    assert bl.main(argv) == 0
    doc = json.loads((out / "linear.json").read_text())
    rows = {_key(r): r for r in doc["rows"]}
    assert set(rows) == _expected("quick")
    mvh = M * V * H
    mm = rows[("matmul", "fwd", "torch")]
    assert mm["tflops"] == pytest.approx(2 * mvh / 10.0 / 1e9) and mm["pct_matmul"] == 100.0
    assert doc["meta"]["matmul"]["tflops"] == mm["tflops"] and doc["meta"]["matmul_bf16_tflops_8192"] == 800.0
    logits = M * V * 2
    for (op, mode, provider), r in rows.items():
        assert r["status"] == "ok" and r["median_ms"] == fake_cuda[provider], r
        assert r["peak_extra_mb"] == pytest.approx(1000 / measure.MB)
        if op == "matmul":
            continue
        useful = {"fwd": 2, "fwd_bwd": 6}[mode] * mvh
        assert r["tflops"] == pytest.approx(useful / fake_cuda[provider] / 1e9)
        assert r["pct_matmul"] == pytest.approx(100 * r["tflops"] / mm["tflops"])
        assert r["speedup_vs_ref"] == (None if provider == "torch_ref" else pytest.approx(100.0 / fake_cuda[provider]))
        assert r["speedup_vs_eager"] == (None if provider == "eager" else pytest.approx(40.0 / fake_cuda[provider]))
        if provider == "fastrlhf":
            executed = {"fwd": 2, "fwd_bwd": 8}[mode] * mvh
            assert r["tflops_executed"] == pytest.approx(executed / 20.0 / 1e9)
        else:
            assert r["tflops_executed"] is None
        if mode == "fwd_bwd":  # fp32 inputs: the kernel's fp32 accumulators are the returned gradients
            grads = (M * H + V * H) * 4
            assert r["grad_buffers_mb"] == pytest.approx(grads / measure.MB)
            assert r["peak_vs_logits"] == pytest.approx((1000 - grads) / logits)
        else:
            assert r["peak_vs_logits"] == pytest.approx(1000 / logits)
        assert r["max_abs_err" if mode == "fwd" else "max_abs_err_grad_weight"] < 1e-4
    # fwd: 2MVH at 20 ms vs the matmul's at 10 ms = 50% (< 60: missed); fwd_bwd 6MVH / 20 ms = 150% (met);
    # fwd peak 1000 B vs 9600 B of logits (> 5%: missed); fwd_bwd beyond the gradients < 0 (met); 5x vs ref (met)
    verdicts = [t["verdict"] for t in doc["targets"]]
    assert verdicts == [v + " (not the headline shape)" for v in ("missed", "met", "missed", "met", "met", "met")]
    assert doc["targets"][0]["value"] == pytest.approx(50.0)


def test_time_budget_and_oom_rows(tmp_path, fake_cuda, monkeypatch):
    """A provider whose planned time exceeds what is left is skipped with the reason; an OOM is a row, and
    the other providers still run; a target whose cell did not run is n/a with the cell's status."""
    monkeypatch.setattr(bl, "COMPILE_S", 1e6)  # every fastrlhf cell 'costs' more than the budget

    def oom(*a, **k):
        raise bl.torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bl, "eager_logprobs", oom)
    out = tmp_path / "budget"
    argv = ["--quick", "--rows", "16", "--hidden", "32", "--vocab", "300", "--dtype", "fp32", "--out", str(out)]
    assert bl.main(argv) == 0
    doc = json.loads((out / "linear.json").read_text())
    rows = {_key(r): r for r in doc["rows"]}
    for mode in ("fwd", "fwd_bwd"):
        k = rows[("linear_logprobs", mode, "fastrlhf")]
        assert k["status"] == "skipped" and k["reason"].startswith("time budget") and k["median_ms"] is None
        e = rows[("linear_logprobs", mode, "eager")]
        assert e["status"] == "oom" and "simulated" in e["reason"]
        assert rows[("linear_logprobs", mode, "torch_ref")]["status"] == "ok"
    assert all(t["verdict"].startswith("n/a (skipped: time budget") for t in doc["targets"])
    md = (out / "linear.md").read_text()
    assert "oom: CUDA out of memory (simulated)" in md and "skipped: time budget" in md


def test_tune_linear_backward_launch_matches_the_gradient():
    """benchmarks/tools/tune_linear.py --backward (GPU only) repeats `_backward`'s launch of the grad_z kernel with
    its own tiles: on the interpreter, with small tiles, it must give d logp / dz = (onehot - softmax) * g of
    eager fp64 (two row blocks, two vocabulary tiles, a partial chunk of the vocabulary, a partial H slice)."""
    import torch
    import tune_linear

    g = torch.Generator().manual_seed(0)
    N, H, V, chunk = 40, 40, 300, 200
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) / H**0.5
    targets, grad_logp = torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g)
    stats = tune_linear.row_stats(hidden, weight, targets)
    gz = tune_linear.grad_z(hidden, weight, targets, stats, grad_logp, chunk, (32, 128, 16, 4, 1))
    p = torch.softmax(hidden.double() @ weight.double().T, -1)
    expected = (torch.nn.functional.one_hot(targets, V).double() - p) * grad_logp.double()[:, None]
    torch.testing.assert_close(gz.double(), expected[:, :chunk], rtol=0, atol=1e-6)
