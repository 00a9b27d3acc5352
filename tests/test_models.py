"""trainer/models.py: the embedded default model and its cache, the pad policy, causal LM / reward model
loading, and tiny test models.

One real GGUF -> safetensors conversion (~35-45 s on 2 CPU cores) runs once per test run, into a private cache
(never the user's ~/.cache), and every test shares it. The logits test needs the GGUF-loaded model in
memory anyway, so reusing a persistent cache would not make the run shorter.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fastrlhf.kernels import last_token_rewards
from fastrlhf.trainer import models

V = 49152
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea, please, in English."]


def chat(tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def plain_lm(path) -> LlamaForCausalLM:
    """Loaded by transformers alone (no fastrlhf policy applied)."""
    return LlamaForCausalLM.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    """The real conversion, once, in a private XDG cache that stays set for the whole module. Records each
    GGUF load so tests can tell a cache hit from a rebuild, and keeps the GGUF-loaded model."""
    cache = tmp_path_factory.mktemp("xdg")
    loads = []
    real_load = models._load_gguf

    def counting_load():
        model, tokenizer = real_load()
        loads.append(model)
        return model, tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        mp.setattr(models, "_load_gguf", counting_load)
        t0 = time.perf_counter()
        path = models.default_model_path()
        seconds = time.perf_counter() - t0
        yield SimpleNamespace(path=path, cache=cache, loads=loads, gguf_model=loads[0], seconds=seconds)


@pytest.fixture(scope="module")
def lm(default):
    return models.load_causal_lm(default.path)


@pytest.fixture(scope="module")
def tokenizer(default):
    return models.load_tokenizer(default.path)


@pytest.fixture(scope="module")
def tiny_causal(default, tmp_path_factory):
    return models.tiny_model_path(tmp_path_factory.mktemp("tiny"))


# ---------------------------------------------------------------------------------------------------
# default model and its cache


def test_default_model_is_a_cached_safetensors_copy(default):
    assert default.path == default.cache / "fastrlhf" / "smollm2-135m-instruct"
    files = {p.name for p in default.path.iterdir()}
    expected = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= files
    assert [p.name for p in default.path.parent.iterdir()] == ["smollm2-135m-instruct"]  # no temp dir left
    config = json.loads((default.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == V and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (default.path / "model.safetensors").stat().st_size > 500e6  # fp32, 135M params, one tied matrix
    print(f"GGUF -> safetensors conversion: {default.seconds:.1f} s")


def test_second_call_hits_the_cache(default):
    mtime = (default.path / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert models.default_model_path() == default.path
    assert time.perf_counter() - t0 < 0.5
    assert len(default.loads) == 1  # the GGUF was read once
    assert (default.path / "model.safetensors").stat().st_mtime_ns == mtime


def test_cached_model_equals_the_gguf_model(default, lm):
    gguf_sd, cached_sd = default.gguf_model.state_dict(), lm.state_dict()
    assert gguf_sd.keys() == cached_sd.keys()
    for name, tensor in gguf_sd.items():
        assert torch.equal(tensor, cached_sd[name]), name
    assert lm.config.vocab_size == V and lm.lm_head.weight.shape == (V, 576)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.randint(17, V, (2, 12), generator=torch.Generator().manual_seed(0))  # (B, T), no special tokens
    with torch.no_grad():
        expected = default.gguf_model.eval()(ids).logits  # (B, T, V) fp32
        actual = lm(ids).logits
    torch.testing.assert_close(actual, expected)


def test_greedy_chat_generation(lm, tokenizer):
    enc = tokenizer([chat(tokenizer, PROMPTS[0])], return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**enc, max_new_tokens=6, do_sample=False)
    new = out[0, enc.input_ids.shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True)
    print(f"greedy reply: {text!r}")
    assert len(new) > 0 and text.strip()
    assert tokenizer.pad_token_id not in new.tolist()


def test_stale_temp_dir_and_failed_conversion_do_not_break_the_cache(default, tiny_causal, tmp_path, monkeypatch):
    """A killed conversion leaves `.NAME.tmp-*` behind: the next call still converts, removes stale temp
    dirs (but not one a live process may be writing), and leaves no temp dir of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = tmp_path / "fastrlhf"
    stale, live = root / ".smollm2-135m-instruct.tmp-killed", root / ".smollm2-135m-instruct.tmp-running"
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    def crash():
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_load_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        models.default_model_path()
    assert sorted(p.name for p in root.iterdir()) == [live.name]  # stale removed, ours cleaned up, no dest

    tiny = (plain_lm(tiny_causal), models.load_tokenizer(tiny_causal))
    monkeypatch.setattr(models, "_load_gguf", lambda: tiny)  # stands in for the 40 s GGUF load
    path = models.default_model_path()
    assert path == root / "smollm2-135m-instruct"
    assert sorted(p.name for p in root.iterdir()) == [live.name, path.name]
    torch.testing.assert_close(plain_lm(path).state_dict(), tiny[0].state_dict(), rtol=0, atol=0)


