"""Aggregate per-case result files into ``summary.json`` and ``summary.md`` (reference-spec §2.7) — no torch.

Input: result JSONL files, one per cell (cell id ``"<profile>/<model>/<editor>"``, editor possibly ending in
``"+sadr"``; every row of a file must carry the same cell id). For every cell and every requested protocol the
post-edit rows are scored with :func:`evaluators.metrics.score_cell` (through ``score_cell_protocols``, which
validates the rows once for all protocols). The pre-edit (unedited model) scores are reported once per
``<profile>/<model>``: they are scored over the union of the cases of all that model's cells (pre-edit results are
shared by every editor of a model, so a case that appears in two cells must carry identical ``pre`` probes;
anything else means the files come from different pre-edit runs and is an error).

``summary.json`` (fractions in [0, 1]; sorted keys; usable as DVC metrics)::

    {"protocol_ids": ["paper", "lm-eval"],
     "protocols": {"paper": "<equations>", "lm-eval": "<equations>"},
     "cells": {"<profile>/<model>/<editor>": {
         "profile": str, "model": str, "editor": str, "base_editor": str, "sadr": bool,
         "n_cases": int, "source": "<file name>",
         "paper":   {"protocol": "paper", "n_cases": int, "AvgS": float|null,
                     "ES": {"mean": float|null, "ci95": float|null, "n": int}, ..., "EM": {...}, ...},
         "lm-eval": {"protocol": "lm-eval", ...same without magnitudes...}}},
     "pre": {"<profile>/<model>": {
         "profile": str, "model": str, "editor": "pre (unedited)", "n_cases": int, "cells": [cell ids],
         "paper": {...}, "lm-eval": {...}}}}

``summary.md``: one Markdown table per (model, protocol); rows = pre first, then the cells sorted by base editor
name with ``+sadr`` right after its base; entries ``mean*100(ci95*100)`` with 2 decimals, just ``mean*100`` when
the interval is undefined (one prompt) and Avg.S, "–" when there are no prompts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

from basis.cells import parse_cell_id as _parse_cell_id
from basis.errors import UserError
from basis.io import atomic_write_json, atomic_write_text, read_jsonl
from evaluators.metrics import AVG_S_METRICS, MAGNITUDES, drift_summary, get_protocol, score_cell_protocols

PRE_LABEL = "pre (unedited)"
MISSING = "–"  # en dash
# table columns (paper metric names); SAS and DRS are in summary.json but not in the tables, like the paper
TABLE_METRICS: tuple[str, ...] = ("ES", "PS", "NS", "RS", "DNS", "RES", "OS", "DOS")
assert set(AVG_S_METRICS) <= set(TABLE_METRICS)


class ResultFileError(UserError, ValueError):
    """A result file that is not what `driftbench run-cell` writes (names the file, row and field)."""


def parse_cell_id(cell: str) -> dict:
    """``"<profile>/<model>/<cell name>"`` (grammar: basis.cells) → the parts a summary entry carries. ``config`` is
    the name without the seed suffix; ``seed`` is None without one; ``mode`` (e.g. "seq16-final") only for cells
    that are not edited one case at a time."""
    cid = _parse_cell_id(cell, ResultFileError)
    n = cid.name
    info = {"profile": cid.profile, "model": cid.model, "editor": str(n), "base_editor": n.editor, "sadr": n.sadr,
            "config": n.config, "seed": n.seed}
    if n.steps:
        info["steps_matched"] = True
    if n.mode.protocol_tag:
        info["mode"] = n.mode.protocol_tag
    return info


def load_cell(path: str | Path) -> tuple[str, list[dict]]:
    """Rows of one result file, checked: JSON objects sharing one cell id, every case once."""
    path = Path(path)
    rows = list(read_jsonl(path))
    if not rows:
        raise ResultFileError(f"{path}: result file has no rows, so it names no cell; rerun its `driftbench run-cell` stage")
    for no, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ResultFileError(f"{path}: row {no} is not a JSON object")
    cells = {row.get("cell") for row in rows}
    if len(cells) != 1:
        raise ResultFileError(f"{path}: rows of one result file must share one cell id, found {sorted(map(str, cells))}")
    cell = rows[0]["cell"]
    if cell is None:
        raise ResultFileError(f"{path}: rows lack the 'cell' field")
    seen: set = set()
    for row in rows:
        cid = row.get("case_id")
        if cid is None:
            raise ResultFileError(f"{path}: cell {cell!r}: a row lacks the 'case_id' field")
        if cid in seen:
            raise ResultFileError(f"{path}: cell {cell!r}: case_id {cid!r} appears twice; it would be counted twice")
        seen.add(cid)
    return cell, rows


def _editor_order(info: Mapping) -> tuple:
    return (info["base_editor"], info["sadr"], info["editor"])


class SummaryBuilder:
    """Cell and pre-edit summaries built one result file at a time (a file's rows can be dropped after `add`):
    `aggregate` and the leaderboard build share it, so both compute exactly the same summary."""

    def __init__(self, protocols: Iterable[str] = ("paper", "lm-eval")):
        self.protos = [get_protocol(p) for p in protocols]
        if not self.protos:
            raise ValueError("aggregate needs at least one metric protocol")
        self.cells: dict[str, dict] = {}
        self.pre_rows: dict[str, dict[str, dict]] = {}  # "<profile>/<model>" -> case_id -> {"cell", "case_id", "pre"}
        self._paths: dict[str, Path] = {}
        self._origin: dict[str, dict[str, str]] = {}  # model key -> case_id -> cell that supplied its pre
        self._pre_cells: dict[str, list[str]] = {}

    def add(self, path: str | Path, cell: str, rows: list[dict]) -> dict:
        """Score one cell's rows (post phase, every protocol, drift), keep their pre-edit probes; return the entry."""
        path = Path(path)
        if cell in self._paths:
            raise ResultFileError(f"{path}: cell {cell!r} is also in {self._paths[cell]}; give each cell one result file")
        self._paths[cell] = path
        info = parse_cell_id(cell)
        entry = dict(info, n_cases=len(rows), source=path.name)
        try:
            entry.update(score_cell_protocols(rows, "post", self.protos))
            if "mode" in info:  # the editing regime and evaluation timing are part of the protocol id
                for p in self.protos:
                    entry[p.id] = dict(entry[p.id], protocol=f"{p.id}+{info['mode']}")
            entry["drift"] = drift_summary(rows)
        except ValueError as exc:  # a malformed number or pair, named by evaluators.metrics
            raise ResultFileError(f"{path}: {exc}") from None
        self.cells[cell] = entry
        mkey = f"{info['profile']}/{info['model']}"
        self._pre_cells.setdefault(mkey, []).append(cell)
        known, origin = self.pre_rows.setdefault(mkey, {}), self._origin.setdefault(mkey, {})
        for row in rows:
            cid = row["case_id"]
            if cid in known:
                if known[cid]["pre"] != row.get("pre"):
                    raise ResultFileError(
                        f"{path}: case_id {cid!r} has pre-edit probes that differ from those in cell "
                        f"{origin[cid]!r}; pre-edit results are shared per model, so these files come from different "
                        f"pre-edit runs; recompute one of them")
                continue
            known[cid] = {"cell": cell, "case_id": cid, "pre": row.get("pre")}
            origin[cid] = cell
        return entry

    def pre(self) -> dict[str, dict]:
        """The unedited model per ``<profile>/<model>``, over the union of its cells' cases."""
        out: dict[str, dict] = {}
        for mkey in sorted(self.pre_rows):
            profile, model = mkey.split("/", 1)
            rows = list(self.pre_rows[mkey].values())
            entry = {"profile": profile, "model": model, "editor": PRE_LABEL, "n_cases": len(rows),
                     "cells": sorted(self._pre_cells[mkey])}
            entry.update(score_cell_protocols(rows, "pre", self.protos))
            out[mkey] = entry
        return out

    def summary(self, pre: dict[str, dict] | None = None) -> dict:
        return {"protocol_ids": [p.id for p in self.protos], "protocols": {p.id: p.doc for p in self.protos},
                "cells": self.cells, "pre": self.pre() if pre is None else pre,
                "seeds": seed_groups(self.cells, [p.id for p in self.protos])}


SEED_METRICS: tuple[str, ...] = ("ES", "PS", "NS", "RS", "DNS", "RES", "AvgS", "FL", "PPL")


def spread(values: list[float | None]) -> dict | None:
    """mean, sample sd, min and max of one metric's per-seed values (None when a seed has no value)."""
    if not values or any(v is None for v in values):
        return None
    mean = math.fsum(values) / len(values)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "per_seed": list(values)}


