"""Every family a user brings: the trainer's numbers equal the model's own forward.

Tiny random models (hidden 64, 4 layers, the default tokenizer) of ten families: Llama, Qwen2, Qwen3,
Mistral (a sliding window shorter than the batch), Gemma-2 and Gemma-3 (soft-capped logits, alternating
sliding / full attention), Phi-3, GPT-NeoX, GPT-2 (blocks in `transformer.h`, learned position embeddings)
and Granite (logits scaled after the head, embeddings scaled before the first layer). The head and
embedding weights are scaled up so the logits spread over several nats: a soft-cap, a scale or a
misplaced mask then moves a log-prob by far more than the kernels' error.

For each family, every per-token log-prob and entropy the trainer computes (logits path, fused-linear,
frozen prefix replayed, a reference on the policy's bottom, int8 / nf4 references, LoRA with the adapter on
and off) is compared with `log_softmax(model(...).logits / T)`, and every reward and value with the reward
model's own scalar head. Kernels run in Triton's interpreter. The wrong answers these reject: reading
the head's output instead of the model's logits (37 nats off for Gemma-2), replaying stored states as
`inputs_embeds` (the trunk scales or adds position embeddings to them again), cutting the layer list
(Gemma / Qwen index per-layer attention types by position), a 4D mask over a sliding window.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers

from fastrlhf.trainer import models
from fastrlhf.trainer.errors import UserError
from fastrlhf.trainer.family import decoder_layers, logit_transform
from fastrlhf.trainer.ppo import add_lora, critic_values, keep_top_layers, policy_forward, reward_scores, shares_bottom
from fastrlhf.trainer.rollout import Rollout, attention_mask_4d

T = 0.7
N_LAYERS, N_FROZEN = 3, 1  # an odd cut: alternating per-layer schedules (Gemma) change parity if misplaced
WINDOW = 6  # sliding window of the families that have one: shorter than the test batch (P + R = 14)


def _common(tok) -> dict:
    return dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=256,
    )


def family_configs(tok) -> dict:
    c = _common(tok)
    llama_like = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        **c,
    )
    return {
        "llama": transformers.LlamaConfig(**llama_like, tie_word_embeddings=True),
        "qwen2": transformers.Qwen2Config(
            **llama_like, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2
        ),
        "qwen3": transformers.Qwen3Config(**llama_like, head_dim=16),
        "mistral": transformers.MistralConfig(**llama_like, sliding_window=WINDOW),
        "gemma2": transformers.Gemma2Config(
            **llama_like, head_dim=16, sliding_window=WINDOW, final_logit_softcapping=3.0, query_pre_attn_scalar=16
        ),
        "gemma3": transformers.Gemma3TextConfig(
            **llama_like,
            head_dim=16,
            sliding_window=WINDOW,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=16,
            sliding_window_pattern=2,
        ),
        "phi3": transformers.Phi3Config(**llama_like),
        "gpt_neox": transformers.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            rotary_pct=0.5,
            **c,
        ),
        "gpt2": transformers.GPT2Config(
            n_embd=64,
            n_layer=N_LAYERS,
            n_head=4,
            n_positions=256,
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        "granite": transformers.GraniteConfig(
            **llama_like,
            logits_scaling=0.25,
            embedding_multiplier=4.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
        ),
    }


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox", "gpt2", "granite"]
SOFTCAPPED = {"gemma2", "gemma3"}
NO_REWARD_CLASS = {"granite"}  # transformers has no GraniteForSequenceClassification


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(models.default_model_path())


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """family -> (causal LM folder, reward model folder), built lazily and kept for the module."""
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(family: str):
        if family not in made:
            config = family_configs(tokenizer)[family]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = transformers.AutoModelForCausalLM.from_config(config)
                with torch.no_grad():  # logits spread over several nats (a tied head scales the embedding too)
                    model.get_output_embeddings().weight.mul_(8.0)
            model.generation_config = transformers.GenerationConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            causal = root / f"{family}-causal"
            model.save_pretrained(causal)
            tokenizer.save_pretrained(causal)
            reward = None
            if family not in NO_REWARD_CLASS:
                reward = root / f"{family}-reward"
                rm = models.load_reward_model(causal, tokenizer=tokenizer, seed=1)
                rm.config.reward_gain, rm.config.reward_bias = 2.0, -0.5
                rm.save_pretrained(reward)
                tokenizer.save_pretrained(reward)
            made[family] = (str(causal), str(reward))
        return made[family]

    return get


def make_rollout(tokenizer, gen: torch.Generator) -> Rollout:
    """Three rows: prompts of 3, 6 and 1 tokens left-padded to P = 6; replies of 8, 5 and 2 tokens
    right-padded to R = 8, the second ending with EOS. Token ids drawn from the ordinary vocabulary."""
    P, R, lengths, reply_lengths = 6, 8, [3, 6, 1], [8, 5, 2]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_ids = torch.full((3, P), pad)
    prompt_mask = torch.zeros(3, P, dtype=torch.long)
    response_ids = torch.full((3, R), pad)
    response_mask = torch.zeros(3, R, dtype=torch.long)
    for i, (n, m) in enumerate(zip(lengths, reply_lengths)):
        prompt_ids[i, P - n :] = torch.randint(100, 40000, (n,), generator=gen)
        prompt_mask[i, P - n :] = 1
        response_ids[i, :m] = torch.randint(100, 40000, (m,), generator=gen)
        response_mask[i, :m] = 1
    response_ids[1, 4] = eos
    return Rollout(
        prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor([False, True, False]), torch.arange(3)
    )


def rows(ro: Rollout):
    """Each row's real tokens, unpadded: (prompt ids, reply ids)."""
    for i in range(ro.prompt_ids.shape[0]):
        yield ro.prompt_ids[i][ro.prompt_mask[i].bool()], ro.response_ids[i][ro.response_mask[i].bool()]


