"""linear_logprobs / linear_full_kl (hidden states + LM head, no [N, V] logits): precision contract,
adversarial inputs, gradients of hidden / weight / bias, bad input, and agreement with token_logprobs /
full_kl on materialised logits. Shapes stay tiny: on CPU every program runs in Triton's interpreter."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from contract import assert_contract, intermediate_rounding, max_err

from fastrlhf.kernels import full_kl, full_kl_ref, token_logprobs, token_logprobs_ref, use_triton
from fastrlhf.kernels import linear_full_kl, linear_full_kl_ref, linear_logprobs, linear_logprobs_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
H, V = 72, 1003  # H: two H blocks on CPU, the last partial; V = 1000 + 3: several vocab tiles and ranges
H_SMALL, V_SMALL = 40, 515  # one partial H block; 512 + 3: a last tile of 3 columns. A third of the interpreter's time
LARGE_CASES = ("random", "row_blocks", "last_partial_tile")  # the cases on (H, V); the others on the small sizes


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """The interpreter's tl.dot is a numpy matmul of one small tile: BLAS threads only contend (4x slower)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def head(gen, V, H, dtype, device, bias=True, offset=0.0, scale=3.0):
    """A (V, H) weight giving logits of std ~scale for unit hidden states, and a (V,) bias (leaves)."""
    w = (torch.randn(V, H, generator=gen) * (scale / H**0.5)).to(dtype).to(device).requires_grad_()
    b = (torch.randn(V, generator=gen) + offset).to(dtype).to(device).requires_grad_() if bias else None
    return w, b


def leaves(*ts):
    return [t for t in ts if t is not None]


def detached(ts, dtype=None):
    """Fresh leaves with the same (already rounded) values, optionally upcast."""
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in ts]


