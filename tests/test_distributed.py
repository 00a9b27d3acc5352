"""Training under torchrun on CPU (gloo, 2 processes, tiny models): reward-model training with DDP and FSDP2
and PPO with DDP give the 1-process curves to float rounding, and checkpoints written by 2 processes
resume in 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fastrlhf.trainer import dist as D
from fastrlhf.trainer import reward as R
from fastrlhf.trainer.config import PipelineConfig, PPOConfig, RewardConfig
from fastrlhf.trainer.data import load_demo_prompts
from fastrlhf.trainer.models import tiny_model_path
from fastrlhf.trainer.pipeline import run_pipeline
from fastrlhf.trainer.ppo import train_ppo

COMPARED = ("loss", "accuracy", "reward_mean", "reward_std", "gap_mean", "grad_norm", "lr")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama and 48 pairs (right answer vs a wrong one): 39 train pairs, so the steps of
    8 pairs end with a 7-pair step whose micro-batches split unevenly over 2 ranks."""
    root = tmp_path_factory.mktemp("dist")
    prompts = load_demo_prompts()[:48]
    rows = [
        {"prompt": p.prompt, "chosen": f"{p.meta['answer']}.", "rejected": f"Maybe {q.meta['answer']}?"}
        for p, q in zip(prompts, prompts[1:] + prompts[:1])
    ]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, tiny_model_path(root)


def _args(setup, out: str, freeze: int, **kw) -> dict:
    root, model = setup
    args = dict(
        pairs=str(root / "prefs.jsonl"),
        out_dir=str(root / out),
        model=model,
        epochs=1,
        batch_pairs=4,
        grad_accum=2,
        lr=2e-3,
        max_length=48,
        freeze_layers=freeze,
        save_every=3,
        device="cpu",
    )
    return {**args, **kw}


def _torchrun(args: dict, parallel: str, nproc: int = 2, command: str = "train-rm") -> subprocess.CompletedProcess:
    flags = []
    for k, v in args.items():
        name = "--" + k.replace("_", "-")
        flags += ([name] if v else [f"--no-{k.replace('_', '-')}"]) if isinstance(v, bool) else [name, str(v)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "fastrlhf.trainer.cli",
        command,
        *flags,
        "--parallel",
        parallel,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _train_log(out) -> list[dict]:
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    return [{k: r[k] for k in COMPARED} for r in rows if r["split"] == "train"]


def _assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (k, ra, rb)


@pytest.mark.parametrize(("parallel", "freeze"), [("ddp", 1), ("fsdp2", 0)])  # with / without the prefix cache
def test_two_processes_match_one(setup, parallel, freeze):
    R.train_reward_model(RewardConfig(**_args(setup, f"one-{parallel}", freeze)))
    _torchrun(_args(setup, f"two-{parallel}", freeze), parallel)
    root = setup[0]
    _assert_same_curve(_train_log(root / f"two-{parallel}"), _train_log(root / f"one-{parallel}"))
    one = AutoModelForSequenceClassification.from_pretrained(root / f"one-{parallel}" / "model").state_dict()
    two = AutoModelForSequenceClassification.from_pretrained(root / f"two-{parallel}" / "model").state_dict()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    summary = json.loads((root / f"two-{parallel}" / "summary.json").read_text())
    assert summary["finished"] and summary["test"]["pairs"] > 0
    assert torch.load(root / f"two-{parallel}" / "checkpoint.pt", weights_only=False)["world_size"] == 2


def test_fsdp_param_dtype_choice():
    assert D.fsdp_param_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert D.fsdp_param_dtype("auto", torch.device("cpu")) == torch.float32
    assert D.fsdp_param_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert D.fsdp_param_dtype("fp32", torch.device("cuda", 0)) == torch.float32
    with pytest.raises(ValueError, match="fsdp_param_dtype must be"):
        D.fsdp_param_dtype("fp16", torch.device("cpu"))


def test_fsdp2_gathers_and_computes_in_bf16(setup):
    """--fsdp-param-dtype bf16 (auto's choice on CUDA): FSDP2 gathers each layer in bf16 and computes in it,
    and reduces the gradients in fp32 into fp32 shards. On CPU the curve then follows the fp32 run's to bf16
    rounding, but is not the fp32 run's, and the saved model is fp32."""
    root = setup[0]
    if not (root / "two-fsdp2").exists():
        _torchrun(_args(setup, "two-fsdp2", 0), "fsdp2")
    done = _torchrun(_args(setup, "two-fsdp2-bf16", 0, fsdp_param_dtype="bf16"), "fsdp2")
    assert "parameters gathered in torch.bfloat16" in done.stderr
    bf16, fp32 = _train_log(root / "two-fsdp2-bf16"), _train_log(root / "two-fsdp2")
    assert len(bf16) == len(fp32) > 0
    assert any(a["loss"] != b["loss"] for a, b in zip(bf16, fp32))  # computed in bf16 indeed
    for a, b in zip(bf16, fp32):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2, abs=1e-2), (a, b)
        for k in ("reward_mean", "gap_mean"):  # O(1) rewards: bf16 moves them by ~1e-2 here
            assert a[k] == pytest.approx(b[k], abs=5e-2), (k, a, b)
    one = AutoModelForSequenceClassification.from_pretrained(root / "two-fsdp2" / "model").state_dict()
    two = AutoModelForSequenceClassification.from_pretrained(
        root / "two-fsdp2-bf16" / "model", torch_dtype="auto"
    ).state_dict()
    for k in one:
        assert two[k].dtype == torch.float32, k
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=3e-2)


