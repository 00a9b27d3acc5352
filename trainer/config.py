"""Configs for every `fastrlhf` command: flat dataclasses, one docstring per field, defaults that work.

The CLI (`trainer/cli.py`) is generated from these by `tyro`: every field is a `--flag` whose help text
is the field's docstring, so what you read here is what `fastrlhf <command> --help` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class GeneratePairsConfig:
    """`fastrlhf generate-pairs`: sample several responses per prompt and write candidate pairs."""

    out: str = "runs/demo/candidates.jsonl"
    """Where to write candidate pairs (JSONL, written atomically)."""
    prompts: str = "demo"
    """Prompt dataset (JSONL / Parquet / save_to_disk folder), or "demo" for the shipped prompt set."""
    model: str = "default"
    """Local model folder, or "default" for the embedded SmolLM2-135M-Instruct."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt; distinct responses are paired up."""
    temperature: float = 0.7
    """Sampling temperature (top_k=0, top_p=1: the full distribution, as PPO samples it)."""
    max_new_tokens: int = 48
    """Longest response, in tokens; generation stops earlier at EOS."""
    batch_size: int = 32
    """Sequences generated together."""
    limit: int | None = None
    """Use only the first N prompts (for quick runs)."""
    seed: int = 0
    """Seed for sampling."""
    device: str = "auto"
    """"auto" (CUDA if available), "cuda" or "cpu"."""


@dataclass
class AnnotateConfig:
    """`fastrlhf annotate`: a person (or a scripted rubric) picks the better response of each pair."""

    candidates: str = "runs/demo/candidates.jsonl"
    """Candidate pairs from `generate-pairs`."""
    out: str = "runs/demo/annotations.jsonl"
    """Answers, appended and fsynced one by one; rerunning resumes after the last answer."""
    preferences: str = "runs/demo/preferences.jsonl"
    """Preference dataset written from the answers (ties and skips dropped)."""
    rubric: str | None = None
    """Name of a scripted rubric ("demo") that answers instead of a person; the data is then labelled
    rubric-annotated."""


@dataclass
class RewardConfig:
    """`fastrlhf train-rm`: step 2 of RLHF, a scalar reward model trained on preference pairs with the
    Bradley-Terry loss (the fused `reward_head_pairwise_loss` kernel)."""

    pairs: str = "runs/demo/preferences.jsonl"
    """Preference dataset (JSONL / Parquet / save_to_disk folder). Split into train/val/test by prompt
    unless --val-pairs and --test-pairs are given."""
    out_dir: str = "runs/demo/reward"
    """Run folder: model/, checkpoint.pt, metrics.jsonl, splits/, eval/."""
    model: str = "default"
    """Backbone: a local causal-LM folder, a saved reward model, or "default" (SmolLM2-135M-Instruct)."""
    val_pairs: str | None = None
    """Optional separate validation set."""
    test_pairs: str | None = None
    """Optional separate test set."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train/val/test fractions of the distinct prompts (pairs never straddle two splits)."""
    epochs: int = 3
    """Passes over the training pairs; the learning-rate schedule spans all of them."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (a checkpoint is saved; --resume continues the same run)."""
    lr: float = 2e-4
    """Peak AdamW learning rate (linear warm-up over 10% of the steps, then linear decay to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_pairs: int = 8
    """Pairs per micro-batch (each pair is two sequences)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 128
    """Longest sequence in tokens; longer prompts are cut from the left (responses stay whole)."""
    use_margin: bool = False
    """Subtract the dataset's `margin` column inside the loss: -log sigmoid(r_c - r_r - m)."""
    center_coef: float = 0.01
    """Reward-centering penalty coef * mean((r_c + r_r)^2), keeping rewards near 0 (0 disables)."""
    freeze_layers: int = 10
    """Freeze the embeddings and the bottom N transformer layers (-1: all but the top 4; 0: train all).
    10 is the bottom third of the default model's 30 layers: with lr 2e-4, 3 epochs and 8 pairs a step it
    matched or beat TRL's full fine-tune on 5 of 6 held-out splits (3 of 64 pairs behind on the sixth) in
    ~3/4 of its time (docs/trainer.md, "Reward-model defaults, measured"). A frozen bottom saves backward
    time and memory."""
    cache_frozen: bool = True
    """Run the frozen bottom layers once per training sequence and train the top from the stored states
    (same result; several times faster per epoch; memory ~ tokens x hidden size x 4 bytes)."""
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    """Under `torchrun --nproc-per-node N` (N > 1): replicate the model with DDP, or shard parameters,
    gradients and optimizer state per layer with FSDP2 (validation then runs at the end only). Ignored in a
    single process. The batch sizes stay global: each step sees the same pairs as one process would."""
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """With `--parallel fsdp2`: the dtype each layer's parameters are all-gathered and computed in (FSDP2's
    MixedPrecisionPolicy; gradients reduce in fp32 into the fp32 shards the optimizer updates). auto: bf16
    on CUDA, where autocast runs the matmuls in bf16 anyway (half the gathered bytes and memory), fp32
    elsewhere. Unlike autocast (DDP, one process), bf16 parameters also keep the residual stream and the
    norms' weights in bf16; fp32 follows those runs' numerics."""
    lora_r: int = 0
    """LoRA rank for the trainable layers (0: full fine-tuning). Needs `peft`."""
    lora_alpha: int = 16
    """LoRA alpha."""
    grad_checkpointing: bool = False
    """Recompute activations in backward (less memory, ~30% more time)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this."""
    eval_every: int = 0
    """Validate every N steps (0: at the end of each epoch)."""
    save_every: int = 50
    """Save a checkpoint every N steps (and always at the end or at --max-steps)."""
    resume: bool = False
    """Continue from out_dir/checkpoint.pt: model, optimizer, schedule, RNG and data position."""
    kernels: bool = True
    """Use the fused fastrlhf kernels (False: the eager *_ref twins, for comparison)."""
    seed: int = 0
    """Seed for the head initialisation, data order and splits."""
    device: str = "auto"
    """"auto" (CUDA if available), "cuda" or "cpu". bf16 autocast is used on CUDA."""