@torch.no_grad()
def own_logprobs(model, ro: Rollout):
    """log_softmax(model(...).logits / T) at the reply tokens and the entropy (fp64 from the model's logits),
    (B, R), 0 at padding: the model's own forward on each row alone, unpadded (no mask, positions from 0)."""
    logp, entropy = (
        torch.zeros(ro.response_ids.shape, dtype=torch.float64),
        torch.zeros(ro.response_ids.shape, dtype=torch.float64),
    )
    for i, (prompt, reply) in enumerate(rows(ro)):
        logits = model(input_ids=torch.cat([prompt, reply])[None]).logits[0]  # (n, V)
        logp_all = torch.log_softmax(logits[len(prompt) - 1 : -1].double() / T, -1)  # (m, V)
        logp[i, : len(reply)] = logp_all.gather(-1, reply[:, None]).squeeze(-1)
        entropy[i, : len(reply)] = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@torch.no_grad()
def batched_logprobs(model, ro: Rollout):
    """As `own_logprobs`, from one batched call on the trainer's inputs (its 4D mask): for an int8 model,
    whose outlier columns depend on the batch's other rows."""
    P, R = ro.prompt_ids.shape[1], ro.response_ids.shape[1]
    mask = attention_mask_4d(model, ro.attention_mask)
    logits = model(input_ids=ro.sequences, attention_mask=mask, position_ids=ro.position_ids).logits
    logp_all = torch.log_softmax(logits[:, P - 1 : P + R - 1].double() / T, -1)  # (B, R, V)
    return logp_all.gather(-1, ro.response_ids[..., None]).squeeze(-1)


class Truth:
    """The model's own forward in fp64 (the oracle) and the bound for the trainer's fp32 pass: 4x the error
    of the model's own fp32 forward against fp64, + 8 fp32 ulps of the value. Twice the contract's 2x, because
    the trainer's batched pass (padding, a 4D mask) rounds differently from the oracle's unpadded rows
    through the whole trunk, not only in the kernel. The bounds come out at ~1e-5 to 1e-4, so a soft-cap,
    scale or mask mistake (>= 1e-2 here) cannot pass."""

    def __init__(self, model, ro: Rollout):
        import copy

        self.ro = ro
        self.logp, self.entropy = own_logprobs(copy.deepcopy(model).double(), ro)
        logp32, ent32 = own_logprobs(model, ro)
        m = ro.response_mask.bool()
        eps = torch.finfo(torch.float32).eps
        self.atol_logp = 4 * (logp32 - self.logp)[m].abs().max().item() + 8 * eps * self.logp[m].abs().max().item()
        self.atol_ent = 4 * (ent32 - self.entropy)[m].abs().max().item() + 8 * eps * self.entropy[m].abs().max().item()

    def check(self, out, what: str, entropy: bool = True):
        assert_matches(out.logp, self.logp, self.ro, f"{what} logp", self.atol_logp)
        if entropy:
            assert_matches(out.entropy, self.entropy, self.ro, f"{what} entropy", self.atol_ent)


