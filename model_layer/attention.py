"""Attention capture: last-token attention to a chosen token, per layer and head (eager attention).

Used for the paper's Table-2 "attention drift" diagnostic: for a prompt whose text contains the edited subject,
drift = Σ_layers max_heads ( A_post[l, h, last, s] − A_pre[l, h, last, s] ), with s the subject's last token.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from model_layer.batching import right_pad


@contextmanager
def eager_attention(model):
    """Temporarily switch to eager attention (SDPA/flash return no attention weights)."""
    prev = getattr(model.config, "_attn_implementation", None)
    if prev != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if prev != "eager":
            model.set_attn_implementation(prev)


def token_index_at_char(tok, text: str, char_pos: int) -> int:
    """Index of the token whose character span contains ``char_pos`` (needs a fast tokenizer's offsets)."""
    enc = tok(text, return_offsets_mapping=True)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if a <= char_pos < b:
            return i
    raise ValueError(f"no token covers character {char_pos} of {text!r}")


@torch.no_grad()
def last_token_attention(model, tok, texts: Sequence[str], subject_char_end: Sequence[int]) -> torch.Tensor:
    """[n, L, H]: attention from each text's last token to the token holding character ``subject_char_end[i]-1``."""
    if not texts:
        return torch.zeros(0)
    rows = [tok(t)["input_ids"] for t in texts]
    subj = [token_index_at_char(tok, t, e - 1) for t, e in zip(texts, subject_char_end)]
    ids, mask = right_pad(rows, tok.pad_token_id)
    dev = next(model.parameters()).device
    with eager_attention(model):
        att = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_attentions=True, use_cache=False).attentions
    i = torch.arange(len(rows))
    last = torch.tensor([len(r) - 1 for r in rows])
    s = torch.tensor(subj)
    return torch.stack([a[i, :, last, s].float().cpu() for a in att], dim=1)  # [n, L, H]


def drift(pre: torch.Tensor, post: torch.Tensor) -> list[float]:
    """Per prompt Σ_l max_h (post − pre) of last-token→subject attention ([n, L, H] inputs)."""
    if pre.numel() == 0:
        return []
    return (post - pre).max(dim=2).values.sum(dim=1).tolist()
