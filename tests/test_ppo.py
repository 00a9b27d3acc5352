"""PPO loop end to end on tiny random models: step-0 sanity, resume equality, the quantized-reference
paths (bitsandbytes int8 / nf4 run on CPU), LoRA with the adapter-disabled reference, the value-head
critic, kernel/eager parity, the critic-free estimators (grpo / rloo) and the non-finite guard."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastrlhf.trainer import ppo as ppo_module
from fastrlhf.trainer.config import PPOConfig
from fastrlhf.trainer.errors import UserError
from fastrlhf.trainer.models import tiny_model_path
from fastrlhf.trainer.ppo import NonFiniteError, prompt_batch, train_ppo

# wall-clock and memory fields differ run to run; everything else must match exactly
VOLATILE = ("perf/",)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo-models")
    return tiny_model_path(d), tiny_model_path(d, kind="reward", seed=1)


def _cfg(models, out, **kw) -> PPOConfig:
    policy, rm = models
    base = dict(
        policy=policy,
        reward_model=rm,
        out_dir=str(out),
        ref_quant="none",
        steps=1,
        batch_prompts=4,
        minibatch_size=2,
        ppo_epochs=1,
        max_new_tokens=5,
        freeze_layers=1,
        save_every=1,
        seed=3,
        kernels=False,
    )  # (eager twins: the interpreter is slow; parity below)
    base.update(kw)
    return PPOConfig(**base)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


@pytest.mark.parametrize("freeze_layers", [1, 0])  # frozen-prefix cache on / full fine-tune
def test_step0_sanity_policy_equals_reference(models, tmp_path, freeze_layers):
    """Unquantized reference == starting policy: ratio 1 on the first minibatch and KL 0, to float error."""
    result = train_ppo(_cfg(models, tmp_path, freeze_layers=freeze_layers, kernels=True))
    (rec,) = _records(tmp_path)
    assert result["steps"] == 1 and result["final"] == rec
    assert rec["policy/logratio_dev_first"] < 1e-5
    assert abs(rec["objective/kl"]) < 1e-6 and abs(rec["objective/kl_k3"]) < 1e-9
    assert rec["objective/kl_floor_full"] < 1e-6
    # the sampler's log-probs are the trainer's on the same tokens (fp32): a shifted column is off by nats
    assert rec["sampler/logprob_diff_max"] < 1e-4 and rec["sampler/ratio_outside"] == 0.0
    assert rec["step"] == 1 and 0 < rec["policy/response_length"] <= 5
    assert (tmp_path / "policy" / "config.json").exists()


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_reference_logs_kl_floor(models, tmp_path, quant):
    """bitsandbytes references run on CPU; their step-0 KL to the (equal) policy is the quantization floor."""
    train_ppo(_cfg(models, tmp_path, ref_quant=quant))
    (rec,) = _records(tmp_path)
    assert rec["objective/kl_floor_full"] > 0 and rec["objective/kl_floor_full"] < 1.0
    assert rec["policy/logratio_dev_first"] < 1e-5  # the policy side is unaffected by the reference's precision


def test_reference_on_the_policys_frozen_bottom(models, tmp_path):
    """ref_shares_bottom: the int8 reference keeps its top layer only and reads the policy's cached bottom
    (the starting model's, exact): its step-0 KL floor comes from 1 quantized layer of 2, so it is smaller
    than the whole int8 model's; the policy side is unchanged."""
    floors = {}
    for shares in (True, False):
        train_ppo(_cfg(models, tmp_path / str(shares), ref_quant="int8", ref_shares_bottom=shares))
        (rec,) = _records(tmp_path / str(shares))
        floors[shares] = rec["objective/kl_floor_full"]
        assert rec["policy/logratio_dev_first"] < 1e-5
    assert 0 < floors[True] < floors[False], floors


@pytest.mark.parametrize(
    "setting",
    [
        dict(adaptive_kl=True, kl_target=1e-3),  # PPO: the adaptive KL controller's state is restored
        dict(advantage="rloo", kl_in="loss", samples_per_prompt=2, batch_prompts=2),  # critic-free
    ],
    ids=["ppo", "rloo"],
)
def test_resume_equals_uninterrupted(models, tmp_path, monkeypatch, setting):
    """Kill a 3-step run after its step-2 checkpoint, resume it: the metrics equal an uninterrupted run's."""
    cfg = _cfg(models, tmp_path / "full", steps=3, ppo_epochs=2, **setting)
    train_ppo(cfg)
    full = [_stable(r) for r in _records(tmp_path / "full")]
    save = ppo_module.atomic_save

    def save_then_die(obj, path):
        save(obj, path)
        if obj["step"] == 2:
            raise KeyboardInterrupt

    cut = replace(cfg, out_dir=str(tmp_path / "cut"))
    monkeypatch.setattr(ppo_module, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_ppo(cut)
    monkeypatch.setattr(ppo_module, "atomic_save", save)
    torch.manual_seed(12345)  # the resumed run must not depend on the caller's RNG
    train_ppo(replace(cut, resume=True))
    resumed = [_stable(r) for r in _records(tmp_path / "cut")]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed == full
    if cfg.adaptive_kl:  # the controller moved, and was restored
        assert full[2]["objective/kl_coef"] != full[0]["objective/kl_coef"]
    else:  # a critic-free checkpoint does not resume a PPO run
        with pytest.raises(UserError, match="critic"):
            train_ppo(replace(cut, resume=True, advantage="gae", steps=4))


def test_lora_policy_with_adapter_disabled_reference(models, tmp_path):
    train_ppo(_cfg(models, tmp_path, lora_r=4, ref_from_adapter=True, critic="value-head"))
    (rec,) = _records(tmp_path)
    assert abs(rec["objective/kl"]) < 1e-6  # a fresh adapter is the identity: the policy equals its base
    assert (tmp_path / "policy" / "model.safetensors").exists()  # merged, plain transformers folder


def test_ref_from_adapter_refusals(models, tmp_path):
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        train_ppo(_cfg(models, tmp_path, ref_from_adapter=True))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="already-trained LoRA adapter"):
        train_ppo(_cfg(models, tmp_path, policy=str(adapter), lora_r=4, ref_from_adapter=True))


@pytest.mark.parametrize("fused_linear", [False, True])  # logits + one-pass ppo_head / no logits at all
def test_kernels_match_eager_twins(models, tmp_path, fused_linear):
    """Two PPO steps with the Triton kernels (interpreter) and with the eager twins: the same curves."""
    runs = {}
    for kernels in (True, False):
        out = tmp_path / str(kernels)
        train_ppo(_cfg(models, out, kernels=kernels, kl_estimator="full", steps=2, fused_linear=fused_linear))
        runs[kernels] = [_stable(r) for r in _records(out)]
    assert len(runs[True]) == len(runs[False]) == 2
    for fast, eager in zip(runs[True], runs[False]):
        for key in (
            "objective/score",
            "objective/kl",
            "objective/kl_full",
            "policy/entropy",
            "policy/loss",
            "value/loss",
            "policy/approx_kl",
            "policy/clipfrac",
            "policy/ratio_mean",
        ):
            assert fast[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("advantage,kl_in,loss_agg", [("grpo", "loss", "sequence"), ("rloo", "reward", "token")])
def test_critic_free_step0_ratio_one_and_no_critic(models, tmp_path, advantage, kl_in, loss_agg):
    """grpo / rloo through the one-pass kernel head: ratio 1 on the first minibatch, no critic anywhere (no
    value/ keys, nothing in the checkpoint), the KL term logged only when it is in the loss."""
    cfg = _cfg(
        models, tmp_path, kernels=True, advantage=advantage, kl_in=kl_in, loss_agg=loss_agg, samples_per_prompt=2
    )
    train_ppo(cfg)
    (rec,) = _records(tmp_path)
    assert rec["policy/logratio_dev_first"] < 1e-5
    assert abs(rec["objective/kl"]) < 1e-6
    assert not [key for key in rec if key.startswith("value/")]
    assert ("policy/kl_loss" in rec) == (kl_in == "loss")
    if kl_in == "loss":
        assert 0 <= rec["policy/kl_loss"] < 1e-2 and rec["objective/non_score_reward"] == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["value"] is None and ckpt["vopt"] is None


@pytest.mark.parametrize("fused_linear", [False, True])  # ppo_head's k3 / kl_estimate's, each beside its twin
def test_critic_free_kernels_match_eager_twins(models, tmp_path, fused_linear):
    """Two GRPO steps, KL in the loss, per-sequence aggregation: the kernels and the eager twins agree."""
    runs = {}
    for kernels in (True, False):
        out = tmp_path / str(kernels)
        train_ppo(
            _cfg(
                models,
                out,
                kernels=kernels,
                steps=2,
                fused_linear=fused_linear,
                advantage="grpo",
                kl_in="loss",
                loss_agg="sequence",
                samples_per_prompt=2,
                kl_coef=0.5,
            )
        )
        runs[kernels] = [_stable(r) for r in _records(out)]
    assert len(runs[True]) == len(runs[False]) == 2
    for fast, eager in zip(runs[True], runs[False]):
        for key in (
            "objective/score",
            "objective/kl",
            "policy/entropy",
            "policy/loss",
            "policy/kl_loss",
            "policy/approx_kl",
            "policy/clipfrac",
            "policy/ratio_mean",
            "policy/grad_norm",
        ):
            # the surrogate of group-centred advantages at ratio ~1 averages to ~0: its difference is the
            # log-probs' float error (~1e-6) times advantages of ~1, absolute
            assert fast[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-5 if key == "policy/loss" else 1e-6), key
    assert runs[True][1]["policy/kl_loss"] > 0  # the policy moved away from the reference in step 1


def test_verifiable_reward_fn_drives_the_group_advantages(models, tmp_path, monkeypatch):
    """--reward rubric with a reward function that gives every reply 2: the score is 2, every group is
    all-equal, so RLOO's advantages and the surrogate are exactly 0. No reward model is read (its path does
    not exist here)."""
    (tmp_path / "const_reward.py").write_text("def two(prompts, replies, meta):\n    return [2.0] * len(replies)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    train_ppo(
        _cfg(
            models,
            tmp_path / "run",
            advantage="rloo",
            kl_in="loss",
            samples_per_prompt=2,
            reward="rubric",
            reward_fn="const_reward:two",
            missing_eos_penalty=None,
            reward_model=str(tmp_path / "no-reward-model"),
        )
    )
    (rec,) = _records(tmp_path / "run")
    assert rec["objective/score"] == rec["objective/check"] == 2.0
    assert "objective/rm_score" not in rec
    assert rec["policy/loss"] == 0.0


def test_critic_learns_predictable_returns(models, tmp_path, monkeypatch):
    """Returns that the prompt alone decides: a reward of +1 for one kind of prompt and -1 for the other, no KL,
    a policy that does not move (lr 0). The critic must learn them: explained variance from below 0.3 at step 1
    to above 0.8 by step 6 (-1.05 -> 0.98 measured; with the critic's lr at 0 it stays between -1.05 and -0.44).
    A critic read at the wrong positions, fit to another target or not updated stays near or below 0."""
    rows = [{"prompt": f"Topic {w}: say something."} for w in ("apples", "rivers", "stones", "clouds")]
    rows += [{"prompt": f"Please write about {w} now."} for w in ("apples", "rivers", "stones", "clouds")]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "by_prompt.py").write_text(
        "def reward(prompts, replies, meta):\n"
        "    return [1.0 if p[-1]['content'].startswith('Topic') else -1.0 for p in prompts]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _cfg(
        models,
        tmp_path / "run",
        prompts=str(tmp_path / "prompts.jsonl"),
        reward="rubric",
        reward_fn="by_prompt:reward",
        missing_eos_penalty=None,
        score_clip=None,
        kl_coef=0.0,
        lr=0.0,
        critic_lr=3e-3,
        vf_coef=1.0,
        steps=6,
        batch_prompts=8,
        minibatch_size=4,
        ppo_epochs=4,
        freeze_layers=0,
        save_every=100,
    )
    train_ppo(cfg)
    ev = [r["value/explained_variance"] for r in _records(tmp_path / "run")]
    assert ev[0] < 0.3 and ev[-1] > 0.8, ev


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_lr_schedule_of_both_optimizers(schedule):
    """Over a 4-step run, stepped once per rollout: linear decays lr and critic lr by a quarter a step, constant
    keeps both (a schedule read from the wrong field, or applied to one optimizer only, fails)."""
    trainable = SimpleNamespace(policy=torch.nn.Linear(2, 2), value_module=torch.nn.Linear(2, 1))
    cfg = PPOConfig(steps=4, lr=1e-4, critic_lr=4e-4, lr_schedule=schedule)
    optim = ppo_module.make_optimizers(cfg, trainable)
    lrs = []
    for _ in range(4):
        lrs += [optim.opt.param_groups[0]["lr"], optim.vopt.param_groups[0]["lr"]]
        for opt, sched in ((optim.opt, optim.sched), (optim.vopt, optim.vsched)):
            opt.step()  # no gradients: a no-op, in the order torch expects
            sched.step()
    factors = [1.0, 0.75, 0.5, 0.25] if schedule == "linear" else [1.0] * 4
    assert lrs == pytest.approx([lr * f for f in factors for lr in (1e-4, 4e-4)])


@pytest.mark.parametrize("cap", [None, 2.0])
def test_behaviour_mismatch_logged_and_importance_weighted(models, tmp_path, monkeypatch, cap):
    """A constructed sampler/trainer mismatch: the sampler's log-probs are shifted up by 30 nats on every reply
    token, so the trainer's ratio to the sampler is e^-30. The log reports the shift; with `--behaviour-is-cap`
    every policy-gradient term is weighted by e^-30, so the policy does not move (no KL or entropy term here),
    while without the cap the same rollout moves it by ~lr."""
    real_sample = ppo_module.sample
    masks = []

    def shifted(*args, **kwargs):
        ro = real_sample(*args, **kwargs)
        masks.append(ro.response_mask)
        return replace(ro, behaviour_logprobs=(ro.behaviour_logprobs + 30.0) * ro.response_mask)

    monkeypatch.setattr(ppo_module, "sample", shifted)
    out = tmp_path / "run"
    train_ppo(_cfg(models, out, lr=1e-3, kl_coef=0.0, minibatch_size=4, behaviour_is_cap=cap))
    (rec,) = _records(out)
    assert abs(rec["sampler/logprob_diff_mean"] - 30.0) < 1e-3 and abs(rec["sampler/logprob_diff_max"] - 30.0) < 1e-3
    assert rec["sampler/ratio_outside"] == 1.0
    start = AutoModelForCausalLM.from_pretrained(models[0]).state_dict()
    end = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
    moved = max(float((end[name] - p).abs().max()) for name, p in start.items())
    if cap is None:
        assert "sampler/is_weight_mean" not in rec and moved > 5e-4
    else:  # AdamW's weight decay alone: lr * 0.01 * |p| < 1e-4 here
        assert rec["sampler/is_weight_mean"] < 1e-12 and rec["sampler/is_capped"] == 0.0
        assert moved < 1e-4, moved


def test_cuda_graphs_reach_the_sampler(models, tmp_path, monkeypatch):
    """--cuda-graphs asks the sampler for its compiled decode step (which it ignores off CUDA: the run works)."""
    real_sample, seen = ppo_module.sample, []
    monkeypatch.setattr(ppo_module, "sample", lambda *a, **k: seen.append(k["compile"]) or real_sample(*a, **k))
    train_ppo(_cfg(models, tmp_path, cuda_graphs=True))
    assert seen == [True]


def test_behaviour_is_cap_needs_the_samplers_logprobs(models, tmp_path, monkeypatch):
    real_sample = ppo_module.sample
    monkeypatch.setattr(ppo_module, "sample", lambda *a, **k: replace(real_sample(*a, **k), behaviour_logprobs=None))
    with pytest.raises(UserError, match="behaviour-is-cap needs the sampler's log-probs"):
        train_ppo(_cfg(models, tmp_path, behaviour_is_cap=2.0))
    with pytest.raises(UserError, match="must be > 0"):
        train_ppo(_cfg(models, tmp_path, behaviour_is_cap=0.0))


def test_critic_free_needs_a_group(models, tmp_path):
    with pytest.raises(UserError, match="samples-per-prompt >= 2"):
        train_ppo(_cfg(models, tmp_path, advantage="grpo"))


def test_non_finite_loss_stops_before_update(models, tmp_path, monkeypatch):
    def nan_loss(logp, *args, **kwargs):
        return logp.sum() * float("nan"), {"clipfrac": torch.tensor(0.0)}

    steps = []
    monkeypatch.setattr(ppo_module.rl, "policy_loss", nan_loss)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    with pytest.raises(NonFiniteError, match="policy loss is not finite"):
        train_ppo(_cfg(models, tmp_path))
    assert steps == [] and not (tmp_path / "checkpoint.pt").exists()


def test_non_finite_gradient_names_the_parameters():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    net(torch.ones(1, 3)).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    norm = ppo_module.clip_gradients("policy gradient norm", net, list(net.parameters()), 1e9, 2)
    assert norm == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item())  # not clipped
    ppo_module.clip_gradients("policy gradient norm", net, list(net.parameters()), 0.5 * norm, 2)
    for p, g in zip(net.parameters(), grads):
        torch.testing.assert_close(p.grad, 0.5 * g, rtol=1e-5, atol=0)  # clipped to half
    net[1].weight.grad[0, 1] = float("nan")
    with pytest.raises(
        NonFiniteError,
        match=r"step 2: policy gradient norm is not finite in 1 parameters' "
        r"gradients \(1.weight\)",
    ):
        ppo_module.clip_gradients("policy gradient norm", net, list(net.parameters()), 1.0, 2)


def test_prompt_batches_cover_every_prompt_each_pass():
    n, batch = 10, 4
    seen = [i for step in range(5) for i in prompt_batch(n, step, batch, seed=1)]  # 20 = two passes
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a fresh order per pass
    assert prompt_batch(n, 3, batch, seed=1) == seen[12:16]
