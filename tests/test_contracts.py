"""Issue 12: one contract for every kind of editor and one runner.

- a module-swap editor and a state-reset editor (tiny test doubles) restore bit-exactly through the same harness
  check as weight edits, and a broken one of each kind is caught;
- MEMIT sequential over 10 cases on a tiny model gives the rows of a hand-run loop (edit, edit, ..., then score);
- MEMIT batch mode is one least-squares update over all keys;
- SADR's reference attention in a stream comes from the unedited model;
- adding an editor module changes no other cell's fingerprint nor its DVC stage's dependencies;
- a first-contract ``edit()`` plugin keeps working through the adapter.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from basis.cells import Mode, parse_cell
from data_pipeline.schema import Case
from editors.base import EditContext, EditHandle, Editor, LegacyEditor, as_v2
from editors.registry import get_editor
from model_layer.checksum import model_state, param_checksum
from model_layer.loading import load_model
from test_memit import memit_hparams
from test_rome_sadr import CASES

ROOT = Path(__file__).resolve().parents[1]
PRE_CASES = [Case(case_id=f"cf-s{i}", source="counterfact", subject=c.subject, prompt=c.prompt,
                  target_true=c.target_true, target_new=c.target_new, neighborhood=c.neighborhood)
             for i, c in enumerate((CASES * 4)[:10])]  # 10 distinct ids (subjects repeat: a stream may re-edit)


# ------------------------------------------------------------------------------------------- test doubles
class Doubler(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *a, **kw):
        return self.inner(*a, **kw) * 2.0


class SwapEditor(Editor):
    """Wraps an MLP in a module that doubles its output (a module swap, like WISE's side memory)."""
    name, capabilities, undo = "swap", frozenset({"sequential", "changes_forward"}), "modules"
    broken = False

    def apply(self, model, tok, cases, hparams, ctx):
        handle = EditHandle(diagnostics={"swapped": "model.layers.1.mlp"})
        old = model.get_submodule("model.layers.1.mlp")
        if self.broken:  # swaps without telling the handle: restore cannot undo it
            model.model.layers[1].mlp = Doubler(old)
        else:
            handle.swap(model, "model.layers.1.mlp", Doubler(old))
        return handle


class MemoryEditor(Editor):
    """Keeps a side memory and a forward hook that reads it (a state-reset editor); restore clears both."""
    name, capabilities, undo = "memory", frozenset({"sequential", "changes_forward"}), "state"
    broken = False

    def __init__(self):
        self.memory: list[str] = []

    def state_digest(self):
        return hashlib.sha256("\n".join(self.memory).encode()).hexdigest()

    def apply(self, model, tok, cases, hparams, ctx):
        self.memory += [c.case_id for c in cases]
        n = len(self.memory)
        hook = model.get_submodule("model.layers.1.mlp").register_forward_hook(lambda m, i, o: o + 0.1 * n)
        handle = EditHandle()
        handle.on_restore(hook.remove)
        if not self.broken:
            handle.on_restore(self.memory.clear)
        return handle


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]))


@pytest.fixture(scope="module")
def pre(tmp_path_factory, tiny):
    from evaluators.harness import run_pre

    model, tok = tiny
    path = tmp_path_factory.mktemp("pre") / "pre.jsonl"
    run_pre(model, tok, "tiny", "test", PRE_CASES, path, progress=False)
    return path


def _run(tiny, pre, tmp_path, monkeypatch, cls, cell, hparams=None, cases=PRE_CASES[:3]):
    import editors.base
    import editors.registry
    from evaluators.harness import CellSpec, run_cell

    monkeypatch.setitem(editors.registry._BUILTINS, cls.name, cls)
    c = parse_cell(cell)
    model, tok = tiny
    return run_cell(model, tok, CellSpec("test", "tiny", c.editor, c.sadr, hparams or {}, mode=c.mode), "test", cases,
                    pre, tmp_path / f"{cell}.jsonl", verify_restore=True, progress=False)


