"""Submission bundles: the format, packing (``driftbench submit``) and validation (``driftbench validate``).

A bundle is a folder — or a ``.tar.gz`` holding one folder — with exactly these files
(format 1; the JSON Schema is ``leaderboard/schema/submission.schema.json``):

* ``metadata.json`` — who and what: editor (name, version, sadr flag, description, url, plugin entry point,
  hparams), model, profile, cell id, dataset version + content id, metric protocol ids, submitter, driftbench
  version and commit, and the sha256 of the two other files;
* ``cases.jsonl`` — one result row per case, exactly as ``driftbench run-cell`` writes them
  (``evaluators.probes`` contract: per probe key aligned ``[logprob_sum, n_tokens]`` pairs, pre and post);
* ``summary.json`` — ``{"bundle_format", "cell", "n_cases", "post": {protocol: score_cell(...)},
  "pre": {protocol: score_cell(...)}, "drift": drift_summary(...)}``;
* optionally ``README.md`` (free text, never rendered as HTML).

Validation trusts nothing it can recompute: it checks the schema, the dataset version and content id, the protocol
ids, file hashes, that every row belongs to the cell and to the dataset, and then recomputes every aggregate of
``summary.json`` from ``cases.jsonl`` with ``evaluators.metrics``; any difference rejects the bundle.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from basis import __version__
from basis.errors import UserError
from basis.io import JsonInputError, dumps_line, loads_strict
from evaluators.aggregate import parse_cell_id
from evaluators.metrics import PROTOCOLS
from leaderboard.scores import load_result_file, summarize

BUNDLE_FORMAT = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "submission.schema.json"
SCHEMA_HINT = "see leaderboard/schema/submission.schema.json and leaderboard/submissions/README.md"
REQUIRED_FILES = ("metadata.json", "cases.jsonl", "summary.json")
OPTIONAL_FILES = ("README.md",)
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_ERRORS = 20
REL_TOL, ABS_TOL = 1e-9, 1e-12  # recomputed floats may differ in the last bits across numpy builds, no more


class BundleError(UserError, ValueError):
    """A rejected bundle; ``errors`` lists every problem found, each naming the file and field and what to do."""

    def __init__(self, bundle: str | Path, errors: list[str]):
        self.bundle, self.errors = str(bundle), list(errors)
        super().__init__(f"{bundle}: bundle rejected ({len(errors)} problem{'s' if len(errors) != 1 else ''}):\n"
                         + "\n".join(f"  - {e}" for e in errors))


@dataclass
class Bundle:
    """A validated bundle: its metadata, rows and the summary recomputed from the rows."""
    path: Path
    metadata: dict
    rows: list[dict]
    summary: dict


# --------------------------------------------------------------------------------------------------- schema
def load_schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return json.load(fh)


def _inline(node: Any, defs: Mapping) -> Any:
    """The schema with every local ``{"$ref": "#/$defs/x"}`` replaced by ``x`` itself (the schema has no cycles):
    the same checks, without a reference lookup per row and field (≈3× faster on thousands of rows)."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):  # siblings of $ref here are annotations (description) only
            target = _inline(defs[ref[len("#/$defs/"):]], defs)
            return {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _validator(schema: dict, definition: str | None = None):
    from jsonschema import Draft202012Validator

    root = schema["$defs"][definition] if definition is not None else schema
    return Draft202012Validator(_inline(root, schema["$defs"]))


def _schema_errors(validator, obj: Any, where: str) -> list[str]:
    out = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])[:MAX_ERRORS]:
        field = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        msg = err.message if len(err.message) < 300 else err.message[:300] + "…"
        out.append(f"{where}: field {field!r}: {msg} ({SCHEMA_HINT})")
    return out


