"""What is benchmarked: the ops, their inputs, the providers that compute them, and the minimum bytes
each must move. Shared by `bench_kernels.py` (pytest-benchmark) and `sweep.py` (the grid).

Providers (every op gets a row for every provider; the ones without a counterpart are skipped, with why):
    fastrlhf   our Triton kernel (`fastrlhf.kernels.*`)
    torch_ref  its pure-PyTorch twin `*_ref` (fp32 internally): the spec, and the eager baseline we ship
    eager      the common eager idiom, in the input dtype: `torch.log_softmax(logits / T, -1).gather(...)`
    selective  the per-row "selective log-softmax" loop TRL / OpenRLHF use to save memory: one batch row
               at a time, `gather - logsumexp` per row (written here from the idea)
    compile    `torch.compile` of the eager idiom (CUDA only)
    liger      Liger-Kernel where it has an equivalent op (optional import; CUDA only)

Minimum bytes (the roofline numerator; each input read once and each output written once per pass; a
separate backward pass is part of the minimum because autograd does not know the upstream gradient
during the forward). N rows, V vocabulary, b = bytes per logit, ids are int64 (8 bytes), outputs fp32:
    token_logprobs      fwd: N*V*b + N*(8 + 4) [+ 4N entropy]
                        bwd: N*V*b (re-read logits) + N*V*b (write gradient) + N*(8 + 4) [+ 4N]
    full_kl             fwd: N*V*(b_x + b_y) + 4N
                        bwd: N*V*(b_x + b_y) (re-read both) + N*V*b_x (gradient) + 4N
    kl_estimate         fwd: N*(b_a + b_b) + 4N           bwd: N*(b_a + b_b) + 4N + N*(b_a + b_b)
    pairwise_loss       fwd: B*(b_c + b_r) + 4            bwd: B*(b_c + b_r) + 4 + B*(b_c + b_r)
    reward_head         fwd: S*T*8 (mask) + S*H*b (last rows) + H*b (weight) + 4
                        bwd: S*H*b (rows again, for dW) + S*T*H*b (dense hidden gradient) + H*b
    ppo_head            fwd: N*V*b + N*(8 + 3*4) (ids; old log-probs, advantages, reference log-probs, fp32)
                             + 6*4N (log-prob, entropy, ratio, surrogate, clip flag, k3 KL)
                        bwd: N*V*b (re-read logits) + N*V*b (write gradient) + N*(8 + 5*4) (ids, the five
                             differentiable outputs' upstream gradients)
Liger's cross-entropy computes the gradient during the forward and stores it in the logits' buffer, so
for it the fwd+bwd formula over-counts and "% of copy bandwidth" can exceed what its passes move.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import measure
from fastrlhf import kernels as K

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("fastrlhf", "torch_ref", "eager", "selective", "compile", "liger")
LOGITS_OPS = ("token_logprobs", "token_logprobs_entropy", "full_kl")  # swept over vocabularies and rows
HEAD_OPS = ("ppo_head",)  # on (B, T, V) logits too, measured at the headline shape only
ROW_OPS = LOGITS_OPS + HEAD_OPS  # every op that streams a (B, T, V) logits tensor
SMALL_OPS = ("kl_estimate", "pairwise_loss", "reward_head")
OPS = ROW_OPS + SMALL_OPS
CLIP_RANGE = 0.2  # ppo_head's clipped surrogate
MODES = ("fwd", "fwd_bwd")
TEMPERATURE = 0.7  # PPO divides every log-prob by the sampling temperature; 0.7 is the usual choice
IGNORE_INDEX = -100
ID_BYTES = 8  # int64 token ids / attention mask
OUT_BYTES = 4  # fp32 per-token outputs

# Rough cost of each provider relative to the minimum bytes at copy bandwidth: only used to plan the
# grid (which cells fit the time budget, which slow baselines to leave out at the largest sizes).
SLOWDOWN = {"fastrlhf": 1.2, "liger": 1.5, "compile": 2.0, "eager": 6.0, "selective": 8.0, "torch_ref": 10.0}
SLOW_PROVIDERS = ("torch_ref", "eager", "selective")
SLOW_LIMIT_MS = 60.0  # a slow baseline estimated above this per call is skipped (and says so)


class Skip(Exception):
    """A provider that cannot or should not run for a case; the message is the recorded reason."""


@dataclass(frozen=True)
class Case:
    """One op x mode x dtype x shape. Logits ops (ROW_OPS): logits (rows // seq, seq, vocab). kl_estimate and
    pairwise_loss: (rows,) vectors (vocab = seq = 0). reward_head: hidden (rows, seq, vocab = H)."""

    op: str
    mode: str
    dtype: str
    rows: int
    vocab: int = 0
    seq: int = 0
    temperature: float = TEMPERATURE

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def elem(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def shape(self) -> str:
        if self.op in ROW_OPS:
            return f"{self.rows // self.seq}x{self.seq}x{self.vocab}"
        if self.op == "reward_head":
            return f"{self.rows}x{self.seq}x{self.vocab}"
        return f"{self.rows}"

    @property
    def key(self) -> str:
        return f"{self.op}-{self.mode}-{self.dtype}-{self.shape}"


# ---------------------------------------------------------------------------------------- bytes
def min_bytes(case: Case) -> int:
    """The fewest bytes the op must move through device memory (module docstring has the formulas)."""
    N, V, b = case.rows, case.vocab, case.elem
    bwd = case.mode == "fwd_bwd"
    if case.op in ("token_logprobs", "token_logprobs_entropy"):
        per_row = ID_BYTES + OUT_BYTES + (OUT_BYTES if case.op == "token_logprobs_entropy" else 0)
        fwd = N * V * b + N * per_row
        return fwd + (2 * N * V * b + N * per_row if bwd else 0)
    if case.op == "full_kl":
        fwd = N * V * 2 * b + N * OUT_BYTES
        return fwd + (N * V * 3 * b + N * OUT_BYTES if bwd else 0)
    if case.op == "kl_estimate":  # fp32 log-probs in, fp32 out
        fwd = N * 2 * b + N * OUT_BYTES
        return fwd + (N * 2 * b + N * OUT_BYTES + N * 2 * b if bwd else 0)
    if case.op == "pairwise_loss":
        fwd = N * 2 * b + OUT_BYTES
        return fwd + (N * 2 * b + OUT_BYTES + N * 2 * b if bwd else 0)
    if case.op == "reward_head":
        S, T, H = case.rows, case.seq, case.vocab
        fwd = S * T * ID_BYTES + S * H * b + H * b + OUT_BYTES
        return fwd + (S * H * b + S * T * H * b + H * b if bwd else 0)
    if case.op == "ppo_head":
        fwd = N * V * b + N * (ID_BYTES + 3 * OUT_BYTES) + 6 * N * OUT_BYTES
        return fwd + (2 * N * V * b + N * (ID_BYTES + 5 * OUT_BYTES) if bwd else 0)
    raise ValueError(f"unknown op {case.op!r}")


def essential_bytes(case: Case) -> int:
    """What must be resident at the peak whatever the implementation: the inputs, plus their gradients
    for fwd_bwd ("logits + their gradient" for the log-prob ops). Peak memory is reported as a ratio to it."""
    N, V, b = case.rows, case.vocab, case.elem
    if case.op in ("token_logprobs", "token_logprobs_entropy"):
        inputs, grads = N * V * b + N * ID_BYTES, N * V * b
    elif case.op == "ppo_head":
        inputs, grads = N * V * b + N * (ID_BYTES + 3 * OUT_BYTES), N * V * b
    elif case.op == "full_kl":
        inputs, grads = 2 * N * V * b, N * V * b
    elif case.op in ("kl_estimate", "pairwise_loss"):
        inputs = grads = 2 * N * b
    else:  # reward_head
        S, T, H = case.rows, case.seq, case.vocab
        inputs, grads = S * T * H * b + S * T * ID_BYTES + H * b, S * T * H * b + H * b
    return inputs + (grads if case.mode == "fwd_bwd" else 0)


def est_call_ms(case: Case, provider: str, copy_bw_gbs: float | None) -> float:
    """Planning estimate of one call's time on a GPU (minimum bytes / copy bandwidth x SLOWDOWN)."""
    return min_bytes(case) * SLOWDOWN[provider] / ((copy_bw_gbs or 3000.0) * 1e6)


# --------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """One input set: named tensors, the names of the leaves a fwd_bwd call differentiates, and the
    seed that generated it (the same case and seed always give the same tensors)."""

    tensors: dict[str, torch.Tensor]
    grad_names: tuple[str, ...]
    seed: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def detached(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.tensors.items()}


def make_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    """Fresh random inputs (never zeros), generated on the device in the case's dtype."""
    inputs = _make_inputs(case, device, seed)
    inputs.seed = seed
    return inputs


def _make_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    """The tensors of one input set (see `make_inputs`), in `forward_fn` argument order."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype

    def randn(*shape: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        t = torch.randn(shape, generator=g, device=device, dtype=dt)
        if scale != 1.0:
            t.mul_(scale)
        return t.requires_grad_(grad)

    if case.op in ROW_OPS:
        B, T, V = case.rows // case.seq, case.seq, case.vocab
        logits = randn(B, T, V, scale=2.0, grad=True)  # (B, T, V)
        if case.op == "full_kl":
            ref = randn(B, T, V, scale=0.1).add_(logits.detach())  # near-equal reference, frozen
            return Inputs({"logits": logits, "ref_logits": ref}, ("logits",))
        targets = torch.randint(0, V, (B, T), generator=g, device=device)  # (B, T) int64
        if case.op == "ppo_head":  # the rollout's per-token constants, fp32 as the trainer keeps them
            with torch.no_grad():  # the policy's own log-probs, one batch row at a time: (B, T)
                logp = torch.stack(
                    [
                        torch.log_softmax(row.float() / case.temperature, -1).gather(-1, t[:, None])[:, 0]
                        for row, t in zip(logits, targets)
                    ]
                )

            def noise(scale: float) -> torch.Tensor:  # (B, T) fp32
                return torch.randn((B, T), generator=g, device=device).mul_(scale)

            # old and reference log-probs 0.1 nats off: ratios near 1, a few outside the clip range
            extra = {"old_logprobs": logp + noise(0.1), "advantages": noise(1.0), "ref_logprobs": logp + noise(0.1)}
            return Inputs({"logits": logits, "targets": targets, **extra}, ("logits",))
        return Inputs({"logits": logits, "targets": targets}, ("logits",))
    if case.op == "kl_estimate":
        logp = randn(case.rows).abs_().neg_().requires_grad_(True)  # (N,) log-probs <= 0
        ref = (logp.detach() + randn(case.rows, scale=0.05)).requires_grad_(True)
        return Inputs({"logp": logp, "ref_logp": ref}, ("logp", "ref_logp"))
    if case.op == "pairwise_loss":
        return Inputs(
            {"chosen": randn(case.rows, grad=True), "rejected": randn(case.rows, grad=True)}, ("chosen", "rejected")
        )
    if case.op == "reward_head":
        S, T, H = case.rows, case.seq, case.vocab
        hidden = randn(S, T, H, grad=True)  # (2B, T, H): chosen rows then rejected rows
        weight = randn(H, scale=H**-0.5, grad=True)  # (H,)
        lengths = torch.randint(max(1, T // 2), T + 1, (S,), generator=g, device=device)
        mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).long()  # (S, T) right padding
        return Inputs({"hidden": hidden, "weight": weight, "mask": mask}, ("hidden", "weight"))
    raise ValueError(f"unknown op {case.op!r}")


# ------------------------------------------------------------------------- providers: eager idioms
Outputs = tuple[torch.Tensor, ...]


def eager_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool) -> Outputs:
    """The common idiom, in the input dtype: log-softmax of the whole (B, T, V) tensor, then gather."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)  # (B, T, V) input dtype
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    if not entropy:
        return (logp,)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def selective_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool) -> Outputs:
    """The per-row loop: one batch row (T, V) at a time, so only a row's temporaries are alive at once;
    the log-prob is `z_target - logsumexp(z)` (entropy needs the row's log-softmax)."""
    logps, ents = [], []
    for row_logits, row_targets in zip(logits, targets):  # (T, V), (T,)
        z = row_logits / temperature
        if entropy:
            lp = torch.log_softmax(z, dim=-1)
            logps.append(lp.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1))
            ents.append(-(lp.exp() * lp).sum(-1))
        else:
            logps.append(z.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return (torch.stack(logps),) + ((torch.stack(ents),) if entropy else ())


def eager_full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> Outputs:
    """Textbook KL(pi || pi_ref) over the vocabulary from two log-softmaxes, in the input dtype."""
    lp = torch.log_softmax(logits / temperature, dim=-1)
    lq = torch.log_softmax(ref_logits / temperature, dim=-1)
    return ((lp.exp() * (lp - lq)).sum(-1),)


def eager_ppo_head(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor,
    temperature: float,
) -> Outputs:
    """The unfused PPO head: the log-softmax idiom (input dtype), then the clipped surrogate and k3 KL in
    fp32 (the expressions of `trainer.rl.policy_loss`). -> log-prob, entropy, ratio, surrogate, k3 KL."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)  # (B, T, V) input dtype
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # (B, T)
    entropy = -(logp_all.exp() * logp_all).sum(-1).float()
    ratio = torch.exp(logp - old_logprobs)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - CLIP_RANGE, 1 + CLIP_RANGE))
    d = logp - ref_logprobs
    return logp, entropy, ratio, pg, torch.exp(-d) - 1 + d


def eager_kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor) -> Outputs:
    """Textbook k3 = exp(-d) - 1 + d, d = logp - ref_logp."""
    d = logp - ref_logp
    return (torch.exp(-d) - 1 + d,)


def eager_pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> Outputs:
    return (-F.logsigmoid(chosen - rejected).mean(),)


def eager_reward_head(hidden: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> Outputs:
    """The unfused reward-model tail: last index from the mask (right padding), gather, head, loss."""
    S = hidden.shape[0]
    last = mask.sum(-1) - 1  # (S,)
    r = hidden[torch.arange(S, device=hidden.device), last] @ weight  # (S,) input dtype
    return (-F.logsigmoid(r[: S // 2] - r[S // 2 :]).mean(),)


def _eager_fn(case: Case) -> Callable[..., Outputs]:
    """The eager idiom as a function of the case's tensors (positional, in `make_inputs` order)."""
    T = case.temperature
    if case.op in ("token_logprobs", "token_logprobs_entropy"):
        ent = case.op == "token_logprobs_entropy"
        return lambda logits, targets: eager_token_logprobs(logits, targets, T, ent)
    if case.op == "full_kl":
        return lambda logits, ref_logits: eager_full_kl(logits, ref_logits, T)
    if case.op == "ppo_head":
        return lambda logits, targets, old, adv, ref: eager_ppo_head(logits, targets, old, adv, ref, T)
    return {"kl_estimate": eager_kl_estimate, "pairwise_loss": eager_pairwise_loss, "reward_head": eager_reward_head}[
        case.op
    ]


# ------------------------------------------------------------------------- providers: the others
def _fastrlhf_fn(case: Case, twin: str = "") -> Callable[..., Outputs]:
    """The fastrlhf op of `case`; twin="_ref" gives its pure-PyTorch `*_ref` twin (same signature)."""
    T = case.temperature
    logprobs, full_kl = getattr(K, "token_logprobs" + twin), getattr(K, "full_kl" + twin)
    kl_estimate, pairwise = getattr(K, "kl_estimate" + twin), getattr(K, "pairwise_loss" + twin)
    reward_head = getattr(K, "reward_head_pairwise_loss" + twin)
    ppo_head = getattr(K, "ppo_head" + twin)
    if case.op == "token_logprobs":
        return lambda logits, targets: (logprobs(logits, targets, temperature=T),)
    if case.op == "token_logprobs_entropy":
        return lambda logits, targets: tuple(logprobs(logits, targets, temperature=T, return_entropy=True))
    if case.op == "full_kl":
        return lambda logits, ref_logits: (full_kl(logits, ref_logits, temperature=T),)
    if case.op == "ppo_head":  # its five differentiable outputs (the clip flag is a by-product)

        def head(logits, targets, old, adv, ref):
            o = ppo_head(logits, targets, old, adv, ref_logprobs=ref, clip_range=CLIP_RANGE, temperature=T)
            return o.logprobs, o.entropy, o.ratio, o.pg_loss, o.kl

        return head
    if case.op == "kl_estimate":
        return lambda logp, ref_logp: (kl_estimate(logp, ref_logp, estimator="k3"),)
    if case.op == "pairwise_loss":
        return lambda chosen, rejected: (pairwise(chosen, rejected),)
    return lambda hidden, weight, mask: (reward_head(hidden, weight, attention_mask=mask).loss,)


def _ref_fn(case: Case) -> Callable[..., Outputs]:
    return _fastrlhf_fn(case, "_ref")


def _selective_fn(case: Case) -> Callable[..., Outputs]:
    if case.op not in ("token_logprobs", "token_logprobs_entropy"):
        raise Skip("the per-row selective log-softmax loop is a log-prob idiom: no counterpart for this op")
    ent = case.op == "token_logprobs_entropy"
    return lambda logits, targets: selective_token_logprobs(logits, targets, case.temperature, ent)


_COMPILED: dict[str, Callable[..., Outputs]] = {}


def _compile_fn(case: Case, device: torch.device) -> Callable[..., Outputs]:
    """torch.compile of the eager idiom; one compiled function per op, reused across shapes, modes and
    dtypes (dynamo re-specialises as it needs to; that compile time is excluded from the median)."""
    if not measure.on_cuda(device):
        raise Skip("torch.compile baseline runs on CUDA only (the CPU smoke mode skips it)")
    if case.op not in _COMPILED:
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        _COMPILED[case.op] = torch.compile(_eager_fn(case))
    return _COMPILED[case.op]


def liger_status() -> str | None:
    """None when Liger-Kernel can be imported, else why not."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel not installed (optional; scripts/gpu/fetch_wheels.sh fetches a wheel)"
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception as e:  # an import-time failure of an optional peer is a skip, not a crash
        return f"liger_kernel failed to import: {type(e).__name__}: {e}"[:200]
    return None


def _liger_fn(case: Case, device: torch.device) -> Callable[..., Outputs]:
    """Liger-Kernel's closest op. token_logprobs = -cross_entropy(reduction="none") on logits / T (Liger
    has no temperature argument, so the division is part of its cost as it is for its users).
    full_kl = liger_jsd(beta=1) = KL(input || target) on the two log-softmaxes it needs materialised
    (input dtype); it returns the batch mean, not per-token values."""
    if case.op not in ("token_logprobs", "full_kl"):
        raise Skip("Liger-Kernel has no equivalent op")
    if not measure.on_cuda(device):
        raise Skip("Liger-Kernel runs on CUDA only")
    why = liger_status()
    if why:
        raise Skip(why)
    from liger_kernel.transformers.functional import liger_cross_entropy, liger_jsd

    T = case.temperature
    if case.op == "token_logprobs":

        def liger_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> Outputs:
            V = logits.shape[-1]
            z = logits / T  # Liger stores its gradient into this buffer: never the caller's logits
            loss = liger_cross_entropy(
                z.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
            )
            return (-loss.view(logits.shape[:-1]),)

        return liger_logprobs

    def liger_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> Outputs:
        V = logits.shape[-1]
        lp = torch.log_softmax(logits / T, dim=-1).reshape(-1, V)
        lq = torch.log_softmax(ref_logits / T, dim=-1).reshape(-1, V)
        return (liger_jsd(lp, lq, beta=1.0),)

    return liger_kl


def forward_fn(case: Case, provider: str, device: torch.device) -> Callable[..., Outputs]:
    """The provider's forward for this case: f(*tensors in make_inputs order) -> tuple of outputs.
    Raises Skip (with the reason) when the provider has nothing to run here."""
    if provider == "fastrlhf":
        return _fastrlhf_fn(case)
    if provider == "torch_ref":
        return _ref_fn(case)
    if provider == "eager":
        return _eager_fn(case)
    if provider == "selective":
        return _selective_fn(case)
    if provider == "compile":
        return _compile_fn(case, device)
    if provider == "liger":
        return _liger_fn(case, device)
    raise ValueError(f"unknown provider {provider!r}")


def static_skip(case: Case, provider: str, device: torch.device, copy_bw_gbs: float | None) -> str | None:
    """Why this cell should not run, decided before allocating anything (None: run it)."""
    try:
        forward_fn(case, provider, device)
    except Skip as e:
        return str(e)
    if provider in SLOW_PROVIDERS and measure.on_cuda(device):
        est = est_call_ms(case, provider, copy_bw_gbs)
        if est > SLOW_LIMIT_MS:
            return (
                f"slow baseline skipped at this size: est. {est:.0f} ms/call (> {SLOW_LIMIT_MS:.0f}) would dominate "
                "the time budget; see its smaller shapes"
            )
    return None


# ------------------------------------------------------------------------------------ one cell
@dataclass
class Prepared:
    """A ready-to-time cell: `call(i)` runs the op once on input set i (fwd under no_grad; fwd_bwd
    as forward + torch.autograd.grad with a fixed random upstream gradient, nothing accumulated)."""

    call: Callable[[int], None]
    first_call_s: float  # the first call: includes Triton / inductor compilation
    max_abs_err: float | None  # forward outputs vs the *_ref twin on the first input set


def prepare(case: Case, provider: str, sets: list[Inputs], device: torch.device) -> Prepared:
    """Build the call, run it once (compiling whatever compiles), and check its forward against the
    `*_ref` twin. Raises Skip, torch.OutOfMemoryError or the provider's own error."""
    fn = forward_fn(case, provider, device)
    upstream: dict[tuple, torch.Tensor] = {}

    def grad_out(o: torch.Tensor) -> torch.Tensor:
        k = (tuple(o.shape), o.dtype)
        if k not in upstream:  # created in the first (untimed) call, then reused
            upstream[k] = torch.randn(o.shape, device=o.device, dtype=o.dtype)
        return upstream[k]

    if case.mode == "fwd":

        def call(i: int) -> None:
            with torch.no_grad():
                fn(*sets[i].detached().values())

    else:

        def call(i: int) -> None:
            s = sets[i]
            outs = fn(*s.tensors.values())
            leaves = [s.tensors[n] for n in s.grad_names]
            torch.autograd.grad(outs, leaves, grad_outputs=[grad_out(o) for o in outs], allow_unused=True)

    t0 = time.perf_counter()
    call(0)
    measure.sync(device)
    first_call_s = time.perf_counter() - t0
    return Prepared(call, first_call_s, check_error(case, fn, sets[0]))


