"""Attention probabilities of chosen query rows, computed beside a fast (SDPA) forward — for SADR's loss and the
paper's Table-2 "attention drift" diagnostic.

Neither needs whole [B, H, T, T] maps: SADR looks at one query row per rewriting prompt (the prompt's last token)
and drift at one per probe (its last token). `attention_rows` runs the model with SDPA and, in every attention
layer from ``first_layer`` on, recomputes only those rows from the layer's own (post-RoPE) queries and keys:
softmax(q_i · Kᵀ · scaling + mask) in fp32, over the same mask SDPA gets, with gradient when the forward has one.
The forward itself keeps the model's implementation (eager or SDPA; others run SDPA).
The values equal eager attention's rows up to float rounding (tests/test_attention_rows.py bounds the difference
on every supported architecture); eager attention, which materialises every map, was ×1.6 slower per SADR step
on the embedded model (bench/bench_vstep.py).

drift = Σ_layers max_heads ( A_post[l, h, last, s] − A_pre[l, h, last, s] ), with s the subject's last token.

`patched_attention` runs eager attention with the probabilities of chosen layers and batch rows replaced by given
maps (the values stay the model's own): the paper's §3.4 patching, used by `evaluators.diagnosis`.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Sequence

import torch

from model_layer.batching import right_pad

ROWS_IMPL = "driftbench_sdpa_rows"
_ACTIVE: ContextVar["_RowRecorder | None"] = ContextVar("driftbench_attention_rows", default=None)


class _RowRecorder:
    def __init__(self, rows: torch.Tensor, positions: torch.Tensor, first_layer: int):
        self.rows, self.positions, self.first_layer = rows, positions, first_layer
        self.out: dict[int, torch.Tensor] = {}

    def record(self, module, query, key, attention_mask, scaling, softcap=None) -> None:
        """[N, H, T] fp32 probabilities of query (rows[i], positions[i]) over all key positions of rows[i]."""
        r, p = self.rows, self.positions
        q = query[r, :, p].float()  # [N, H, D]
        k = key[r].float()  # [N, H_kv, T, D]
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:  # grouped-query attention: each key head serves n_rep query heads
            k = k.repeat_interleave(n_rep, dim=1)
        scores = torch.einsum("nhd,nhtd->nht", q, k) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        t = k.shape[2]
        if attention_mask is None:  # SDPA's is_causal path: key j is visible from query p iff j <= p
            visible = torch.arange(t, device=q.device)[None, :] <= p[:, None]
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        else:
            m = attention_mask[r, :, p, :t]  # [N, 1 or H, T]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        self.out[module.layer_idx] = torch.softmax(scores, dim=-1)


def _rows_impl(base: str):
    """An attention function: ``base`` attention ("sdpa" or "eager"), recording the active recorder's rows."""
    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rec = _ACTIVE.get()
        if rec is not None and getattr(module, "layer_idx", None) is not None and module.layer_idx >= rec.first_layer:
            rec.record(module, query, key, attention_mask, scaling, kwargs.get("softcap"))
        if base == "eager":  # each modeling file has its own eager function (GPT-J upcasts, Gemma soft-caps, ...)
            fn = sys.modules[type(module).__module__].eager_attention_forward
        else:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward as fn
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return forward


def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"{ROWS_IMPL}_{base}"
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _rows_impl(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[base])
    return name


@contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """``model`` runs ``name`` attention for the duration of the block."""
    prev = getattr(model.config, "_attn_implementation", None)
    if prev != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if prev != name:
            model.set_attn_implementation(prev)


@contextmanager
def attention_rows(model, rows: torch.Tensor, positions: torch.Tensor, first_layer: int = 0
                   ) -> Iterator[dict[int, torch.Tensor]]:
    """Every forward inside the block fills the yielded dict with ``{layer: [N, H, T]}``: the attention
    probabilities of query position ``positions[i]`` of batch row ``rows[i]``, for each attention layer
    ``>= first_layer`` (with gradient when the forward has one; the dict holds the latest forward's rows). The
    forward itself runs the model's own implementation when it is eager or SDPA (so adding a zero-weighted loss on
    the rows changes nothing), else SDPA."""
    impl = getattr(model.config, "_attn_implementation", None)
    name = _register(impl if impl in ("sdpa", "eager") else "sdpa")
    rec = _RowRecorder(rows, positions, first_layer)
    token = _ACTIVE.set(rec)
    try:
        with attention_implementation(model, name):
            yield rec.out
    finally:
        _ACTIVE.reset(token)