def test_losing_a_race_keeps_the_winners_copy(tiny_causal, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dest = tmp_path / "fastrlhf" / "smollm2-135m-instruct"
    model, tokenizer = plain_lm(tiny_causal), models.load_tokenizer(tiny_causal)

    def other_process_wins():  # another process renames its copy into place while we convert
        models._save_plain(model, tokenizer, dest)
        (dest / "winner").touch()
        return model, tokenizer

    monkeypatch.setattr(models, "_load_gguf", other_process_wins)
    assert models.default_model_path() == dest
    assert (dest / "winner").exists()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # the loser's temp copy is gone


def test_resolve_model_path(default, tiny_causal, tmp_path):
    for name in (None, "default", "smollm2", "SmolLM2"):
        assert models.resolve_model_path(name) == str(default.path)
    assert models.resolve_model_path(tiny_causal) == str(Path(tiny_causal).resolve())
    with pytest.raises(FileNotFoundError, match=r"does not exist.*hub are disabled.*local folder"):
        models.resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        models.resolve_model_path(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="hub are disabled"):
        models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


# ---------------------------------------------------------------------------------------------------
# tokenizer / pad policy


def test_pad_is_an_unused_special_token_not_eos(lm, tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.pad_token == "<empty_output>" and tokenizer.pad_token_id == 16
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id)
    assert len(tokenizer) == V  # no new token, embeddings keep their size
    assert lm.config.pad_token_id == lm.generation_config.pad_token_id == 16
    # The model essentially never emits the pad token (EOS, by contrast, ends the greedy reply).
    enc = tokenizer([chat(tokenizer, PROMPTS[0]) + "The capital of France is Paris."], return_tensors="pt")
    with torch.no_grad():
        probs = lm(**enc).logits[0].softmax(-1)  # (T, V)
    assert probs[:, tokenizer.pad_token_id].max() < 1e-3
    assert probs[-1, tokenizer.eos_token_id] > 0.5


def test_left_padding_by_default_right_on_request(default, tokenizer):
    texts = [chat(tokenizer, q) for q in PROMPTS]
    left = tokenizer(texts, padding=True, return_tensors="pt")
    n_pad = left.attention_mask.shape[1] - left.attention_mask.sum(1)  # (B,)
    assert n_pad[0] > 0 and n_pad[1] == 0
    assert (left.input_ids[0, : n_pad[0]] == 16).all() and left.attention_mask[0, : n_pad[0]].sum() == 0
    right = models.load_tokenizer(default.path, padding_side="right")(texts, padding=True, return_tensors="pt")
    assert (right.input_ids[0, -n_pad[0] :] == 16).all() and right.attention_mask[0, -n_pad[0] :].sum() == 0
    with pytest.raises(ValueError, match="padding_side"):
        models.load_tokenizer(default.path, padding_side="middle")


def test_pad_token_added_and_embeddings_resized_when_no_special_token_is_free(tmp_path, caplog):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    words = ["<s>", "</s>", "hello", "world", "pad"]  # "pad" is a plain word, not a special token
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="hello"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path)
    config = LlamaConfig(
        vocab_size=5,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)

    with caplog.at_level(logging.WARNING, logger="fastrlhf"):
        tok = models.load_tokenizer(tmp_path)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 5 and len(tok) == 6
    assert "added '<|pad|>'" in caplog.text
    model = models.load_causal_lm(tmp_path, tokenizer=tok)
    assert model.get_input_embeddings().num_embeddings == 6 and model.config.pad_token_id == 5
    with torch.no_grad():
        assert model(torch.tensor([[2, 3, 5]])).logits.shape == (1, 3, 6)


