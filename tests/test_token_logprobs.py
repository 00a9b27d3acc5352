"""token_logprobs: precision contract, adversarial inputs, gradients, bad input, outside agreement."""

from __future__ import annotations

import importlib

import pytest
import torch
from contract import assert_contract, mask_vocab, max_err

import fastrlhf.kernels as K
from fastrlhf.kernels import token_logprobs, token_logprobs_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def eager(logits, targets, temperature=1.0, ignore_index=-100):
    """The common idiom: log_softmax(z / T).gather(...), entropy from the same."""
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    active = targets != ignore_index
    lp = log_p.gather(-1, torch.where(active, targets, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(log_p.exp() * torch.where(torch.isinf(log_p), 0, log_p)).sum(-1)  # 0 log 0 = 0 at a -inf logit
    return torch.where(active, lp, 0), torch.where(active, ent, 0)


def make_case(case: str, gen: torch.Generator, dtype: torch.dtype, device):
    """-> logits (leaf, requires grad; may be a strided view's base), the view to pass, targets, T."""
    B, T, V = 3, 7, 2053
    temperature = 1.0
    x = torch.randn(B, T, V, generator=gen) * 3
    t = torch.randint(0, V, (B, T), generator=gen)
    if case == "last_partial_block":
        t[:, ::2] = V - 1 - torch.randint(0, 5, t[:, ::2].shape, generator=gen)
    elif case == "confident":  # p_target -> 1: the 1 - p cancellation case
        x.scatter_(-1, t.unsqueeze(-1), 40.0)
    elif case == "all_negative":
        x = x - 60.0
    elif case == "offset_plus20":
        x = x + 20.0
    elif case == "offset_minus20":
        x = x - 20.0
    elif case == "masked_rows":
        t[torch.rand(B, T, generator=gen) < 0.4] = -100
    elif case == "masked_vocab":
        mask_vocab(x, t)
    elif case == "temperature":
        temperature = 0.7
    elif case == "wide_vocab":
        V = 32000
        x = torch.randn(2, 3, V, generator=gen) * 4
        t = torch.randint(0, V, (2, 3), generator=gen)
    leaf = x.to(dtype).to(device).requires_grad_()
    if case == "strided":  # logits[:, :-1] against targets[:, 1:], no copy
        return leaf, leaf[:, :-1], t[:, 1:].to(device), temperature
    return leaf, leaf, t.to(device), temperature


CASES = [
    "random",
    "last_partial_block",
    "confident",
    "all_negative",
    "offset_plus20",
    "offset_minus20",
    "masked_rows",
    "masked_vocab",
    "temperature",
    "strided",
    "wide_vocab",
]


@pytest.mark.kernels("token_logprobs.fwd", "token_logprobs.bwd")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_contract_forward_backward(case, dtype, gen, device, tiles):
    leaf, x, t, temp = make_case(case, gen, dtype, device)
    g_lp = torch.randn(t.shape, generator=gen).to(device)
    g_ent = torch.randn(t.shape, generator=gen).to(device)

    lp, ent = token_logprobs(x, t, temperature=temp, return_entropy=True)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == t.shape
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), leaf)

    leaf64 = leaf.detach().double().requires_grad_()
    x64 = leaf64[:, :-1] if case == "strided" else leaf64
    lp64, ent64 = token_logprobs_ref(x64, t, temperature=temp, return_entropy=True)
    (grad64,) = torch.autograd.grad((lp64 * g_lp.double()).sum() + (ent64 * g_ent.double()).sum(), leaf64)

    leaf_e = leaf.detach().float().requires_grad_()  # eager fp32 on the same (rounded) inputs
    lp_e, ent_e = eager(leaf_e[:, :-1] if case == "strided" else leaf_e, t, temp)
    (grad_e,) = torch.autograd.grad((lp_e * g_lp).sum() + (ent_e * g_ent).sum(), leaf_e)

    assert_contract(f"{case} {dtype} logp", lp, lp_e, lp64)
    assert_contract(f"{case} {dtype} entropy", ent, ent_e, ent64)
    assert grad.dtype == dtype
    assert_contract(f"{case} {dtype} grad", grad, grad_e, grad64)
    if case == "masked_rows":
        ignored = t == -100
        assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
        assert (grad[ignored] == 0).all()


