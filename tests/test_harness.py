"""The resumable per-cell harness (evaluators/harness.py) on the tiny random Llama and real paper-v1 cases.

The cases are the first 6 of the seeded stratified subset, trimmed to at most one probe per family and no PIQA
item, so that every forward pass of the tiny model stays short (the harness logic does not depend on how many
probes a case has).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from basis.errors import UserError
from basis.io import atomic_write_jsonl, dumps_line, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
N_CASES = 6
PROFILE, MODEL = "embedded", "tiny-llama"

DRIVER = '''
"""Test driver: one model, run_pre then run_cell(none), optionally slowed down per case."""
import os, sys, time
from pathlib import Path

import torch

import evaluators.scoring as scoring
from data_pipeline.dataset import load_cases
from evaluators.harness import CellSpec, run_cell, run_pre
from model_layer.loading import load_model

model_dir, cases_path, out_dir, content_id = sys.argv[1:5]
torch.set_num_threads(int(os.environ["TEST_THREADS"]))
delay = float(os.environ.get("TEST_DELAY_S", "0"))
if delay:
    original = scoring.ProbeScorer.score_case

    def slow_score_case(self, case, *args, **kw):
        time.sleep(delay)
        return original(self, case, *args, **kw)

    scoring.ProbeScorer.score_case = slow_score_case
cases = load_cases(cases_path)
model, tok = load_model(model_dir)
out = Path(out_dir)
shard = tuple(int(x) for x in os.environ.get("TEST_SHARD", "0/1").split("/"))
run_pre(model, tok, "%(model)s", content_id, cases, out / "pre.jsonl", progress=False, shard=shard)
while not (out / "pre.jsonl").exists():  # the other shard is still scoring its half of the pre-edit rows
    time.sleep(0.05)
run_cell(model, tok, CellSpec("%(profile)s", "%(model)s", "none"), content_id, cases, out / "pre.jsonl",
         out / "none.jsonl", progress=False, shard=shard)
''' % {"model": MODEL, "profile": PROFILE}


def _trim(case):
    return dataclasses.replace(case, paraphrase=case.paraphrase[:1], subject_alias=case.subject_alias[:1],
                               reasoning=case.reasoning[:1], neighborhood=case.neighborhood[:1],
                               relation=case.relation[:1], generation=(), piqa=None)


@pytest.fixture(scope="module")
def data(tmp_path_factory, mirror):
    from data_pipeline.dataset import build_dataset, load_cases
    from data_pipeline.subset import stratified_subset

    d = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]
    out = tmp_path_factory.mktemp("paper-v1")
    card = build_dataset(mirror, d["release"], d["release_sha256"], d["version"], out)
    by_id = {c.case_id: c for c in load_cases(out / "cases.jsonl")}
    cases = [_trim(by_id[i]) for i in stratified_subset(list(by_id.values()), N_CASES, seed=1234)]
    assert {c.source for c in cases} == {"counterfact", "wikidata"}
    cases_path = out / "subset_cases.jsonl"
    cases_path.write_text("".join(dumps_line(c.to_json()) + "\n" for c in cases), encoding="utf-8")
    assert load_cases(cases_path) == cases
    return SimpleNamespace(cases=cases, cases_path=cases_path, content_id=card["content_id"])


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def tiny(model_dir):
    from model_layer.loading import load_model

    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny, data):
    """One uninterrupted run: pre-edit rows and the `none` cell, every case."""
    from evaluators.harness import CellSpec, run_cell, run_pre
    from model_layer.checksum import param_checksum

    model, tok = tiny
    out = tmp_path_factory.mktemp("reference")
    before = param_checksum(model)
    pre = run_pre(model, tok, MODEL, data.content_id, data.cases, out / "pre.jsonl", progress=False)
    cell = run_cell(model, tok, CellSpec(PROFILE, MODEL, "none"), data.content_id, data.cases, out / "pre.jsonl",
                    out / "none.jsonl", progress=False)
    assert param_checksum(model) == before
    return SimpleNamespace(dir=out, pre=pre, cell=cell, pre_bytes=(out / "pre.jsonl").read_bytes(),
                           cell_bytes=(out / "none.jsonl").read_bytes())


@pytest.fixture
def counters(monkeypatch):
    """Count editor.edit and ProbeScorer.score_case calls made in this process."""
    import editors.base
    import editors.registry
    import evaluators.scoring

    calls = {"edit": 0, "score": 0}
    original_score = evaluators.scoring.ProbeScorer.score_case

    def counting_score(self, case, *args, **kw):
        calls["score"] += 1
        return original_score(self, case, *args, **kw)

    import editors.none

    class CountingNoEdit(editors.none.NoEdit):
        def apply(self, model, tok, cases, hparams, ctx):
            calls["edit"] += len(cases)
            return super().apply(model, tok, cases, hparams, ctx)

        def code_files(self):  # computes exactly what NoEdit computes: rows of the plain editor stay reusable
            return editors.none.NoEdit().code_files()

    monkeypatch.setattr(evaluators.scoring.ProbeScorer, "score_case", counting_score)
    monkeypatch.setitem(editors.registry._BUILTINS, "none", CountingNoEdit)
    return calls


def _copy_reference(reference, dst: Path, cell: bool = True) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(reference.dir / "pre.jsonl", dst / "pre.jsonl")
    if cell:
        shutil.copy(reference.dir / "none.jsonl", dst / "none.jsonl")
    return dst


def _without_fp(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "fingerprint"}


# ---------------------------------------------------------------------------------------------- the none cell
def test_none_cell_rows(reference, data):
    ids = [c.case_id for c in data.cases]
    assert [r["case_id"] for r in reference.pre] == ids
    assert [r["case_id"] for r in reference.cell] == ids  # subset order
    for pre, row, case in zip(reference.pre, reference.cell, data.cases):
        assert row["cell"] == f"{PROFILE}/{MODEL}/none"
        assert row["source"] == case.source
        assert row["post"] == row["pre"] == pre["scores"]  # exactly: the none editor changes nothing
        assert row["editor"] == {"name": "none", "sadr": False, "diagnostics": {}}
        assert row["env"]["device"] == "cpu" and row["env"]["dtype"] == "float32"
        assert set(row["post"]) >= {"rewrite"}
        assert all(len(v["right"]) == len(v["wrong"]) >= 1 for v in row["post"].values())
    assert len({r["fingerprint"] for r in reference.cell}) == 1
    # the files are the returned rows, one canonical line each
    assert reference.cell_bytes == "".join(dumps_line(r) + "\n" for r in reference.cell).encode("utf-8")
    assert reference.pre_bytes == "".join(dumps_line(r) + "\n" for r in reference.pre).encode("utf-8")
    timings = list(read_jsonl(reference.dir / "none.timings.jsonl"))
    assert [t["case_id"] for t in timings] == ids
    assert all(t["edit_s"] >= 0 and t["score_s"] > 0 and t["restore_s"] >= 0 for t in timings)


# ------------------------------------------------------------------------------------------------ kill -9
def _n_parts(root: Path) -> int:
    """Finished part files under an output's parts folder (any fingerprint; temporary files left out)."""
    return sum(1 for p in root.glob("*/*.json") if not p.name.startswith(".")) if root.is_dir() else 0


