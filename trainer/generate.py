"""The sampler: decode replies with a preallocated KV cache, prompts prefilled once, no host sync per token.

One place for all sampling (step 1's candidate pairs, PPO's rollouts, the evaluation). What it does that
`model.generate(do_sample=True, num_return_sequences=k)` does not:

- The KV cache is transformers' own `StaticCache` (every family's attention layers know how to write it,
  sliding-window layers included), allocated once for the whole reply. Each prompt is prefilled once, at
  batch B0, and the cache rows are then repeated for its k samples (`generate` expands the batch first and
  prefills every prompt k times).
- Decoding keeps everything on the device: the next token is drawn with the Gumbel-max trick
  (argmax(z / T - log E), E ~ Exp(1): exactly a draw from softmax(z / T), no `multinomial`, no `.item()`),
  finished rows are tracked in a device tensor and keep feeding the pad token, and the host reads "all
  done?" only every `check_every` tokens. Replies are cut to the widest real reply afterwards, so the
  extra steps past the last stop never show in the output.
- On CUDA (`compile=True`), the decode step runs under `torch.compile(mode="reduce-overhead")`: a CUDA graph
  per shape. Shapes are fixed per call (B rows, a cache length rounded up to `bucket` tokens), so a run
  with steady batch sizes compiles a handful of graphs. The CPU never takes this path.
- With the tokens it returns the behaviour log-probs: log softmax(z / T) of each sampled token, from the
  very logits it sampled from, through the `token_logprobs` kernel (one (B, V) call per step).

The attention mask given to the model is a (B, L) buffer over the cache's columns (1 at real prompt tokens
and at every decoded column, 0 at left padding and at columns not yet written); positions count real
tokens, as `generate` and `Rollout.position_ids` number them. A shared system prompt is not prefilled
separately: with left padding its columns differ from row to row.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import transformers

from fastrlhf.kernels import token_logprobs


@dataclass
class Generated:
    """What `generate` returns for B = B0 * samples_per_prompt rows (rows of one prompt adjacent)."""

    tokens: torch.Tensor
    """(B, R') int64: decoded tokens, R' <= max_new_tokens; after a row's first stop token, whatever it was fed
    (the pad id); `rollout.mask_after_stop` turns this into a reply and its mask."""
    logprobs: torch.Tensor | None
    """(B, R') fp32: log softmax(z / T) of each decoded token under the logits it was drawn from; None when not
    asked for. Zero where the row had already stopped."""


def draw(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) (argmax for temperature 0), on the device with the
    global RNG: argmax(z / T - log E) with E ~ Exp(1) (Gumbel-max). logits (B, V) -> (B,) int64."""
    z = logits.float()
    if temperature == 0:
        return z.argmax(-1)
    e = torch.empty_like(z).exponential_()
    return (z / temperature - e.log()).argmax(-1)


def _repeat_rows(cache: transformers.StaticCache, k: int) -> None:
    """Each row of a prefilled static cache repeated k times in place (rows of one prompt adjacent): the
    layers' key and value tensors are replaced; their lengths (per layer, shared by all rows) stay."""
    if k == 1:
        return
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys.repeat_interleave(k, 0)
            layer.values = layer.values.repeat_interleave(k, 0)
            layer.batch_size = layer.keys.shape[0]
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)


def _cache_kwargs(model, cache) -> dict:
    """The cache arguments of `model`'s forward: transformers >= 5.25 name the cache `cache` (and compute
    write positions themselves), earlier 5.x name it `past_key_values` and take `cache_position` (set per
    call by the caller)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes them on
    params = inspect.signature(inner.forward).parameters
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "cache_position" in params:
        kwargs["cache_position"] = None
    return kwargs


def _step(model, token, position, mask, cache_kwargs):
    """One decode step: (B, 1) tokens at (B, 1) positions -> (B, V) logits of the next token."""
    return model(input_ids=token, position_ids=position, attention_mask=mask, **cache_kwargs).logits[:, -1]


_COMPILED = {}


def _compiled_step():
    """`_step` under torch.compile(mode="reduce-overhead"): CUDA graphs, one per input shape (CUDA only)."""
    if "step" not in _COMPILED:
        _COMPILED["step"] = torch.compile(_step, mode="reduce-overhead", fullgraph=False, dynamic=False)
    return _COMPILED["step"]


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    stop_ids: Sequence[int],
    pad_id: int,
    samples_per_prompt: int = 1,
    logprobs: bool = True,
    check_every: int = 4,
    synced_gpus: bool = False,
    compile: bool = False,
    bucket: int = 64,
) -> Generated:
    """Decode up to `max_new_tokens` tokens after each left-padded prompt.

    prompt_ids, prompt_mask: (B0, P) int64 on the model's device, left-padded (mask 1 at real tokens).
    temperature: > 0 samples softmax(z / T) (pure: no top-k, top-p or penalties); 0 decodes greedily.
    stop_ids: tokens that end a reply. A row keeps being fed `pad_id` after its stop token.
    samples_per_prompt: k replies per prompt, sharing its prefill -> B = B0 * k rows.
    logprobs: also return the behaviour log-probs (`token_logprobs` of the decode logits at T; at T = 0 they
        are taken at T = 1).
    check_every: the host reads whether every row has stopped once per this many tokens.
    synced_gpus: keep stepping until every process has finished (FSDP2 gathers parameters in each forward,
        so all ranks must make the same number of calls); one all-reduce per check.
    compile: run the decode step as a CUDA graph (ignored off CUDA); the cache length is rounded up to a
        multiple of `bucket` so that different prompt widths share a graph.
    """
    device = prompt_ids.device
    B0, P = prompt_ids.shape
    k = samples_per_prompt
    B, R = B0 * k, max_new_tokens
    use_graph = compile and device.type == "cuda"
    L = P + R
    if use_graph:
        L = -(-L // bucket) * bucket
    cache = transformers.StaticCache(config=model.config, max_cache_len=L)
    mask = torch.zeros(B0, L, dtype=torch.long, device=device)
    mask[:, :P] = prompt_mask

    # prefill: each prompt once, then its cache rows repeated for the k samples
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cache_kwargs = _cache_kwargs(model, cache)
    if "cache_position" in cache_kwargs:  # the prompt's columns, then one column per step (no copy per token)
        columns = torch.arange(L, device=device)
        cache_kwargs["cache_position"] = columns[:P]
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, **cache_kwargs)
    logits = out.logits[:, -1].repeat_interleave(k, 0)  # (B, V)
    del out
    _repeat_rows(cache, k)
    mask = mask.repeat_interleave(k, 0)  # (B, L)
    position = prompt_mask.sum(-1, keepdim=True).repeat_interleave(k, 0)  # (B, 1): the first reply token's position

    stop = torch.tensor(list(stop_ids), device=device)
    tokens = torch.full((B, R), pad_id, dtype=torch.long, device=device)
    lp = torch.zeros(B, R, dtype=torch.float32, device=device) if logprobs else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step = _compiled_step() if use_graph else _step
    n = R
    for t in range(R):
        token = draw(logits, temperature)
        token = token.masked_fill(done, pad_id)
        tokens[:, t] = token
        if lp is not None:
            lp[:, t] = token_logprobs(logits, token, temperature=temperature or 1.0).masked_fill(done, 0.0)
        done = done | torch.isin(token, stop)
        if t == R - 1:
            break
        if (t + 1) % check_every == 0 and _all_done(done, synced_gpus):
            n = t + 1
            break
        mask[:, P + t] = 1
        if "cache_position" in cache_kwargs:
            cache_kwargs["cache_position"] = columns[P + t : P + t + 1]
        logits = step(model, token[:, None], position + t, mask, cache_kwargs)
        if use_graph:
            logits = logits.clone()  # the graph's output buffer is overwritten by the next replay
    del cache
    # every rank returns the same width when synced (the steps all took), else the widest real reply
    width = n if synced_gpus else _reply_width(tokens[:, :n], stop)
    return Generated(tokens[:, :width], None if lp is None else lp[:, :width])


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """Whether every row here (and on every rank when `synced`) has stopped: one host read."""
    flag = done.all().to(torch.int32)
    if synced:
        import torch.distributed as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def _reply_width(tokens: torch.Tensor, stop: torch.Tensor) -> int:
    """Columns up to the last one any row decoded before (and including) its stop: what `generate` returns."""
    is_stop = torch.isin(tokens, stop)
    before = is_stop.long().cumsum(-1) - is_stop.long()
    live = (before == 0).long().sum(-1)  # per row: tokens up to and including the first stop
    return max(1, int(live.max())) if tokens.shape[1] else 0