def eager(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100, return_entropy=True):
    """The common idiom: logits = F.linear(...), log_softmax(z / T).gather(...); returns
    (logp, entropy) whatever return_entropy says (it is there to share linear_logprobs' signature)."""
    log_p = torch.log_softmax(F.linear(hidden, weight, bias) / temperature, dim=-1)
    active = targets != ignore_index
    lp = log_p.gather(-1, torch.where(active, targets, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(log_p.exp() * log_p).sum(-1)
    return torch.where(active, lp, 0), torch.where(active, ent, 0)


def inherited_from_grad_z(view, hidden64, weight64, grad_z64, dtype):
    """What the hidden / weight / bias gradients inherit from the kernels' one intermediate rounding: grad_z
    (d loss / d logits, (..., V)) is stored in the input dtype for the cuBLAS products grad_hidden = grad_z @ W
    and grad_W = grad_z^T @ hidden (bias: summed in fp32 from the unrounded values, nothing inherited)."""
    dz = intermediate_rounding(grad_z64, dtype)  # (..., V)
    H = hidden64.shape[-1]
    on_hidden = torch.zeros_like(hidden64)
    view(on_hidden).copy_(dz @ weight64.abs())
    on_weight = dz.reshape(-1, dz.shape[-1]).t() @ view(hidden64).reshape(-1, H).abs()
    return on_hidden, on_weight, 0.0


def logits_grad64(view, hidden64, weight64, bias64, loss_of_logits):
    """d loss / d logits in fp64, the logits materialised from the fp64 head: (..., V)."""
    z = F.linear(view(hidden64.detach()), weight64.detach(), None if bias64 is None else bias64.detach())
    z = z.requires_grad_()
    (grad,) = torch.autograd.grad(loss_of_logits(z), z)
    return grad


def make_case(case, gen, dtype, device):
    """-> hidden leaf, view(hidden) to pass, weight, bias, targets, temperature."""
    B, T, v, h_dim = 3, 7, *((V, H) if case in LARGE_CASES else (V_SMALL, H_SMALL))
    temperature, offset, bias = 1.0, 0.0, True
    if case == "odd_vocab_257":
        v, h_dim, bias = 257, 40, False
    elif case == "row_blocks":  # 36 rows: a full and a partial row block
        B, T = 4, 9
    elif case in ("offset_plus20", "offset_minus20", "all_negative"):
        offset = {"offset_plus20": 20.0, "offset_minus20": -20.0, "all_negative": -60.0}[case]
    elif case == "temperature":
        temperature = 0.7
    elif case == "no_bias":
        bias = False
    x = torch.randn(B, T + (case == "strided"), h_dim, generator=gen)
    t = torch.randint(0, v, (B, T), generator=gen)
    w, b = head(gen, v, h_dim, dtype, device, bias=bias, offset=offset)
    if case == "last_partial_tile":
        t[:, ::2] = v - 1 - torch.randint(0, 5, t[:, ::2].shape, generator=gen)
    elif case == "masked_rows":
        t[torch.rand(B, T, generator=gen) < 0.4] = -100
    elif case == "confident":  # hidden along its target's weight row: z_t ~ 40 above the rest, p_t -> 1
        w_unit = F.normalize(w.detach().float().cpu(), dim=-1)
        x = 40 * w_unit[t] + 0.1 * x
        with torch.no_grad():
            w.copy_(w_unit.to(dtype))
    leaf = x.to(dtype).to(device).requires_grad_()
    view = (lambda h: h[:, :-1]) if case == "strided" else (lambda h: h)  # a non-contiguous view, no copy
    return leaf, view, w, b, t.to(device), temperature


CASES = [
    "random",
    "odd_vocab_257",
    "row_blocks",
    "last_partial_tile",
    "confident",
    "offset_plus20",
    "offset_minus20",
    "all_negative",
    "masked_rows",
    "temperature",
    "strided",
    "no_bias",
]


@pytest.mark.kernels("linear_logprobs.fwd", "linear_logprobs.bwd")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_contract_forward_backward(case, dtype, gen, device):
    hidden, view, w, b, t, temp = make_case(case, gen, dtype, device)
    g_lp = torch.randn(t.shape, generator=gen).to(device)
    g_ent = torch.randn(t.shape, generator=gen).to(device)

    def run(fn, h, w, b, gl, ge):
        lp, ent = fn(view(h), w, t, bias=b, temperature=temp, return_entropy=True)
        return lp, ent, torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), leaves(h, w, b))

    lp, ent, grads = run(linear_logprobs, hidden, w, b, g_lp, g_ent)
    ins64 = detached([hidden, w, b], torch.float64)  # the fp64 oracle, on the same rounded inputs
    lp64, ent64, grads64 = run(linear_logprobs_ref, *ins64, g_lp.double(), g_ent.double())
    lp_e, ent_e, grads_e = run(eager, *detached([hidden, w, b], torch.float32), g_lp, g_ent)  # eager fp32

    def loss64(z):
        lp, ent = token_logprobs_ref(z, t, temperature=temp, return_entropy=True)
        return (lp * g_lp.double()).sum() + (ent * g_ent.double()).sum()

    grad_z64 = logits_grad64(view, *ins64, loss64)
    inherited = inherited_from_grad_z(view, ins64[0].detach(), ins64[1].detach(), grad_z64, dtype)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == t.shape
    assert_contract(f"{case} {dtype} logp", lp, lp_e, lp64)
    assert_contract(f"{case} {dtype} entropy", ent, ent_e, ent64)
    for name, g, g_e, g64, inh in zip(["hidden", "weight", "bias"], grads, grads_e, grads64, inherited):
        assert g.dtype == dtype and g.shape == g64.shape
        assert_contract(f"{case} {dtype} grad {name}", g, g_e, g64, inherited=inh)
    if case == "masked_rows":
        ignored = t == -100
        assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (view(grads[0])[ignored] == 0).all()


@pytest.mark.parametrize("h_dim", [576, 2048])
def test_fp32_logits_within_an_ulp_whatever_h(h_dim, gen, device):
    """fp32 inputs: each H slice's products are summed apart and added with TwoSum, so logp stays within ~1 ulp
    of the largest logit at any H (here 1.05 / 1.13). Without it: 4.8 / 11.3 ulps under tests/gpu_math.py's
    model of the GPU's tl.dot (one FMA chain over H), 2.1 / 3.6 with the interpreter's BLAS sums."""
    N, V = 32, 256
    x = (torch.randn(N, h_dim, generator=gen) * 8).to(device)
    w, b = (p.detach() for p in head(gen, V, h_dim, torch.float32, device))  # logits up to ~90
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    lp, ent = linear_logprobs(x, w, t, bias=b, return_entropy=True)
    lp64, ent64 = linear_logprobs_ref(x.double(), w.double(), t, bias=b.double(), return_entropy=True)
    ulp = torch.finfo(torch.float32).eps * F.linear(x.double(), w.double(), b.double()).abs().max().item()
    errors = max_err(lp, lp64) / ulp, max_err(ent, ent64) / ulp
    assert max(errors) <= 2, f"logp, entropy errors {errors} ulps of the largest logit"


