"""Rollouts: sample replies from a policy and turn them into a `Rollout` record with documented shapes.

Layout of every batch (PPO-for-LM conventions, docs/trainer.md):

    sequences = [ pad pad p p p p | r r r EOS pad pad ]      (B, P + R) int64
                  <- prompt P: left-padded -> <- response R: right-padded ->

- Prompts are left-padded so every reply starts at column P; replies are right-padded after their first
  stop token, which is a real token of the reply (the policy must learn to emit it).
- pad != EOS (`models.load_tokenizer` guarantees it), so masks never confuse padding with the end.
- Positions follow the attention mask (cumsum - 1), as `generate` numbers them: every later forward pass
  (old policy, policy, reference, reward model, critic) sees the exact positions sampling saw.
- Sampling is pure softmax(z / T): top_k=0, top_p=1, no repetition penalty, whatever the model's
  generation config says; log-probs are taken at the same T.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import UserError
from .family import StopForward, replay_bottom, sliding_window, states_hook


@dataclass
class Rollout:
    """One batch of sampled replies. B rows, prompt width P, response width R."""

    prompt_ids: torch.Tensor
    """(B, P) int64: prompt tokens, left-padded with the pad id."""
    prompt_mask: torch.Tensor
    """(B, P) int64: 1 at real prompt tokens."""
    response_ids: torch.Tensor
    """(B, R) int64: sampled tokens, the pad id after the first stop token."""
    response_mask: torch.Tensor
    """(B, R) int64: 1 at real reply tokens, the stop token included."""
    has_eos: torch.Tensor
    """(B,) bool: the reply ended with a stop token within R tokens."""
    prompt_index: torch.Tensor
    """(B,) int64: which prompt (position in the list given to `sample`) each row answers."""

    @property
    def sequences(self) -> torch.Tensor:
        """(B, P + R) int64: prompt then reply."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + R) int64."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """(B, P + R) int64: positions counted over real tokens only (left padding does not shift them)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) int64: real reply tokens per row, the stop token included."""
        return self.response_mask.sum(-1)

    def with_eos(self, eos_id: int, pad_id: int) -> Rollout:
        """The same replies, each ending in EOS, as a reward model is trained on them (train-rm appends EOS to
        every response): a reply without one (cut off at the token limit) gets `eos_id` right after its last
        token, in one more column; the other rows get `pad_id` there. Self when every reply ended.
        -> Rollout with R + 1 columns (has_eos all True), or self."""
        if bool(self.has_eos.all()):
            return self
        B = self.response_ids.shape[0]
        ids = torch.cat([self.response_ids, self.response_ids.new_full((B, 1), pad_id)], 1)  # (B, R + 1)
        mask = torch.cat([self.response_mask, self.response_mask.new_zeros(B, 1)], 1)
        rows = (~self.has_eos).nonzero().squeeze(-1)
        ends = self.response_mask.sum(-1)[rows]  # the column after each cut reply's last token
        ids[rows, ends], mask[rows, ends] = eos_id, 1
        return Rollout(self.prompt_ids, self.prompt_mask, ids, mask, torch.ones_like(self.has_eos), self.prompt_index)

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})

    def select(self, rows: torch.Tensor) -> Rollout:
        """Rows `rows` ((b,) int64 indices) as a new Rollout (a minibatch)."""
        return Rollout(**{k: getattr(self, k)[rows] for k in self.__dataclass_fields__})

    def texts(self, tokenizer) -> list[str]:
        """Decoded replies without the stop token, stripped."""
        out = []
        for ids, n, eos in zip(self.response_ids.tolist(), self.response_lengths.tolist(), self.has_eos.tolist()):
            out.append(tokenizer.decode(ids[: n - int(eos)], skip_special_tokens=True).strip())
        return out


