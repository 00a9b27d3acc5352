"""This folder is `fastrlhf.kernels`. Hugging Face's kernel hub is also a package named `kernels`, and
transformers (>= 5.25, which depends on it) imports it when it starts. Python started in the repository root
(`python -m pytest`, `python -m fastrlhf.trainer.cli ...`) puts that root first on sys.path, so `import kernels`
finds this folder instead, and transformers fails to import ("cannot import name 'CUDAProperties' from
'kernels'"). When this folder is imported under that name, `hand_over` gives the import the installed package;
where there is none (transformers < 5.25 has it optional), an empty namespace package, which is what this
folder would be without its __init__.py: transformers' availability check (it imports a `kernels` it finds on
sys.path but without metadata) then reads "not installed". `fastrlhf.kernels` never takes this path.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types


def hand_over(init_file: str) -> None:
    """Replace the module being imported as top-level `kernels` (this folder) with the `kernels` found on
    sys.path without the repository root: Python's import returns whatever sys.modules holds at the end."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(init_file)))
    path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    sys.modules.pop(__name__, None)  # kernels._shadow: not a module of the package handed over
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None:  # no __file__, no __version__, nothing to import from it
        sys.modules["kernels"] = module = types.ModuleType("kernels")
        module.__path__ = []
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
