"""The diagnosis from rows (evaluators.analysis): Pearson ρ and p against a hand computation, the calibration table's
probabilities, and the alignment of drift values with RS/DNS prompts."""
from __future__ import annotations

import math

import pytest

from data_pipeline.schema import Case, Probe
from evaluators.analysis import calibration, drift_points, drift_vs_failure, pearson


def test_pearson_equals_a_hand_computation():
    x, y = [1.0, 2.0, 3.0, 4.0, 6.0], [2.0, 4.0, 5.0, 9.0, 8.0]
    mx, my = sum(x) / 5, sum(y) / 5
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    rho = sxy / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    got = pearson(x, y)
    assert got["rho"] == pytest.approx(rho) and got["n"] == 5
    from scipy.stats import pearsonr

    assert got["p"] == pytest.approx(pearsonr(x, y).pvalue)
    assert pearson([1, 2], [3, 4])["rho"] is None and pearson([1, 1, 1], [1, 2, 3])["rho"] is None


CASE = Case(case_id="cf-1", source="counterfact", subject="Ann", prompt="Ann plays", target_true="jazz",
            target_new="rock", neighborhood=(Probe("Bob plays", "pop"), Probe("Cy plays", "folk")),
            relation=(Probe("Ann was born in", "Oslo"), Probe("The city is", "Rome"), Probe("Ann lives in", "Oslo")))


def pairs(*ps):
    """[[logprob_sum, n_tokens]] with logprob_sum = n · log p (so exp(mean) = p)."""
    return [[math.log(p) * n, n] for p, n in ps]


ROW = {"case_id": "cf-1", "cell": "t/m/rome",
       "pre": {"neighborhood_distracted": {"right": pairs((0.5, 1), (0.4, 2)), "wrong": pairs((0.1, 1), (0.2, 1))},
               "relation": {"right": pairs((0.6, 1), (0.5, 1), (0.7, 1)), "wrong": pairs((0.1, 1), (0.1, 1), (0.1, 1))}},
       "post": {"neighborhood_distracted": {"right": pairs((0.2, 1), (0.3, 2)), "wrong": pairs((0.6, 1), (0.1, 1))},
                "relation": {"right": pairs((0.4, 1), (0.5, 1), (0.2, 1)), "wrong": pairs((0.3, 1), (0.1, 1), (0.5, 1))}},
       "editor": {"diagnostics": {"attn_drift": {"neighborhood_distracted": [0.9, 0.1], "relation": [0.5, 0.7]}}}}


def test_calibration_means_and_accuracies():
    cal = calibration([ROW])
    post = cal["DNS"]["post"]
    assert post["p_edit"]["mean"] == pytest.approx((0.6 + 0.1) / 2) and post["p_true"]["mean"] == pytest.approx(0.25)
    assert post["accuracy"] == 0.5 and cal["DNS"]["pre"]["accuracy"] == 1.0
    assert cal["RS"]["post"]["p_edit"]["mean"] == pytest.approx(0.3) and cal["RS"]["post"]["n"] == 3


def test_drift_points_follow_the_prompts_that_carry_the_subject():
    pts = drift_points(ROW, CASE)
    assert pts["DNS"] == [(0.9, pytest.approx(0.6)), (0.1, pytest.approx(0.1))]
    assert pts["RS"] == [(0.5, pytest.approx(0.3)), (0.7, pytest.approx(0.5))]  # prompts 0 and 2 name "Ann"
    res = drift_vs_failure([ROW], {"cf-1": CASE})
    assert res["DNS"]["n"] == 2 and res["DNS"]["rho"] is None  # two points: no ρ
    bad = {**ROW, "editor": {"diagnostics": {"attn_drift": {"relation": [0.5]}}}}
    with pytest.raises(ValueError, match="RS drift"):
        drift_points(bad, CASE)