def stop_token_ids(model) -> list[int]:
    """Token ids that end a reply: the model's generation-config EOS id(s)."""
    eos = model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise UserError("the model's generation config has no eos_token_id: replies could never stop")
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, P) int64 left-padded with pad_id, mask (B, P) int64)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def mask_after_stop(
    tokens: torch.Tensor, stop_ids: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled tokens (B, R) -> (tokens with pad after the first stop token, mask (B, R) int64 with the stop
    token included, has_eos (B,) bool)."""
    is_stop = torch.isin(tokens, torch.tensor(list(stop_ids), device=tokens.device))
    before = is_stop.long().cumsum(-1) - is_stop.long()  # stop tokens strictly before each position
    mask = (before == 0).long()
    return tokens.masked_fill(mask == 0, pad_id), mask, is_stop.any(-1)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    samples_per_prompt: int = 1,
    device: torch.device | str = "cpu",
    synced_gpus: bool = False,
) -> Rollout:
    """Sample `samples_per_prompt` replies to each tokenized prompt (list of B0 token-id lists; rows of one
    prompt are adjacent) with the global torch RNG -> Rollout of B = B0 * samples_per_prompt rows.
    `synced_gpus`: every process keeps stepping until all are done (FSDP2: each token step gathers the
    parameters on every rank, so no rank may stop early)."""
    if temperature <= 0:
        raise UserError(f"temperature must be > 0 (PPO samples the full distribution), got {temperature}")
    stop_ids = stop_token_ids(model)
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        typical_p=1.0,
        min_p=None,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=samples_per_prompt,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        synced_gpus=synced_gpus,
    )  # (B, P + R') int64, R' <= max_new_tokens
    model.train(was_training)
    response, response_mask, has_eos = mask_after_stop(out[:, prompt_ids.shape[1] :], stop_ids, tokenizer.pad_token_id)
    k = samples_per_prompt
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(k, 0),
        prompt_mask=prompt_mask.repeat_interleave(k, 0),
        response_ids=response,
        response_mask=response_mask,
        has_eos=has_eos,
        prompt_index=torch.arange(len(prompts), device=out.device).repeat_interleave(k),
    )


def attention_mask_4d(model, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 padding mask -> the (B, 1, T, T) causal mask the model's attention takes as is, in which
    every query row sees at least itself: bool (True = attend) for SDPA, additive fp32 for eager attention.
    The 2D mask comes back unchanged for any other implementation (flash-attention unpads the batch itself)
    and for a model with sliding-window layers shorter than T (a 4D mask would replace their window).

    Why: a left-padding row would otherwise attend to nothing, a known NaN trigger in attention backwards
    (0 x NaN then spreads into the weights' gradients). The pipeline's PPO got a NaN policy gradient at step
    2 on an H200 (torch 2.11, bf16 autocast) without this mask and none in 2 x 20 steps with it, though
    benchmarks/tools/sdpa_masked_rows.py did not reproduce a NaN in isolation. A pad row's output is never read
    and no real row attends to a pad key, so the real rows' hidden states are the same as with the 2D mask
    (tests/test_rollout.py); only a batch-dependent layer sees a difference (LLM.int8's outlier columns
    are chosen over all rows, pad rows included)."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    T = attention_mask.shape[-1]
    window = sliding_window(model.config)
    if impl not in ("sdpa", "eager") or (window is not None and window < T):
        return attention_mask
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = (causal & keys) | torch.eye(T, dtype=torch.bool, device=attention_mask.device)  # (B, 1, T, T)
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def forward_reply(
    model,
    head: torch.nn.Module,
    rollout: Rollout,
    *,
    prefix: torch.Tensor | None = None,
    n_frozen: int = 0,
    capture: int = 0,
    head_output: bool = True,
):
    """One call of `model` itself on prompt + reply, so that whatever wraps it (FSDP2 gathers its
    parameters in the call, DDP hooks it) sees the pass.

    `head` is the module on top of the trunk: the LM head of a causal LM, or the scalar `score` of a
    critic. For a causal LM the logits are the model's own returned logits for the R reply-predicting
    positions (`logits_to_keep`: (B, R, V), contiguous), after whatever its forward applies to the head's
    output (Gemma's soft-cap, Granite's scaling); a hook reads the head's input. For a critic a hook reads
    the head's output at every position (the pooled reward the model returns is not used). `prefix`
    (B, P + R, H) replaces the bottom `n_frozen` layers (`family.replay_bottom`). `capture` > 0 also returns
    the states entering layer `capture` (the frozen prefix, from the same pass). `head_output=False` stops
    the pass at the head's input (no logits: the fused-linear kernels take the hidden states and the weight).

    -> hidden (B, R, H): the head's input at the positions that predict each reply token; out (B, R, V)
    or (B, R, 1): the logits or values there, or None; states (B, P + R, H) or None."""
    P, R = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    lm = head is model.get_output_embeddings()
    reply = slice(None) if lm else slice(P - 1, P + R - 1)  # the critic's head sees all P + R positions
    seen = {}

    def take_input(module, args):
        seen["hidden"] = args[0][:, reply]
        if not head_output:
            raise StopForward

    def take_output(module, args, out):
        seen["out"] = out[:, reply]

    hooks = [head.register_forward_pre_hook(take_input)]
    if not lm:
        hooks.append(head.register_forward_hook(take_output))
    if capture:
        hooks.append(states_hook(model, capture, seen))
    kwargs = {
        "attention_mask": attention_mask_4d(model, rollout.attention_mask),
        "position_ids": rollout.position_ids,
        "use_cache": False,
    }
    if lm:  # positions P - 1 .. P + R - 2 predict reply tokens 0 .. R - 1
        kwargs["logits_to_keep"] = torch.arange(P - 1, P + R - 1, device=rollout.response_ids.device)
    if prefix is None:
        kwargs["input_ids"] = rollout.sequences
    else:  # the trunk's own embedding of these is discarded at layer n_frozen
        kwargs["inputs_embeds"] = prefix
    try:
        with replay_bottom(model, n_frozen, prefix) if prefix is not None else contextlib.nullcontext():
            out = model(**kwargs)
        if lm:
            seen["out"] = out.logits
    except StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    return seen["hidden"], seen.get("out"), seen.get("states")


def trunk_hidden(model, rollout: Rollout, *, prefix: torch.Tensor | None = None, n_frozen: int = 0) -> torch.Tensor:
    """Last hidden states of prompt + reply: (B, P + R, H) in the model dtype, positions from the mask.
    `prefix` ((B, P + R, H), the states entering layer `n_frozen`) replaces the frozen bottom layers."""
    trunk = model.base_model
    kwargs = {"attention_mask": attention_mask_4d(model, rollout.attention_mask), "position_ids": rollout.position_ids}
    if prefix is None:
        return trunk(input_ids=rollout.sequences, **kwargs).last_hidden_state
    with replay_bottom(model, n_frozen, prefix):
        return trunk(inputs_embeds=prefix, **kwargs).last_hidden_state


def response_hidden(model, rollout: Rollout, *, prefix: torch.Tensor | None = None, n_frozen: int = 0) -> torch.Tensor:
    """Last hidden states at the positions that PREDICT each reply token: (B, R, H) in the model dtype.

    Row b, column t is the state after reading prompt + reply[:t], the input of the LM head for reply
    token t (and of a value head for the value of that state). `prefix`, `n_frozen`: as `trunk_hidden`."""
    hidden = trunk_hidden(model, rollout, prefix=prefix, n_frozen=n_frozen)
    P, R = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    return hidden[:, P - 1 : P + R - 1]