# ---------------------------------------------------------------------------------------------------
# models


def test_dropout_is_off(tiny_causal, tmp_path):
    config_file = Path(tiny_causal) / "config.json"
    config = json.loads(config_file.read_text())
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    for f in Path(tiny_causal).iterdir():
        (noisy / f.name).write_bytes(f.read_bytes())
    (noisy / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5, "embd_pdrop": 0.1}))
    ids = torch.randint(17, V, (2, 16), generator=torch.Generator().manual_seed(1))
    for model in (models.load_causal_lm(noisy), models.load_reward_model(noisy)):
        assert model.config.attention_dropout == 0.0 and model.config.embd_pdrop == 0.0
        assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        model.train()  # even in train mode two forwards agree
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_attn_implementation(monkeypatch):
    """flash-attention 2 only on CUDA in half precision, installed and supported by the class; else SDPA
    where the class has it, else eager (Gemma-2, whose attention soft-caps its scores, has no SDPA)."""
    import sys
    import types

    from transformers import Gemma2ForCausalLM, GPT2LMHeadModel

    from fastrlhf.trainer.family import attn_implementation

    llama = LlamaForCausalLM
    assert attn_implementation(llama, "cpu", torch.bfloat16) == "sdpa"
    assert attn_implementation(Gemma2ForCausalLM, "cpu", torch.float32) == "eager"
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert attn_implementation(llama, "cuda", torch.bfloat16) == "flash_attention_2"
    assert attn_implementation(GPT2LMHeadModel, torch.device("cuda:0"), torch.float16) == "flash_attention_2"
    assert attn_implementation(llama, "cuda", torch.float32) == "sdpa"  # flash-attn has no fp32 kernels
    monkeypatch.setattr(llama, "_supports_flash_attn", False)
    assert attn_implementation(llama, "cuda", torch.bfloat16) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not importable
    assert attn_implementation(Gemma2ForCausalLM, "cuda", torch.bfloat16) == "eager"


def test_reward_head_init_from_the_default_model(default, lm):
    rm = models.load_reward_model(default.path)
    weight, bias = models.reward_head_params(rm)
    H = lm.config.hidden_size
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.num_labels == 1
    assert weight.shape == (1, H) and bias is None and weight.requires_grad
    expected_std = 1 / (H + 1) ** 0.5
    assert abs(weight.std().item() / expected_std - 1) < 0.1  # 576 draws: sampling error ~3%
    assert abs(weight.mean().item()) < 3 * expected_std / H**0.5
    assert rm.config.pad_token_id == 16
    # the trunk is the causal LM's, unchanged
    for name, tensor in models.reward_trunk(rm).state_dict().items():
        assert torch.equal(tensor, lm.model.state_dict()[name]), name


