"""The benchmark tooling works end to end on a CPU, so time on a GPU host goes to
measuring, not debugging: the sweep in --smoke mode (kernels through Triton's interpreter), the
pytest-benchmark suite with --benchmark-disable, the shell scripts' syntax, and scripts/gpu/gpu_check.sh in
its dry mode. No GPU number is produced or checked here: on CPU every GPU-only column must be empty.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "benchmarks" / "tools"))
import cases  # noqa: E402
import sweep  # noqa: E402

GPU_ONLY = ("gb_s", "pct_copy_bw", "peak_mb", "peak_ratio", "speedup_vs_eager")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="smoke checks of the benchmark tooling run on CPU (interpreter)"
)


def _csv_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory) -> tuple[Path, str]:
    """Run `sweep.py --smoke` once, in process: (output folder, what it printed)."""
    out = tmp_path_factory.mktemp("sweep")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert sweep.main(["--smoke", "--out", str(out)]) == 0
    return out, buf.getvalue()


def test_sweep_writes_one_row_per_cell(smoke_sweep):
    out, _ = smoke_sweep
    assert sorted(p.name for p in out.iterdir()) == sorted(sweep.FILES)
    rows = _csv_rows(out / "sweep.csv")
    assert tuple(rows[0].keys()) == sweep.COLUMNS
    expected = {
        (c.case.op, c.case.mode, c.provider, c.case.dtype, c.case.shape)
        for c in sweep.build_grid("smoke", cases.TEMPERATURE)
    }
    got = [(r["op"], r["mode"], r["provider"], r["dtype"], r["shape"]) for r in rows]
    assert len(got) == len(set(got)) == len(expected) and set(got) == expected
    # every op, both modes and every provider appear; smoke dtypes are bf16 and fp32
    assert {r["op"] for r in rows} == set(cases.OPS)
    assert {r["provider"] for r in rows} == set(cases.PROVIDERS)
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"}
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"], f"a skip without a reason: {r}"
        else:
            assert float(r["median_ms"]) > 0 and r["timing"] == "wall_clock_cpu"
        assert all(r[c] == "" for c in GPU_ONLY), f"a GPU-only number on CPU: {r}"


def test_sweep_skips_are_the_expected_ones(smoke_sweep):
    rows = _csv_rows(smoke_sweep[0] / "sweep.csv")
    by = {(r["op"], r["mode"], r["dtype"], r["provider"]): r for r in rows}
    for r in rows:
        if r["provider"] == "compile":
            assert r["status"] == "skipped" and "CUDA only" in r["reason"]
        if r["provider"] == "liger":
            assert r["status"] == "skipped" and ("CUDA only" in r["reason"] or "no equivalent" in r["reason"])
        if r["provider"] in ("fastrlhf", "torch_ref", "eager"):
            assert r["status"] == "ok", r
    assert by[("token_logprobs", "fwd", "bf16", "selective")]["status"] == "ok"
    assert "no counterpart" in by[("full_kl", "fwd", "bf16", "selective")]["reason"]


def test_sweep_checks_providers_against_the_reference(smoke_sweep):
    """Each measured provider's forward is compared with the *_ref twin on the same inputs: the kernel
    agrees to fp32 rounding; the bf16 eager idiom is off by bf16 rounding (and is still recorded)."""
    rows = _csv_rows(smoke_sweep[0] / "sweep.csv")
    for r in rows:
        if r["status"] != "ok":
            continue
        err = float(r["max_abs_err"])
        assert math.isfinite(err), r
        if r["provider"] in ("fastrlhf", "torch_ref"):
            assert err < 1e-4, r
        else:
            assert err < 0.2, r  # the eager idioms in bf16: rounding, not a wrong formula


def test_min_bytes_formulas():
    """The roofline numerators: each input read once, each output written once, per pass."""
    N, V = 8, 257
    c = cases.Case("token_logprobs", "fwd", "bf16", N, V, 4)
    assert cases.min_bytes(c) == N * V * 2 + N * (8 + 4)
    assert cases.min_bytes(cases.Case("token_logprobs", "fwd_bwd", "bf16", N, V, 4)) == 3 * N * V * 2 + 2 * N * 12
    assert cases.min_bytes(cases.Case("full_kl", "fwd_bwd", "fp32", N, V, 4)) == 5 * N * V * 4 + 2 * N * 4
    assert cases.essential_bytes(cases.Case("token_logprobs", "fwd_bwd", "bf16", N, V, 4)) == 2 * N * V * 2 + N * 8
    # the headline: 8192 x 151936 bf16 logits are 2.49 GB; one-read forward 0.83 ms at 3 TB/s
    head = cases.Case("token_logprobs", "fwd", "bf16", 8192, 151936, 1024)
    assert abs(cases.min_bytes(head) / 1e9 - 2.489) < 0.001
    assert abs(cases.est_call_ms(head, "fastrlhf", 3000.0) - 1.2 * 0.830) < 0.01


def test_sweep_json_has_provenance_and_targets(smoke_sweep):
    doc = json.loads((smoke_sweep[0] / "sweep.json").read_text())
    meta = doc["meta"]
    for key in (
        "gpu_name",
        "gpu_driver",
        "torch",
        "triton",
        "transformers",
        "git_commit",
        "date_utc",
        "copy_bw_gbs",
        "matmul_bf16_tflops",
    ):
        assert key in meta
    assert meta["copy_bw_gbs"] is None and meta["matmul_bf16_tflops"] is None and meta["gpu_name"] is None
    assert meta["git_commit"] and meta["torch"] and meta["grid"] == "smoke"
    assert len(doc["rows"]) == len(_csv_rows(smoke_sweep[0] / "sweep.csv"))
    assert [t["verdict"] for t in doc["targets"]] == ["n/a (CPU smoke run)"] * len(sweep.TARGETS)


def test_sweep_plots_and_markdown(smoke_sweep):
    out, printed = smoke_sweep
    for name in ("bandwidth_vs_vocab.png", "peak_memory_vs_rows.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    md = (out / "summary.md").read_text()
    assert "### Targets" in md and "### All cells" in md and "not applicable" in md
    # the short markdown is printed LAST (a GPU host may return only the end of the output)
    tail = printed[printed.rindex("[sweep] wrote") :]
    assert "### Headline" in tail and "### Targets" in tail and "### All cells" not in tail
    assert printed.rstrip().splitlines()[-1].startswith("cells:")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch._dynamo's import, on a fake CUDA device
def test_gpu_branches_with_a_fake_device(tmp_path, monkeypatch, capsys):
    """The CUDA-only arithmetic, rehearsed on CPU with fakes (no number here is a measurement): with a
    'device' whose timer, copy bandwidth and allocator are stubs, every derived column must follow from
    its definition: GB/s = min bytes / median, % of copy bandwidth, speedup vs eager, peak ratio; the
    targets get met/missed verdicts, and the plots draw bandwidth axes."""
    import measure

    copy_bw, extra = 3000.0, 4096
    env = {**measure.environment(cases.torch.device("cpu")), "device": "cuda:fake", "gpu_name": "FAKE"}
    monkeypatch.setattr(measure, "environment", lambda d: env)
    monkeypatch.setattr(measure, "on_cuda", lambda d: True)
    monkeypatch.setattr(measure, "sync", lambda d: None)
    monkeypatch.setattr(measure, "median_ms", lambda fn, d: (fn(), (0.5, "do_bench"))[1])
    monkeypatch.setattr(measure, "peak_extra_bytes", lambda fn, d: (fn(), extra)[1])
    monkeypatch.setattr(measure, "ceilings", lambda d: {"copy_bw_gbs": copy_bw, "matmul_bf16_tflops": 800.0})
    # torch.compile and Liger would really run on a CUDA device: leave them out here
    providers = ["fastrlhf", "torch_ref", "eager", "selective"]
    ops = ["token_logprobs", "pairwise_loss"]  # the arithmetic is op-agnostic: keep it quick
    assert sweep.main(["--smoke", "--out", str(tmp_path), "--ops", *ops, "--providers", *providers]) == 0
    assert "FAKE" in capsys.readouterr().out
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["op"] for r in ok} == set(ops) and len(ok) == 2 * 2 * 4 + 2 * 3  # (dtypes x) modes x providers
    eager = {(r["op"], r["mode"], r["dtype"], r["shape"]): r["median_ms"] for r in ok if r["provider"] == "eager"}
    for r in ok:
        case = cases.Case(r["op"], r["mode"], r["dtype"], r["rows"], r["vocab"], r["seq"])
        assert r["timing"] == "do_bench" and r["median_ms"] == 0.5
        assert r["gb_s"] == pytest.approx(cases.min_bytes(case) / 0.5 / 1e6)
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gb_s"] / copy_bw)
        assert r["speedup_vs_eager"] == pytest.approx(eager[(r["op"], r["mode"], r["dtype"], r["shape"])] / 0.5)
        nbytes = cases.make_inputs(case, cases.torch.device("cpu"), 0).nbytes
        assert r["input_sets"] == measure.n_input_sets(nbytes) == 3  # tiny inputs: rotate among three sets
        assert r["peak_ratio"] == pytest.approx((nbytes + extra) / cases.essential_bytes(case))
    targets = json.loads((tmp_path / "sweep.json").read_text())["targets"]
    assert len(targets) == len(sweep.TARGETS)
    for t in targets:  # full_kl was left out of this run
        assert t["verdict"] in (("n/a (cell not in grid)",) if "full_kl" in t["target"] else ("met", "missed"))
    for name in ("bandwidth_vs_vocab.png", "peak_memory_vs_rows.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


def test_pytest_benchmark_suite_runs_disabled():
    """`pytest benchmarks/ --benchmark-disable`: every measured cell runs once, every other is a skip."""
    n_ok = sum(
        cases.static_skip(c.case, c.provider, cases.torch.device("cpu"), None) is None and c.plan_skip is None
        for c in sweep.build_grid("smoke", cases.TEMPERATURE)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(rf"\b{n_ok} passed", proc.stdout), proc.stdout[-2000:]


def test_shell_scripts_parse():
    for name in ("gpu_check", "fetch_wheels", "gpu_prepare", "gpu_session", "gpu_pipeline"):
        script = f"scripts/gpu/{name}.sh"
        proc = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_gpu_check_dry_run(tmp_path):
    """scripts/gpu/gpu_check.sh with FASTRLHF_GPU_CHECK_DRY=1: every stage wired (tests collected, sweep in
    --smoke mode, the beyond-the-logits benchmarks in their CPU smoke modes, merged into beyond.json and summary.md),
    at most 8 flat files with plain names (what an offline GPU host returns), exit 0. The editable install is hidden
    from the child Python, so the symlink-shim fallback is what makes fastrlhf importable."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "sys.path_hooks[:] = [h for h in sys.path_hooks if '__editable__' not in getattr(h, '__module__', '')]\n"
        "sys.path_importer_cache.clear()\n"
    )
    out = tmp_path / "gc"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "FASTRLHF_GPU_CHECK_DRY": "1",
        "FASTRLHF_SHIM": str(tmp_path / "shim"),
        "PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    proc = subprocess.run(
        ["bash", "scripts/gpu/gpu_check.sh", str(out), "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert (
        len(files) <= 8
        and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
        and all((out / f).is_file() for f in files)
    )
    assert {"gpu_check.log", "junit.xml", "beyond.json", *sweep.FILES} == set(files)
    log = (out / "gpu_check.log").read_text()
    has_hm = (REPO / "benchmarks" / "bench_head_memory.py").is_file()
    for stage in (
        "import",
        "env",
        "tests",
        "sweep",
        "linear",
        "gae",
        "generate",
        "merge",
        *(("head_memory",) if has_hm else ()),
    ):
        assert f"stage {stage}: rc=0" in log, log[-3000:]
    assert re.search(r"fastrlhf\.kernels from .*/kernels/__init__\.py", log)
    if "a shim of symlinks" in log:  # the editable finder was hidden: the shim must have served the import
        assert f"fastrlhf.kernels from {tmp_path / 'shim'}" in log
    assert re.search(r"----- pytest output .*\d+ tests collected.*----- end of pytest output", log, re.S)
    assert "## gpu_check stages" in proc.stdout and "### Targets" in proc.stdout
    # the beyond-the-logits benchmarks: each script's JSON, unchanged, in beyond.json; their tables appended to summary.md
    beyond = json.loads((out / "beyond.json").read_text())
    assert beyond["linear"]["meta"]["grid"] == "smoke" and len(beyond["linear"]["rows"]) > 0
    assert beyond["gae"]["rows"] and beyond["gae"]["rows"][0]["loop_ms"] > 0
    if has_hm:
        assert beyond["head_memory"]["agreement_passed"] and not beyond["missing"]
    else:
        assert beyond["head_memory"] is None and "does not exist" in beyond["missing"]["head_memory"]
    assert set(beyond["generate"]["smoke"]["summary"]) == {"hf-dynamic", "hf-static", "ours"}
    summary = (out / "summary.md").read_text()
    assert "### Sampling (smoke, bench_generate)" in summary
    assert summary.index("### All cells") < summary.index("## Beyond the logits")
    assert "### Fused linear log-probs" in summary and "### GAE scan" in summary
    assert "## Beyond the logits" in proc.stdout


