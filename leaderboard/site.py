"""The static leaderboard (``driftbench leaderboard``): result files → ``site/`` (reads files only; no torch).

Inputs: per-case result files of pipeline cells (``results/<profile>/<model>/cells/*.jsonl``), accepted submission
bundles (``leaderboard/submissions/``), the paper's reported numbers (``paper_reported.csv`` of the data mirror),
dvc.lock, params.yaml and the dataset card. Every score is recomputed from per-case rows with
``evaluators.metrics.score_cell`` (summaries inside bundles are only compared, never shown).

Output (written to a temporary folder next to ``out_dir`` and swapped in with renames, so ``site/`` is either the
old or the complete new build)::

    site/index.html            one table per model (+ SADR deltas + trade-off chart), filters and sorting
    site/cells/<slug>.html     per-cell page: scores, drift, provenance, per-case drill-down
    site/cells/<slug>.csv      the drill-down's per-case numbers
    site/data/summary.json     pipeline cells in the exact format of ``evaluators.aggregate`` (results/summary.json)
    site/data/leaderboard.json every leaderboard entry with its provenance (frozen JSON release of the site)
    site/assets/               leaderboard.css, leaderboard.js (no network requests, no external files)

Pages work from ``file://`` and from any static host: data are embedded in the HTML as JSON blocks, scripts only
set ``textContent``, and a Content-Security-Policy forbids inline scripts and every network request.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from markupsafe import Markup

from basis import __version__
from basis.cells import parse_cell
from evaluators.aggregate import PRE_LABEL, TABLE_METRICS, SummaryBuilder, parse_cell_id
from evaluators.metrics import MAGNITUDES, PROTOCOLS, get_protocol, score_cell_protocols
from leaderboard import provenance as prov
from leaderboard.chart import tradeoff_svg
from leaderboard.paper import normalise_name, read_paper_csv
from leaderboard.scores import load_result_file, per_case
from leaderboard.submission import BundleError, diff, find_bundles, validate_bundle

HERE = Path(__file__).resolve().parent
# other papers' reported tables (AlphaEdit's Table 1, ...): transcribed CSVs shipped with the leaderboard
REPORTED = HERE / "reported"
INDEX_METRICS: tuple[str, ...] = TABLE_METRICS + ("FL", "PPL")   # then Avg.S
RAW_METRICS = ("PPL",)            # a perplexity, shown as it is (FL is shown × 100 like the paper)
KIND_ORDER = {"pre": 0, "pipeline": 1, "submission": 2, "paper": 3}
ORIGIN = {"pre": "pipeline", "pipeline": "pipeline", "submission": "submission", "paper": "paper"}
ORIGIN_TEXT = {"pipeline": "this pipeline", "submission": "submission", "paper": "reported in paper"}


@dataclass
class Entry:
    """One leaderboard entry: a cell of this pipeline, the unedited model, a submission, or a paper row."""
    key: str
    kind: str                      # pre | pipeline | submission | paper
    model: str                     # model name as its source spells it
    profile: str
    editor: str                    # display name: "rome+sadr", "pre (unedited)", …
    base_editor: str               # lower-case, for filters and SADR pairs
    sadr: bool
    dataset: str                   # dataset version, e.g. "paper-v1" (the filter value)
    n_cases: int | None
    scores: dict                   # protocol id -> score_cell output (+ FL/PPL when present)
    drift: dict = field(default_factory=dict)
    badges: list = field(default_factory=list)   # [(css class, text, tooltip)]
    note: str = ""
    cell: str | None = None
    href: str | None = None
    page: dict | None = None       # cell-page data (provenance, per-case), pipeline and submission entries
    group: str = ""
    dataset_id: str | None = None  # its content id (None for the paper's own rows)
    steps: bool = False            # the steps-matched control (+steps): SADR's step count, no SADR

    @property
    def origin(self) -> str:
        return ORIGIN[self.kind]


# --------------------------------------------------------------------------------------------------- helpers
def slug(text: str, prefix: str = "", unique: str | None = None) -> str:
    """File-name-safe, collision-free name: readable part of ``text`` + 8 hex of the sha256 of ``unique`` (default
    ``text``)."""
    readable = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "cell"
    return f"{prefix}{readable}-{hashlib.sha256((unique or text).encode('utf-8')).hexdigest()[:8]}"


def json_script(obj: Any) -> Markup:
    """JSON for a ``<script type="application/json">`` block: ``<``, ``>``, ``&`` escaped so no text can end it."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return Markup(text)


