"""fastrlhf.kernels: fused Triton kernels for the memory-bound hot paths of RLHF.

Every public function has a pure-PyTorch twin `*_ref` with the same signature. CUDA tensors run the
compiled Triton kernels; CPU tensors run them through Triton's interpreter when TRITON_INTERPRET=1 was
set before import, and otherwise run the `*_ref` path. This package imports only torch and triton.
"""

if __name__ == "kernels":  # the repository root is on sys.path: this is not Hugging Face's `kernels` (_shadow.py)
    from ._shadow import hand_over

    hand_over(__file__)
else:
    from ._common import use_triton
    from .full_kl import full_kl, full_kl_ref
    from .gae import gae, gae_ref
    from .kl_estimate import kl_estimate, kl_estimate_ref
    from .linear_full_kl import linear_full_kl, linear_full_kl_ref
    from .linear_logprobs import linear_logprobs, linear_logprobs_ref
    from .pairwise_loss import pairwise_loss, pairwise_loss_ref
    from .ppo_head import PPOHeadOutput, ppo_head, ppo_head_ref
    from .reward_head import (
        RewardHeadOutput,
        last_token_rewards,
        last_token_rewards_ref,
        reward_head_pairwise_loss,
        reward_head_pairwise_loss_ref,
    )
    from .token_logprobs import token_logprobs, token_logprobs_ref

__all__ = [
    "token_logprobs",
    "token_logprobs_ref",
    "kl_estimate",
    "kl_estimate_ref",
    "full_kl",
    "full_kl_ref",
    "pairwise_loss",
    "pairwise_loss_ref",
    "reward_head_pairwise_loss",
    "reward_head_pairwise_loss_ref",
    "last_token_rewards",
    "last_token_rewards_ref",
    "RewardHeadOutput",
    "linear_logprobs",
    "linear_logprobs_ref",
    "linear_full_kl",
    "linear_full_kl_ref",
    "ppo_head",
    "ppo_head_ref",
    "PPOHeadOutput",
    "gae",
    "gae_ref",
    "use_triton",
]
