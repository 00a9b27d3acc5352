"""Drop-in adapters (kernels/compat.py) against the code they replace, the torch.library ops (kernels/ops.py)
under torch.compile(fullgraph=True) and opcheck, and the TRL drop-in example.

TRL's functions run on CPU copies: that is TRL's pure-PyTorch path (on CUDA, TRL 1.16 would use its own
Triton kernel, which is not the oracle we want). Precision: the contract (tests/contract.py) against an
fp64 run of the same TRL code, with TRL in fp32 on the upcast inputs as the eager baseline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from contract import assert_contract

import fastrlhf.kernels as K
from fastrlhf.kernels import compat, ops

REPO = Path(__file__).resolve().parent.parent
V = 2053
SHAPES = [(2, 5, V), (7, V), (2, 2, 3, V)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def trl_utils():
    return pytest.importorskip("trl.trainer.utils")


def _run_with_grad(fn, x, cotangents, *args, **kwargs):
    """fn(x, ...) -> outputs (tuple or tensor); returns (outputs, d sum(out * cot) / dx)."""
    x = x.detach().requires_grad_()
    out = fn(x, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * c.to(o.device, o.dtype)).sum() for o, c in zip(outs, cotangents))
    (grad,) = torch.autograd.grad(loss, x)
    return tuple(o.detach().cpu() for o in outs), grad.cpu()


def _check_against_trl(ours_fn, trl_fn, x, cotangents, device, *args, **kwargs):
    """Contract for every output and the gradient: ours (fp32 out) vs TRL in fp32 (on x upcast) vs TRL in fp64."""
    ours, g_ours = _run_with_grad(ours_fn, x.to(device), cotangents, *args, out_dtype=torch.float32, **kwargs)
    eager, g_eager = _run_with_grad(trl_fn, x.float(), cotangents, *args, **kwargs)
    ref, g_ref = _run_with_grad(trl_fn, x.double(), cotangents, *args, **kwargs)
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        assert o.dtype == torch.float32
        assert_contract(f"output {i}", o, e, r)
    assert g_ours.dtype == x.dtype
    assert_contract("grad", g_ours, g_eager, g_ref)
    return ref


def _close_in_dtype(out, ref, dtype):
    """A default-dtype (possibly bf16) output: the fp32 result rounded once, so within ~1 ulp of dtype."""
    tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)


@pytest.mark.kernels("token_logprobs.fwd", "token_logprobs.bwd")
# ------------------------------------------------------------------------------------------ TRL adapters
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_selective_log_softmax_matches_trl(trl_utils, shape, dtype, gen, device):
    temperature = 0.7 if len(shape) == 3 else 1.0
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    idx = torch.randint(0, V, shape[:-1], generator=gen)
    idx.view(-1)[::3] = V - 1  # the target in the last partial block
    cot = [torch.randn(shape[:-1], generator=gen)]
    trl_fn = lambda x, i, t: trl_utils.selective_log_softmax(x, i.to(x.device), t)  # noqa: E731
    (ref,) = _check_against_trl(compat.selective_log_softmax, trl_fn, x, cot, device, idx.to(device), temperature)
    # default output dtype: whatever TRL itself returns for this input on this device
    ours = compat.selective_log_softmax(x.to(device), idx.to(device), temperature)
    assert ours.dtype == trl_utils.selective_log_softmax(x.to(device), idx.to(device), temperature).dtype
    _close_in_dtype(ours, ref, ours.dtype)


@pytest.mark.kernels("token_logprobs.fwd", "token_logprobs.bwd")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_entropy_from_logits_matches_trl(trl_utils, shape, dtype, gen, device):
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    cot = [torch.randn(shape[:-1], generator=gen)]
    trl_fn = lambda x, chunk_size: trl_utils.entropy_from_logits(x, chunk_size)  # noqa: E731
    (ref,) = _check_against_trl(compat.entropy_from_logits, trl_fn, x, cot, device, 3)
    ours = compat.entropy_from_logits(x.to(device), chunk_size=3)
    assert ours.dtype == trl_utils.entropy_from_logits(x.to(device), chunk_size=3).dtype
    _close_in_dtype(ours, ref, ours.dtype)


@pytest.mark.kernels("token_logprobs.fwd", "token_logprobs.bwd")
def test_top_k_index_and_row_mask_match_trl(trl_utils, gen, device):
    x = torch.randn(2, 5, V, generator=gen) * 3
    idx = torch.randint(0, V, (2, 5, 3), generator=gen)  # (..., K): K log-probs per position
    row_mask = torch.rand(2, 5, 3, generator=gen) > 0.3
    cot = [torch.randn(2, 5, 3, generator=gen)]
    trl_fn = lambda x, i, t, m: trl_utils.selective_log_softmax(x, i.to(x.device), t, m.to(x.device))  # noqa: E731
    _check_against_trl(compat.selective_log_softmax, trl_fn, x, cot, device, idx.to(device), 0.9, row_mask.to(device))
    out = compat.selective_log_softmax(x.to(device), idx.to(device), 0.9, row_mask.to(device))
    assert out.shape == idx.shape and bool((out.cpu()[~row_mask] == 0).all())


@pytest.mark.kernels("token_logprobs.fwd", "token_logprobs.bwd")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_selective_log_softmax_and_entropy_matches_trl(trl_utils, dtype, gen, device):
    x = (torch.randn(3, 4, V, generator=gen) * 3).to(dtype)
    idx = torch.randint(0, V, (3, 4), generator=gen)
    row_mask = (torch.rand(3, 4, generator=gen) > 0.3).long()
    cot = [torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)]

    def trl_fn(x, i, requires_grad, t, m):
        return trl_utils.selective_log_softmax_and_entropy(x, i.to(x.device), requires_grad, t, m.to(x.device))

    args = (idx.to(device), True, 0.8, row_mask.to(device))
    _check_against_trl(compat.selective_log_softmax_and_entropy, trl_fn, x, cot, device, *args)
    logp, ent = compat.selective_log_softmax_and_entropy(x.to(device).requires_grad_(), idx.to(device), False, 0.8)
    assert logp.requires_grad and not ent.requires_grad


# ------------------------------------------------------------------------------- verl / OpenRLHF adapters
def _handwritten(x, labels, temperature):
    """log_softmax(x / T) gathered at the labels, in x's dtype (fp64 for the reference); -100 -> 0."""
    active = labels != -100
    lp = torch.log_softmax(x / temperature, dim=-1).gather(-1, torch.where(active, labels, 0).unsqueeze(-1))
    return torch.where(active, lp.squeeze(-1), 0.0)