@pytest.mark.parametrize("cls", [SwapEditor, MemoryEditor])
@pytest.mark.parametrize("cell", ["{}", "{}.seq3"])
def test_swap_and_state_editors_restore_bit_exactly(tiny, pre, tmp_path, monkeypatch, cls, cell):
    model, _ = tiny
    before = model_state(model)
    rows = _run(tiny, pre, tmp_path, monkeypatch, cls, cell.format(cls.name))
    assert model_state(model) == before
    assert all(r["post"] != r["pre"] for r in rows)  # the edits changed the forward while they were in place


@pytest.mark.parametrize("cls", [SwapEditor, MemoryEditor])
def test_a_broken_restore_of_either_kind_is_caught(tiny_model_dirs, pre, tmp_path, monkeypatch, cls):
    broken = type(f"Broken{cls.__name__}", (cls,), {"broken": True})
    private = load_model(str(tiny_model_dirs["llama"]))  # this test leaves the model edited
    with pytest.raises(RuntimeError, match=r"the model differs after restore\(\)"):
        _run(private, pre, tmp_path, monkeypatch, broken, cls.name)
    assert not (tmp_path / f"{cls.name}.jsonl").exists()


def test_a_leftover_hook_is_a_changed_model(tiny):
    """A hook left behind changes the forward without touching a parameter or a module: model_state sees it."""
    model, _ = tiny
    before = model_state(model)
    h = model.get_submodule("model.layers.0.mlp").register_forward_hook(lambda m, i, o: o)
    try:
        assert model_state(model) != before and param_checksum(model) == before[0]
    finally:
        h.remove()
    assert model_state(model) == before


def test_a_first_contract_plugin_runs_through_the_adapter(tiny, pre, tmp_path, monkeypatch):
    class OldStyle:  # edit(model, tok, case, hparams) with hparams["sadr"], weights restored by the handle
        name, supports_sadr = "oldstyle", True
        seen: list = []

        def edit(self, model, tok, case, hparams):
            OldStyle.seen.append(hparams["sadr"])
            handle = EditHandle()
            w = model.get_submodule("model.layers.1.mlp.down_proj").weight
            handle.save("w", w)
            with torch.no_grad():
                w.mul_(1.5)
            return handle

    assert isinstance(as_v2(OldStyle()), LegacyEditor) and "sadr" in as_v2(OldStyle()).capabilities
    rows = _run(tiny, pre, tmp_path, monkeypatch, OldStyle, "oldstyle+sadr", cases=PRE_CASES[:2])
    assert OldStyle.seen == [True, True] and all(r["editor"]["sadr"] for r in rows)
    assert code_names(get_editor("oldstyle")) == [Path(__file__).name]


def code_names(editor):
    return [p.name for p in editor.code_files()]


# ------------------------------------------------------------------------------------ MEMIT streams, batches
def test_memit_sequential_over_10_cases_matches_a_hand_run_loop(tiny, pre, mirror, tmp_path):
    from editors.memit import Memit
    from evaluators.harness import CellSpec, run_cell
    from evaluators.scoring import ProbeScorer

    model, tok = tiny
    hp = memit_hparams(mirror, tmp_path, v_num_grad_steps=4)
    Memit().prepare(model, tok, hp, progress=False)
    before = model_state(model)
    rows = run_cell(model, tok, CellSpec("test", "tiny", "memit", hparams=hp, mode=Mode("seq", 10, "final")), "test",
                    PRE_CASES, pre, tmp_path / "memit.seq10.jsonl", progress=False)
    assert model_state(model) == before  # restored at the end of the stream
    assert rows[0]["cell"] == "test/tiny/memit.seq10"
    assert [r["editor"]["diagnostics"]["stream_position"] for r in rows] == list(range(10))

    # by hand: ten MEMIT edits one after the other, no restore, then every case scored on the edited model, and
    # attention drift measured from the unedited model (states taken before the first edit) to the edited one
    from evaluators.drift import DriftProbe

    probe = DriftProbe(model, tok)
    states = [probe.before(c) for c in PRE_CASES]
    editor, ctx, handles = Memit(), EditContext(model), []
    for case in PRE_CASES:
        handles.append(editor.apply(model, tok, [case], hp, ctx))
        ctx.push(handles[-1])
    scorer = ProbeScorer(model, tok, batch_size=32)
    by_hand = [scorer.score_case(c) for c in PRE_CASES]
    drift = [probe.after(st) for st in states]
    for h in reversed(handles):
        h.restore()
    assert model_state(model) == before
    assert [r["post"] for r in rows] == by_hand
    assert [r["editor"]["diagnostics"]["attn_drift"] for r in rows] == drift
    assert [r["editor"]["diagnostics"]["update_norms"] for r in rows] == [h.diagnostics["update_norms"]
                                                                          for h in handles]
    # the stream is not ten independent edits: the last case's scores differ from a single-case run's
    single = run_cell(model, tok, CellSpec("test", "tiny", "memit", hparams=hp), "test", PRE_CASES[-1:], pre,
                      tmp_path / "memit.jsonl", progress=False)
    assert single[0]["post"] != rows[-1]["post"]


