"""Scores for the leaderboard, always recomputed from per-case rows through ``evaluators.metrics`` (no metric
math lives here): :func:`summarize` calls :func:`~evaluators.metrics.score_cell` and
:func:`~evaluators.metrics.drift_summary`; :func:`per_case` applies each protocol's own ``success`` rule
(``evaluators.metrics.PROTOCOLS[id].success``) to every prompt and counts successes per case for the drill-down.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from evaluators.aggregate import TABLE_METRICS, load_cell
from evaluators.metrics import DRIFT_KEYS, METRICS, drift_summary, get_protocol, score_cell_protocols

PHASES = ("post", "pre")
# probe key -> table metric (ES, PS, NS, RS, DNS, RES, OS, DOS)
KEY_TO_METRIC = {METRICS[m]: m for m in TABLE_METRICS}


def load_result_file(path: str | Path) -> tuple[str, list[dict]]:
    """Rows of one result file, checked like ``evaluators.aggregate``: one cell id, every case once."""
    return load_cell(path)


def summarize(rows: Sequence[Mapping], protocols: Iterable[str], phases: Iterable[str] = PHASES) -> dict:
    """``{"post": {protocol: score_cell(...)}, "pre": {...}, "drift": drift_summary(rows)}`` (the summary.json of
    a submission bundle, minus its header)."""
    protocols = list(protocols)
    out: dict = {phase: score_cell_protocols(rows, phase, protocols) for phase in phases}
    out["drift"] = drift_summary(rows)
    return out


def _flatten(rows: Sequence[Mapping], phase: str) -> dict[str, list[np.ndarray]]:
    """metric -> [case index, lp_right, n_right, lp_wrong, n_wrong] over every prompt of every row."""
    acc: dict[str, list[list]] = {m: [[], [], [], [], []] for m in TABLE_METRICS}
    for i, row in enumerate(rows):
        for key, entry in (row.get(phase) or {}).items():
            m = KEY_TO_METRIC.get(key)
            if m is None:
                continue
            right, wrong = entry["right"], entry["wrong"]
            a = acc[m]
            a[0].extend([i] * len(right))
            a[1].extend([p[0] for p in right])
            a[2].extend([p[1] for p in right])
            a[3].extend([p[0] for p in wrong])
            a[4].extend([p[1] for p in wrong])
    return {m: [np.asarray(a[0], dtype=np.int64)] + [np.asarray(c, dtype=np.float64) for c in a[1:]]
            for m, a in acc.items()}


def per_case(rows: Sequence[Mapping], protocols: Iterable[str], phases: Iterable[str] = PHASES) -> dict:
    """Columnar per-case data for the drill-down (rows are assumed already validated by :func:`summarize`)::

        {"case_id": [...], "source": [...], "metrics": [ES, ...],
         "n": {phase: {metric: [prompts per case]}},
         "s": {protocol: {phase: {metric: [successful prompts per case]}}},
         "drift": {"drift_DNS": [mean per case or None], "drift_RS": [...]}}

    The per-case success rate of a metric is s/n (undefined when n = 0: the case has no such prompts)."""
    protocols = [get_protocol(p) for p in protocols]
    n_rows = len(rows)
    out: dict = {"case_id": [str(r["case_id"]) for r in rows], "source": [str(r.get("source", "")) for r in rows],
                 "metrics": list(TABLE_METRICS), "n": {}, "s": {p.id: {} for p in protocols}, "drift": {}}
    for phase in phases:
        flat = _flatten(rows, phase)
        out["n"][phase] = {m: np.bincount(f[0], minlength=n_rows).tolist() for m, f in flat.items()}
        for proto in protocols:
            out["s"][proto.id][phase] = {
                m: np.bincount(f[0], weights=proto.success(f[1], f[2], f[3], f[4]), minlength=n_rows)
                .round().astype(np.int64).tolist() if f[0].size else [0] * n_rows
                for m, f in flat.items()}
    for name, key in DRIFT_KEYS.items():
        col = []
        for r in rows:
            vals = (((r.get("editor") or {}).get("diagnostics") or {}).get("attn_drift") or {}).get(key)
            col.append(round(sum(vals) / len(vals), 4) if vals else None)
        if any(v is not None for v in col):
            out["drift"][name] = col
    return out