def seed_groups(cells: Mapping[str, Mapping], protocol_ids: list[str]) -> dict:
    """Cells that differ only in their context-template seed (``rome``, ``rome.s1``, ``rome.s2``; the plain name is
    seed 0), grouped per ``<profile>/<model>/<config>`` with every metric's mean, sd, min and max over the seeds.
    Only groups with two or more seeds over the same cases are listed."""
    groups: dict[str, list[tuple[int, str, Mapping]]] = {}
    for cell, info in cells.items():
        key = f"{info['profile']}/{info['model']}/{info['config']}"
        groups.setdefault(key, []).append((info["seed"] or 0, cell, info))
    out = {}
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda m: m[0])
        if len(members) < 2:
            continue
        seeds = [m[0] for m in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{key}: seeds {seeds} repeat (a plain cell name is seed 0)")
        if len({m[2]["n_cases"] for m in members}) != 1:
            raise ValueError(f"{key}: the seeds cover different numbers of cases "
                             f"{[m[2]['n_cases'] for m in members]}; finish every seed's cell first")
        first = members[0][2]
        entry = {"profile": first["profile"], "model": first["model"], "config": first["config"],
                 "base_editor": first["base_editor"], "sadr": first["sadr"], "seeds": seeds,
                 "cells": [m[1] for m in members], "n_cases": first["n_cases"]}
        for pid in protocol_ids:
            per = {}
            for metric in SEED_METRICS:
                vals = [(m[2].get(pid) or {}).get(metric) for m in members]
                vals = [v.get("mean") if isinstance(v, Mapping) else v for v in vals]
                if any(v is not None for v in vals):
                    per[metric] = spread(vals)
            entry[pid] = per
        entry["drift"] = {k: spread([((m[2].get("drift") or {}).get(k) or {}).get("mean") for m in members])
                          for k in DRIFT_COLUMNS.values() if any((m[2].get("drift") or {}).get(k) for m in members)}
        out[key] = entry
    return out


def check_cases(path: Path, cell: str, rows: list[dict], expected: list[str]) -> None:
    """A result file must hold exactly the ``expected`` cases (the profile's subset): a smoke run or a stale file
    is refused, never summarised as if it were the run."""
    got = [r["case_id"] for r in rows]
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ResultFileError(
            f"{path}: cell {cell!r} has {len(got)} cases but the profile's subset has {len(expected)}"
            + (f" ({len(missing)} missing, e.g. {missing[0]})" if missing else "")
            + (f" ({len(extra)} not in the subset, e.g. {extra[0]})" if extra else "")
            + "; rerun its `driftbench run-cell` stage (without --limit)")


def aggregate(result_files: Iterable[Path], out_json: Path, out_md: Path,
              protocols: Iterable[str] = ("paper", "lm-eval"), expected_cases: list[str] | None = None) -> dict:
    """Score every result file under every protocol; write ``out_json`` and ``out_md`` atomically; return the summary.
    With ``expected_cases``, every file must hold exactly those cases. Every file is read and checked before
    anything is written."""
    builder = SummaryBuilder(protocols)
    for path in sorted(Path(p) for p in result_files):
        cell, rows = load_cell(path)
        if expected_cases is not None:
            check_cases(path, cell, rows, expected_cases)
        builder.add(path, cell, rows)
    summary = builder.summary()
    atomic_write_json(out_json, summary)
    atomic_write_text(out_md, render_markdown(summary))
    return summary


# --------------------------------------------------------------------------------------------------- Markdown
def format_value(value: float | None, ci: float | None = None) -> str:
    """``mean*100(ci*100)`` with 2 decimals, e.g. "20.86(1.90)"; "20.86" without an interval; "–" when missing."""
    if value is None:
        return MISSING
    text = f"{value * 100:.2f}"
    return f"{text}({ci * 100:.2f})" if ci is not None else text


DRIFT_COLUMNS = {"drift DNS": "drift_DNS", "drift RS": "drift_RS"}


def format_plain(m: Mapping | None, digits: int) -> str:
    """``mean(ci)`` of a ``{"mean", "ci95"}`` entry *without* the ×100 of percentages; "–" when missing."""
    mean, ci = (m or {}).get("mean"), (m or {}).get("ci95")
    if mean is None:
        return MISSING
    return f"{mean:.{digits}f}" + (f"({ci:.{digits}f})" if ci is not None else "")


def _columns(protocol_id: str) -> list[str]:
    cols = list(TABLE_METRICS) + ["FL", "PPL", "Avg.S"]
    if get_protocol(protocol_id).magnitude is not None:
        cols += list(MAGNITUDES)
    return cols + list(DRIFT_COLUMNS)


def _row(label: str, scores: Mapping | None, cols: list[str], n_cases: int, drift: Mapping | None = None) -> str:
    cells = [label]
    for col in cols:
        if col in DRIFT_COLUMNS:  # a sum over layers of attention-probability increases: not a percentage
            cells.append(format_plain((drift or {}).get(DRIFT_COLUMNS[col]), 3))
        elif scores is None:
            cells.append(MISSING)
        elif col == "PPL":  # a perplexity, not a percentage
            cells.append(format_plain(scores.get(col), 2))
        elif col == "Avg.S":
            cells.append(format_value(scores.get("AvgS")))
        else:
            m = scores.get(col) or {}
            cells.append(format_value(m.get("mean"), m.get("ci95")))
    cells.append(str(n_cases))
    return "| " + " | ".join(cells) + " |"


def format_table(summary: Mapping) -> str:
    """All Markdown tables of a summary: one per (``<profile>/<model>``, protocol), models sorted, protocols in
    ``summary["protocol_ids"]`` order. Values are percentages: ``mean(95% half-width)``."""
    models: dict[str, list[tuple[str, Mapping]]] = {}
    for cell, info in summary.get("cells", {}).items():
        models.setdefault(f"{info['profile']}/{info['model']}", []).append((cell, info))
    for mkey in summary.get("pre", {}):
        models.setdefault(mkey, [])
    blocks = []
    for mkey in sorted(models):
        pre = summary.get("pre", {}).get(mkey)
        by_mode: dict[str, list[Mapping]] = {}  # "" = one edit at a time; then one table per stream/batch regime
        for _, info in sorted(models[mkey], key=lambda ci: _editor_order(ci[1])):
            by_mode.setdefault(info.get("mode", ""), []).append(info)
        for mode in sorted(set(by_mode) | {""}):
            for pid in summary["protocol_ids"]:
                cols = _columns(pid)
                title = f"### {mkey} — protocol `{pid}`" if not mode else \
                    f"### {mkey} — protocol `{pid}+{mode}` ({_mode_label(mode)}; not comparable with single edits)"
                lines = [title, "", "| editor | " + " | ".join(cols) + " | cases |",
                         "|---|" + "---:|" * (len(cols) + 1)]
                if pre is not None:
                    lines.append(_row(PRE_LABEL, pre.get(pid), cols, pre["n_cases"]))
                for info in by_mode.get(mode, []):
                    lines.append(_row(info["editor"], info.get(pid), cols, info["n_cases"], info.get("drift")))
                blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _mode_label(tag: str) -> str:
    """"seq16-final" → the regime in words (basis.cells.Mode.label)."""
    from basis.cells import Mode

    kind_size, timing = tag.rsplit("-", 1)
    kind = kind_size.rstrip("0123456789")
    return Mode(kind, int(kind_size[len(kind):]), timing).label


def format_spread(m: Mapping | None, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± sd [min–max]`` of a seed spread (× ``scale``); "–" when missing."""
    if not m or m.get("mean") is None:
        return MISSING
    f = lambda v: f"{v * scale:.{digits}f}"  # noqa: E731
    sd = f" ± {f(m['sd'])}" if m.get("sd") is not None else ""
    return f"{f(m['mean'])}{sd} [{f(m['min'])}–{f(m['max'])}]"


SEED_TABLE_COLUMNS: tuple[str, ...] = ("ES", "PS", "NS", "RS", "DNS", "RES", "Avg.S", "FL", "PPL", "drift DNS",
                                       "drift RS")


def seed_cells(group: Mapping, protocol_id: str, cols: Iterable[str] = SEED_TABLE_COLUMNS) -> list[str]:
    """One seed group's entries for ``cols`` under ``protocol_id``: percentages (×100) except PPL and the drift
    columns, each as :func:`format_spread` (summary.md and the leaderboard share this)."""
    per = group.get(protocol_id) or {}
    out = []
    for col in cols:
        if col in DRIFT_COLUMNS:
            out.append(format_spread((group.get("drift") or {}).get(DRIFT_COLUMNS[col]), 1.0, 3))
        elif col == "PPL":
            out.append(format_spread(per.get("PPL"), 1.0, 1))
        else:
            out.append(format_spread(per.get("AvgS" if col == "Avg.S" else col)))
    return out


def format_seed_table(summary: Mapping) -> str:
    """One table per protocol of the seed groups: each metric as mean ± sd [min–max] over the template seeds."""
    groups = summary.get("seeds") or {}
    if not groups:
        return ""
    cols = SEED_TABLE_COLUMNS
    blocks = []
    for pid in summary["protocol_ids"]:
        lines = [f"### Across context-template seeds — protocol `{pid}`", "",
                 "Each cell rerun with other context-template seeds (`<cell>.s<seed>`; the plain name is seed 0); "
                 "entries are the cell-level value's mean ± sample sd [min–max] over the seeds.", "",
                 "| cell | seeds | " + " | ".join(cols) + " | cases |", "|---|---|" + "---:|" * (len(cols) + 1)]
        for key, g in sorted(summary["seeds"].items(), key=lambda kv: (kv[1]["profile"], kv[1]["model"],
                                                                      kv[1]["base_editor"], kv[1]["sadr"])):
            vals = seed_cells(g, pid, cols)
            lines.append(f"| {key} | {','.join(map(str, g['seeds']))} | " + " | ".join(vals) + f" | {g['n_cases']} |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def render_markdown(summary: Mapping) -> str:
    """The full ``summary.md``: a title, the protocol definitions, then :func:`format_table`."""
    head = ["# driftbench results", "",
            "Entries are percentages: `mean(95% CI half-width)` over all prompts of all cases (micro-average); "
            "Avg.S = harmonic mean of ES, PS, NS, RS, DNS; “–” = no prompts. "
            "`drift DNS` / `drift RS` (not percentages): the paper's attention drift (Table 2, factor 1) — per prompt "
            "Σ over layers of max over heads of the increase in last-token attention to the subject's last token, "
            "edited vs unedited model, mean(95% CI) over the distracted-neighbourhood and relation prompts. "
            "FL = n-gram entropy of sampled text × 100 and PPL = ME-PPL on Corpus-50 (a perplexity), both means over "
            "the CounterFact cases. Protocols:",
            ""]
    for pid in summary["protocol_ids"]:
        head.append(f"- `{pid}`: {summary.get('protocols', {}).get(pid, get_protocol(pid).doc)}")
    seeds = format_seed_table(summary)
    return "\n".join(head) + "\n\n" + format_table(summary) + ("\n" + seeds if seeds else "")
