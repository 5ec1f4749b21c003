"""Second-moment statistics of the rewrite module's input: C = E[k kᵀ] (uncentred, fp32) — reference-spec §4.5.

Keys k are the inputs of the MLP down-projection (`mlp_out`) at every non-padding token of a text corpus.
The file name is derived from everything that determines C (model fingerprint, layer, module, corpus sha256,
token budget, max length, how texts become model inputs), so a changed input can never be served a stale file,
and an unchanged one is computed once and reused (a DVC output).

Embedded profile: WikiText-2 raw test (`../shared/data/wikitext-2-raw/wiki.test.raw`, 62 articles, ≈ 290k
SmolLM2 tokens), split into articles at top-level ` = Title = ` headings; each article is tokenised whole and cut
into consecutive windows of ``max_len`` tokens (``split="windows"``), so the 100k-token budget is met from the
first ≈ 20 articles. Paper profile: Wikipedia 20220301.en / WikiText-103 from the `datasets` hub (`hub_corpus`),
100,000 samples each truncated to ``max_len`` (``split="truncate"``), as the reference does.

Every file records what it holds (``count``, the budget asked for, whether the corpus ran out first) and how well
conditioned C is (eigenvalue range, the count of eigenvalues below 1e-6 of the largest); `check_stats` refuses a C
with fewer keys than its dimension (certainly singular) or fewer than asked for while the corpus had more.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model_layer.batching import right_pad
from model_layer.hooks import StopForward, run_until
from basis.io import atomic_write_bytes, dumps_line, sha256_file, sha256_text

SPLITS = ("windows", "truncate")
# A top-level heading line in WikiText raw: "\n = Title = \n" (sub-headings are " = = Sub = = ").
_ARTICLE_START = re.compile(r"\n(?= = [^=].* = \n)")


class StatsError(ValueError):
    """Statistics that do not hold what was asked for."""


@dataclass(frozen=True)
class StatsKey:
    model_id: str  # fingerprint of the weights (e.g. the prepared model's provenance hash or hub id@revision)
    module: str  # e.g. model.layers.4.mlp.down_proj
    corpus_sha256: str
    max_tokens: int  # total token budget
    max_len: int  # tokens per model input
    split: str = "windows"  # how a text becomes inputs: "windows" (consecutive max_len pieces) | "truncate"

    def filename(self) -> str:
        h = sha256_text(dumps_line(self.__dict__))[:16]
        return f"{self.module}.mom2.{h}.npz"


def wikitext_articles(path: str | Path) -> list[str]:
    """Split WikiText raw text into articles at top-level ' = Title = ' lines (sub-headings stay inside)."""
    text = Path(path).read_text(encoding="utf-8")
    parts = _ARTICLE_START.split("\n" + text)
    arts = [p.strip() for p in parts if len(p.strip()) > 200]
    if not arts:
        raise StatsError(f"{path}: no articles found (expected WikiText ' = Title = ' headings)")
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


def token_inputs(tok, texts, max_len: int, split: str):
    """Model inputs (token id lists of length 2..max_len) from ``texts``: each text cut into consecutive
    ``max_len`` windows (``windows``), or only its first ``max_len`` tokens (``truncate``, the reference)."""
    if split not in SPLITS:
        raise StatsError(f"stats split {split!r}: expected one of {', '.join(SPLITS)}")
    for text in texts:
        if split == "truncate":
            pieces = [tok(text, truncation=True, max_length=max_len)["input_ids"]]
        else:
            ids = tok(text)["input_ids"]
            pieces = [ids[i:i + max_len] for i in range(0, len(ids), max_len)]
        yield from (p for p in pieces if len(p) >= 2)


@dataclass(frozen=True)
class Moments:
    """C = E[k kᵀ] and what it was computed from."""
    mom2: torch.Tensor
    count: int  # keys (non-padding tokens) accumulated
    requested: int  # the token budget asked for
    exhausted: bool  # the corpus ran out before the budget

    def report(self) -> dict:
        """Conditioning of C: eigenvalue range and how many eigenvalues fall below 1e-6 of the largest."""
        ev = np.linalg.eigvalsh(self.mom2.double().numpy())
        top = float(ev[-1])
        return {"count": self.count, "requested": self.requested, "exhausted": self.exhausted,
                "dim": int(self.mom2.shape[0]), "eig_max": top, "eig_min": float(ev[0]),
                "n_eig_below_1e-6": int((ev < 1e-6 * top).sum()),
                "cond": float(top / ev[0]) if ev[0] > 0 else float("inf")}


def check_stats(m: Moments, where: str) -> None:
    """Fail loudly unless C holds the tokens asked for (or the whole corpus) and has at least dim keys."""
    if m.count != m.requested and not m.exhausted:
        raise StatsError(f"{where}: {m.count:,} tokens accumulated, {m.requested:,} asked for "
                         "(the corpus was not exhausted): the statistics are incomplete")
    dim = int(m.mom2.shape[0])
    if m.count < dim:
        raise StatsError(f"{where}: C = E[kkᵀ] from {m.count:,} keys of dimension {dim} is singular: "
                         "raise stats_tokens or use a larger stats_corpus")


@torch.no_grad()
def second_moment(model, tok, module_name: str, texts, max_tokens: int, max_len: int, split: str = "windows",
                  batch_tokens: int = 4096, progress: bool = True) -> Moments:
    """Accumulate Σ k kᵀ (fp32, on the model's device) over the inputs of ``module_name`` until ``max_tokens``
    tokens are seen; C = Σ/count is returned on the host."""
    from tqdm.auto import tqdm

    module = model.get_submodule(module_name)
    d = module.in_features if hasattr(module, "in_features") else module.weight.shape[1]
    acc = torch.zeros(d, d, dtype=torch.float32, device=next(model.parameters()).device)  # summed where k lives
    count = 0
    captured: list[torch.Tensor] = []

    bar = tqdm(total=max_tokens, desc=f"stats {module_name}", unit="tok", disable=not progress)
    with run_until(module, captured):  # the layers above the edited one are not needed: skip them
        try:
            batch: list[list[int]] = []
            for ids in token_inputs(tok, texts, max_len, split):
                batch.append(ids)
                if sum(map(len, batch)) >= batch_tokens or count + sum(map(len, batch)) >= max_tokens:
                    count = _accumulate(model, batch, acc, captured, count, max_tokens, tok.pad_token_id, bar)
                    batch = []
                if count >= max_tokens:
                    break
            if batch and count < max_tokens:
                count = _accumulate(model, batch, acc, captured, count, max_tokens, tok.pad_token_id, bar)
        finally:
            bar.close()
    if count == 0:
        raise StatsError(f"no tokens collected for second-moment statistics of {module_name}")
    return Moments((acc / count).cpu(), count, max_tokens, exhausted=count < max_tokens)


def _accumulate(model, batch, acc, captured, count, max_tokens, pad_id, bar) -> int:
    ids, mask = right_pad(batch, pad_id)
    captured.clear()
    dev = next(model.parameters()).device
    try:
        model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
    except StopForward:
        pass
    k = captured[0].float()[mask.to(dev).bool()]  # [n_real_tokens, d], on the model's device
    k = k[: max_tokens - count]
    acc.addmm_(k.T, k)
    bar.update(len(k))
    return count + len(k)


def read_stats(path: str | Path) -> Moments:
    """A saved C with its counts, checked (`check_stats`)."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z else {}
        m = Moments(torch.from_numpy(z["mom2"]).float(), int(z["count"]), int(meta.get("requested", -1)),
                    bool(meta.get("exhausted", False)))
    check_stats(m, str(path))
    return m


def load_or_compute(stats_dir: str | Path, key: StatsKey, model, tok, texts_fn, progress: bool = True) -> torch.Tensor:
    """Return C for ``key`` from ``stats_dir`` or compute it (``texts_fn()`` gives the corpus), check it, and save it
    atomically with its counts and conditioning (``meta``)."""
    path = Path(stats_dir) / key.filename()
    if path.is_file():
        return read_stats(path).mom2
    m = second_moment(model, tok, key.module, texts_fn(), key.max_tokens, key.max_len, split=key.split,
                      progress=progress)
    check_stats(m, f"{path} ({key.module})")
    buf = io.BytesIO()
    np.savez(buf, mom2=m.mom2.numpy(), count=np.array(m.count), key=np.array(dumps_line(key.__dict__)),
             meta=np.array(json.dumps(m.report(), sort_keys=True)))
    atomic_write_bytes(path, buf.getvalue())
    return m.mom2


def stats_report(path: str | Path) -> dict:
    """The recorded counts and conditioning of a saved C (what `driftbench stats` prints)."""
    with np.load(path) as z:
        return json.loads(str(z["meta"]))


def corpus_sha256(path: str | Path) -> str:
    return sha256_file(path)


# --------------------------------------------------------------------------------------------- null space
def nullspace_basis(c: torch.Tensor, threshold: float) -> torch.Tensor:
    """Û [d, r]: the eigenvectors of the symmetric C whose eigenvalue is below ``threshold`` (AlphaEdit's
    `get_project` keeps the singular vectors of C with singular value < threshold; for a symmetric positive
    semi-definite C those are the same vectors). Solved in float64 (the original: fp32 SVD); P = Û Ûᵀ."""
    evals, evecs = torch.linalg.eigh(c.double())
    return evecs[:, evals < threshold].float().contiguous()


def projection_filename(key: StatsKey, threshold: float) -> str:
    h = sha256_text(dumps_line({"mom2": key.__dict__, "nullspace_threshold": threshold}))[:16]
    return f"{key.module}.nullspace.{h}.npz"


def load_or_compute_nullspace(stats_dir: str | Path, key: StatsKey, threshold: float, c_fn) -> torch.Tensor:
    """Û for C of ``key`` (``c_fn()`` gives C) and ``threshold``, from ``stats_dir`` or computed and saved there
    atomically (content-named by the statistics' key and the threshold; a DVC output beside C)."""
    path = Path(stats_dir) / projection_filename(key, threshold)
    if path.is_file():
        with np.load(path) as z:
            return torch.from_numpy(z["basis"]).float()
    c = c_fn()
    basis = nullspace_basis(c, threshold)
    evals = torch.linalg.eigvalsh(c.double())
    meta = {"dim": int(c.shape[0]), "rank_kept": int(basis.shape[1]), "threshold": threshold,
            "eig_min": float(evals[0]), "eig_max": float(evals[-1])}
    buf = io.BytesIO()
    np.savez(buf, basis=basis.numpy(), key=np.array(dumps_line(key.__dict__)), meta=np.array(json.dumps(meta)))
    atomic_write_bytes(path, buf.getvalue())
    return basis