@pytest.mark.parametrize("kill_after", [1, 4])
def test_kill9_then_resume_gives_byte_identical_files(tmp_path, reference, data, model_dir, tiny, counters,
                                                      kill_after):
    """``kill -9`` a run in a subprocess mid-cell (plus a torn temporary part), then finish it: byte-identical
    results."""
    from evaluators.harness import CellSpec, run_cell, run_pre

    work = _copy_reference(reference, tmp_path / "run", cell=False)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), str(model_dir), str(data.cases_path), str(work), data.content_id]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TEST_THREADS=str(torch.get_num_threads()), TEST_DELAY_S="0.4")
    out_file = work / "none.jsonl"
    parts = work / ".parts" / "none"  # each case's part lands here first; the output appears once, when complete

    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while _n_parts(parts) < kill_after:
            assert proc.poll() is None, f"driver exited early:\n{proc.stdout.read().decode(errors='replace')}"
            assert time.monotonic() < deadline, f"driver wrote fewer than {kill_after} parts in 240 s"
            time.sleep(0.02)
        assert proc.poll() is None, "driver finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    done = _n_parts(parts)
    assert kill_after <= done < N_CASES
    assert not out_file.exists()  # an unfinished run never shows a partial output
    (fp_dir,) = parts.iterdir()  # as if killed in the middle of writing the next part: a torn temporary file
    (fp_dir / f".{data.cases[done].case_id}.json.x1y2.tmp").write_bytes(b'{"fingerprint":"')

    # finish it (here, in this process): only the missing cases are computed
    model, tok = tiny
    run_pre(model, tok, MODEL, data.content_id, data.cases, work / "pre.jsonl", progress=False)
    run_cell(model, tok, CellSpec(PROFILE, MODEL, "none"), data.content_id, data.cases, work / "pre.jsonl", out_file,
             progress=False)
    assert counters == {"edit": N_CASES - done, "score": N_CASES - done}
    assert (work / "pre.jsonl").read_bytes() == reference.pre_bytes
    assert out_file.read_bytes() == reference.cell_bytes
    timing_ids = [t["case_id"] for t in read_jsonl(work / "none.timings.jsonl")]
    assert timing_ids == [c.case_id for c in data.cases]  # timings travel in the parts: every case once
    # pre.jsonl was complete, so pre computed nothing; its rows became parts, no timings file
    assert sorted(p.name for p in work.iterdir()) == [".locks", ".parts", "none.jsonl", "none.timings.jsonl",
                                                     "pre.jsonl"]
    assert _n_parts(parts) == N_CASES and _n_parts(work / ".parts" / "pre") == N_CASES


