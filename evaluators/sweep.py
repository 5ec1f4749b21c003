"""Hyper-parameter sweeps on held-out cases: the documented, rerunnable procedure behind a profile's hparams.

`driftbench sweep -p embedded -c rome+sadr --vary sadr_gamma=0.005,0.01 --vary sadr_steps=20,40` edits every
held-out case (disjoint from the profile's subset, see `data_pipeline.subset.held_out`) under every combination
of the varied values on top of the profile's hparams, through the same harness as the pipeline cells (so it
resumes after a kill), and tabulates paper-protocol metrics, attention drift and edit time per configuration in
``<results>/<profile>/<model>/sweep/sweep.md`` (+ ``.json``).
"""
from __future__ import annotations

import itertools
import statistics
from pathlib import Path
from typing import Any, Mapping

import yaml

from basis.cells import CellName
from basis.io import atomic_write_json, atomic_write_text, read_jsonl
from evaluators.metrics import AVG_S_METRICS, drift_summary, score_cell

COLUMNS = ["ES", "PS", "NS", "RS", "DNS", "RES"]


def parse_vary(items: list[str]) -> list[dict[str, Any]]:
    """``["layer=1,3", "sadr_gamma=0.01"]`` → the Cartesian product as dicts (values parsed as YAML: scalars, or
    lists such as ``layers=[1,2,3],[2,3,4]``)."""
    axes = []
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise ValueError(f"--vary {item!r}: expected name=v1,v2,... (e.g. sadr_gamma=0.005,0.01)")
        axes.append([(name.strip(), yaml.safe_load(v)) for v in _split_top_level(values)])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def _split_top_level(values: str) -> list[str]:
    """Split on commas outside brackets, so list values work: ``[1,2,3],[2,3,4]`` → two lists."""
    parts, depth, cur = [], 0, ""
    for ch in values:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def config_name(cell: str, over: Mapping[str, Any]) -> str:
    def text(v: Any) -> str:  # a list value as 1-2-3: file names without spaces, brackets or commas
        return "-".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)

    return cell + ("@" + ",".join(f"{k}={text(v)}" for k, v in sorted(over.items())) if over else "")


def run_sweep(model, tok, *, profile: str, model_name: str, editor: str, sadr: bool, base_hparams: dict,
              grid: list[dict], cases: list, content_id: str, out_dir: Path, batch_size: int,
              model_id: str | None = None, progress: bool = True) -> dict:
    from editors.registry import get_editor
    from evaluators.harness import CellSpec, run_cell, run_pre

    out_dir = Path(out_dir)
    pre_path = out_dir / "pre.jsonl"
    run_pre(model, tok, model_name, content_id, cases, pre_path, batch_size=batch_size, progress=progress,
            model_id=model_id)
    cell = str(CellName(editor, sadr))
    for over in grid:
        spec = CellSpec(f"{profile}-sweep", model_name, editor, sadr, {**base_hparams, **over})
        get_editor(editor).prepare(model, tok, spec.hparams, progress=progress)  # artefacts of sweep-only values
        run_cell(model, tok, spec, content_id, cases, pre_path, out_dir / f"{config_name(cell, over)}.jsonl",
                 batch_size=batch_size, progress=progress, model_id=model_id)
    return summarise(out_dir)


def summarise(out_dir: Path) -> dict:
    """Tabulate every configuration found in ``out_dir`` (plus the unedited model) into sweep.json / sweep.md."""
    out_dir = Path(out_dir)
    pre_rows = list(read_jsonl(out_dir / "pre.jsonl"))
    entries = {"(unedited)": {"scores": score_cell([{"cell": "(unedited)", "case_id": r["case_id"], "pre": r["scores"]}
                                                    for r in pre_rows], phase="pre"), "drift": {}, "edit_s": None}}
    for path in sorted(out_dir.glob("*.jsonl")):
        if path.name == "pre.jsonl" or path.name.endswith(".timings.jsonl"):
            continue
        rows = list(read_jsonl(path))
        tim = out_dir / (path.stem + ".timings.jsonl")
        secs = [t["edit_s"] for t in read_jsonl(tim)] if tim.is_file() else []
        steps = [r["editor"]["diagnostics"].get("steps") for r in rows]
        entries[path.stem] = {"scores": score_cell(rows), "drift": drift_summary(rows),
                              "edit_s": statistics.fmean(secs) if secs else None,
                              "steps": statistics.fmean(steps) if steps and None not in steps else None,
                              "n_cases": len(rows)}
    summary = {"n_cases": len(pre_rows), "case_ids": [r["case_id"] for r in pre_rows], "configs": entries}
    atomic_write_json(out_dir / "sweep.json", summary)
    atomic_write_text(out_dir / "sweep.md", render(summary))
    return summary


def render(summary: Mapping) -> str:
    def pct(m):
        return "–" if not m or m.get("mean") is None else f"{100 * m['mean']:.1f}"

    head = ["config"] + COLUMNS + ["Avg.S", "drift DNS", "drift RS", "steps", "edit s/case"]
    lines = [f"Held-out sweep over {summary['n_cases']} cases (paper protocol, %; Avg.S = harmonic mean of "
             f"{', '.join(AVG_S_METRICS)}).", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, e in summary["configs"].items():
        s, d = e["scores"], e["drift"]
        avg = "–" if s.get("AvgS") is None else f"{100 * s['AvgS']:.1f}"
        dr = [("–" if not d.get(k) or d[k]["mean"] is None else f"{d[k]['mean']:.3f}") for k in ("drift_DNS", "drift_RS")]
        steps = "–" if e.get("steps") is None else f"{e['steps']:.1f}"
        secs = "–" if e.get("edit_s") is None else f"{e['edit_s']:.1f}"
        lines.append("| " + " | ".join([f"`{name}`"] + [pct(s.get(c)) for c in COLUMNS] + [avg] + dr + [steps, secs])
                     + " |")
    return "\n".join(lines) + "\n"