def test_memit_batch_is_one_least_squares_update_over_all_keys(tiny, mirror, tmp_path):
    from editors.memit import Memit

    model, tok = tiny
    hp = memit_hparams(mirror, tmp_path, v_num_grad_steps=3)
    editor = Memit()
    editor.prepare(model, tok, hp, progress=False)
    before = param_checksum(model)
    h = editor.apply(model, tok, PRE_CASES[:3], hp, EditContext(model))
    diag = h.diagnostics
    assert diag["batch_size"] == 3 and len(diag["z_reached"]) == 3 and len(diag["update_norms"]) == 2
    edited = {n: p.detach().clone() for n, p in model.named_parameters() if n in h.params}
    h.restore()
    assert param_checksum(model) == before and len(edited) == 2  # one write per edit layer, all cases at once
    h1 = editor.apply(model, tok, PRE_CASES[:1], hp, EditContext(model))  # a batch of one is the single edit
    one = {n: p.detach().clone() for n, p in model.named_parameters() if n in h1.params}
    h1.restore()
    assert any(not torch.equal(edited[n], one[n]) for n in one)


def test_sadr_reference_in_a_stream_is_the_unedited_model(tiny, mirror, tmp_path):
    """After one edit of a stream, SADR's reference attention is the unedited model's, not the edited one's."""
    from editors.core import build_batch, make_request
    from editors.rome import Rome
    from test_rome_sadr import tiny_hparams

    model, tok = tiny
    hp = tiny_hparams(mirror, tmp_path, v_num_grad_steps=3)
    editor = Rome()
    editor.prepare(model, tok, hp, progress=False)
    before = param_checksum(model)
    ctx = EditContext(model, {"gamma": 0.1, "hinge": True})
    (fresh,) = ctx.extra_losses()
    assert fresh.reference is None  # first edit: the step-0 forward is the unedited model
    ctx.push(editor.apply(model, tok, [PRE_CASES[0]], hp, ctx))
    edited = param_checksum(model)
    assert edited != before
    with ctx.unedited():
        assert param_checksum(model) == before
    assert param_checksum(model) == edited  # back to the edited weights, bit-exactly
    (later,) = ctx.extra_losses()
    batch = build_batch(tok, make_request(PRE_CASES[1]), editor.templates(model, tok, editor.hparams_cls.from_dict(hp)),
                        "cpu")
    ref = later.reference(batch, 1)
    ctx2 = EditContext(model)
    ctx.restore_all()
    assert param_checksum(model) == before
    with torch.no_grad():
        from model_layer.attention import attention_rows

        with attention_rows(model, torch.arange(batch.n_rewrite), batch.query_idx, 1) as got:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    assert ctx2.pristine and sorted(ref) == sorted(got) and min(ref) == 1
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# ------------------------------------------------------------------------------ code identity, DVC stages
def test_adding_an_editor_changes_no_other_cells_fingerprint(tmp_path, monkeypatch):
    import evaluators.harness as harness

    for rel in ("editors", "evaluators", "model_layer", "basis"):
        shutil.copytree(ROOT / rel, tmp_path / rel, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(harness, "ROOT", tmp_path)

    def identity(editor: str) -> str:
        return harness.code_identity(harness.CELL_CODE, (tmp_path / "editors" / f"{editor}.py",))

    rome, memit = identity("rome"), identity("memit")
    (tmp_path / "editors" / "dummy.py").write_text("class Dummy: name = 'dummy'\n")
    assert (identity("rome"), identity("memit")) == (rome, memit)
    (tmp_path / "editors" / "memit.py").write_text("# changed\n", encoding="utf-8")
    assert identity("rome") == rome and identity("memit") != memit  # an editor's own change moves only its cells
    with open(tmp_path / "editors" / "core.py", "a") as fh:
        fh.write("\n# a change to the shared core\n")
    assert identity("rome") != rome  # ...and the shared core moves them all


def test_each_cell_stage_depends_on_exactly_the_code_its_fingerprint_hashes():
    from basis.params import get_profile
    from evaluators.harness import ROOT as HROOT, cell_code_files

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["cell"]
    cells = get_profile(params, "embedded").raw["cells"]
    assert list(stage["foreach"]) == cells  # dvc.yaml's literal list is the profile's
    code_deps = [d for d in stage["do"]["deps"] if not d.startswith(("$", "data/", "models/", "results/", "stats/"))]
    for cell, item in stage["foreach"].items():
        assert item["editor"] == parse_cell(cell).editor
        deps = {d.replace("${item.editor}", item["editor"]) for d in code_deps}
        files = set()
        for d in deps:
            p = HROOT / d
            files.update(p.rglob("*.py") if p.is_dir() else [p])
        assert files == set(cell_code_files(get_editor(item["editor"]))), cell
        assert not any("dummy" in str(f) for f in files)


def test_a_failing_stream_still_leaves_the_model_unedited(tiny, pre, tmp_path, monkeypatch):
    """An editor that raises at the third edit of a stream: the two earlier edits are undone anyway."""
    class Failing(SwapEditor):
        name = "failing"
        calls = 0

        def apply(self, model, tok, cases, hparams, ctx):
            Failing.calls += 1
            if Failing.calls == 3:
                raise RuntimeError("boom")
            return super().apply(model, tok, cases, hparams, ctx)

    model, _ = tiny
    before = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        _run(tiny, pre, tmp_path, monkeypatch, Failing, "failing.seq3")
    assert model_state(model) == before


def test_first_contract_sadr_is_refused_in_streams_and_state_edits_cannot_be_reverted(tiny, pre, tmp_path,
                                                                                      monkeypatch):
    class OldSadr:
        name, supports_sadr = "oldsadr", True

        def edit(self, model, tok, case, hparams):
            return EditHandle()

    with pytest.raises(Exception, match="builds its own SADR loss"):
        _run(tiny, pre, tmp_path, monkeypatch, OldSadr, "oldsadr+sadr.seq2")
    model, tok = tiny
    ctx = EditContext(model)
    ctx.push(MemoryEditor().apply(model, tok, PRE_CASES[:1], {}, ctx))
    with pytest.raises(RuntimeError, match="cannot be reverted"):
        with ctx.unedited():
            pass
    ctx.restore_all()


def test_the_extra_editors_pipeline_runs_exactly_the_profiles_extra_cells_with_exact_code_deps():
    """pipelines/editors/dvc.yaml: one stage per cell of profiles.embedded.extra_cells, none of the default cells,
    and each stage's code deps are exactly the files its cell's fingerprint hashes (parents' modules included)."""
    from basis.params import get_profile
    from evaluators.harness import ROOT as HROOT, cell_code_files

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "pipelines" / "editors" / "dvc.yaml").read_text())["stages"]
    raw = get_profile(params, "embedded").raw
    summary = stages.pop("aggregate")  # every cell, default and optional, in the profile's order
    assert "--cells all" in summary["cmd"]
    listed = [d.rsplit("/", 1)[1][: -len(".jsonl")] for d in summary["deps"]
              if d.startswith("results/embedded/smollm2-135m/cells/")]
    assert listed == raw["cells"] + raw["extra_cells"]
    ablation = stages.pop("ablation")  # Table 5 from the rows of the ROME cells, ROME-AWD's among them
    assert ablation["cmd"] == "driftbench ablation -p embedded"
    assert {f"results/embedded/smollm2-135m/cells/{c}.jsonl" for c in ("rome", "rome_awd", "rome+sadr")} \
        <= set(ablation["deps"])
    sweeps = stages.pop("sadr_ablation")  # §6.1 / Table 10 on held-out cases: every config it writes is an output
    outs = [next(iter(o)) for o in sweeps["outs"]]
    assert outs == [f"results/embedded/smollm2-135m/sweep/{n}.jsonl" for n in (
        "rome+sadr", "rome+sadr@sadr_hinge=False", "rome+sadr@sadr_gamma=0.01", "rome+sadr@sadr_gamma=0.08")]
    training = stages.pop("train_mend")  # MEND's checkpoints, one stage each, the cells depend on both folders
    assert sorted(training["foreach"]) == ["mend", "mend+sadr"]
    assert training["do"]["cmd"].startswith("driftbench train-mend -p embedded ${item.flag}")
    # DVC decides when the checkpoint is stale (code, cases, params): the stage must retrain then, not keep the
    # persisted file of the same recipe name
    assert "--force" in training["do"]["cmd"].split()
    outs = [next(iter(o)) for o in training["do"]["outs"]]
    assert outs == ["checkpoints/smollm2-135m/${key}"]
    for dep in ("checkpoints/smollm2-135m/mend", "checkpoints/smollm2-135m/mend+sadr"):
        assert dep in stages["mend"]["do"]["deps"]
    keys = [cell for st in stages.values() for cell in st["foreach"]]
    assert sorted(keys) == sorted(raw["extra_cells"]) and not set(keys) & set(raw["cells"])
    for st in stages.values():
        assert st["do"]["wdir"] == "../.." and st["do"]["cmd"] == "driftbench run-cell -p embedded -c ${key}"
        code_deps = [d.split("#")[0].strip() for d in st["do"]["deps"]
                     if not d.startswith(("$", "data/", "models/", "results/", "stats/", "checkpoints/"))]
        for cell, item in st["foreach"].items():
            assert item["editor"] == parse_cell(cell).editor
            files = set()
            for d in {d.replace("${item.editor}", item["editor"]) for d in code_deps}:
                p = HROOT / d
                files.update(p.rglob("*.py") if p.is_dir() else [p])
            assert files == set(cell_code_files(get_editor(item["editor"]))), cell


