"""Compile every Triton kernel of fastrlhf.kernels ahead of time for a real GPU (default sm_90, H100/H200),
on a machine without a GPU, with the launch configurations the launchers actually use on CUDA.

Why: the CPU tests run the kernels through Triton's interpreter, which accepts code the real compiler
rejects (e.g. a module global written `LOG2E: tl.constexpr = 1.44` compiles in the interpreter but not
with Triton >= 3.3: "Cannot access global variable"). This script catches that class of error in CI.

How (nothing is hand-written per kernel; the configurations are captured from real launches):
  1. Triton's active driver is replaced by a stub that reports a CUDA sm_90 target, and
     `JITFunction._do_compile` by a recorder: every `kernel[grid](...)` then runs Triton's own binder
     (argument types, pointer/int specialisation, constexprs, options) and records what it would
     compile, and the launch is skipped (outputs stay uninitialised; the launchers never branch on data).
  2. Each public kernel function runs on small CPU tensors inside a TorchFunctionMode that makes every
     tensor report `device == cuda:0` / `is_cuda` (factory calls on cuda are redirected to the CPU, and
     `_common._SM_COUNT` says 132 SMs, an H100 SXM / H200). So the launchers take their CUDA branches:
     `row_blocks`' 4096-element tiles, `vocab_splits`, gae's and reward_head's CUDA blocks, the fused-linear
     `launch_config`/`dot_dtype` (kernels/_linear.py) for CUDA. Backward passes run too (autograd does not
     carry the mode into `Function.backward`, so `BackwardCFunction.apply` re-enters it).
     Inputs: bf16 and fp32, realistic sizes (SmolLM2: vocab 49,152, hidden 576; a small vocab for the
     multi-row tiles), and every constexpr flag combination the public API can reach (see SCENARIOS).
  3. Every deduplicated launch goes through Triton's front end (AST -> TTIR: where the compiler rejects
     non-constexpr globals, type mismatches between branches or loop iterations, bad constexpr use; about
     0.04 s each). Launches are then grouped by kernel, argument types, non-boolean constexprs (block sizes,
     dtypes), num_warps and num_stages; the member of each group with the most boolean flags set is
     compiled in full, `triton.compile(ASTSource(...), target=GPUTarget)` exactly as
     `JITFunction._do_compile` would: LLVM, PTX, and a cubin from the ptxas bundled in the triton wheel
     (about 0.5-3 s each). `--cubin all` compiles every launch in full (about 3x longer).
     For each cubin: shared memory (metadata.shared, checked against the architecture's per-block limit, as
     the launch would), registers and stack bytes (cuobjdump --dump-resource-usage); a non-zero stack is
     register spilling (ptxas -v then gives the spill bytes), reported as a warning.

Usage (TRITON_INTERPRET must not be set; the script removes it, and refuses if triton is already loaded
in interpreter mode):
    python scripts/aot_compile.py [--arch 90] [--modules token_logprobs,gae] [--cubin group|all|none]
                                  [--jobs 2] [--json out.json]
Exit status 1 if any kernel fails to compile, needs more shared memory than the target has, or a launcher
raises during capture; spills only warn. tests/test_compile_gpu.py runs this in CI.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile for real
os.environ.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)  # the escape hatch for an error this script exists for

import torch  # noqa: E402
import triton  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

MODULES = (
    "token_logprobs",
    "full_kl",
    "kl_estimate",
    "pairwise_loss",
    "reward_head",
    "gae",
    "ppo_head",
    "linear_logprobs",
    "linear_full_kl",
)
SM_COUNT = 132  # H100 SXM and H200
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


# ------------------------------------------------------------------------------------------ availability
def unavailable_reason() -> str | None:
    """Why AOT compilation for NVIDIA cannot run here, or None."""
    try:
        from triton.backends import backends
    except Exception as e:  # pragma: no cover - very old triton
        return f"triton.backends unavailable: {e}"
    if "nvidia" not in backends:
        return f"triton has no NVIDIA backend (backends: {sorted(backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception as e:
        return f"ptxas not found: {e}"
    if not path or not os.path.exists(str(path)):
        return f"ptxas not found (looked for {path})"
    return None


# --------------------------------------------------------------------------------------- fake CUDA device
class _FakeDriver:
    """Stands in for Triton's CUDA driver: a device 0 whose target is `target`. Nothing is launched."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


