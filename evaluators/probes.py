"""Turn a `Case` into the scored probe pairs (reference-spec §2.3) — pure Python, no torch.

Every probe key yields aligned lists of (context, right_target) and (context, wrong_target). The scorer receives
``context + " "`` and the target; lm-eval's context/continuation split then moves that space into the
continuation, so the word boundary is placed by each tokenizer itself (no per-model special case).

Result-row contract (one JSON line per case, written by the harness)::

    {"cell": str, "case_id": str, "source": "counterfact"|"wikidata",
     "pre":  {probe_key: {"right": [[logprob_sum, n_tokens], ...], "wrong": [[logprob_sum, n_tokens], ...]}},
     "post": {same shape},
     "editor": {"name": str, "sadr": bool, "diagnostics": {...}},
     "env": {...}}

Keys with no prompts are absent (they contribute nothing; gotcha 5). Mean per-token NLL = -logprob_sum/n_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.schema import Case

# probe key -> paper metric name (accuracy); magnitudes add "M" variants in evaluators.metrics
PROBE_KEYS = (
    "rewrite", "paraphrase", "subject_alias", "reasoning",
    "neighborhood", "neighborhood_distracted", "relation", "relation_distracted",
    "piqa", "piqa_distracted",
)
DISTRACTED = {"neighborhood": "neighborhood_distracted", "relation": "relation_distracted", "piqa": "piqa_distracted"}


@dataclass(frozen=True)
class ProbeSet:
    """Aligned lists: ``contexts[i]`` is scored against ``right[i]`` and ``wrong[i]``."""
    contexts: tuple[str, ...]
    right: tuple[str, ...]
    wrong: tuple[str, ...]


def build_probes(case: Case, distract: bool = True) -> dict[str, ProbeSet]:
    """All probe sets of one case, keyed by probe key; empty families are omitted.

    ``rewrite``/paraphrase/alias/reasoning: wrong = target_true. neighborhood/relation: wrong = target_new.
    piqa: right/wrong = gold/distractor solution. Distracted variants (l-*/o-* only) prefix the context with
    ``"{prompt} {target_new}." + " "`` (spec §2.3).
    """
    out: dict[str, ProbeSet] = {"rewrite": ProbeSet((case.prompt,), (case.target_new,), (case.target_true,))}
    for fam in ("paraphrase", "subject_alias", "reasoning"):
        ps = getattr(case, fam)
        if ps:
            out[fam] = ProbeSet(tuple(p.prompt for p in ps), tuple(p.target for p in ps), (case.target_true,) * len(ps))
    for fam in ("neighborhood", "relation"):
        ps = getattr(case, fam)
        if ps:
            out[fam] = ProbeSet(tuple(p.prompt for p in ps), tuple(p.target for p in ps), (case.target_new,) * len(ps))
    if case.piqa is not None:
        out["piqa"] = ProbeSet((case.piqa.goal,), (case.piqa.right,), (case.piqa.wrong,))
    if distract:
        prefix = case.edit_text + " "
        for key, dkey in DISTRACTED.items():
            if key in out:
                p = out[key]
                out[dkey] = ProbeSet(tuple(prefix + c for c in p.contexts), p.right, p.wrong)
    return out
