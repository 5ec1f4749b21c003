"""The per-cell harness: pre-edit scoring per model, and edit → score → restore per unit of a cell
(reference-spec §2.1), run by `evaluators.runner` (plan → units → execute → store → merge).

Reliability contract (design.md §6):
- every row carries the cell's fingerprint: model weights, dataset content id, cell id (editor, SADR, mode, seed),
  hyper-parameters (paths replaced by the content hashes of what they point to), the editor's artefacts' sha256,
  the environment (full installed set), batch size, the ME-PPL corpus' sha256, and `code_identity` of exactly the
  source a cell runs (scoring + the shared editor core + the editor's own files, the same files its DVC stage
  depends on), so adding an editor changes no other cell's fingerprint;
- each unit's rows go atomically to their own part file and the output is merged once, in subset order, so it is
  byte-identical whatever the history of interruptions or sharding, and a failed run (bad hparams, a bug, kill -9)
  leaves the finished output exactly as it was; everything checkable is checked before any output is touched;
- after every unit (a case, a stream, a batch) the model's parameters, buffers, module tree, hooks and the
  editor's state are compared with the state before the run's first unit (``verify_restore`` is kept for callers;
  the check is always on: a wrong restore would make results depend on the order and sharding of units);
- timings (which vary run to run) go to a sidecar ``*.timings.jsonl`` so the results file itself stays reproducible.
"""
from __future__ import annotations

import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basis.cells import SINGLE, CellName, Mode
from basis.errors import UserError
from basis.io import dumps_line, read_jsonl, sha256_file, sha256_text
from data_pipeline.schema import Case
from evaluators import runner


@dataclass
class CellSpec:
    profile: str
    model_name: str
    editor: str
    sadr: bool = False
    hparams: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # context-template seed named in the cell id (".s<seed>"); hparams carry template_seed
    mode: Mode = Mode()
    # single-case cells: independent cases per runner unit, edited through `Editor.apply_each` (locate-then-edit
    # editors optimise their v* together; each case is still edited alone, scored and restored). It changes float
    # rounding only, so it enters the fingerprint, never the cell name.
    group: int = 1
    steps_matched: bool = False  # a +steps cell: SADR's step count without SADR (the steps-matched control)

    @property
    def name(self) -> CellName:
        return CellName(self.editor, self.sadr, self.mode, self.seed, self.steps_matched)

    @property
    def cell_id(self) -> str:
        return f"{self.profile}/{self.model_name}/{self.name}"


def installed_packages() -> str:
    """The installed set as one string, ``name==version`` sorted by name, space-separated (every distribution in
    the running interpreter's environment, transitive ones included; pip, the installer, left out)."""
    from importlib import metadata

    seen = {}
    for d in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", (d.metadata["Name"] or "").strip()).lower()  # PEP 503 normal form
        if name and name != "pip":  # the installer itself (it comes with the interpreter), not a dependency
            seen.setdefault(name, f"{name}=={d.version}")
    return " ".join(seen[k] for k in sorted(seen))


def environment(model) -> dict[str, Any]:
    """Deterministic description of where the numbers came from (no host names, no timestamps): the headline
    versions, device and dtype, the full installed set (``packages``) with its sha256 (``installed``), so a
    changed lock changes every result fingerprint, and on CPU the torch thread count."""
    import lm_eval
    import torch
    import transformers

    p = next(model.parameters())
    packages = installed_packages()
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval.__version__,
           "python": platform.python_version(), "device": str(p.device.type), "dtype": str(p.dtype).replace("torch.", ""),
           "installed": sha256_text(packages)[:16], "packages": packages}
    if p.device.type == "cpu":  # CPU kernels split reductions by thread: another count moves the 6th-7th digit
        env["cpu_threads"] = str(torch.get_num_threads())  # a string, as every env field (submission schema)
    return env


ROOT = Path(__file__).resolve().parents[1]
# the source that determines a result row (the same paths are the DVC dependencies of the pre_eval/cell stages)
SCORING_CODE = ("evaluators/probes.py", "evaluators/scoring.py", "evaluators/generation.py", "evaluators/harness.py",
                "evaluators/runner.py", "model_layer", "basis/io.py", "basis/cells.py")
