"""Context-template seeds: the cell-name grammar (``rome+sadr.s2``), the profile check that every editor cell runs
once per seed, and the aggregate's mean ± sd [min–max] over seeds, checked by hand against the per-seed cells."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from basis.errors import UserError

from basis.cells import parse_cell, seeded_cells
from basis.params import Profile, check_profile_cells
from evaluators.aggregate import aggregate, parse_cell_id, seed_groups
from leaderboard.synthetic import write_result_file

ROOT = Path(__file__).resolve().parents[1]


def test_cell_names_with_seeds():
    c = parse_cell("rome+sadr.s2")
    assert (c.editor, c.sadr, c.seed, c.config, str(c)) == ("rome", True, 2, "rome+sadr", "rome+sadr.s2")
    c = parse_cell("rome")
    assert (c.editor, c.sadr, c.seed) == ("rome", False, None)
    info = parse_cell_id("embedded/smollm2-135m/rome+sadr.s12")
    assert (info["config"], info["seed"], info["sadr"], info["base_editor"]) == ("rome+sadr", 12, True, "rome")
    assert parse_cell_id("paper/org/model/memit")["seed"] is None
    assert seeded_cells(["none", "rome", "rome+sadr"], [0, 4]) == ["none", "rome", "rome.s4", "rome+sadr",
                                                                   "rome+sadr.s4"]


def test_profile_cells_must_match_seeds():
    ok = {"seeds": [0, 1, 2], "cells": ["none", "rome", "rome.s1", "rome.s2"]}
    check_profile_cells(Profile("p", ok))
    check_profile_cells(Profile("p", {"cells": ["none", "rome"]}))  # no seeds: nothing to check
    with pytest.raises(UserError, match=r"expected \['none', 'rome', 'rome.s1', 'rome.s2'\]"):
        check_profile_cells(Profile("p", {**ok, "cells": ["none", "rome", "rome.s1"]}))
    for bad in ([1, 2], [0, 0], [], "3", [0, -1], [0, True]):
        with pytest.raises(UserError, match="seeds must be a list of distinct non-negative integers"):
            check_profile_cells(Profile("p", {**ok, "seeds": bad}))


def test_the_default_profile_runs_every_editor_cell_for_three_seeds_or_more():
    import yaml

    from basis.params import get_profile

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    prof = get_profile(params, "embedded")  # runs check_profile_cells
    assert len(prof.raw["seeds"]) >= 3
    assert {parse_cell(c).seed or 0 for c in prof.raw["cells"] if parse_cell(c).editor != "none"} == set(prof.raw["seeds"])


def test_aggregate_reports_the_spread_over_seeds(tmp_path):
    d = tmp_path / "results"
    files = [write_result_file(d / "none.jsonl", "embedded/m/none", 12),
             write_result_file(d / "rome.jsonl", "embedded/m/rome", 12, damage=1.0),
             write_result_file(d / "rome.s1.jsonl", "embedded/m/rome.s1", 12, damage=1.0),
             write_result_file(d / "rome.s2.jsonl", "embedded/m/rome.s2", 12, damage=0.3)]
    summary = aggregate(files, tmp_path / "s.json", tmp_path / "s.md")
    assert list(summary["seeds"]) == ["embedded/m/rome"]  # none has one seed: no group
    g = summary["seeds"]["embedded/m/rome"]
    assert g["seeds"] == [0, 1, 2] and g["cells"] == ["embedded/m/rome", "embedded/m/rome.s1", "embedded/m/rome.s2"]
    for metric in ("ES", "NS", "DNS"):
        per = [summary["cells"][c]["paper"][metric]["mean"] for c in g["cells"]]
        s = g["paper"][metric]
        assert s["per_seed"] == per and s["min"] == min(per) and s["max"] == max(per)
        assert math.isclose(s["mean"], statistics.fmean(per)) and math.isclose(s["sd"], statistics.stdev(per))
    md = (tmp_path / "s.md").read_text()
    assert "Across context-template seeds — protocol `paper`" in md and "| embedded/m/rome | 0,1,2 |" in md
    # seeds that cover different case sets are an error, not a silent mean
    short = write_result_file(d / "rome.s3.jsonl", "embedded/m/rome.s3", 6, damage=1.0)
    with pytest.raises(ValueError, match="different numbers of cases"):
        aggregate(files + [short], tmp_path / "s.json", tmp_path / "s.md")
    assert seed_groups({}, ["paper"]) == {}


def test_cell_spec_names_its_seed():
    from evaluators.harness import CellSpec

    assert CellSpec("embedded", "m", "rome", True, {"template_seed": 2}, seed=2).cell_id == "embedded/m/rome+sadr.s2"
    assert CellSpec("embedded", "m", "rome").cell_id == "embedded/m/rome"


def test_site_shows_the_seed_spread(tmp_path):
    from leaderboard.site import build_site

    d = tmp_path / "results"
    files = [write_result_file(d / "none.jsonl", "embedded/m/none", 8),
             write_result_file(d / "rome.jsonl", "embedded/m/rome", 8, damage=1.0),
             write_result_file(d / "rome.s1.jsonl", "embedded/m/rome.s1", 8, damage=0.4)]
    summary = aggregate(files, tmp_path / "s.json", tmp_path / "s.md")
    build_site(files, tmp_path / "site")
    html = (tmp_path / "site" / "index.html").read_text()
    g = summary["seeds"]["embedded/m/rome"]["paper"]["DNS"]
    assert "Across context-template seeds" in html and "embedded/m/rome" in html
    assert f"{100 * g['mean']:.1f} ± {100 * g['sd']:.1f} [{100 * g['min']:.1f}–{100 * g['max']:.1f}]" in html
