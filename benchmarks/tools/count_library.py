"""SASS per element of the library's own token_logprobs / full_kl launches (forward and backward, bf16,
vocab 151936) for a kernels/ folder of any commit: the calibration beside `tune_rows.py --sass`, whose
launch copies follow the current code. Run from the repository root, without TRITON_INTERPRET:

    git worktree add /tmp/k7310124 7310124
    python benchmarks/tools/count_library.py /tmp/k7310124/kernels out.json
"""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import aot_compile  # noqa: E402  (before triton)
import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


def load_kernels(folder: str):
    """Import `folder` as the package fastrlhf.kernels (so its relative imports resolve)."""
    import fastrlhf

    spec = importlib.util.spec_from_file_location(
        "fastrlhf.kernels", f"{folder}/__init__.py", submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastrlhf.kernels"] = module
    fastrlhf.kernels = module
    spec.loader.exec_module(module)
    return module


def main(folder: str, out: str) -> None:
    K = load_kernels(folder)
    target = GPUTarget("cuda", 90, 32)
    x = torch.empty(16, 151936, dtype=torch.bfloat16)
    ids = torch.zeros(16, dtype=torch.long)

    def run(op):
        xg = x.detach().requires_grad_()
        y = K.token_logprobs(xg, ids) if op == "token_logprobs" else K.full_kl(xg, x)
        torch.autograd.grad(y.sum(), [xg])

    rows = []
    for op in ("token_logprobs", "full_kl"):
        for rec in aot_compile.record(lambda: run(op), target):
            r = {"kernel": rec["kernel"], "launch": aot_compile.describe(rec), **aot_compile.loop_cost(rec, target)}
            rows.append(r)
            print(
                f"{rec['kernel']:22s} {r['per_element']['instructions']:5.1f} instructions/element "
                f"(+{r['loop']['conditional']} in if-blocks per iteration), {r['resources']}"
            )
    json.dump({"kernels": folder, "rows": rows}, open(out, "w"), indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:3])