@pytest.mark.parametrize("which", ["logp_only", "entropy_only", "no_entropy", "frozen_head", "frozen_hidden"])
def test_partial_gradients(which, gen, device):
    """One upstream gradient, or only some inputs requiring grad (a frozen LM head: no grad_weight work)."""
    x = torch.randn(4, 5, 40, generator=gen).to(device).requires_grad_(which != "frozen_hidden")
    w, b = head(gen, 301, 40, torch.float32, device)
    w.requires_grad_(which != "frozen_head")
    b.requires_grad_(which != "frozen_head")
    t = torch.randint(0, 301, (4, 5), generator=gen).to(device)
    ins, ins64 = [x, w, b], detached([x, w, b], torch.float64)
    outs = []
    for fn, (h_, w_, b_) in [(linear_logprobs, ins), (linear_logprobs_ref, ins64)]:
        if which == "no_entropy":
            out = fn(h_, w_, t, bias=b_, temperature=0.7)
        else:
            out = fn(h_, w_, t, bias=b_, temperature=0.7, return_entropy=True)[1 if which == "entropy_only" else 0]
        outs.append(out)
    g = torch.randn(t.shape, generator=gen).to(device)
    want = [i for i, v in enumerate(ins) if v.requires_grad]
    grads = torch.autograd.grad((outs[0] * g).sum(), [ins[i] for i in want])
    grads64 = torch.autograd.grad((outs[1] * g.double()).sum(), [ins64[i] for i in want])
    assert max_err(outs[0], outs[1]) < 1e-5
    for g_, g64 in zip(grads, grads64):
        assert max_err(g_, g64) < 1e-5 * max(1.0, g64.abs().max().item())


def test_ignored_rows_read_nothing(gen, device):
    """Ignored rows may hold garbage (NaN): outputs 0, and no NaN reaches any gradient. The first row block
    (32 rows on CPU) is entirely ignored and skipped."""
    x = torch.randn(40, 24, generator=gen)
    t = torch.randint(0, 150, (40,), generator=gen)
    t[:34] = -100
    x[:34:3] = float("nan")
    x = x.to(device).requires_grad_()
    w, b = head(gen, 150, 24, torch.float32, device)
    t = t.to(device)
    lp, ent = linear_logprobs(x, w, t, bias=b, return_entropy=True)
    grads = torch.autograd.grad(lp.sum() + ent.sum(), [x, w, b])
    assert (lp[:34] == 0).all() and (ent[:34] == 0).all() and (grads[0][:34] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)
    keep = slice(34, None)
    x64, w64, b64 = detached([x[keep], w, b], torch.float64)
    lp64, ent64 = linear_logprobs_ref(x64, w64, t[keep], bias=b64, return_entropy=True)
    grads64 = torch.autograd.grad(lp64.sum() + ent64.sum(), [x64, w64, b64])
    assert max_err(lp[keep], lp64) < 1e-5 and max_err(grads[1], grads64[1]) < 1e-5


def test_no_grad_path_saves_nothing(gen, device):
    x = torch.randn(6, 16, generator=gen).to(device).requires_grad_()
    w, b = head(gen, 97, 16, torch.float32, device)
    t = torch.randint(0, 97, (6,), generator=gen).to(device)
    with torch.no_grad():
        lp, ent = linear_logprobs(x, w, t, bias=b, return_entropy=True)
        kl = linear_full_kl(x, w, x, w.detach() + 0.01)
    assert lp.grad_fn is None and ent.grad_fn is None and kl.grad_fn is None and not lp.requires_grad
    plain = linear_logprobs(x.detach(), w.detach(), t, bias=b.detach())
    assert plain.grad_fn is None
    torch.testing.assert_close(lp, plain, rtol=0, atol=0)


