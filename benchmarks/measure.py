"""The measurement core shared by `bench_kernels.py` (pytest-benchmark) and `sweep.py` (the grid).

What it measures and why (docs/benchmarks.md):
- time: on CUDA `triton.testing.do_bench` (CUDA events, warm-up, median; it flushes the L2 before every
  call) over a closure that rotates among several pre-allocated input sets, so a result that fits in
  the cache cannot flatter; on CPU plain wall-clock medians of a few calls (the smoke mode exercises the
  code paths through Triton's interpreter: its timings say nothing about performance).
- the two ceilings, measured IN THE SAME RUN: device-to-device copy bandwidth (a 1 GiB `copy_`, bytes =
  read + write) and the bf16 matmul rate (an 8192^3 product). Achieved GB/s of an op = its minimum
  bytes (the formula beside each op in `cases.py`) / its median time, reported as % of that copy rate.
- peak memory: `max_memory_allocated` during one call, minus what was allocated before it (the inputs),
  so a provider is charged for what it allocates itself.
- provenance: GPU, driver, torch / triton / transformers / liger versions, git commit, date.

Nothing here fabricates a GPU number: every CUDA-only quantity is None on a CPU run.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
MB = 1024.0 * 1024.0

# do_bench's own budget: warm-up and measured repetitions, in milliseconds of GPU time per cell.
WARMUP_MS = 25
REP_MS = 100
# Input sets are rotated only while they are small enough for caches to matter; bigger sets use one
# (do_bench already flushes the 50-60 MB L2 before every call, and three copies of a 10 GB tensor do not fit).
ROTATE_MAX_BYTES = 512 * 1024 * 1024
N_ROTATE = 3
CPU_REPEATS = 3

# Random-init model configurations the end-to-end benchmarks build (bench_generate.py, bench_head_memory.py):
# name -> (transformers config class, its arguments), the shapes of the published checkpoints.
ARCHS = {
    "smollm2-135m": (
        "LlamaConfig",
        dict(
            vocab_size=49152,
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            head_dim=64,
            tie_word_embeddings=True,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
        ),
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
        ),
    ),
    "qwen2.5-1.5b": (
        "Qwen2Config",
        dict(
            vocab_size=151936,
            hidden_size=1536,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            intermediate_size=8960,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
        ),
    ),
    "tiny": (
        "LlamaConfig",
        dict(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        ),
    ),
}


def on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def sync(device: torch.device) -> None:
    if on_cuda(device):
        torch.cuda.synchronize(device)


def n_input_sets(set_bytes: int) -> int:
    """How many independent input sets to rotate among for a cell whose one set is `set_bytes`."""
    return N_ROTATE if set_bytes <= ROTATE_MAX_BYTES else 1


def rotating(call: Callable[[int], object], n_sets: int) -> Callable[[], None]:
    """A no-argument closure that calls `call(i)` with i = 0, 1, ..., n_sets - 1, 0, ... in turn."""
    state = {"i": 0}

    def step() -> None:
        call(state["i"])
        state["i"] = (state["i"] + 1) % n_sets

    return step


def median_ms(fn: Callable[[], None], device: torch.device) -> tuple[float, str]:
    """(median milliseconds per call, method). CUDA: do_bench's median (warm-up, L2 flush, events).
    CPU: the median of CPU_REPEATS wall-clock calls after one warm-up call."""
    if on_cuda(device):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")), "do_bench"
    fn()
    times = []
    for _ in range(CPU_REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), "wall_clock_cpu"


def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call of `fn`, over what was allocated before it (the inputs
    and anything else alive). None on CPU (no allocator statistics there)."""
    if not on_cuda(device):
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def gb_per_s(nbytes: int, ms: float | None) -> float | None:
    """Achieved GB/s (1e9 bytes) for `nbytes` moved in `ms` milliseconds."""
    if ms is None or ms <= 0:
        return None
    return nbytes / ms / 1e6


# ------------------------------------------------------------------------------------------ ceilings
def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + bytes written (2 * nbytes), with
    `nbytes` far larger than the L2. This is the practical ceiling a streaming kernel is measured against."""
    if not on_cuda(device):
        return None
    src = torch.randn(nbytes // 4, device=device)  # random, never zeros
    dst = torch.empty_like(src)
    ms, _ = median_ms(lambda: dst.copy_(src), device)
    return gb_per_s(2 * nbytes, ms)


def matmul_tflops(device: torch.device, n: int = 8192) -> float | None:
    """Measured dense bf16 matmul rate (TFLOP/s) on random n x n x n operands: the compute ceiling."""
    if not on_cuda(device):
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms, _ = median_ms(lambda: a @ b, device)
    return 2.0 * n**3 / ms / 1e9


# ---------------------------------------------------------------------------------------- provenance
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_commit() -> str:
    """`git rev-parse HEAD` (+ "-dirty" when the tree has changes), else $FASTRLHF_GIT_COMMIT (a GPU
    host's copy of the tree may have no .git; pass the commit in), else "unknown"."""
    commit = _run(["git", "rev-parse", "HEAD"])
    if commit is None:
        return os.environ.get("FASTRLHF_GIT_COMMIT", "unknown")
    if _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "-dirty"
    return commit


def gpu_driver() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def gpu_clocks() -> str | None:
    """SM / memory clocks and power limit as nvidia-smi reads them (read only; never changed)."""
    return _run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,clocks.max.sm,power.limit", "--format=csv,noheader"])


def json_safe(x):
    """Strict JSON for a results document: non-finite floats become "nan" / "inf" / "-inf", keys strings,
    tuples lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def environment(device: torch.device) -> dict:
    """Everything a results file must record about where and with what it was measured."""
    meta: dict = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "device": str(device),
        "gpu_name": None,
        "gpu_driver": None,
        "gpu_memory_gb": None,
        "gpu_sm_count": None,
        "gpu_clocks": None,
        "cuda_version": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "host_cpu_count": os.cpu_count(),
    }
    if on_cuda(device):
        props = torch.cuda.get_device_properties(device)
        meta.update(
            gpu_name=props.name,
            gpu_driver=gpu_driver(),
            gpu_memory_gb=round(props.total_memory / 1e9, 1),
            gpu_sm_count=props.multi_processor_count,
            gpu_clocks=gpu_clocks(),
        )
    return meta


def ceilings(device: torch.device) -> dict:
    """The two floors' denominators, measured now on this device (None on CPU)."""
    return {"copy_bw_gbs": copy_bandwidth_gbs(device), "matmul_bf16_tflops": matmul_tflops(device)}
