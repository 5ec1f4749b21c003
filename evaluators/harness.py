"""The per-cell harness: pre-edit scoring per model, and edit → score → restore per cell (reference-spec §2.1).

Reliability contract (design.md §6):
- one JSON line per case, appended and fsynced (`driftbench.io.AppendLog`); a torn last line from ``kill -9``
  is dropped on the next start, so nothing is lost or duplicated;
- resume skips case ids already done *with the same fingerprint* (model, dataset content id, editor, SADR flag,
  hparams, and the sha256 of the source code that computes the rows, `code_identity`), looked up in the output's
  journal (``.journal/<name>``: every row ever computed for it, any fingerprint; never truncated except a torn
  last line), so a code change can never leave stale rows in the output and never deletes a finished row;
- the output is written once, atomically, when all cases are done, in subset order, so it is byte-identical
  whatever the history of interruptions, and a failed run (bad hparams, a bug) leaves it exactly as it was;
- one process per output (a lock beside the journal). Timings (which vary run to run) go to a sidecar
  ``*.timings.jsonl`` so the results file itself stays reproducible; each timing row is appended after its result
  row, so a kill between the two can lose that one timing row (best-effort), never a result row.
"""
from __future__ import annotations

import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from data_pipeline.schema import Case
from driftbench.errors import UserError
from driftbench.io import AppendLog, OutputLock, atomic_write_jsonl, dumps_line, read_jsonl, sha256_text