def test_the_default_run_never_pulls_in_the_optional_editor_cells():
    """The root aggregate/leaderboard stages depend on the profile's cells file by file: no dependency of theirs
    contains an output of pipelines/editors/dvc.yaml (a folder dependency would make those cells upstream of the
    default `dvc repro`)."""
    from basis.params import get_profile

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    root = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    extra = yaml.safe_load((ROOT / "pipelines" / "editors" / "dvc.yaml").read_text())["stages"]
    extra_outs = [f"results/embedded/smollm2-135m/cells/{cell}.jsonl" for st in extra.values()
                  for cell in st.get("foreach", ())]
    cells = get_profile(params, "embedded").raw["cells"]
    for name in ("aggregate", "leaderboard", "analysis"):
        deps = [d for d in root[name]["deps"] if isinstance(d, str)]
        assert not [d for d in deps for o in extra_outs if o == d or o.startswith(d.rstrip("/") + "/")], name
        listed = [d.rsplit("/", 1)[1][: -len(".jsonl")] for d in deps if d.startswith("results/embedded/smollm2-135m/cells/")]
        assert listed == cells, name  # every default cell, in the profile's order


def test_the_paper_pipeline_runs_every_model_and_cell_of_the_paper_profile():
    """pipelines/paper/dvc.yaml: its matrices list exactly profiles.paper's models and cells, every stage runs the
    CLI on the paper profile, and no stage of the root pipeline depends on one of its outputs."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    paper = params["profiles"]["paper"]
    stages = yaml.safe_load((ROOT / "pipelines" / "paper" / "dvc.yaml").read_text())["stages"]
    for name in ("stats", "pre_eval", "cell"):
        assert stages[name]["matrix"]["model"] == list(paper["models"]), name
        assert stages[name]["cmd"].startswith("driftbench ") and "-p paper -m ${item.model}" in stages[name]["cmd"]
    assert stages["cell"]["matrix"]["cell"] == paper["cells"]
    outs = ("results/paper", "data/subsets/paper.json", *(f"stats/{m}" for m in paper["models"]))
    root = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    deps = [str(d) for st in root.values() for d in (st.get("do", st).get("deps") or [])]
    assert deps and not [d for d in deps if d.startswith(outs)]