# ------------------------------------------------------------------------------------------------- resume
def test_resume_computes_only_missing_cases(tmp_path, reference, data, tiny, counters):
    from evaluators.harness import CellSpec, run_cell

    model, tok = tiny
    work = _copy_reference(reference, tmp_path)
    kept = [reference.cell[i] for i in (3, 0, 2)]  # done out of order, as a log of another subset order might be
    atomic_write_jsonl(work / "none.jsonl", kept)
    spec = CellSpec(PROFILE, MODEL, "none")
    rows = run_cell(model, tok, spec, data.content_id, data.cases, work / "pre.jsonl", work / "none.jsonl",
                    progress=False)
    assert counters == {"edit": N_CASES - 3, "score": N_CASES - 3}
    assert rows == reference.cell
    assert (work / "none.jsonl").read_bytes() == reference.cell_bytes  # rewritten in subset order

    counters.update(edit=0, score=0)  # all done: nothing is recomputed, the file is unchanged
    run_cell(model, tok, spec, data.content_id, data.cases, work / "pre.jsonl", work / "none.jsonl", progress=False)
    assert counters == {"edit": 0, "score": 0}
    assert (work / "none.jsonl").read_bytes() == reference.cell_bytes


def test_other_fingerprint_is_recomputed_and_dropped_cases_removed(tmp_path, reference, data, tiny, counters):
    from evaluators.harness import CellSpec, run_cell, run_pre

    model, tok = tiny
    work = _copy_reference(reference, tmp_path)
    spec = CellSpec(PROFILE, MODEL, "none", hparams={"template_seed": 5})  # same cell, other hyper-params
    rows = run_cell(model, tok, spec, data.content_id, data.cases, work / "pre.jsonl", work / "none.jsonl",
                    progress=False)
    assert counters == {"edit": N_CASES, "score": N_CASES}
    new_fp = {r["fingerprint"] for r in rows}
    assert len(new_fp) == 1 and new_fp != {reference.cell[0]["fingerprint"]}
    assert [_without_fp(r) for r in rows] == [_without_fp(r) for r in reference.cell]
    on_disk = list(read_jsonl(work / "none.jsonl"))
    assert on_disk == rows and len(on_disk) == N_CASES

    # a different dataset content id is another fingerprint too
    counters.update(edit=0, score=0)
    run_cell(model, tok, spec, "0" * 16, data.cases[:1], work / "pre.jsonl", work / "none.jsonl", progress=False)
    assert counters == {"edit": 1, "score": 1}

    # a smaller subset: rows of cases no longer in it disappear from the file, nothing is recomputed
    counters.update(edit=0, score=0)
    run_cell(model, tok, spec, data.content_id, data.cases, work / "pre.jsonl", work / "none.jsonl", progress=False)
    counters.update(edit=0, score=0)
    sub = data.cases[:2] + data.cases[4:5]
    rows = run_cell(model, tok, spec, data.content_id, sub, work / "pre.jsonl", work / "none.jsonl", progress=False)
    assert counters == {"edit": 0, "score": 0}
    assert [r["case_id"] for r in read_jsonl(work / "none.jsonl")] == [c.case_id for c in sub]
    assert list(read_jsonl(work / "none.jsonl")) == rows

    # the same for the pre-edit stage
    counters.update(edit=0, score=0)
    pre = run_pre(model, tok, MODEL, data.content_id, sub, work / "pre.jsonl", progress=False)
    assert counters["score"] == 0
    assert pre == [reference.pre[i] for i in (0, 1, 4)]
    assert (work / "pre.jsonl").read_bytes() == "".join(dumps_line(r) + "\n" for r in pre).encode("utf-8")