@dataclass
class CellSpec:
    profile: str
    model_name: str
    editor: str
    sadr: bool = False
    hparams: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # context-template seed named in the cell id (".s<seed>"); hparams carry template_seed

    @property
    def cell_id(self) -> str:
        seed = "" if self.seed is None else f".s{self.seed}"
        return f"{self.profile}/{self.model_name}/{self.editor}{'+sadr' if self.sadr else ''}{seed}"


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
    versions, device and dtype, and the full installed set (``packages``) with its sha256 (``installed``), so a
    changed lock changes every result fingerprint."""
    import lm_eval
    import torch
    import transformers

    p = next(model.parameters())
    packages = installed_packages()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval.__version__,
            "python": platform.python_version(), "device": str(p.device.type), "dtype": str(p.dtype).replace("torch.", ""),
            "installed": sha256_text(packages)[:16], "packages": packages}


ROOT = Path(__file__).resolve().parents[1]
# the source that determines a result row (the same paths are the DVC dependencies of the pre_eval/cell stages)
SCORING_CODE = ("evaluators/probes.py", "evaluators/scoring.py", "evaluators/generation.py", "evaluators/harness.py",
                "model_layer")
EDIT_CODE = SCORING_CODE + ("evaluators/drift.py", "editors")


def code_identity(paths: tuple[str, ...], extra: tuple[Any, ...] = ()) -> str:
    """sha256 over the ``*.py`` files under ``paths`` (relative to the repository root) and of the modules that
    define the objects in ``extra`` (e.g. a plugin editor living outside this repository)."""
    import hashlib
    import inspect

    files: set[Path] = set()
    for rel in paths:
        p = ROOT / rel
        files.update(p.rglob("*.py") if p.is_dir() else [p])
    for obj in extra:
        src = inspect.getsourcefile(obj if inspect.isclass(obj) or inspect.ismodule(obj) else type(obj))
        if src:
            files.add(Path(src).resolve())
    h = hashlib.sha256()
    for f in sorted(files):
        rel = f.relative_to(ROOT).as_posix() if f.is_relative_to(ROOT) else f.name
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def fingerprint(parts: dict[str, Any]) -> str:
    return sha256_text(dumps_line(parts))[:16]


def journal_path(out_path: Path) -> Path:
    """Default journal of an output: ``<folder>/.journal/<name>`` (ignored by git and DVC)."""
    return out_path.parent / ".journal" / out_path.name


def _resumable_loop(out_path: Path, cases: list[Case], fp: str, compute: Callable[[Case], tuple[dict, dict]],
                    desc: str, progress: bool = True, journal: Path | None = None) -> list[dict]:
    """Run ``compute(case) -> (row, timings)`` for every case not yet done; returns all rows in case order.

    Every computed row is appended to the output's *journal* (an `AppendLog` of every row ever computed for it,
    of any fingerprint) before anything else happens; the output itself is written once, atomically, when every
    case is done. So a run that fails (bad input, a bug, ``kill -9``) leaves the finished output exactly as it was,
    rows of an earlier configuration are kept in the journal when the output moves on (and reused if that
    configuration comes back), and a smoke run that shares the journal never deletes anything. One process at a
    time: a second one on the same output gets an "already running (pid N)" error."""
    from tqdm.auto import tqdm

    journal = journal or journal_path(out_path)
    with OutputLock(journal.with_name(journal.name + ".lock"), str(out_path)):
        finished = list(read_jsonl(out_path)) if out_path.is_file() else []
        log = AppendLog(journal)
        try:
            banked = {(r.get("fingerprint"), r.get("case_id")) for r in log.rows if isinstance(r, dict)}
            for r in finished:  # rows of the output the journal lacks (written before journals existed, or by DVC)
                if (r.get("fingerprint"), r.get("case_id")) not in banked:
                    log.append(r)
            wanted = {c.case_id for c in cases}
            done: dict[str, dict] = {}
            for r in log.rows:
                if isinstance(r, dict) and r.get("fingerprint") == fp and r.get("case_id") in wanted:
                    done.setdefault(r["case_id"], r)
            todo = [c for c in cases if c.case_id not in done]
            timings = AppendLog(out_path.with_name(out_path.stem + ".timings.jsonl")) if todo else None
            bar = tqdm(total=len(cases), initial=len(done), desc=desc, unit="case", disable=not progress,
                       dynamic_ncols=True, smoothing=0.1)
            try:
                for case in todo:
                    row, tim = compute(case)
                    row["fingerprint"] = fp
                    log.append(row)
                    done[case.case_id] = row
                    timings.append({"case_id": case.case_id, "fingerprint": fp, **tim})
                    bar.update(1)
            finally:
                bar.close()
                if timings is not None:
                    timings.close()
        finally:
            log.close()
        rows = [done[c.case_id] for c in cases]
        if len(rows) != len(cases) or any(r["case_id"] != c.case_id for r, c in zip(rows, cases)):
            raise RuntimeError(f"{out_path}: {len(rows)} rows for {len(cases)} cases")  # cannot happen: a bug
        if finished != rows:
            atomic_write_jsonl(out_path, rows)
        return rows


def _ppl_texts(ppl_corpus: str | Path | None) -> tuple[list[str] | None, str | None]:
    """The ME-PPL texts and their file's sha256 (part of the fingerprint); (None, None) disables FL and ME-PPL."""
    if ppl_corpus is None:
        return None, None
    from driftbench.io import sha256_file
    from evaluators.generation import load_corpus

    return load_corpus(ppl_corpus), sha256_file(ppl_corpus)


def run_pre(model, tok, model_name: str, content_id: str, cases: list[Case], out_path: Path,
            batch_size: int = 32, progress: bool = True, model_id: str | None = None,
            ppl_corpus: str | Path | None = None, journal: Path | None = None) -> list[dict]:
    """Score every case on the unedited model once; every cell of this model reuses these rows.

    ``model_id`` identifies the weights (e.g. GGUF sha256 or hub id@revision) so that pointing the same model name
    at other weights never reuses old rows on resume."""
    from evaluators.scoring import ProbeScorer

    texts, corpus_sha = _ppl_texts(ppl_corpus)
    scorer = ProbeScorer(model, tok, batch_size=batch_size, ppl_texts=texts)
    env = environment(model)
    # batch size is part of the identity: padding changes float results at the 1e-8 level
    fp = fingerprint({"stage": "pre", "model": model_name, "model_id": model_id or model_name, "dataset": content_id,
                      "env": env, "batch_size": batch_size, "code": code_identity(SCORING_CODE),
                      "ppl_corpus": corpus_sha})

    def compute(case: Case):
        t0 = time.perf_counter()
        scores = scorer.score_case(case)
        return ({"case_id": case.case_id, "source": case.source, "model": model_name, "scores": scores, "env": env},
                {"score_s": time.perf_counter() - t0})

    return _resumable_loop(Path(out_path), cases, fp, compute, desc=f"pre-edit {model_name}", progress=progress,
                           journal=journal)


