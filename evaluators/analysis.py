"""The paper's diagnosis of Specificity Failure, from result rows alone (no model, no torch): §3.1's calibration
(Table 1) and §3.3's test of whether attention drift predicts the failure (Table 2, factor 1).

- **Calibration**: on the relation (RS) and distracted-neighbourhood (DNS) prompts, the mean probability the edited
  model gives the edit's object o_edit (the probe's wrong target) and the true object o_true (its right target),
  p = exp(−mean per-token NLL) as the paper protocol, next to the accuracy (p_true > p_edit). The paper reports,
  for GPT-J edited by ROME on DNS, P(o_edit) 48.4% against 3.3% before the edit.
- **Drift predicts failure**: per prompt, factor 1 of the attention drift (Σ_l max_h of the increase of the last
  token's attention to the subject's last token, `evaluators.drift`, stored in each row) against P(o_edit) after the
  edit; Pearson ρ with its two-sided p-value (t with n − 2 degrees of freedom), per task and cell.

- **Easy vs hard edits** (Table 5, with the ROME-AWD ablation): the cases split at the median of the unedited
  model's margin for the true object on the edit prompt, m = mean-token log P(o_true) − mean-token log P(o_edit)
  (pre-edit row, rewrite probe): the edits the optimiser must push hardest are the "hard" half. The paper does not
  say how it splits (our inference, written here and in the README); the margin is what the v* loss must overturn.
  Per half and cell: the accuracies (paper protocol, 95% CIs) and the mean attention drift.

The substitution, patching and other factors (§3.2, §3.4, factors 2–3) need forward passes of the edited model and
are not computed from rows.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

from data_pipeline.schema import Case
from evaluators.metrics import AVG_S_METRICS, _pairs, drift_summary, mean_ci, score_cell

TASKS = {"RS": "relation", "DNS": "neighborhood_distracted"}
PAPER_TABLE1 = {"model": "GPT-J-6B", "editor": "ROME", "task": "DNS", "p_edit_post": 0.484, "p_edit_pre": 0.033}


def _probs(row: Mapping, phase: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(p_true, p_edit) per prompt of probe ``key`` in ``phase`` (None when the case has no such prompts)."""
    probe = ((row.get(phase) or {}).get(key))
    if not probe:
        return None
    lp_r, n_r = _pairs(row, f"{phase}.{key}.right", probe["right"])
    lp_w, n_w = _pairs(row, f"{phase}.{key}.wrong", probe["wrong"])
    return np.exp(np.asarray(lp_r) / np.asarray(n_r)), np.exp(np.asarray(lp_w) / np.asarray(n_w))


def calibration(rows: list[Mapping]) -> dict[str, Any]:
    """Per task: mean P(o_edit) and P(o_true) with 95% CIs before and after the edit, and the accuracies."""
    out = {}
    for task, key in TASKS.items():
        res = {}
        for phase in ("pre", "post"):
            pt, pe = [], []
            for row in rows:
                got = _probs(row, phase, key)
                if got is not None:
                    pt.extend(got[0])
                    pe.extend(got[1])
            if not pt:
                continue
            t, e = np.asarray(pt), np.asarray(pe)
            res[phase] = {"p_true": mean_ci(t), "p_edit": mean_ci(e), "accuracy": float((t > e).mean()), "n": len(t)}
        if res:
            out[task] = res
    return out


def pearson(x: Iterable[float], y: Iterable[float]) -> dict[str, float | int | None]:
    """Pearson's ρ and its two-sided p-value (t = ρ √(n−2) / √(1−ρ²), Student t with n − 2 df)."""
    from scipy.stats import t as student_t

    a, b = np.asarray(list(x), dtype=np.float64), np.asarray(list(y), dtype=np.float64)
    n = len(a)
    if n < 3 or a.std() == 0 or b.std() == 0:
        return {"rho": None, "p": None, "n": n}
    rho = float(np.corrcoef(a, b)[0, 1])
    rho = max(-1.0, min(1.0, rho))
    if abs(rho) == 1.0:
        return {"rho": rho, "p": 0.0, "n": n}
    t = rho * math.sqrt((n - 2) / (1 - rho * rho))
    return {"rho": rho, "p": float(2 * student_t.sf(abs(t), n - 2)), "n": n}


def drift_points(row: Mapping, case: Case) -> dict[str, list[tuple[float, float]]]:
    """Per task: (factor-1 drift, P(o_edit) after the edit) per prompt. The RS drift list covers the relation prompts
    that contain the subject (evaluators.drift.drift_prompts), in order; DNS covers every neighbourhood prompt."""
    d = ((row.get("editor") or {}).get("diagnostics") or {}).get("attn_drift")
    if not d:
        return {}
    out = {}
    dns = _probs(row, "post", "neighborhood_distracted")
    if dns is not None and d.get("neighborhood_distracted"):
        if len(d["neighborhood_distracted"]) != len(dns[1]):
            raise ValueError(f"case {case.case_id}: {len(d['neighborhood_distracted'])} DNS drift values for "
                             f"{len(dns[1])} prompts")
        out["DNS"] = list(zip(d["neighborhood_distracted"], dns[1].tolist()))
    rs = _probs(row, "post", "relation")
    if rs is not None and d.get("relation"):
        with_subject = [i for i, p in enumerate(case.relation) if case.subject in p.prompt]
        if len(with_subject) != len(d["relation"]) or len(case.relation) != len(rs[1]):
            raise ValueError(f"case {case.case_id}: RS drift values do not match its relation prompts")
        out["RS"] = [(drift, float(rs[1][i])) for drift, i in zip(d["relation"], with_subject)]
    return out