# what every editor cell runs besides its editor's own files (`Editor.code_files`)
EDITOR_CORE = ("evaluators/drift.py", "editors/__init__.py", "editors/base.py", "editors/core.py", "editors/sadr.py",
               "editors/stats.py")
CELL_CODE = SCORING_CODE + EDITOR_CORE


def code_files(paths: tuple[str, ...], extra: tuple[str | Path, ...] = ()) -> list[Path]:
    """The ``*.py`` files under ``paths`` (relative to the repository root) plus the files ``extra``."""
    files: set[Path] = set()
    for rel in paths:
        p = ROOT / rel
        files.update(p.rglob("*.py") if p.is_dir() else [p])
    files.update(Path(f).resolve() for f in extra)
    return sorted(files)


def code_identity(paths: tuple[str, ...], extra: tuple[str | Path, ...] = ()) -> str:
    """sha256 over the files of `code_files` (path relative to the repository root, or the bare name of a file
    outside it such as a plugin editor's module, and content)."""
    import hashlib

    h = hashlib.sha256()
    for f in code_files(paths, extra):
        rel = f.relative_to(ROOT).as_posix() if f.is_relative_to(ROOT) else f.name
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cell_code_files(editor) -> list[Path]:
    """Exactly the source a cell of ``editor`` runs (what its fingerprint and its DVC stage depend on)."""
    return code_files(CELL_CODE, tuple(editor.code_files()))


def fingerprint(parts: dict[str, Any]) -> str:
    return sha256_text(dumps_line(parts))[:16]


def worker_identity(editor: str) -> dict[str, str]:
    """What two processes must share to compute the same rows of an ``editor`` cell, known without a model: the
    code a cell runs and the installed set (a cluster backend compares its workers' with the driver's)."""
    from editors.registry import get_editor

    return {"code": code_identity(CELL_CODE, tuple(get_editor(editor).code_files())),
            "installed": sha256_text(installed_packages())[:16], "python": platform.python_version()}


@dataclass
class Job:
    """A planned output: the plan (fingerprint, units) and ``compute(unit) -> (rows, timings)``, which runs in the
    process that built the job (it holds the model). `runner.run` executes it here; a cluster backend builds one
    per worker and sends units to them (evaluators.cluster)."""
    plan: runner.Plan
    compute: Any
    desc: str


def run_job(job: Job, out_path: Path, parts: Path | None = None, shard: tuple[int, int] = (0, 1),
            progress: bool = True, expect_fingerprint: str | None = None) -> list[dict] | None:
    """Execute ``job`` in this process (this shard's units), then merge; the merged rows or None."""
    return runner.run(Path(out_path), parts or parts_root(out_path), job.plan, job.compute, shard, progress,
                      desc=job.desc, expect_fingerprint=expect_fingerprint)["rows"]


def parts_root(out_path: Path) -> Path:
    """Where an output's part files live: ``<folder>/.parts/<name>`` (ignored by git and DVC)."""
    out_path = Path(out_path)
    return out_path.parent / ".parts" / out_path.stem


PATH_HPARAMS = ("stats_corpus", "stats_dir")