def test_backward_saves_only_row_statistics(gen, device):
    N, Hd, Vv = 8, 16, 513
    x = torch.randn(N, Hd, generator=gen).to(device).requires_grad_()
    w, b = head(gen, Vv, Hd, torch.float32, device)
    t = torch.randint(0, Vv, (N,), generator=gen).to(device)
    lp, _ = linear_logprobs(x, w, t, bias=b, return_entropy=True)
    kl = linear_full_kl(x, w, x.detach(), w.detach(), bias=b)
    inputs = {x.data_ptr(), w.data_ptr(), b.data_ptr(), t.data_ptr()}
    for out in (lp, kl):
        saved = [s for s in out.grad_fn.saved_tensors if s is not None]
        assert all(s.data_ptr() in inputs or s.numel() <= 4 * N for s in saved), [tuple(s.shape) for s in saved]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="65,536+ rows: minutes in the interpreter")
def test_many_rows(gen, device):
    """>= 65,536 rows: rows live on grid axis 0 with int64 offsets."""
    N, Hd, Vv = 65536 + 37, 64, 300
    x = torch.randn(N, Hd, generator=gen).to(device).requires_grad_()
    w, b = head(gen, Vv, Hd, torch.float32, device)
    t = torch.randint(0, Vv, (N,), generator=gen).to(device)
    g = torch.randn(N, generator=gen).to(device)
    lp, ent = linear_logprobs(x, w, t, bias=b, return_entropy=True)
    grads = torch.autograd.grad((lp * g).sum() + ent.sum(), [x, w, b])
    ins64 = detached([x, w, b], torch.float64)
    lp64, ent64 = linear_logprobs_ref(ins64[0], ins64[1], t, bias=ins64[2], return_entropy=True)
    grads64 = torch.autograd.grad((lp64 * g.double()).sum() + ent64.sum(), ins64)
    assert max_err(lp, lp64) < 1e-4 and max_err(ent, ent64) < 1e-4
    for g_, g64 in zip(grads, grads64):
        assert max_err(g_, g64) < 1e-5 * max(1.0, g64.abs().max().item())


def test_gradcheck_fp64(gen, device):
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(19, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(19, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randint(0, 19, (2, 3), generator=gen).to(device)
    t[0, 1] = -100
    rx = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).to(device)
    rw = torch.randn(19, 4, generator=gen, dtype=torch.float64).to(device)
    mask = t != -100

    def f(x, w, b):
        lp, ent = linear_logprobs(x, w, t, bias=b, temperature=0.5, return_entropy=True)
        return lp, ent, linear_full_kl(x, w, rx, rw, bias=b, temperature=0.5, mask=mask)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_kernel_path_is_triton_not_reference(monkeypatch, device):
    """On CPU the tests must exercise the interpreter, not the *_ref fallback."""
    assert use_triton(torch.empty(1, device=device))

    def boom(*a, **k):
        raise AssertionError("reference path taken")

    monkeypatch.setattr(importlib.import_module("fastrlhf.kernels.linear_logprobs"), "linear_logprobs_ref", boom)
    monkeypatch.setattr(importlib.import_module("fastrlhf.kernels.linear_full_kl"), "linear_full_kl_ref", boom)
    x, w = torch.randn(2, 16, device=device), torch.randn(40, 16, device=device)
    linear_logprobs(x, w, torch.tensor([1, 2], device=device))
    linear_full_kl(x, w, x, w)


def test_reference_chunks_agree_with_one_chunk(monkeypatch, gen, device):
    """The *_ref twins' row chunking (and recompute-in-backward) changes no number beyond rounding."""
    module = importlib.import_module("fastrlhf.kernels._linear")  # both twins chunk through its by_chunks
    x = torch.randn(5, 7, 24, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w, b = (t.detach().double().requires_grad_() for t in head(gen, 50, 24, torch.float32, device))
    t = torch.randint(0, 50, (5, 7), generator=gen).to(device)
    rx = torch.randn(5, 7, 8, generator=gen, dtype=torch.float64).to(device)
    rw = torch.randn(50, 8, generator=gen, dtype=torch.float64).to(device)
    results = []
    for rows in (1024, 4):
        monkeypatch.setattr(module, "REF_CHUNK_ROWS", rows)
        lp, ent = linear_logprobs_ref(x, w, t, bias=b, temperature=0.7, return_entropy=True)
        kl = linear_full_kl_ref(x, w, rx, rw, bias=b, temperature=0.7)
        results.append([lp, ent, kl, *torch.autograd.grad(lp.sum() + ent.sum() + kl.sum(), [x, w, b])])
    for one, chunked in zip(*results):
        torch.testing.assert_close(chunked, one, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------- bad input
def test_out_of_range_target_gives_nan_row_only(gen, device):
    x = torch.randn(5, 16, generator=gen).to(device).requires_grad_()
    w, b = head(gen, 40, 16, torch.float32, device)
    t = torch.tensor([3, 40, -7, 0, -100], device=device)
    lp, ent = linear_logprobs(x, w, t, bias=b, return_entropy=True)
    assert torch.isnan(lp[1]) and torch.isnan(lp[2]) and torch.isfinite(lp[[0, 3]]).all() and lp[4] == 0
    assert torch.isfinite(ent[:4]).all()
    torch.testing.assert_close(lp, linear_logprobs_ref(x.detach(), w.detach(), t, bias=b.detach()), equal_nan=True)
    (grad,) = torch.autograd.grad(lp.nansum(), x)
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 3, 4]]).all()


