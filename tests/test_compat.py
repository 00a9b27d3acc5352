"""Drop-in adapters (kernels/compat.py) against the code they replace, the torch.library ops (kernels/ops.py)
under torch.compile(fullgraph=True) and opcheck, and the TRL drop-in example.

TRL's functions run on CPU copies: that is TRL's pure-PyTorch path (on CUDA, TRL 1.16 would use its own
Triton kernel, which is not the oracle we want). Precision: the contract (tests/contract.py) against an
fp64 run of the same TRL code, with TRL in fp32 on the upcast inputs as the eager baseline.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from contract import INTERPRETER_BF16_TRUNCATES, assert_contract

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


@pytest.mark.parametrize("shape", [(8, 17), (3, 5, 32), (1, 1024), (5000, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_verl_shapes_and_dtypes(shape, dtype, gen, device):
    """The shapes and dtypes verl's own tests feed its torch_functional helpers (tiny and large vocabularies,
    many rows, fp64): the shape of the input without its last dimension, the default dtype, and values within
    fp32 rounding of an fp64 log-softmax (bf16: the fp32 result rounded once, so half a bf16 ulp; the
    interpreter truncates, so one)."""
    x = (torch.randn(shape, generator=gen) * 5).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    xd = x.to(device)
    logp = compat.logprobs_from_logits(xd, labels.to(device))
    ent = compat.entropy_from_logits(xd)
    default = torch.float32 if compat._flash_attn_installed() else dtype
    assert logp.shape == ent.shape == x.shape[:-1] and logp.dtype == default
    log_p = torch.log_softmax(x.double(), -1)
    want_lp, want_ent = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)
    tol = 2.0**-7 if logp.dtype == torch.bfloat16 else 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(logp.cpu().double(), want_lp, rtol=tol, atol=tol)
    torch.testing.assert_close(ent.cpu().double(), want_ent, rtol=tol, atol=tol)


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


# --------------------------------------------------------------------- outputs a caller may modify in place
def _modify(o: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The peers' tests' writes into an output (TRL, verl): one element, a masked fill, a scaling, a slice,
    and a write through a detached alias. In place, on `o` itself; returns it."""
    o[0, 2] = 0.0
    o.masked_fill_(mask, 0.0)
    o.mul_(2.0)
    o[:, :1] = 1.5
    o.detach()[1, 0] = 3.0
    return o


def _kernels_on(x, idx):
    """Every public function and adapter whose outputs a caller gets: name -> (fn(x, idx) -> outputs)."""
    head = torch.linspace(-1, 1, x.shape[-1] * 8, dtype=x.dtype).view(x.shape[-1], 8)
    return {
        "selective_log_softmax": lambda o: compat.selective_log_softmax(x, idx, 0.7, out_dtype=o),
        "entropy_from_logits": lambda o: compat.entropy_from_logits(x, out_dtype=o),
        "selective_log_softmax_and_entropy": lambda o: compat.selective_log_softmax_and_entropy(x, idx, out_dtype=o),
        "verl logprobs_from_logits": lambda o: compat.logprobs_from_logits(x, idx, out_dtype=o),
        "openrlhf log_probs_from_logits": lambda o: compat.log_probs_from_logits(x, idx, 0.9, out_dtype=o),
        "token_logprobs": lambda o: K.token_logprobs(x, idx, return_entropy=True),
        "ops.token_logprobs": lambda o: ops.token_logprobs(x, idx, return_entropy=True),
        "full_kl": lambda o: K.full_kl(x, x.detach().flip(-1)),
        "ops.full_kl": lambda o: ops.full_kl(x, x.detach().flip(-1)),
        "kl_estimate": lambda o: K.kl_estimate(x[..., 0], x[..., 1].detach()),
        "ops.kl_estimate": lambda o: ops.kl_estimate(x[..., 0], x[..., 1].detach()),
        "linear_logprobs": lambda o: K.linear_logprobs(x[..., :8].contiguous(), head, idx, return_entropy=True),
    }