def run_cell(model, tok, spec: CellSpec, content_id: str, cases: list[Case], pre_path: Path, out_path: Path,
             batch_size: int = 32, verify_restore: bool = False, progress: bool = True,
             model_id: str | None = None, ppl_corpus: str | Path | None = None,
             journal: Path | None = None) -> list[dict]:
    """Edit → score → restore for each case of one cell (model × editor × ±SADR); ``model_id`` and ``journal`` as
    in `run_pre`. Everything is checked (pre-edit rows, editor, SADR support, hyper-parameters against the model)
    before any output is touched."""
    from editors.base import get_editor
    from evaluators.drift import DriftProbe
    from evaluators.scoring import ProbeScorer
    from model_layer.checksum import param_checksum

    if not Path(pre_path).is_file():
        raise UserError(f"{pre_path} not found: run the pre-edit stage first (`driftbench evaluate pre`)")
    pre = {r["case_id"]: r["scores"] for r in read_jsonl(pre_path)}
    missing = [c.case_id for c in cases if c.case_id not in pre]
    if missing:
        raise UserError(f"{pre_path} lacks pre-edit scores for {len(missing)} case(s), e.g. {missing[0]}: "
                        "run the pre-edit stage first (`driftbench evaluate pre`)")
    editor = get_editor(spec.editor)
    if spec.sadr and not getattr(editor, "supports_sadr", False):
        raise UserError(f"editor {spec.editor!r} does not support SADR: drop '+sadr' from the cell name")
    hparams = dict(spec.hparams, sadr=spec.sadr)
    if hasattr(editor, "check_hparams"):
        editor.check_hparams(model, hparams)
    texts, corpus_sha = _ppl_texts(ppl_corpus)
    scorer = ProbeScorer(model, tok, batch_size=batch_size, ppl_texts=texts)
    env = environment(model)
    fp = fingerprint({"stage": "cell", "cell": spec.cell_id, "model_id": model_id or spec.model_name,
                      "dataset": content_id, "hparams": hparams, "env": env, "batch_size": batch_size,
                      "code": code_identity(EDIT_CODE, (editor,)), "ppl_corpus": corpus_sha})
    before = param_checksum(model) if verify_restore else None
    probe = DriftProbe(model, tok) if spec.editor != "none" else None

    def compute(case: Case):
        if probe is not None:
            probe.before(case)
        t0 = time.perf_counter()
        handle = editor.edit(model, tok, case, hparams)
        t1 = time.perf_counter()
        post = scorer.score_case(case)
        t2 = time.perf_counter()
        diagnostics = dict(handle.diagnostics)
        if probe is not None:
            diagnostics["attn_drift"] = probe.after()
        t3 = time.perf_counter()
        handle.restore()
        if verify_restore and param_checksum(model) != before:
            raise RuntimeError(f"{spec.cell_id} {case.case_id}: weights differ after restore()")
        row = {"cell": spec.cell_id, "case_id": case.case_id, "source": case.source, "pre": pre[case.case_id],
               "post": post, "editor": {"name": spec.editor, "sadr": spec.sadr, "diagnostics": diagnostics},
               "env": env}
        return row, {"edit_s": t1 - t0, "score_s": t2 - t1, "drift_s": t3 - t2, "restore_s": time.perf_counter() - t3,
                     "editor": handle.timings}

    return _resumable_loop(Path(out_path), cases, fp, compute, desc=spec.cell_id, progress=progress, journal=journal)