def assert_matches(got, want, ro: Rollout, what: str, atol: float):
    m = ro.response_mask.bool()
    err = (got.double() - want.double())[m].abs().max().item()
    assert err <= atol, f"{what}: max |error| {err:.3g} > {atol:.3g}"


def load_policy(path, tokenizer):
    return models.load_causal_lm(path, tokenizer=tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_logprobs_equal_the_models_own(family, folders, tokenizer, gen):
    """Logits path, frozen prefix replayed (logits and fused-linear), fused-linear (or its refusal)."""
    causal, _ = folders(family)
    policy = load_policy(causal, tokenizer)
    ro = make_rollout(tokenizer, gen)
    truth = Truth(policy, ro)
    spread = truth.logp[ro.response_mask.bool()]
    assert spread.max() - spread.min() > 2.0, "the test needs logits that spread over nats"
    assert truth.atol_logp < 1e-3, truth.atol_logp
    with torch.no_grad():
        full = policy_forward(policy, ro, T, kernels=True, capture=N_FROZEN)
        truth.check(full, f"{family} logits path")
        truth.check(
            policy_forward(policy, ro, T, True, prefix=full.states, n_frozen=N_FROZEN), f"{family} frozen prefix"
        )
        if family in SOFTCAPPED:
            with pytest.raises(
                UserError, match=rf"--fused-linear: {family}\w* soft-caps its logits.*without --fused-linear"
            ):
                policy_forward(policy, ro, T, True, fused_linear=True)
            return
        truth.check(policy_forward(policy, ro, T, True, fused_linear=True), f"{family} fused-linear")
        fused_replay = policy_forward(policy, ro, T, True, prefix=full.states, n_frozen=N_FROZEN, fused_linear=True)
        truth.check(fused_replay, f"{family} fused-linear frozen prefix")


@pytest.mark.parametrize("family", FAMILIES)
def test_references_equal_their_own_forward(family, folders, tokenizer, gen):
    """A reference on the policy's frozen bottom (unquantized: it must equal the policy's own forward),
    and int8 (nf4 for three families) references against their own forward on the same inputs (the
    trainer reads the quantized model's own logits, so only the kernel's log-softmax error remains)."""
    causal, _ = folders(family)
    policy = load_policy(causal, tokenizer)
    ro = make_rollout(tokenizer, gen)
    truth = Truth(policy, ro)
    with torch.no_grad():
        states = policy_forward(policy, ro, T, True, capture=N_FROZEN).states
        top = models.load_reference_model(causal, quant="none", tokenizer=tokenizer)
        keep_top_layers(top, N_FROZEN)
        assert sum(p.numel() for layer in decoder_layers(top)[:N_FROZEN] for p in layer.parameters()) == 0
        truth.check(policy_forward(top, ro, T, True, prefix=states), f"{family} reference on the shared bottom")
        quants = ["int8"] + (["nf4"] if family in ("llama", "qwen2", "gemma2") else [])
        for quant in quants:
            ref = models.load_reference_model(causal, quant=quant, tokenizer=tokenizer)
            got = policy_forward(ref, ro, T, True)
            assert_matches(got.logp, batched_logprobs(ref, ro), ro, f"{family} {quant} reference", 2e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_lora_adapter_on_and_off(family, folders, tokenizer, gen):
    """LoRA on the top layers: the adapter changes the log-probs, and with it disabled they are the base's."""
    causal, _ = folders(family)
    policy = load_policy(causal, tokenizer)
    ro = make_rollout(tokenizer, gen)
    base = Truth(policy, ro)
    peft_model = add_lora(policy, r=4, alpha=8, n_frozen=N_FROZEN)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=gen)
        adapted = Truth(policy, ro)
        assert (adapted.logp - base.logp)[ro.response_mask.bool()].abs().max() > 1e-2, "the adapter must matter"
        adapted.check(policy_forward(policy, ro, T, True), f"{family} LoRA on")
        with peft_model.disable_adapter():
            base.check(policy_forward(policy, ro, T, True), f"{family} LoRA off")


def test_a_family_without_a_reward_class_is_refused(folders, tokenizer):
    causal, _ = folders("granite")
    with pytest.raises(
        UserError, match="transformers has no sequence classifier .reward model. class for the 'granite' family"
    ):
        models.load_reward_model(causal, tokenizer=tokenizer)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NO_REWARD_CLASS])