# (name, out_dtype): the adapters with their default output dtype and with fp32; the kernels' own fp32
OUTPUTS = [
    pytest.param(name, out, id=f"{name}-{'fp32_out' if out else 'default_dtype'}")
    for name in _kernels_on(torch.zeros(1, 9), torch.zeros(1, dtype=torch.long))
    for out in ((None, torch.float32) if "from_logits" in name or "selective" in name else (torch.float32,))
]


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("name", "out_dtype"), OUTPUTS)
def test_outputs_take_in_place_writes(name, out_dtype, dtype, requires_grad, gen, device):
    """Each output written into as the peers' tests do, then back-propagated: no "view being modified in place"
    error, no "variable needed for gradient computation has been modified" error (no output is saved for the
    backward), and the same values and gradient as the same writes on a copy of the output. On CPU the default
    dtype of a 16-bit input is 16-bit, a cast and so a new tensor anyway: fp32_out is the CUDA case (TRL's
    rule: fp32 there) -- it failed before the outputs became fresh tensors."""
    x = (torch.randn(3, 5, 97, generator=gen) * 2).to(dtype).to(device)
    idx = torch.randint(0, 97, (3, 5), generator=gen).to(device)
    mask = (torch.rand(3, 5, generator=gen) > 0.6).to(device)
    cot = torch.randn(3, 5, generator=gen).to(device)

    def run(copy: bool):
        xi = x.detach().requires_grad_(requires_grad)
        outs = _kernels_on(xi, idx)[name](out_dtype)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs = [_modify(o.clone() if copy else o, mask) for o in outs]
        if not requires_grad:
            return [o.detach() for o in outs], None
        loss = sum((o.float() * cot).sum() for o in outs)  # the detached write ([1, 0]) gets no gradient
        return [o.detach() for o in outs], torch.autograd.grad(loss, xi)[0]

    got, grad = run(copy=False)
    want, want_grad = run(copy=True)
    for g, w in zip(got, want):
        assert g[0, 2] == 0 and g[1, 0] == 3.0 and bool((g[:, 0] == 3.0).any() or (g[:, 0] == 1.5).all())
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if requires_grad:
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weights", [(2, None, True), (None, 0.5, True), (2, 0.5, True), (2, 0.5, False)])
def test_sliced_logits_and_a_written_output_as_trl_tests_its_kernel(weights, dtype, gen, device):
    """TRL's own test of its fused log-prob + entropy kernel, with ours in its place: logits sliced along the
    sequence (not contiguous) with blocks of very different maxima and a target in the last partial block,
    sliced index and bool row mask, T = 0.7, one output element overwritten before the backward; the values
    and the gradient of every loss weighting against the same steps in fp32 PyTorch (TRL's tolerances)."""
    lp_weight, ent_weight, use_mask = weights
    base = torch.randn(2, 5, V, generator=gen).to(dtype)
    base[..., :1024] += 20
    base[..., 1024:2048] -= 20
    index = torch.randint(V, (2, 5), generator=gen)[:, 1:4].to(device)
    index[0, 0] = V - 1
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)[:, 1:4].to(device) if use_mask else None

    def run(fn):
        leaf = base.clone().to(device).requires_grad_()  # a fresh leaf per run: no gradient accumulates
        lp, ent = fn(leaf[:, 1:4])
        lp[0, 2] = 0.0  # must not reach what the backward reads
        loss = sum(w * o.sum() for w, o in ((lp_weight, lp), (ent_weight, ent)) if w is not None)
        loss.backward()
        return lp.detach().float(), ent.detach().float(), leaf.grad.float()

    def reference(x):
        logp = (x.float() / 0.7).log_softmax(-1)
        lp, ent = logp.gather(-1, index.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)
        return (lp, ent) if mask is None else (lp.masked_fill(~mask, 0.0), ent.masked_fill(~mask, 0.0))

    got = run(
        lambda x: compat.selective_log_softmax_and_entropy(
            x, index, temperature=0.7, row_mask=mask, out_dtype=torch.float32
        )
    )
    want = run(reference)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # Triton's interpreter truncates fp32 -> bf16 (contract.py): a bf16 gradient there may be one whole ulp off
    tol = 2.0**-7 if dtype == torch.bfloat16 and INTERPRETER_BF16_TRUNCATES else 1e-3
    torch.testing.assert_close(got[2], want[2], rtol=tol, atol=1e-3)