def test_bench_ppo_step_smoke(tmp_path, capsys):
    """benchmarks/bench_ppo_step.py on a tiny random Llama, in process: both modes (the kernel mode
    through Triton's interpreter) write every phase's timing, throughput and peak memory; the curves of
    every step agree (CPU: all steps checked); the markdown is printed and the exit status is 0."""
    import bench_ppo_step

    from fastrlhf.trainer.models import tiny_model_path

    policy = tiny_model_path(tmp_path / "models")
    out = tmp_path / "out"
    argv = [
        "--model",
        policy,
        "--steps",
        "2",
        "--batch-prompts",
        "4",
        "--minibatch-size",
        "2",
        "--ppo-epochs",
        "1",
        "--max-new-tokens",
        "4",
        "--freeze-layers",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    assert bench_ppo_step.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(bench_ppo_step.FILES)
    doc = json.loads((out / "ppo_step.json").read_text())
    meta = doc["meta"]
    for key in ("gpu_name", "gpu_driver", "torch", "triton", "transformers", "git_commit", "date_utc"):
        assert key in meta
    assert meta["timed_steps"] == [2] and meta["warmup_step_skipped"] and "interpreter" in meta["kernel_path"]
    for mode in ("kernels", "eager"):
        assert set(doc["phases"][mode]) == {*bench_ppo_step.PHASES, "total"}
        for ph in bench_ppo_step.PHASES:
            row = doc["phases"][mode][ph]
            assert row["s_per_step"] > 0 and row["tokens_per_s"] > 0 and row["peak_mem_mb"] > 0, (mode, ph)
        assert [r["step"] for r in doc["per_step"][mode]] == [1, 2]
        assert len((out / f"metrics_{mode}.jsonl").read_text().splitlines()) == 2
    assert set(doc["speed_ratio"]) == {*bench_ppo_step.PHASES, "total"}
    curves = doc["curves"]
    assert curves["passed"] and not curves["failures"] and curves["checked_steps"] == [1, 2]
    for name in bench_ppo_step.CHECKED:
        m = curves["metrics"][name]
        assert [p["step"] for p in m["per_step"]] == [1, 2] and all(p["checked"] for p in m["per_step"])
        assert m["max_abs_diff"] <= curves["atol"] + curves["rtol"] * max(abs(p["eager"]) for p in m["per_step"])
    md = (out / "ppo_step.md").read_text()
    assert "PASS" in md and all(f"| {ph} |" in md for ph in bench_ppo_step.PHASES)
    assert capsys.readouterr().out.rstrip().endswith(md.rstrip().splitlines()[-1])


def test_bench_head_memory_smoke(tmp_path, capsys, monkeypatch):
    """benchmarks/bench_head_memory.py on a tiny random Llama, in process: the three head modes (the kernel
    modes through Triton's interpreter) each time the three PPO phases with finite numbers, their log-probs
    and entropies agree with eager's (the benchmark's own gate), no GPU-only number appears on CPU; and
    the max-batch search (CUDA-only in the script) finds a simulated OOM threshold by doubling + bisection."""
    import bench_head_memory as bhm
    import torch

    out = tmp_path / "out"
    argv = [
        "--arch",
        "tiny",
        "--vocab-size",
        "300",
        "--hidden-size",
        "32",
        "--batch",
        "2",
        "--prompt-len",
        "4",
        "--reply-len",
        "8",
        "--warmup",
        "0",
        "--reps",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert bhm.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(bhm.FILES)
    doc = json.loads((out / "head_memory.json").read_text())
    meta = doc["meta"]
    assert meta["model_config"]["vocab_size"] == 300 and meta["grad_checkpointing"]
    assert "interpreter" in meta["kernel_path"]
    assert meta["gpu_name"] is None and meta["gpu_memory_total_mb"] is None and meta["memory_note"]
    assert set(doc["modes"]) == set(bhm.MODES) and doc["agreement_passed"]
    for mode, r in doc["modes"].items():
        assert not r["oom"] and r["batch"] == 2 and r["tokens_per_phase"] == 2 * (4 + 8)
        assert "max_batch" not in r  # the search runs on CUDA only
        for ph in bhm.PHASES:
            row = r["phases"][ph]
            assert math.isfinite(row["median_s"]) and row["median_s"] > 0 and math.isfinite(row["tokens_per_s"])
            assert row["peak_mb"] is None and row["reserved_mb"] is None
        assert r["step"]["tokens_per_s"] > 0 and r["step"]["peak_mb"] is None
        a = doc["agreement"][mode]
        assert a["logp"] <= 1e-4 and a["entropy"] <= 1e-4 and math.isfinite(a["loss"])
        assert a["grad_norm"] > 0 and a["grad_norm_rel_diff"] <= 1e-3
    assert doc["agreement"]["eager"]["logp"] == 0.0
    md = (out / "head_memory.md").read_text()
    assert all(f"| {mode} |" in md for mode in bhm.MODES) and "PASS" in md and "grad checkpointing ON" in md
    assert capsys.readouterr().out.rstrip().endswith(md.rstrip().splitlines()[-1])

    def fake_step(model, ro, adv, mode, args, device):  # "OOM" above 13 rows
        if ro > 13:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"update": {"peak_mb": float(ro)}}, {}

    monkeypatch.setattr(bhm, "ppo_step", fake_step)
    monkeypatch.setattr(bhm, "synthetic_rollout", lambda B, *a: (B, None))
    args = bhm.parse_args(["--batch", "8", "--max-batch", "512"])
    model = torch.nn.Linear(1, 1)
    res = bhm.max_batch(model, "eager", args, torch.device("cpu"), 10, start_fits=True)
    assert (res["max_batch"], res["first_oom"], res["ended"]) == (13, 14, "converged")
    assert [p["batch"] for p in res["probes"]] == [16, 12, 14, 13]
    res = bhm.max_batch(
        model, "eager", bhm.parse_args(["--batch", "8", "--max-batch", "12"]), torch.device("cpu"), 10, start_fits=True
    )
    assert (res["max_batch"], res["ended"]) == (12, "capped at --max-batch")


def test_gpu_math_probe_measures_the_model_and_the_interpreter(tmp_path):
    """benchmarks/tools/gpu_math_probe.py (on a GPU it measures ex2.approx, div.full and the fp32 / bf16 tl.dot): on CPU it measures tests/gpu_math.py's model (--model) or the interpreter's own functions, in a subprocess
    (the model patches the interpreter for the whole process)."""
    res = {}
    for mode in ("--model", None):
        out = tmp_path / f"probe{mode or ''}.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / "tools" / "gpu_math_probe.py"), "--out", str(out)] + (
            [mode] if mode else []
        )
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"}
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "| exp2 |" in done.stdout
        res[mode] = json.loads(out.read_text())
    model, interp = res["--model"], res[None]
    assert model["device"].startswith("model") and model["quick"]
    assert model["exp2"]["integers_exact"] and model["exp2"]["same_error_at_frac_shifted"] == 1.0
    assert 1.0 < model["exp2"]["max_ulp"] <= 2.0 and len(model["exp2"]["max_rel_per_frac_64th"]) == 64
    assert 0.5 < model["rcp"]["max_ulp"] <= 1.0 and model["rcp"]["powers_of_two_exact"]
    assert 1.0 < model["div"]["max_ulp"] <= 2.5 and model["div"]["by_powers_of_two_exact"]
    assert interp["device"] == "interpreter" and interp["div"]["correctly_rounded"] == 1.0
    assert interp["rcp"]["correctly_rounded"] == 1.0
    for name in ("dot_fp32", "dot_bf16"):  # the model's dot is the FMA chain; the interpreter's is not
        assert model[name]["equal_to_fma_chain"] == 1.0 and interp[name]["equal_to_fma_chain"] < 0.9
        assert 0 < model[name]["max_err_eps_sum_abs"] < 4 and model[name]["n"] == 4096