@dataclass
class EvalRewardConfig:
    """`fastrlhf eval-rm`: validation report of a reward model on preference pairs."""

    model: str = "runs/demo/reward/model"
    """Saved reward model folder."""
    pairs: str = "runs/demo/reward/splits/test.jsonl"
    """Preference pairs to evaluate on."""
    out_dir: str = "runs/demo/reward/eval"
    """Where to write metrics.json, roc.png, rewards.png."""
    batch_pairs: int = 32
    """Pairs per forward pass."""
    max_length: int = 128
    """Longest sequence in tokens (as in training)."""
    seed: int = 0
    """Seed for the A/B order of each pair in the pairwise-decision metrics."""
    device: str = "auto"
    """"auto" (CUDA if available), "cuda" or "cpu"."""


@dataclass
class PPOConfig:
    """`fastrlhf ppo`: step 3 of RLHF. Fine-tune the policy with PPO against a frozen reward model, with a
    per-token KL penalty against a frozen (bitsandbytes-quantized) reference. Defaults from the literature
    (docs/trainer.md); the few CPU-driven departures are marked and listed in `trainer/ppo.py`."""

    reward_model: str = "runs/demo/reward/model"
    """Reward model folder written by `fastrlhf train-rm` (its saved gain/bias normalise the score)."""
    out_dir: str = "runs/demo/ppo"
    """Checkpoints, metrics.jsonl and the final policy (`policy/`, save_pretrained format)."""
    policy: str = "default"
    """Initial policy (and reference) model folder, or "default" for the embedded SmolLM2-135M-Instruct."""
    prompts: str = "demo"
    """Prompt dataset (JSONL / Parquet / save_to_disk folder), or "demo" for the shipped prompt set."""
    ref_quant: Literal["int8", "nf4", "none"] = "int8"
    """Reference model precision: bitsandbytes LLM.int8 or 4-bit NF4, or an unquantized copy."""
    ref_from_adapter: bool = False
    """LoRA policy only: the reference is the policy's own base with the adapter disabled (no second
    model in memory; --ref-quant is then unused). Refused when the policy starts from a trained adapter."""
    ref_shares_bottom: bool = True
    """With a frozen, cached policy bottom (freeze_layers != 0, cache_frozen): the reference keeps only its
    layers above it and reads the policy's cached states. That frozen bottom IS the starting model's, so
    this is the same reference with an exact (unquantized) bottom, for a fraction of the compute and memory
    (SmolLM2-135M, top 4 of 30 trainable: 4 quantized layers instead of 30). False: the whole quantized model."""
    critic: Literal["separate", "value-head"] = "separate"
    """"separate": a critic initialised from the reward model (InstructGPT; a second trunk in memory,
    plus its optimizer state). "value-head": a scalar head on the policy's own trunk (H+1 parameters,
    no second model, but value gradients flow into the policy's trainable layers)."""
    lora_r: int = 0
    """LoRA rank for the policy (0: train the unfrozen layers in full)."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    freeze_layers: int = -1
    """Frozen bottom layers of the policy and the critic (-1: all but the top 4; 0: full fine-tune). The
    frozen bottom runs once per rollout, not once per epoch (`cache_frozen`). A CPU-driven departure."""
    cache_frozen: bool = True
    """Run the frozen bottom once per rollout and reuse its states in every PPO epoch."""
    steps: int = 16
    """PPO iterations (each: one rollout batch, then `ppo_epochs` passes over it)."""
    max_steps: int | None = None
    """Stop after this many iterations (a checkpoint is saved; the LR schedule still spans `steps`, and
    --resume continues the same run)."""
    batch_prompts: int = 32
    """Prompts per rollout (global: under torchrun each of N processes samples every N-th prompt)."""
    samples_per_prompt: int = 1
    """Replies sampled per prompt in a rollout."""
    minibatch_size: int = 16
    """Rows per optimizer step (the rollout is split into these; one minibatch loop)."""
    grad_accum: int = 1
    """Micro-batches per minibatch (memory knob; the update is the same)."""
    ppo_epochs: int = 4
    """Passes over each rollout."""
    lr: float = 1e-5
    """Policy learning rate (AdamW)."""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """Both learning rates over the run, stepped once per rollout: linear decay to 0 over `steps`, or
    constant."""
    critic_lr: float = 5e-5
    """Critic / value-head learning rate."""
    temperature: float = 0.7
    """Sampling temperature; every log-prob (old policy, policy, reference) is taken at it."""
    max_new_tokens: int = 24
    """Longest reply; sampling stops earlier at EOS."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty in the reward (the start value when `adaptive_kl`)."""
    kl_estimator: Literal["k1", "k3", "full"] = "k1"
    """KL in the reward: k1 = log-ratio of the sampled token (the default), k3, or the exact full-vocabulary
    KL (`fastrlhf.kernels.full_kl`). k3 is always logged."""
    adaptive_kl: bool = False
    """Ziegler et al.'s proportional controller on beta."""
    kl_target: float = 6.0
    """Target KL per reply (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller (in rollout rows)."""
    missing_eos_penalty: float | None = -1.0
    """Added to the score of a reply that did not end with EOS within max_new_tokens (None: off)."""
    score_clip: float | None = 5.0
    """Clip the normalised score to [-c, c] (None: off)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """PPO ratio clip."""
    clip_range_value: float | None = 0.2
    """Value clip, around the rollout's values; None: an unclipped squared error."""
    vf_coef: float = 0.1
    """Value-loss weight."""
    ent_coef: float = 0.0
    """Entropy bonus weight."""
    whiten_advantages: bool = True
    """Whiten advantages over the rollout's real tokens (`--advantage gae` only)."""
    advantage: Literal["gae", "grpo", "rloo"] = "gae"
    """Advantage estimator. "gae": PPO with a critic (GAE over the per-token rewards). Critic-free, one
    advantage per reply from its prompt's group of `samples_per_prompt` (>= 2) replies, whose reward is its
    score minus beta times its summed KL (or the score alone with `--kl-in loss`): "grpo" normalises it within
    the group (Shao et al. 2024), "rloo" subtracts the mean of the group's other replies (Ahmadian et al.
    2024). grpo and rloo load no critic: no value loss, no value optimizer, no `value/` log keys."""
    grpo_scale_std: bool = True
    """--advantage grpo: divide by the group's std (False: mean-centred only, as "Dr. GRPO")."""
    reward: Literal["rm", "rubric", "both"] = "rm"
    """The score: the reward model's ("rm"), a verifiable check's ("rubric": the demo rubric's correctness, 1.0
    for a correct answer, else 0.0; or `--reward-fn`), or rm_weight * rm + check_weight * check ("both").
    With "rubric" no reward model is loaded (`reward_model` is then read only by `--critic separate`, which
    copies it); with "both" each part's mean is logged (`objective/rm_score`, `objective/check`). The
    missing-EOS penalty and the clip apply to the score used."""
    reward_fn: str | None = None
    """The verifiable check as `module:function`, called with (prompts: lists of chat messages, replies: str,
    the prompt rows' metadata: dicts) and returning one float per reply (trainer/verifiable.py)."""
    rm_weight: float = 1.0
    """--reward both: weight of the reward model's score."""
    check_weight: float = 1.0
    """--reward both: weight of the verifiable check."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference goes: "reward" (-beta * the `kl_estimator` per token, as PPO) or "loss"
    (+ beta * the k3 estimate per token of the policy being updated, aggregated as the surrogate is, as GRPO;
    from the same `ppo_head` pass with the kernels)."""
    loss_agg: Literal["token", "sequence"] = "token"
    """How the policy loss (and a KL in the loss) averages a minibatch: "token", the mean over all its real
    tokens (a long reply weighs more; PPO, DAPO) or "sequence", the mean of each reply's token mean (every
    reply weighs the same; GRPO's paper). The value loss stays per token."""
    behaviour_is_cap: float | None = None
    """Truncated importance sampling against the sampler (None: off): each token's policy-gradient term is
    weighted by min(exp(old - behaviour), C), `old` the training forward's log-prob of the sampled token and
    `behaviour` the sampler's. Use it where the two differ (bf16 sampling, a CUDA-graph decode step, replies
    from another engine); the gap itself is logged every step (`sampler/` keys), with or without it."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip for policy and critic."""
    grad_checkpointing: bool = False
    """Recompute activations in backward (memory for time)."""
    save_every: int = 4
    """Checkpoint every N steps (atomic; `--resume` restores everything)."""
    resume: bool = False
    """Continue from out_dir/checkpoint.pt."""
    kernels: bool = True
    """Use the fused `fastrlhf.kernels` (False: their eager `*_ref` twins, for comparison). With logits,
    the update takes log-prob, entropy, ratio and clipped surrogate from one `ppo_head` pass."""
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    """Under `torchrun --nproc-per-node N` (N > 1): replicate the policy and critic with DDP, or shard their
    parameters, gradients and optimizer states per layer with FSDP2 (generation then steps in lockstep on
    every rank, each layer gathered once per rollout). The reward model and the reference stay whole on
    every rank (no gradients: an int8 reference is small). Ignored in a single process."""
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """With `--parallel fsdp2`: the dtype the policy's and critic's parameters are all-gathered and computed in
    (FSDP2's MixedPrecisionPolicy; gradients reduce in fp32 into the fp32 shards the optimizer updates; the
    rollout's generation runs in it too). auto: bf16 on CUDA, where autocast runs the matmuls in bf16 anyway
    (half the gathered bytes and memory), fp32 elsewhere. Unlike autocast (DDP, one process), bf16 parameters
    also keep the residual stream and the norms' weights in bf16; fp32 follows those runs' numerics."""
    cuda_graphs: bool = False
    """On CUDA, run the sampler's decode step as CUDA graphs (`torch.compile(mode="reduce-overhead")`, one
    graph per batch shape and cache-length bucket; trainer/generate.py). Off by default: not yet measured
    on a GPU. Ignored off CUDA."""
    fused_linear: bool = False
    """Log-probs of policy, old policy and reference straight from the last hidden state and the LM-head
    weight (`linear_logprobs` / `linear_full_kl`): no (B, R, V) logits tensor at all. Off by default: on an
    H200 its kernel ran 2.9x slower than matmul + `token_logprobs` (8192 x 4096 x 151936 bf16) and one PPO
    step of Llama-3.2-1B shapes peaked at the same memory as the logits path (results/2026-11-27-h200/;
    the forward's tiles and the backward have changed since and are not measured on a GPU); turn it on
    when the logits do not fit."""
    seed: int = 0
    """Seed for prompt order, sampling and head initialisation."""
    device: str = "auto"
    """"auto" (CUDA if available), "cuda" or "cpu"."""