def test_reward_model_round_trips_through_transformers(tiny_causal, tmp_path):
    rm = models.load_reward_model(tiny_causal)
    head = models.reward_head_params(rm)[0]
    assert torch.equal(head, models.reward_head_params(models.load_reward_model(tiny_causal, seed=0))[0])  # seeded
    assert not torch.equal(head, models.reward_head_params(models.load_reward_model(tiny_causal, seed=1))[0])
    tok = models.load_tokenizer(tiny_causal)
    enc = tok([chat(tok, q) for q in PROMPTS], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = rm(**enc).logits  # (B, 1) fp32
    assert scores.shape == (2, 1) and scores.dtype == torch.float32

    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", local_files_only=True)
    again = models.load_reward_model(tmp_path / "rm", seed=123)  # saved head kept, seed unused
    for k, v in rm.state_dict().items():  # the round trip is exact ...
        assert torch.equal(plain.state_dict()[k], v) and torch.equal(again.state_dict()[k], v), k
    with torch.no_grad():  # ... the scores agree to rounding: on AVX-512 CPUs the matmuls' summation order
        # depends on the weights' address alignment, which differs between loaded copies (seen: 2.4e-7)
        torch.testing.assert_close(plain(**enc).logits, scores, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(again(**enc).logits, scores, rtol=1e-6, atol=1e-6)
    assert torch.equal(models.reward_head_params(again)[0], models.reward_head_params(rm)[0])


def test_trunk_and_head_feed_the_reward_kernel(tiny_causal):
    """reward_trunk + reward_head_params + last_token_rewards reproduce the model's own scores for
    left and right padding."""
    rm = models.load_reward_model(tiny_causal)
    weight, bias = models.reward_head_params(rm)
    for side in ("left", "right"):
        tok = models.load_tokenizer(tiny_causal, padding_side=side)
        enc = tok([chat(tok, q) for q in PROMPTS], padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = models.reward_trunk(rm)(**enc).last_hidden_state  # (B, T, H)
            assert hidden.shape == (2, enc.input_ids.shape[1], 32)
            torch.testing.assert_close(
                last_token_rewards(hidden, weight, bias, attention_mask=enc.attention_mask), rm(**enc).logits[:, 0]
            )


def test_folded_normalisation_gives_normalised_scores_at_every_position(tiny_causal):
    """A PPO critic copied from the reward model: its head's output at every position is gain * r + bias
    (the units of the normalised scores its returns are made of), not the raw r."""
    rm = models.load_reward_model(tiny_causal)
    rm.config.reward_gain, rm.config.reward_bias = 2.7, -0.4
    tok = models.load_tokenizer(tiny_causal)
    enc = tok([chat(tok, q) for q in PROMPTS], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = models.reward_trunk(rm)(**enc).last_hidden_state  # (B, T, H)
        raw = models.reward_head(rm)(hidden)  # (B, T, 1)
        models.fold_reward_normalisation(rm)
        folded = models.reward_head(rm)(hidden)
    torch.testing.assert_close(folded, 2.7 * raw - 0.4, rtol=1e-6, atol=1e-6)
    assert (rm.config.reward_gain, rm.config.reward_bias) == (1.0, 0.0)  # applied once, not twice
    assert models.reward_head(rm) is rm.score and rm.score.weight.requires_grad


def test_tiny_model_is_deterministic_and_uses_the_real_tokenizer(default, tiny_causal, tmp_path):
    rng = torch.random.get_rng_state()
    again = models.tiny_model_path(tmp_path / "a")
    other = models.tiny_model_path(tmp_path / "b", seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng)  # global RNG untouched
    sd, sd_again, sd_other = (plain_lm(p).state_dict() for p in (tiny_causal, again, other))
    torch.testing.assert_close(sd_again, sd, rtol=0, atol=0)
    assert not torch.equal(sd_other["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    config = json.loads((Path(tiny_causal) / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (V, 32, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 2, 64)
    tok = models.load_tokenizer(tiny_causal)
    assert tok.chat_template == models.load_tokenizer(default.path).chat_template and len(tok) == V

    reward = models.tiny_model_path(tmp_path / "r", kind="reward")
    rm = AutoModelForSequenceClassification.from_pretrained(reward, local_files_only=True)
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.pad_token_id == 16
    with pytest.raises(ValueError, match="kind"):
        models.tiny_model_path(tmp_path, kind="value")


def test_reward_model_refuses_a_checkpoint_whose_trunk_does_not_load(tiny_causal, tmp_path):
    """Weights saved under other names would leave a random trunk: that is an error, not a warning."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(tiny_causal).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    renamed = {k.replace("model.layers.1.", "model.blocks.1."): v for k, v in weights.items()}
    save_file(renamed, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"missing from the checkpoint.*layers\.1\."):
        models.load_reward_model(broken)
