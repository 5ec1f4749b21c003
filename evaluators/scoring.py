"""Score probes through lm-evaluation-harness: one `HFLM` per process around the in-memory model.

All probes of a case (every key, right and wrong, plain and distracted) go to lm-eval in **one** batched
loglikelihood call. For each (context, continuation) we keep the summed log-prob and the number of continuation
tokens, so both metric protocols (per-token mean NLL for `paper`, summed log-prob for `lm-eval`) can be
recomputed from the result files without a model (design.md §3).

Tokenisation differs from the reference implementation on purpose: the reference tokenises targets separately
(``" " + target`` for GPT-J/Llama-3, ``target`` for "llama2-like" models picked by layer count; spec §2.2).
Here the context is ``prompt + " "`` and lm-eval's context/continuation split moves the space into the
continuation, tokenises the joint string and takes the continuation's tokens as the suffix after the
context's tokens — the word boundary is placed by each tokenizer itself, with no per-model special case. BOS is
prepended exactly when the tokenizer adds it by default (as the reference's prefix lengths do).

lm-eval's request cache is never used: its key ignores weights, so it would return pre-edit scores post-edit.
In-place weight edits are seen by the wrapper without re-wrapping (it holds the same module).
"""
from __future__ import annotations

from typing import Sequence

from data_pipeline.schema import Case
from evaluators.probes import build_probes


def tokenizer_adds_bos(tok) -> bool:
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return False
    ids = tok("x")["input_ids"]
    return bool(ids) and ids[0] == bos


class ProbeScorer:
    """Wraps a model once; ``score_pairs`` and ``score_case`` reuse the same HFLM for every edit."""

    def __init__(self, model, tok, batch_size: int = 32, ppl_texts: Sequence[str] | None = None):
        import lm_eval.models.huggingface  # noqa: F401  (explicit import; design.md §5)
        from lm_eval.models.huggingface import HFLM

        self.model, self.tok = model, tok
        self.ppl_texts = list(ppl_texts) if ppl_texts else None
        self.lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size,
                       add_bos_token=tokenizer_adds_bos(tok))
        self._me_ppl: dict[str, dict] = {}  # weights key -> ME-PPL (it depends on the weights only)

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """``[(context, continuation)] -> [(summed log-prob, continuation token count)]`` in one batched call."""
        reqs = []
        for ctx, cont in pairs:
            ctx_enc, cont_enc = self.lm._encode_pair(ctx, cont)
            if not cont_enc:
                raise ValueError(f"continuation {cont!r} after {ctx!r} tokenises to nothing")
            reqs.append(((ctx, cont), ctx_enc, cont_enc))
        out = self.lm._loglikelihood_tokens(reqs, disable_tqdm=True)
        return [(float(lp), len(r[2])) for (lp, _greedy), r in zip(out, reqs)]

    def me_ppl(self, weights_key: str | None = None) -> dict:
        """ME-PPL of the current weights. ``weights_key`` names them: calls with the same key reuse one value (every
        pre-edit case shares the unedited weights; every case evaluated after a stream shares its final weights).
        The caller guarantees the weights are the same for equal keys; None always recomputes."""
        from evaluators.generation import me_ppl

        if weights_key is None or weights_key not in self._me_ppl:
            value = me_ppl(self.model, self.tok, self.lm, self.ppl_texts)
            self._me_ppl = {} if weights_key is None else {weights_key: value}  # keep only the latest
            return dict(value)
        return dict(self._me_ppl[weights_key])

    def score_case(self, case: Case, weights_key: str | None = None) -> dict[str, dict]:
        """Every probe of ``case`` → ``{key: {"right": [[lp, n], ...], "wrong": [[lp, n], ...]}}``; with
        ``ppl_texts`` given, CounterFact cases also get ``"fluency"`` and ``"me_ppl"`` (evaluators.generation;
        ``weights_key`` as in `me_ppl`)."""
        probes = build_probes(case)
        pairs, index = [], []
        for key, ps in probes.items():
            for side, targets in (("right", ps.right), ("wrong", ps.wrong)):
                for ctx, tgt in zip(ps.contexts, targets):
                    pairs.append((ctx + " ", tgt))
                    index.append((key, side))
        scores = self.score_pairs(pairs)
        result: dict[str, dict[str, list[list]]] = {k: {"right": [], "wrong": []} for k in probes}
        for (key, side), (lp, n) in zip(index, scores):
            result[key][side].append([lp, n])
        if self.ppl_texts is not None and case.generation:  # CounterFact cases, as the reference (spec §2.4, §2.6)
            from evaluators.generation import case_seed, fluency

            result["fluency"] = fluency(self.model, self.tok, case.generation, case_seed(case.case_id))
            result["me_ppl"] = self.me_ppl(weights_key)
        return result
