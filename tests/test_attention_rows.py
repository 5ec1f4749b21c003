"""model_layer.attention.attention_rows: query rows of attention beside an SDPA forward equal eager attention's
rows, on every supported architecture, with gradient; the model's attention implementation is restored after."""
from __future__ import annotations

import pytest
import torch

from model_layer.attention import attention_rows, eager_attention, last_token_attention, stack_rows
from model_layer.batching import right_pad
from model_layer.loading import load_model

TEXTS = ["The Eiffel Tower is located in the city of", "Hi", "Danielle Darrieux's mother tongue is French and she"]


@pytest.mark.parametrize("arch", ["gptj", "gpt_neox", "llama", "gemma3"])
def test_rows_equal_eager_rows(tiny_model_dirs, arch):
    model, tok = load_model(str(tiny_model_dirs[arch]))
    impl = model.config._attn_implementation
    ids, mask = right_pad([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id)
    n_rows = torch.tensor([0, 2, 1])  # any rows, any positions inside each row (not only the last token)
    pos = torch.tensor([len(tok(TEXTS[0])["input_ids"]) - 1, 3, len(tok(TEXTS[1])["input_ids"]) - 1])
    with torch.no_grad(), eager_attention(model):
        maps = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False).attentions
    want = torch.stack([a[n_rows, :, pos].float() for a in maps[1:]])
    with torch.no_grad(), attention_rows(model, n_rows, pos, first_layer=1) as got:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert sorted(got) == list(range(1, len(maps)))  # every layer from first_layer, none below
    rows = stack_rows(got, 1)
    assert rows.shape == want.shape
    assert torch.allclose(rows.sum(-1), torch.ones(()), atol=1e-5)
    assert (rows - want).abs().max().item() < 1e-5
    assert model.config._attn_implementation == impl  # put back


def test_rows_carry_gradient(tiny_model_dirs):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with attention_rows(model, torch.tensor([0]), torch.tensor([ids.shape[1] - 1]), first_layer=1) as got:
        model(inputs_embeds=emb, use_cache=False)
    stack_rows(got, 1)[..., 0].sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_last_token_attention_matches_eager(tiny_model_dirs):
    model, tok = load_model(str(tiny_model_dirs["gpt_neox"]))
    ends = [len("The Eiffel Tower"), 1, len("Danielle Darrieux")]
    got = last_token_attention(model, tok, TEXTS, ends)
    rows = [tok(t)["input_ids"] for t in TEXTS]
    ids, mask = right_pad(rows, tok.pad_token_id)
    with torch.no_grad(), eager_attention(model):
        maps = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False).attentions
    assert got.shape == (3, len(maps), maps[0].shape[1])
    for i, (t, e) in enumerate(zip(TEXTS, ends)):
        s = [j for j, (a, b) in enumerate(tok(t, return_offsets_mapping=True)["offset_mapping"]) if a <= e - 1 < b][0]
        want = torch.stack([a[i, :, len(rows[i]) - 1, s] for a in maps])
        assert (got[i] - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ["gptj", "llama"])
def test_detached_attention_same_output_no_gradient_through_the_probabilities(tiny_model_dirs, arch):
    """ROME-AWD's attention: the forward equals eager attention's; backward reaches the value projection but not
    the query/key projections (they shape only the probabilities)."""
    from model_layer.arch import arch_for, get_module
    from model_layer.attention import detached_attention

    model, tok = load_model(str(tiny_model_dirs[arch]))
    model.requires_grad_(True)  # loaded frozen
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad(), eager_attention(model):
        want = model(input_ids=ids, use_cache=False).logits
    with detached_attention(model):
        got = model(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max().item() < 1e-5
    attn = get_module(model, arch_for(model).layer("attn", 1))
    q = next(m for n, m in attn.named_modules() if n in ("q_proj", "q_proj.linear"))
    v = next(m for n, m in attn.named_modules() if n in ("v_proj", "v_proj.linear"))
    got[0, -1].logsumexp(-1).backward()
    assert v.weight.grad is not None and v.weight.grad.abs().sum() > 0
    assert q.weight.grad is None or q.weight.grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)
    with eager_attention(model):  # without it, the query projection does get a gradient
        model(input_ids=ids, use_cache=False).logits[0, -1].logsumexp(-1).backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
