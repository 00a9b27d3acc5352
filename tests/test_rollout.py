"""The rollout forward's attention mask: no query row attends to nothing, and real rows are unchanged."""

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