_CUDA = torch.device("cuda", 0)
_DEVICE_GET = torch.Tensor.device.__get__
_IS_CUDA_GET = torch.Tensor.is_cuda.__get__


def _to_cpu(v):
    if isinstance(v, torch.device) and v.type == "cuda":
        return torch.device("cpu")
    if isinstance(v, str) and v.startswith("cuda"):
        return "cpu"
    return v


class FakeCuda(TorchFunctionMode):
    """CPU tensors report `device == cuda:0` and `is_cuda`; anything asked for on cuda is made on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func == _DEVICE_GET:
            return _CUDA
        if func == _IS_CUDA_GET:
            return True
        return func(*(_to_cpu(a) for a in args), **{k: _to_cpu(v) for k, v in (kwargs or {}).items()})


class _Recorder:
    """Installs the fake driver, the fake device and the launch recorder; restores them on exit."""

    def __init__(self, target):
        self.target = target
        self.records: dict[tuple, dict] = {}  # (module, kernel, specialisation key) -> launch
        self.scenario = None

    def __enter__(self):
        from torch.autograd.function import BackwardCFunction
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        import fastrlhf.kernels._common as common

        if common.INTERPRET:
            raise RuntimeError("fastrlhf.kernels was imported under TRITON_INTERPRET=1; run this in a fresh process")
        self._saved = (driver._active, JITFunction._do_compile, BackwardCFunction.apply, dict(common._SM_COUNT))
        recorder = self

        def _do_compile(jit_fn, key, signature, device, constexprs, options, attrs, warmup):
            k = (jit_fn.fn.__module__, jit_fn.fn.__qualname__, str(key))
            if k not in recorder.records:
                recorder.records[k] = dict(
                    fn=jit_fn,
                    signature=signature,
                    constexprs=constexprs,
                    options=options,
                    attrs=attrs,
                    scenario=recorder.scenario,
                )
            return None  # JITFunction.run returns before launching

        orig_apply = BackwardCFunction.apply

        def apply(ctx, *args):  # autograd drops the TorchFunctionMode stack inside Function.backward
            with FakeCuda():
                return orig_apply(ctx, *args)

        driver.set_active(_FakeDriver(self.target))
        JITFunction._do_compile = _do_compile
        BackwardCFunction.apply = apply
        common._SM_COUNT[0] = SM_COUNT
        self._mode = FakeCuda()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        from torch.autograd.function import BackwardCFunction
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        import fastrlhf.kernels._common as common

        self._mode.__exit__(*exc)
        driver._active, JITFunction._do_compile, BackwardCFunction.apply, sm = self._saved
        common._SM_COUNT.clear()
        common._SM_COUNT.update(sm)
        return False


# -------------------------------------------------------------------------------------------- scenarios
# Each runs one module's public functions on CPU tensors (seen as cuda) through every constexpr flag
# combination its API reaches, for bf16 and fp32. Values are never read (launches are skipped), so the
# tensors are torch.empty and sizes can be realistic. Row counts avoid 1 (Triton specialises ints == 1).
DTYPES = (torch.bfloat16, torch.float32)
LM_VOCAB, HIDDEN = 49152, 576  # SmolLM2-135M: row_blocks -> (BLOCK_R, BLOCK_V) = (1, 4096)
SMALL_VOCAB = 256  # a toy vocabulary: multi-row tiles (16, 256)
ODD_VOCAB = 50257  # GPT-2: rows off memory's 16-byte grid; the row forwards' blocks then start before the row


def _rows(dt, V):
    """The trainer's strided `logits[:, :-1]` view of a (4, 65, V) tensor, and for ODD_VOCAB also a view
    whose first element is off 16 bytes, which the row forwards stream from column 0 with scalar loads."""
    yield _e(4, 65, V, dtype=dt)[:, :-1]
    if V == ODD_VOCAB:
        yield _e(4, 65, V + 1, dtype=dt)[:, :-1, 1:]


def _e(*shape, dtype=torch.float32, grad=False):
    return torch.empty(shape, dtype=dtype).requires_grad_(grad)


def _ids(*shape, high):
    return torch.randint(0, high, shape)


def _grads(outputs, inputs):
    """Backward through each non-empty subset of `outputs` (a dict name -> tensor), one graph."""
    names = [n for n, t in outputs.items() if t is not None]
    for r in range(1, len(names) + 1):
        for subset in itertools.combinations(names, r):
            loss = sum(outputs[n].float().sum() for n in subset)
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)


def scenario_token_logprobs():
    from fastrlhf.kernels import token_logprobs

    for dt in DTYPES:
        for V in (LM_VOCAB, SMALL_VOCAB, ODD_VOCAB):
            tgt = _ids(4, 64, high=V)
            for logits in _rows(dt, V):
                with torch.no_grad():
                    for ent in (False, True):
                        token_logprobs(logits, tgt, return_entropy=ent)
                x = logits.detach().requires_grad_()
                for ent in (False, True):  # backward: HAS_GRAD_ENT == return_entropy (autograd passes zeros)
                    out = token_logprobs(x, tgt, return_entropy=ent)
                    torch.autograd.grad((out[0] if ent else out).sum(), [x])


def scenario_full_kl():
    from fastrlhf.kernels import full_kl

    for dt in DTYPES:
        for V in (LM_VOCAB, SMALL_VOCAB, ODD_VOCAB):
            for logits, ref in zip(_rows(dt, V), _rows(dt, V)):
                for mask in (None, torch.ones(4, 64, dtype=torch.bool)):
                    with torch.no_grad():
                        full_kl(logits, ref, mask=mask)
                    x = logits.detach().requires_grad_()
                    torch.autograd.grad(full_kl(x, ref, mask=mask).sum(), [x])


def scenario_kl_estimate():
    from fastrlhf.kernels import kl_estimate

    for dt in DTYPES:
        logp, ref = _e(4, 64, dtype=dt, grad=True), _e(4, 64, dtype=dt, grad=True)
        for est in ("k1", "k2", "k3"):
            torch.autograd.grad(kl_estimate(logp, ref, estimator=est).sum(), [logp, ref])


def scenario_pairwise_loss():
    from fastrlhf.kernels import pairwise_loss

    for dt in DTYPES:
        c, r = _e(64, dtype=dt, grad=True), _e(64, dtype=dt, grad=True)
        for margin in (None, 0.5, _e(64, dtype=dt)):  # none, a float (-> fp32 tensor), a tensor
            torch.autograd.grad(pairwise_loss(c, r, margin=margin), [c, r])


def scenario_reward_head():
    from fastrlhf.kernels import last_token_rewards, reward_head_pairwise_loss

    S, T = 8, 512
    where = {
        "mask int64": dict(attention_mask=torch.ones(S, T, dtype=torch.int64)),  # the trainer's (HF) mask
        "mask bool": dict(attention_mask=torch.ones(S, T, dtype=torch.bool)),  # passed on as uint8
        "lengths": dict(lengths=torch.full((S,), T, dtype=torch.int64)),
    }
    for dt in DTYPES:
        hidden, weight = _e(S, T, HIDDEN, dtype=dt, grad=True), _e(HIDDEN, dtype=dt, grad=True)
        for w, bias in itertools.product(where.values(), (None, _e(1, dtype=dt, grad=True))):
            params = [hidden, weight] + ([bias] if bias is not None else [])
            for margin in (None, 0.5):
                out = reward_head_pairwise_loss(hidden, weight, bias, margin=margin, **w)
                torch.autograd.grad(out.loss, params)
            torch.autograd.grad(last_token_rewards(hidden, weight, bias, **w).sum(), params)
            with torch.no_grad():  # the trainer's reward scores
                last_token_rewards(hidden, weight, bias, **w)


def scenario_gae():
    from fastrlhf.kernels import gae

    # The trainer's call: fp32 rewards and values, mask = response_mask.float(). (B, T) -> CUDA blocks
    # (BLOCK_B, BLOCK_T, num_warps): (64, 512) -> (1, 512, 4); (16, 4096) -> (1, 2048, 8); (1024, 64) -> (4, 64, 4)
    for B, T in ((64, 512), (16, 4096), (1024, 64)):
        gae(_e(B, T), _e(B, T), torch.ones(B, T), gamma=1.0, lam=0.95)
    # other dtypes: bool (passed as uint8) and int64 masks, bf16 values
    B, T = 64, 512
    for values_dtype, mask_dtype in (
        (torch.float32, torch.bool),
        (torch.float32, torch.int64),
        (torch.bfloat16, torch.bool),
    ):
        gae(_e(B, T), _e(B, T, dtype=values_dtype), torch.ones(B, T, dtype=mask_dtype), gamma=1.0, lam=0.95)


PPO_OUTPUTS = ("logprobs", "entropy", "ratio", "pg_loss", "kl")


def scenario_ppo_head():
    from fastrlhf.kernels import ppo_head

    for dt in DTYPES:
        for V in (LM_VOCAB, SMALL_VOCAB, ODD_VOCAB):
            logits = _e(4, 65, V, dtype=dt)[:, :-1]
            tgt, old, adv, ref = _ids(4, 64, high=V), _e(4, 64), _e(4, 64), _e(4, 64)
            for ref_lp in (None, ref):
                with torch.no_grad():
                    ppo_head(logits, tgt, old, adv, ref_logprobs=ref_lp)
            x = logits.detach().requires_grad_()
            out = ppo_head(x, tgt, old, adv, ref_logprobs=ref)
            if V == LM_VOCAB:  # every subset of the differentiable outputs: 31 backward flag combinations
                _grads({n: getattr(out, n) for n in PPO_OUTPUTS}, [x])
            else:  # the other vocabularies: the trainer's loss, pg - c * entropy + beta * kl
                torch.autograd.grad(out.pg_loss.sum() + out.entropy.sum() + out.kl.sum(), [x])
            ppo_head(x, tgt, old, adv)  # forward with grad, no reference


def _linear_heads():
    """(hidden, weight, bias or None, trainable tensors or None) of an LM head at SmolLM2's shapes, bf16 and
    fp32, with and without a bias: first frozen (no-grad forwards), then hidden + weight (+ bias) trainable
    (full fine-tuning), then hidden only (a frozen LM head)."""
    for dt in DTYPES:
        hidden = _e(4, 64, HIDDEN, dtype=dt)
        weight = _e(LM_VOCAB, HIDDEN, dtype=dt)
        for has_bias in (False, True):
            bias = _e(LM_VOCAB, dtype=dt) if has_bias else None
            yield hidden, weight, bias, None
            for trainable in ("all", "hidden"):
                h = hidden.detach().requires_grad_()
                w = weight.detach().requires_grad_(trainable == "all")
                b = None if bias is None else bias.detach().requires_grad_(trainable == "all")
                yield h, w, b, [t for t in (h, w, b) if t is not None and t.requires_grad]


def scenario_linear_logprobs():
    from fastrlhf.kernels import linear_logprobs

    tgt = _ids(4, 64, high=LM_VOCAB)
    for h, w, b, params in _linear_heads():
        for ent in (False, True):  # with grad: HAS_GRAD_ENT == return_entropy (autograd passes zeros)
            with torch.set_grad_enabled(params is not None):
                out = linear_logprobs(h, w, tgt, bias=b, return_entropy=ent)
            if params is not None:
                torch.autograd.grad((out[0] if ent else out).sum(), params)


def scenario_linear_full_kl():
    from fastrlhf.kernels import linear_full_kl

    for h, w, b, params in _linear_heads():  # the reference: the frozen head itself
        with torch.set_grad_enabled(params is not None):
            kl = linear_full_kl(h, w, h.detach(), w.detach(), bias=b, ref_bias=None if b is None else b.detach())
        if params is not None:
            torch.autograd.grad(kl.sum(), params)


SCENARIOS = {name: globals()[f"scenario_{name}"] for name in MODULES}


# ---------------------------------------------------------------------------------------------- capture
def launched_kernels(module) -> list[str]:
    """The @triton.jit functions of `module` that its launchers launch (`name[grid](...)` in the source)."""
    import inspect

    from triton.runtime.jit import JITFunction

    src = inspect.getsource(module)
    own = [n for n, v in vars(module).items() if isinstance(v, JITFunction) and v.fn.__module__ == module.__name__]
    return sorted(n for n in own if re.search(rf"\b{n}\[", src))


def capture(modules, target) -> tuple[list[dict], dict[str, str]]:
    """-> (unique launches, {scenario module: traceback} for scenarios whose launcher raised)."""
    errors = {}
    with _Recorder(target) as rec:
        for name in modules:
            rec.scenario = name
            try:
                SCENARIOS[name]()
            except Exception:
                errors[name] = traceback.format_exc()
    return _launches(rec), errors


def record(fn, target) -> list[dict]:
    """The launches `fn()` makes (CPU tensors seen as cuda, nothing launched), as `capture` gives them."""
    with _Recorder(target) as rec:
        fn()
    return _launches(rec)


def _launches(rec) -> list[dict]:
    launches = []
    for (module, kernel, _), r in rec.records.items():
        names = r["fn"].arg_names
        consts = {names[p[0]]: v for p, v in r["constexprs"].items()}
        ptrs = {n: t for n, t in r["signature"].items() if isinstance(t, str) and t.startswith("*")}
        module = module.rsplit(".", 1)[-1]
        if module.startswith("_") and r["scenario"]:  # a shared module's kernel (kernels/_linear.py): the op's
            module = r["scenario"]  # whose scenario launched it
        launches.append(
            dict(
                r,
                module=module,
                kernel=kernel,
                consts=consts,
                ptrs=ptrs,
                num_warps=r["options"].num_warps,
                num_stages=r["options"].num_stages,
            )
        )
    return launches


_PTR_CODE = {
    "bf16": "b",
    "fp16": "h",
    "fp32": "f",
    "fp64": "d",
    "i64": "l",
    "i32": "i",
    "i16": "s",
    "i8": "c",
    "u8": "u",
    "i1": "1",
    "u1": "1",
}


def describe(launch) -> str:
    """`ptr=bll.. COMPUTE_ENTROPY=1 ACC=fp32 BLOCK_R=1 BLOCK_V=4096 w8 s3`: the pointer arguments' element
    types in order (b bf16, h fp16, f fp32, d fp64, l i64, i i32, u u8, 1 bool), the constexprs (ints the
    binder specialised to 1 included), num_warps, num_stages and a register cap (`r80`) if any."""
    parts = ["ptr=" + "".join(_PTR_CODE.get(t[1:], "?") for t in launch["ptrs"].values())]
    for n, v in launch["consts"].items():
        if isinstance(v, bool):
            v = int(v)
        elif not isinstance(v, (int, float)):
            v = str(v).replace("triton.language.", "")
        parts.append(f"{n}={v}")
    parts += [f"w{launch['num_warps']}", f"s{launch['num_stages']}"]
    maxnreg = getattr(launch["options"], "maxnreg", None)
    return " ".join(parts + ([f"r{maxnreg}"] if maxnreg else []))


def choose_cubins(launches, policy="group") -> None:
    """Sets launch["cubin"]: all, none, or per group (same kernel, pointer types, non-boolean constexprs,
    num_warps, num_stages) the launch with the most boolean flags set (ties: the first captured)."""
    best = {}
    for i, rec in enumerate(launches):
        rec["cubin"] = policy == "all"
        key = (
            rec["module"],
            rec["kernel"],
            tuple(rec["ptrs"].values()),
            rec["num_warps"],
            rec["num_stages"],
            tuple((n, str(v)) for n, v in rec["consts"].items() if not isinstance(v, bool)),
        )
        flags = sum(v is True for v in rec["consts"].values())
        if key not in best or flags > best[key][0]:
            best[key] = (flags, i)
    if policy == "group":
        for _, i in best.values():
            launches[i]["cubin"] = True


# ---------------------------------------------------------------------------------------------- compile
# Largest shared memory one block may use (opt-in), per compute capability; the launch fails above it.
MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448, 120: 101376}


def _frontend(launch, target) -> None:
    """AST -> TTIR only: the first two steps of `triton.compile`."""
    from triton._C.libtriton import ir
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    src = ASTSource(launch["fn"], launch["signature"], launch["constexprs"], launch["attrs"])
    options = backend.parse_options(dict(launch["options"].__dict__))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(
        target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context
    )
    stages = {}
    backend.add_stages(stages, options, src.language)
    stages["ttir"](module, {})


def _resources(cubin: bytes) -> dict:
    """Registers and stack bytes per thread, from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run(
            [os.path.join(NVIDIA_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            timeout=60,
        )
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK):(\d+)", r.stdout)}


def _spills(ptx: str, capability: int) -> dict:
    """Spill bytes from ptxas -v on the PTX, with the flags Triton's make_cubin uses (less line info)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas, arch = get_ptxas(capability).path, sm_arch_from_capability(capability)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o", src + ".o"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return dict(spill_stores=int(m.group(1)), spill_loads=int(m.group(2))) if m else {}


# ------------------------------------------------------------------------------------ instruction mix
# SASS opcodes by the sm_80/sm_90 pipe that executes them, and that pipe's results per clock per SM
# (CUDA C++ Programming Guide, "Arithmetic Instructions", compute capability 8.x/9.0). Everything else
# (loads, stores, moves, branches, barriers, uniform-datapath ops) only takes issue slots: one warp
# instruction per clock per SM sub-partition, 4 x 32 = 128 thread-instructions per clock per SM.
ISSUE_PER_CLK = 128
PIPES = {
    "fp32": (128, {"FADD", "FMUL", "FFMA"}),
    "alu": (
        64,
        {
            "FMNMX",
            "FSETP",
            "FSEL",
            "SEL",
            "SHF",
            "PRMT",
            "LOP3",
            "ISETP",
            "IADD3",
            "PLOP3",
            "P2R",
            "R2P",
            "LEA",
            "IMNMX",
            "VIMNMX",
            "FCHK",
        },
    ),
    "imad": (64, {"IMAD", "HFMA2"}),
    "mufu": (16, {"MUFU"}),
    "conv": (16, {"F2F", "F2I", "I2F", "F2FP"}),
    "shfl": (32, {"SHFL"}),
}


def sass_text(cubin: bytes) -> str:
    """The cubin's SASS, from the cuobjdump bundled with triton."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run(
            [os.path.join(NVIDIA_BIN, "cuobjdump"), "-sass", f.name],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    return r.stdout


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*;")


LOADS = ("LDG", "LDGSTS")  # global loads: into registers, or copied to shared memory (a pipelined loop)
_LOAD_BYTES = {".128": 16, ".64": 8, ".U16": 2, ".S16": 2, ".U8": 1, ".S8": 1}  # by suffix; none: 4 bytes


def _load_bytes(line: str) -> int:
    """Bytes one thread moves with the global load on this SASS line (`LDG.E.128 ...`: 16)."""
    op = re.search(r"\b(LDGSTS|LDG)[A-Z0-9._]*", line).group(0)
    return next((b for suffix, b in _LOAD_BYTES.items() if op.endswith(suffix)), 4)


def streaming_loop(sass: str) -> dict | None:
    """The instruction mix of the kernel's streaming loop: of the loops (a branch back to an earlier
    address), the one that loads the most bytes per iteration (ties: the shortest -- a row split into a
    masked first block, unmasked whole blocks and a masked last one streams through the whole-block loop, and
    the masked ones load the same bytes with more instructions). None when there is no loop.
    Instructions that a forward branch inside the loop can skip (an `if` in the kernel, e.g. full_kl's
    rescale when a running maximum moves) are counted apart, as `conditional`: `ops` and `instructions` are
    the path through the loop that skips them all.
    -> {"instructions": n, "ops": {opcode (no modifiers): count}, "loads": global loads, "conditional": n}."""
    ins = [(int(a, 16), op, line) for line in sass.splitlines() for a, op in _SASS_LINE.findall(line)]

    def target(op, line):
        m = re.search(r"BRA\b[^;]*?0x([0-9a-f]+)", line) if op == "BRA" else None
        return int(m.group(1), 16) if m else None

    best = None
    for addr, op, line in ins:
        t = target(op, line)
        if t is None or t >= addr:
            continue
        body = [(a, o, text) for a, o, text in ins if t <= a <= addr]
        key = (sum(_load_bytes(text) for _, o, text in body if o in LOADS), -len(body))
        if best is None or key > best[0]:
            best = (key, body)
    if best is None:
        return None
    body = best[1]
    skipped = set()
    for a, o, text in body:
        t = target(o, text)
        if t is not None and a < t <= body[-1][0]:
            skipped.update(b for b, _, _ in body if a < b < t)
    path = [o for a, o, _ in body if a not in skipped]
    return {
        "instructions": len(path),
        "ops": dict(collections.Counter(path).most_common()),
        "loads": sum(o in LOADS for o in path),
        "conditional": len(skipped),
    }


def cycles_per_element(mix: dict, elements: int) -> dict:
    """Per element (one of the `elements` a thread handles per loop iteration): instructions, and the
    SM clocks it costs at each limit -- issue (all instructions) and every pipe of PIPES -- and the
    largest of them, the compute floor ("bound": which limit)."""
    per = {"instructions": mix["instructions"] / elements}
    clocks = {"issue": per["instructions"] / ISSUE_PER_CLK}
    for pipe, (rate, ops) in PIPES.items():
        n = sum(c for op, c in mix["ops"].items() if op in ops) / elements
        per[pipe] = n
        clocks[pipe] = n / rate
    bound = max(clocks, key=clocks.get)
    return {"per_element": per, "clocks": clocks, "bound": bound, "clocks_per_element": clocks[bound]}


def loop_cost(launch, target) -> dict:
    """One captured row-streaming launch compiled for `target`, and its streaming loop's cost: resources
    (registers, stack, spill bytes), the loop's mix, elements per thread per iteration (BLOCK_R x BLOCK_V
    over the threads) and `cycles_per_element`'s result. Raises what the compiler raises."""
    kernel = compile_launch(launch, target)
    res = _resources(kernel.asm["cubin"])
    if res.get("stack", 0):
        res.update(_spills(kernel.asm["ptx"], target.arch))
    loop = streaming_loop(sass_text(kernel.asm["cubin"]))
    per_thread = launch["consts"]["BLOCK_R"] * launch["consts"]["BLOCK_V"] // (32 * launch["num_warps"])
    return {"resources": res, "loop": loop, "elements_per_thread": per_thread, **cycles_per_element(loop, per_thread)}


def compile_launch(launch, target):
    """One captured launch compiled in full, as `JITFunction._do_compile` would (a CompiledKernel)."""
    from triton.compiler import ASTSource

    src = ASTSource(launch["fn"], launch["signature"], launch["constexprs"], launch["attrs"])
    return triton.compile(src, target=target, options=launch["options"].__dict__)


_LAUNCHES: list[dict] = []  # read by forked workers


def _error_text(e: BaseException) -> str:
    """The exception and its causes: an error inside a called @triton.jit helper reaches the kernel as a
    CompilationError at the call, with the helper's own error (e.g. the NameError) as its cause."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {str(e).strip() or repr(e)}")
        e = e.__cause__ or e.__context__
    return "\ncaused by ".join(parts)


def _compile_one(i: int, target) -> dict:
    launch = _LAUNCHES[i]
    res = dict(
        module=launch["module"],
        kernel=launch["kernel"],
        config=describe(launch),
        scenario=launch["scenario"],
        check="cubin" if launch["cubin"] else "ttir",
        ok=True,
        signature={k: str(v) for k, v in launch["signature"].items()},
        fp_fusion=bool(launch["options"].enable_fp_fusion),
    )
    t0 = time.perf_counter()
    try:
        if not launch["cubin"]:
            _frontend(launch, target)
        else:
            k = compile_launch(launch, target)
            res["shared"] = int(k.metadata.shared)
            limit = MAX_SHARED.get(target.arch)
            if limit is not None and res["shared"] > limit:
                res.update(
                    ok=False,
                    error=f"OutOfResources: needs {res['shared']} B of shared memory per block; "
                    f"sm_{target.arch} allows {limit} B (the launch would raise)",
                )
            try:
                res.update(_resources(k.asm["cubin"]))
                if res.get("stack", 0) > 0:
                    res.update(_spills(k.asm["ptx"], target.arch))
            except Exception as e:  # resource usage is a report, never a failure
                res["resource_error"] = f"{type(e).__name__}: {e}"
    except Exception as e:
        res.update(ok=False, error=_error_text(e))
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _worker(args):
    return _compile_one(*args)


def compile_all(launches, target, jobs=1) -> list[dict]:
    """Check each launch (cubins first, heaviest kernels first); `jobs` > 1 forks that many workers."""
    global _LAUNCHES
    order = sorted(
        range(len(launches)),
        key=lambda i: (not launches[i]["cubin"], launches[i]["module"] not in ("linear_logprobs", "linear_full_kl")),
    )
    _LAUNCHES = launches
    import multiprocessing as mp

    if jobs <= 1 or len(launches) <= 1 or "fork" not in mp.get_all_start_methods():
        results = [_compile_one(i, target) for i in order]
    else:  # forked workers inherit the captured JITFunctions; compilation holds the GIL, so threads would not help
        with mp.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_worker, [(i, target) for i in order], chunksize=1)
    rank = {m: n for n, m in enumerate(MODULES)}
    return sorted(results, key=lambda r: (rank.get(r["module"], len(rank)), r["kernel"], r["check"], r["config"]))


# ------------------------------------------------------------------------------------------------ report
def table(results, checks=("cubin",)) -> str:
    rows = [("module", "kernel", "configuration", "check", "smem B", "regs", "stack", "spill st/ld", "s")]
    for r in results:
        if r["check"] not in checks and r["ok"]:
            continue
        spill = f"{r['spill_stores']}/{r['spill_loads']}" if "spill_stores" in r else ""
        rows.append(
            (
                r["module"],
                r["kernel"],
                r["config"],
                r["check"] + ("" if r["ok"] else " FAIL"),
                str(r.get("shared", "")),
                str(r.get("reg", "")),
                str(r.get("stack", "")),
                spill,
                f"{r['seconds']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def run(modules=MODULES, arch=90, jobs=1, cubin="group") -> dict:
    """Capture, check and compile; the report as a JSON-able dict."""
    import importlib

    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    t0 = time.perf_counter()
    launches, capture_errors = capture(modules, target)
    choose_cubins(launches, cubin)
    t1 = time.perf_counter()
    results = compile_all(launches, target, jobs)
    t2 = time.perf_counter()
    kernels = {m: launched_kernels(importlib.import_module(f"fastrlhf.kernels.{m}")) for m in modules}
    return dict(
        arch=arch,
        triton=triton.__version__,
        modules=list(modules),
        known_modules=list(MODULES),
        kernels=kernels,
        capture_errors=capture_errors,
        results=results,
        capture_s=round(t1 - t0, 2),
        compile_s=round(t2 - t1, 2),
        jobs=jobs,
        cubin=cubin,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability (90 = H100/H200)")
    ap.add_argument("--modules", default=",".join(MODULES), help="comma-separated kernel modules")
    ap.add_argument(
        "--cubin",
        choices=("group", "all", "none"),
        default="group",
        help="which launches compile to a cubin; the rest go to TTIR only (default: one per group)",
    )
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--all-rows", action="store_true", help="list the TTIR-only launches in the table too")
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"SKIP: {reason}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(skip=reason), f)
        return 0
    modules = [m for m in args.modules.split(",") if m]
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        ap.error(f"unknown modules {unknown}; known: {', '.join(MODULES)}")
    with tempfile.TemporaryDirectory() as cache:
        os.environ.setdefault("TRITON_CACHE_DIR", cache)  # a fresh cache: every kernel really compiles
        report = run(modules, args.arch, args.jobs, args.cubin)
    results = report["results"]
    print(table(results, ("cubin", "ttir") if args.all_rows else ("cubin",)))
    n_fail = sum(not r["ok"] for r in results)
    n_cubin = sum(r["check"] == "cubin" for r in results)
    print(
        f"\n{len(results)} distinct launches for sm_{args.arch}: {n_cubin} compiled to cubin, "
        f"{len(results) - n_cubin} to TTIR only; {n_fail} failed. Capture {report['capture_s']} s, "
        f"compile {report['compile_s']} s (jobs={args.jobs})"
    )
    for r in results:
        if not r["ok"]:
            print(f"\nFAIL {r['module']}.{r['kernel']} [{r['config']}] ({r['check']}):\n{r['error']}")
        elif r.get("stack", 0) > 0:
            print(
                f"WARNING spills: {r['module']}.{r['kernel']} [{r['config']}]: stack {r['stack']} B, "
                f"spill stores/loads {r.get('spill_stores', '?')}/{r.get('spill_loads', '?')} B"
            )
    for name, tb in report["capture_errors"].items():
        print(f"\nCAPTURE FAILED {name}: a launcher raised before every launch was recorded:\n{tb}")
    for m, names in report["kernels"].items():
        missing = sorted(set(names) - {r["kernel"] for r in results if r["module"] == m})
        if missing:
            print(f"\nNOT CAPTURED {m}: {missing} (add them to scenario_{m})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    missing = any(set(k) - {r["kernel"] for r in results} for k in report["kernels"].values())
    return 1 if n_fail or report["capture_errors"] or missing else 0


if __name__ == "__main__":
    sys.exit(main())