def test_nan_hidden_gives_nan_row_only(gen, device):
    x = torch.randn(4, 16, generator=gen).to(device)
    x[2, 7] = float("nan")
    w, _ = head(gen, 33, 16, torch.float32, device)
    lp, ent = linear_logprobs(x, w.detach(), torch.tensor([1, 2, 3, 4], device=device), return_entropy=True)
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])
    assert torch.isfinite(lp[[0, 1, 3]]).all() and torch.isfinite(ent[[0, 1, 3]]).all()


def _args(d, hidden=(2, 3, 8), weight=(5, 8), targets=(2, 3), bias=None, hdt=torch.float32, wdt=None, tdt=torch.long):
    h = torch.randn(hidden, device=d).to(hdt)
    w = torch.randn(weight, device=d).to(wdt or hdt)
    b = None if bias is None else torch.randn(bias, device=d)
    return h, w, torch.zeros(targets, dtype=tdt, device=d), b


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda d: _args(d, weight=(5, 9)), ValueError, ["weight", "(5, 9)", "(2, 3, 8)"]),
        (lambda d: _args(d, weight=(5, 8, 1)), ValueError, ["weight", "(V, H)"]),
        (lambda d: _args(d, targets=(2, 4)), ValueError, ["targets", "(2, 3)", "(2, 4)"]),
        (lambda d: _args(d, tdt=torch.float32), TypeError, ["targets", "integer", "float32"]),
        (lambda d: _args(d, hdt=torch.long), TypeError, ["hidden", "floating", "int64"]),
        (lambda d: _args(d, wdt=torch.bfloat16), TypeError, ["weight", "dtype", "bfloat16", "float32"]),
        (lambda d: _args(d, bias=(4,)), ValueError, ["bias", "(5,)", "(4,)"]),
        (
            lambda d: (*_args(d)[:2], torch.zeros(2, 3, dtype=torch.long, device="meta"), None),
            ValueError,
            ["one device", "meta"],
        ),
    ],
    ids=[
        "hidden_dim",
        "weight_rank",
        "targets_shape",
        "float_targets",
        "int_hidden",
        "weight_dtype",
        "bias_shape",
        "devices",
    ],
)
def test_bad_input_messages(make, exc, words, device):
    hidden, weight, targets, bias = make(device)
    for fn in (linear_logprobs, linear_logprobs_ref):
        with pytest.raises(exc) as info:
            fn(hidden, weight, targets, bias=bias)
        for word in words:
            assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(ref_weight=(6, 4)), ValueError, ["ref_weight", "vocabulary", "5"]),
        (dict(ref_hidden=(2, 4, 4)), ValueError, ["ref_hidden", "(2, 3, 4)", "(2, 4, 4)"]),
        (dict(mask=(3, 2)), ValueError, ["mask", "(2, 3)"]),
        (dict(mask_dtype=torch.float32), TypeError, ["mask", "bool"]),
        (dict(ref_dtype=torch.float64), TypeError, ["fp64", "both heads"]),
        (dict(ref_bias=(4,)), ValueError, ["ref_bias", "(5,)"]),
    ],
    ids=["ref_vocab", "ref_hidden_shape", "mask_shape", "mask_dtype", "fp64_one_head", "ref_bias_shape"],
)
def test_kl_bad_input_messages(kwargs, exc, words, device):
    h, w, _, _ = _args(device)
    rdt = kwargs.get("ref_dtype", torch.float32)
    rh = torch.randn(kwargs.get("ref_hidden", (2, 3, 4)), device=device).to(rdt)
    rw = torch.randn(kwargs.get("ref_weight", (5, 4)), device=device).to(rdt)
    rb = torch.randn(kwargs["ref_bias"], device=device) if "ref_bias" in kwargs else None
    mask = torch.ones(kwargs.get("mask", (2, 3)), device=device).to(kwargs.get("mask_dtype", torch.bool))
    for fn in (linear_full_kl, linear_full_kl_ref):
        with pytest.raises(exc) as info:
            fn(h, w, rh, rw, ref_bias=rb, mask=mask)
        for word in words:
            assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature, device):
    h, w, t, _ = _args(device)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(h, w, t, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        linear_full_kl(h, w, h, w, temperature=temperature)


# ----------------------------------------------------------------------- agreement with logits kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_agrees_with_token_logprobs_on_materialised_logits(dtype, gen, device):
    """Same numbers as fp32 logits = hidden @ W.T + b fed to token_logprobs (which then costs N x V)."""
    x = torch.randn(3, 9, H, generator=gen).to(dtype).to(device).requires_grad_()
    w, b = head(gen, V, H, dtype, device)
    t = torch.randint(0, V, (3, 9), generator=gen).to(device)
    t[1, :4] = -100
    lp, ent = linear_logprobs(x, w, t, bias=b, temperature=0.8, return_entropy=True)
    grads = torch.autograd.grad(lp.sum() + 0.5 * ent.sum(), [x, w, b])
    x_, w_, b_ = detached([x, w, b], torch.float32)
    lp_m, ent_m = token_logprobs(F.linear(x_, w_, b_), t, temperature=0.8, return_entropy=True)
    grads_m = torch.autograd.grad(lp_m.sum() + 0.5 * ent_m.sum(), [x_, w_, b_])
    torch.testing.assert_close(lp, lp_m, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent, ent_m, rtol=1e-5, atol=2e-5)
    for g, g_m in zip(grads, grads_m):  # ours rounds grad_z (bf16) once before the gradient matmuls
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(g.float(), g_m.to(dtype).float(), rtol=tol, atol=tol * g_m.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_agrees_with_full_kl_on_materialised_logits(dtype, gen, device):
    x = torch.randn(3, 9, H, generator=gen).to(dtype).to(device).requires_grad_()
    w, b = head(gen, V, H, dtype, device)
    rx = torch.randn(3, 9, 40, generator=gen).to(dtype).to(device)
    rw, rb = head(gen, V, 40, dtype, device)
    mask = torch.rand(3, 9, generator=gen).to(device) > 0.3
    kl = linear_full_kl(x, w, rx, rw, bias=b, ref_bias=rb, temperature=0.8, mask=mask)
    grads = torch.autograd.grad(kl.sum(), [x, w, b])
    x_, w_, b_ = detached([x, w, b], torch.float32)
    ref_logits = F.linear(rx.float(), rw.detach().float(), rb.detach().float())
    kl_m = full_kl(F.linear(x_, w_, b_), ref_logits, temperature=0.8, mask=mask)
    grads_m = torch.autograd.grad(kl_m.sum(), [x_, w_, b_])
    torch.testing.assert_close(kl, kl_m, rtol=1e-5, atol=1e-5)
    for g, g_m in zip(grads, grads_m):
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(g.float(), g_m.to(dtype).float(), rtol=tol, atol=tol * g_m.abs().max().item())


# -------------------------------------------------------------------------------------- linear_full_kl
def eager_kl(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, temperature=1.0, mask=None):
    """The textbook formula: sum p (log p - log q) from two materialised log-softmaxes."""
    log_p = torch.log_softmax(F.linear(hidden, weight, bias) / temperature, dim=-1)
    log_q = torch.log_softmax(F.linear(ref_hidden, ref_weight, ref_bias) / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl if mask is None else torch.where(mask, kl, 0)


KL_CASES = ["random", "near_equal", "identical", "masked", "temperature", "offset_plus20", "strided", "confident"]


@pytest.mark.kernels("linear_full_kl.fwd", "linear_full_kl.bwd")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KL_CASES)
def test_kl_contract_forward_backward(case, dtype, gen, device):
    B, T, v, h_dim = 3, 7, *((V, H) if case in LARGE_CASES else (V_SMALL, H_SMALL))
    x = torch.randn(B, T + (case == "strided"), h_dim, generator=gen)
    offset = 20.0 if case == "offset_plus20" else 0.0
    w, b = head(gen, v, h_dim, dtype, device, offset=offset)
    if case in ("near_equal", "identical"):  # the reference head: the policy's, nudged (or not)
        rx = x.clone()
        nudge = 0.0 if case == "identical" else 2e-3
        rw = (w.detach().float() + nudge * torch.randn(v, h_dim, generator=gen).to(device)).to(dtype)
        rb = (b.detach().float() + nudge * torch.randn(v, generator=gen).to(device)).to(dtype)
    else:
        rx = torch.randn(B, T + (case == "strided"), 24, generator=gen)  # another hidden size
        rw, rb = (t.detach() for t in head(gen, v, 24, dtype, device, offset=offset))
    if case == "confident":  # both heads sure of (different) tokens
        x = x * 8
    x, rx = x.to(dtype).to(device).requires_grad_(), rx.to(dtype).to(device)
    view = (lambda h: h[:, :-1]) if case == "strided" else (lambda h: h)
    temp = 0.7 if case == "temperature" else 1.0
    mask = (torch.rand(B, T, generator=gen) > 0.4).to(device) if case == "masked" else None
    g_kl = torch.randn(B, T, generator=gen).to(device)

    def run(fn, h, w, b, rh, rw, rb, g):
        kl = fn(view(h), w, view(rh), rw, bias=b, ref_bias=rb, temperature=temp, mask=mask)
        return kl, torch.autograd.grad((kl * g).sum(), [h, w, b])

    kl, grads = run(linear_full_kl, x, w, b, rx, rw, rb, g_kl)
    ins64 = detached([x, w, b], torch.float64) + [t.double() for t in (rx, rw, rb)]
    kl64, grads64 = run(linear_full_kl_ref, *ins64, g_kl.double())
    kl_e, grads_e = run(eager_kl, *detached([x, w, b], torch.float32), rx.float(), rw.float(), rb.float(), g_kl)

    ref_logits64 = F.linear(view(ins64[3]), ins64[4], ins64[5])
    grad_z64 = logits_grad64(
        view, *ins64[:3], lambda z: (full_kl_ref(z, ref_logits64, temperature=temp, mask=mask) * g_kl.double()).sum()
    )
    inherited = inherited_from_grad_z(view, ins64[0].detach(), ins64[1].detach(), grad_z64, dtype)
    assert kl.dtype == torch.float32 and kl.shape == (B, T)
    assert_contract(f"{case} {dtype} kl", kl, kl_e, kl64)
    for name, g, g_e, g64, inh in zip(["hidden", "weight", "bias"], grads, grads_e, grads64, inherited):
        assert g.dtype == dtype
        assert_contract(f"{case} {dtype} grad {name}", g, g_e, g64, inherited=inh)
    if case == "identical":
        assert (kl == 0).all() and all((g == 0).all() for g in grads)
    if case == "near_equal":  # relative accuracy where the textbook formula cancels
        assert max_err(kl, kl64) <= 1e-3 * kl64.abs().max().item()
    if case == "masked":
        assert (kl[~mask] == 0).all() and (view(grads[0])[~mask] == 0).all()
