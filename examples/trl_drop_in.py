"""fastrlhf's kernels inside TRL's own GRPOTrainer: a few steps, with and without the one-call switch.

    python examples/trl_drop_in.py        # offline; on CPU well under a minute, most of it importing TRL

A tiny random Llama (built from a config) and a word-level tokenizer built in memory (no download) train
for STEPS GRPO steps twice from the same weights, data and seed: once as TRL ships, once after

    switch = compat.use_in_trl()          # patches the names where TRL's trainers hold them
    ...                                   # build and train the trainer as usual
    switch.restore()                      # or: with compat.use_in_trl(): ...

TRL 1.16's GRPOTrainer computes every per-token log-prob and entropy (policy and reference model) through its
fused LM head (`trl.trainer.utils._ChunkedLogProbFunction`); the switch routes that to
`fastrlhf.kernels.linear_logprobs`. The script prints both loss curves and the count of fastrlhf kernel
launches in each run, and exits 1 if the curves disagree or if fastrlhf did not run only in the second.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set below, before triton
is imported), so this is the same Triton code a GPU runs, not the PyTorch reference.
"""

import collections
import os
import sys
import tempfile
import time
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# The interpreter also evaluates masked-off lanes (log2(0) there is discarded by tl.where): not a bug.
warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")

try:  # GRPOTrainer needs trl's optional dependencies (datasets, accelerate, ...): no trainer, nothing to show
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer
except Exception as exc:  # noqa: BLE001 - any failure to import means there is nothing to demonstrate
    print(f"SKIP: cannot import TRL's GRPOTrainer ({type(exc).__name__}: {exc}); install trl[...] to run this")
    sys.exit(0)

from fastrlhf.kernels import _common, compat  # noqa: E402

WORDS, PROMPTS, STEPS, LR = 250, 8, 3, 1.0
RTOL = 1e-5  # the curves must agree to this (see `agree`)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "w0" ... "w{WORDS-1}" and three special tokens, built in memory."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(tokenizer) -> LlamaForCausalLM:
    """A random 2-layer Llama; the same weights every call."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def dataset() -> Dataset:
    g = torch.Generator().manual_seed(1)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, WORDS, (5,), generator=g)) for _ in range(PROMPTS)]
    return Dataset.from_dict({"prompt": prompts})


def reward_even_words(completions, **kwargs) -> list[float]:
    """A reward with a gradient to follow: the share of even-numbered words in the completion."""
    out = []
    for text in completions:
        words = [w for w in text.split() if w.startswith("w")]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1))
    return out


def save_tiny_model(path: str) -> None:
    """The model and tokenizer on disk: with beta > 0 GRPOTrainer loads its reference model from the path."""
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)


def train(model_dir: str, output_dir: str) -> tuple[list[dict], collections.Counter]:
    """STEPS GRPO steps (beta > 0: a reference model too, so the loss holds a KL term computed from both models'
    log-probs); -> TRL's per-step logs and the fastrlhf kernel launches during the run, by kernel."""
    args = GRPOConfig(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        temperature=0.7,
        beta=0.1,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        bf16=False,
        use_cpu=True,
        seed=0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=reward_even_words,
        args=args,
        train_dataset=dataset(),
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
    )
    before = collections.Counter(_common.LAUNCHES)
    trainer.train()
    return [log for log in trainer.state.log_history if "loss" in log], _common.LAUNCHES - before


def run_both() -> dict:
    """The same training twice, as TRL ships and switched over; -> {"trl": (logs, launches), "fastrlhf": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, output_dir = os.path.join(tmp, "model"), os.path.join(tmp, "out")
        save_tiny_model(model_dir)
        runs = {"trl": train(model_dir, output_dir)}
        with compat.use_in_trl():
            runs["fastrlhf"] = train(model_dir, output_dir)
    return runs


def agree(a: list[float], b: list[float], rtol: float = RTOL) -> bool:
    """|a - b| <= rtol * max(1, |a|) at every step. Both runs compute fp32 log-probs and entropies within
    a few fp32 ulps of the exact values (the contract: <= 2 x eager error + 8 ulps, ~4e-6 at |log p| ~ 6,
    typically ~1 ulp); the loss, KL and entropy are means of terms with O(1) slope in them, and SGD moves
    the weights by lr x a gradient that differs as little, so a few steps stay near 1e-6. 1e-5 leaves
    headroom and still rejects a real error: a log-prob or entropy rounded to bf16 (~1e-2), a temperature
    ignored or applied twice (the entropy moves by ~1e-2 here), a wrong gradient (the KL's growth)."""
    return len(a) == len(b) > 0 and all(abs(x - y) <= rtol * max(1.0, abs(x)) for x, y in zip(a, b))


COLUMNS = ("loss", "kl", "entropy")  # TRL's logged metrics that fastrlhf's outputs feed


def main() -> int:
    backend = "CUDA Triton" if torch.cuda.is_available() else "Triton interpreter (CPU)"
    print(f"TRL GRPOTrainer, tiny Llama (vocab {WORDS + 3}), {STEPS} steps; fastrlhf on {backend}")
    t0 = time.perf_counter()
    runs = run_both()
    (trl_logs, trl_launches), (fast_logs, fast_launches) = runs["trl"], runs["fastrlhf"]
    print(f"{'':8}" + "".join(f"{'TRL ' + c:>14}{'fastrlhf ' + c:>18}" for c in COLUMNS))
    for step, (a, b) in enumerate(zip(trl_logs, fast_logs)):
        print(f"step {step:<3}" + "".join(f"{a[c]:14.8f}{b[c]:18.8f}" for c in COLUMNS))
    print(f"fastrlhf kernel launches: {sum(trl_launches.values())} without the switch, {dict(fast_launches)} with it")
    ok = all(agree([x[c] for x in trl_logs], [x[c] for x in fast_logs]) for c in COLUMNS)
    ran = not trl_launches and fast_launches["fastrlhf.linear_logprobs.fwd"] > 0
    print(
        f"the {', '.join(COLUMNS)} curves {'agree' if ok else 'DISAGREE'} (rtol {RTOL:.0e}); fastrlhf "
        f"{'ran only with the switch' if ran else 'DID NOT run only with the switch'}; {time.perf_counter() - t0:.1f} s"
    )
    return 0 if ok and ran else 1


if __name__ == "__main__":
    sys.exit(main())