def test_changed_config_keeps_old_rows_in_their_parts(tmp_path, reference, data, tiny, counters):
    """Issue 11: the output moves on to a new configuration, but the old rows stay in their parts, and going back
    to the old configuration reuses them (nothing recomputed, output byte-identical to before)."""
    from evaluators.harness import CellSpec, run_cell

    model, tok = tiny
    work = _copy_reference(reference, tmp_path)
    run_cell(model, tok, CellSpec(PROFILE, MODEL, "none", hparams={"template_seed": 5}), data.content_id,
             data.cases, work / "pre.jsonl", work / "none.jsonl", progress=False)
    assert counters["edit"] == N_CASES
    assert _n_parts(work / ".parts" / "none") == 2 * N_CASES  # the finished output's rows were kept as parts
    assert len([d for d in (work / ".parts" / "none").iterdir() if d.is_dir()]) == 2  # one folder per fingerprint
    counters.update(edit=0, score=0)
    run_cell(model, tok, CellSpec(PROFILE, MODEL, "none"), data.content_id, data.cases, work / "pre.jsonl",
             work / "none.jsonl", progress=False)
    assert counters == {"edit": 0, "score": 0}
    assert (work / "none.jsonl").read_bytes() == reference.cell_bytes
    assert _n_parts(work / ".parts" / "none") == 2 * N_CASES  # nothing written twice


@pytest.mark.parametrize("bad, match", [
    ({"layer": 99}, "the model has 4 layers"),
    ({"layer": "1"}, "'layer' must be an integer"),
    ({"layr": 1}, "unknown ROME hyper-parameter"),
    ({"layer": 1, "v_num_grad_steps": "20"}, "'v_num_grad_steps' must be an integer"),
    ({"layer": 1, "v_num_grad_steps": 0}, "'v_num_grad_steps' must be > 0"),
    ({"layer": 1, "sadr_gamma": True}, "'sadr_gamma' must be a number"),
    ({"layer": 1, "template_lengths": [[5]]}, "template_lengths"),
])
def test_bad_hparams_never_touch_a_finished_cell(tmp_path, reference, data, tiny, counters, bad, match):
    """Issue 11 item 1: hyper-parameters the editor cannot run with are refused before any output is touched (a
    finished 4-row rome.jsonl used to be emptied, then the run failed)."""
    from editors.core import HparamsError
    from evaluators.harness import CellSpec, run_cell

    model, tok = tiny
    work = _copy_reference(reference, tmp_path)
    out = work / "rome.jsonl"
    out.write_bytes(reference.cell_bytes)  # a finished cell (its fingerprint is another config's: it would be redone)
    with pytest.raises(HparamsError, match=match):
        run_cell(model, tok, CellSpec(PROFILE, MODEL, "rome", hparams=bad), data.content_id, data.cases,
                 work / "pre.jsonl", out, progress=False)
    assert out.read_bytes() == reference.cell_bytes
    assert not (work / ".parts").exists() and counters == {"edit": 0, "score": 0}