@pytest.mark.parametrize("which", ["logp_only", "entropy_only", "no_entropy_requested"])
def test_backward_with_one_upstream_gradient(which, gen, device):
    x = (torch.randn(4, 5, 301, generator=gen) * 2).to(device).requires_grad_()
    t = torch.randint(0, 301, (4, 5), generator=gen).to(device)
    x64 = x.detach().double().requires_grad_()
    if which == "no_entropy_requested":
        out, out64 = token_logprobs(x, t, temperature=0.7), token_logprobs_ref(x64, t, temperature=0.7)
    else:
        pick = 0 if which == "logp_only" else 1
        out = token_logprobs(x, t, temperature=0.7, return_entropy=True)[pick]
        out64 = token_logprobs_ref(x64, t, temperature=0.7, return_entropy=True)[pick]
    g = torch.randn(out.shape, generator=gen).to(device)
    (grad,) = torch.autograd.grad((out * g).sum(), x)
    (grad64,) = torch.autograd.grad((out64 * g.double()).sum(), x64)
    assert max_err(grad, grad64) < 1e-6


def test_no_grad_path_saves_nothing(gen, device):
    x = torch.randn(6, 97, generator=gen).to(device).requires_grad_()
    t = torch.randint(0, 97, (6,), generator=gen).to(device)
    with torch.no_grad():
        lp, ent = token_logprobs(x, t, return_entropy=True)
    assert lp.grad_fn is None and not lp.requires_grad and ent.grad_fn is None
    lp_plain = token_logprobs(x.detach(), t)
    assert lp_plain.grad_fn is None
    torch.testing.assert_close(lp, lp_plain, rtol=0, atol=0)


def test_backward_saves_only_row_statistics(gen, device):
    x = torch.randn(8, 513, generator=gen).to(device).requires_grad_()
    t = torch.randint(0, 513, (8,), generator=gen).to(device)
    lp, ent = token_logprobs(x, t, return_entropy=True)
    saved = lp.grad_fn.saved_tensors
    big = [s for s in saved if s.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), "only the input logits may be [N, V]"
    # (3, N) stats (max, log2 sum, entropy) and the targets; no output: the caller may modify those in place
    assert all(s.numel() <= 3 * 8 for s in saved if s.data_ptr() != x.data_ptr())
    assert not any(s.data_ptr() in (lp.data_ptr(), ent.data_ptr()) for s in saved)


def test_many_rows_small_vocab(gen, device):
    """>= 65,536 rows: rows live on grid axis 0 with int64 offsets."""
    N, V = 65536 + 37, 19
    x = torch.randn(N, V, generator=gen).to(device).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    lp, ent = token_logprobs(x, t, return_entropy=True)
    g = torch.randn(N, generator=gen).to(device)
    (grad,) = torch.autograd.grad((lp * g).sum() + ent.sum(), x)
    x64 = x.detach().double().requires_grad_()
    lp64, ent64 = token_logprobs_ref(x64, t, return_entropy=True)
    (grad64,) = torch.autograd.grad((lp64 * g.double()).sum() + ent64.sum(), x64)
    assert max_err(lp, lp64) < 5e-6 and max_err(ent, ent64) < 5e-6 and max_err(grad, grad64) < 5e-6


