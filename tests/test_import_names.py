"""The repository's `kernels/` folder is `fastrlhf.kernels`; Hugging Face's kernel hub is the top-level package
`kernels`, which transformers >= 5.25 imports at startup. Python started in the repository root has the root
first on sys.path, so `import kernels` finds the folder: kernels/_shadow.py hands that import the installed
package instead (or, with none installed, an empty namespace package, as the folder without __init__.py).
Each case runs in a fresh interpreter started in the repository root, as `python -m pytest` is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, *flags: str, env: dict | None = None) -> str:
    done = subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_top_level_kernels_is_the_installed_package(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'the installed kernels'\n")
    code = "import sys, kernels; assert sys.path[0] in ('', %r); print(kernels.WHO)" % str(REPO)
    assert _python(code, env={"PYTHONPATH": str(site)}) == "the installed kernels"


def test_top_level_kernels_without_an_installed_one_is_empty():
    # -S: no site-packages, so no installed `kernels` either
    code = "import kernels; print(getattr(kernels, '__file__', None), list(kernels.__path__), dir(kernels))"
    out = _python(code, "-S")
    assert out.startswith("None [] ") and "WHO" not in out and "token_logprobs" not in out


def test_fastrlhf_kernels_and_transformers_import_from_the_root():
    code = (
        "import transformers.activations, kernels, fastrlhf.kernels as fk; "
        "print(fk.token_logprobs.__module__, getattr(kernels, '__file__', None) != fk.__file__)"
    )
    assert _python(code) == "fastrlhf.kernels.token_logprobs True"
