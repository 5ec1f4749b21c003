"""Hyper-parameter sweeps on held-out cases, the drift summary, and drift in the summary table."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from data_pipeline.schema import Case, DatasetError
from data_pipeline.subset import held_out, stratified_subset
from driftbench.cli import main
from evaluators.aggregate import format_table
from evaluators.metrics import drift_summary, mean_ci
from evaluators.sweep import config_name, parse_vary

from test_cli import ROOT, run_cli


def _cases(n_cf: int, n_wd: int) -> list[Case]:
    mk = lambda src, i: Case(case_id=f"{src[:2]}-{i:03d}", source=src, subject=f"S{i}", prompt=f"S{i} is",
                             target_true="a", target_new="b")
    return [mk("counterfact", i) for i in range(n_cf)] + [mk("wikidata", i) for i in range(n_wd)]


def test_parse_vary_is_the_cartesian_product():
    grid = parse_vary(["layer=1,3", "sadr_gamma=0.005,0.01"])
    assert grid == [{"layer": 1, "sadr_gamma": 0.005}, {"layer": 1, "sadr_gamma": 0.01},
                    {"layer": 3, "sadr_gamma": 0.005}, {"layer": 3, "sadr_gamma": 0.01}]
    assert isinstance(grid[0]["layer"], int) and isinstance(grid[0]["sadr_gamma"], float)
    assert parse_vary([]) == [{}]
    assert parse_vary(["layers=[1,2,3],[2, 3, 4]"]) == [{"layers": [1, 2, 3]}, {"layers": [2, 3, 4]}]  # list values
    for bad in ["layer", "=1", "layer="]:
        with pytest.raises(ValueError, match="name=v1,v2"):
            parse_vary([bad])
    assert config_name("rome+sadr", {"sadr_steps": 40, "layer": 4}) == "rome+sadr@layer=4,sadr_steps=40"
    assert config_name("rome", {}) == "rome"
    assert config_name("memit", {"layers": [1, 2, 3]}) == "memit@layers=1-2-3"


def test_held_out_is_disjoint_balanced_and_seeded():
    cases = _cases(20, 20)
    reported = stratified_subset(cases, 10, seed=1234)
    ho = held_out(cases, 8, seed=7, exclude=reported)
    assert len(ho) == 8 and len(set(ho)) == 8 and not set(ho) & set(reported)
    assert sum(i.startswith("co") for i in ho) == 4
    assert ho == held_out(cases, 8, seed=7, exclude=reported)
    assert ho != held_out(cases, 8, seed=8, exclude=reported)
    with pytest.raises(DatasetError, match="not enough counterfact"):
        held_out(cases, 32, seed=7, exclude=reported)


def _row(cid, drift):
    return {"case_id": cid, "editor": {"name": "rome", "sadr": False, "diagnostics": {"attn_drift": drift}}}


def test_drift_summary_pools_prompts_of_all_cases():
    rows = [_row("a", {"neighborhood_distracted": [0.5, 1.5], "relation": [0.1]}),
            _row("b", {"neighborhood_distracted": [1.0], "relation": []})]
    d = drift_summary(rows)
    assert d["drift_DNS"]["mean"] == pytest.approx(1.0) and d["drift_DNS"]["n"] == 3
    assert d["drift_DNS"]["ci95"] == pytest.approx(1.959963984540054 * 0.5 / np.sqrt(3))
    assert d["drift_RS"] == {"mean": 0.1, "ci95": None, "n": 1}
    assert drift_summary([{"case_id": "n", "editor": {"name": "none", "diagnostics": {}}}]) == {}
    with pytest.raises(ValueError, match="case_id 'x'.*attn_drift.relation"):
        drift_summary([_row("x", {"relation": ["high"]})])


def test_summary_table_shows_drift_next_to_specificity():
    m = {"mean": 0.5, "ci95": 0.1, "n": 4}
    scores = {k: m for k in ("ES", "PS", "NS", "RS", "DNS", "RES", "OS", "DOS")} | {"AvgS": 0.5}
    summary = {"protocol_ids": ["lm-eval"], "pre": {}, "cells": {
        "embedded/m/rome": {"profile": "embedded", "model": "m", "editor": "rome", "base_editor": "rome", "sadr": False, "n_cases": 2,
                            "lm-eval": scores, "drift": {"drift_DNS": mean_ci(np.array([0.25, 0.75])),
                                                         "drift_RS": {"mean": None, "ci95": None, "n": 0}}},
        "embedded/m/none": {"profile": "embedded", "model": "m", "editor": "none", "base_editor": "none", "sadr": False, "n_cases": 2,
                            "lm-eval": scores, "drift": {}}}}
    table = format_table(summary)
    header = next(line for line in table.splitlines() if line.startswith("| editor"))
    assert header.split("|")[-4:-1] == [" drift DNS ", " drift RS ", " cases "]
    rome = next(line for line in table.splitlines() if line.startswith("| rome "))
    assert rome.split(" | ")[-3:] == ["0.500(0.490)", "–", "2 |"]
    none = next(line for line in table.splitlines() if line.startswith("| none "))
    assert none.split(" | ")[-3:] == ["–", "–", "2 |"]


def test_sweep_on_held_out_cases_with_a_tiny_model(tmp_path, mirror, tiny_model_dirs, monkeypatch, capsys):
    real = yaml.safe_load((ROOT / "params.yaml").read_text())
    rome = {"layer": 1, "v_num_grad_steps": 6, "template_lengths": [[5, 2]], "stats_tokens": 2000,
            "stats_max_len": 64}
    params = {"data": dict(real["data"], mirror=str(mirror), out="data/paper-v1"),
              "profiles": {"embedded": {"device": "cpu", "subset_size": 2, "seed": 33, "batch_size": 32,
                                        "models": {"tiny": {"ref": str(tiny_model_dirs["llama"]), "dtype": "float32"}},
                                        "cells": ["none", "rome"], "hparams": {"tiny": {"rome": rome}}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_cli("dataset", "build", cwd=tmp_path)
    run_cli("dataset", "subset", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "-c", "rome", "--vary", "layer=0,1", "--cases", "2", "--seed", "5", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    sweep = tmp_path / "results/embedded/tiny/sweep/held-out-2-s5"  # not the default set: a folder of its own
    summary = json.loads((sweep / "sweep.json").read_text())
    reported = json.loads((tmp_path / "data/subsets/embedded.json").read_text())["case_ids"]
    assert summary["n_cases"] == 2 and not set(summary["case_ids"]) & set(reported)
    assert list(summary["configs"]) == ["(unedited)", "rome@layer=0", "rome@layer=1"]
    for layer in (0, 1):
        rows = [json.loads(x) for x in (sweep / f"rome@layer={layer}.jsonl").read_text().splitlines()]
        assert [r["case_id"] for r in rows] == summary["case_ids"]
        assert {r["editor"]["diagnostics"]["layer"] for r in rows} == {layer}
        assert {r["editor"]["diagnostics"]["steps"] for r in rows} <= set(range(1, 7))
        assert set(rows[0]["editor"]["diagnostics"]["attn_drift"]) >= {"neighborhood_distracted"}
        cfg = summary["configs"][f"rome@layer={layer}"]
        assert cfg["n_cases"] == 2 and cfg["edit_s"] > 0 and 0 <= cfg["scores"]["ES"]["mean"] <= 1
    assert "| `rome@layer=1` |" in out and (sweep / "sweep.md").read_text() in out
    assert len(list((sweep / "stats").glob("*.npz"))) == 2 and not (tmp_path / "stats").exists()
    # resumable: a rerun recomputes nothing and rewrites identical rows
    before = {p.name: p.read_bytes() for p in sweep.glob("*.jsonl") if "timings" not in p.name}
    assert main(argv) == 0
    assert {p.name: p.read_bytes() for p in sweep.glob("*.jsonl") if "timings" not in p.name} == before
    assert all(len(p.read_text().splitlines()) == 2 for p in sweep.glob("*.timings.jsonl"))
    # another held-out set in the same folder would replace its pre rows: refused before anything is written
    assert main(argv[:-5] + ["--cases", "1", "--seed", "5", "--out", str(sweep), "--no-progress"]) == 2
    assert "holds 2 other held-out cases than the 1 asked for" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in sweep.glob("*.jsonl") if "timings" not in p.name} == before


def test_code_identity_follows_the_code_and_plugins(tmp_path, monkeypatch):
    import importlib

    from editors.base import as_v2
    from evaluators.harness import CELL_CODE, code_identity

    base = code_identity(CELL_CODE)
    assert base == code_identity(CELL_CODE) and len(base) == 16
    plugin = tmp_path / "my_plugin_editor.py"
    plugin.write_text("class MyEdit:\n    name = 'myedit'\n    def edit(self, model, tok, case, hparams): ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("my_plugin_editor")
    files = tuple(as_v2(mod.MyEdit()).code_files())
    assert [f.name for f in files] == ["my_plugin_editor.py"]
    with_plugin = code_identity(CELL_CODE, files)
    assert with_plugin != base  # a plugin outside the repository is part of the identity
    plugin.write_text("class MyEdit:\n    name = 'myedit'  # changed\n    def edit(self, m, t, c, h): ...\n")
    assert code_identity(CELL_CODE, files) != with_plugin
    assert code_identity(("evaluators/probes.py",)) != code_identity(("evaluators/scoring.py",))