def test_gradcheck_fp64(gen, device):
    x = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randint(0, 11, (2, 3), generator=gen).to(device)
    t[0, 1] = -100

    def f(logits):
        return token_logprobs(logits, t, temperature=0.5, return_entropy=True)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_kernel_path_is_triton_not_reference(monkeypatch, device):
    """On CPU the tests must exercise the interpreter, not the *_ref fallback."""
    assert K.use_triton(torch.empty(1, device=device))

    def boom(*a, **k):
        raise AssertionError("reference path taken")

    module = importlib.import_module("fastrlhf.kernels.token_logprobs")  # the package attribute is the function
    monkeypatch.setattr(module, "token_logprobs_ref", boom)
    token_logprobs(torch.randn(2, 5, device=device), torch.tensor([1, 2], device=device))


# ------------------------------------------------------------------------------------- bad input
def test_out_of_range_target_gives_nan_row_only(gen, device):
    x = torch.randn(5, 40, generator=gen).to(device).requires_grad_()
    t = torch.tensor([3, 40, -7, 0, -100], device=device)
    lp, ent = token_logprobs(x, t, return_entropy=True)
    assert torch.isnan(lp[1]) and torch.isnan(lp[2])
    assert torch.isfinite(lp[[0, 3]]).all() and lp[4] == 0
    assert torch.isfinite(ent[:4]).all()
    ref = token_logprobs_ref(x.detach(), t)
    torch.testing.assert_close(lp, ref, equal_nan=True)
    (grad,) = torch.autograd.grad(lp.nansum(), x)
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 3, 4]]).all()


def test_nan_logits_give_nan_row_only(gen, device):
    x = torch.randn(4, 33, generator=gen).to(device)
    x[2, 7] = float("nan")
    lp, ent = token_logprobs(x, torch.tensor([1, 2, 3, 4], device=device), return_entropy=True)
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])
    assert torch.isfinite(lp[[0, 1, 3]]).all() and torch.isfinite(ent[[0, 1, 3]]).all()


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (
            lambda d: (torch.randn(2, 3, 5, device=d), torch.zeros(2, 4, dtype=torch.long, device=d)),
            ValueError,
            ["targets", "(2, 3)", "(2, 4)"],
        ),
        (
            lambda d: (torch.randn(2, 5, device=d), torch.zeros(2, device=d)),
            TypeError,
            ["targets", "integer", "float32"],
        ),
        (
            lambda d: (torch.zeros(2, 5, dtype=torch.long, device=d), torch.zeros(2, dtype=torch.long, device=d)),
            TypeError,
            ["logits", "floating", "int64"],
        ),
        (
            lambda d: (torch.randn(5, 2, device=d).t(), torch.zeros(2, dtype=torch.long, device=d)),
            ValueError,
            ["logits", "stride 1"],
        ),
        (
            lambda d: (torch.randn(2, 5, device=d), torch.zeros(2, dtype=torch.long, device="meta")),
            ValueError,
            ["one device", "meta"],
        ),
    ],
    ids=["shape", "float_targets", "int_logits", "vocab_stride", "devices"],
)
def test_bad_input_messages(make, exc, words, device):
    logits, targets = make(device)
    for fn in (token_logprobs, token_logprobs_ref):
        with pytest.raises(exc) as info:
            fn(logits, targets)
        for w in words:
            assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature, device):
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(
            torch.randn(2, 5, device=device), torch.zeros(2, dtype=torch.long, device=device), temperature=temperature
        )


# -------------------------------------------------------------------------- outside implementation
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_agrees_with_trl(dtype, gen, device):
    """TRL's selective_log_softmax / entropy_from_logits: code nobody here wrote."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    x = (torch.randn(3, 9, 1001, generator=gen) * 3).to(dtype).to(device)
    t = torch.randint(0, 1001, (3, 9), generator=gen).to(device)
    ours, ent = token_logprobs(x, t, return_entropy=True)
    theirs = trl_utils.selective_log_softmax(x.float(), t)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent, trl_utils.entropy_from_logits(x.float()).float(), rtol=1e-5, atol=2e-5)
    ours_t = token_logprobs(x, t, temperature=0.7)
    torch.testing.assert_close(
        ours_t, trl_utils.selective_log_softmax(x.float(), t, temperature=0.7).float(), rtol=1e-5, atol=2e-5
    )