def fmt_metric(metric: str, value: Mapping | float | None, ci: bool = True) -> tuple[str, str, str]:
    """``(value text, ci text, sort key)`` of one table entry; accuracies in %, FL × 100, PPL raw, "–" when missing."""
    if isinstance(value, Mapping):
        mean, half = value.get("mean"), value.get("ci95")
    else:
        mean, half = value, None
    if mean is None:
        return "–", "", ""
    scale = 1.0 if metric in RAW_METRICS else 100.0
    text = f"{mean * scale:.2f}"
    ci_text = f"±{half * scale:.2f}" if (ci and half is not None) else ""
    return text, ci_text, repr(float(mean))


def metric_value(scores: Mapping | None, metric: str):
    if not scores:
        return None
    return scores.get("AvgS") if metric == "Avg.S" else scores.get(metric)


def _mean(v) -> float | None:
    return v.get("mean") if isinstance(v, Mapping) else v


def _ci(v) -> float | None:
    return v.get("ci95") if isinstance(v, Mapping) else None




# --------------------------------------------------------------------------------------------------- collection
@dataclass
class SiteData:
    entries: list[Entry]
    protocols: list[str]
    build: dict
    summary: dict                  # aggregate-compatible summary of the pipeline cells
    rejected: list[str] = field(default_factory=list)
    diagnosis: list = field(default_factory=list)  # leaderboard.diagnosis.DiagnosisPage, one per model analysed


