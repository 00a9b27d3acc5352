"""fastrlhf.trainer: reward-model and PPO training on Hugging Face `transformers` models.

Data flows one way: data -> rollout -> rl math -> ppo / reward loops -> evaluate -> report. The trainer
imports `fastrlhf.kernels`; the kernels never import the trainer (docs/design.md).
"""