# --------------------------------------------------------------------------------------------------- reading
def read_bundle_files(path: str | Path) -> dict[str, bytes]:
    """``{file name: bytes}`` of a bundle folder or ``.tar.gz``; raises BundleError for unknown or missing files."""
    path = Path(path)
    allowed = set(REQUIRED_FILES) | set(OPTIONAL_FILES)
    files: dict[str, bytes] = {}
    errors: list[str] = []
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.name.startswith("."):
                continue  # .gitkeep, editor swap files
            if f.name not in allowed or not f.is_file() or f.is_symlink():
                errors.append(f"{f.name}: not part of a bundle (allowed: {', '.join(sorted(allowed))}); remove it")
            elif f.stat().st_size > MAX_FILE_BYTES:
                errors.append(f"{f.name}: larger than {MAX_FILE_BYTES} bytes")
            else:
                files[f.name] = f.read_bytes()
    elif path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        try:
            with tarfile.open(path, "r:gz") as tar:
                for m in tar.getmembers():
                    parts = [p for p in m.name.split("/") if p not in ("", ".")]
                    if m.isdir():
                        continue
                    name = parts[-1] if parts else ""
                    if not m.isfile() or len(parts) > 2 or ".." in parts or name not in allowed:
                        errors.append(f"{m.name}: not part of a bundle (a .tar.gz holds one folder with "
                                      f"{', '.join(REQUIRED_FILES)}); repack it with `driftbench submit --tar`")
                    elif m.size > MAX_FILE_BYTES:
                        errors.append(f"{m.name}: larger than {MAX_FILE_BYTES} bytes")
                    elif name in files:
                        errors.append(f"{m.name}: {name} appears twice in the archive")
                    else:
                        files[name] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BundleError(path, [f"not a readable .tar.gz ({exc}); repack it with `driftbench submit --tar`"])
    else:
        raise BundleError(path, ["not a bundle folder or .tar.gz; create one with `driftbench submit`"])
    for name in REQUIRED_FILES:
        if name not in files:
            errors.append(f"{name}: missing from the bundle; create bundles with `driftbench submit`")
    if errors:
        raise BundleError(path, errors)
    return files


def _json(files: Mapping[str, bytes], name: str, errors: list[str]) -> Any:
    """One JSON file of the bundle, parsed strictly (UTF-8, no duplicate keys, no NaN/Infinity, bounded nesting)."""
    try:
        return loads_strict(files[name], name)
    except JsonInputError as exc:
        errors.append(f"{exc}; regenerate it with `driftbench submit`")
        return None


def _rows(data: bytes, errors: list[str]) -> list:
    rows = []
    for no, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(loads_strict(line, f"cases.jsonl: line {no}"))
        except JsonInputError as exc:
            errors.append(f"{exc}; regenerate it with `driftbench submit`")
            if len(errors) >= MAX_ERRORS:
                break
    return rows


