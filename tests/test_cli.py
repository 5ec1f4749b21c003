"""The `driftbench` command line: help texts, and the whole pipeline in a temporary project folder with the tiny
random Llama standing in for the embedded model (the CLI resolves every path relative to its working folder).

The cheap stages run through the installed console script in a subprocess; the three model stages (prepare,
evaluate pre, run-cell) run `driftbench.cli.main` in this process, in the same working folder, which spares three
~8 s imports of torch/transformers/lm-eval (the kill -9 test of tests/test_harness.py covers a model stage in a
subprocess)."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from driftbench.cli import main
from basis.io import atomic_write_jsonl

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"


def _driftbench() -> list[str]:
    """The installed console script (what dvc.yaml calls), else the module."""
    exe = Path(sys.executable).with_name("driftbench")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "driftbench.cli"]


def run_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DRIFTBENCH_DATA_MIRROR"}  # params.yaml names the mirror
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([*_driftbench(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, f"driftbench {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


# ------------------------------------------------------------------------------------------------------ help
HELP = {
    (): ["dataset", "model", "evaluate", "run-cell", "aggregate", "editors", "pipeline order", "resumes"],
    ("dataset",): ["build", "subset"],
    ("dataset", "build"): ["sha256", "cases.jsonl"],
    ("dataset", "subset"): ["stratified", "--profile"],
    ("model",): ["prepare"],
    ("model", "prepare"): ["fp32 safetensors", "--profile", "--model"],
    ("evaluate",): ["pre"],
    ("evaluate", "pre"): ["unedited model", "--limit", "--no-progress"],
    ("run-cell",): ["--cell", "+sadr", "--verify-restore", "--limit"],
    ("aggregate",): ["95% CIs", "--out-json", "--out-md"],
    ("editors",): ["list available editors"],
}


@pytest.mark.parametrize("cmd", list(HELP), ids=lambda c: " ".join(c) or "driftbench")
def test_help(cmd, tmp_path):
    res = run_cli(*cmd, "--help", cwd=tmp_path)  # no params.yaml needed for --help
    text = " ".join(res.stdout.split())
    assert res.stdout.startswith("usage: driftbench")
    for word in HELP[cmd]:
        assert word in text, f"`driftbench {' '.join(cmd)} --help` does not mention {word!r}:\n{res.stdout}"


def _commands(parser, prefix=()):
    """``(path, help line)`` of every subcommand of ``parser``, recursively."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sp in action.choices.items():
                yield (*prefix, name), helps.get(name)
                yield from _commands(sp, (*prefix, name))


def test_every_subcommand_help_says_what_it_does(tmp_path, monkeypatch, capsys):
    """Whatever subcommands exist (new ones included): `--help` exits 0 and states the command's purpose. In this
    process (`main`, the console script's function; test_help runs the script itself), one parser per command."""
    from driftbench.cli import build_parser

    monkeypatch.chdir(tmp_path)  # no params.yaml here: --help must not need one
    commands = list(_commands(build_parser()))
    assert {c for c, _ in commands} >= set(HELP) - {()}
    for cmd, help_line in commands:
        assert help_line, f"`driftbench {' '.join(cmd)}` has no help line"
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: driftbench " + " ".join(cmd))
        purpose = " ".join(help_line.replace("%%", "%").split())
        assert purpose in " ".join(out.split()), \
            f"`driftbench {' '.join(cmd)} --help` does not say what it does ({purpose!r}):\n{out}"


