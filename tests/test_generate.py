"""The sampler (trainer/generate.py) against `model.generate` and the model's own forward, on CPU in fp32.

The wrong answers these reject: a cache row repeated in the wrong order or a position off by one (greedy
replies differ from `generate`'s after a few tokens), a sliding window or soft-cap mishandled with a static
cache (Mistral, Gemma-2 differ), a sampler that is not softmax(z / T) (temperature applied twice, or not at
all: the chi-square test fails by hundreds of standard deviations), a mask that lets a reply go on after
its stop token or cuts it one token early, behaviour log-probs taken from the wrong step's logits.
"""

from __future__ import annotations

import pytest
import torch
from contract import assert_contract
from test_families import T, Truth, family_configs

from fastrlhf.trainer import generate as engine
from fastrlhf.trainer import models
from fastrlhf.trainer.rollout import mask_after_stop, sample

import transformers

GREEDY_FAMILIES = ["llama", "mistral", "gemma2", "gpt2"]  # plain, sliding window, soft-cap + sliding, Conv1D


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(models.default_model_path())


def _model(tokenizer, family: str, head_scale: float = 8.0):
    """test_families' tiny model of `family`, its head scaled by `head_scale` (logits spread over several
    nats, so sampling is not uniform; a tied head scales the input embedding too)."""
    config = family_configs(tokenizer)[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head_scale)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model.eval()


