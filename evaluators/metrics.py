"""Metric definitions with protocol ids (reference-spec §2.2, §2.3, §2.7, §8 gotchas 1, 2, 5) — stdlib + numpy only.

Every number is computed from the result rows written by the harness (contract in ``evaluators.probes``): for each
probe key, aligned per-prompt pairs ``[logprob_sum, n_tokens]`` of the "right" and the "wrong" target. From these
two things are derived per prompt, and *which* two depends on the protocol:

* ``success``   — 1 if the right target beats the wrong one, else 0 (→ the accuracy metrics ES, PS, NS, …);
* ``magnitude`` — a probability of the right target (→ EM, PM, NM, RM, DNM), only where the protocol defines one.

Pooling is the same for every protocol (spec §2.7): a metric's value is the **micro-average over all prompts of all
cases** (each prompt weighs 1, whatever case it belongs to; a case with 3 neighbourhood prompts counts 3 times), and
keys absent from a case contribute nothing (gotcha 5). The 95% interval is the normal one,
``half-width = z · sd(ddof=1) / sqrt(n)`` with z = 1.959963984540054, and ``None`` when n < 2.

Avg.S is the harmonic mean of ES, PS, NS, RS and DNS of the same protocol; 0 when any of them is 0, ``None`` when any
of them has no prompts at all.

Values are fractions in [0, 1]; only the Markdown rendering (``evaluators.aggregate``) multiplies by 100. Every output
of :func:`score_cell` carries the id of the protocol that produced it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from evaluators.probes import PROBE_KEYS

Z95 = 1.959963984540054  # Φ⁻¹(0.975): two-sided 95% normal interval

# paper metric name -> probe key (accuracy; spec §2.3). SAS and DRS are computed by the reference but not reported.
METRICS: dict[str, str] = {
    "ES": "rewrite",
    "PS": "paraphrase",
    "NS": "neighborhood",
    "RS": "relation",
    "DNS": "neighborhood_distracted",
    "RES": "reasoning",
    "SAS": "subject_alias",
    "DRS": "relation_distracted",
    "OS": "piqa",
    "DOS": "piqa_distracted",
}
# magnitude name -> probe key: mean probability of the right target (spec §2.7, `--metric p` mode)
MAGNITUDES: dict[str, str] = {
    "EM": "rewrite",
    "PM": "paraphrase",
    "NM": "neighborhood",
    "RM": "relation",
    "DNM": "neighborhood_distracted",
}
# the five accuracies whose harmonic mean is Avg.S (spec §2.7, gotcha 15)
AVG_S_METRICS: tuple[str, ...] = ("ES", "PS", "NS", "RS", "DNS")

assert set(METRICS.values()) == set(PROBE_KEYS), "every probe key has exactly one accuracy metric"


# --------------------------------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class Protocol:
    """A way to turn per-prompt ``(logprob_sum, n_tokens)`` of right/wrong targets into numbers.

    ``success(lp_r, n_r, lp_w, n_w)`` and ``magnitude(lp_r, n_r)`` take float64 arrays (one entry per prompt) and
    return a 0/1 array and a probability array; ``magnitude`` is ``None`` for a protocol without magnitudes.
    """
    id: str
    doc: str
    success: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    magnitude: Callable[[np.ndarray, np.ndarray], np.ndarray] | None

    @property
    def magnitude_metrics(self) -> dict[str, str]:
        return dict(MAGNITUDES) if self.magnitude is not None else {}


def _paper_prob(lp: np.ndarray, n: np.ndarray) -> np.ndarray:
    """p = exp(−nll) with nll = −logprob_sum / n_tokens: the per-token geometric-mean probability (spec §2.2)."""
    return np.exp(lp / n)


def _paper_success(lp_r: np.ndarray, n_r: np.ndarray, lp_w: np.ndarray, n_w: np.ndarray) -> np.ndarray:
    # strict ">" on the exp values, as summrize.py compares them (gotcha 1): a tie is a failure
    return (_paper_prob(lp_r, n_r) > _paper_prob(lp_w, n_w)).astype(np.float64)


def _lm_eval_success(lp_r: np.ndarray, n_r: np.ndarray, lp_w: np.ndarray, n_w: np.ndarray) -> np.ndarray:
    # lm-eval's multiple-choice `acc`: the choice with the larger *summed* log-likelihood wins; strict ">" so a tie
    # is a failure (lm-eval's argmax would pick the first choice, i.e. "right", on a tie; we keep ties conservative)
    return (lp_r > lp_w).astype(np.float64)


PAPER = Protocol(
    id="paper",
    doc=(
        "Reference parity (reference-spec §2.2, §2.7). Per prompt i: nll_i = -logprob_sum_i / n_tokens_i (mean "
        "per-token NLL), p_i = exp(-nll_i). success_i = 1[p_right_i > p_wrong_i] (strict; a tie fails). "
        "Accuracy = (1/N) Σ_i success_i pooled over all N prompts of all cases (micro). "
        "Magnitude = (1/N) Σ_i p_right_i. CI95 = 1.959964 · sd_ddof1 / sqrt(N) (None if N < 2). "
        "Avg.S = 5 / Σ_{m∈ES,PS,NS,RS,DNS} 1/m."
    ),
    success=_paper_success,
    magnitude=_paper_prob,
)

LM_EVAL = Protocol(
    id="lm-eval",
    doc=(
        "Harness-standard multiple-choice `acc` (lm-evaluation-harness). Per prompt i: success_i = "
        "1[logprob_sum_right_i > logprob_sum_wrong_i] on *summed* target log-probs (no length normalisation; strict, "
        "a tie fails). Accuracy = (1/N) Σ_i success_i pooled over all N prompts of all cases (micro). "
        "CI95 = 1.959964 · sd_ddof1 / sqrt(N) (None if N < 2). Avg.S = 5 / Σ_{m∈ES,PS,NS,RS,DNS} 1/m. "
        "No magnitudes: the harness defines none for multiple choice, and exp(summed log-prob) is a whole-sequence "
        "probability that shrinks with target length, so it is not comparable across keys or models."
    ),
    success=_lm_eval_success,
    magnitude=None,
)

PROTOCOLS: dict[str, Protocol] = {PAPER.id: PAPER, LM_EVAL.id: LM_EVAL}


def get_protocol(protocol: str | Protocol) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    try:
        return PROTOCOLS[protocol]
    except KeyError:
        raise ValueError(f"unknown metric protocol {protocol!r}; known: {sorted(PROTOCOLS)}") from None


# --------------------------------------------------------------------------------------------------- validation
def _where(row: Mapping, field: str) -> str:
    return f"cell {row.get('cell')!r}, case_id {row.get('case_id')!r}, field {field!r}"


_isfinite = math.isfinite


def _pairs(row: Mapping, field: str, value) -> tuple[list[float], list[float]]:
    """Validate a list of ``[logprob_sum, n_tokens]`` pairs; return (logprob sums, token counts).

    Fast path for what the harness writes (JSON lists of [float, int]); anything else takes the exact per-pair
    checks below, which name the first bad pair. Both accept and reject the same inputs (tests/test_metrics.py).
    """
    if type(value) is list and all(type(p) is list and len(p) == 2 and type(p[0]) is float and type(p[1]) is int
                                   for p in value):
        lps = [p[0] for p in value]
        ns = [p[1] for p in value]
        if all(_isfinite(x) for x in lps) and all(n > 0 for n in ns):
            return lps, [float(n) for n in ns]
    return _pairs_checked(row, field, value)


def _pairs_checked(row: Mapping, field: str, value) -> tuple[list[float], list[float]]:
    """`_pairs` without the fast path: every pair checked, the first bad one named in the error."""
    if not isinstance(value, list):
        raise ValueError(f"{_where(row, field)}: expected a list of [logprob_sum, n_tokens] pairs, got {type(value).__name__}")
    lps, ns = [], []
    for i, pair in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{_where(row, f)}: expected [logprob_sum, n_tokens], got {pair!r}")
        lp, n = pair
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise ValueError(f"{_where(row, f)}: logprob_sum must be a finite number, got {lp!r}")
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not float(n).is_integer() or n <= 0:
            raise ValueError(f"{_where(row, f)}: n_tokens must be a positive integer, got {n!r}")
        lps.append(float(lp))
        ns.append(float(n))
    return lps, ns


def _phase(row: Mapping, phase: str) -> Mapping:
    for field in ("cell", "case_id"):
        if field not in row:
            raise ValueError(f"{_where(row, field)}: missing field in result row")
    if phase not in row:
        raise ValueError(f"{_where(row, phase)}: missing field in result row")
    probes = row[phase]
    if not isinstance(probes, Mapping):
        raise ValueError(f"{_where(row, phase)}: expected an object of probe keys, got {type(probes).__name__}")
    return probes


def _collect(rows: Iterable[Mapping], phase: str) -> tuple[int, dict[str, list[list[float]]]]:
    """Pool (lp_r, n_r, lp_w, n_w) over every prompt of every row, per probe key; validate as we go.

    Rows are pooled in ``case_id`` order so the float sums do not depend on the order rows were written in.
    Keys that are not probe keys (e.g. fluency scalars) are ignored; probe keys are validated strictly.
    """
    rows = list(rows)
    probes_of = [(row, _phase(row, phase)) for row in rows]
    probes_of.sort(key=lambda rp: str(rp[0]["case_id"]))
    pooled: dict[str, list[list[float]]] = {k: [[], [], [], []] for k in PROBE_KEYS}
    for row, probes in probes_of:
        for key in PROBE_KEYS:
            if key not in probes:
                continue  # no prompts for this case (gotcha 5)
            entry, field = probes[key], f"{phase}.{key}"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{_where(row, field)}: expected {{'right': [...], 'wrong': [...]}}")
            for side in ("right", "wrong"):
                if side not in entry:
                    raise ValueError(f"{_where(row, f'{field}.{side}')}: missing field in result row")
            lp_r, n_r = _pairs(row, f"{field}.right", entry["right"])
            lp_w, n_w = _pairs(row, f"{field}.wrong", entry["wrong"])
            if len(lp_r) != len(lp_w):
                raise ValueError(
                    f"{_where(row, field)}: 'right' has {len(lp_r)} prompts but 'wrong' has {len(lp_w)}; they must align")
            for acc, vals in zip(pooled[key], (lp_r, n_r, lp_w, n_w)):
                acc.extend(vals)
    return len(rows), pooled


# --------------------------------------------------------------------------------------------------- statistics
def mean_ci(values: np.ndarray) -> dict:
    """``{"mean", "ci95", "n"}`` of a 1-D sample: normal 95% half-width z·sd(ddof=1)/√n; None when n < 2."""
    n = int(values.size)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(values.mean())
    ci = float(Z95 * values.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
    return {"mean": mean, "ci95": ci, "n": n}


def harmonic_mean(values: Iterable[float | None]) -> float | None:
    """Harmonic mean n / Σ 1/x; None if any value is None, 0.0 if any value is 0 (spec §2.7, Avg.S)."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def score_cell(rows: Iterable[Mapping], phase: str = "post", protocol: str | Protocol = "paper") -> dict:
    """Score one cell's result rows for one phase ("pre" or "post") under one metric protocol.

    Returns ``{"protocol": id, "n_cases": int, "AvgS": float|None, <metric>: {"mean", "ci95", "n"}, ...}`` with one
    entry per accuracy metric in :data:`METRICS` and, for protocols that define them, per magnitude in
    :data:`MAGNITUDES`. ``n`` is the number of prompts pooled; a metric with no prompts has mean/ci95 None and n 0.
    Raises ValueError naming the cell, case_id and field of the first malformed row.
    """
    (out,) = score_cell_protocols(rows, phase, (protocol,)).values()
    return out


