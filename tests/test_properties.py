"""Property tests (hypothesis): invariances and bounds that hold for every input, not just our cases."""

from __future__ import annotations

import math

import pytest
import torch
from contract import assert_contract
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrlhf.kernels import full_kl, full_kl_ref, token_logprobs

from conftest import DEVICE

FAST = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def logits_case(draw):
    rows = draw(st.integers(1, 6))
    vocab = draw(st.integers(1, 700))
    scale = draw(st.floats(0.01, 30.0))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * scale
    t = torch.randint(0, vocab, (rows,), generator=g)
    return x.to(DEVICE), t.to(DEVICE), g


@FAST
@given(case=logits_case(), offset=st.floats(-50.0, 50.0), temperature=st.sampled_from([1.0, 0.7, 1.3]))
def test_logprobs_shift_invariant(case, offset, temperature):
    x, t, _ = case
    a = token_logprobs(x, t, temperature=temperature)
    b = token_logprobs(x + offset, t, temperature=temperature)
    tol = 4e-6 * (1 + abs(offset) + x.abs().max().item()) / temperature
    assert (a - b).abs().max().item() <= tol
    assert (a <= 0).all()  # a log-probability is never positive


@FAST
@given(case=logits_case())
def test_entropy_bounds(case):
    x, t, _ = case
    _, ent = token_logprobs(x, t, return_entropy=True)
    V = x.shape[-1]
    assert (ent >= -1e-6).all() and (ent <= math.log(V) + 1e-5).all()


@FAST
@given(case=logits_case(), temperature=st.sampled_from([1.0, 0.7]))
def test_kl_of_a_distribution_with_itself_is_zero(case, temperature):
    x, _, _ = case
    assert full_kl(x, x, temperature=temperature).abs().max().item() <= 1e-12
    # a constant shift of the reference leaves the distribution unchanged
    assert full_kl(x, x + 3.5, temperature=temperature).abs().max().item() <= 1e-5


@pytest.mark.kernels("full_kl.fwd")
@FAST
@given(case=logits_case(), spread=st.floats(1e-4, 10.0))
def test_kl_within_the_contract(case, spread):
    """KL against the fp64 formula on any pair (not KL >= 0, which the kernel's final clamp would pass)."""
    x, _, g = case
    y = x + spread * torch.randn(x.shape, generator=g).to(x.device)
    eager32 = (torch.softmax(x, -1) * (torch.log_softmax(x, -1) - torch.log_softmax(y, -1))).sum(-1)
    assert_contract("kl", full_kl(x, y), eager32, full_kl_ref(x.double(), y.double()))
