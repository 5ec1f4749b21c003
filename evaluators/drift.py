"""Attention-drift diagnostic per case (paper Table 2, factor 1) on the DNS and RS prompts.

DNS prompts: "{edit prompt} {target_new}. {neighbourhood prompt}", the subject being the edited subject inside
the distracting prefix. RS prompts: the case's relation prompts that contain the subject (its last occurrence).
"""
from __future__ import annotations

from data_pipeline.schema import Case
from model_layer.attention import drift, last_token_attention


def drift_prompts(case: Case) -> dict[str, tuple[list[str], list[int]]]:
    prefix = case.edit_text + " "
    s_end = case.prompt.find(case.subject) + len(case.subject)
    dns = ([prefix + p.prompt for p in case.neighborhood], [s_end] * len(case.neighborhood))
    rs_texts, rs_ends = [], []
    for p in case.relation:
        i = p.prompt.rfind(case.subject)
        if i >= 0:
            rs_texts.append(p.prompt)
            rs_ends.append(i + len(case.subject))
    return {"neighborhood_distracted": dns, "relation": (rs_texts, rs_ends)}


class DriftProbe:
    """Attention before the edit (``before(case)`` on the unedited model → a state) and after it
    (``after(state)``) → per-key drift lists. A stream takes every ``before`` ahead of its first edit, so drift is
    always measured against the unedited model."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    def before(self, case: Case) -> tuple[dict, dict]:
        prompts = drift_prompts(case)
        return prompts, {k: last_token_attention(self.model, self.tok, t, e) for k, (t, e) in prompts.items() if t}

    def after(self, state: tuple[dict, dict]) -> dict[str, list[float]]:
        prompts, pre = state
        out = {}
        for k, att in pre.items():
            t, e = prompts[k]
            out[k] = [round(x, 6) for x in drift(att, last_token_attention(self.model, self.tok, t, e))]
        return out
