"""fastrlhf's kernel switched into TRL's log-prob call sites: a few steps of a GRPO-style loss, twice.

    python examples/trl_drop_in.py        # offline, CPU is fine (~10-20 s, mostly imports)

A tiny random Llama computes per-token log-probs and entropies the way TRL's trainers do, by calling
`selective_log_softmax` and `entropy_from_logits` from `trl.trainer.utils`. The first run uses TRL's own
functions; the second switches fastrlhf in with the assignments a user writes in their own code
(fastrlhf never patches anything on import):

    import trl.trainer.utils as U
    U.selective_log_softmax = compat.selective_log_softmax
    U.entropy_from_logits = compat.entropy_from_logits

(A trainer module that did `from trl.trainer.utils import selective_log_softmax` keeps its own reference:
assign in that module, or before it is first imported.) Both runs start from the same weights and data;
the script prints the loss per step and exits 1 if the two curves disagree.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set below, before triton
is imported), so this is the same Triton code a GPU runs, not the PyTorch reference.
"""

import contextlib
import os
import sys
import time
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The interpreter also evaluates masked-off lanes (log2(0) there is discarded by tl.where): not a bug.
warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")

try:  # only the submodule that holds the functions: trl is often installed without its optional deps
    import trl.trainer.utils as U
except Exception as exc:  # noqa: BLE001 - any failure to import means there is nothing to demonstrate
    print(f"SKIP: cannot import trl.trainer.utils ({type(exc).__name__}: {exc}); install trl to run this example")
    sys.exit(0)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fastrlhf.kernels import compat  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB, PROMPT, COMPLETION, BATCH, STEPS = 1031, 6, 12, 4, 5
TEMPERATURE, CLIP, ENTROPY_COEF, LR = 0.7, 0.2, 0.01, 0.05


def tiny_model() -> LlamaForCausalLM:
    """A random 2-layer Llama, built from a config (no download, no tokenizer); same weights every call."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(DEVICE)


def batch():
    """Prompt + sampled completion ids, a completion mask (ragged lengths) and one advantage per sequence."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, PROMPT + COMPLETION), generator=g)
    lengths = torch.randint(COMPLETION // 2, COMPLETION + 1, (BATCH,), generator=g)
    mask = (torch.arange(COMPLETION)[None, :] < lengths[:, None]).float()
    advantages = torch.randn(BATCH, generator=g)
    return ids.to(DEVICE), mask.to(DEVICE), advantages.to(DEVICE)


def per_token_logps_and_entropies(model, ids):
    """The call sites, written as TRL's trainers write them (names looked up in trl.trainer.utils)."""
    logits = model(input_ids=ids).logits[:, PROMPT - 1 : -1]  # (B, C, V): position t predicts token t+1
    logps = U.selective_log_softmax(logits, ids[:, PROMPT:], temperature=TEMPERATURE)
    entropies = U.entropy_from_logits(logits / TEMPERATURE)
    return logps, entropies


def grpo_loss(logps, old_logps, entropies, advantages, mask):
    """Clipped policy-gradient loss with an entropy bonus, averaged over completion tokens."""
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - CLIP, 1 + CLIP) * a) - ENTROPY_COEF * entropies
    return (per_token * mask).sum() / mask.sum()


def train() -> list[float]:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)  # linear in the gradient: equal grads, equal steps
    ids, mask, advantages = batch()
    with torch.no_grad():
        old_logps, _ = per_token_logps_and_entropies(model, ids)
        old_logps = old_logps + 0.05 * torch.randn(old_logps.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    losses = []
    for _ in range(STEPS):
        logps, entropies = per_token_logps_and_entropies(model, ids)
        loss = grpo_loss(logps, old_logps, entropies, advantages, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@contextlib.contextmanager
def fastrlhf_switched_in():
    """The user's one-line switches, undone afterwards so the first run stays TRL's own."""
    saved = U.selective_log_softmax, U.entropy_from_logits
    U.selective_log_softmax = compat.selective_log_softmax
    U.entropy_from_logits = compat.entropy_from_logits
    try:
        yield
    finally:
        U.selective_log_softmax, U.entropy_from_logits = saved


def main() -> int:
    backend = "CUDA Triton" if DEVICE == "cuda" else "Triton interpreter (CPU)"
    print(f"tiny Llama, vocab {VOCAB}, {BATCH}x{COMPLETION} completion tokens, T={TEMPERATURE}; fastrlhf on {backend}")
    t0 = time.perf_counter()
    trl_losses = train()
    with fastrlhf_switched_in():
        fast_losses = train()
    print(f"{'':8}{'TRL':>14}{'fastrlhf':>14}{'|diff|':>11}")
    for step, (a, b) in enumerate(zip(trl_losses, fast_losses)):
        print(f"step {step:<3}{a:14.8f}{b:14.8f}{abs(a - b):11.2e}")
    worst = max(abs(a - b) for a, b in zip(trl_losses, fast_losses))
    tol = 1e-5 * max(1.0, max(abs(x) for x in trl_losses))
    verdict = "agree" if worst <= tol else "DISAGREE"
    print(f"max |TRL - fastrlhf| = {worst:.2e} (tolerance {tol:.0e}): the loss curves {verdict}; "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    return 0 if verdict == "agree" else 1


if __name__ == "__main__":
    sys.exit(main())