def test_a_failing_run_leaves_the_finished_output_as_it_was(tmp_path, monkeypatch, reference, data, tiny):
    """A run that fails half-way (here: an editor that raises on its third case) never shrinks the finished output;
    the rows it did compute are in their parts and are not computed again."""
    import editors.base
    import editors.registry
    from evaluators.harness import CellSpec, run_cell

    calls = []

    class Flaky:
        name, supports_sadr = "flaky", False

        def edit(self, model, tok, case, hparams):
            calls.append(case.case_id)
            if len(calls) == 3:
                raise RuntimeError("boom")
            return editors.base.EditHandle()

    monkeypatch.setitem(editors.registry._BUILTINS, "flaky", Flaky)
    model, tok = tiny
    work = _copy_reference(reference, tmp_path)
    out = work / "flaky.jsonl"
    out.write_bytes(reference.cell_bytes)
    with pytest.raises(RuntimeError, match="boom"):
        run_cell(model, tok, CellSpec(PROFILE, MODEL, "flaky"), data.content_id, data.cases, work / "pre.jsonl",
                 out, progress=False)
    assert out.read_bytes() == reference.cell_bytes
    assert _n_parts(work / ".parts" / "flaky") == 2  # the two cases done before the failure
    rows = run_cell(model, tok, CellSpec(PROFILE, MODEL, "flaky"), data.content_id, data.cases, work / "pre.jsonl",
                    out, progress=False)
    assert len(calls) == 3 + N_CASES - 2 and len(rows) == N_CASES


def test_two_shards_one_after_the_other_merge_to_the_single_process_file(tmp_path, reference, data, tiny, counters):
    """Issue 12: shard 1/2 then shard 2/2 of one cell write the same file as one process (the first shard leaves
    no output: the second, finishing last, merges); nothing is computed twice."""
    from evaluators.harness import CellSpec, run_cell

    model, tok = tiny
    work = _copy_reference(reference, tmp_path, cell=False)
    spec = CellSpec(PROFILE, MODEL, "none")
    args = (model, tok, spec, data.content_id, data.cases, work / "pre.jsonl", work / "none.jsonl")
    assert run_cell(*args, progress=False, shard=(0, 2)) is None
    assert not (work / "none.jsonl").exists() and counters["edit"] == N_CASES // 2
    assert run_cell(*args, progress=False, shard=(1, 2)) == reference.cell
    assert (work / "none.jsonl").read_bytes() == reference.cell_bytes and counters["edit"] == N_CASES
    run_cell(*args, progress=False, shard=(0, 2))  # a shard rerun after the merge: nothing computed, same bytes
    assert (work / "none.jsonl").read_bytes() == reference.cell_bytes and counters["edit"] == N_CASES