def score_cell_protocols(rows: Iterable[Mapping], phase: str = "post",
                         protocols: Iterable[str | Protocol] = tuple(PROTOCOLS)) -> dict[str, dict]:
    """``{protocol id: score_cell(rows, phase, protocol)}``, validating and pooling the rows once for all of them."""
    protos = [get_protocol(p) for p in protocols]
    if phase not in ("pre", "post"):
        raise ValueError(f"phase must be 'pre' or 'post', got {phase!r}")
    rows = list(rows)
    n_cases, pooled = _collect(rows, phase)
    arrays = {k: [np.asarray(v, dtype=np.float64) for v in cols] for k, cols in pooled.items()}
    scores = {}
    for proto in protos:
        out: dict = {"protocol": proto.id, "n_cases": n_cases}
        for name, key in METRICS.items():
            lp_r, n_r, lp_w, n_w = arrays[key]
            out[name] = mean_ci(proto.success(lp_r, n_r, lp_w, n_w))
        for name, key in proto.magnitude_metrics.items():
            lp_r, n_r, _, _ = arrays[key]
            out[name] = mean_ci(proto.magnitude(lp_r, n_r))
        out["AvgS"] = harmonic_mean(out[m]["mean"] for m in AVG_S_METRICS)
        out.update(generation_metrics(rows, phase, proto))
        scores[proto.id] = out
    return scores


