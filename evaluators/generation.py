"""Fluency FL (n-gram entropy of sampled text) and ME-PPL (perplexity on Corpus-50) — reference-spec §2.4, §2.6.

Both are computed per CounterFact case (the reference computes them only there, inside `test_generation`) on
the pre- and the post-edit model, stored in the result rows under the phase's ``fluency`` and ``me_ppl`` keys,
and aggregated by `evaluators.metrics`.

FL, as the reference: the case's 10 generation prompts, top-k sampling with k = 5 (renormalised softmax over the
top 5, no temperature), ``max_out_len = 100`` tokens *including the prompt* per text, decoded without skipping
special tokens, NFKD-normalised, ``"\\n\\n"`` → ``" "``, the literal ``"<|endoftext|>"`` removed, the prompt kept.
Per text: word n-grams for n ∈ {2, 3}, H_n = −Σ f log2 f over that text's n-gram frequencies, score =
mean(2/3·H_2, 4/3·H_3); the case's value is the mean over its texts (FL in tables = mean × 100).
Deviations: sampling is seeded per case (sha256 of the case id; the same stream pre and post, a paired
comparison), so reruns and resumed runs give identical texts (the reference uses the global RNG); generation stops at 100 tokens, never at EOS (as the
reference's `generate_fast`). Words come from NLTK's Treebank word tokenizer after sentence splitting by an
*untrained* Punkt tokenizer: `nltk.word_tokenize` needs the `punkt_tab` model, which is not on PyPI (the
untrained splitter differs from it only on abbreviations).

ME-PPL, two protocols:
- ``paper``: the 50 texts joined with spaces, tokenised with default special tokens, the first 100 tokens;
  PPL = exp(−(1/N) Σ_{t=2..N} log p(x_t | x_<t)) with N = 100 tokens (N in the exponent although the sum has N−1
  terms — kept for parity).
- ``lm-eval``: lm-eval's `loglikelihood_rolling` over each text separately (BOS/EOT-prefixed windows, as the
  harness's perplexity tasks do); we store Σ log-likelihood and the word count, and word perplexity =
  exp(−Σ ll / Σ words) (lm-eval's `word_perplexity`). `evaluators/tasks/me_ppl.yaml` is the same as a task.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Sequence

MAX_OUT_LEN = 100
TOP_K = 5
PPL_TOKENS = 100


# --------------------------------------------------------------------------------------------------- fluency
def words(text: str) -> list[str]:
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    tok = NLTKWordTokenizer()
    return [w for sent in PunktSentenceTokenizer().tokenize(text) for w in tok.tokenize(sent)]


def ngram_entropy(text: str) -> float:
    """mean(2/3·H_2, 4/3·H_3) of one text's word n-gram frequency distributions (spec §2.4); 0 for < 2 words."""
    toks = words(text)
    hs = []
    for n, w in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
        total = sum(grams.values())
        h = -sum((c / total) * math.log2(c / total) for c in grams.values()) if total else 0.0
        hs.append(w * h)
    return sum(hs) / len(hs)


def clean_text(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    return text.replace("\n\n", " ").replace("<|endoftext|>", "")


def case_seed(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"fluency/{case_id}".encode()).digest()[:8], "little") & (2**63 - 1)


def sample_texts(model, tok, prompts: Sequence[str], seed: int, max_out_len: int = MAX_OUT_LEN,
                 top_k: int = TOP_K) -> list[str]:
    """The decoded, cleaned texts of `sample_ids`."""
    ids = sample_ids(model, tok, prompts, seed, max_out_len, top_k)
    return [clean_text(tok.decode(o, skip_special_tokens=False)) for o in ids]


def sample_ids(model, tok, prompts: Sequence[str], seed: int, max_out_len: int = MAX_OUT_LEN,
               top_k: int = TOP_K) -> list[list[int]]:
    """Top-k sampling with a KV cache, one left-padded batch; each row has ``max_out_len`` tokens with its prompt."""
    import torch

    dev = next(model.parameters()).device
    enc = [tok(p)["input_ids"][:max_out_len] for p in prompts]
    lens = [len(e) for e in enc]
    width = max(lens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - n) + e for e, n in zip(enc, lens)], device=dev)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lens], device=dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    steps = max_out_len - min(lens)
    out = [list(e) for e in enc]
    past, cur = None, ids
    with torch.no_grad():
        for _ in range(steps):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -cur.shape[1]:]
            o = model(input_ids=cur, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past = o.past_key_values
            logits = o.logits[:, -1].float()
            top = logits.topk(top_k, dim=-1)
            probs = torch.softmax(top.values, dim=-1).cpu()
            pick = top.indices.cpu().gather(1, torch.multinomial(probs, 1, generator=gen))
            for i, t in enumerate(pick[:, 0].tolist()):
                if len(out[i]) < max_out_len:
                    out[i].append(t)
            cur = pick.to(dev)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


def fluency(model, tok, prompts: Sequence[str], seed: int) -> dict:
    """``{"entropy": mean n-gram entropy, "texts": [...]}`` for one case's generation prompts."""
    texts = sample_texts(model, tok, prompts, seed)
    return {"entropy": sum(ngram_entropy(t) for t in texts) / len(texts), "texts": texts}


# --------------------------------------------------------------------------------------------------- ME-PPL
def load_corpus(path: str | Path) -> list[str]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of {{'Corpus', 'Text'}} objects")
    texts = []
    for i, d in enumerate(data):
        if not isinstance(d, dict) or not isinstance(d.get("Text"), str) or not d["Text"].strip():
            raise ValueError(f"{path}: record {i}: field 'Text' must be a non-empty string")
        texts.append(d["Text"])
    return texts


def n_words(text: str) -> int:
    return len(re.split(r"\s+", text))  # lm-eval's word count for word_perplexity


def paper_ppl(model, tok, texts: Sequence[str], n_tokens: int = PPL_TOKENS) -> float:
    """The reference's ME-PPL: exp(−Σ_{t=2..N} log p(x_t|x_<t) / N) over the first N tokens of the joined texts."""
    import torch

    ids = tok(" ".join(texts))["input_ids"][:n_tokens]
    x = torch.tensor([ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
    ll = logp.gather(1, x[0, 1:, None]).sum().item()
    return math.exp(-ll / len(ids))


def rolling_loglik(lm, texts: Sequence[str]) -> float:
    """Σ over texts of lm-eval's `loglikelihood_rolling` (``lm``: an HFLM around the in-memory model)."""
    from lm_eval.api.instance import Instance

    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    return float(sum(lm.loglikelihood_rolling(reqs, disable_tqdm=True)))


def me_ppl(model, tok, lm, texts: Sequence[str]) -> dict:
    return {"paper": paper_ppl(model, tok, texts), "loglik": rolling_loglik(lm, texts),
            "words": sum(n_words(t) for t in texts)}
