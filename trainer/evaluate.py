"""Evaluation after step 3 of RLHF: honest comparison of a PPO policy with the reference policy on held-out prompts.

"Honest" means the numbers answer "did PPO make the replies better?" and not "did PPO please the model
it was trained against?". Concretely:

- Held-out prompts: the caller passes prompts PPO never trained on (the test split); nothing here can
  check that, so the pipeline must.
- An independent judge decides: the rubric (:mod:`.rubric`, the stand-in for human annotators) compares
  each policy reply with a reference reply to the same prompt. The reward model's scores are reported
  too, but only beside the rubric: it is the proxy PPO optimised, so a rising RM score with a flat
  rubric win rate is reward hacking, not progress.
- A fair opponent: the reference is the original, unquantized model, sampled with the same prompts,
  temperature and token budget. By default each model draws its own random stream (seeds `seed` and
  `seed + 1`), so the win rate is the usual P(policy reply beats an independent reference reply), ties
  half. `common_random_numbers=True` gives both the same stream instead: identical models then give
  identical replies (useful as a check), but a policy that changed little copies the reference's
  replies on many prompts, which turns would-be wins and losses into ties and pulls the rate toward 0.5.
  Replies cut off at the token budget are judged as they are, and the EOS rate says how often that
  happened, for both sides.
- Uncertainty: the win rate comes with a 95% percentile-bootstrap interval over prompts (the replies to
  one prompt are not independent, so prompts are resampled, not pairs).
- The price: KL(policy || reference) on the policy's own replies, exact over the vocabulary per token
  and as the sequence-level k1 estimate, so a win can be weighed against how far the policy drifted.
- The evidence: every pair goes to ``samples.jsonl`` and a few side by side to ``examples.md``, so a
  person can read what the numbers summarise.

Win rate = (wins + 0.5 * ties) / pairs, a win being a pair where the rubric prefers the policy's reply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastrlhf.kernels import (
    full_kl,
    full_kl_ref,
    last_token_rewards,
    last_token_rewards_ref,
    token_logprobs,
    token_logprobs_ref,
)
from fastrlhf.kernels._common import nvtx_range

from . import rubric as rubric_lib
from .errors import UserError
from .data import PromptRecord, encode_prompt
from .models import (
    autocast,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
    resolve_reward_model_path,
    reward_head_params,
    same_tokenization,
    reward_trunk,
)
from .reward import score_texts
from .rollout import Rollout, forward_reply, sample

log = logging.getLogger("fastrlhf")

VERDICT_VALUE = {"a": 1.0, "tie": 0.5, "b": 0.0}
"""Points for the policy (side "a") per rubric verdict."""
BOOTSTRAP_RESAMPLES = 1000
CI_METHOD = f"percentile bootstrap over prompts, {BOOTSTRAP_RESAMPLES} resamples, 95%"


# ------------------------------------------------------------------------------------ pure statistics
def win_rate(verdicts: Sequence[str]) -> float:
    """(wins + 0.5 * ties) / n for verdicts "a" (policy wins), "b" (reference wins), "tie"."""
    if len(verdicts) == 0:
        raise ValueError("win_rate: no verdicts")
    unknown = sorted(set(verdicts) - set(VERDICT_VALUE))
    if unknown:
        raise ValueError(f"win_rate: unknown verdicts {unknown}; expected 'a', 'b' or 'tie'")
    return float(np.mean([VERDICT_VALUE[v] for v in verdicts]))


def win_rate_interval(
    verdicts: Sequence[str],
    groups: Sequence[int],
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of `win_rate`, resampling whole groups (prompts) with replacement.

    verdicts, groups: (N,) a verdict and its prompt index per pair. Each resample draws as many prompts
    as there are, and its win rate pools the pairs of the drawn prompts. Seeded: same inputs, same interval.
    """
    if len(verdicts) != len(groups):
        raise ValueError(f"win_rate_interval: {len(verdicts)} verdicts but {len(groups)} group labels")
    win_rate(verdicts)  # validates
    _, group_of = np.unique(np.asarray(groups), return_inverse=True)
    values = np.array([VERDICT_VALUE[v] for v in verdicts])
    points = np.bincount(group_of, weights=values)  # (G,) points per prompt
    counts = np.bincount(group_of).astype(float)  # (G,) pairs per prompt
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(points), size=(n_resamples, len(points)))  # (n_resamples, G)
    rates = points[drawn].sum(1) / counts[drawn].sum(1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(rates, [alpha, 1.0 - alpha])
    return float(low), float(high)


def pick_examples(verdicts: Sequence[str], groups: Sequence[int], n: int, *, seed: int = 0) -> list[int]:
    """Indices of `n` pairs to show side by side: one pair per prompt, prompts in a seeded shuffled
    order; if the picks hold no win (or no loss) but the data does, the last pick that is a tie or a
    repeated verdict makes way for the first such pair in the shuffled order."""
    order = np.random.default_rng(seed).permutation(len(verdicts)).tolist()
    seen, candidates = set(), []
    for i in order:
        if groups[i] not in seen:
            seen.add(groups[i])
            candidates.append(i)
    picks = candidates[:n]
    for wanted in ("a", "b"):
        if any(verdicts[i] == wanted for i in picks):
            continue
        counts = {v: sum(verdicts[i] == v for i in picks) for v in VERDICT_VALUE}
        spare = [k for k, i in enumerate(picks) if verdicts[i] == "tie" or counts[verdicts[i]] > 1]
        if not spare:
            continue
        taken = {groups[i] for k, i in enumerate(picks) if k != spare[-1]}  # keep one pair per prompt
        pool = [i for i in order if verdicts[i] == wanted and groups[i] not in taken]
        if pool:
            picks[spare[-1]] = pool[0]
    return picks


# -------------------------------------------------------------------------------------------- models
@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with the global torch RNG (CPU, and `device` if CUDA) seeded with `seed`; restore the
    caller's RNG state afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_same_vocab(tokenizer, other, what: str) -> None:
    """Policy, reference and reward model must read the same token ids (KL and RM scores use the policy's)."""
    if tokenizer.pad_token_id != other.pad_token_id or tokenizer.get_vocab() != other.get_vocab():
        raise UserError(f"the {what} has a different tokenizer (vocabulary or pad id) than the policy")


def _sample_replies(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    samples_per_prompt: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    desc: str,
) -> list[Rollout]:
    """All replies of one model, in chunks of at most `batch_size` rows (whole prompts per chunk), from
    one seeded RNG stream. -> Rollouts whose prompt_index is global (an index into prompt_ids)."""
    per_call = max(1, batch_size // samples_per_prompt)
    chunks = []
    with _seeded(seed, device), autocast(device):
        for start in tqdm(range(0, len(prompt_ids), per_call), desc=desc, leave=False):
            rollout = sample(
                model,
                tokenizer,
                prompt_ids[start : start + per_call],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                samples_per_prompt=samples_per_prompt,
                device=device,
            )
            rollout.prompt_index = rollout.prompt_index + start
            chunks.append(rollout)
    return chunks


def _reply_logits(model, rollout: Rollout) -> torch.Tensor:
    """(B, R, V) logits (model dtype, or bf16 under autocast) of the distributions that produced each reply
    token: the model's own, after whatever its forward applies to the head's output."""
    return forward_reply(model, model.get_output_embeddings(), rollout)[1]


@torch.no_grad()
def _kl_per_reply(
    policy, reference, rollouts: list[Rollout], *, temperature: float, use_kernels: bool, device: torch.device
) -> dict[str, np.ndarray]:
    """KL(policy || reference) on the policy's replies, at the sampling temperature. -> (N,) float64
    arrays: "full" (sum over reply tokens of the exact per-token KL), "k1" (sum of logp_policy -
    logp_ref over reply tokens), "tokens" (reply tokens, stop token included)."""
    kl_fn = full_kl if use_kernels else full_kl_ref
    logp_fn = token_logprobs if use_kernels else token_logprobs_ref
    out = {"full": [], "k1": [], "tokens": []}
    for rollout in tqdm(rollouts, desc="KL", leave=False):
        with autocast(device):
            logits = _reply_logits(policy, rollout)  # (B, R, V)
            ref_logits = _reply_logits(reference, rollout)  # (B, R, V)
        mask = rollout.response_mask.bool()  # (B, R)
        targets = rollout.response_ids.masked_fill(~mask, -100)  # (B, R) int64
        kl = kl_fn(logits, ref_logits, temperature=temperature, mask=mask)  # (B, R) fp32, 0 at padding
        k1 = logp_fn(logits, targets, temperature=temperature) - logp_fn(ref_logits, targets, temperature=temperature)
        out["full"].append(kl.sum(-1).double().cpu())
        out["k1"].append(k1.where(mask, 0).sum(-1).double().cpu())
        out["tokens"].append(rollout.response_lengths.cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


@torch.no_grad()
def _rm_scores(
    model, rollouts: list[Rollout], *, eos_id: int, pad_id: int, use_kernels: bool, device: torch.device
) -> np.ndarray:
    """Normalised reward (raw * config.reward_gain + config.reward_bias) of each prompt + reply ending in EOS
    (appended where the reply was cut off: the form train-rm trains on), read there, with the positions
    sampling used. -> (N,) float64."""
    head_fn = last_token_rewards if use_kernels else last_token_rewards_ref
    weight, bias = reward_head_params(model)  # (1, H), (1,) or None
    gain = float(getattr(model.config, "reward_gain", 1.0))
    offset = float(getattr(model.config, "reward_bias", 0.0))
    scores = []
    for rollout in tqdm(rollouts, desc="reward model", leave=False):
        rollout = rollout.with_eos(eos_id, pad_id)
        with autocast(device):
            hidden = reward_trunk(model)(
                input_ids=rollout.sequences, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
            ).last_hidden_state  # (B, P + R, H)
        raw = head_fn(hidden, weight, bias, attention_mask=rollout.attention_mask)  # (B,) fp32
        scores.append(raw.double().cpu() * gain + offset)
    return torch.cat(scores).numpy()


def _rm_scores_text(model, rm_tokenizer, records, rollouts: list[Rollout], tokenizer, use_kernels: bool) -> np.ndarray:
    """As `_rm_scores`, for a reward model with its own tokenizer: each reply decoded and re-rendered with
    the reward model's chat template (`reward.score_texts`). -> (N,) float64."""
    out = []
    for rollout in rollouts:
        prompts = [records[i].prompt for i in rollout.prompt_index.tolist()]
        scores = score_texts(model, rm_tokenizer, prompts, rollout.texts(tokenizer), use_kernels=use_kernels)
        out.append(scores.double().cpu())
    return torch.cat(out).numpy()


def _reply_facts(rollouts: list[Rollout], tokenizer) -> dict[str, list]:
    """Per reply (N rows, in prompt order): text, tokens (stop token included), has_eos, prompt index."""
    facts = {"text": [], "tokens": [], "eos": [], "prompt": []}
    for rollout in rollouts:
        facts["text"] += rollout.texts(tokenizer)
        facts["tokens"] += rollout.response_lengths.tolist()
        facts["eos"] += rollout.has_eos.tolist()
        facts["prompt"] += rollout.prompt_index.tolist()
    return facts


# ------------------------------------------------------------------------------------------ judging
def _judge(
    records: Sequence[PromptRecord], prompt_of: list[int], policy_texts: list[str], reference_texts: list[str], scorer
) -> dict[str, list]:
    """Rubric verdict and scores of each pair, and correctness / garbage of each reply."""
    out = {
        "verdict": [],
        "policy_score": [],
        "reference_score": [],
        "policy_correct": [],
        "reference_correct": [],
        "policy_garbage": [],
        "reference_garbage": [],
    }
    for p, a, b in zip(prompt_of, policy_texts, reference_texts):
        record = records[p]
        out["verdict"].append(rubric_lib.prefer(record, a, b, scorer=scorer))
        for side, text in (("policy", a), ("reference", b)):
            out[f"{side}_score"].append(float(scorer(record, text)))
            has_answer = isinstance(record.meta.get("answer"), str) and record.meta["answer"].strip()
            out[f"{side}_correct"].append(bool(rubric_lib.is_correct(record, text)) if has_answer else None)
            out[f"{side}_garbage"].append(rubric_lib.garbage_reason(text))
    return out


def _side_metrics(side: str, facts: dict[str, list], judged: dict[str, list], rm: np.ndarray | None) -> dict:
    """Means over one side's replies: rubric score, correct / garbage / EOS rates, length, RM score."""
    correct = [c for c in judged[f"{side}_correct"] if c is not None]
    return {
        f"{side}_rubric_score": float(np.mean(judged[f"{side}_score"])),
        f"{side}_correct_rate": float(np.mean(correct)) if correct else None,
        f"{side}_garbage_rate": float(np.mean([g is not None for g in judged[f"{side}_garbage"]])),
        f"{side}_reply_tokens": float(np.mean(facts["tokens"])),
        f"{side}_reply_words": float(np.mean([len(t.split()) for t in facts["text"]])),
        f"{side}_eos_rate": float(np.mean(facts["eos"])),
        f"{side}_rm_score": None if rm is None else float(rm.mean()),
    }


def _prompt_text(record: PromptRecord) -> str:
    return "\n".join(m["content"] for m in record.prompt if m["role"] == "user")


def _pair_rows(records, pol, ref, judged, kl, rm_pol, rm_ref) -> list[dict]:
    """One JSON-ready dict per pair, for samples.jsonl and the examples."""
    rows = []
    for i, p in enumerate(pol["prompt"]):
        record = records[p]
        rows.append(
            {
                "prompt_index": p,
                "id": record.meta.get("id"),
                "prompt": _prompt_text(record),
                "answer": record.meta.get("answer"),
                "policy_reply": pol["text"][i],
                "reference_reply": ref["text"][i],
                "verdict": {"a": "policy", "b": "reference", "tie": "tie"}[judged["verdict"][i]],
                "policy_score": judged["policy_score"][i],
                "reference_score": judged["reference_score"][i],
                "policy_correct": judged["policy_correct"][i],
                "reference_correct": judged["reference_correct"][i],
                "policy_garbage": judged["policy_garbage"][i],
                "reference_garbage": judged["reference_garbage"][i],
                "policy_rm_score": None if rm_pol is None else float(rm_pol[i]),
                "reference_rm_score": None if rm_ref is None else float(rm_ref[i]),
                "policy_tokens": pol["tokens"][i],
                "reference_tokens": ref["tokens"][i],
                "policy_eos": pol["eos"][i],
                "reference_eos": ref["eos"][i],
                "kl_full": float(kl["full"][i]),
                "kl_k1": float(kl["k1"][i]),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------- outputs
def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _examples_markdown(metrics: dict) -> str:
    """examples.md: the headline numbers, then each example as a block (prompt, answer, both replies)."""
    lines = [
        "# Policy vs reference: side-by-side examples",
        "",
        f"Win rate (rubric `{metrics['rubric']}`, ties count half): **{metrics['win_rate']:.3f}** "
        f"(95% CI {metrics['win_rate_ci95'][0]:.3f}-{metrics['win_rate_ci95'][1]:.3f}; "
        f"{metrics['wins']} wins / {metrics['ties']} ties / {metrics['losses']} losses over {metrics['pairs']} pairs). "
        f"KL(policy || reference) {metrics['kl_per_token']:.4f} per token.",
        "",
    ]
    for k, ex in enumerate(metrics["examples"], start=1):
        lines += [f"## {k}. {ex['prompt'].splitlines()[0] if ex['prompt'] else ''}", ""]
        lines += [
            f"- prompt id: `{ex['id']}`",
            f"- expected answer: {ex['answer'] or 'n/a'}",
            f"- verdict: **{ex['verdict']}**",
            "",
        ]
        for side in ("policy", "reference"):
            rm = "" if ex[f"{side}_rm_score"] is None else f", RM {ex[f'{side}_rm_score']:.3f}"
            lines.append(f"**{side}** (rubric {ex[f'{side}_score']:.3f}{rm}, {ex[f'{side}_tokens']} tokens):")
            lines += [f"> {line}" for line in (ex[f"{side}_reply"] or "(empty)").splitlines()] + [""]
    return "\n".join(lines)


def _plot_scores(pairs: list[dict], out_png: Path) -> Path:
    """Histograms of rubric scores (and RM scores when present), policy vs reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rubric score", "score")]
    if pairs[0]["policy_rm_score"] is not None:
        panels.append(("normalised RM score", "rm_score"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (label, key) in zip(axes[0], panels):
        pol = np.array([p[f"policy_{key}"] for p in pairs])
        ref = np.array([p[f"reference_{key}"] for p in pairs])
        bins = np.histogram_bin_edges(np.concatenate([pol, ref]), bins=20)
        ax.hist(ref, bins=bins, alpha=0.6, label=f"reference (mean {ref.mean():.2f})")
        ax.hist(pol, bins=bins, alpha=0.6, label=f"policy (mean {pol.mean():.2f})")
        ax.set(xlabel=label, ylabel="replies", title=f"Held-out replies: {label}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _write_outputs(out_dir: Path, metrics: dict, pairs: list[dict]) -> None:
    """evaluation.json, samples.jsonl, examples.md, eval_scores.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for row in pairs:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "examples.md").write_text(_examples_markdown(metrics), encoding="utf-8")
    _plot_scores(pairs, out_dir / "eval_scores.png")


# ------------------------------------------------------------------------------------------- the API
def evaluate_policy(
    policy: str,
    reference: str,
    reward_model: str | None,
    prompts: Sequence[PromptRecord],
    *,
    rubric: str = "demo",
    samples_per_prompt: int = 2,
    temperature: float = 0.7,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    use_kernels: bool = True,
    out_dir: str | Path | None = None,
    n_examples: int = 6,
    common_random_numbers: bool = False,
) -> dict:
    """Judge the policy against the reference policy on held-out `prompts` (see the module docstring).

    policy, reference: causal-LM folders. `reference` is the UNQUANTIZED original model, i.e. the
    reference policy itself, not the int8 copy PPO used for its KL penalty, so the KL reported here is
    to the true reference and the reference's replies carry no quantization error.
    reward_model: a reward-model folder (scores reported beside the rubric), or None.
    prompts: held-out records (``meta["answer"]`` enables correctness); each gets `samples_per_prompt`
    replies per model, sampled at `temperature` (top_k 0, top_p 1) with the global RNG seeded by `seed`
    (policy) and `seed + 1` (reference; `seed` too with `common_random_numbers`), the caller's RNG state
    restored; policy reply i is paired with reference reply i.
    The rubric `rubric` (a name in `rubric.RUBRICS`) picks the better reply of each pair.

    Returns a JSON-serialisable dict: win_rate, win_rate_ci95 [low, high] (percentile bootstrap over
    prompts), wins / ties / losses, per side (policy_* / reference_*): rubric_score, correct_rate,
    garbage_rate, reply_tokens, reply_words, eos_rate, rm_score (None without a reward model); KL:
    kl_per_token (exact), kl_per_reply (exact, summed over a reply), kl_k1_per_reply, kl_k1_per_token;
    the settings; and `examples` (n_examples side-by-side pairs). With `out_dir`, also writes
    evaluation.json (this dict), samples.jsonl (every pair), examples.md and eval_scores.png.
    """
    if not prompts:
        raise UserError("evaluate_policy: no prompts to evaluate on")
    if samples_per_prompt < 1 or batch_size < 1 or max_new_tokens < 1:
        raise UserError("evaluate_policy: samples_per_prompt, batch_size and max_new_tokens must be >= 1")
    records = list(prompts)
    scorer = rubric_lib.get_rubric(rubric)
    dev = resolve_device(device)
    policy, reference = resolve_model_path(policy), resolve_model_path(reference)
    if reward_model is not None:
        reward_model = resolve_reward_model_path(reward_model)
    tokenizer = load_tokenizer(policy)  # left padding, pad != EOS
    if Path(reference).resolve() != Path(policy).resolve():
        _check_same_vocab(tokenizer, load_tokenizer(reference), "reference")
    prompt_ids = [encode_prompt(tokenizer, r.prompt) for r in records]
    settings = dict(
        samples_per_prompt=samples_per_prompt,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=dev,
    )
    ref_seed = seed if common_random_numbers else seed + 1

    log.info("evaluate: sampling %d x %d replies from policy and reference", len(records), samples_per_prompt)
    policy_lm = load_causal_lm(policy, device=dev, tokenizer=tokenizer)
    reference_lm = load_causal_lm(reference, device=dev, tokenizer=tokenizer)
    with nvtx_range("eval-policy/sample"):
        policy_rollouts = _sample_replies(policy_lm, tokenizer, prompt_ids, seed=seed, desc="sample policy", **settings)
        reference_rollouts = _sample_replies(
            reference_lm, tokenizer, prompt_ids, seed=ref_seed, desc="sample reference", **settings
        )
    log.info("evaluate: KL(policy || reference) on the policy's replies")
    with nvtx_range("eval-policy/kl"):
        kl = _kl_per_reply(
            policy_lm, reference_lm, policy_rollouts, temperature=temperature, use_kernels=use_kernels, device=dev
        )
    del policy_lm, reference_lm

    rm_pol = rm_ref = None
    if reward_model is not None:
        log.info("evaluate: reward-model scores")
        rm_tokenizer = load_tokenizer(reward_model, padding_side="right")
        retokenize = not same_tokenization(tokenizer, rm_tokenizer)
        rm = load_reward_model(reward_model, device=dev, tokenizer=rm_tokenizer)
        if getattr(rm.config, "reward_gain", None) is None:
            log.warning(
                "evaluate: %s has no reward_gain / reward_bias (not from `fastrlhf train-rm`?): RM scores are raw",
                reward_model,
            )
        with nvtx_range("eval-policy/rm_scores"):
            if retokenize:  # its own tokenizer and chat template: it reads the replies' text
                t0 = time.perf_counter()
                rm_pol, rm_ref = (
                    _rm_scores_text(rm, rm_tokenizer, records, rollouts, tokenizer, use_kernels)
                    for rollouts in (policy_rollouts, reference_rollouts)
                )
                log.info("evaluate: reward model scored re-tokenized replies in %.1f s", time.perf_counter() - t0)
            else:
                ids = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
                rm_pol = _rm_scores(rm, policy_rollouts, **ids, use_kernels=use_kernels, device=dev)
                rm_ref = _rm_scores(rm, reference_rollouts, **ids, use_kernels=use_kernels, device=dev)
        del rm

    log.info("evaluate: judging %d pairs with rubric %r", len(kl["tokens"]), rubric)
    pol, ref = _reply_facts(policy_rollouts, tokenizer), _reply_facts(reference_rollouts, tokenizer)
    assert pol["prompt"] == ref["prompt"], "policy and reference replies must pair up prompt by prompt"
    with nvtx_range("eval-policy/judge"):
        judged = _judge(records, pol["prompt"], pol["text"], ref["text"], scorer)
    pairs = _pair_rows(records, pol, ref, judged, kl, rm_pol, rm_ref)

    verdicts = judged["verdict"]
    low, high = win_rate_interval(verdicts, pol["prompt"], seed=seed)
    n_tokens = float(kl["tokens"].sum())
    metrics = {
        "policy": str(policy),
        "reference": str(reference),
        "reward_model": None if reward_model is None else str(reward_model),
        "rubric": rubric,
        "prompts": len(records),
        "pairs": len(verdicts),
        "samples_per_prompt": samples_per_prompt,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "common_random_numbers": common_random_numbers,
        "win_rate": win_rate(verdicts),
        "win_rate_ci95": [low, high],
        "win_rate_ci_method": CI_METHOD,
        "wins": verdicts.count("a"),
        "ties": verdicts.count("tie"),
        "losses": verdicts.count("b"),
        **_side_metrics("policy", pol, judged, rm_pol),
        **_side_metrics("reference", ref, judged, rm_ref),
        "kl_per_token": float(kl["full"].sum() / n_tokens),
        "kl_per_reply": float(kl["full"].mean()),
        "kl_k1_per_reply": float(kl["k1"].mean()),
        "kl_k1_per_token": float(kl["k1"].sum() / n_tokens),
        "examples": [pairs[i] for i in pick_examples(verdicts, pol["prompt"], n_examples, seed=seed)],
    }
    if out_dir is not None:
        _write_outputs(Path(out_dir), metrics, pairs)
    log.info(
        "evaluate: win rate %.3f [%.3f, %.3f] (W/T/L %d/%d/%d over %d pairs); rubric %.3f vs %.3f; KL %.4f/token, "
        "k1 %.3f/reply; RM %s vs %s",
        metrics["win_rate"],
        low,
        high,
        metrics["wins"],
        metrics["ties"],
        metrics["losses"],
        metrics["pairs"],
        metrics["policy_rubric_score"],
        metrics["reference_rubric_score"],
        metrics["kl_per_token"],
        metrics["kl_k1_per_reply"],
        _fmt(metrics["policy_rm_score"]),
        _fmt(metrics["reference_rm_score"]),
    )
    return metrics