@pytest.mark.parametrize("cfg", [None, (64, 4, 2, 80)])  # the library's launch, and a sweep row
def test_tune_rows_launches_match_the_library(gen, cfg):
    """benchmarks/tools/tune_rows.py repeats the launchers' argument lists (the library takes no tile arguments):
    on the interpreter its launches must give what token_logprobs and full_kl give, so the GPU sweep
    measures the shipped kernels and not a drifted copy (the GPU-only sweep itself needs CUDA)."""
    import torch
    import tune_rows

    from fastrlhf.kernels import full_kl, token_logprobs

    logits = torch.randn(5, 300, generator=gen) * 3
    ref = logits + 0.1 * torch.randn(5, 300, generator=gen)
    targets = torch.randint(0, 300, (5,), generator=gen)
    torch.testing.assert_close(tune_rows.token_logprobs_fwd(logits, targets, cfg), token_logprobs(logits, targets))
    torch.testing.assert_close(tune_rows.full_kl_fwd(logits, ref, cfg), full_kl(logits, ref))
    assert all(c[0] is None for c in tune_rows.CONFIGS.values())  # every op's first row: the library's launch
    assert tune_rows.main(["--rows", "4"]) == 2  # CPU: refuses


def test_pipeline_seeds_summary(tmp_path):
    """pipeline_seeds.py's summary of three seeds' metrics.json, hand-worked: win rates 0.6 / 0.7 / 0.8 ->
    mean 0.7, std 0.1, min 0.6; the policy beats the reference's correct rate on 2 of 3; KL 0.1 / 0.2 / 0.3
    against a bound of 0.25 holds on 2; the critic's explained variance read at the middle of five steps (the
    third) and the last, with the first step above 0; the table names each seed and the plot is a PNG."""
    import pipeline_seeds

    for seed, (wr, pc, rc) in enumerate([(0.6, 0.30, 0.32), (0.7, 0.35, 0.31), (0.8, 0.40, 0.30)]):
        run = tmp_path / f"seed-{seed}"
        run.mkdir()
        evaluation = {
            "win_rate": wr,
            "win_rate_ci95": [wr - 0.05, wr + 0.05],
            "policy_correct_rate": pc,
            "reference_correct_rate": rc,
            "kl_per_token": 0.1 * (seed + 1),
        }
        metrics = {
            "config": {"seed": 0, "rl_seed": seed, "algo": "ppo"},
            "evaluation": evaluation,
            "reward_model": {"test": {"accuracy": 0.9}},
            "timings": {"ppo_s": 500.0 + seed, "total_s": 850.0},
            "kl_bound": 0.25,
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
        (run / "step3_ppo").mkdir()
        evs = [-1.0, -0.5, 0.1 * seed - 0.05, 0.3, 0.4 + seed / 10]  # step 3 above 0 from seed 1 on
        log = "\n".join(json.dumps({"step": i + 1, "value/explained_variance": v}) for i, v in enumerate(evs))
        (run / "step3_ppo" / "metrics.jsonl").write_text(log + "\n")
        # held-out replies: on prompt "a" the policy is right and the reference wrong, on "b" both are right
        pairs = [{"id": pid, "policy_correct": True, "reference_correct": pid == "b"} for pid in ("a", "a", "b")]
        (run / "eval").mkdir()
        (run / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    assert pipeline_seeds.main(["--summarize", str(tmp_path), "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "seeds.json").read_text())
    s = doc["summary"]
    assert [r["rl_seed"] for r in doc["seeds"]] == [0, 1, 2]
    assert s["win_rate"]["mean"] == pytest.approx(0.7) and s["win_rate"]["std"] == pytest.approx(0.1)
    assert s["win_rate"]["min"] == 0.6 and s["kl_per_token"]["max"] == pytest.approx(0.3)
    assert s["correct_above_reference"] == 2 and s["kl_within_bound"] == 2
    assert [r["kl_within_bound"] for r in doc["seeds"]] == [True, True, False]
    assert [r["ev_first_positive_step"] for r in doc["seeds"]] == [4, 3, 3]
    assert doc["seeds"][2]["ev_mid"] == pytest.approx(0.15) and doc["seeds"][2]["ev_last"] == pytest.approx(0.6)
    md = (tmp_path / "seeds.md").read_text()
    assert "| 1 | 0.700 (0.650-0.750) | 0.350 / 0.310 | 0.200 | 0.05 / 0.50 (3) | 501 | 850 |" in md
    assert "on 2 of 3 seeds" in md and "bound on 2 of 3" in md
    assert (tmp_path / "seeds.png").read_bytes()[:8] == PNG_MAGIC
    # pooled: 9 pairs, 6 on "a" (difference 1) and 3 on "b" (0): policy 1.0, reference 1/3, difference 2/3.
    # Resampling whole prompts (a drawn prompt brings all three seeds' replies), a draw is "a a" (1), "b b" (0)
    # or one of each (2/3), so the 95% interval is [0, 1]; resampling replies or (seed, prompt) cells would
    # give a narrower one.
    pooled = s["pooled_correct"]
    assert pooled["replies"] == 9 and pooled["prompts"] == 2
    assert pooled["policy_correct_rate"] == 1.0 and pooled["reference_correct_rate"] == pytest.approx(1 / 3)
    assert pooled["difference"] == pytest.approx(2 / 3) and pooled["difference_ci95"] == [0.0, 1.0]
    assert "difference +0.667 (95% bootstrap interval over prompts +0.000 to +1.000)" in md