# --------------------------------------------------------------------------------------------------- FL, ME-PPL
def _ppl_value(row: Mapping, entry, proto: Protocol) -> float:
    """Per-case ME-PPL under ``proto`` (evaluators/generation.py): the reference's value for `paper`, lm-eval's
    word perplexity exp(−Σ loglik / Σ words) for `lm-eval`."""
    try:
        if proto.id == PAPER.id:
            v = float(entry["paper"])
        else:
            v = math.exp(-float(entry["loglik"]) / int(entry["words"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise ValueError(f"{_where(row, 'me_ppl')}: expected {{'paper': float, 'loglik': float, 'words': int}} "
                         f"({type(e).__name__}: {e})") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{_where(row, 'me_ppl')}: perplexity must be a positive finite number, got {v!r}")
    return v


def generation_metrics(rows: Iterable[Mapping], phase: str, protocol: str | Protocol = "paper") -> dict:
    """FL (mean n-gram entropy per case; tables show it × 100 like the paper) and PPL (ME-PPL, mean over cases) with
    95% CIs over the cases that have them (CounterFact cases); ``{}`` if no row has them."""
    proto = get_protocol(protocol)
    fl, ppl = [], []
    for row in sorted(rows, key=lambda r: str(r.get("case_id"))):
        probes = _phase(row, phase)
        if "fluency" in probes:
            e = probes["fluency"].get("entropy") if isinstance(probes["fluency"], Mapping) else None
            if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e):
                raise ValueError(f"{_where(row, f'{phase}.fluency.entropy')}: must be a finite number, got {e!r}")
            fl.append(float(e))
        if "me_ppl" in probes:
            ppl.append(_ppl_value(row, probes["me_ppl"], proto))
    out = {}
    if fl:
        out["FL"] = mean_ci(np.asarray(fl))
    if ppl:
        out["PPL"] = mean_ci(np.asarray(ppl))
    return out


# --------------------------------------------------------------------------------------------------- attention drift
DRIFT_KEYS = {"drift_DNS": "neighborhood_distracted", "drift_RS": "relation"}


def drift_summary(rows: Iterable[Mapping]) -> dict:
    """Mean attention drift (paper Table 2, factor 1) with 95% CI, pooled over the prompts of all cases, from
    ``editor.diagnostics.attn_drift`` of each row; ``{}`` for rows without it (the ``none`` cell, pre-edit)."""
    pooled: dict[str, list[float]] = {k: [] for k in DRIFT_KEYS}
    seen = False
    for row in rows:
        d = ((row.get("editor") or {}).get("diagnostics") or {}).get("attn_drift")
        if d is None:
            continue
        seen = True
        for name, key in DRIFT_KEYS.items():
            vals = d.get(key, [])
            if not all(isinstance(v, (int, float)) for v in vals):
                raise ValueError(f"case_id {row.get('case_id')!r}: editor.diagnostics.attn_drift.{key} must be a list "
                                 "of numbers")
            pooled[name].extend(vals)
    if not seen:
        return {}
    return {name: mean_ci(np.asarray(v, dtype=np.float64)) for name, v in pooled.items()}
