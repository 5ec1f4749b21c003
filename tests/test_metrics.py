"""Tests for evaluators.metrics and evaluators.aggregate on hand-built result rows.

Every expected number below is worked out by hand in the comments (e = Euler's number, z = 1.959963984540054),
never by calling the code under test.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluators.aggregate import aggregate, format_table
from evaluators.metrics import METRICS, PROTOCOLS, score_cell

REPO = Path(__file__).resolve().parents[1]
Z = 1.959963984540054
CELL = "embedded/tiny/rome"


def pair(*prompts):
    """[(lp, n), ...] -> [[lp, n], ...]"""
    return [[lp, n] for lp, n in prompts]


def probe(right, wrong):
    return {"right": pair(*right), "wrong": pair(*wrong)}


# Post-edit probes. Per prompt: paper compares lp/n (mean per-token log-prob), lm-eval compares lp.
C1 = {
    # rewrite: right -2.0/2 = -1.0 > wrong -1.5/1 = -1.5 -> paper success; summed -2.0 > -1.5 false -> lm-eval fail
    "rewrite": probe([(-2.0, 2)], [(-1.5, 1)]),
    # paraphrase p1: right -2.0/2 = -1.0 vs wrong -1.0/1 = -1.0 -> exact tie -> failure under both protocols
    #   (lm-eval: -2.0 > -1.0 false). p2: -0.5 > -1.0 -> success under both.
    "paraphrase": probe([(-2.0, 2), (-0.5, 1)], [(-1.0, 1), (-1.0, 1)]),
    "neighborhood": probe([(-0.1, 1)], [(-2.0, 1)]),                  # success
    "relation": probe([(-0.2, 1)], [(-3.0, 1)]),                      # success
    "neighborhood_distracted": probe([(-1.0, 1)], [(-0.5, 1)]),       # failure
}
C2 = {
    # rewrite: paper -3.0/1 = -3 > -4.0/2 = -2 false -> fail; lm-eval -3.0 > -4.0 -> success
    "rewrite": probe([(-3.0, 1)], [(-4.0, 2)]),
    "paraphrase": probe([(-0.3, 1)], [(-2.0, 1)]),                    # success
    # three neighbourhood prompts: -0.1 > -1 success, -3 > -1 fail, -2 > -1 fail
    "neighborhood": probe([(-0.1, 1), (-3.0, 1), (-2.0, 1)], [(-1.0, 1)] * 3),
    "relation": probe([(-5.0, 1)], [(-1.0, 1)]),                      # failure
    # -0.1 success, -0.2 success, -3.0 failure (wrong = -1.0 each)
    "neighborhood_distracted": probe([(-0.1, 1), (-0.2, 1), (-3.0, 1)], [(-1.0, 1)] * 3),
}
C3 = {
    # rewrite: paper -4.0/4 = -1 > -3.0/1 = -3 -> success; lm-eval -4.0 > -3.0 false -> fail
    "rewrite": probe([(-4.0, 4)], [(-3.0, 1)]),
    # piqa: paper -6/3 = -2 > -5/2 = -2.5 -> success; lm-eval -6 > -5 false -> fail. No other keys: they are absent.
    "piqa": probe([(-6.0, 3)], [(-5.0, 2)]),
}
# Pre-edit probes: only rewrite, right -3.0 vs wrong -1.0 (both 1 token) -> failure under both protocols.
PRE = {"rewrite": probe([(-3.0, 1)], [(-1.0, 1)])}


def make_rows(cell=CELL):
    rows = []
    for cid, post in (("c1", C1), ("c2", C2), ("c3", C3)):
        rows.append({"cell": cell, "case_id": cid, "source": "counterfact", "pre": copy.deepcopy(PRE),
                     "post": copy.deepcopy(post), "editor": {"name": cell.rsplit("/", 1)[1].replace("+sadr", ""),
                                                             "sadr": cell.endswith("+sadr"), "diagnostics": {}},
                     "env": {}})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ metrics
def test_es_differs_between_protocols_with_hand_computed_ci():
    paper = score_cell(make_rows(), "post", "paper")
    lm = score_cell(make_rows(), "post", "lm-eval")
    assert paper["protocol"] == "paper" and lm["protocol"] == "lm-eval"
    # paper ES successes [1, 0, 1] -> 2/3. lm-eval [0, 1, 0] -> 1/3.
    # sd(ddof=1) of either: squared deviations (1/3)^2 + (2/3)^2 + (1/3)^2 = 6/9; /2 = 1/3; sd = sqrt(1/3)
    # half-width = z * sqrt(1/3) / sqrt(3) = z / 3 = 0.653321328180018
    assert paper["ES"]["mean"] == pytest.approx(2 / 3)
    assert lm["ES"]["mean"] == pytest.approx(1 / 3)
    assert paper["ES"]["ci95"] == pytest.approx(0.653321328180018, abs=1e-12)
    assert lm["ES"]["ci95"] == pytest.approx(0.653321328180018, abs=1e-12)
    assert paper["ES"]["n"] == lm["ES"]["n"] == 3
    assert paper["n_cases"] == lm["n_cases"] == 3
    # OS (only c3): paper success, lm-eval failure; a single prompt has no interval
    assert paper["OS"] == {"mean": 1.0, "ci95": None, "n": 1}
    assert lm["OS"] == {"mean": 0.0, "ci95": None, "n": 1}


def test_strict_tie_counts_as_failure():
    # PS prompts: c1p1 tie (fail), c1p2 success, c2 success -> 2/3 under both protocols
    for pid in ("paper", "lm-eval"):
        assert score_cell(make_rows(), "post", pid)["PS"]["mean"] == pytest.approx(2 / 3)
    # isolated: a single tied prompt scores 0, not 1
    row = {"cell": CELL, "case_id": "t", "post": {"rewrite": probe([(-2.0, 2)], [(-1.0, 1)])}}
    assert score_cell([row], "post", "paper")["ES"]["mean"] == 0.0


def test_micro_pooling_not_macro():
    s = score_cell(make_rows(), "post", "paper")
    # NS prompts: c1 [1], c2 [1, 0, 0] -> micro 2/4 = 0.5 (macro would be (1 + 1/3)/2 = 0.6667); c3 absent -> n = 4
    assert s["NS"]["mean"] == pytest.approx(0.5)
    assert s["NS"]["mean"] != pytest.approx(2 / 3)
    assert s["NS"]["n"] == 4
    # sd(ddof=1) of [1,1,0,0]: 4 * 0.25 / 3 = 1/3 -> sd 0.5773502692; /sqrt(4) = 0.2886751346; * z = 0.5657928670
    assert s["NS"]["ci95"] == pytest.approx(0.5657928670, abs=1e-9)
    # RS [1, 0]: mean 0.5, sd(ddof=1) = sqrt(0.5) -> se = sqrt(0.5)/sqrt(2) = 0.5 -> ci = z/2 = 0.979981992270027
    assert s["RS"]["mean"] == pytest.approx(0.5)
    assert s["RS"]["ci95"] == pytest.approx(0.979981992270027, abs=1e-12)
    # DNS: c1 [0], c2 [1, 1, 0] -> 2/4
    assert s["DNS"]["mean"] == pytest.approx(0.5) and s["DNS"]["n"] == 4


def test_missing_keys_contribute_nothing():
    s = score_cell(make_rows(), "post", "paper")
    # nobody has reasoning / subject_alias / relation_distracted / piqa_distracted
    for name in ("RES", "SAS", "DRS", "DOS"):
        assert s[name] == {"mean": None, "ci95": None, "n": 0}
    # PS prompts only from c1 (2) and c2 (1); c3 has none
    assert s["PS"]["n"] == 3


def test_magnitudes_paper_only():
    s = score_cell(make_rows(), "post", "paper")
    # EM = mean p_right of rewrite: e^-1 (c1: -2/2), e^-3 (c2), e^-1 (c3: -4/4)
    #    = (0.36787944117 + 0.04978706837 + 0.36787944117) / 3 = 0.78554595071 / 3 = 0.26184865024
    # deviations d, d, -2d with d = (e^-1 - e^-3)/3 = 0.10603079093 -> sum sq 6d^2, var 3d^2, sd d*sqrt3, se = d
    # ci = z * d = 0.2078165315
    assert s["EM"]["mean"] == pytest.approx(0.26184865024, abs=1e-10)
    assert s["EM"]["ci95"] == pytest.approx(0.2078165315, abs=1e-9)
    # PM: e^-1 (tie prompt, -2/2), e^-0.5, e^-0.3 = (0.36787944 + 0.60653066 + 0.74081822) / 3 = 0.57174277
    assert s["PM"]["mean"] == pytest.approx(0.57174277, abs=1e-8)
    # NM: e^-0.1, e^-0.1, e^-3, e^-2 = (0.90483742*2 + 0.04978707 + 0.13533528) / 4 = 0.49869930
    assert s["NM"]["mean"] == pytest.approx(0.49869930, abs=1e-8)
    # RM: (e^-0.2 + e^-5)/2 = (0.81873075 + 0.00673795)/2 = 0.41273435
    assert s["RM"]["mean"] == pytest.approx(0.41273435, abs=1e-8)
    # DNM: (e^-1 + e^-0.1 + e^-0.2 + e^-3)/4 = (0.36787944+0.90483742+0.81873075+0.04978707)/4 = 0.53530867
    assert s["DNM"]["mean"] == pytest.approx(0.53530867, abs=1e-8)
    lm = score_cell(make_rows(), "post", "lm-eval")
    assert not {"EM", "PM", "NM", "RM", "DNM"} & set(lm)


def test_avg_s_harmonic_mean():
    # paper: ES 2/3, PS 2/3, NS 1/2, RS 1/2, DNS 1/2 -> reciprocals 1.5+1.5+2+2+2 = 9 -> 5/9 = 0.5555...
    assert score_cell(make_rows(), "post", "paper")["AvgS"] == pytest.approx(5 / 9)
    # lm-eval: ES 1/3 -> 3+1.5+2+2+2 = 10.5 -> 5/10.5 = 0.476190...
    assert score_cell(make_rows(), "post", "lm-eval")["AvgS"] == pytest.approx(5 / 10.5)


def test_avg_s_none_when_a_component_is_missing_and_zero_when_one_is_zero():
    rows = make_rows()
    for row in rows:
        row["post"].pop("relation", None)        # RS has no prompts at all
    s = score_cell(rows, "post", "paper")
    assert s["RS"]["n"] == 0 and s["AvgS"] is None
    assert s["ES"]["mean"] == pytest.approx(2 / 3)    # other metrics unaffected
    # only c2: RS = [0] -> 0 -> Avg.S = 0 (not a division error)
    assert score_cell([make_rows()[1]], "post", "paper")["AvgS"] == 0.0
    # pre phase has only rewrite -> every other Avg.S component missing
    assert score_cell(make_rows(), "pre", "paper")["AvgS"] is None


def test_pre_phase_scored_separately():
    s = score_cell(make_rows(), "pre", "paper")
    # three identical failures -> ES 0, sd 0 -> ci 0
    assert s["ES"] == {"mean": 0.0, "ci95": 0.0, "n": 3}
    assert s["NS"]["n"] == 0


@pytest.mark.parametrize("mutate, needles", [
    (lambda r: r.pop("post"), ["c2", "post"]),
    (lambda r: r["post"]["neighborhood"]["wrong"].pop(), ["c2", "post.neighborhood", "align"]),
    (lambda r: r["post"]["relation"]["right"][0].__setitem__(1, 0), ["c2", "post.relation.right[0]", "n_tokens"]),
    (lambda r: r["post"]["paraphrase"].pop("wrong"), ["c2", "post.paraphrase.wrong"]),
    (lambda r: r["post"]["rewrite"]["right"][0].__setitem__(0, float("nan")), ["c2", "post.rewrite.right[0]"]),
])
def test_malformed_rows_name_cell_case_and_field(mutate, needles):
    rows = make_rows()
    mutate(rows[1])
    with pytest.raises(ValueError) as err:
        score_cell(rows, "post", "paper")
    msg = str(err.value)
    for needle in needles + [CELL]:
        assert needle in msg


def test_unknown_protocol_rejected():
    with pytest.raises(ValueError, match="unknown metric protocol"):
        score_cell(make_rows(), "post", "nope")


def test_protocol_registry_documents_equations():
    assert set(PROTOCOLS) == {"paper", "lm-eval"}
    for pid, proto in PROTOCOLS.items():
        assert proto.id == pid and "success" in proto.doc and "CI95" in proto.doc
    assert METRICS["DNS"] == "neighborhood_distracted" and METRICS["DOS"] == "piqa_distracted"


# ------------------------------------------------------------------------------------------------ aggregate
def test_aggregate_writes_json_and_markdown(tmp_path):
    rome = write_jsonl(tmp_path / "a.jsonl", make_rows("embedded/tiny/rome"))
    sadr = write_jsonl(tmp_path / "b.jsonl", make_rows("embedded/tiny/rome+sadr")[2:])  # only c3
    memit = write_jsonl(tmp_path / "c.jsonl", make_rows("embedded/tiny/memit"))
    out_json, out_md = tmp_path / "out" / "summary.json", tmp_path / "out" / "summary.md"
    summary = aggregate([sadr, rome, memit], out_json, out_md)

    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert data == json.loads(json.dumps(summary))
    assert data["protocol_ids"] == ["paper", "lm-eval"]
    assert sorted(data["cells"]) == ["embedded/tiny/memit", "embedded/tiny/rome", "embedded/tiny/rome+sadr"]
    cell = data["cells"]["embedded/tiny/rome+sadr"]
    assert (cell["model"], cell["editor"], cell["sadr"], cell["n_cases"]) == ("tiny", "rome+sadr", True, 1)
    assert data["cells"]["embedded/tiny/rome"]["sadr"] is False
    assert data["cells"]["embedded/tiny/rome"]["paper"]["ES"]["mean"] == pytest.approx(2 / 3)
    assert data["cells"]["embedded/tiny/rome"]["lm-eval"]["ES"]["mean"] == pytest.approx(1 / 3)
    pre = data["pre"]["embedded/tiny"]
    assert pre["editor"] == "pre (unedited)" and pre["n_cases"] == 3  # union of c1..c3 over the three cells
    assert pre["paper"]["ES"] == {"mean": 0.0, "ci95": 0.0, "n": 3}

    md = out_md.read_text(encoding="utf-8")
    assert md.endswith(format_table(summary))
    # paper ES 2/3 with ci z/3 -> "66.67(65.33)"; NS 0.5 with 0.5657928670 -> "50.00(56.58)"; Avg.S 5/9 -> "55.56"
    # EM 0.26184865 with 0.20781653 -> "26.18(20.78)"; lm-eval ES "33.33(65.33)", Avg.S 5/10.5 -> "47.62"
    for text in ("66.67(65.33)", "50.00(56.58)", "55.56", "26.18(20.78)", "33.33(65.33)", "47.62",
                 "0.00(0.00)", "### embedded/tiny — protocol `paper`", "### embedded/tiny — protocol `lm-eval`"):
        assert text in md
    paper_table = md.split("protocol `paper`")[1].split("###")[0]
    lines = [ln for ln in paper_table.splitlines() if ln.startswith("| ")]
    assert lines[0].split(" | ")[1:4] == ["ES", "PS", "NS"] and "EM" in lines[0] and "DNM" in lines[0]
    editors = [ln.split(" | ")[0].lstrip("| ") for ln in lines[1:]]
    assert editors == ["pre (unedited)", "memit", "rome", "rome+sadr"]
    rome_line = lines[3]
    assert "66.67(65.33) | 66.67(65.33) | 50.00(56.58) | 50.00(98.00) | 50.00(56.58) | – | 100.00 | – | – | – | 55.56" in rome_line
    lm_table = md.split("protocol `lm-eval`")[1]
    assert "EM" not in lm_table.splitlines()[2]
    # deterministic: same inputs in another order -> byte-identical files
    before = (out_json.read_bytes(), out_md.read_bytes())
    aggregate([memit, rome, sadr], out_json, out_md)
    assert (out_json.read_bytes(), out_md.read_bytes()) == before


def test_aggregate_rejects_file_mixing_cells(tmp_path):
    rows = make_rows()
    rows[2]["cell"] = "embedded/tiny/memit"
    bad = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ValueError) as err:
        aggregate([bad], tmp_path / "s.json", tmp_path / "s.md")
    assert "mixed.jsonl" in str(err.value)
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "s.md").exists()


def test_aggregate_rejects_conflicting_pre_and_duplicate_cases(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_rows("embedded/tiny/rome"))
    other = make_rows("embedded/tiny/memit")
    other[0]["pre"]["rewrite"]["right"][0][0] = -0.5
    b = write_jsonl(tmp_path / "b.jsonl", other)
    with pytest.raises(ValueError, match="pre-edit"):
        aggregate([a, b], tmp_path / "s.json", tmp_path / "s.md")
    dup = write_jsonl(tmp_path / "dup.jsonl", make_rows() + make_rows()[:1])
    with pytest.raises(ValueError, match="c1"):
        aggregate([dup], tmp_path / "s.json", tmp_path / "s.md")


def test_modules_do_not_import_torch():
    code = ("import sys, evaluators.metrics, evaluators.aggregate; "
            "bad = [m for m in ('torch', 'transformers', 'lm_eval', 'scipy') if m in sys.modules]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr


def test_pair_validation_fast_path_accepts_and_rejects_exactly_like_the_checked_path():
    from evaluators.metrics import _pairs, _pairs_checked

    row = {"cell": "c", "case_id": "cf-x"}
    nan, inf = float("nan"), float("inf")
    inputs = [[], [[-1.5, 2]], [[-1.5, 2], [0.0, 1]], [[-1, 2]], [[-1.5, 2.0]], [[-1.5, 2.5]], [[-1.5, 0]],
              [[-1.5, -3]], [[nan, 1]], [[-inf, 1]], [[True, 1]], [[-1.5, True]], [[-1.5, "2"]], [["x", 2]],
              [(-1.5, 2)], [[-1.5, 2, 3]], [[-1.5]], [None], "pairs", None, ((-1.5, 2),), [[-1.5, 2], [nan, 2]],
              [[-1.5, 2], [-2.0, 0]], [[-1e308, 10**6]]]

    def outcome(fn, value):
        try:
            return ("ok", fn(row, "k.right", copy.deepcopy(value)))
        except ValueError as exc:
            return ("error", str(exc))

    for value in inputs:
        fast, checked = outcome(_pairs, value), outcome(_pairs_checked, value)
        assert repr(fast) == repr(checked), value  # repr: nan-safe comparison
    assert outcome(_pairs, [[-1.5, 2]]) == ("ok", ([-1.5], [2.0]))
    assert outcome(_pairs, [[nan, 1]])[0] == "error" and "k.right[0]" in outcome(_pairs, [[nan, 1]])[1]
