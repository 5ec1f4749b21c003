"""The diagnosis from rows (evaluators.analysis): Pearson ρ and p against a hand computation, the calibration table's
probabilities, and the alignment of drift values with RS/DNS prompts."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from data_pipeline.schema import Case, Probe
from evaluators.analysis import calibration, drift_points, drift_vs_failure, easy_hard, edit_margin, pearson


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


def _ab_row(case_id, p_new, p_true, es_after, drift):
    """A row whose edit prompt has pre-edit P(o_edit) p_new, P(o_true) p_true, and whose edit succeeds iff es_after."""
    post_new, post_true = (0.9, 0.1) if es_after else (0.1, 0.9)
    return {"case_id": case_id, "cell": "t/m/x",
            "pre": {"rewrite": {"right": pairs((p_new, 1)), "wrong": pairs((p_true, 2))}},
            "post": {"rewrite": {"right": pairs((post_new, 1)), "wrong": pairs((post_true, 1))}},
            "editor": {"diagnostics": {"attn_drift": {"neighborhood_distracted": [drift], "relation": []}}}}


def test_easy_hard_splits_at_the_median_margin_and_scores_each_half():
    """Table 5: margin = mean-token log P(o_true) − log P(o_edit) before the edit; the cases above the median are the
    hard half, the same for every cell; each half is scored on its own (here ES and the drift, by hand)."""
    margins = {f"c{i}": None for i in range(4)}
    rows = [_ab_row("c0", 0.5, 0.1, True, 1.0), _ab_row("c1", 0.1, 0.5, False, 3.0),
            _ab_row("c2", 0.4, 0.2, True, 2.0), _ab_row("c3", 0.01, 0.9, False, 5.0)]
    for r in rows:
        margins[r["case_id"]] = edit_margin(r)
    assert margins["c1"] == pytest.approx(math.log(0.5) - math.log(0.1))  # per-token means (2 tokens on the true side)
    other = [dict(r, post={"rewrite": {"right": pairs((0.9, 1)), "wrong": pairs((0.1, 1))}}) for r in rows]
    res = easy_hard({"rome": rows, "rome_awd": other})
    assert res["split"] == {"c0": "easy", "c2": "easy", "c1": "hard", "c3": "hard"}
    assert res["median_margin"] == pytest.approx((margins["c2"] + margins["c1"]) / 2)
    rome = res["cells"]["rome"]
    assert rome["easy"]["ES"]["mean"] == 1.0 and rome["hard"]["ES"]["mean"] == 0.0
    assert rome["easy"]["n_cases"] == 2 and rome["hard"]["drift_DNS"]["mean"] == pytest.approx(4.0)
    assert res["cells"]["rome_awd"]["hard"]["ES"]["mean"] == 1.0
    with pytest.raises(ValueError, match="differ"):  # cells on other cases are not comparable
        easy_hard({"rome": rows, "rome_awd": rows[:3]})


def test_ablation_command_writes_table5_and_refuses_a_missing_cell_in_one_line(tmp_path, monkeypatch, capsys):
    """`driftbench ablation`: the three cells' rows → easy_hard.{json,md,png}; a missing cell file is exit 2, one
    line naming it, before anything is written."""
    import json

    import yaml

    from driftbench.cli import main

    real = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(real))
    monkeypatch.chdir(tmp_path)
    cells = tmp_path / "results" / "embedded" / "smollm2-135m" / "cells"
    cells.mkdir(parents=True)
    rows = [_ab_row("c0", 0.5, 0.1, True, 1.0), _ab_row("c1", 0.1, 0.5, False, 3.0)]
    for cell in ("rome", "rome_awd"):
        (cells / f"{cell}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["ablation"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rome+sadr.jsonl" in err[0]
    assert not (tmp_path / "results" / "embedded" / "smollm2-135m" / "ablation").exists()
    (cells / "rome+sadr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["ablation"]) == 0
    out = tmp_path / "results" / "embedded" / "smollm2-135m" / "ablation"
    res = json.loads((out / "easy_hard.json").read_text())
    assert res["split"] == {"c0": "easy", "c1": "hard"} and set(res["cells"]) == {"rome", "rome_awd", "rome+sadr"}
    assert "| rome_awd | hard | 0.0 (0.0) |" in (out / "easy_hard.md").read_text()
    assert (out / "easy_hard.png").stat().st_size > 0