@pytest.mark.kernels("token_logprobs.fwd", "token_logprobs.bwd")
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavour", ["openrlhf", "verl"])
def test_logprobs_from_logits_matches_handwritten(flavour, dtype, temperature, gen, device):
    x = (torch.randn(3, 6, V, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, V, (3, 6), generator=gen)
    labels[0, :2] = -100
    cot = torch.randn(3, 6, generator=gen)
    if flavour == "openrlhf":
        fn = lambda x, lab, out_dtype=None: compat.log_probs_from_logits(x, lab, temperature, out_dtype=out_dtype)  # noqa: E731
        default = dtype  # OpenRLHF returns the logits' dtype
    else:
        fn = lambda x, lab, out_dtype=None: compat.logprobs_from_logits(  # noqa: E731
            x, lab, False, temperature=temperature, out_dtype=out_dtype
        )
        default = torch.float32 if compat._flash_attn_installed() else dtype  # verl: flash-attn's fp32, else dtype
    xd, lab = x.to(device), labels.to(device)
    version = xd._version
    (ours,), g_ours = _run_with_grad(fn, xd, [cot], lab, out_dtype=torch.float32)
    (eager,), g_eager = _run_with_grad(_handwritten, x.float(), [cot], labels, temperature)
    (ref,), g_ref = _run_with_grad(_handwritten, x.double(), [cot], labels, temperature)
    assert_contract("logp", ours, eager, ref)
    assert_contract("grad", g_ours, g_eager, g_ref)
    assert xd._version == version  # the caller's logits are never divided in place (OpenRLHF's div_)
    out = fn(xd, lab)
    assert out.dtype == default and out.shape == labels.shape
    _close_in_dtype(out, ref, default)


# ------------------------------------------------------------------------------------ torch.library ops
def _loss(lib, h, w, targets, old_logp, ref_logits, mask):
    """A tiny linear 'LM head' -> logits -> log-probs, entropy, full KL, k3 estimate -> masked mean."""
    logits = h @ w.t()  # (B, T, V)
    lp, ent = lib.token_logprobs(logits, targets, temperature=0.8, return_entropy=True)
    kl = lib.full_kl(logits, ref_logits, temperature=0.8, mask=mask)
    k3 = lib.kl_estimate(lp, old_logp, estimator="k3")
    m = mask.float()
    return ((-lp + 0.1 * k3 + 0.05 * kl - 0.01 * ent) * m).sum() / m.sum()


def _inputs(gen, device, T, V=257, H=16):
    h = torch.randn(2, T, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * 0.5
    targets = torch.randint(0, V, (2, T), generator=gen)
    old_logp = -torch.rand(2, T, generator=gen) * 5
    ref_logits = torch.randn(2, T, V, generator=gen)
    mask = torch.rand(2, T, generator=gen) > 0.2
    return [t.to(device) for t in (h, w, targets, old_logp, ref_logits, mask)]


def test_compile_fullgraph_matches_eager(gen, device):
    """fullgraph=True fails on any graph break. CPU: the "aot_eager" backend (AOTAutograd traces forward AND
    backward through our fake impls and autograd formulas; inductor's C++ build is too slow here). CUDA: inductor."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor" if device.type == "cuda" else "aot_eager")
    compiled = torch.compile(_loss, backend=counter, fullgraph=True, dynamic=True)
    for T in (5, 9):  # a second sequence length must not recompile
        h, w, *rest = _inputs(gen, device, T)
        results = []
        for lib, fn in ((K, _loss), (ops, _loss), (ops, compiled)):  # public (eager) / ops eager / ops compiled
            wi = w.detach().clone().requires_grad_()
            loss = fn(lib, h, wi, *rest)
            results.append((loss.detach(), torch.autograd.grad(loss, wi)[0]))
        for loss, grad in results[1:]:
            torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: a recompile or a graph break"
    code = counter.graphs[0].code
    assert all(f"fastrlhf.{name}" in code for name in ("token_logprobs", "full_kl", "kl_estimate")), code


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_ops_gradients_match_reference_autograd(path, monkeypatch, gen, device):
    """fp64, against autograd through the *_ref twins. "reference": the ops' own PyTorch fallback (what CPU
    tensors run without TRITON_INTERPRET), whose backward formulas are written out in ops.py."""
    if path == "reference":
        monkeypatch.setattr(ops, "use_triton", lambda t: False)
    x = (torch.randn(3, 4, 37, generator=gen, dtype=torch.float64) * 2).to(device)
    y = torch.randn(3, 4, 37, generator=gen, dtype=torch.float64).to(device)
    t = torch.randint(0, 37, (3, 4), generator=gen).to(device)
    t[1, :2] = -100
    mask = (torch.rand(3, 4, generator=gen) > 0.3).to(device)
    old = -torch.rand(3, 4, generator=gen, dtype=torch.float64).to(device)
    cot = torch.randn(4, 3, 4, generator=gen, dtype=torch.float64).to(device)

    def run(lp_fn, kl_fn, est_fn):  # T = 0.75: exact in fp32 (the kernels take T as an fp32 scalar, even for fp64)
        xi = x.detach().requires_grad_()
        lp, ent = lp_fn(xi, t, temperature=0.75, ignore_index=-100, return_entropy=True)
        lp_only = lp_fn(xi, t, temperature=0.75)
        kl = kl_fn(xi, y, temperature=0.75, mask=mask)
        k3 = est_fn(lp, old, estimator="k3")
        outs = (lp, ent, kl, k3 + lp_only)
        grad = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot)), xi)[0]
        return [o.detach() for o in outs] + [grad]

    got = run(ops.token_logprobs, ops.full_kl, ops.kl_estimate)
    want = run(K.token_logprobs_ref, K.full_kl_ref, K.kl_estimate_ref)
    for name, g, w in zip(["logp", "entropy", "full_kl", "k3", "grad"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


def test_fake_impls_run_nothing():
    x = torch.empty(2, 7, V, device="meta", dtype=torch.bfloat16)
    t = torch.empty(2, 7, device="meta", dtype=torch.long)
    lp, ent = ops.token_logprobs(x, t, return_entropy=True)
    kl = ops.full_kl(x, x, mask=torch.empty(2, 7, device="meta", dtype=torch.bool))
    k = ops.kl_estimate(lp, lp.to(torch.bfloat16))
    for out in (lp, ent, kl, k):
        assert out.device.type == "meta" and out.shape == (2, 7) and out.dtype == torch.float32


def test_opcheck(gen, device):
    x = (torch.randn(2, 3, 129, generator=gen) * 2).to(device).requires_grad_()
    y = torch.randn(2, 3, 129, generator=gen).to(device)
    t = torch.randint(0, 129, (2, 3), generator=gen).to(device)
    t[0, 0] = -100
    mask = (torch.rand(2, 3, generator=gen) > 0.3).to(device)
    a = torch.randn(2, 3, generator=gen).to(device).requires_grad_()
    b = torch.randn(2, 3, generator=gen).to(device).requires_grad_()
    torch.library.opcheck(ops._tlp_op, (x, t, 0.8, -100, True))
    torch.library.opcheck(ops._tlp_op, (x, t, 1.0, -100, False))
    torch.library.opcheck(ops._fkl_op, (x, y, mask, 0.9))
    torch.library.opcheck(ops._kle_op, (a, b, 3))
    with torch.no_grad():  # the backward ops, fed forward outputs
        _, ent, stats = ops._tlp_op(x, t, 0.8, -100, True)
        _, kl_stats = ops._fkl_op(x, y, mask, 0.9)
    xd, g = x.detach(), torch.randn(2, 3, generator=gen).to(device)
    torch.library.opcheck(ops._tlp_bwd_op, (xd, t, stats, ent, g, g * 0.5, 0.8, -100))
    torch.library.opcheck(ops._fkl_bwd_op, (xd, y, mask, kl_stats, g, 0.9))
    torch.library.opcheck(ops._kle_bwd_op, (a.detach(), b.detach(), g, 3))


# -------------------------------------------------------------------------------------------- example
def test_trl_drop_in_example_runs(monkeypatch, capsys):
    """examples/trl_drop_in.py, run in this process (trl is imported already: a subprocess would spend
    ~15 s importing it again). Its module code is what `python examples/trl_drop_in.py` runs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("trl_drop_in_example", REPO / "examples" / "trl_drop_in.py")
    example = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(example)
    except SystemExit:  # it exits 0 with "SKIP: ..." when trl cannot be imported
        pytest.skip(capsys.readouterr().out.strip())
    assert example.main() == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "agree" in out and out.count("step ") == example.STEPS, out
    assert example.U.selective_log_softmax is not compat.selective_log_softmax  # the switch was undone