def test_two_shards_at_once_merge_to_the_single_process_file(tmp_path, reference, data, model_dir):
    """Two processes, shards 1/2 and 2/2 of the pre-edit stage and of one cell, running at the same time on the
    same folder: the merged files are byte-identical to one uninterrupted process's."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    work = tmp_path / "run"
    # the CPU thread count is part of a row's fingerprint: the drivers run with the reference's
    env = dict(os.environ, PYTHONPATH=str(ROOT), TEST_THREADS=str(torch.get_num_threads()), TEST_DELAY_S="0.2")
    procs = [subprocess.Popen([sys.executable, str(driver), str(model_dir), str(data.cases_path), str(work),
                               data.content_id], env=dict(env, TEST_SHARD=f"{i}/2"), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in (0, 1)]
    for proc in procs:
        out = proc.communicate(timeout=600)[0].decode(errors="replace")
        assert proc.returncode == 0, out
    assert (work / "pre.jsonl").read_bytes() == reference.pre_bytes
    assert (work / "none.jsonl").read_bytes() == reference.cell_bytes


def test_a_worker_refuses_a_unit_planned_with_another_fingerprint(tmp_path, reference, data, tiny, counters):
    from evaluators.harness import CellSpec, run_cell

    model, tok = tiny
    work = _copy_reference(reference, tmp_path, cell=False)
    with pytest.raises(UserError, match="the driver planned 0000000000000000"):
        run_cell(model, tok, CellSpec(PROFILE, MODEL, "none"), data.content_id, data.cases, work / "pre.jsonl",
                 work / "none.jsonl", progress=False, expect_fingerprint="0" * 16)
    assert counters["edit"] == 0 and not (work / "none.jsonl").exists()
    fp = reference.cell[0]["fingerprint"]  # the driver's own fingerprint is accepted
    run_cell(model, tok, CellSpec(PROFILE, MODEL, "none"), data.content_id, data.cases, work / "pre.jsonl",
             work / "none.jsonl", progress=False, expect_fingerprint=fp)
    assert (work / "none.jsonl").read_bytes() == reference.cell_bytes


def test_none_cell_reuses_the_pre_edit_rows(tmp_path, reference, data):
    """Issue 12 item 6: `none` is built from the pre-edit rows with no model; the scored run of the reference
    fixture (edit nothing, score every case) gives the same rows, so the shortcut changes no number."""
    from evaluators.harness import CellSpec, run_none

    rows = run_none(CellSpec(PROFILE, MODEL, "none"), data.cases, reference.dir / "pre.jsonl",
                    tmp_path / "none.jsonl", progress=False)
    assert [_without_fp(r) for r in rows] == [_without_fp(r) for r in reference.cell]


def test_run_cell_without_pre_rows_raises(tmp_path, reference, data, tiny):
    from evaluators.harness import CellSpec, run_cell

    model, tok = tiny
    spec = CellSpec(PROFILE, MODEL, "none")
    atomic_write_jsonl(tmp_path / "pre.jsonl", reference.pre[:3])
    with pytest.raises(UserError, match="driftbench evaluate pre"):
        run_cell(model, tok, spec, data.content_id, data.cases, tmp_path / "pre.jsonl", tmp_path / "none.jsonl",
                 progress=False)
    with pytest.raises(UserError, match="driftbench evaluate pre"):  # no pre-edit file at all
        run_cell(model, tok, spec, data.content_id, data.cases, tmp_path / "missing.jsonl", tmp_path / "none.jsonl",
                 progress=False)
    assert not (tmp_path / "none.jsonl").exists()


# ------------------------------------------------------------------------------------------ verify_restore
class BrokenEditor:
    """Writes a weight but does not record it in the handle: restore() cannot undo the edit."""
    name, supports_sadr = "broken", False

    def edit(self, model, tok, case, hparams):
        from editors.base import EditHandle

        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.add_(0.25)
        return EditHandle(diagnostics={"layer": 1})


class CarefulEditor:
    """Records each parameter through ``EditHandle.save`` before writing it (twice, to check the first save wins)."""
    name, supports_sadr = "careful", False

    def __init__(self):
        self.n = 0

    def edit(self, model, tok, case, hparams):
        from editors.base import EditHandle

        layer = self.n % len(model.model.layers)
        self.n += 1
        handle = EditHandle(diagnostics={"layer": layer})
        params = dict(model.named_parameters())
        names = [f"model.layers.{layer}.mlp.down_proj.weight", "model.embed_tokens.weight"]
        gen = torch.Generator().manual_seed(self.n)
        with torch.no_grad():
            for name in names:
                p = params[name]
                handle.save(name, p)
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
                handle.save(name, p)  # a no-op: the original stays the pre-edit copy
                p.mul_(1.5)
        return handle


def test_verify_restore_catches_a_broken_editor(tmp_path, monkeypatch, reference, data, model_dir):
    import editors.base
    import editors.registry
    from evaluators.harness import CellSpec, run_cell
    from model_layer.loading import load_model

    model, tok = load_model(str(model_dir))  # a private copy: this test corrupts it
    monkeypatch.setitem(editors.registry._BUILTINS, "broken", BrokenEditor)
    with pytest.raises(RuntimeError, match=r"the model differs after restore\(\)"):
        run_cell(model, tok, CellSpec(PROFILE, MODEL, "broken"), data.content_id, data.cases,
                 reference.dir / "pre.jsonl", tmp_path / "broken.jsonl", verify_restore=True, progress=False)
    assert not (tmp_path / "broken.jsonl").exists()  # no output for a run that failed
    assert _n_parts(tmp_path / ".parts" / "broken") == 0  # no row for the case that failed verification


def test_verify_restore_passes_for_a_correct_editor(tmp_path, monkeypatch, reference, data, model_dir):
    import editors.base
    import editors.registry
    from evaluators.harness import CellSpec, run_cell
    from model_layer.checksum import param_checksum
    from model_layer.loading import load_model

    model, tok = load_model(str(model_dir))
    monkeypatch.setitem(editors.registry._BUILTINS, "careful", CarefulEditor)
    before = param_checksum(model)
    cases = data.cases[:5]
    rows = run_cell(model, tok, CellSpec(PROFILE, MODEL, "careful"), data.content_id, cases,
                    reference.dir / "pre.jsonl", tmp_path / "careful.jsonl", verify_restore=True, progress=False)
    assert param_checksum(model) == before
    assert [r["case_id"] for r in rows] == [c.case_id for c in cases]
    assert [r["editor"]["diagnostics"]["layer"] for r in rows] == [i % 4 for i in range(5)]
    # every edited case carries the attention-drift diagnostic, on the probes the case has
    for r, c in zip(rows, cases):
        drift = r["editor"]["diagnostics"]["attn_drift"]
        assert len(drift.get("neighborhood_distracted", [])) == len(c.neighborhood)
    assert all(r["pre"] == p["scores"] for r, p in zip(rows, reference.pre))
    assert any(r["post"] != r["pre"] for r in rows)  # the edits were real and the scorer saw them


def test_other_weights_or_batch_size_are_recomputed(tmp_path, reference, data, tiny, counters):
    """The same model name pointed at other weights (model_id), or another batch size (padding moves floats),
    must never reuse rows on resume."""
    from evaluators.harness import run_pre

    model, tok = tiny
    work = _copy_reference(reference, tmp_path, cell=False)
    counters.update(edit=0, score=0)
    run_pre(model, tok, MODEL, data.content_id, data.cases, work / "pre.jsonl", progress=False)
    assert counters["score"] == 0  # same identity: everything reused
    run_pre(model, tok, MODEL, data.content_id, data.cases, work / "pre.jsonl", progress=False, model_id="other@1")
    assert counters["score"] == N_CASES
    counters.update(edit=0, score=0)
    run_pre(model, tok, MODEL, data.content_id, data.cases, work / "pre.jsonl", progress=False, model_id="other@1",
            batch_size=3)
    assert counters["score"] == N_CASES


def test_rows_record_the_installed_set_and_a_changed_set_is_recomputed(tmp_path, reference, data, tiny, counters,
                                                                       monkeypatch):
    """Every row carries the full installed set (name==version) and its hash; another set (a changed lock) changes
    the fingerprint, so no row of the old environment is reused."""
    from importlib import metadata

    import evaluators.harness as harness

    env = reference.cell[0]["env"]
    packages = env["packages"].split()
    assert f"torch=={metadata.version('torch')}" in packages and f"numpy=={metadata.version('numpy')}" in packages
    assert packages == sorted(packages, key=lambda p: p.split("==")[0]) and len(packages) > 50
    assert env["installed"] == harness.sha256_text(env["packages"])[:16]
    assert not any(p.startswith("pip==") for p in packages)

    model, tok = tiny
    work = _copy_reference(reference, tmp_path, cell=False)
    counters.update(edit=0, score=0)
    real = harness.installed_packages()
    monkeypatch.setattr(harness, "installed_packages", lambda: real.replace("numpy==", "numpy==0.0.0+"))
    rows = harness.run_pre(model, tok, MODEL, data.content_id, data.cases, work / "pre.jsonl", progress=False)
    assert counters["score"] == N_CASES
    assert {r["env"]["installed"] for r in rows} != {env["installed"]}