@dataclass
class EvalPolicyConfig:
    """`fastrlhf eval-policy`: judge a trained policy against the reference policy on held-out prompts
    with the rubric (the independent judge), plus reward-model scores and KL to the reference."""

    policy: str = "runs/demo/ppo/policy"
    """Trained policy folder (`fastrlhf ppo` writes out_dir/policy)."""
    reference: str = "default"
    """Reference policy folder (the unquantized starting model), or "default"."""
    reward_model: str | None = "runs/demo/reward/model"
    """Reward model folder for mean scores (None: rubric only)."""
    prompts: str = "demo"
    """Held-out prompt dataset, or "demo" for the shipped prompt set (use prompts PPO never saw)."""
    out_dir: str = "runs/demo/eval"
    """evaluation.json, samples.jsonl, examples.md and a PNG."""
    rubric: str = "demo"
    """Scripted judge (needs the prompt set's answer fields)."""
    samples_per_prompt: int = 2
    """Replies per prompt from each model."""
    temperature: float = 0.7
    """Sampling temperature of both models (the one PPO trained at)."""
    max_new_tokens: int = 24
    """Longest reply."""
    batch_size: int = 64
    """Sequences generated together."""
    seed: int = 0
    """Seed for sampling (both models see the same one)."""
    device: str = "auto"
    """"auto" (CUDA if available), "cuda" or "cpu"."""