# --------------------------------------------------------------------------------------------------- comparing
def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def diff(claimed: Any, computed: Any, path: str, loose: frozenset = frozenset(),
         loose_tol: tuple[float, float] = (0.0, 0.0), _in_loose: bool = False) -> Iterator[str]:
    """Every place where ``claimed`` (from summary.json) differs from ``computed`` (from the rows). Numbers agree to
    float rounding (REL_TOL/ABS_TOL), except under a key in ``loose``, where they agree within ``loose_tol``
    (relative, absolute); lists are compared element by element."""
    if isinstance(computed, Mapping):
        if not isinstance(claimed, Mapping):
            yield f"{path} should be an object"
            return
        for k in sorted(set(claimed) | set(computed), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in claimed:
                yield f"{sub} is missing (the rows give {json.dumps(computed[k])[:80]})"
            elif k not in computed:
                yield f"{sub} is not a value computed from the rows"
            else:
                yield from diff(claimed[k], computed[k], sub, loose, loose_tol, _in_loose or k in loose)
    elif isinstance(computed, list) and isinstance(claimed, list) and len(claimed) == len(computed):
        for i, (a, b) in enumerate(zip(claimed, computed)):
            yield from diff(a, b, f"{path}[{i}]", loose, loose_tol, _in_loose)
    elif _is_num(computed) and _is_num(claimed):
        rel, abs_ = loose_tol if _in_loose else (REL_TOL, ABS_TOL)
        if not math.isclose(float(claimed), float(computed), rel_tol=rel, abs_tol=abs_):
            yield f"{path} is {claimed!r} but the rows give {computed!r}"
    elif claimed != computed or type(claimed) is bool and type(computed) is not bool:
        yield f"{path} is {json.dumps(claimed)[:80]} but the rows give {json.dumps(computed)[:80]}"


# --------------------------------------------------------------------------------------------------- validation
def expected_cell(meta: Mapping) -> str:
    ed = meta["editor"]
    return f"{meta['profile']}/{meta['model']}/{ed['name']}{'+sadr' if ed['sadr'] else ''}"


def _cell_matches(meta: Mapping) -> bool:
    """The cell id is what profile/model/editor give, with any mode and seed suffix the grammar allows
    (basis.cells: ``.seq16``, ``.s2``)."""
    from basis.cells import parse_cell_id as parse

    try:
        cid = parse(meta["cell"])
    except UserError:
        return False
    ed = meta["editor"]
    return (cid.profile, cid.model, cid.name.editor, cid.name.sadr) == (meta["profile"], meta["model"], ed["name"],
                                                                        ed["sadr"])


def validate_bundle(path: str | Path, datasets: Mapping[str, str], dataset_cases: Mapping[str, str] | None = None,
                    profile_cases: Mapping[str, set] | None = None) -> Bundle:
    """Validate a bundle folder or ``.tar.gz``; return it, or raise :class:`BundleError` (and nothing else: content
    malformed in a way no check names still becomes a BundleError, so one bad bundle can never crash a build).

    ``profile_cases``: profile name → the case ids a full run of it covers; when given, a bundle must cover exactly
    its profile's cases, or say ``"partial": true`` and cover a subset of them (listed apart, never ranked)."""
    try:
        return _validate(path, datasets, dataset_cases, profile_cases)
    except BundleError:
        raise
    except (TypeError, KeyError, AttributeError, ValueError, IndexError, RecursionError, OverflowError) as exc:
        raise BundleError(path, [f"malformed content ({type(exc).__name__}: {str(exc)[:200]}); regenerate the bundle "
                                 "with `driftbench submit`"]) from None


def _validate(path: str | Path, datasets: Mapping[str, str], dataset_cases: Mapping[str, str] | None,
              profile_cases: Mapping[str, set] | None) -> Bundle:
    """Validate a bundle folder or ``.tar.gz``; return it, or raise :class:`BundleError` listing every problem.

    ``datasets``: accepted dataset versions → content ids (from ``data/<version>/card.json``).
    ``dataset_cases``: case_id → source of that dataset; when given, every row's case must be in it with the
    same source."""
    path = Path(path)
    files = read_bundle_files(path)
    schema = load_schema()
    errors: list[str] = []

    meta = _json(files, "metadata.json", errors)
    meta_ok = False
    if meta is not None:
        meta_errors = _schema_errors(_validator(schema), meta, "metadata.json")
        errors += meta_errors
        meta_ok = not meta_errors
        if meta_ok:
            if not _cell_matches(meta):
                errors.append(f"metadata.json: field 'cell' is {meta['cell']!r} but profile/model/editor.name/"
                              f"editor.sadr give {expected_cell(meta)!r}; make them agree")
            ds = meta["dataset"]
            if ds["version"] not in datasets:
                known = ", ".join(f"{v} (content id {c})" for v, c in sorted(datasets.items())) or "none"
                errors.append(f"metadata.json: field 'dataset.version' is {ds['version']!r}, which this leaderboard "
                              f"does not accept (accepted: {known}); rerun the cell on an accepted dataset version")
            elif ds["content_id"] != datasets[ds["version"]]:
                errors.append(f"metadata.json: field 'dataset.content_id' is {ds['content_id']!r} but dataset "
                              f"{ds['version']} has content id {datasets[ds['version']]!r} (data/{ds['version']}/"
                              "card.json); the rows were computed on other cases: rebuild the dataset with "
                              "`driftbench dataset build` and rerun the cell")
            unknown = [p for p in meta["protocol_ids"] if p not in PROTOCOLS]
            if unknown:
                errors.append(f"metadata.json: field 'protocol_ids' names unknown protocol(s) {unknown}; "
                              f"known: {sorted(PROTOCOLS)}")
            for name in ("cases.jsonl", "summary.json"):
                digest = hashlib.sha256(files[name]).hexdigest()
                if digest != meta["files"][name]["sha256"]:
                    errors.append(f"metadata.json: field 'files.{name}.sha256' does not match {name} (it hashes to "
                                  f"{digest}); the file changed after packing: repack with `driftbench submit`")

    rows = _rows(files["cases.jsonl"], errors)
    if not rows and not any(e.startswith("cases.jsonl") for e in errors):
        errors.append("cases.jsonl: no rows; pack a cell that has results")
    row_validator = _validator(schema, "case_row")
    seen: set = set()
    for no, row in enumerate(rows, 1):
        if len(errors) >= MAX_ERRORS:
            errors.append("… further problems not listed")
            break
        row_errors = _schema_errors(row_validator, row, f"cases.jsonl: row {no}")
        if row_errors:
            errors += row_errors[:3]
            continue
        cid = row["case_id"]
        if cid in seen:
            errors.append(f"cases.jsonl: row {no}: case_id {cid!r} appears twice; keep one row per case")
        seen.add(cid)
        if meta_ok:
            if row["cell"] != meta["cell"]:
                errors.append(f"cases.jsonl: row {no}: field 'cell' is {row['cell']!r}, not the bundle's cell "
                              f"{meta['cell']!r}; a bundle holds one cell")
            if row["editor"]["name"] != meta["editor"]["name"] or row["editor"]["sadr"] != meta["editor"]["sadr"]:
                errors.append(f"cases.jsonl: row {no}: field 'editor' ({row['editor']['name']!r}, sadr="
                              f"{row['editor']['sadr']}) differs from metadata.json's editor")
        if dataset_cases is not None:
            if cid not in dataset_cases:
                errors.append(f"cases.jsonl: row {no}: case_id {cid!r} is not a case of the dataset; "
                              "run the cell on the dataset's cases")
            elif dataset_cases[cid] != row["source"]:
                errors.append(f"cases.jsonl: row {no}: field 'source' is {row['source']!r} but case {cid} comes "
                              f"from {dataset_cases[cid]!r}")
    if meta_ok and rows and meta["n_cases"] != len(rows):
        errors.append(f"metadata.json: field 'n_cases' is {meta['n_cases']} but cases.jsonl has {len(rows)} rows")
    if meta_ok and rows and profile_cases is not None and not errors:
        errors += coverage_errors(meta, {r["case_id"] for r in rows}, profile_cases)

    summary = _json(files, "summary.json", errors)
    if summary is not None:
        s_errors = _schema_errors(_validator(schema, "summary"), summary, "summary.json")
        errors += s_errors
        if not s_errors and meta_ok:
            if summary["cell"] != meta["cell"]:
                errors.append(f"summary.json: field 'cell' is {summary['cell']!r}, not {meta['cell']!r}")
            for phase in ("post", "pre"):
                if sorted(summary[phase]) != sorted(meta["protocol_ids"]):
                    errors.append(f"summary.json: field {phase!r} has protocols {sorted(summary[phase])} but "
                                  f"metadata.json's protocol_ids are {sorted(meta['protocol_ids'])}")
    if errors:
        raise BundleError(path, errors)

    try:
        computed = dict(bundle_format=BUNDLE_FORMAT, cell=meta["cell"], n_cases=len(rows),
                        **summarize(rows, meta["protocol_ids"]))
    except ValueError as exc:  # a malformed number or pair, named by evaluators.metrics
        raise BundleError(path, [f"cases.jsonl: {exc}"]) from None
    mismatches = list(diff(summary, computed, ""))
    if mismatches:
        raise BundleError(path, [f"summary.json: {m}; summary.json must be exactly what the rows give: regenerate "
                                 "it with `driftbench submit` (never edit it by hand)" for m in mismatches[:MAX_ERRORS]])
    return Bundle(path=path, metadata=meta, rows=rows, summary=computed)


def coverage_errors(meta: Mapping, got: set, profile_cases: Mapping[str, set]) -> list[str]:
    """A full run covers exactly its profile's case set; a run labelled ``partial`` covers part of it."""
    want = profile_cases.get(meta["profile"])
    if want is None:
        return [f"metadata.json: field 'profile' is {meta['profile']!r}, which this leaderboard does not define "
                f"(profiles: {', '.join(sorted(profile_cases)) or 'none'}); run the cell under one of them"]
    outside = sorted(got - set(want))
    if outside:
        return [f"cases.jsonl: {len(outside)} case(s) are not in profile {meta['profile']!r}'s case set, e.g. "
                f"{outside[0]}; run the cell on the profile's cases (`driftbench run-cell -p {meta['profile']}`)"]
    if len(got) != len(want) and not meta.get("partial"):
        return [f"cases.jsonl: covers {len(got)} of the {len(want)} cases of profile {meta['profile']!r}; finish the "
                "run, or label the bundle a partial run (`driftbench submit --partial`: listed apart, never ranked)"]
    return []


def dataset_cases(cases_jsonl: str | Path) -> dict[str, str]:
    """case_id → source of a dataset's ``cases.jsonl``."""
    out = {}
    with open(cases_jsonl, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                out[rec["case_id"]] = rec["source"]
    return out


def find_bundles(root: str | Path) -> list[Path]:
    """Every bundle under ``root``: folders holding a ``metadata.json``, and ``.tar.gz`` files (sorted)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {p.parent for p in root.rglob("metadata.json")}
    found |= {p for p in root.rglob("*.tar.gz") if p.is_file()}
    return sorted(found)


# --------------------------------------------------------------------------------------------------- packing
def bundle_name(cell: str) -> str:
    """Folder name of a cell's bundle: ``embedded__smollm2-135m__rome+sadr``."""
    return cell.replace("/", "__")


def pack_bundle(result_file: str | Path, out: str | Path, *, dataset: Mapping[str, str], editor: Mapping[str, Any],
                submitter: Mapping[str, str], protocols: list[str] | None = None, git_commit: str = "unknown",
                notes: str | None = None, tar: bool = False, datasets: Mapping[str, str] | None = None,
                dataset_case_map: Mapping[str, str] | None = None, partial: bool = False,
                profile_cases: Mapping[str, set] | None = None) -> Path:
    """Pack one cell's result file into a bundle at ``out`` (a folder, or ``out`` + ``.tar.gz`` when ``tar``),
    validate it, and return its path. ``editor`` holds version, description and optionally url, plugin, package,
    hparams; name and sadr come from the cell id. Written atomically: nothing appears unless it validates."""
    cell, rows = load_result_file(result_file)
    info = parse_cell_id(cell)
    protocols = list(protocols or PROTOCOLS)
    body = "".join(dumps_line(r) + "\n" for r in rows).encode("utf-8")
    summary = dict(bundle_format=BUNDLE_FORMAT, cell=cell, n_cases=len(rows), **summarize(rows, protocols))
    summary_bytes = (json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    meta: dict[str, Any] = {
        "bundle_format": BUNDLE_FORMAT,
        "driftbench_version": __version__,
        "cell": cell,
        "profile": info["profile"],
        "model": info["model"],
        "editor": {"version": "unversioned", "description": "", **{k: v for k, v in editor.items() if v is not None},
                   "name": info["base_editor"], "sadr": info["sadr"]},
        "dataset": dict(dataset),
        "protocol_ids": protocols,
        "n_cases": len(rows),
        "submitter": {k: v for k, v in submitter.items() if v},
        "git_commit": git_commit if git_commit else "unknown",
        "files": {"cases.jsonl": {"sha256": hashlib.sha256(body).hexdigest(), "rows": len(rows)},
                  "summary.json": {"sha256": hashlib.sha256(summary_bytes).hexdigest()}},
    }
    if notes:
        meta["notes"] = notes
    if partial:
        meta["partial"] = True
    meta_bytes = (json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    contents = {"metadata.json": meta_bytes, "cases.jsonl": body, "summary.json": summary_bytes}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        folder = tmp / out.name
        folder.mkdir()
        for name, data in contents.items():
            (folder / name).write_bytes(data)
        target = folder
        if tar:
            target = tmp / f"{out.name}.tar.gz"
            _write_tar(folder, target)
        validate_bundle(target, datasets if datasets is not None else {dataset["version"]: dataset["content_id"]},
                        dataset_case_map, profile_cases)
        final = out.with_name(out.name + ".tar.gz") if tar else out
        if final.exists():
            raise FileExistsError(f"{final} exists; remove it or pass another --out")
        os.replace(target, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_tar(folder: Path, target: Path) -> None:
    """A reproducible .tar.gz: sorted names, zero mtimes/owners, one top-level folder."""
    import gzip

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(folder.iterdir()):
            data = f.read_bytes()
            ti = tarfile.TarInfo(f"{folder.name}/{f.name}")
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
            tar.addfile(ti, io.BytesIO(data))
    with open(target, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue())