@pytest.mark.parametrize("trainable", ["hidden", "weight", "bias", "all"])
def test_chunked_logprob_frozen_inputs_and_mixed_dtypes(trl_utils, trainable, gen, device):
    """TRL's tests of its fused LM head: any of hidden / weight / bias frozen (the others' gradients still
    right, the frozen ones None), log-probs + entropy backward together; against fp64 PyTorch."""
    ours = compat.ChunkedLogProb(trl_utils._ChunkedLogProbFunction)
    h, w, b = torch.randn(23, 16, generator=gen), torch.randn(70, 16, generator=gen), torch.randn(70, generator=gen)
    t = torch.randint(0, 70, (23,), generator=gen)

    def run(fn, dtype):
        leaves = [
            a.clone().to(device, dtype).requires_grad_(trainable in (name, "all"))
            for name, a in zip(("hidden", "weight", "bias"), (h, w, b))
        ]
        lp, ent = fn(*leaves)[:2]
        (2.0 * lp + 0.5 * ent).sum().backward()
        return [lp.detach().double().cpu(), ent.detach().double().cpu()] + [
            None if a.grad is None else a.grad.double().cpu() for a in leaves
        ]

    got = run(lambda *a: ours.apply(*a, t.to(device), 0.7, 64, None, 1.0, ("log_probs", "entropy")), torch.float32)

    def reference(hh, ww, bb):
        logp = ((hh @ ww.t() + bb) / 0.7).log_softmax(-1)
        return logp.gather(-1, t.to(device).unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    want = run(reference, torch.float64)
    for g, e in zip(got, want):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_chunked_logprob_under_autocast_and_with_a_bf16_hidden(trl_utils, gen, device):
    """Under autocast the head runs in the autocast dtype: two fp32 hidden states equal once rounded to bf16
    give equal log-probs and weight gradients (TRL's test); a bf16 hidden with an fp32 weight runs in bf16."""
    ours = compat.ChunkedLogProb(trl_utils._ChunkedLogProbFunction)
    hidden = torch.linspace(1.0, 2.0, 17 * 16).reshape(17, 16).to(torch.bfloat16).float().to(device)
    nudged = hidden + 1e-4
    assert torch.equal(hidden.to(torch.bfloat16), nudged.to(torch.bfloat16))
    w = torch.randn(60, 16, generator=gen).to(device)
    t = torch.randint(0, 60, (17,), generator=gen).to(device)
    results = []
    for hh in (hidden, nudged):
        wi = w.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            lp = ours.apply(hh.clone().requires_grad_(), wi, None, t, 1.0, 64)[0]
        lp.sum().backward()
        results.append((lp.detach(), wi.grad))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert results[0][1].dtype == torch.float32

    hb = hidden.to(torch.bfloat16).requires_grad_()  # a leaf: hidden itself never required grad
    wf = w.clone().requires_grad_()
    lp = ours.apply(hb, wf, None, t, 1.0, 64)[0]
    lp.sum().backward()
    ref = (hb.detach().double() @ wf.detach().to(torch.bfloat16).double().t()).log_softmax(-1)
    ref = ref.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    assert lp.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and wf.grad.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- torch.compile, nvtx or not
def _compiled_cases():
    """name -> fn(x, idx) -> a scalar, through one adapter or public function."""
    return {
        "selective_log_softmax": lambda x, i: compat.selective_log_softmax(x, i, 0.7).sum(),
        "selective_log_softmax top-K": lambda x, i: compat.selective_log_softmax(
            x, torch.stack([i, i.flip(-1)], -1)
        ).sum(),
        "entropy_from_logits": lambda x, i: compat.entropy_from_logits(x).sum(),
        "selective_log_softmax_and_entropy": lambda x, i: sum(
            o.sum() for o in compat.selective_log_softmax_and_entropy(x, i, True, 0.8, (i % 3 > 0).long())
        ),
        "verl logprobs_from_logits": lambda x, i: compat.logprobs_from_logits(x, i).sum(),
        "openrlhf log_probs_from_logits": lambda x, i: compat.log_probs_from_logits(x, i, 0.6).sum(),
        "full_kl + kl_estimate": lambda x, i: (
            K.full_kl(x, x.detach().flip(-1)) + K.kl_estimate(K.token_logprobs(x, i), x[..., 0].detach())
        ).sum(),
    }


@pytest.mark.parametrize("nvtx", ["nvtx_installed", "nvtx_absent"])
def test_adapters_compile_fullgraph(nvtx, monkeypatch, gen, device):
    """torch.compile(fullgraph=True), forward and backward, of every adapter (and the public functions under
    them): one graph, no break, the eager values and gradients. Dynamo cannot trace a Triton launcher nor the
    nvtx package: under compile the public functions run their torch.library op, whose body never is traced.
    Both with nvtx (a declared dependency, so importable here) and as if it were not installed."""
    from fastrlhf.kernels import _common

    if nvtx == "nvtx_installed":
        assert _common._nvtx is not None, "nvtx is a declared dependency"
    else:
        monkeypatch.setattr(_common, "_nvtx", None)
    x = (torch.randn(2, 6, 131, generator=gen) * 2).to(device)
    idx = torch.randint(0, 131, (2, 6), generator=gen).to(device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    for name, fn in _compiled_cases().items():
        counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        compiled = torch.compile(fn, backend=counter, fullgraph=True)
        results = []
        for f in (fn, compiled):
            xi = x.detach().requires_grad_()
            loss = f(xi, idx)
            results.append((loss.detach(), torch.autograd.grad(loss, xi)[0]))
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert counter.frame_count == 1, f"{name}: {counter.frame_count} graphs"


# ---------------------------------------------------------------------------------------- the TRL switch
def test_use_in_trl_patches_where_trl_holds_the_names_and_restores(trl_utils, monkeypatch):
    """trl.trainer.utils and a trl module that imported the names by name are switched, a trl module holding
    something else under a name is not, nothing outside trl is touched; restore() (and the context manager)
    puts every original back. Nothing is switched on import."""
    U = trl_utils
    originals = {n: getattr(U, n) for n in ("selective_log_softmax", "entropy_from_logits", "_ChunkedLogProbFunction")}
    assert originals["selective_log_softmax"].__module__ == "trl.trainer.utils", "switched on import?"
    held = types.ModuleType("trl.fake_trainer")  # `from trl.trainer.utils import selective_log_softmax`
    held.selective_log_softmax = U.selective_log_softmax
    held.entropy_from_logits = len  # another object under the name: left alone
    outside = types.ModuleType("not_trl")
    outside.selective_log_softmax = U.selective_log_softmax
    monkeypatch.setitem(sys.modules, "trl.fake_trainer", held)
    monkeypatch.setitem(sys.modules, "not_trl", outside)

    switch = compat.use_in_trl()
    assert (
        U.selective_log_softmax is compat.selective_log_softmax
        and held.selective_log_softmax is compat.selective_log_softmax
    )
    assert U.entropy_from_logits is compat.entropy_from_logits and held.entropy_from_logits is len
    assert U.selective_log_softmax_and_entropy is compat.selective_log_softmax_and_entropy
    assert isinstance(U._ChunkedLogProbFunction, compat.ChunkedLogProb)
    assert outside.selective_log_softmax is originals["selective_log_softmax"]
    switch.restore()
    switch.restore()  # a second restore does nothing
    assert {n: getattr(U, n) for n in originals} == originals
    assert held.selective_log_softmax is originals["selective_log_softmax"]
    with compat.use_in_trl(fused_lm_head=False):
        assert U.selective_log_softmax is compat.selective_log_softmax
        assert U._ChunkedLogProbFunction is originals["_ChunkedLogProbFunction"]
    assert {n: getattr(U, n) for n in originals} == originals


@pytest.mark.parametrize("change", ["renamed_parameter", "missing_name"])
def test_use_in_trl_refuses_an_unknown_layout(change, trl_utils, monkeypatch):
    if change == "renamed_parameter":
        monkeypatch.setattr(trl_utils, "entropy_from_logits", lambda logits, chunk=128: None)
    else:
        monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    before = trl_utils.selective_log_softmax
    with pytest.raises(RuntimeError, match="unknown trl layout"):
        compat.use_in_trl()
    assert trl_utils.selective_log_softmax is before  # nothing half-switched


@pytest.mark.kernels("linear_logprobs.fwd", "linear_logprobs.bwd")
@pytest.mark.parametrize("logit_scale", [1.0, 1.25])
def test_chunked_logprob_matches_trl(trl_utils, logit_scale, gen, device):
    """The fused-LM-head adapter against TRL's ChunkedLogProbFunction (its PyTorch path, CPU, fp32): log-probs,
    entropy and the gradients to hidden, weight and bias; fp64 TRL as the reference, by the contract."""
    from fastrlhf.kernels import _common

    ours = compat.ChunkedLogProb(trl_utils._ChunkedLogProbFunction)
    h = torch.randn(11, 16, generator=gen)
    w = torch.randn(300, 16, generator=gen) * 0.5
    b = torch.randn(300, generator=gen) * 0.1
    t = torch.randint(0, 300, (11,), generator=gen)
    cot = torch.randn(2, 11, generator=gen)

    def run(fn, dtype, dev):
        leaves = [a.clone().to(dev, dtype).requires_grad_() for a in (h, w, b)]
        lp, ent, *rest = fn.apply(*leaves, t.to(dev), 0.7, 64, None, logit_scale, ("log_probs", "entropy"))
        assert rest == [None, None, None]
        loss = (lp * cot[0].to(dev, lp.dtype)).sum() + (ent * cot[1].to(dev, ent.dtype)).sum()
        return [lp.detach().cpu(), ent.detach().cpu(), *(g.cpu() for g in torch.autograd.grad(loss, leaves))]

    launches = _common.LAUNCHES["fastrlhf.linear_logprobs.fwd"]
    got = run(ours, torch.float32, device)
    assert _common.LAUNCHES["fastrlhf.linear_logprobs.fwd"] == launches + 1, "the kernel did not run"
    eager = run(trl_utils._ChunkedLogProbFunction, torch.float32, "cpu")
    ref = run(trl_utils._ChunkedLogProbFunction, torch.float64, "cpu")
    assert got[0].dtype == got[1].dtype == torch.float32  # as TRL's
    for what, g, e, r in zip(["log_probs", "entropy", "grad hidden", "grad weight", "grad bias"], got, eager, ref):
        assert_contract(what, g, e, r)


def test_chunked_logprob_hands_what_it_does_not_compute_to_trl(trl_utils, gen):
    """A soft-cap or an output the kernel does not give: TRL's own function runs, bit for bit."""
    from fastrlhf.kernels import _common

    ours = compat.ChunkedLogProb(trl_utils._ChunkedLogProbFunction)
    h, w, t = (
        torch.randn(5, 8, generator=gen),
        torch.randn(40, 8, generator=gen),
        torch.randint(0, 40, (5,), generator=gen),
    )
    for softcap, outputs in ((30.0, ("log_probs",)), (None, ("log_probs", "entropy", "is_top1"))):
        before = sum(_common.LAUNCHES.values())
        got = ours.apply(h, w, None, t, 1.0, 16, softcap, 1.0, outputs)
        want = trl_utils._ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 16, softcap, 1.0, outputs)
        assert sum(_common.LAUNCHES.values()) == before
        for g, e in zip(got, want):
            assert (g is None and e is None) or torch.equal(g, e)


def _fake_tree(monkeypatch, home_name, function, importers):
    """A package tree in sys.modules: `home_name` defines `function`; each module in `importers` did
    `from home import <name>`. -> (home module, importer modules)."""
    parts = home_name.split(".")
    for k in range(1, len(parts)):
        monkeypatch.setitem(sys.modules, ".".join(parts[:k]), types.ModuleType(".".join(parts[:k])))
    home = types.ModuleType(home_name)
    setattr(home, function.__name__, function)
    monkeypatch.setitem(sys.modules, home_name, home)
    mods = []
    for name in importers:
        mod = types.ModuleType(name)
        setattr(mod, function.__name__, function)
        monkeypatch.setitem(sys.modules, name, mod)
        mods.append(mod)
    return home, mods


def _verl_logprobs_from_logits(logits, labels, inplace_backward=True):  # verl's signature
    return torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _openrlhf_log_probs_from_logits(logits, labels, temperature=1.0):  # OpenRLHF's signature
    return torch.log_softmax(logits / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


_verl_logprobs_from_logits.__name__ = "logprobs_from_logits"
_openrlhf_log_probs_from_logits.__name__ = "log_probs_from_logits"
PEERS = {  # switch, the module that defines the function, a module that imports it by name, the function, ours
    "verl": (
        "use_in_verl",
        "verl.utils.torch_functional",
        "verl.workers.actor.dp_actor",
        _verl_logprobs_from_logits,
        "logprobs_from_logits",
    ),
    "openrlhf": (
        "use_in_openrlhf",
        "openrlhf.models.utils",
        "openrlhf.models.actor",
        _openrlhf_log_probs_from_logits,
        "log_probs_from_logits",
    ),
}


@pytest.mark.parametrize("peer", PEERS)
def test_use_in_verl_and_openrlhf_on_their_layout(peer, monkeypatch, gen):
    """Against a module tree laid out as the peer's source is (neither is installed here): the defining module
    and the actor that imported the name are switched, and restored; the switched call computes the peer's
    values; a renamed parameter is refused with nothing patched."""
    switch_name, home_name, actor_name, original, ours_name = PEERS[peer]
    home, (actor,) = _fake_tree(monkeypatch, home_name, original, [actor_name])
    ours = getattr(compat, ours_name)
    with getattr(compat, switch_name)() as switch:
        assert getattr(home, ours_name) is ours and getattr(actor, ours_name) is ours
        assert len(switch.patched) == 2
        x, lab = torch.randn(2, 3, 50, generator=gen), torch.randint(0, 50, (2, 3), generator=gen)
        torch.testing.assert_close(getattr(actor, ours_name)(x, lab), original(x, lab), rtol=1e-5, atol=1e-6)
    assert getattr(home, ours_name) is original and getattr(actor, ours_name) is original

    def renamed(logits, target, flag=True):
        return None

    monkeypatch.setattr(home, ours_name, renamed)
    with pytest.raises(RuntimeError, match=f"unknown {peer} layout"):
        getattr(compat, switch_name)()
    assert getattr(home, ours_name) is renamed


def test_use_in_verl_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)  # an import of verl raises ImportError
    with pytest.raises(ImportError, match="cannot switch verl over"):
        compat.use_in_verl()


# -------------------------------------------------------------------------------------------- example
def test_grpo_trainer_runs_fastrlhf_with_the_switch(monkeypatch):
    """TRL's own GRPOTrainer, 3 steps on a tiny random Llama, as TRL ships and after `compat.use_in_trl()`
    (examples/trl_drop_in.py, run in this process). Our kernels ran only in the second run (forward for the
    policy and the reference model, backward for the policy), and TRL's logged loss, KL and entropy agree
    step by step within `example.agree` (its docstring derives the bound from the contract)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("trl_drop_in_example", REPO / "examples" / "trl_drop_in.py")
    example = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(example)
    except SystemExit:  # it exits 0 with "SKIP: ..." when TRL's trainer cannot be imported
        pytest.skip("TRL's GRPOTrainer cannot be imported (trl or its optional dependencies missing)")
    import trl.trainer.utils as U

    runs = example.run_both()
    (trl_logs, trl_launches), (fast_logs, fast_launches) = runs["trl"], runs["fastrlhf"]
    assert not trl_launches, f"fastrlhf ran without the switch: {trl_launches}"
    steps = example.STEPS
    assert fast_launches["fastrlhf.linear_logprobs.fwd"] == 2 * steps  # policy + reference model, each step
    assert fast_launches["fastrlhf.linear_logprobs.bwd"] == steps
    assert len(trl_logs) == len(fast_logs) == steps
    assert trl_logs[-1]["kl"] > 1e-3, "the policy must move for the comparison to mean anything"
    for c in example.COLUMNS:
        a, b = [x[c] for x in trl_logs], [x[c] for x in fast_logs]
        assert example.agree(a, b), f"{c}: TRL {a} vs fastrlhf {b}"
        assert not example.agree(a, [v + 1e-3 * max(1.0, abs(v)) for v in a]), "the bound must reject a 1e-3 error"
    assert not isinstance(U._ChunkedLogProbFunction, compat.ChunkedLogProb)  # the switch was undone
