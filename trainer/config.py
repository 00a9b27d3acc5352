"""Configs for every `fastrlhf` command: flat dataclasses, one docstring per field, defaults that work.

The CLI (`trainer/cli.py`) is generated from these by `tyro`: every field is a `--flag` whose help text
is the field's docstring, so what you read here is what `fastrlhf <command> --help` prints.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    epochs: int = 2
    """Passes over the training pairs; the learning-rate schedule spans all of them."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (a checkpoint is saved; --resume continues the same run)."""
    lr: float = 5e-5
    """Peak AdamW learning rate (linear warm-up over 10% of the steps, then linear decay to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_pairs: int = 16
    """Pairs per micro-batch (each pair is two sequences)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 128
    """Longest sequence in tokens; longer prompts are cut from the left (responses stay whole)."""
    use_margin: bool = False
    """Subtract the dataset's `margin` column inside the loss: -log sigmoid(r_c - r_r - m)."""
    center_coef: float = 0.01
    """Reward-centering penalty coef * mean((r_c + r_r)^2), keeping rewards near 0 (0 disables)."""
    freeze_layers: int = -1
    """Freeze the embeddings and the bottom N transformer layers (-1: all but the top 4; 0: train all).
    A frozen bottom saves backward time and memory on small machines."""
    cache_frozen: bool = True
    """Run the frozen bottom layers once per training sequence and train the top from the stored states
    (same result; several times faster per epoch; memory ~ tokens x hidden size x 4 bytes)."""
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
class PipelineConfig:
    """`fastrlhf pipeline`: the main job. Steps 1-2 of RLHF on the embedded model and the demo prompts:
    sample pairs -> rubric annotation -> reward model -> validation, with a report folder. (Step 3, PPO,
    joins when it lands.)"""

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
    """Frozen bottom layers of the reward model (-1: all but the top 4)."""
    max_length: int = 96
    """Longest reward-model sequence, in tokens."""
    seed: int = 0
    """Seed for splits, sampling, head initialisation and data order."""
    device: str = "auto"
    """"auto" (CUDA if available), "cuda" or "cpu"."""
