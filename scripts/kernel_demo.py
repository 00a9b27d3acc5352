"""Kernel demo: every fastrlhf kernel next to eager PyTorch on SmolLM2-sized logits.

For each op it prints the kernel's and eager PyTorch's (in the input dtype) max abs error against an
fp64 reference computed from the same inputs, and, on CUDA, time and peak memory. Run it through
`bash scripts/demo.sh`, which sets up the environment (and TRITON_INTERPRET=1 on a machine without CUDA,
where the Triton kernels run exactly but slowly in Triton's interpreter and timings mean nothing).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fastrlhf import kernels as K


def err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item()


def measure(fn, device: torch.device):
    """-> (result, seconds, peak MB above the starting allocation; None off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - start_mem) / 2**20
    return out, time.perf_counter() - t0, None


def row(name: str, k_err: float, e_err: float, k_meas, e_meas, on_cuda: bool) -> None:
    line = f"{name:<34} {k_err:>11.2e} {e_err:>11.2e}"
    if on_cuda:
        line += f" {k_meas[1] * 1e3:>9.2f} {e_meas[1] * 1e3:>9.2f} {k_meas[2]:>9.0f} {e_meas[2]:>9.0f}"
    print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=None, help="token positions (default 256 on CPU, 8192 on CUDA)")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2: 49152)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    rows = args.rows or (8192 if on_cuda else 256)
    T = args.temperature
    g = torch.Generator().manual_seed(args.seed)
    print(f"fastrlhf kernel demo on {torch.cuda.get_device_name() if on_cuda else 'CPU (Triton interpreter)'}")
    print(f"logits ({rows}, {args.vocab}) {args.dtype}, temperature {T}; errors are max |x - fp64 reference|\n")
    header = f"{'op':<34} {'kernel err':>11} {'eager err':>11}"
    if on_cuda:
        header += f" {'kern ms':>9} {'eager ms':>9} {'kern MB':>9} {'eager MB':>9}"
    print(header)
    print("-" * len(header))

    logits = (torch.randn(rows, args.vocab, generator=g) * 2).to(dtype).to(device)
    ref_logits = (logits.float() + 0.05 * torch.randn(rows, args.vocab, generator=g).to(device)).to(dtype)
    targets = torch.randint(0, args.vocab, (rows,), generator=g).to(device)
    x64, y64 = logits.double(), ref_logits.double()

    # token log-probs + entropy, forward
    lp64, ent64 = K.token_logprobs_ref(x64, targets, temperature=T, return_entropy=True)
    k = measure(lambda: K.token_logprobs(logits, targets, temperature=T, return_entropy=True), device)

    def eager_logprobs(x):
        log_p = torch.log_softmax(x / T, -1)
        return log_p.gather(-1, targets[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)

    e = measure(lambda: eager_logprobs(logits), device)
    row("token_logprobs  log-prob", err(k[0][0], lp64), err(e[0][0], lp64), k, e, on_cuda)
    row("token_logprobs  entropy", err(k[0][1], ent64), err(e[0][1], ent64), k, e, on_cuda)

    # token log-probs, backward (gradient w.r.t. the logits)
    x_leaf64 = x64.clone().requires_grad_()
    (g64,) = torch.autograd.grad(K.token_logprobs_ref(x_leaf64, targets, temperature=T).sum(), x_leaf64)

    def grad_of(fn):
        x = logits.clone().requires_grad_()
        return torch.autograd.grad(fn(x).sum(), x)[0]

    k = measure(lambda: grad_of(lambda x: K.token_logprobs(x, targets, temperature=T)), device)
    e = measure(lambda: grad_of(lambda x: eager_logprobs(x)[0]), device)
    row("token_logprobs  fwd+bwd grad", err(k[0], g64), err(e[0], g64), k, e, on_cuda)

    # full-vocabulary KL(pi || pi_ref)
    kl64 = K.full_kl_ref(x64, y64, temperature=T)

    def eager_kl(x):
        log_p, log_q = torch.log_softmax(x / T, -1), torch.log_softmax(ref_logits / T, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    k = measure(lambda: K.full_kl(logits, ref_logits, temperature=T), device)
    e = measure(lambda: eager_kl(logits), device)
    row("full_kl         KL (pi ~ pi_ref)", err(k[0], kl64), err(e[0], kl64), k, e, on_cuda)
    rel = lambda x: ((x.double() - kl64).abs() / kl64).max().item()  # noqa: E731
    print(f"{'  relative error of KL':<34} {rel(k[0]):>11.2e} {rel(e[0]):>11.2e}")

    # sampled-token KL estimators
    lp = K.token_logprobs(logits, targets, temperature=T)
    ref_lp = K.token_logprobs(ref_logits, targets, temperature=T)
    for est in ("k1", "k2", "k3"):
        r64 = K.kl_estimate_ref(lp.double(), ref_lp.double(), estimator=est)
        k = measure(lambda: K.kl_estimate(lp, ref_lp, estimator=est), device)
        d = lp - ref_lp
        eager_est = {"k1": lambda: d, "k2": lambda: 0.5 * d * d, "k3": lambda: torch.exp(-d) - 1 + d}[est]
        e = measure(eager_est, device)
        row(f"kl_estimate     {est}", err(k[0], r64), err(e[0], r64), k, e, on_cuda)

    # pairwise reward loss, including huge reward gaps
    rc = (torch.randn(rows // 2, generator=g) * 5).to(device)
    rr = (torch.randn(rows // 2, generator=g) * 5).to(device)
    rc[0], rr[0] = 1e4, -1e4
    l64 = K.pairwise_loss_ref(rc.double(), rr.double(), reduction="none")
    k = measure(lambda: K.pairwise_loss(rc, rr, reduction="none"), device)
    e = measure(lambda: -F.logsigmoid(rc - rr), device)
    row("pairwise_loss   -logsigmoid", err(k[0], l64), err(e[0], l64), k, e, on_cuda)

    # fused reward head: last-token gather + scalar head + Bradley-Terry loss
    S, L, H = 16, 64, 576  # SmolLM2-135M hidden size
    hidden = torch.randn(S, L, H, generator=g).to(dtype).to(device)
    w = (torch.randn(1, H, generator=g) / (H + 1) ** 0.5).to(device)
    mask = (torch.arange(L).expand(S, L) < torch.randint(8, L + 1, (S, 1), generator=g)).long().to(device)
    ref_out = K.reward_head_pairwise_loss_ref(hidden.double(), w.double(), attention_mask=mask)
    k = measure(lambda: K.reward_head_pairwise_loss(hidden, w, attention_mask=mask), device)

    def eager_head():
        idx = mask.sum(-1) - 1
        r = (hidden[torch.arange(S, device=device), idx] @ w.to(dtype).T).squeeze(-1)
        return -F.logsigmoid(r[: S // 2] - r[S // 2 :]).mean()

    e = measure(eager_head, device)
    row("reward_head     pairwise loss", err(k[0].loss, ref_out.loss), err(e[0], ref_out.loss), k, e, on_cuda)
    print("\nkernel err <= 2 x eager err + a few fp32 ulps is the tested contract (tests/contract.py).")
    if not on_cuda:
        print("No CUDA device: kernels ran in Triton's interpreter; run on a GPU for time and memory.")


if __name__ == "__main__":
    main()