@contextmanager
def eager_attention(model):
    """Temporarily switch to eager attention (whole maps; what `attention_rows` is checked against)."""
    with attention_implementation(model, "eager"):
        yield model


def stack_rows(rows: dict[int, torch.Tensor], first_layer: int) -> torch.Tensor:
    """[L', N, H, T]: the recorded rows of the layers ``>= first_layer``, in layer order."""
    layers = sorted(x for x in rows if x >= first_layer)
    if not layers:
        raise RuntimeError("no attention rows were recorded: the model's attention does not go through "
                           "transformers' AttentionInterface")
    return torch.stack([rows[x] for x in layers])


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
    i = torch.arange(len(rows), device=dev)
    last = torch.tensor([len(r) - 1 for r in rows], device=dev)
    with attention_rows(model, i, last) as att:
        model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False, logits_to_keep=1)
    s = torch.tensor(subj, device=dev)
    a = stack_rows(att, 0)  # [L, n, H, T]
    return a[:, i, :, s].float().cpu()  # [n, L, H] (the two index tensors broadcast to the front)


def drift(pre: torch.Tensor, post: torch.Tensor) -> list[float]:
    """Per prompt Σ_l max_h (post − pre) of last-token→subject attention ([n, L, H] inputs)."""
    if pre.numel() == 0:
        return []
    return (post - pre).max(dim=2).values.sum(dim=1).tolist()


# ---- replacing attention probabilities (the paper's §3.4 patching; evaluators.diagnosis) ----
PATCH_IMPL = "driftbench_patch_eager"
_PATCH: ContextVar["dict | None"] = ContextVar("driftbench_attention_patch", default=None)


def _patch_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The modeling file's eager attention; for the batch rows patched at this layer, probabilities replaced."""
    fn = sys.modules[type(module).__module__].eager_attention_forward
    out, w = fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    patch = _PATCH.get()
    layer = getattr(module, "layer_idx", None)
    if patch is None or layer not in patch["rows"]:
        return out, w
    rows, src = patch["rows"][layer], patch["weights"][layer]  # [R], [H, T, T]
    v = _repeat_kv(value[rows], query.shape[1])
    t = v.shape[2]
    patched = torch.matmul(src[None, :, :t, :t].to(v.dtype), v).transpose(1, 2)  # [R, T, H, D]
    out = out.clone()
    out[rows] = patched.reshape(out[rows].shape).to(out.dtype)
    if w is not None:
        w = w.clone()
        w[rows] = src[None, :, :t, :t].to(w.dtype)
    return out, w


def _register_patch() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if PATCH_IMPL not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(PATCH_IMPL, _patch_forward)
        AttentionMaskInterface.register(PATCH_IMPL, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["eager"])
    return PATCH_IMPL


@contextmanager
def patched_attention(model, weights: dict[int, torch.Tensor], rows: dict[int, Sequence[int]]) -> Iterator[None]:
    """Forwards inside the block use ``weights[l]`` ([H, T, T]) as the attention probabilities of layer l for the
    batch rows ``rows[l]``; every other row and layer runs eager attention unchanged."""
    dev = next(model.parameters()).device
    state = {"rows": {l: torch.as_tensor(list(r), dtype=torch.long, device=dev) for l, r in rows.items() if len(r)},
             "weights": {l: w.to(dev) for l, w in weights.items()}}
    token = _PATCH.set(state)
    try:
        with attention_implementation(model, _register_patch()):
            yield
    finally:
        _PATCH.reset(token)


# ---- attention probabilities without gradient (the paper's ROME-AWD ablation; editors.core) ----
DETACH_IMPL = "driftbench_detached_eager"


def _repeat_kv(value: torch.Tensor, n_heads: int) -> torch.Tensor:
    n_rep = n_heads // value.shape[1]
    return value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value  # query head h reads kv head h // n_rep


def _detached_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The modeling file's eager attention, its output recomputed from probabilities that carry no gradient: the
    values (and everything else) still do, so an optimisation can change *what* attention reads but not *where*."""
    fn = sys.modules[type(module).__module__].eager_attention_forward
    out, w = fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    v = _repeat_kv(value, query.shape[1])
    detached = torch.matmul(w.detach().to(v.dtype), v).transpose(1, 2)  # [B, T, H, D]
    return detached.reshape(out.shape).to(out.dtype).contiguous(), w


@contextmanager
def detached_attention(model) -> Iterator[None]:
    """Every forward inside the block runs eager attention whose probabilities are constants for backward."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if DETACH_IMPL not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(DETACH_IMPL, _detached_forward)
        AttentionMaskInterface.register(DETACH_IMPL, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["eager"])
    with attention_implementation(model, DETACH_IMPL):
        yield
