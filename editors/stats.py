"""Second-moment statistics of the rewrite module's input: C = E[k kᵀ] (uncentred, fp32) — reference-spec §4.5.

Keys k are the inputs of the MLP down-projection (`mlp_out`) at every non-padding token of a text corpus.
The file name is derived from everything that determines C (model fingerprint, layer, module, corpus sha256,
token budget, max length), so a changed input can never be served a stale file, and an unchanged one is
computed once and reused (a DVC output).

Embedded profile: WikiText-2 raw test (`../shared/data/wikitext-2-raw/wiki.test.raw`), split into articles at
top-level ` = Title = ` headings. Paper profile: Wikipedia 20220301.en / WikiText-103 from the `datasets` hub
(`hub_corpus`), 100,000 samples, as the reference does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model_layer.batching import right_pad
from driftbench.io import atomic_write_bytes, dumps_line, sha256_file, sha256_text


@dataclass(frozen=True)
class StatsKey:
    model_id: str  # fingerprint of the weights (e.g. the prepared model's provenance hash or hub id@revision)
    module: str  # e.g. model.layers.4.mlp.down_proj
    corpus_sha256: str
    max_tokens: int  # total token budget
    max_len: int  # per-text truncation

    def filename(self) -> str:
        h = sha256_text(dumps_line(self.__dict__))[:16]
        return f"{self.module}.mom2.{h}.npz"


def wikitext_articles(path: str | Path) -> list[str]:
    """Split WikiText raw text into articles at top-level ' = Title = ' lines (sub-headings stay inside)."""
    text = Path(path).read_text(encoding="utf-8")
    parts = re.split(r"\n (?= = [^=].* = \n)", "\n" + text)
    arts = [p.strip() for p in parts if len(p.strip()) > 200]
    if not arts:
        raise ValueError(f"{path}: no articles found (expected WikiText ' = Title = ' headings)")
    return arts


def hub_corpus(name: str = "wikitext-103", n_samples: int = 100_000, seed: int = 1) -> list[str]:  # pragma: no cover - needs network
    """Paper profile corpus from the `datasets` hub (real code; unreachable offline)."""
    from datasets import load_dataset

    if name == "wikipedia":
        ds = load_dataset("wikipedia", "20220301.en", split="train")
    else:
        ds = load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1", split="train")
    idx = np.random.default_rng(seed).permutation(len(ds))[:n_samples]
    return [ds[int(i)]["text"] for i in idx if ds[int(i)]["text"].strip()]


@torch.no_grad()
def second_moment(model, tok, module_name: str, texts: list[str], max_tokens: int, max_len: int,
                  batch_tokens: int = 4096, progress: bool = True) -> tuple[torch.Tensor, int]:
    """Accumulate Σ k kᵀ (fp32) over the inputs of ``module_name`` until ``max_tokens`` tokens are seen."""
    from tqdm.auto import tqdm

    module = model.get_submodule(module_name)
    d = module.in_features if hasattr(module, "in_features") else module.weight.shape[1]
    acc = torch.zeros(d, d, dtype=torch.float32)
    count = 0
    captured: list[torch.Tensor] = []

    def hook(_m, inp):
        captured.append(inp[0].detach())
        raise _StopForward  # the layers above the edited one are not needed: skip them

    handle = module.register_forward_pre_hook(hook)
    bar = tqdm(total=max_tokens, desc=f"stats {module_name}", unit="tok", disable=not progress)
    try:
        batch: list[list[int]] = []
        for text in texts:
            ids = tok(text, truncation=True, max_length=max_len)["input_ids"]
            if len(ids) < 2:
                continue
            batch.append(ids)
            if sum(map(len, batch)) >= batch_tokens or count + sum(map(len, batch)) >= max_tokens:
                count = _accumulate(model, batch, acc, captured, count, max_tokens, tok.pad_token_id, bar)
                batch = []
            if count >= max_tokens:
                break
        if batch and count < max_tokens:
            count = _accumulate(model, batch, acc, captured, count, max_tokens, tok.pad_token_id, bar)
    finally:
        handle.remove()
        bar.close()
    if count == 0:
        raise ValueError("no tokens collected for second-moment statistics")
    return acc / count, count


class _StopForward(Exception):
    pass


def _accumulate(model, batch, acc, captured, count, max_tokens, pad_id, bar) -> int:
    ids, mask = right_pad(batch, pad_id)
    captured.clear()
    dev = next(model.parameters()).device
    try:
        model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
    except _StopForward:
        pass
    k = captured[0].float().cpu()[mask.bool()]  # [n_real_tokens, d]
    k = k[: max_tokens - count]
    acc.addmm_(k.T, k)
    bar.update(len(k))
    return count + len(k)


def load_or_compute(stats_dir: str | Path, key: StatsKey, model, tok, texts_fn, progress: bool = True) -> torch.Tensor:
    """Return C for ``key`` from ``stats_dir`` or compute it (``texts_fn()`` gives the corpus) and save atomically."""
    path = Path(stats_dir) / key.filename()
    if path.is_file():
        with np.load(path) as z:
            return torch.from_numpy(z["mom2"]).float()
    c, count = second_moment(model, tok, key.module, texts_fn(), key.max_tokens, key.max_len, progress=progress)
    import io
    buf = io.BytesIO()
    np.savez(buf, mom2=c.numpy(), count=np.array(count), key=np.array(dumps_line(key.__dict__)))
    atomic_write_bytes(path, buf.getvalue())
    return c


def corpus_sha256(path: str | Path) -> str:
    return sha256_file(path)
