"""The rollout forward: the attention mask (no query row attends to nothing, real rows unchanged) and
forward_reply (one call of the model gives what the trunk and the head called apart give)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastrlhf.trainer.models import tiny_model_path
from fastrlhf.trainer.rollout import attention_mask_4d


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    return tiny_model_path(tmp_path_factory.mktemp("rollout-model"))


def _left_padded(gen, vocab: int):
    """(3, 7) ids and mask: rows with 0, 2 and 5 pad columns on the left."""
    ids = torch.randint(3, vocab, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :5] = 0
    return ids, mask


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_mask_4d_every_row_attends_and_real_rows_match(policy_path, gen, impl):
    model = AutoModelForCausalLM.from_pretrained(policy_path, attn_implementation=impl).eval()
    ids, mask = _left_padded(gen, model.config.vocab_size)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    m4 = attention_mask_4d(model, mask)
    assert m4.shape == (3, 1, 7, 7)
    allowed = m4 if m4.dtype == torch.bool else m4 == 0
    assert allowed.any(-1).all(), "a query row attends to nothing"
    # pad keys stay invisible to real queries, future keys to everyone
    real = mask.bool()
    assert not (allowed[:, 0] & ~real[:, None, :] & real[:, :, None]).any()
    assert not (allowed[:, 0] & ~torch.ones(7, 7, dtype=torch.bool).tril()).any()
    with torch.no_grad():
        h2 = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        h4 = model.model(input_ids=ids, attention_mask=m4, position_ids=positions).last_hidden_state
    assert h4.isfinite().all()
    torch.testing.assert_close(h4[real], h2[real], rtol=1e-5, atol=1e-5)


def test_mask_4d_passes_other_implementations_the_2d_mask(policy_path):
    model = AutoModelForCausalLM.from_pretrained(policy_path)
    model.config._attn_implementation = "flash_attention_2"  # not loaded: only the dispatch is checked
    mask = torch.ones(2, 4, dtype=torch.long)
    assert attention_mask_4d(model, mask) is mask


def _rollout(gen, vocab: int):
    """3 rows: prompts left-padded to P = 5, replies right-padded to R = 4."""
    from fastrlhf.trainer.rollout import Rollout

    prompt_ids = torch.randint(3, vocab, (3, 5), generator=gen)
    prompt_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    response_ids = torch.randint(3, vocab, (3, 4), generator=gen)
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        has_eos=torch.tensor([False, True, True]),
        prompt_index=torch.arange(3),
    )


def test_forward_reply_is_trunk_then_head(policy_path, gen):
    """One call of the model (what FSDP2 needs) gives what the trunk and the head called apart give: the
    reply-predicting hidden states and logits, the frozen prefix's states, and the top layers run from them;
    for a critic, the scalar head at every reply-predicting position; with head_output=False, no logits."""
    from fastrlhf.trainer.models import load_reward_model, load_tokenizer, reward_head
    from fastrlhf.trainer.prefix_cache import prefix_states
    from fastrlhf.trainer.rollout import forward_reply, response_hidden

    model = AutoModelForCausalLM.from_pretrained(policy_path).eval()
    ro = _rollout(gen, model.config.vocab_size)
    head = model.get_output_embeddings()
    with torch.no_grad():
        hidden, logits, states = forward_reply(model, head, ro, capture=1)
        want_h = response_hidden(model, ro)
        want_s = prefix_states(
            model.model, 1, ro.sequences, attention_mask_4d(model, ro.attention_mask), ro.position_ids
        )
        top_h, top_logits, none = forward_reply(model, head, ro, prefix=states, n_frozen=1)
        only_h, no_logits, _ = forward_reply(model, head, ro, head_output=False)
    assert hidden.shape == (3, 4, 32) and logits.shape == (3, 4, model.config.vocab_size) and logits.is_contiguous()
    torch.testing.assert_close(hidden, want_h, rtol=0, atol=0)
    torch.testing.assert_close(logits, head(want_h), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(states, want_s, rtol=0, atol=0)
    torch.testing.assert_close(top_h, want_h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(top_logits, logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(only_h, want_h, rtol=0, atol=0)
    assert none is None and no_logits is None

    critic = load_reward_model(policy_path, device="cpu", tokenizer=load_tokenizer(policy_path)).eval()
    with torch.no_grad():
        _, values, _ = forward_reply(critic, reward_head(critic), ro)
        want_v = response_hidden(critic, ro) @ reward_head(critic).weight.t()
    assert values.shape == (3, 4, 1)
    torch.testing.assert_close(values, want_v, rtol=1e-6, atol=1e-6)


def test_with_eos_appends_eos_after_cut_off_replies_only():
    """The form train-rm trains the reward model on: every reply ends in EOS. A cut-off reply gets it right
    after its last token (one more column); a reply that ended keeps its own and gets padding there."""
    from fastrlhf.trainer.rollout import Rollout

    pad, eos = 0, 9
    ro = Rollout(
        prompt_ids=torch.tensor([[5, 6], [0, 7]]),
        prompt_mask=torch.tensor([[1, 1], [0, 1]]),
        response_ids=torch.tensor([[1, 2, 3], [4, eos, pad]]),
        response_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        has_eos=torch.tensor([False, True]),
        prompt_index=torch.tensor([0, 1]),
    )
    scored = ro.with_eos(eos, pad)
    assert scored.response_ids.tolist() == [[1, 2, 3, eos], [4, eos, pad, pad]]
    assert scored.response_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert scored.has_eos.tolist() == [True, True] and scored.prompt_ids is ro.prompt_ids
    short = ro.select(torch.tensor([0]))
    short.response_mask[0, 1:], short.response_ids[0, 1:] = 0, pad  # a cut reply shorter than R (hand-made)
    assert short.with_eos(eos, pad).response_ids.tolist() == [[1, eos, pad, pad]]
    done = ro.select(torch.tensor([1]))
    assert done.with_eos(eos, pad) is done