def test_rewards_and_values_equal_the_models_own_head(family, folders, tokenizer, gen):
    causal, reward = folders(family)
    rm = models.load_reward_model(reward, tokenizer=tokenizer)
    policy = load_policy(causal, tokenizer)
    ro = make_rollout(tokenizer, gen)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    scored = ro.with_eos(eos, pad)  # what PPO scores: EOS appended to the two rows that have none
    P, R = ro.prompt_ids.shape[1], ro.response_ids.shape[1]
    with torch.no_grad():
        own, want_values = torch.zeros(3), torch.zeros(ro.response_ids.shape)
        for i, (prompt, reply) in enumerate(rows(ro)):  # each row alone, unpadded, EOS-terminated as in train-rm
            seq = torch.cat([prompt, reply])[None]
            ended = torch.cat([prompt, reply, torch.tensor([eos] * int(not ro.has_eos[i]), dtype=torch.long)])[None]
            own[i] = rm(input_ids=ended).logits[0, 0]
            values = models.reward_head(rm)(rm.base_model(input_ids=seq).last_hidden_state)[0, :, 0]  # (n,)
            want_values[i, : len(reply)] = values[len(prompt) - 1 : -1]
        want = own * 2.0 - 0.5  # the saved gain / bias
        assert torch.allclose(reward_scores(rm, scored, kernels=True), want, atol=1e-5), family
        assert shares_bottom(policy, rm, N_FROZEN), "the reward model was built from the policy's weights"
        states = policy_forward(policy, scored, T, True, capture=N_FROZEN).states  # as PPO's pass with a shared RM
        assert torch.allclose(reward_scores(rm, scored, True, prefix=states, n_frozen=N_FROZEN), want, atol=1e-5), (
            family
        )
        values, _ = critic_values(rm, None, ro, None)
        assert_matches(values, want_values, ro, f"{family} critic values", 1e-5)
        values, _ = critic_values(rm, None, ro, None, prefix=states[:, : P + R], n_frozen=N_FROZEN)
        assert_matches(values, want_values, ro, f"{family} critic values on the shared bottom", 1e-5)


def test_logit_transform_is_read_from_the_config(tokenizer):
    configs = family_configs(tokenizer)
    assert logit_transform(configs["gemma2"]).softcap == 3.0
    assert logit_transform(configs["granite"]).scale == 4.0
    assert logit_transform(configs["llama"]) == logit_transform(configs["gpt2"]) == logit_transform(configs["qwen3"])


# ------------------------------------------------------------------------------- the commands, per family
PROMPTS = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-data")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    pairs = root / "pairs.jsonl"
    rows = [
        {"prompt": p, "chosen": f"A good answer {i}.", "rejected": f"bad {i} bad"} for i, p in enumerate(PROMPTS * 2)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prompts, pairs


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NO_REWARD_CLASS])
def test_train_rm_and_one_ppo_step(family, folders, data, tmp_path, caplog):
    """`train-rm` one epoch (bottom layer frozen and cached) and `ppo` one step with an int8 reference
    on the policy's shared bottom, through the commands' own functions."""
    from fastrlhf.trainer.config import PPOConfig, RewardConfig
    from fastrlhf.trainer.ppo import train_ppo
    from fastrlhf.trainer.reward import train_reward_model

    caplog.set_level(logging.INFO, logger="fastrlhf")
    causal, _ = folders(family)
    prompts, pairs = data
    rm_out = tmp_path / "rm"
    summary = train_reward_model(
        RewardConfig(
            pairs=str(pairs),
            val_pairs=str(pairs),
            test_pairs=str(pairs),
            out_dir=str(rm_out),
            model=causal,
            epochs=1,
            batch_pairs=4,
            freeze_layers=N_FROZEN,
            device="cpu",
        )
    )
    assert "disagrees with the full trunk" not in caplog.text, "the frozen-prefix cache must be exact"
    assert "cached the frozen prefix" in caplog.text
    assert summary["test"]["pairs"] == 8
    result = train_ppo(
        PPOConfig(
            reward_model=str(rm_out / "model"),
            out_dir=str(tmp_path / "ppo"),
            policy=causal,
            prompts=str(prompts),
            ref_quant="int8",
            freeze_layers=N_FROZEN,
            steps=1,
            batch_prompts=4,
            minibatch_size=4,
            ppo_epochs=1,
            max_new_tokens=4,
            device="cpu",
        )
    )
    record = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert result["steps"] == 1
    assert record["policy/logratio_dev_first"] < 1e-4, "the update's first pass replays the frozen prefix exactly"
    assert all(v == v for v in record.values() if isinstance(v, float)), "no NaN in the step's log"


