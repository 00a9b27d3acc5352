"""Test set-up: on a machine without CUDA, the Triton kernels run through Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, so this happens at the top of conftest,
before fastrlhf is imported; it is forced (an exported TRITON_INTERPRET=0 would send CPU tensors down the
`*_ref` path, and the kernel tests would compare the reference with itself). A session where triton was
imported before this point without the interpreter stops at once.

Every test that asserts the precision contract names the Triton launches it judges with
`@pytest.mark.kernels("token_logprobs.fwd", ...)`; after the test, each named launch must have run
(`fastrlhf.kernels._common.LAUNCHES`), and a contract test without the marker fails (`kernels()`: a test
of the rule itself, no kernel).
"""

import os
import sys
import zlib

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

# FASTRLHF_GPU_MATH=1: the interpreter's exp2, exp and fp32 division as a GPU's approximate ones (gpu_math.py);
# tests/test_gpu_math.py runs the fp32 contract tests that way in a subprocess.
if os.environ.get("FASTRLHF_GPU_MATH") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
    import gpu_math  # noqa: E402

    gpu_math.install()

import contract  # noqa: E402
import pytest  # noqa: E402

from fastrlhf.kernels import _common  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not _common.use_triton(torch.empty(0, device=DEVICE)):
    raise SystemExit(f"the Triton kernels would not run on {DEVICE} (TRITON_INTERPRET read as 0 at import)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "kernels(*launches): the Triton launches a contract test judges, "
        "e.g. 'full_kl.fwd'; each must run during the test",
    )


@pytest.fixture(autouse=True)
def _kernel_path(request):
    """A contract test must have declared, and run, the Triton launches it judges."""
    contract.CHECKS.clear()
    before = _common.LAUNCHES.copy()
    yield
    marker = request.node.get_closest_marker("kernels")
    if marker is None:
        assert not contract.CHECKS, (
            "a test asserting the precision contract must name its launches (@pytest.mark.kernels)"
        )
        return
    missing = [n for n in marker.args if _common.LAUNCHES[f"fastrlhf.{n}"] <= before[f"fastrlhf.{n}"]]
    assert not missing, f"Triton launches {missing} did not run: the test judged another path (a *_ref twin?)"


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's name: fresh inputs per test, reproducible run to run."""
    g = torch.Generator(device="cpu")
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


# Modules whose launchers tile rows with _common.row_blocks: their kernels stream the vocabulary in
# BLOCK_V chunks with an online max and rescaled sums.
ROW_KERNELS = ("token_logprobs", "full_kl", "ppo_head")


@pytest.fixture(params=["own_tiles", "blocks_of_1024"])
def tiles(request, monkeypatch) -> str:
    """The row kernels with the launchers' own tiles, then with 1,024-column blocks. The own tiles hold the
    tests' vocabularies in one block (up to 65,536 columns on the interpreter, 4,096 on CUDA), so without
    the second run the online max and the rescaling of the sums across blocks would go untested on CPU.
    With one row per program there, the forwards also take their 16-byte-grid path (`fwd_tiles`: a masked
    first block starting before the row, whole blocks unmasked, a masked last one) for the tests' odd
    vocabulary (2053: rows start anywhere in their 16 bytes). Where they fall back to blocks from column 0
    (views off 16 bytes, several rows a program), this run keeps partials per 16-byte column group whatever
    the alignment (`_common.load_group` picks them only for aligned rows), so the groups meet partial
    tails, -inf columns and empty groups too. The backwards take their 16-byte-grid path the same way
    (`_common.aligned_share`), with each row split over three programs as on a GPU (one on the interpreter
    otherwise), so a split's first, whole and last blocks all run."""
    if request.param == "blocks_of_1024":
        import importlib

        from fastrlhf.kernels import _common

        def blocks_of_1024(n_rows, n_cols, device, max_tile=None):
            return _common.row_blocks(n_rows, n_cols, device, max_tile=min(max_tile or 1024, 1024))

        def vector_groups(block_v, *rows):
            return min(block_v, 16 // max(t.element_size() for t in rows))

        def three_splits(n_row_programs, n_col_blocks, device):  # the backwards' programs per row (1 on CPU)
            return min(3, n_col_blocks)

        for name in ROW_KERNELS:
            module = importlib.import_module(f"fastrlhf.kernels.{name}")
            monkeypatch.setattr(module, "row_blocks", blocks_of_1024)
            monkeypatch.setattr(module, "vocab_splits", three_splits)
        monkeypatch.setattr(_common, "load_group", vector_groups)  # read by _common.row_layout
    return request.param
