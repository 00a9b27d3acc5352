"""Reward-model validation metrics and plots (scikit-learn for the metrics, matplotlib for the plots).

The pairwise decision as a binary classifier: each pair is shown in a seeded random order (A, B); the
label is y = 1 when A is the chosen response, the score is P(A > B) = sigmoid(r_A - r_B) (the
Bradley-Terry probability the model was trained to output). On that sample, accuracy equals the usual
"chosen scores higher" accuracy, and precision / recall / F1 / AUC-ROC / calibration are well defined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.special import expit
from sklearn.metrics import accuracy_score, brier_score_loss, precision_recall_fscore_support, roc_auc_score, roc_curve


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """ECE = sum_b (n_b / n) |mean(y in b) - mean(prob in b)| over equal-width probability bins.
    (scikit-learn has the reliability curve but not this weighted summary.)"""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(y[in_bin].mean() - prob[in_bin].mean())
    return float(ece)


def pairwise_metrics(
    chosen: np.ndarray, rejected: np.ndarray, *, seed: int = 0, margins: np.ndarray | None = None, n_buckets: int = 4
) -> dict:
    """chosen, rejected: (B,) rewards of each pair -> metrics dict (floats, lists; "roc" holds the curve)."""
    chosen, rejected = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    if len(chosen) == 0:
        raise ValueError("pairwise_metrics: no pairs to evaluate")
    gap = chosen - rejected
    flip = np.random.default_rng(seed).random(len(gap)) < 0.5  # A = rejected for these pairs
    y = (~flip).astype(int)
    delta = np.where(flip, -gap, gap)  # r_A - r_B
    prob = expit(delta)
    pred = (delta > 0).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, average="binary", zero_division=0)
    two_classes = 0 < y.sum() < len(y)
    fpr, tpr, _ = roc_curve(y, prob) if two_classes else (np.array([0.0, 1.0]), np.array([0.0, 1.0]), None)
    metrics = {
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auc_roc": float(roc_auc_score(y, prob)) if two_classes else float("nan"),
        "ece": expected_calibration_error(y, prob),
        "brier": float(brier_score_loss(y, prob)),
        "gap_mean": float(gap.mean()),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        **reward_distribution(chosen, rejected),
    }
    metrics["accuracy_by_gap"] = _bucket_accuracy(np.abs(gap), gap > 0, n_buckets)
    if margins is not None:
        metrics["accuracy_by_label_margin"] = _bucket_accuracy(margins, gap > 0, n_buckets)
    return metrics


def reward_distribution(chosen: np.ndarray, rejected: np.ndarray) -> dict:
    """Mean, spread and quartiles of the chosen and the rejected rewards."""
    out = {}
    for name, r in (("chosen", np.asarray(chosen, dtype=float)), ("rejected", np.asarray(rejected, dtype=float))):
        q1, q2, q3 = np.quantile(r, [0.25, 0.5, 0.75])
        out.update(
            {
                f"reward_{name}_mean": float(r.mean()),
                f"reward_{name}_std": float(r.std()),
                f"reward_{name}_quartiles": [float(q1), float(q2), float(q3)],
            }
        )
    return out


def _bucket_accuracy(key: np.ndarray, correct: np.ndarray, n_buckets: int) -> list[dict]:
    """Accuracy within quantile buckets of `key` (e.g. the model's |r_c - r_r|: is it right when sure?)."""
    edges = np.unique(np.quantile(key, np.linspace(0, 1, n_buckets + 1)))
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == len(edges) - 2
        sel = (key >= lo) & ((key <= hi) if last else (key < hi))
        if sel.any():
            rows.append(
                {"low": float(lo), "high": float(hi), "pairs": int(sel.sum()), "accuracy": float(correct[sel].mean())}
            )
    return rows


def plot_reward_report(chosen: np.ndarray, rejected: np.ndarray, metrics: dict, out_dir: Path) -> list[Path]:
    """roc.png (ROC of the pairwise decision) and rewards.png (reward histograms, chosen vs rejected)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(metrics["roc"]["fpr"], metrics["roc"]["tpr"], lw=2, label=f"AUC = {metrics['auc_roc']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Reward model: pairwise ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    paths.append(Path(out_dir) / "roc.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=30)
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {np.mean(chosen):.2f})")
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {np.mean(rejected):.2f})")
    ax.set(xlabel="normalised reward", ylabel="responses", title=f"Rewards, accuracy {metrics['accuracy']:.3f}")
    ax.legend()
    fig.tight_layout()
    paths.append(Path(out_dir) / "rewards.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def plot_training_curves(log_path: Path, out_png: Path) -> Path:
    """Loss and accuracy per step (train) with validation points, from a metrics.jsonl log."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot([r["step"] for r in train], [r[key] for r in train], lw=1, alpha=0.8, label="train (per step)")
        if val:
            ax.plot([r["step"] for r in val], [r[key] for r in val], "o-", label="validation")
        ax.set(xlabel="step", ylabel=key)
        ax.legend()
    ax_loss.set_title("Reward model: Bradley-Terry loss")
    ax_acc.set_title("Reward model: pairwise accuracy")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


PPO_CURVES = (
    ("objective/score", "reward-model score (normalised)"),
    ("objective/kl", "KL to reference, nats/token (k1)"),
    ("policy/response_length", "reply length, tokens"),
    ("policy/eos_rate", "replies ending with EOS"),
)


def plot_ppo_curves(log_path: Path, out_png: Path) -> Path:
    """Score, KL, reply length and EOS rate per PPO step, from ppo's metrics.jsonl."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(PPO_CURVES), figsize=(3.2 * len(PPO_CURVES), 3.2))
    for ax, (key, title) in zip(axes, PPO_CURVES):
        ax.plot(steps, [r[key] for r in rows], "o-", ms=3)
        ax.set(xlabel="PPO step", title=title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