def _prompts(gen, lengths=(3, 7, 1, 5)) -> list[list[int]]:
    return [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("family", GREEDY_FAMILIES)
def test_greedy_equals_generate(family, tokenizer, gen):
    """Left-padded prompts of different lengths, 2 samples each (the prefill shared): greedy tokens equal
    `generate`'s token for token, 10 tokens (past the sliding window of 6). The head is not scaled up here, so
    the trunk moves the argmax: a position one off changes GPT-2's replies (learned position embeddings);
    the rotary families' random weights hardly feel it, the behaviour log-prob test below does."""
    from fastrlhf.trainer.rollout import left_pad

    model = _model(tokenizer, family, head_scale=1.0)
    ids, mask = left_pad(_prompts(gen), tokenizer.pad_token_id)
    want = model.generate(
        input_ids=ids.repeat_interleave(2, 0),
        attention_mask=mask.repeat_interleave(2, 0),
        do_sample=False,
        max_new_tokens=10,
        eos_token_id=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )[:, ids.shape[1] :]
    got = engine.generate(
        model,
        ids,
        mask,
        max_new_tokens=10,
        temperature=0,
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        samples_per_prompt=2,
        logprobs=False,
    )
    assert got.tokens.shape == want.shape
    assert torch.equal(got.tokens, want), f"{family}: greedy tokens differ from generate's"


def test_draw_is_softmax_over_t(gen):
    """Chi-square of 200k draws from fixed logits against softmax(z / T): the statistic of a correct
    sampler is ~ dof (12) +- 5; sampling at T = 1 or T^2 gives thousands."""
    z = torch.randn(13, generator=gen) * 2.0
    n = 200_000
    torch.manual_seed(0)
    draws = engine.draw(z.expand(n, -1), T)
    counts = torch.bincount(draws, minlength=13).double()
    expected = torch.softmax(z.double() / T, -1) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 40, f"chi-square {chi2:.1f} with 12 degrees of freedom"


def test_engine_first_token_distribution():
    """Through the whole engine (prefill, cache rows repeated): 20,000 one-token replies to a fixed prompt
    from a Llama of 24 tokens; their chi-square against softmax(model logits / T) stays within its degrees
    of freedom (23 +- 7; T applied twice or not at all gives hundreds)."""
    config = transformers.LlamaConfig(
        vocab_size=24,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(3.0)
    prompt = torch.tensor([[3, 9, 4, 17, 1]])
    with torch.no_grad():
        p = torch.softmax(model(input_ids=prompt).logits[0, -1].double() / T, -1)
    assert p.max() < 0.5 and p.min() > 1e-3, "the test needs a spread distribution"
    n = 20_000
    torch.manual_seed(1)
    got = engine.generate(
        model,
        prompt,
        torch.ones_like(prompt),
        max_new_tokens=1,
        temperature=T,
        stop_ids=[0],
        pad_id=23,
        samples_per_prompt=n,
        logprobs=False,
    )
    counts = torch.bincount(got.tokens[:, 0], minlength=24).double()
    chi2 = ((counts - p * n) ** 2 / (p * n)).sum().item()
    assert chi2 < 23 + 6 * 46**0.5, f"chi-square {chi2:.1f} with 23 degrees of freedom"


def test_rollout_contract_and_eos(tokenizer, gen):
    """`sample`: B0 * k rows, prompts repeated, replies padded after the first stop token, which is kept and
    masked in; has_eos where it occurred; R' = the widest reply (no column of pad only). The stop token is
    made likely by raising its logit bias, so several rows stop early and some run to the limit."""
    model = _model(tokenizer, "llama")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch.no_grad():
        model.get_output_embeddings().weight[eos] *= 0  # then give EOS a fixed, moderate logit
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
    with torch.no_grad():
        head.bias[eos] = 9.0
    prompts = _prompts(gen)
    torch.manual_seed(3)
    ro = sample(model, tokenizer, prompts, max_new_tokens=12, temperature=T, samples_per_prompt=3)
    B, R = ro.response_ids.shape
    assert B == 12 and R <= 12
    assert torch.equal(ro.prompt_index, torch.arange(4).repeat_interleave(3))
    assert torch.equal(ro.prompt_ids[::3].repeat_interleave(3, 0), ro.prompt_ids)
    assert ro.has_eos.any() and not ro.has_eos.all(), "the test wants rows that stop and rows that run out"
    for i in range(B):
        n = int(ro.response_mask[i].sum())
        assert torch.equal(ro.response_mask[i], (torch.arange(R) < n).long())
        assert (ro.response_ids[i, n:] == pad).all()
        reply = ro.response_ids[i, :n]
        assert (reply[:-1] != eos).all()
        assert bool(ro.has_eos[i]) == (reply[-1].item() == eos)
        if not ro.has_eos[i]:
            assert n == R, "a reply without a stop token runs to the last column"
    assert ro.response_mask[:, -1].any(), "a trailing column of padding only"
    again, mask, has_eos = mask_after_stop(ro.response_ids, [eos], pad)
    assert torch.equal(mask, ro.response_mask) and torch.equal(has_eos, ro.has_eos)
    lp = ro.behaviour_logprobs
    assert lp.shape == (B, R) and (lp[ro.response_mask == 0] == 0).all() and (lp[ro.response_mask == 1] < 0).all()


@pytest.mark.kernels("token_logprobs.fwd")
def test_behaviour_logprobs_equal_the_teacher_forced_forward(tokenizer, gen, monkeypatch):
    """The kernel's output on the decode logits is within the precision contract of the fp64 log-softmax of
    those logits; and the behaviour log-probs equal the model's own teacher-forced forward on each row alone
    within the bound test_families uses for the trainer's batched pass (4x the fp32 forward's error + 8 ulps),
    so they come from the step that drew the token (one step off would be nats away)."""
    model = _model(tokenizer, "qwen2")
    seen = []
    kernel = engine.token_logprobs

    def spy(logits, targets, **kw):
        out = kernel(logits, targets, **kw)
        seen.append((logits.clone(), targets.clone(), out))
        return out

    monkeypatch.setattr(engine, "token_logprobs", spy)
    torch.manual_seed(5)
    ro = sample(model, tokenizer, _prompts(gen, (3, 6, 1)), max_new_tokens=8, temperature=T, samples_per_prompt=1)
    logits = torch.stack([s[0] for s in seen], 1)  # (B, R, V)
    targets = torch.stack([s[1] for s in seen], 1)
    kern = torch.stack([s[2] for s in seen], 1)
    ref = torch.log_softmax(logits.double() / T, -1).gather(-1, targets[..., None]).squeeze(-1)
    eager = torch.log_softmax(logits.float() / T, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert_contract("token_logprobs.fwd on decode logits", kern, eager, ref)
    truth = Truth(model, ro)
    m = ro.response_mask.bool()
    err = (ro.behaviour_logprobs.double() - truth.logp)[m].abs().max().item()
    assert err <= truth.atol_logp, (
        f"behaviour log-probs off the teacher-forced forward by {err:.3g} > {truth.atol_logp:.3g}"
    )


def test_seeded_draws_equal_generate_on_cpu(tokenizer, gen):
    """On CPU, torch's `multinomial` draws one sample as argmax(p / E) over E ~ Exp(1) drawn for every
    vocabulary entry: the very exponentials the sampler's Gumbel-max step draws, in the same order. So a seed
    gives the sampler exactly the replies `generate(do_sample=True)` gives, prompts repeated for their samples
    (the RNG's state after a call may differ: the sampler can run up to `check_every - 1` steps past the last
    stop, `generate` checks every token). A sampler that consumed the RNG differently (another
    draw, another order of rows) or repeated the cache rows wrongly differs within a few tokens. If a torch
    release changes `multinomial`'s CPU path this fails while the distribution tests above still pass."""
    from fastrlhf.trainer.rollout import left_pad

    model = _model(tokenizer, "llama")
    ids, mask = left_pad(_prompts(gen), tokenizer.pad_token_id)
    torch.manual_seed(11)
    want = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=T,
        top_k=0,
        top_p=1.0,
        max_new_tokens=12,
        num_return_sequences=3,
        eos_token_id=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )[:, ids.shape[1] :]
    torch.manual_seed(11)
    got = engine.generate(
        model,
        ids,
        mask,
        max_new_tokens=12,
        temperature=T,
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        samples_per_prompt=3,
        logprobs=False,
    )
    assert torch.equal(got.tokens, want)