def test_module_entry_point_and_missing_params(tmp_path):
    res = subprocess.run([sys.executable, "-m", "driftbench.cli", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0 and "run-cell" in res.stdout
    res = run_cli("dataset", "build", cwd=tmp_path, check=False)
    assert res.returncode != 0 and "params.yaml not found" in res.stderr


# -------------------------------------------------------------------------------------------------- pipeline
def test_pipeline_in_a_temporary_project(tmp_path, mirror, tiny_model_dirs, monkeypatch, capsys):
    real = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = {
        "data": dict(real["data"], mirror=str(mirror), out="data/paper-v1"),
        "profiles": {"embedded": {
            # seed 33 draws four cases with short probes (a quarter of the tiny model's work for seed 1234)
            "device": "cpu", "subset_size": 4, "seed": 33, "batch_size": 32,
            "models": {MODEL: {"ref": str(tiny_model_dirs["llama"]), "dtype": "float32"}},
            "cells": ["none"],
            # an editor with hparams but no cell: `driftbench stats` still prepares its statistics
            "hparams": {MODEL: {"memit": {"layers": [0, 1], "stats_tokens": 400, "stats_max_len": 64}}},
        }},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = run_cli("dataset", "build", cwd=tmp_path).stdout
    card = json.loads((tmp_path / "data/paper-v1/card.json").read_text())
    assert card["n_cases"] == 1678 and card["content_id"] in out

    # stages refuse to run out of order, with a hint naming the missing stage
    res = run_cli("evaluate", "pre", "--no-progress", cwd=tmp_path, check=False)
    assert res.returncode != 0 and "driftbench dataset subset -p embedded" in res.stderr

    run_cli("dataset", "subset", cwd=tmp_path)
    subset = json.loads((tmp_path / "data/subsets/embedded.json").read_text())
    assert subset["size"] == 4 and subset["seed"] == 33 and len(set(subset["case_ids"])) == 4

    res = run_cli("aggregate", cwd=tmp_path, check=False)
    assert res.returncode != 0 and "driftbench run-cell" in res.stderr

    editors = run_cli("editors", cwd=tmp_path).stdout.split()
    assert "none" in editors and editors == sorted(editors)

    monkeypatch.chdir(tmp_path)
    assert main(["model", "prepare"]) == 0  # the tiny model converts like the embedded one: models/<name>
    prov = json.loads((tmp_path / "models" / MODEL / "driftbench_model.json").read_text())
    assert prov["source"] == "local" and prov["model_type"] == "llama"

    assert main(["stats", "--no-progress"]) == 0
    stats = sorted(p.name.split(".mom2.")[0] for p in (tmp_path / "stats" / MODEL).glob("*.npz"))
    assert stats == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]

    assert main(["evaluate", "pre", "--no-progress"]) == 0  # loads models/<name>, the prepared copy
    pre_rows = [json.loads(x) for x in (tmp_path / f"results/embedded/{MODEL}/pre.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in pre_rows] == subset["case_ids"]

    capsys.readouterr()
    assert main(["run-cell", "-c", "none", "--verify-restore", "--no-progress"]) == 0
    assert f"embedded/{MODEL}/none: 4 cases" in capsys.readouterr().out
    cell_file = tmp_path / f"results/embedded/{MODEL}/cells/none.jsonl"
    rows = [json.loads(x) for x in cell_file.read_text().splitlines()]
    assert [r["case_id"] for r in rows] == subset["case_ids"]
    assert all(r["cell"] == f"embedded/{MODEL}/none" and r["post"] == r["pre"] for r in rows)
    assert [r["pre"] for r in rows] == [r["scores"] for r in pre_rows]

    out = run_cli("aggregate", cwd=tmp_path).stdout
    summary = json.loads((tmp_path / "results/summary.json").read_text())
    cell = summary["cells"][f"embedded/{MODEL}/none"]
    assert cell["n_cases"] == 4 and cell["editor"] == "none" and cell["sadr"] is False
    es = cell["paper"]["ES"]
    assert es["n"] == 4 and 0.0 <= es["mean"] <= 1.0
    assert cell["paper"]["ES"] == summary["pre"][f"embedded/{MODEL}"]["paper"]["ES"]  # none editor: post == pre
    assert f"### embedded/{MODEL} — protocol `paper`" in out
    assert "| editor | ES | PS |" in out and "| none |" in out and "| pre (unedited) |" in out
    md = (tmp_path / "results/summary.md").read_text()
    assert out.split("\nwrote ")[0].strip() in md

    # issue 11 item 2: a smoke run (--limit) writes under smoke/ and never touches the full run's files
    full_pre, full_cell = (tmp_path / f"results/embedded/{MODEL}/pre.jsonl").read_bytes(), cell_file.read_bytes()
    assert main(["evaluate", "pre", "--limit", "1", "--no-progress"]) == 0
    assert main(["run-cell", "-c", "none", "--limit", "1", "--no-progress"]) == 0
    assert (tmp_path / f"results/embedded/{MODEL}/pre.jsonl").read_bytes() == full_pre
    assert cell_file.read_bytes() == full_cell
    smoke = [json.loads(x) for x in (tmp_path / f"results/embedded/{MODEL}/smoke/cells/none.jsonl").read_text()
             .splitlines()]
    assert [r["case_id"] for r in smoke] == subset["case_ids"][:1] and smoke[0] == rows[0]  # reused, not recomputed
    # ... and aggregate refuses a cell file that does not hold the profile's cases
    atomic_write_jsonl(cell_file, rows[:1])
    res = run_cli("aggregate", cwd=tmp_path, check=False)
    assert res.returncode == 2 and "has 1 cases but the profile's subset has 4" in res.stderr
    assert "Traceback" not in res.stderr
    cell_file.write_bytes(full_cell)

    # issue 11 item 9: the pipeline's own rows (with post.fluency and post.me_ppl) pack and validate
    capsys.readouterr()
    assert main(["submit", "-c", "none", "--submitter", "CI"]) == 0
    bundle = tmp_path / "leaderboard" / "submissions" / f"embedded__{MODEL}__none"
    packed = [json.loads(x) for x in (bundle / "cases.jsonl").read_text().splitlines()]
    assert any({"fluency", "me_ppl"} <= set(r["post"]) for r in packed) and packed == rows
    assert main(["validate", str(bundle)]) == 0 and "OK" in capsys.readouterr().out

    # issue 11 item 10: every error a user can cause is one line, exit status 2, before any model loads
    def fails(*args, params_edit=None, match):
        if params_edit is not None:
            bad = copy.deepcopy(params)
            params_edit(bad["profiles"]["embedded"])
            (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
            args = ("--params", "bad.yaml") + args
        res = run_cli(*args, cwd=tmp_path, check=False)
        assert res.returncode == 2, res.stderr
        assert re.search(match, res.stderr), res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) <= 2 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
        assert "Loading weights" not in res.stderr  # refused before the model was loaded
        return res

    fails("run-cell", "-c", "nosuch", match="unknown editor 'nosuch'")
    fails("run-cell", "-c", "none+sadr", match="has no SADR, steps-matched, sequential or batch variant")
    fails("run-cell", "-c", "../../etc/x", match="is not a cell name")
    fails("run-cell", "-c", "rome.batch4", match="cannot edit a batch of cases at once")  # ROME has no batch mode
    fails("run-cell", "-c", "none", "--shard", "3/2", match="expected I/N with 1 <= I <= N")
    fails("run-cell", "-c", "memit", "--no-progress", params_edit=lambda p: p["hparams"][MODEL]["memit"].update(
        layers="1"), match="'layers' must be a list")
    fails("run-cell", "-c", "memit", params_edit=lambda p: p["hparams"][MODEL]["memit"].update(layrs=[1]),
          match="unknown MEMIT hyper-parameter")
    fails("dataset", "subset", params_edit=lambda p: p.update(subset_size="4"), match="subset_size must be an integer")
    fails("dataset", "subset", params_edit=lambda p: p.update(subset_size=-1), match="subset_size must be an integer")
    (tmp_path / "broken.yaml").write_text("data: {out: x\nprofiles: [")
    fails("--params", "broken.yaml", "aggregate", match=r"broken.yaml:\d+: not valid YAML")
    nomirror = dict(params, data=dict(params["data"], mirror=str(tmp_path / "no-such-mirror")))
    (tmp_path / "nomirror.yaml").write_text(yaml.safe_dump(nomirror, sort_keys=False))
    fails("--params", "nomirror.yaml", "dataset", "build", match="no-such-mirror .*does not exist")
    cases_file = tmp_path / "data/paper-v1/cases.jsonl"
    cases_bytes = cases_file.read_bytes()
    lines = cases_bytes.split(b"\n")
    cases_file.write_bytes(b"\n".join(lines[:2] + [lines[2].replace(b'{"', b'{"case_id":"x","', 1)] + lines[3:]))
    fails("run-cell", "-c", "none", match=r"cases.jsonl:3: not valid JSON \(duplicate key 'case_id'\)")
    cases_file.write_bytes(b"\n".join(lines[:1] + [b'{"case_id": "cf-1"}'] + lines[2:]))
    fails("dataset", "subset", match=r"cases.jsonl:2 \(cf-1\): field 'source'")
    cases_file.write_bytes(cases_bytes)
    good = cell_file.read_bytes()
    cell_file.write_bytes(good[: len(good) // 2] + b"garbage\n" + good[len(good) // 2:])
    fails("aggregate", match=r"cells/none.jsonl:\d+: not valid JSON")
    cell_file.write_bytes(good)
    res = run_cli("--debug", "run-cell", "-c", "nosuch", cwd=tmp_path, check=False)
    assert res.returncode != 0 and "Traceback" in res.stderr  # --debug shows where it came from

    shutil.rmtree(tmp_path / "models")  # keep the temp folder small
    assert not list(tmp_path.rglob("*.tmp"))