def collect(result_files: Iterable[str | Path], *, submissions_dir: str | Path | None = None,
            paper_csv: str | Path | None = None, dvc_lock: str | Path | list | None = None,
            params: Mapping | None = None, card: Mapping | None = None, git: Mapping | None = None,
            protocols: Iterable[str] = ("paper", "lm-eval"), on_invalid: str = "error",
            dataset_cases: Mapping[str, str] | None = None, root: str | Path = ".",
            profile_cases: Mapping[str, set] | None = None, log=None,
            diagnosis: Iterable[tuple[str, str, str | Path]] = ()) -> SiteData:
    """Read every input and compute every entry (no rendering). ``on_invalid``: "error" raises on an invalid
    submission bundle; "skip" leaves it out and records why in ``SiteData.rejected``. ``diagnosis``: (profile,
    model, result folder) of each model whose analysis pages the site shows (those with analysis outputs)."""
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    log = log or (lambda msg: None)
    protocols = [get_protocol(p).id for p in protocols]
    git = dict(git) if git is not None else prov.git_commit(root)
    lock = prov.read_dvc_lock(dvc_lock, root)  # one lock file or several (prov.read_dvc_lock)
    version = (card or {}).get("version") or ((params or {}).get("data") or {}).get("version")
    content_id = (card or {}).get("content_id")
    datasets = {version: content_id} if version and content_id else {}
    our_dataset = version or "unknown"
    entries: list[Entry] = []

    # ---- pipeline cells, one result file at a time (rows are dropped after use; pre rows kept per model)
    builder = SummaryBuilder(protocols)       # cell + pre-edit summaries exactly as evaluators.aggregate
    cell_pages: list[tuple[Entry, set]] = []
    for path in sorted(Path(p) for p in result_files):
        cell, rows = load_result_file(path)
        info = parse_cell_id(cell)
        log(f"{cell}: {len(rows)} cases")
        cell_entry = builder.add(path, cell, rows)
        scores = {p: cell_entry[p] for p in protocols}
        drift = cell_entry["drift"]
        stage = prov.stage_of_output(lock, path, root)
        page = {
            "per_case": per_case(rows, protocols),
            "provenance": {
                "result_file": _rel(path, root),
                "dvc": stage,
                "hparams": prov.hparams_slice(params, info["profile"], info["model"], info["base_editor"]),
                "dataset": {"version": version, "content_id": content_id},
                "git": git,
                "environments": prov.environments(rows),
                "fingerprints": prov.fingerprints(rows),
            },
        }
        e = Entry(key=f"pipeline:{cell}", kind="pipeline", model=info["model"], profile=info["profile"],
                  editor=info["editor"], base_editor=info["base_editor"].lower(), sadr=info["sadr"],
                  steps=bool(info.get("steps_matched")),
                  dataset=our_dataset, dataset_id=content_id, n_cases=len(rows), scores=scores, drift=drift,
                  cell=cell, page=page,
                  badges=[("b-pipeline", "this pipeline", "computed by `dvc repro` of this repository")])
        if stage is not None and not stage["out_matches"]:
            e.badges.append(("b-warn", "changed since dvc.lock",
                             "the result file differs from the md5 that dvc.lock records: rerun `dvc repro`"))
        entries.append(e)
        cell_pages.append((e, set(page["per_case"]["case_id"])))
        del rows

    # ---- the unedited model, once per model over the union of its cells' cases (as evaluators.aggregate does)
    summary_pre = builder.pre()
    pre_by_model: dict[str, tuple[dict, set]] = {}
    for mkey, pre_entry in summary_pre.items():
        profile, model = pre_entry["profile"], pre_entry["model"]
        scores = {p: pre_entry[p] for p in protocols}
        pre_by_model[mkey] = (scores, set(builder.pre_rows[mkey]))
        entries.append(Entry(key=f"pre:{mkey}", kind="pre", model=model, profile=profile, editor=PRE_LABEL,
                             base_editor="none", sadr=False, dataset=our_dataset, dataset_id=content_id,
                             n_cases=pre_entry["n_cases"], scores=scores,
                             badges=[("b-pipeline", "this pipeline", "pre-edit scores shared by every editor"),
                                     ("b-pre", "unedited", "the model before any edit")]))
    for e, case_ids in cell_pages:       # pre-edit scores of exactly the cell's cases, for its page
        mkey = f"{e.profile}/{e.model}"
        scores, union = pre_by_model[mkey]
        if case_ids == union:
            e.page["pre"] = scores
        else:
            rows = [builder.pre_rows[mkey][c] for c in sorted(case_ids)]
            e.page["pre"] = score_cell_protocols(rows, "pre", protocols)
    summary_doc = builder.summary(summary_pre)
    del builder

    # ---- submissions (validated again here: schema, dataset, protocols, recomputed aggregates)
    rejected: list[str] = []
    pipeline_by_cell = {e.cell: (e, ids) for e, ids in cell_pages}
    for bpath in find_bundles(submissions_dir) if submissions_dir else []:
        try:
            b = validate_bundle(bpath, datasets, dataset_cases, profile_cases)
        except BundleError as exc:
            if on_invalid == "error":
                raise
            rejected.append(str(exc))
            log(f"skipped invalid bundle {bpath}")
            continue
        m = b.metadata
        info = parse_cell_id(m["cell"])
        scores = {p: b.summary["post"][p] for p in m["protocol_ids"]}
        e = Entry(key=f"submission:{_rel(bpath, root)}", kind="submission", model=info["model"],
                  profile=info["profile"], editor=info["editor"], base_editor=info["base_editor"].lower(),
                  sadr=info["sadr"], dataset=m["dataset"]["version"], dataset_id=m["dataset"]["content_id"],
                  n_cases=len(b.rows), scores=scores, drift=b.summary["drift"], cell=m["cell"],
                  note=f"v{m['editor']['version']} · {m['submitter']['name']}")
        reproduced, differences = verification(b, pipeline_by_cell.get(m["cell"]))
        if differences and m["cell"] in pipeline_by_cell:
            log(f"{bpath}: not verified: {len(differences)} difference(s) from the pipeline, e.g. {differences[0]}")
        e.badges.append(("b-verified", "verified", f"reproduced by this pipeline ({reproduced})") if reproduced
                        else ("b-self", "self-reported", "submitted results, validated but not reproduced by the "
                              "pipeline"))
        e.page = {"per_case": per_case(b.rows, m["protocol_ids"]), "pre": b.summary["pre"],
                  "provenance": {"bundle": _rel(bpath, root), "metadata": m, "verified": reproduced,
                                 "differences": differences[:20],
                                 "environments": prov.environments(b.rows),
                                 "fingerprints": prov.fingerprints(b.rows), "git": git}}
        entries.append(e)

    # ---- the paper's reported rows, and other papers' tables shipped with the leaderboard (REPORTED)
    reported = [(f"paper:{i}", rec, "Wang et al. (ICLR 2025)")
                for i, rec in enumerate(read_paper_csv(paper_csv) if paper_csv else [])]
    for path in sorted(REPORTED.glob("*.csv")) if paper_csv else []:
        reported += [(f"reported:{path.stem}:{i}", rec, path.name)
                     for i, rec in enumerate(read_paper_csv(path, verify=False))]
    for key, rec, cite in reported:
        base = rec["editor"].lower()
        e = Entry(key=key, kind="paper", model=rec["model"], profile="paper",
                  editor=base + ("+sadr" if rec["sadr"] else ""), base_editor=base, sadr=rec["sadr"],
                  dataset=rec["dataset"], n_cases=None, scores=rec["scores"], note=rec["source"],
                  badges=[("b-paper", "reported in paper", f"{rec['source']}, {cite}, transcribed; not recomputed")])
        if rec["regime"]:
            e.badges.append(("b-mode", rec["regime"], f"editing regime {rec['regime']} on {rec['dataset']}: "
                             "another protocol, never ranked with single edits"))
        entries.append(e)

    _assign_groups(entries, params)
    for e in entries:  # partial runs get a table of their own: listed, never ranked with full runs
        if e.kind == "submission" and e.page["provenance"]["metadata"].get("partial"):
            e.group = f"{e.group} · partial runs (not ranked)"
            e.badges.append(("b-partial", "partial run", f"covers {e.n_cases} cases, not the profile's full set"))
    for key, rec, _ in reported:  # other regimes reported elsewhere: a table of their own
        if rec["regime"]:
            e = next(x for x in entries if x.key == key)
            e.group = f"{e.group} · {rec['regime']} ({rec['source']}; dataset {rec['dataset']})"
    for e in entries:  # streams and batches: their own table, labelled with the editing regime and evaluation timing
        mode = parse_cell_id(e.cell).get("mode") if e.cell else None
        if mode:
            label = parse_cell(e.cell.rsplit("/", 1)[1]).mode.label
            e.group = f"{e.group} · {mode}: {label}"
            e.badges.append(("b-mode", mode, f"protocol {mode}: {label}; drift against the unedited model"))
    for e in entries:
        if e.page is not None:
            e.href = f"cells/{slug(e.cell or e.key, 'sub-' if e.kind == 'submission' else '', e.key)}.html"
    summary = summary_doc
    build = {"git": git, "driftbench_version": __version__, "dataset": {"version": version, "content_id": content_id},
             "paper_csv": Path(paper_csv).name if paper_csv else None, "n_rows": sum(
                 len(e.page["per_case"]["case_id"]) for e in entries if e.page)}
    from leaderboard.diagnosis import read_page

    pages = [p for p in (read_page(prof, model, Path(d)) for prof, model, d in diagnosis) if p is not None]
    return SiteData(entries=entries, protocols=protocols, build=build, summary=summary, rejected=rejected,
                    diagnosis=pages)


