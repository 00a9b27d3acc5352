"""pytest-benchmark suite for the kernels: every op x mode x provider x dtype x shape of a grid from
`sweep.py`, grouped so that the providers of one case sit side by side.

    pytest benchmarks/ --benchmark-group-by=group --benchmark-columns=median,iqr,rounds   # measure
    pytest benchmarks/ --benchmark-disable                                               # wiring check
    FASTRLHF_BENCH_GRID=full pytest benchmarks/ ...                                      # the full grid

Grid: on CUDA the sweep's 'quick' grid (FASTRLHF_BENCH_GRID=full|quick|smoke to choose), on CPU the
'smoke' grid (tiny shapes through Triton's interpreter). pytest-benchmark times each call end to end
with the host clock (the call synchronises the device); the device-side numbers go into
`benchmark.extra_info` (on CUDA, and not with --benchmark-disable): do_bench median ms, achieved GB/s
and % of the copy bandwidth measured in this run, peak memory and its ratio to the essential bytes,
speedup vs the eager idiom, the correctness check's error and the first call's (compile) time.
Providers that have nothing to run (no counterpart op, CUDA-only, not installed, too slow at this size)
are skipped with the reason.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases  # noqa: E402
import measure  # noqa: E402
import sweep  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRID = os.environ.get("FASTRLHF_BENCH_GRID", "quick" if DEVICE.type == "cuda" else "smoke")
if DEVICE.type != "cuda" and GRID != "smoke":
    raise pytest.UsageError(f"FASTRLHF_BENCH_GRID={GRID} needs CUDA; this machine runs the smoke grid only")

# as the sweep orders them (one shape's inputs at a time), with the eager idiom first in each case so
# that every other provider's speedup can be computed
CELLS = sorted(
    sweep.build_grid(GRID, cases.TEMPERATURE),
    key=lambda c: (
        c.priority,
        sweep.input_key(c.case),
        c.case.key,
        c.provider != "eager",
        cases.PROVIDERS.index(c.provider),
    ),
)
_EAGER_MS: dict[str, float] = {}
_SETS: dict[str, object] = {"key": None, "sets": None}  # one shape's input sets alive at a time


@pytest.fixture(scope="session")
def copy_bw_gbs() -> float | None:
    """The device-to-device copy bandwidth, measured once per pytest run (None on CPU)."""
    return measure.copy_bandwidth_gbs(DEVICE)


def _input_sets(case: cases.Case) -> list[cases.Inputs]:
    key = sweep.input_key(case)
    if _SETS["key"] != key:
        _SETS.update(key=None, sets=None)
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        _SETS.update(key=key, sets=cases.input_sets(case, DEVICE))
    return _SETS["sets"]  # type: ignore[return-value]


@pytest.mark.parametrize("cell", CELLS, ids=[f"{c.case.key}-{c.provider}" for c in CELLS])
def test_kernel(benchmark, cell: sweep.Cell, copy_bw_gbs: float | None) -> None:
    case, provider = cell.case, cell.provider
    why = cases.static_skip(case, provider, DEVICE, copy_bw_gbs) or cell.plan_skip
    if why:
        pytest.skip(why)
    try:
        sets = _input_sets(case)
        prep = cases.prepare(case, provider, sets, DEVICE)
    except cases.Skip as e:
        pytest.skip(str(e))
    except torch.OutOfMemoryError as e:
        _SETS.update(key=None, sets=None)
        pytest.skip(f"oom: {str(e).splitlines()[0][:200]}")
    step = measure.rotating(prep.call, len(sets))

    def timed() -> None:
        step()
        measure.sync(DEVICE)

    benchmark.group = case.key
    benchmark.extra_info.update(
        op=case.op,
        mode=case.mode,
        provider=provider,
        dtype=case.dtype,
        shape=case.shape,
        min_bytes=cases.min_bytes(case),
        first_call_s=prep.first_call_s,
        max_abs_err=prep.max_abs_err,
    )
    benchmark(timed)
    if benchmark.disabled or DEVICE.type != "cuda":
        return
    extra = cases.measure_prepared(case, prep, sets, DEVICE, copy_bw_gbs)
    extra["copy_bw_gbs"] = copy_bw_gbs
    extra["do_bench_median_ms"] = extra.pop("median_ms")
    if provider == "eager":
        _EAGER_MS[case.key] = extra["do_bench_median_ms"]
    if case.key in _EAGER_MS:
        extra["speedup_vs_eager"] = _EAGER_MS[case.key] / extra["do_bench_median_ms"]
    benchmark.extra_info.update(extra)
