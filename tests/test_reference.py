"""trainer/models.py: `load_reference_model`, the frozen PPO reference in int8 / nf4 (bitsandbytes) or
unquantized, on CPU with a tiny random Llama (hidden 32, 2 layers, the real 49152-token tokenizer)."""

from __future__ import annotations

import logging
import sys

import bitsandbytes as bnb  # a hard dependency (pyproject.toml)
import pytest
import torch

from fastrlhf.trainer import models
from fastrlhf.trainer.models import load_causal_lm, load_reference_model, load_tokenizer, tiny_model_path

V = 49152
TEXTS = ["What is the capital of France? The capital of France is Paris.", "Write a haiku about the sea."]

# Max |log_softmax(ref) - log_softmax(fp32)| over real (non-pad) positions and the full vocab, measured on
# this input with tiny models of seeds 0, 1, 2 (and on random ids): int8 0.0034-0.0046, nf4 0.044-0.073.
# The bounds leave ~4x headroom (CPU kernels differ slightly from machine to machine) and stay far below
# what a wrong model gives: the tiny model of another seed differs from seed 0 by 0.79-0.83.
# nf4 is looser than int8: 16 levels per 64-weight block vs 255 per output row.
MAX_ABS_LOGPROB_DIFF = {"int8": 0.02, "nf4": 0.25, "none": 0.0}
QUANT_LINEAR = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_model_path(tmp_path_factory.mktemp("tiny"))
    tokenizer = load_tokenizer(path)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in TEXTS
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)  # left-padded: row 1 is shorter
    fp32 = load_causal_lm(path, tokenizer=tokenizer)
    with torch.no_grad():
        ref_logits = fp32(**batch).logits
    return path, tokenizer, batch, ref_logits


@pytest.mark.parametrize("quant", ["int8", "nf4", "none"])
def test_reference_model(tiny, quant, caplog):
    path, tokenizer, batch, ref_logits = tiny
    with caplog.at_level(logging.INFO, logger="fastrlhf"):
        model = load_reference_model(path, quant=quant)  # tokenizer defaults to load_tokenizer(path)

    assert model.training is False
    assert all(not p.requires_grad for p in model.parameters())
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.config.attention_dropout == 0.0
    assert any(f"quant {quant}" in r.getMessage() and " MB" in r.getMessage() for r in caplog.records)

    layers = model.config.num_hidden_layers
    if quant == "none":
        assert not any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules())
    else:
        quantized = [m for m in model.modules() if isinstance(m, QUANT_LINEAR[quant])]
        assert len(quantized) == LINEARS_PER_LAYER * layers
        # fp32 compute: bitsandbytes' AVX512-BF16 CPU path (bf16 compute; raises on this 32-wide model) stays off
        assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in quantized)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32

    B, T = batch.input_ids.shape
    assert batch.input_ids.dtype == torch.int64
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (B, T, V) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()

    real = batch.attention_mask.bool()
    diff = (logits.log_softmax(-1) - ref_logits.log_softmax(-1)).abs()[real].max().item()
    if quant == "none":
        assert torch.equal(logits, ref_logits)  # bit-identical to load_causal_lm
    else:
        assert 0.0 < diff <= MAX_ABS_LOGPROB_DIFF[quant], diff  # > 0: the weights really were quantized


def test_unknown_quant_is_a_value_error(tiny):
    path = tiny[0]
    with pytest.raises(ValueError, match="'int8', 'nf4', 'none'.*'int4'"):
        load_reference_model(path, quant="int4")


def test_missing_bitsandbytes_is_an_import_error(tiny, monkeypatch):
    path, tokenizer = tiny[0], tiny[1]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    for quant in ("int8", "nf4"):
        with pytest.raises(ImportError, match=r"pip install bitsandbytes.*--ref-quant none"):
            load_reference_model(path, quant=quant, tokenizer=tokenizer)
    # the unquantized reference does not need bitsandbytes
    model = load_reference_model(path, quant="none", tokenizer=tokenizer)
    assert not any(p.requires_grad for p in model.parameters())


def test_load_causal_lm_unchanged_and_trainable(tiny):
    """The shared loader helper did not change the policy loader: trainable, eval, pad set."""
    path, tokenizer = tiny[0], tiny[1]
    model = load_causal_lm(path, tokenizer=tokenizer)
    assert all(p.requires_grad for p in model.parameters())
    assert model.training is False and model.config.pad_token_id == tokenizer.pad_token_id
    assert models.REF_QUANTS == ("int8", "nf4", "none")