def _rel(path: str | Path, root: str | Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


VERIFY_REL, VERIFY_ABS = 1e-2, 1e-4  # continuous values (magnitudes, FL, PPL, drift) across machines' numerics
CONTINUOUS = frozenset(MAGNITUDES) | {"FL", "PPL", "drift", "drift_DNS", "drift_RS"}


def _by_case(pc: Mapping) -> dict[str, dict]:
    """per_case columns → {case_id: every value the drill-down shows for that case}."""
    out: dict[str, dict] = {}
    for i, cid in enumerate(pc["case_id"]):
        out[cid] = {"source": pc["source"][i],
                    "n": {ph: {m: v[i] for m, v in ms.items()} for ph, ms in pc["n"].items()},
                    "s": {p: {ph: {m: v[i] for m, v in ms.items()} for ph, ms in phs.items()}
                          for p, phs in pc["s"].items()},
                    "drift": {k: v[i] for k, v in pc["drift"].items()}}
    return out


def _differences(ours: Any, theirs: Any, path: str) -> list[str]:
    """Where a submission's value (``theirs``) differs from the pipeline's (`leaderboard.submission.diff`, where
    "the rows" are the pipeline's): discrete values to float rounding, CONTINUOUS subtrees within VERIFY_REL/ABS."""
    return list(diff(theirs, ours, path, loose=CONTINUOUS, loose_tol=(VERIFY_REL, VERIFY_ABS)))


def verification(bundle, pipeline: tuple[Entry, set] | None) -> tuple[str | None, list[str]]:
    """(why the pipeline reproduces the submission, or None; the differences found). Verified means every number
    the site shows for the submission — every metric with its CI and count, magnitudes, FL/PPL, drift, pre-edit
    scores, each case's drill-down — equals what this pipeline recomputed for the same cell, on the same dataset
    and case set, with the same hyper-parameters (continuous values within 1%, see VERIFY_REL)."""
    if pipeline is None:
        return None, ["the pipeline has not run this cell"]
    entry, case_ids = pipeline
    m = bundle.metadata
    if (entry.dataset, entry.dataset_id) != (m["dataset"]["version"], m["dataset"]["content_id"]):
        return None, ["another dataset version"]
    if case_ids != {r["case_id"] for r in bundle.rows}:
        return None, ["another case set"]
    ours_hp, theirs_hp = entry.page["provenance"].get("hparams"), m["editor"].get("hparams")
    diffs = []
    if theirs_hp is not None and ours_hp is not None:
        diffs += [f"hparams: {d}" for d in _differences(ours_hp, theirs_hp, "")]
    for p in m["protocol_ids"]:
        if p not in entry.scores:
            return None, [f"the pipeline has no {p!r} scores"]
        diffs += _differences(entry.scores[p], bundle.summary["post"][p], f"post.{p}")
        diffs += _differences(entry.page["pre"][p], bundle.summary["pre"][p], f"pre.{p}")
    diffs += _differences({"drift": entry.drift}, {"drift": bundle.summary["drift"]}, "")
    ours_pc = _by_case(entry.page["per_case"])
    theirs_pc = _by_case(per_case(bundle.rows, m["protocol_ids"]))
    for cid, theirs in theirs_pc.items():
        ours = dict(ours_pc[cid], s={p: ours_pc[cid]["s"][p] for p in m["protocol_ids"]})
        diffs += _differences(ours, theirs, f"case {cid}")
    if diffs:
        return None, diffs
    return (f"same cell, dataset, hyper-parameters and {len(case_ids)} cases; every number shown equals the "
            f"pipeline's (continuous values within {VERIFY_REL:.0%})"), []


def _assign_groups(entries: list[Entry], params: Mapping | None) -> None:
    """One table per model: entries whose model names normalise alike (``GPT-J-6B`` ~ ``gpt-j-6b``) share one; the
    table is named after our model key when we have one."""
    names: dict[str, str] = {}
    for prof in ((params or {}).get("profiles") or {}).values():
        for key in (prof.get("models") or {}):
            names.setdefault(normalise_name(key), key)
    for e in entries:
        if e.kind != "paper":
            names[normalise_name(e.model)] = e.model
    for e in entries:
        e.group = names.get(normalise_name(e.model), e.model)


# --------------------------------------------------------------------------------------------------- views
def _sort_key(e: Entry) -> tuple:
    return (0 if e.base_editor == "none" else 1, e.base_editor, e.sadr, KIND_ORDER[e.kind], e.note, e.key)


def _row_view(e: Entry, protocol: str) -> dict:
    scores = e.scores.get(protocol)
    cells = []
    for metric in INDEX_METRICS + ("Avg.S",):
        text, ci, key = fmt_metric(metric, metric_value(scores, metric))
        cells.append({"metric": metric, "text": text, "ci": ci, "key": key})
    return {"e": e, "protocol": protocol, "cells": cells, "sadr": "true" if e.sadr else "false",
            "origin": e.origin, "n_cases": "" if e.n_cases is None else e.n_cases}


def _pair_key(e: Entry) -> tuple:
    """Entries that differ only by the SADR flag share this key (same origin, profile, dataset, paper table or
    submission version, base editor, and whether it is the steps-matched control, which pairs with nothing)."""
    return (e.origin, e.profile, e.dataset, e.dataset_id or "", e.note, e.base_editor, e.steps)


def _delta_rows(entries: list[Entry], protocols: list[str]) -> list[dict]:
    """Per (origin, profile, dataset, paper table, editor, protocol): ``+sadr`` minus plain, and ``+sadr`` minus
    ``+steps`` (the steps-matched control: SADR's effect beyond its extra steps) where that cell exists, in points.
    The ± is sqrt(ci_a² + ci_b²), an unpaired normal approximation (conservative: both cells share their cases)."""
    groups: dict[tuple, dict[str, Entry]] = {}
    for e in entries:
        if e.kind in ("pipeline", "submission", "paper") and e.base_editor != "none":
            groups.setdefault(_pair_key(e)[:-1], {})["sadr" if e.sadr else "steps" if e.steps else "plain"] = e
    out = []
    for key in sorted(groups, key=str):
        g = groups[key]
        for base, vs in (("plain", "editor"), ("steps", "editor+steps")):
            if base in g and "sadr" in g:
                out += _delta(g[base], g["sadr"], vs, protocols)
    return out


def _delta(a: Entry, b: Entry, vs: str, protocols: list[str]) -> list[dict]:
    """Rows of ``b`` minus ``a`` per protocol (``vs`` names what ``a`` is)."""
    out = []
    for p in protocols:
        sa, sb = a.scores.get(p), b.scores.get(p)
        if not sa or not sb:
            continue
        cells = []
        for metric in INDEX_METRICS + ("Avg.S",):
            va, vb = metric_value(sa, metric), metric_value(sb, metric)
            ma, mb = _mean(va), _mean(vb)
            if ma is None or mb is None:
                cells.append({"metric": metric, "text": "–", "ci": "", "key": "", "cls": ""})
                continue
            scale = 1.0 if metric in RAW_METRICS else 100.0
            d = (mb - ma) * scale
            ca, cb = _ci(va), _ci(vb)
            ci = f"±{((ca ** 2 + cb ** 2) ** 0.5) * scale:.2f}" if ca is not None and cb is not None else ""
            cls = "" if metric in RAW_METRICS or abs(d) < 0.005 else ("pos" if d > 0 else "neg")
            cells.append({"metric": metric, "text": f"{d:+.2f}", "ci": ci, "key": repr(d), "cls": cls})
        out.append({"editor": a.base_editor, "vs": vs, "origin": a.origin, "origin_text": ORIGIN_TEXT[a.origin],
                    "note": a.note or a.profile, "dataset": a.dataset, "protocol": p,
                    "cells": cells, "href_a": a.href, "href_b": b.href})
    return out


def _chart_points(entries: list[Entry], protocol: str) -> list[dict]:
    pts = []
    for e in entries:
        s = e.scores.get(protocol)
        if not s:
            continue
        label = e.editor if e.kind != "pre" else "pre"
        if e.kind == "paper":
            label += " (paper)"
        elif e.kind == "submission":
            label += " (sub.)"
        pts.append({"label": label, "kind": e.kind, "origin": e.origin, "origin_text": ORIGIN_TEXT[e.origin],
                    "editor": e.base_editor, "sadr": "true" if e.sadr else "false", "dataset": e.dataset,
                    "pair": _pair_key(e),
                    "x": s.get("ES") or {}, "y": s.get("DNS") or {}})
    return pts


def _groups(data: SiteData) -> list[dict]:
    by: dict[str, list[Entry]] = {}
    for e in data.entries:
        by.setdefault(e.group, []).append(e)
    ours = {e.group for e in data.entries if e.kind != "paper"}
    groups = []
    for g in sorted(by, key=lambda g: (g not in ours, g.lower())):
        es = sorted(by[g], key=_sort_key)
        protos = [p for p in data.protocols if any(p in e.scores for e in es)]
        groups.append({
            "name": g, "id": slug(g, "m-"),
            "paper_only": g not in ours,
            "rows": [_row_view(e, p) for p in protos for e in es if p in e.scores],
            "deltas": _delta_rows(es, protos),
            "charts": [{"protocol": p, "svg": tradeoff_svg(_chart_points(es, p), p,
                                                          f"{g}: ES vs DNS, protocol {p}")} for p in protos],
        })
    return groups


def _filters(data: SiteData) -> dict:
    es = data.entries
    return {"model": sorted({e.group for e in es}, key=str.lower),
            "editor": sorted({e.base_editor for e in es}, key=lambda b: (b != "none", b)),
            "protocol": list(data.protocols),
            "dataset": sorted({e.dataset for e in es}),
            "origin": [o for o in ("pipeline", "submission", "paper") if any(e.origin == o for e in es)]}


# --------------------------------------------------------------------------------------------------- cell pages
def _score_table(e: Entry, protocols: list[str]) -> list[dict]:
    rows = []
    for p in protocols:
        post, pre = e.scores.get(p), (e.page.get("pre") or {}).get(p)
        if post is None:
            continue
        metrics = INDEX_METRICS + ("Avg.S",) + tuple(MAGNITUDES)
        for phase, s in (("pre", pre), ("post", post)):
            rows.append({"protocol": p, "phase": phase, "cls": phase, "cells": [
                dict(zip(("text", "ci", "key"), fmt_metric(m, metric_value(s, m)))) for m in metrics]})
        delta = []
        for m in metrics:
            a, b = _mean(metric_value(pre, m)), _mean(metric_value(post, m))
            scale = 1.0 if m in RAW_METRICS else 100.0
            delta.append({"text": "–" if a is None or b is None else f"{(b - a) * scale:+.2f}", "ci": "", "key": ""})
        rows.append({"protocol": p, "phase": "Δ (post − pre)", "cls": "delta", "cells": delta})
    return rows


def _case_csv(pc: Mapping) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = [(p, ph, m) for p in pc["s"] for ph in pc["s"][p] for m in pc["metrics"]]
    w.writerow(["case_id", "source"] + [f"{p}.{ph}.{m}" for p, ph, m in cols] + list(pc["drift"]))
    for i, cid in enumerate(pc["case_id"]):
        vals = []
        for p, ph, m in cols:
            n = pc["n"][ph][m][i]
            vals.append("" if n == 0 else f"{pc['s'][p][ph][m][i] / n:.4f}")
        w.writerow([cid, pc["source"][i]] + vals + ["" if pc["drift"][k][i] is None else pc["drift"][k][i]
                                                    for k in pc["drift"]])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------- rendering
SEED_COLUMNS = ("ES", "PS", "NS", "RS", "DNS", "Avg.S", "drift DNS")


def _seed_rows(summary: dict) -> dict:
    """The pipeline's seed groups (evaluators.aggregate.seed_groups) as table rows: each metric's mean ± sd
    [min–max] over the context-template seeds, per protocol."""
    from evaluators.aggregate import seed_cells

    out: dict = {"columns": list(SEED_COLUMNS), "rows": []}
    for key, g in sorted((summary.get("seeds") or {}).items()):
        for pid in summary.get("protocol_ids", []):
            out["rows"].append({"cell": key, "protocol": pid, "seeds": ", ".join(map(str, g["seeds"])),
                                "n_cases": g["n_cases"], "cells": seed_cells(g, pid, SEED_COLUMNS)})
    return out


def _env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["json_script"] = json_script
    env.filters["tojson_pretty"] = lambda o: json.dumps(o, indent=2, sort_keys=True, ensure_ascii=False,
                                                        default=str)
    env.filters["safe_url"] = lambda u: u if isinstance(u, str) and re.match(r"^https?://[^\s\"'<>]+$", u) else None
    return env


def render(data: SiteData, out_dir: str | Path) -> None:
    """Write the site of ``data`` into the (empty or new) folder ``out_dir``."""
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    (out / "assets").mkdir(exist_ok=True)
    for f in ("leaderboard.css", "leaderboard.js"):
        shutil.copyfile(HERE / "static" / f, out / "assets" / f)
    env = _env()
    metric_doc = {p: PROTOCOLS[p].doc for p in data.protocols}
    common = {"build": data.build, "protocol_docs": metric_doc, "version": __version__}
    groups = _groups(data)
    (out / "index.html").write_text(env.get_template("index.html").render(
        root="", groups=groups, filters=_filters(data), metrics=INDEX_METRICS + ("Avg.S",),
        raw_metrics=RAW_METRICS, rejected=data.rejected, seeds=_seed_rows(data.summary), diagnosis=data.diagnosis,
        **common), encoding="utf-8")
    from leaderboard.diagnosis import render_pages

    render_pages(data.diagnosis, env, out, common)
    cell_tpl = env.get_template("cell.html")
    for e in data.entries:
        if e.page is None:
            continue
        protos = [p for p in data.protocols if p in e.scores]
        pc = e.page["per_case"]
        name = Path(e.href).stem
        (out / "cells" / f"{name}.csv").write_text(_case_csv(pc), encoding="utf-8")
        (out / e.href).write_text(cell_tpl.render(
            root="../", e=e, protocols=protos, score_rows=_score_table(e, protos),
            score_metrics=INDEX_METRICS + ("Avg.S",) + tuple(MAGNITUDES), cases=pc, csv_name=f"{name}.csv",
            prov=e.page["provenance"], **common), encoding="utf-8")
    (out / "data" / "summary.json").write_text(
        json.dumps(data.summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    board = {"driftbench_version": __version__, "build": data.build, "protocol_ids": data.protocols,
             "entries": [{"key": e.key, "kind": e.kind, "origin": e.origin, "model": e.model, "group": e.group,
                          "profile": e.profile, "editor": e.editor, "base_editor": e.base_editor, "sadr": e.sadr,
                          "dataset": e.dataset, "dataset_id": e.dataset_id, "n_cases": e.n_cases, "note": e.note, "cell": e.cell,
                          "badges": [b[1] for b in e.badges], "href": e.href, "scores": e.scores, "drift": e.drift,
                          "provenance": (e.page or {}).get("provenance")} for e in data.entries]}
    (out / "data" / "leaderboard.json").write_text(
        json.dumps(board, indent=1, sort_keys=True, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with renames: readers see the old or the new site, never a half-written one."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_site(result_files: Iterable[str | Path], out_dir: str | Path, **kwargs) -> SiteData:
    """Collect every input (:func:`collect`, same keyword arguments), render into a temporary folder beside
    ``out_dir`` and swap it in atomically. Returns the collected data."""
    out = Path(out_dir)
    data = collect(result_files, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        render(data, tmp)
        os.chmod(tmp, 0o755)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return data
