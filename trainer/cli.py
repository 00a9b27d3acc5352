"""`fastrlhf` command line: one subcommand per step, flags generated from the dataclasses in config.py.

    fastrlhf pipeline                  # the main job: steps 1-3 on the embedded model, report in runs/pipeline
    fastrlhf generate-pairs --help
    fastrlhf annotate --rubric demo
    fastrlhf train-rm --pairs runs/demo/preferences.jsonl
    fastrlhf eval-rm --model runs/demo/reward/model --pairs runs/demo/reward/splits/test.jsonl
    fastrlhf ppo --reward-model runs/demo/reward/model --ref-quant int8
    fastrlhf eval-policy --policy runs/demo/ppo/policy --prompts held_out.jsonl

We use `tyro` (the dataclass-to-CLI library CleanRL uses) rather than hand-written argparse, so a field
added to a config is a documented flag at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import tyro

from .config import (
    AnnotateConfig,
    EvalPolicyConfig,
    EvalRewardConfig,
    GeneratePairsConfig,
    PipelineConfig,
    PPOConfig,
    RewardConfig,
)
from .errors import UserError


def _setup() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never contact a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 logs at INFO
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s %(name)s{f' [rank {rank}]' if rank else ''}: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


def generate_pairs_cmd(cfg: GeneratePairsConfig) -> None:
    from .annotate import generate_pairs
    from .data import load_demo_prompts, load_prompts

    from .models import resolve_device

    prompts = load_demo_prompts() if cfg.prompts == "demo" else load_prompts(cfg.prompts)
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    generate_pairs(
        cfg.model,
        prompts,
        cfg.out,
        samples_per_prompt=cfg.samples_per_prompt,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=str(resolve_device(cfg.device)),
    )


def annotate_cmd(cfg: AnnotateConfig) -> None:
    from .annotate import annotate, build_preferences

    annotate(cfg.candidates, cfg.out, rubric=cfg.rubric)  # prints its own progress and how to resume
    n = build_preferences(cfg.candidates, cfg.out, cfg.preferences)
    print(f"{n} preference pairs -> {cfg.preferences}")


def train_rm_cmd(cfg: RewardConfig) -> None:
    from .reward import train_reward_model

    summary = train_reward_model(cfg)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))
    for split in ("val", "test"):
        if split in summary:
            m = summary[split]
            print(
                f"{split}: accuracy {m['accuracy']:.3f}  AUC-ROC {m['auc_roc']:.3f}  F1 {m['f1']:.3f}  "
                f"ECE {m['ece']:.3f}  Brier {m['brier']:.3f}  ({m['pairs']} pairs)"
            )


def eval_rm_cmd(cfg: EvalRewardConfig) -> None:
    from .reward import evaluate_reward_model

    m = evaluate_reward_model(cfg)
    print(json.dumps(m, indent=2))


def ppo_cmd(cfg: PPOConfig) -> None:
    from .ppo import train_ppo

    result = train_ppo(cfg)
    print(json.dumps(result, indent=2))


def eval_policy_cmd(cfg: EvalPolicyConfig) -> None:
    from .data import load_demo_prompts, load_prompts
    from .evaluate import evaluate_policy

    prompts = load_demo_prompts() if cfg.prompts == "demo" else load_prompts(cfg.prompts)
    m = evaluate_policy(
        cfg.policy,
        cfg.reference,
        cfg.reward_model,
        prompts,
        rubric=cfg.rubric,
        samples_per_prompt=cfg.samples_per_prompt,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=cfg.device,
        out_dir=cfg.out_dir,
    )
    print(f"win rate vs reference (rubric, ties half): {m['win_rate']:.3f}   -> {cfg.out_dir}/evaluation.json")


def pipeline_cmd(cfg: PipelineConfig) -> None:
    from .pipeline import run_pipeline

    metrics = run_pipeline(cfg)
    if metrics is None:  # under torchrun: not rank 0, which reports
        return
    rm = metrics["reward_model"]
    print(f"\nreport: {cfg.out_dir}/report.md   ({metrics['timings']['total_s']:.0f} s)")
    if "test" in rm:
        print(
            f"reward model on unseen prompts: accuracy {rm['test']['accuracy']:.3f}, AUC-ROC {rm['test']['auc_roc']:.3f}"
        )


COMMANDS = {
    "pipeline": (pipeline_cmd, PipelineConfig),
    "generate-pairs": (generate_pairs_cmd, GeneratePairsConfig),
    "annotate": (annotate_cmd, AnnotateConfig),
    "train-rm": (train_rm_cmd, RewardConfig),
    "eval-rm": (eval_rm_cmd, EvalRewardConfig),
    "ppo": (ppo_cmd, PPOConfig),
    "eval-policy": (eval_policy_cmd, EvalPolicyConfig),
}


def main(argv: list[str] | None = None) -> None:
    """Run one subcommand. A user's mistake (a missing path, an unsupported combination, bad data: a
    `UserError`) prints `fastrlhf <command>: error: <what and what works>` and exits 2; `--debug` (anywhere
    on the line) or FASTRLHF_DEBUG=1 shows its traceback. Anything else is a bug and keeps its traceback."""
    _setup()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FASTRLHF_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    cfg = tyro.extras.subcommand_cli_from_dict(
        {name: cls for name, (_, cls) in COMMANDS.items()},
        args=argv,
        prog="fastrlhf",
        description="fastrlhf: kernel-accelerated RLHF (reward model + PPO) on Hugging Face models",
    )
    name, fn = next((name, fn) for name, (fn, cls) in COMMANDS.items() if type(cfg) is cls)
    try:
        fn(cfg)
    except UserError as exc:
        if debug:
            raise
        print(f"fastrlhf {name}: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