def portable_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as they enter a fingerprint: a corpus file by its sha256 (not the mirror's absolute path),
    folders of artefacts left out (the artefacts' own sha256 are in the fingerprint)."""
    out = {k: v for k, v in hparams.items() if k not in PATH_HPARAMS}
    corpus = hparams.get("stats_corpus")
    if isinstance(corpus, str):
        out["stats_corpus"] = corpus if corpus.startswith("hub:") or not Path(corpus).is_file() else \
            "sha256:" + sha256_file(corpus)
    return out


def _ppl_texts(ppl_corpus: str | Path | None) -> tuple[list[str] | None, str | None]:
    """The ME-PPL texts and their file's sha256 (part of the fingerprint); (None, None) disables FL and ME-PPL."""
    if ppl_corpus is None:
        return None, None
    from basis.io import sha256_file
    from evaluators.generation import load_corpus

    return load_corpus(ppl_corpus), sha256_file(ppl_corpus)


def run_pre(model, tok, model_name: str, content_id: str, cases: list[Case], out_path: Path,
            batch_size: int = 32, progress: bool = True, model_id: str | None = None,
            ppl_corpus: str | Path | None = None, parts: Path | None = None,
            shard: tuple[int, int] = (0, 1), expect_fingerprint: str | None = None) -> list[dict] | None:
    """Score every case on the unedited model once; every cell of this model reuses these rows. Returns the rows,
    or None while other shards' units are missing.

    ``model_id`` identifies the weights (e.g. GGUF sha256 or hub id@revision) so that pointing the same model name
    at other weights never reuses old rows on resume."""
    job = pre_job(model, tok, model_name, content_id, cases, batch_size, model_id, ppl_corpus)
    return run_job(job, out_path, parts, shard, progress, expect_fingerprint)


def pre_job(model, tok, model_name: str, content_id: str, cases: list[Case], batch_size: int = 32,
            model_id: str | None = None, ppl_corpus: str | Path | None = None) -> Job:
    """The pre-edit scoring of `run_pre` as a job."""
    from evaluators.scoring import ProbeScorer

    texts, corpus_sha = _ppl_texts(ppl_corpus)
    scorer = ProbeScorer(model, tok, batch_size=batch_size, ppl_texts=texts)
    env = environment(model)
    # batch size is part of the identity: padding changes float results at the 1e-8 level
    fp = fingerprint({"stage": "pre", "model": model_name, "model_id": model_id or model_name, "dataset": content_id,
                      "env": env, "batch_size": batch_size, "code": code_identity(SCORING_CODE),
                      "ppl_corpus": corpus_sha})
    by_id = {c.case_id: c for c in cases}

    def compute(unit: runner.Unit):
        (case,) = [by_id[c] for c in unit.case_ids]
        t0 = time.perf_counter()
        scores = scorer.score_case(case, weights_key="unedited")  # the model is never edited here
        return ([{"case_id": case.case_id, "source": case.source, "model": model_name, "scores": scores, "env": env}],
                [{"score_s": time.perf_counter() - t0}])

    return Job(runner.make_plan(fp, list(by_id)), compute, f"pre-edit {model_name}")


def _pre_rows(pre_path: Path, cases: list[Case]) -> dict[str, dict]:
    if not Path(pre_path).is_file():
        raise UserError(f"{pre_path} not found: run the pre-edit stage first (`driftbench evaluate pre`)")
    pre = {r["case_id"]: r for r in read_jsonl(pre_path)}
    missing = [c.case_id for c in cases if c.case_id not in pre]
    if missing:
        raise UserError(f"{pre_path} lacks pre-edit scores for {len(missing)} case(s), e.g. {missing[0]}: "
                        "run the pre-edit stage first (`driftbench evaluate pre`)")
    return pre


def run_none(spec: CellSpec, cases: list[Case], pre_path: Path, out_path: Path, progress: bool = True,
             parts: Path | None = None, shard: tuple[int, int] = (0, 1),
             expect_fingerprint: str | None = None) -> list[dict] | None:
    """The unedited baseline from the pre-edit rows (no edit, so nothing to score again): post = pre, with the
    row schema of every cell. tests/test_harness.py keeps a scored run of `none` to check that they agree."""
    return run_job(none_job(spec, cases, pre_path), out_path, parts, shard, progress, expect_fingerprint)


def none_job(spec: CellSpec, cases: list[Case], pre_path: Path) -> Job:
    """`run_none` as a job (no model)."""
    from editors.registry import get_editor

    pre = _pre_rows(pre_path, cases)
    fp = fingerprint({"stage": "cell", "cell": spec.cell_id, "pre": sorted({str(pre[c.case_id].get("fingerprint")) for c in cases}),
                      "code": code_identity(CELL_CODE, tuple(get_editor("none").code_files()))})

    def compute(unit: runner.Unit):
        rows = []
        for cid in unit.case_ids:
            r = pre[cid]
            rows.append({"cell": spec.cell_id, "case_id": cid, "source": r["source"], "pre": r["scores"],
                         "post": r["scores"], "editor": {"name": "none", "sadr": False, "diagnostics": {}},
                         "env": r["env"]})
        return rows, [{} for _ in rows]

    return Job(runner.make_plan(fp, [c.case_id for c in cases]), compute, spec.cell_id)


def prepare_cell(model, tok, spec: CellSpec, editor=None):
    """Check everything about a cell that can be checked before any output is touched: the editor exists and can run
    this cell (SADR, sequential, batch), its hyper-parameters fit the model, its artefacts exist."""
    from editors.registry import get_editor

    editor = editor or get_editor(spec.editor)
    caps = editor.capabilities
    if (spec.sadr or spec.steps_matched) and "sadr" not in caps:
        what = "+sadr" if spec.sadr else "+steps"
        raise UserError(f"editor {spec.editor!r} does not support SADR (nor its steps-matched control): drop "
                        f"'{what}' from the cell name")
    if spec.mode.kind == "seq" and "sequential" not in caps:
        raise UserError(f"editor {spec.editor!r} cannot edit sequentially (no 'sequential' capability): drop "
                        f"'.{spec.mode.suffix}' from the cell name")
    from editors.base import LegacyEditor

    if spec.sadr and spec.mode.kind != SINGLE and isinstance(editor, LegacyEditor):
        raise UserError(f"editor {spec.editor!r} (first contract) builds its own SADR loss, whose reference would "
                        "be the edited model in the middle of a stream: run it with '+sadr' one case at a time, "
                        "or port it to editors.base.Editor")
    if spec.sadr and spec.mode.kind != SINGLE and not editor.sadr_in_streams:
        raise UserError(f"editor {spec.editor!r} cannot run SADR in a stream (its edits cannot be reverted mid-stream "
                        f"for SADR's reference): run '{spec.editor}+sadr' on single edits, or "
                        f"'{spec.editor}.{spec.mode.suffix}' without SADR")
    if spec.mode.kind == "batch" and "batch" not in caps:
        raise UserError(f"editor {spec.editor!r} cannot edit a batch of cases at once (no 'batch' capability): use "
                        f"'.seq{spec.mode.size}' instead of '.{spec.mode.suffix}'")
    editor.check_hparams(model, dict(spec.hparams, sadr=spec.sadr))  # the flag rides along as for artefacts below
    # by file name (content-named), not path: where a worker keeps its stats folder does not enter the fingerprint
    # the cell's SADR flag rides along as ``sadr`` (every Hparams.from_dict accepts it): an editor with one artefact
    # per flag (MEND's two checkpoints) names only the one this cell loads
    artefacts = ({Path(a.path).name: a.sha256() for a in editor.artefacts(model, tok, dict(spec.hparams,
                                                                                           sadr=spec.sadr))}
                 if model is not None else {})
    return editor, artefacts


def run_cell(model, tok, spec: CellSpec, content_id: str, cases: list[Case], pre_path: Path, out_path: Path,
             batch_size: int = 32, verify_restore: bool = False, progress: bool = True,
             model_id: str | None = None, ppl_corpus: str | Path | None = None, parts: Path | None = None,
             shard: tuple[int, int] = (0, 1), expect_fingerprint: str | None = None) -> list[dict] | None:
    """Edit → score → restore for each unit of one cell (model × editor × ±SADR × mode); ``model_id`` as in
    `run_pre`. Returns the merged rows, or None while other shards' units are missing."""
    job = cell_job(model, tok, spec, content_id, cases, pre_path, batch_size, model_id, ppl_corpus)
    return run_job(job, out_path, parts, shard, progress, expect_fingerprint)


def cell_job(model, tok, spec: CellSpec, content_id: str, cases: list[Case], pre_path: Path, batch_size: int = 32,
             model_id: str | None = None, ppl_corpus: str | Path | None = None) -> Job:
    """`run_cell` as a job: everything checked and the fingerprint fixed here, before any unit runs."""
    from evaluators.drift import DriftProbe
    from evaluators.scoring import ProbeScorer
    from model_layer.checksum import model_state

    pre = _pre_rows(pre_path, cases)
    editor, artefacts = prepare_cell(model, tok, spec)
    hparams = dict(spec.hparams)
    sadr = editor.sadr_settings(hparams) if spec.sadr else None
    texts, corpus_sha = _ppl_texts(ppl_corpus)
    scorer = ProbeScorer(model, tok, batch_size=batch_size, ppl_texts=texts)
    env = environment(model)
    fp = fingerprint({"stage": "cell", "cell": spec.cell_id, "model_id": model_id or spec.model_name,
                      "dataset": content_id, "hparams": portable_hparams(dict(hparams, sadr=spec.sadr)),
                      "artefacts": artefacts, "env": env, "batch_size": batch_size,
                      "code": code_identity(CELL_CODE, tuple(editor.code_files())), "ppl_corpus": corpus_sha,
                      **({"group": spec.group} if spec.mode.kind == SINGLE and spec.group > 1 else {})})
    probe = DriftProbe(model, tok) if spec.editor != "none" else None
    mode = spec.mode
    by_id = {c.case_id: c for c in cases}
    clean: list = []  # the model's state before the first unit of this run; every unit must leave it as it was

    def compute(unit: runner.Unit):
        from editors.base import EditContext

        def check_clean():
            if model_state(model, editor) != clean[0]:
                raise RuntimeError(f"{spec.cell_id} unit {unit.key}: the model differs after restore() "
                                   f"(undo kind {editor.undo!r}): the editor's restore is not exact")

        unit_cases = [by_id[c] for c in unit.case_ids]
        if not clean:
            clean.append(model_state(model, editor))
        states = {c.case_id: probe.before(c) for c in unit_cases} if probe is not None else {}
        post, diag, tim = {}, {}, {c.case_id: {} for c in unit_cases}

        def evaluate(case: Case, weights_key: str | None = None):
            t0 = time.perf_counter()
            post[case.case_id] = scorer.score_case(case, weights_key)
            t1 = time.perf_counter()
            if probe is not None:
                diag[case.case_id]["attn_drift"] = probe.after(states[case.case_id])
            tim[case.case_id].update(score_s=t1 - t0, drift_s=time.perf_counter() - t1)

        ctx = EditContext(model, sadr, steps_matched=spec.steps_matched)
        if mode.kind == SINGLE:  # independent edits: each case alone on the unedited model, scored, restored
            handles = editor.apply_each(model, tok, unit_cases, hparams, ctx)
            for case in unit_cases:
                t0 = time.perf_counter()
                try:
                    handle = next(handles)
                    ctx.push(handle)
                    diag[case.case_id] = dict(handle.diagnostics)
                    tim[case.case_id].update(edit_s=time.perf_counter() - t0, editor=handle.timings)
                    evaluate(case)
                finally:  # whatever happens, the model leaves the case unedited
                    t1 = time.perf_counter()
                    ctx.restore_all()
                    tim[case.case_id]["restore_s"] = time.perf_counter() - t1
                check_clean()
            if len(unit_cases) > 1:  # the group's edit time (v* together, then one write each), shared equally
                edits = sum(tim[c.case_id]["edit_s"] for c in unit_cases)
                for c in unit_cases:
                    tim[c.case_id].update(edit_s=edits / len(unit_cases), group=len(unit_cases))
        else:
            groups = [unit_cases] if mode.kind == "batch" else [[c] for c in unit_cases]
            try:
                for position, group in enumerate(groups):
                    t0 = time.perf_counter()
                    handle = editor.apply(model, tok, group, hparams, ctx)
                    ctx.push(handle)
                    for i, case in enumerate(group):
                        diag[case.case_id] = dict(handle.diagnostics)
                        if mode.kind == "seq":
                            diag[case.case_id]["stream_position"] = position
                        elif mode.kind == "batch":
                            diag[case.case_id]["batch_position"] = i
                        tim[case.case_id].update(edit_s=time.perf_counter() - t0, editor=handle.timings)
                    if mode.timing == "each":
                        for case in group:
                            evaluate(case)
                if mode.timing == "final":  # one set of weights for all of them: ME-PPL computed once
                    for case in unit_cases:
                        evaluate(case, weights_key=f"after {unit.key}")
            finally:  # whatever happens, the model leaves the unit unedited (a failing unit must not poison the next)
                t0 = time.perf_counter()
                ctx.restore_all()
                tim[unit_cases[-1].case_id]["restore_s"] = time.perf_counter() - t0
            check_clean()
        rows = [{"cell": spec.cell_id, "case_id": c.case_id, "source": c.source, "pre": pre[c.case_id]["scores"],
                 "post": post[c.case_id], "editor": {"name": spec.editor, "sadr": spec.sadr,
                                                     "diagnostics": diag[c.case_id]}, "env": env}
                for c in unit_cases]
        return rows, [tim[c.case_id] for c in unit_cases]

    return Job(runner.make_plan(fp, list(by_id), mode, group=spec.group), compute, spec.cell_id)