def check_error(case: Case, fn: Callable[..., Outputs], inputs: Inputs) -> float:
    """max |provider - torch_ref| over the forward outputs on the first input set (a wiring check: a
    provider that computes something else shows up here, not as a suspiciously fast time). The provider
    runs exactly as when timed (same grad mode, so a compiled graph is reused, not recompiled); a scalar
    output (Liger's batch-mean KL) is compared with the mean of the per-token reference."""
    grad = case.mode == "fwd_bwd"
    with torch.set_grad_enabled(grad):
        outs = [o.detach().float() for o in fn(*(inputs.tensors if grad else inputs.detached()).values())]
    err = 0.0
    for o, r in zip(outs, reference_outputs(case, inputs)):
        if o.numel() == 1 and r.numel() > 1:
            r = r.mean()
        err = max(err, float((o.reshape(r.shape) - r).abs().max()))
    return err


_REF_CACHE: dict[tuple, list[torch.Tensor]] = {}


def reference_outputs(case: Case, inputs: Inputs) -> list[torch.Tensor]:
    """The `*_ref` twin's fp32 outputs for an input set, computed one batch row at a time (bounded
    memory at any size) and cached for the case's other providers and modes."""
    key = (case.op, case.dtype, case.shape, case.temperature, inputs.seed)
    if key not in _REF_CACHE:
        _REF_CACHE.clear()
        ref, t = _ref_fn(case), inputs.detached()
        with torch.no_grad():
            if case.op in ROW_OPS:  # (B, T, V) and (B, T): one batch row at a time
                chunks = [ref(*(v[b : b + 1] for v in t.values())) for b in range(case.rows // case.seq)]
                _REF_CACHE[key] = [torch.cat([c[k] for c in chunks]).float() for k in range(len(chunks[0]))]
            else:
                _REF_CACHE[key] = [o.float() for o in ref(*t.values())]
    return _REF_CACHE[key]


def run_cell(case: Case, provider: str, sets: list[Inputs], device: torch.device, copy_bw_gbs: float | None) -> dict:
    """Measure one provider on one case: median time, achieved GB/s and % of copy bandwidth, peak
    memory over the inputs and its ratio to the essential bytes, first-call time and the check error.
    Raises what `prepare` raises; the caller records it."""
    return measure_prepared(case, prepare(case, provider, sets, device), sets, device, copy_bw_gbs)


def measure_prepared(
    case: Case, prep: Prepared, sets: list[Inputs], device: torch.device, copy_bw_gbs: float | None
) -> dict:
    """The measurements of a prepared cell (see `run_cell`)."""
    ms, method = measure.median_ms(measure.rotating(prep.call, len(sets)), device)
    peak_extra = measure.peak_extra_bytes(lambda: prep.call(0), device)
    gbs = measure.gb_per_s(min_bytes(case), ms) if measure.on_cuda(device) else None
    row = {
        "median_ms": ms,
        "timing": method,
        "gb_s": gbs,
        "pct_copy_bw": 100.0 * gbs / copy_bw_gbs if gbs is not None and copy_bw_gbs else None,
        "peak_mb": None,
        "peak_ratio": None,
        "first_call_s": prep.first_call_s,
        "max_abs_err": prep.max_abs_err,
        "input_sets": len(sets),
    }
    if peak_extra is not None:
        peak_total = sets[0].nbytes + peak_extra
        row.update(peak_mb=peak_total / measure.MB, peak_ratio=peak_total / essential_bytes(case))
    return row


def input_sets(case: Case, device: torch.device, seed: int = 0) -> list[Inputs]:
    """Pre-allocated input sets for a case: three while one set is small enough for caches to matter."""
    first = make_inputs(case, device, seed)
    n = measure.n_input_sets(first.nbytes) if measure.on_cuda(device) else 1
    return [first] + [make_inputs(case, device, seed + k) for k in range(1, n)]
