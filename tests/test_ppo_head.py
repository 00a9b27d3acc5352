"""ppo_head: precision contract for every output and the logits gradient, equivalence with the unfused
trainer math (token_logprobs + rl.policy_loss), torch.maximum's tie convention, gradcheck, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
from contract import assert_contract, epsilon, mask_vocab, max_err

from fastrlhf.kernels import kl_estimate, token_logprobs
from fastrlhf.kernels.ppo_head import PPOHeadOutput, ppo_head, ppo_head_ref
from fastrlhf.trainer import rl

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CLIP = 0.2
DIFFERENTIABLE = ["logprobs", "entropy", "ratio", "pg_loss", "kl"]


def eager(logits, targets, old, adv, ref, temperature, clip_range=CLIP, ignore_index=-100):
    """The unfused idiom: log_softmax(z / T).gather, entropy, then rl.policy_loss's per-token expressions
    and the textbook k3."""
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    active = targets != ignore_index
    lp = log_p.gather(-1, torch.where(active, targets, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(log_p.exp() * torch.where(torch.isinf(log_p), 0, log_p)).sum(-1)  # 0 log 0 = 0 at a -inf logit
    ratio = torch.exp((lp - old).where(active, 0))
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    pg = torch.maximum(unclipped, clipped)
    d = (ref - lp).where(active, 0)
    kl = torch.exp(d) - d - 1
    outs = (lp, ent, ratio, pg, (clipped > unclipped).float(), kl)
    return PPOHeadOutput(*(torch.where(active, o, 0) for o in outs))


def per_token_inputs(logits, targets, temperature, gen, with_ref=True):
    """old_logprobs = logp -+ up to 0.5 (ratios in [0.61, 1.65]: clipped and unclipped tokens, and the
    first two active tokens one of each whatever the seed), advantages of both signs (the last two active
    tokens exactly 0), ref_logprobs near logp (a few very near: the k3 series branch)."""
    logp = token_logprobs_fp64(logits, targets, temperature)
    shape = targets.shape
    old = logp + torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5
    adv = torch.randn(shape, generator=gen)
    active = (targets.reshape(-1) != -100).nonzero().flatten().tolist()
    old, adv, flat_logp = old.view(-1), adv.view(-1), logp.reshape(-1)
    old[active[0]], adv[active[0]] = flat_logp[active[0]] - 0.4, 1.0  # ratio 1.49 with adv > 0: clipped
    old[active[1]], adv[active[1]] = flat_logp[active[1]], 1.0  # ratio 1: not clipped
    adv[active[-2:]] = 0.0
    old, adv = old.view(shape).float(), adv.view(shape)
    if not with_ref:
        return old, adv, None
    ref = logp + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    ref.view(-1)[::5] = logp.view(-1)[::5] + 1e-4 * torch.randn(
        ref.view(-1)[::5].shape, generator=gen, dtype=torch.float64
    )
    return old, adv, ref.float()


def token_logprobs_fp64(logits, targets, temperature):
    lp = torch.log_softmax(logits.detach().cpu().double() / temperature, -1)
    return lp.gather(-1, targets.cpu().clamp(min=0).unsqueeze(-1)).squeeze(-1)


def make_case(case, gen, dtype, device):
    """-> leaf logits (requires grad), the view to pass (a function of the leaf), targets, T, old, adv, ref."""
    B, T, V = 3, 7, 2053
    temperature = 0.7 if case == "temperature" else 1.0
    x = torch.randn(B, T + 1, V, generator=gen) * 3
    t = torch.randint(0, V, (B, T + 1), generator=gen)
    if case == "masked_rows":
        t[torch.rand(B, T + 1, generator=gen) < 0.4] = -100
    elif case == "last_partial_block":
        t[:, ::2] = V - 1 - torch.randint(0, 5, t[:, ::2].shape, generator=gen)
    elif case == "offset_minus20":
        x = x - 20.0
    elif case == "masked_vocab":
        mask_vocab(x, t)
    leaf = x.to(dtype).to(device).requires_grad_()
    if case == "strided":  # logits[:, :-1] against targets[:, 1:], no copy

        def view(z):
            return z[:, :-1]

        t = t[:, 1:]
    else:

        def view(z):
            return z

    old, adv, ref = per_token_inputs(view(leaf), t, temperature, gen, with_ref=case != "no_ref")
    to = lambda z: z.to(device) if z is not None else None  # noqa: E731
    return leaf, view, t.to(device), temperature, to(old), to(adv), to(ref)


def weighted_loss(out, weights):
    return sum((getattr(out, n) * w).sum() for n, w in weights.items() if getattr(out, n) is not None)


CASES = [
    "random",
    "no_ref",
    "temperature",
    "masked_rows",
    "masked_vocab",
    "strided",
    "last_partial_block",
    "offset_minus20",
]


@pytest.mark.kernels("ppo_head.fwd", "ppo_head.bwd")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_contract_forward_backward(case, dtype, gen, device, tiles):
    leaf, view, t, temp, old, adv, ref = make_case(case, gen, dtype, device)
    weights = {n: torch.randn(t.shape, generator=gen).to(device) for n in DIFFERENTIABLE}

    out = ppo_head(view(leaf), t, old, adv, ref_logprobs=ref, clip_range=CLIP, temperature=temp)
    assert isinstance(out, PPOHeadOutput) and (out.kl is None) == (ref is None)
    (grad,) = torch.autograd.grad(weighted_loss(out, weights), leaf)

    leaf64 = leaf.detach().double().requires_grad_()
    ref64_in = ref.double() if ref is not None else None
    out64 = ppo_head_ref(
        view(leaf64), t, old.double(), adv.double(), ref_logprobs=ref64_in, clip_range=CLIP, temperature=temp
    )
    (grad64,) = torch.autograd.grad(weighted_loss(out64, {n: w.double() for n, w in weights.items()}), leaf64)

    leaf_e = leaf.detach().float().requires_grad_()  # eager fp32 on the same (rounded) inputs
    out_e = eager(view(leaf_e), t, old, adv, ref if ref is not None else old, temp)
    out_e = out_e._replace(kl=out_e.kl if ref is not None else None)
    (grad_e,) = torch.autograd.grad(weighted_loss(out_e, weights), leaf_e)

    errors = {}
    for name in DIFFERENTIABLE:
        k, e, r = getattr(out, name), getattr(out_e, name), getattr(out64, name)
        if r is None:
            continue
        assert k.dtype == torch.float32 and k.shape == t.shape, name
        errors[name] = assert_contract(f"{case} {dtype} {name}", k, e, r)
    assert grad.dtype == dtype
    # the gradient scales with the ratio exp(logp - old), so it carries the log-prob's allowed error
    # (2 x eager's + epsilon) relative to its size: the fp32 kernel's own ~2-ulp log-prob error shows up there
    # as ~20 ulps of the largest gradient, eager's (whose accuracy varies with the CPU's vector math) as less
    logp_bound = 2 * errors["logprobs"][1] + epsilon(out64.logprobs)
    inherited = grad64.detach().abs().max().item() * logp_bound
    assert_contract(f"{case} {dtype} grad", grad, grad_e, grad64, inherited=inherited)

    # the clip flag: exact (no ratio lies within float error of 1 +- c), and the matrix covers both branches
    assert out.clipped.dtype == torch.float32 and not out.clipped.requires_grad
    torch.testing.assert_close(out.clipped, out64.clipped.float(), rtol=0, atol=0)
    active = t != -100
    assert 0 < out.clipped[active].sum() < active.sum()
    assert (adv[active] > 0).any() and (adv[active] < 0).any()
    assert ((out64.ratio[active] - 1).abs() > CLIP).any()

    ignored = ~active
    for name in PPOHeadOutput._fields:
        if getattr(out, name) is not None:
            assert (getattr(out, name)[ignored] == 0).all(), name
    if case == "masked_rows":
        assert ignored.any() and (view(grad)[ignored] == 0).all()


@pytest.mark.parametrize("which", DIFFERENTIABLE)
def test_backward_with_one_upstream_gradient(which, gen, device):
    x = (torch.randn(4, 5, 301, generator=gen) * 2).to(device).requires_grad_()
    t = torch.randint(0, 301, (4, 5), generator=gen).to(device)
    old, adv, ref = (z.to(device) for z in per_token_inputs(x, t, 0.7, gen))
    x64 = x.detach().double().requires_grad_()
    out = getattr(ppo_head(x, t, old, adv, ref_logprobs=ref, temperature=0.7), which)
    out64 = getattr(ppo_head_ref(x64, t, old.double(), adv.double(), ref_logprobs=ref.double(), temperature=0.7), which)
    g = torch.randn(out.shape, generator=gen).to(device)
    (grad,) = torch.autograd.grad((out * g).sum(), x)
    (grad64,) = torch.autograd.grad((out64 * g.double()).sum(), x64)
    assert max_err(grad, grad64) < 2e-6 * max(1.0, grad64.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_ref", [True, False], ids=["kl", "no_kl"])
def test_same_loss_and_gradient_as_unfused_trainer_math(with_ref, dtype, gen, device):
    """What the trainer does today (token_logprobs -> rl.policy_loss, entropy_bonus, kl_estimate) and what
    it will do with the fused head give the same loss, stats and logits gradient."""
    B, T, V = 4, 9, 1031
    temp, ent_coef, beta = 0.7, 0.01, 0.05
    x = (torch.randn(B, T + 1, V, generator=gen) * 2).to(dtype).to(device).requires_grad_()
    t = torch.randint(0, V, (B, T), generator=gen)
    t[0, 6:] = -100  # a short reply, padded
    t[2, 3:] = -100
    old, adv, ref = (
        z.to(device) if z is not None else None for z in per_token_inputs(x[:, :-1], t, temp, gen, with_ref)
    )
    t = t.to(device)
    mask = t != -100

    out = ppo_head(x[:, :-1], t, old, adv, ref_logprobs=ref, clip_range=CLIP, temperature=temp)
    fused = rl.masked_mean(out.pg_loss, mask) - ent_coef * rl.masked_mean(out.entropy, mask)
    if with_ref:
        fused = fused + beta * rl.masked_mean(out.kl, mask)
    (grad_fused,) = torch.autograd.grad(fused, x)

    logp, ent = token_logprobs(x[:, :-1], t, temperature=temp, return_entropy=True)
    pg_loss, stats = rl.policy_loss(logp, old, adv, mask, CLIP)
    unfused = pg_loss - ent_coef * rl.entropy_bonus(ent, mask)
    if with_ref:
        unfused = unfused + beta * rl.masked_mean(kl_estimate(logp, ref, estimator="k3"), mask)
    (grad_unfused,) = torch.autograd.grad(unfused, x)

    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-7)
    gtol = {"rtol": 0, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-9}
    torch.testing.assert_close(grad_fused, grad_unfused, **gtol)
    log_ratio = out.logprobs - old
    fused_stats = {
        "clipfrac": rl.masked_mean(out.clipped, mask),
        "approx_kl": rl.masked_mean(0.5 * log_ratio**2, mask),
        "ratio_mean": rl.masked_mean(out.ratio, mask),
        "ratio_max": out.ratio.where(mask, 0).max(),
    }
    for k, v in stats.items():
        torch.testing.assert_close(fused_stats[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert 0 < stats["clipfrac"] < 1


def test_tie_gradient_matches_torch_maximum(device):
    """Where -A r and -A clamp(r) round to the same number with r just above 1 + c, torch.maximum splits the
    gradient 1/2, 1/2 and clamp passes none: d pg / d logp = -A r / 2. The kernel must do the same."""
    R, V = 256, 16
    x = torch.zeros(R, V)
    x[:, 3] = 5.0  # p_target ~ 0.91: logp ~ -0.1, so old ~ -0.28 has fine ulps and r steps below an ulp
    x = x.to(device).requires_grad_()
    t = torch.full((R,), 3, device=device)
    hi = torch.tensor(1 + CLIP, dtype=torch.float32)  # torch.clamp rounds 1 + c to fp32
    r_star = torch.nextafter(hi, torch.tensor(2.0))
    with torch.no_grad():
        logp = ppo_head(x, t, torch.zeros(R, device=device), torch.zeros(R, device=device)).logprobs
    old0 = (logp[0].double().cpu() - torch.log(r_star.double())).float()
    old = old0 + torch.arange(-R // 2, R // 2) * torch.finfo(torch.float32).eps * old0.abs() / 2  # ~1/2 ulp steps
    old = old.to(device)
    with torch.no_grad():
        ratio = ppo_head(x, t, old, torch.zeros(R, device=device)).ratio
    rows = (ratio.cpu() == r_star).nonzero().flatten()
    assert len(rows) > 0, "no old_logprobs gave r = 1 + c + 1 ulp"
    i = int(rows[0])
    # torch's own exp may round that row's r elsewhere (a GPU's exp2 is not correctly rounded): for torch's
    # convention below, a row of the same sweep where torch's exp gives r_star
    j = int((torch.exp(logp.cpu() - old.cpu()) == r_star).nonzero().flatten()[0])
    cands = torch.linspace(0.84, 0.99, 301)  # -A r and -A (1 + c) in [1, 2): equal after rounding for some A < 1
    A = float(cands[(-cands * r_star) == (-cands * hi)][0])

    adv = torch.full((R,), A, device=device)
    out = ppo_head(x, t, old, adv)
    assert out.clipped[i] == 0 and out.pg_loss[i] == -A * hi and out.ratio[i] == r_star
    (g_pg,) = torch.autograd.grad(out.pg_loss[i], x, retain_graph=True)
    (g_lp,) = torch.autograd.grad(out.logprobs[i], x)

    leaf = logp.detach().cpu()[j : j + 1].clone().requires_grad_()  # torch's own convention, at r = r_star
    loss, _ = rl.policy_loss(leaf, old.cpu()[j : j + 1], adv.cpu()[j : j + 1], torch.ones(1, dtype=torch.bool), CLIP)
    (coef,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(coef, -0.5 * A * r_star.reshape(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(g_pg, coef.to(device) * g_lp, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("with_ref", [True, False], ids=["kl", "no_kl"])
def test_gradcheck_fp64(with_ref, gen, device):
    x = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randint(0, 11, (2, 3), generator=gen).to(device)
    t[0, 1] = -100
    logp = token_logprobs_fp64(x, t, 0.5).to(device)
    offsets = torch.tensor(
        [[0.05, -0.5, 0.5], [-0.05, 0.4, -0.45]], dtype=torch.float64, device=device
    )  # in and out of range
    old, adv = logp + offsets, torch.randn(2, 3, generator=gen, dtype=torch.float64).to(device)
    ref = (logp + 0.3 * torch.randn(2, 3, generator=gen, dtype=torch.float64).to(device)) if with_ref else None

    def f(logits):
        out = ppo_head(logits, t, old, adv, ref_logprobs=ref, temperature=0.5)
        return tuple(getattr(out, n) for n in DIFFERENTIABLE if getattr(out, n) is not None)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_no_grad_saves_nothing_and_grad_saves_row_stats_only(gen, device):
    x = torch.randn(8, 513, generator=gen).to(device).requires_grad_()
    t = torch.randint(0, 513, (8,), generator=gen).to(device)
    old, adv, ref = (z.to(device) for z in per_token_inputs(x, t, 1.0, gen))
    with torch.no_grad():
        quiet = ppo_head(x, t, old, adv, ref_logprobs=ref)
    assert all(o.grad_fn is None and not o.requires_grad for o in quiet)
    out = ppo_head(x, t, old, adv, ref_logprobs=ref)
    for a, b in zip(out, quiet):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    saved = out.pg_loss.grad_fn.saved_tensors
    big = [s for s in saved if s.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), "only the input logits may be [N, V]"
    assert all(s.numel() <= 6 * 8 for s in saved if s.data_ptr() != x.data_ptr())  # (6, N) stats
    for o in out[:4]:  # outputs are neither views of one buffer nor saved: in-place use is allowed
        o.mul_(2)
    (grad,) = torch.autograd.grad(out.pg_loss.sum() + out.entropy.sum(), x)
    assert torch.isfinite(grad).all()


def test_kernel_path_is_triton_not_reference(monkeypatch, device):
    """On CPU the tests must exercise the interpreter, not the *_ref fallback."""

    def boom(*a, **k):
        raise AssertionError("reference path taken")

    module = importlib.import_module("fastrlhf.kernels.ppo_head")
    monkeypatch.setattr(module, "ppo_head_ref", boom)
    monkeypatch.setattr(module, "token_logprobs_ref", boom)
    x = torch.randn(2, 5, device=device, requires_grad=True)
    z = torch.zeros(2, device=device)
    out = module.ppo_head(x, torch.tensor([1, 2], device=device), z, z + 1, ref_logprobs=z)
    out.pg_loss.sum().backward()


def test_out_of_range_target_gives_nan_row_only(gen, device):
    x = torch.randn(5, 40, generator=gen).to(device).requires_grad_()
    t = torch.tensor([3, 40, -7, 0, -100], device=device)
    z = torch.full((5,), -3.0, device=device)
    out = ppo_head(x, t, z, z + 4, ref_logprobs=z)
    for name in ("logprobs", "ratio", "pg_loss", "kl"):
        v = getattr(out, name)
        assert torch.isnan(v[[1, 2]]).all() and torch.isfinite(v[[0, 3]]).all() and v[4] == 0, name
    ref = ppo_head_ref(x.detach(), t, z, z + 4, ref_logprobs=z)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, equal_nan=True)
    (grad,) = torch.autograd.grad(out.pg_loss.nansum(), x, retain_graph=True)
    assert torch.isnan(grad[[1, 2]]).all() and torch.isfinite(grad[[0, 3, 4]]).all() and (grad[4] == 0).all()
    assert torch.isfinite(
        out.entropy
    ).all()  # the entropy does not depend on the target: finite, and so is its gradient
    (grad_ent,) = torch.autograd.grad(out.entropy.sum(), x)
    assert torch.isfinite(grad_ent).all() and (grad_ent[4] == 0).all()


def _bad(d, **over):
    args = {
        "logits": torch.randn(2, 3, 5, device=d),
        "targets": torch.zeros(2, 3, dtype=torch.long, device=d),
        "old_logprobs": torch.zeros(2, 3, device=d),
        "advantages": torch.zeros(2, 3, device=d),
    }
    args.update({k: v(d) if callable(v) else v for k, v in over.items()})
    return args


BAD = [
    ({"targets": lambda d: torch.zeros(2, 4, dtype=torch.long, device=d)}, ValueError, ["targets", "(2, 3)", "(2, 4)"]),
    ({"targets": lambda d: torch.zeros(2, 3, device=d)}, TypeError, ["targets", "integer", "float32"]),
    (
        {"logits": lambda d: torch.zeros(2, 3, 5, dtype=torch.long, device=d)},
        TypeError,
        ["logits", "floating", "int64"],
    ),
    ({"logits": lambda d: torch.randn(2, 5, 3, device=d).transpose(1, 2)}, ValueError, ["logits", "stride 1"]),
    ({"old_logprobs": lambda d: torch.zeros(3, 2, device=d)}, ValueError, ["old_logprobs", "(2, 3)", "(3, 2)"]),
    (
        {"advantages": lambda d: torch.zeros(2, 3, dtype=torch.long, device=d)},
        TypeError,
        ["advantages", "floating", "int64"],
    ),
    ({"ref_logprobs": lambda d: torch.zeros(6, device=d)}, ValueError, ["ref_logprobs", "(2, 3)", "(6,)"]),
    ({"advantages": lambda d: torch.zeros(2, 3, device="meta")}, ValueError, ["one device", "meta"]),
    ({"clip_range": -0.1}, ValueError, ["clip_range", "-0.1"]),
    ({"clip_range": float("nan")}, ValueError, ["clip_range", "nan"]),
    ({"temperature": 0.0}, ValueError, ["temperature", "0.0"]),
]


@pytest.mark.parametrize("over, exc, words", BAD, ids=[f"{next(iter(b[0]))}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_messages(over, exc, words, device):
    args = _bad(device, **over)
    pos = [args.pop(k) for k in ("logits", "targets", "old_logprobs", "advantages")]
    for fn in (ppo_head, ppo_head_ref):
        with pytest.raises(exc) as info:
            fn(*pos, **args)
        for w in words:
            assert w in str(info.value), (w, str(info.value))