# ------------------------------------------------------------------- a reward model with its own tokenizer
def test_reward_model_with_its_own_tokenizer_reads_retokenized_text(folders, tokenizer, data, tmp_path):
    """A reward model whose tokenizer renders chats differently (here: no chat template, so the plain
    "user: ...\\nassistant:" text) scores the policy's replies as its own forward scores that text; PPO runs
    with it and a value head, and refuses a critic copied from it."""
    from fastrlhf.trainer.config import PPOConfig
    from fastrlhf.trainer.data import encode_prompt
    from fastrlhf.trainer.ppo import train_ppo
    from fastrlhf.trainer.reward import score_texts

    causal, reward = folders("llama")
    foreign = tmp_path / "rm-plain"
    rm = models.load_reward_model(reward, tokenizer=tokenizer)
    rm.save_pretrained(foreign)
    plain = models.load_tokenizer(reward, padding_side="right")
    plain.chat_template = None
    plain.save_pretrained(foreign)
    rm_tok = models.load_tokenizer(foreign, padding_side="right")
    assert not models.same_tokenization(tokenizer, rm_tok)
    prompts = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Say hi."}]]
    replies = ["Blue.", "Hi there, how"]
    got = score_texts(rm, rm_tok, prompts, replies)
    for i in range(2):
        text = "user: " + prompts[i][0]["content"] + "\nassistant:"
        assert encode_prompt(rm_tok, prompts[i]) == rm_tok.encode(text, add_special_tokens=False)
        ids = rm_tok.encode(text, add_special_tokens=False) + rm_tok.encode(replies[i], add_special_tokens=False)
        ids += [rm_tok.eos_token_id]  # as train-rm: every reply ends in EOS, a cut-off one too
        own = rm(input_ids=torch.tensor([ids])).logits[0, 0] * 2.0 - 0.5
        assert abs(float(got[i]) - float(own)) < 1e-5
    prompts_file, _ = data
    base = dict(
        reward_model=str(foreign),
        policy=causal,
        prompts=str(prompts_file),
        ref_quant="none",
        steps=1,
        batch_prompts=2,
        minibatch_size=2,
        ppo_epochs=1,
        max_new_tokens=3,
        device="cpu",
    )
    with pytest.raises(UserError, match="--critic separate copies the reward model.*--critic value-head"):
        train_ppo(PPOConfig(**base, out_dir=str(tmp_path / "a")))
    result = train_ppo(PPOConfig(**base, critic="value-head", out_dir=str(tmp_path / "b")))
    record = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert result["steps"] == 1 and record["perf/time/rm_retokenized_s"] > 0


# --------------------------------------------------------------------------------------- the CLI's errors
def run_cli(argv, capsys) -> str:
    """`fastrlhf ARGV` in this process -> what it printed to stderr; it must exit 2."""
    from fastrlhf.trainer import cli

    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_cli_user_errors_are_one_line(folders, data, tmp_path, capsys):
    causal, reward = folders("gemma2")
    prompts, pairs = data
    err = run_cli(["ppo", "--reward-model", "/no/such/dir", "--prompts", str(prompts), "--device", "cpu"], capsys)
    assert err.strip().splitlines()[-1].startswith("fastrlhf ppo: error: --reward-model /no/such/dir: does not exist")
    err = run_cli(["eval-rm", "--model", causal, "--pairs", str(pairs), "--device", "cpu"], capsys)
    assert "fastrlhf eval-rm: error: --model" in err and "never trained" in err and f"train-rm --model {causal}" in err
    err = run_cli(["train-rm", "--pairs", str(tmp_path / "none.jsonl"), "--device", "cpu"], capsys)
    assert "fastrlhf train-rm: error:" in err and "no such file or folder" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a"}\n')
    err = run_cli(["train-rm", "--pairs", str(bad), "--device", "cpu"], capsys)
    assert "fastrlhf train-rm: error:" in err and "line 1" in err and "rejected" in err
    err = run_cli(
        [
            "ppo",
            "--policy",
            causal,
            "--reward-model",
            reward,
            "--prompts",
            str(prompts),
            "--fused-linear",
            "--ref-quant",
            "none",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path / "p"),
        ],
        capsys,
    )
    assert "fastrlhf ppo: error: --fused-linear: gemma2 soft-caps its logits" in err


def test_cli_debug_shows_the_traceback(data, tmp_path):
    from fastrlhf.trainer import cli

    with pytest.raises(UserError, match="no such file"):
        cli.main(["train-rm", "--pairs", str(tmp_path / "none.jsonl"), "--device", "cpu", "--debug"])
