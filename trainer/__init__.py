"""fastrlhf.trainer: reward-model and PPO training on Hugging Face `transformers` models.

Data flows one way: data -> rollout -> rl math -> ppo / reward loops -> evaluate -> report. The trainer
imports `fastrlhf.kernels`; the kernels never import the trainer. (The modules arrive with the issues
that build steps 1-3 of RLHF; see DESIGN.md section 4.)
"""