def drift_vs_failure(rows: list[Mapping], cases: Mapping[str, Case]) -> dict[str, Any]:
    """Per task: Pearson ρ (p-value, n) between factor-1 drift and P(o_edit), and the points for a scatter plot."""
    pts: dict[str, list[tuple[float, float]]] = {t: [] for t in TASKS}
    for row in rows:
        case = cases.get(row["case_id"])
        if case is None:
            raise ValueError(f"row of case {row['case_id']!r} has no case in the dataset")
        for task, p in drift_points(row, case).items():
            pts[task].extend(p)
    return {task: dict(pearson([a for a, _ in p], [b for _, b in p]), points=p) for task, p in pts.items() if p}


EASY_HARD_METRICS = AVG_S_METRICS  # the five accuracies, per half


def edit_margin(row: Mapping) -> float:
    """The unedited model's preference for the true object on the edit prompt: mean-token log P(o_true) minus
    mean-token log P(o_edit), from the row's pre-edit rewrite probe (one prompt)."""
    probe = (row.get("pre") or {}).get("rewrite")
    if not probe:
        raise ValueError(f"case_id {row.get('case_id')!r}: no pre.rewrite probe to measure the edit's difficulty")
    lp_new, n_new = _pairs(row, "pre.rewrite.right", probe["right"])
    lp_true, n_true = _pairs(row, "pre.rewrite.wrong", probe["wrong"])
    if len(lp_new) != 1 or len(lp_true) != 1:
        raise ValueError(f"case_id {row.get('case_id')!r}: pre.rewrite must hold exactly one prompt")
    return lp_true[0] / n_true[0] - lp_new[0] / n_new[0]


def easy_hard(cells: Mapping[str, list[Mapping]]) -> dict[str, Any]:
    """Table 5: every cell's rows split into the same easy and hard halves (by `edit_margin`, median split over the
    cases all the cells share; a case at the median goes to the easy half), scored per half. The cells must hold
    the same cases with the same pre-edit margins (they share the unedited model), else ValueError."""
    if not cells:
        return {}
    margins: dict[str, float] = {}
    for cell, rows in cells.items():
        mine = {r["case_id"]: edit_margin(r) for r in rows}
        if not margins:
            margins = mine
        elif set(mine) != set(margins) or any(abs(mine[c] - margins[c]) > 1e-6 for c in mine):
            raise ValueError(f"cell {cell!r}: its cases or their pre-edit margins differ from the other cells'; "
                             "compare cells run on the same cases and model")
    median = float(np.median(list(margins.values())))
    half = {c: ("hard" if m > median else "easy") for c, m in margins.items()}
    out: dict[str, Any] = {"median_margin": median, "split": half, "cells": {}}
    for cell, rows in cells.items():
        res = {}
        for name in ("easy", "hard"):
            part = [r for r in rows if half[r["case_id"]] == name]
            sc = score_cell(part, "post", "paper")
            res[name] = {"n_cases": len(part), **{m: sc[m] for m in EASY_HARD_METRICS}, **drift_summary(part)}
        out["cells"][cell] = res
    return out


def plot_easy_hard(result: Mapping[str, Any], path) -> None:
    """ES, DNS and RS (paper protocol, 95% CI bars) and the DNS drift per cell, easy and hard halves side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(result.get("cells") or {})
    if not cells:
        return
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    width = 0.8 / len(cells)
    for ax, metric in zip(axes, ("ES", "DNS", "RS", "drift_DNS")):
        for i, cell in enumerate(cells):
            vals, errs = [], []
            for name in ("easy", "hard"):
                m = result["cells"][cell][name].get(metric) or {}
                scale = 1 if metric.startswith("drift") else 100
                vals.append((m.get("mean") or 0.0) * scale)
                errs.append((m.get("ci95") or 0.0) * scale)
            ax.bar([j + i * width for j in range(2)], vals, width, yerr=errs, capsize=2, label=cell)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(2)], ["easy", "hard"])
        ax.set_title(metric if metric.startswith("drift") else f"{metric} (%)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: Mapping[str, Mapping[str, Any]], path) -> None:
    """One row per cell with a drift–failure scatter per task; ρ and p in each title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in results if results[c].get("drift")]
    if not cells:
        return
    fig, axes = plt.subplots(len(cells), len(TASKS), figsize=(4.2 * len(TASKS), 3.0 * len(cells)), squeeze=False)
    for i, cell in enumerate(cells):
        for j, task in enumerate(TASKS):
            ax = axes[i][j]
            r = results[cell]["drift"].get(task)
            if not r:
                ax.axis("off")
                continue
            x, y = zip(*r["points"])
            ax.scatter(x, y, s=8, alpha=0.6)
            rho = "n/a" if r["rho"] is None else f"{r['rho']:.2f} (p={r['p']:.2g}, n={r['n']})"
            ax.set_title(f"{cell} {task}: ρ {rho}", fontsize=8)
            ax.set_xlabel("attention drift (factor 1)", fontsize=7)
            ax.set_ylabel("P(o_edit) after the edit", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