@dataclass
class PipelineConfig:
    """`fastrlhf pipeline`: the main job. All three steps of RLHF on the embedded model and the demo
    prompts: sample pairs -> rubric annotation -> reward model -> validation -> PPO against an int8
    reference -> evaluation on held-out prompts by the rubric, with a report folder."""

    out_dir: str = "runs/pipeline"
    """Report folder: report.md, metrics.json, PNG plots, and each step's files."""
    model: str = "default"
    """Local model folder, or "default" for the embedded SmolLM2-135M-Instruct."""
    prompts: str = "demo"
    """Prompt dataset, or "demo" for the shipped prompt set (split train/val/test by prompt)."""
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    """Train/val/test fractions of the prompts; the reward model is tested on unseen prompts (a fifth of
    them, so the test accuracy rests on enough pairs to mean something)."""
    rubric: str = "demo"
    """Scripted annotator standing in for people (the report says so)."""
    samples_per_prompt: int = 2
    """Responses sampled per prompt in step 1 (distinct ones are paired: up to samples/2 pairs). Sampling
    dominates the CPU run time (~300 tokens/s on 2 cores)."""
    temperature: float = 0.7
    """Sampling temperature of the reference policy."""
    max_new_tokens: int = 24
    """Longest sampled response (the demo questions have short answers)."""
    gen_batch_size: int = 64
    """Sequences generated together."""
    limit: int | None = None
    """Use only the first N prompts (quick runs, tests)."""
    rm_epochs: int = 3
    """Reward-model epochs (cheap: the frozen bottom is computed once)."""
    rm_lr: float = 1e-4
    """Reward-model peak learning rate."""
    rm_batch_pairs: int = 16
    """Reward-model pairs per step."""
    rm_freeze_layers: int = -1
    """Frozen bottom layers of the reward model (-1: all but the top 4). The step-2 settings here differ from
    `train-rm`'s defaults (10 frozen, lr 2e-4, 8 pairs): the demo's reward model meets its targets with them
    inside the job's CPU budget; train-rm's defaults train 20 layers instead of 4 (not measured on the demo)."""
    max_length: int = 96
    """Longest reward-model sequence, in tokens."""
    ppo: bool = True
    """Run step 3 (RL and the policy evaluation); --no-ppo stops after the reward model."""
    algo: Literal["ppo", "grpo", "rloo"] = "ppo"
    """Step 3's algorithm: PPO (a critic, GAE, the KL in the reward), or critic-free GRPO / RLOO (`group_size`
    replies per prompt compared with each other, the KL as k3 in the loss; no critic loaded)."""
    group_size: int = 4
    """grpo / rloo: replies per prompt. The prompts per step are `ppo_batch_prompts // group_size`, so a step
    samples as many replies as PPO's."""
    reward: Literal["rm", "rubric", "both"] = "rm"
    """Step 3's reward: the step-2 reward model, the rubric's verifiable check (1 for a correct answer), or
    their sum (see `fastrlhf ppo --reward`)."""
    ppo_steps: int = 20
    """PPO iterations, on the train prompts (~25 s each on a 2-core CPU: the largest share of the run)."""
    ppo_batch_prompts: int = 32
    """Prompts per PPO rollout."""
    ppo_minibatch_size: int = 16
    """Rows per PPO optimizer step."""
    ppo_epochs: int = 2
    """Passes over each rollout (the literature's 4 costs ~15 s more per step on a 2-core CPU)."""
    ppo_lr: float = 5e-5
    """Policy learning rate (top 4 layers trained; 1e-4 measured no better on the demo)."""
    ppo_critic_lr: float = 2e-4
    """PPO critic learning rate (`fastrlhf ppo --critic-lr`; the value head's with `critic="value-head"`, where
    it is not measured). Over five RL seeds of the demo, the separate critic at 2e-4 against 5e-5
    put the critic's explained variance above 0 from step 5-8 instead of 11-16, with win rate 0.738 vs 0.727
    and correct answers 0.337 vs 0.322 (results/2026-12-07-cpu2-pipeline-seeds-critic-lr)."""
    ppo_lr_schedule: Literal["linear", "constant"] = "constant"
    """Both PPO learning rates over the run (`fastrlhf ppo --lr-schedule`): constant, or linear decay to 0.
    Over five RL seeds of the demo, constant against linear: win rate higher on every seed, correct answers
    above the reference's on every seed, KL per token ~0.3 instead of ~0.18
    (results/2026-12-07-cpu2-pipeline-seeds-constant-lr)."""
    ppo_clip_range_value: float | None = 0.2
    """The critic's value clip around the rollout's values (`fastrlhf ppo --clip-range-value`); None:
    unclipped, which over five RL seeds of the demo raised the critic's explained variance by 0.01-0.09 and
    did not help the policy (results/2026-12-07-cpu2-pipeline-seeds-no-value-clip)."""
    ppo_freeze_layers: int = -1
    """Frozen bottom layers of the policy and critic (-1: all but the top 4)."""
    ref_quant: Literal["int8", "nf4", "none"] = "int8"
    """PPO reference model precision (bitsandbytes int8 / nf4, or unquantized)."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty."""
    kl_bound: float = 0.5
    """Bound on the evaluated mean per-token KL(policy || reference) that the report checks."""
    critic: Literal["separate", "value-head"] = "separate"
    """PPO critic: a copy of the reward model, or a value head on the policy trunk."""
    eval_samples_per_prompt: int = 2
    """Replies per held-out prompt from each of the PPO policy and the reference, judged by the rubric."""
    kernels: bool = True
    """Use the fused `fastrlhf.kernels` everywhere (False: their eager `*_ref` twins)."""
    fused_linear: bool = False
    """PPO log-probs straight from hidden states and the head weight, no logits (see `fastrlhf ppo --help`)."""
    seed: int = 0
    """Seed for splits, sampling, head initialisation and data order."""
    rl_seed: int | None = None
    """Seed of step 3 and the evaluation's sampling (None: `seed`). Varying it alone measures RL across seeds
    on the same data and reward model (benchmarks/pipeline_seeds.py)."""
    device: str = "auto"
    """"auto" (CUDA if available), "cuda" or "cpu"."""
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    """Under `torchrun --nproc-per-node N` (N > 1): the engine of steps 2 and 3 (see `train-rm` and `ppo`);
    step 1, the evaluation and the report run on rank 0. Ignored in a single process."""
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """With `--parallel fsdp2`: the dtype parameters are gathered and computed in (see `train-rm --help`)."""