def test_accelerate_launch_matches_one(setup):
    """`accelerate launch --multi_gpu` starts torchrun's workers (on CPU too: gloo); same curve as 1 process."""
    root = setup[0]
    if not (root / "one-ddp").exists():
        R.train_reward_model(RewardConfig(**_args(setup, "one-ddp", 1)))
    flags = []
    for k, v in _args(setup, "accelerate", 1).items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "-m",
        "fastrlhf.trainer.cli",
        "train-rm",
        *flags,
    ]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"accelerate launch failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert torch.load(root / "accelerate" / "checkpoint.pt", weights_only=False)["world_size"] == 2
    _assert_same_curve(_train_log(root / "accelerate"), _train_log(root / "one-ddp"))


def test_checkpoint_from_two_processes_resumes_in_one(setup):
    root = setup[0]
    _torchrun(_args(setup, "resume", 1, max_steps=3), "ddp")
    ckpt = torch.load(root / "resume" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    summary = R.train_reward_model(RewardConfig(**_args(setup, "resume", 1, resume=True)))
    assert summary["finished"]
    R.train_reward_model(RewardConfig(**_args(setup, "straight", 1)))
    _assert_same_curve(_train_log(root / "resume"), _train_log(root / "straight"))


# ------------------------------------------------------------------------------------------------- PPO
PPO_COMPARED = (
    "objective/score",
    "objective/score_penalized",
    "objective/kl",
    "objective/kl_k3",
    "objective/kl_seq",
    "objective/rlhf_reward",
    "objective/kl_coef",
    "policy/entropy",
    "policy/response_length",
    "policy/eos_rate",
    "policy/lr",
    "policy/logratio_dev_first",
    "policy/clipfrac",
    "policy/approx_kl",
    "policy/ratio_mean",
    "policy/loss",
    "policy/grad_norm",
    "value/explained_variance",
    "value/clipfrac",
    "value/loss",
    "value/grad_norm",
)


def _ppo_args(setup, out: str, **kw) -> dict:
    root, policy = setup
    rm = tiny_model_path(root, kind="reward", seed=1)
    args = dict(
        policy=policy,
        reward_model=rm,
        out_dir=str(root / out),
        ref_quant="none",
        steps=3,
        batch_prompts=5,
        samples_per_prompt=2,
        minibatch_size=4,
        grad_accum=2,
        ppo_epochs=2,
        max_new_tokens=5,
        freeze_layers=1,
        adaptive_kl=True,
        kl_target=1e-3,
        save_every=1,
        seed=3,
        kernels=False,
        device="cpu",
    )
    return {**args, **kw}


def _ppo_torchrun(args: dict, tmp_path) -> None:
    cfg = tmp_path / f"{os.path.basename(args['out_dir'])}.json"
    cfg.write_text(json.dumps(args))
    worker = os.path.join(os.path.dirname(__file__), "ppo_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", worker, str(cfg)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _ppo_log(out) -> list[dict]:
    return [json.loads(x) for x in open(out / "metrics.jsonl")]


def _assert_same_ppo(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for ra, rb in zip(a, b):
        for k in PPO_COMPARED:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra["step"], k, ra[k], rb[k])


def _ppo_one(setup, out: str = "ppo-one", **kw) -> None:
    import ppo_worker

    if not (setup[0] / out).exists():
        ppo_worker.run(PPOConfig(**_ppo_args(setup, out, **kw)))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_ppo_two_processes_match_one(setup, tmp_path, parallel):
    """5 prompts x 2 replies dealt 3 / 2 over the ranks; minibatches of 4 rows in 2 micro-batches, so
    some ranks hold none of a micro-batch; a separate critic, the frozen-prefix cache, adaptive KL. DDP
    replicates; FSDP2 shards the policy and the critic per layer (every pass a call of the model itself)."""
    _ppo_one(setup)
    _ppo_torchrun(_ppo_args(setup, f"ppo-{parallel}", parallel=parallel), tmp_path)
    root = setup[0]
    _assert_same_ppo(_ppo_log(root / f"ppo-{parallel}"), _ppo_log(root / "ppo-one"))
    one = AutoModelForCausalLM.from_pretrained(root / "ppo-one" / "policy").state_dict()
    two = AutoModelForCausalLM.from_pretrained(root / f"ppo-{parallel}" / "policy").state_dict()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_grpo_two_processes_match_one(setup, tmp_path, parallel):
    """Critic-free GRPO with the KL in the loss and per-sequence aggregation under DDP or FSDP2 (no critic to
    wrap, shard or checkpoint): the micro-batches, weighted by their rows and some held by one rank only, add
    up to one process's minibatch, so the curve and the weights are one process's."""
    kw = dict(advantage="grpo", kl_in="loss", loss_agg="sequence")
    _ppo_one(setup, "grpo-one", **kw)
    _ppo_torchrun(_ppo_args(setup, f"grpo-{parallel}", parallel=parallel, **kw), tmp_path)
    root = setup[0]
    two, one = _ppo_log(root / f"grpo-{parallel}"), _ppo_log(root / "grpo-one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for ra, rb in zip(two, one):
        assert not [k for k in ra if k.startswith("value/")]
        for k in (*(k for k in PPO_COMPARED if not k.startswith("value/")), "policy/kl_loss"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5 if k == "policy/loss" else 1e-6), (ra["step"], k)
    a = AutoModelForCausalLM.from_pretrained(root / "grpo-one" / "policy").state_dict()
    b = AutoModelForCausalLM.from_pretrained(root / f"grpo-{parallel}" / "policy").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_ppo_fsdp2_samples_in_lockstep_and_resumes_in_one(setup):
    """The command line with real sampling: replies of different lengths on the two ranks, so generation
    must step in lockstep (each token step gathers the sharded layers); a value head on the policy and a
    full fine-tune (the tied embedding / LM-head matrix trains, sharded); parameters gathered in bf16 (auto's
    choice on CUDA; the shards and the checkpoint stay fp32); the frozen reward model's trunk and reference
    sharded too, stored in bf16 (a rank holds half); the FSDP2 checkpoint resumes in one process."""
    root = setup[0]
    args = _ppo_args(
        setup,
        "ppo-fsdp2-cli",
        critic="value-head",
        freeze_layers=0,
        max_new_tokens=12,
        steps=3,
        max_steps=2,
        fsdp_param_dtype="bf16",
    )
    done = _torchrun(args, "fsdp2", command="ppo")
    assert "parameters gathered in torch.bfloat16" in done.stderr
    held = re.search(
        r"frozen models sharded too \(in torch.bfloat16\), rank 0 holds: reward model trunk ([\d.]+) of "
        r"([\d.]+) MB, reference ([\d.]+) of ([\d.]+) MB",
        done.stderr,
    )
    assert held, done.stderr[-3000:]
    mine, full = [float(x) for x in held.groups()[::2]], [float(x) for x in held.groups()[1::2]]
    assert all(0.4 * f <= m <= 0.6 * f for m, f in zip(mine, full)), held.group(0)  # half of each, 2 ranks
    assert 2.9 < full[0] < 3.2 and 2.9 < full[1] < 3.2, held.group(0)  # in bf16: 6.07 MB in fp32
    ckpt = torch.load(root / "ppo-fsdp2-cli" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2
    assert "model.embed_tokens.weight" in ckpt["policy"] and "lm_head.weight" not in ckpt["policy"]  # tied: once
    assert all(v.dtype == torch.float32 for v in ckpt["policy"].values())
    assert set(ckpt["value"]) == {"weight", "bias"}
    lengths = [r["policy/response_length"] for r in _ppo_log(root / "ppo-fsdp2-cli")]
    assert len(lengths) == 2
    summary = train_ppo(PPOConfig(**{**args, "max_steps": None, "resume": True}))
    assert summary["steps"] == 3 and (root / "ppo-fsdp2-cli" / "policy" / "config.json").exists()
    assert [r["step"] for r in _ppo_log(root / "ppo-fsdp2-cli")] == [1, 2, 3]


def test_ppo_checkpoint_from_two_processes_resumes_in_one(setup, tmp_path):
    import ppo_worker

    root = setup[0]
    _ppo_torchrun(_ppo_args(setup, "ppo-cut", max_steps=2), tmp_path)
    ckpt = torch.load(root / "ppo-cut" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rng_per_rank"]) == 2
    ppo_worker.run(PPOConfig(**_ppo_args(setup, "ppo-cut", resume=True)))
    _ppo_one(setup)
    _assert_same_ppo(_ppo_log(root / "ppo-cut"), _ppo_log(root / "ppo-one"))


def _pipeline_torchrun(setup, tmp_path, out: str, **kw) -> subprocess.CompletedProcess:
    root, model = setup
    args = dict(
        out_dir=str(root / out),
        model=model,
        limit=32,
        samples_per_prompt=4,
        max_new_tokens=32,
        gen_batch_size=32,
        rm_epochs=1,
        rm_batch_pairs=8,
        rm_freeze_layers=1,
        max_length=96,
        split=[0.5, 0.25, 0.25],
        device="cpu",
        rubric="shorter",
        ppo_steps=2,
        ppo_batch_prompts=4,
        ppo_minibatch_size=2,
        ppo_epochs=1,
        ppo_freeze_layers=1,
        eval_samples_per_prompt=1,
        kernels=False,
        ref_quant="none",
        parallel="fsdp2",
    )
    args.update(kw)
    cfg = tmp_path / f"{out}.json"
    cfg.write_text(json.dumps(args))
    worker = os.path.join(os.path.dirname(__file__), "pipeline_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", worker, str(cfg)]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


def test_pipeline_under_torchrun(setup, tmp_path):
    """Step 1, the evaluation and the report on rank 0; the reward model and PPO on both ranks (FSDP2)."""
    done = _pipeline_torchrun(setup, tmp_path, "pipe")
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    out = setup[0] / "pipe"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["parallel"] == "fsdp2" and metrics["prompts"] == {"train": 16, "val": 8, "test": 8}
    assert metrics["reward_model"]["finished"] and metrics["ppo"]["steps"] == 2
    assert metrics["evaluation"]["pairs"] == 8 and (out / "report.md").exists()
    for ckpt in (out / "step2_reward" / "checkpoint.pt", out / "step3_ppo" / "checkpoint.pt"):
        assert torch.load(ckpt, weights_only=False)["world_size"] == 2  # trained on both ranks
    assert {"generate_s", "annotate_s", "reward_model_s", "ppo_s", "evaluate_s"} <= set(metrics["timings"])


def test_pipeline_with_people_annotating_refuses_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="people annotating .* runs in one process"):
        run_pipeline(PipelineConfig(rubric=""))


def test_pipeline_under_torchrun_stops_when_rank_0_fails(setup, tmp_path):
    """Two prompts give no pairs for every split: rank 0 raises in step 1 while rank 1 waits at the barrier;
    torchrun ends the job with rank 0's message instead of leaving rank 1 waiting."""
    done = _pipeline_torchrun(setup, tmp_path, "pipe-fail", limit=2)
    assert done.returncode != 0 and "no preference pairs" in done.stderr + done.stdout
