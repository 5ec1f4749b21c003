"""The site's diagnosis pages: per model, the paper's analysis of Specificity Failure as the pipeline computed it
(`driftbench analyse` → ``analysis/``, `driftbench diagnose` → ``diagnosis/``, the `trace` stage's causal trace),
read from those files only. Every number is labelled with its model and dataset; the paper's published values
(GPT-J-6B, its dataset) stand beside ours and are never mixed with them."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluators.metrics import AVG_S_METRICS, DRIFT_KEYS

# the hyper-parameters of SADR's ablations (§6.1: selected heads vs every head; Table 10: γ)
ABLATION_KEYS = {"sadr_hinge", "sadr_gamma"}
ACCURACIES, DRIFTS = AVG_S_METRICS, tuple(DRIFT_KEYS)  # the ablation tables' columns
FACTORS = (("kl", "Σ KL(A_pre ‖ A_post)"), ("f1", "factor 1"), ("f2", "factor 2"), ("f3", "factor 3"))


@dataclass
class DiagnosisPage:
    model: str
    profile: str
    calibration: list[dict] = field(default_factory=list)  # rows of Table 1 (ours)
    drift: list[dict] = field(default_factory=list)  # ρ of factor 1 from the rows
    factors: list[dict] = field(default_factory=list)  # ρ of every factor (diagnose)
    settings: dict = field(default_factory=dict)
    easy_hard: list[dict] = field(default_factory=list)  # Table 5 rows (driftbench ablation)
    easy_hard_note: str = ""
    sadr_ablation: list[dict] = field(default_factory=list)  # held-out sweep rows of SADR's head selection and γ
    sadr_ablation_cases: int = 0
    figures: list[tuple[str, Path]] = field(default_factory=list)  # (caption, source file)
    paper: dict = field(default_factory=dict)

    @property
    def href(self) -> str:
        return f"diagnosis/{self.profile}__{self.model}.html"


def _num(x, fmt=".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(m: dict | None) -> str:
    """A share with its 95% CI as "12.5 ± 6.2" (percent), "n/a" when there is none."""
    if not m or m.get("mean") is None:
        return "n/a"
    return f"{100 * m['mean']:.1f} ± {100 * (m.get('ci95') or 0):.1f}"


def _rho(r: dict | None) -> str:
    if not r or r.get("rho") is None:
        return "n/a"
    return f"{r['rho']:.2f} (p {r['p']:.2g}, n {r['n']})"


def read_page(profile: str, model: str, results_dir: Path) -> DiagnosisPage | None:
    """The page of one model from its result folder, or None when no analysis has been run for it."""
    results_dir = Path(results_dir)
    page = DiagnosisPage(model, profile)
    analysis = results_dir / "analysis" / "analysis.json"
    if analysis.is_file():
        a = json.loads(analysis.read_text(encoding="utf-8"))
        page.paper = a.get("paper_table1") or {}
        for cell, r in sorted(a.get("cells", {}).items()):
            for task, cal in r.get("calibration", {}).items():
                pre, post = cal.get("pre", {}), cal.get("post", {})
                if not post:
                    continue
                page.calibration.append({
                    "cell": cell, "task": task, "p_edit_pre": _num(pre.get("p_edit", {}).get("mean")),
                    "p_edit_post": f"{_num(post['p_edit']['mean'])} ± {_num(post['p_edit'].get('ci95'))}",
                    "p_true_post": _num(post["p_true"]["mean"]), "accuracy": _num(post.get("accuracy")),
                    "n": post.get("n")})
            for task, d in r.get("drift", {}).items():
                page.drift.append({"cell": cell, "task": task, "rho": _rho(d)})
        if (results_dir / "analysis" / "drift_failure.png").is_file():
            page.figures.append(("Attention drift (factor 1) against P(o_edit) after the edit, per prompt (Table 2)",
                                 results_dir / "analysis" / "drift_failure.png"))
    for path in sorted((results_dir / "diagnosis").glob("*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))
        cell = path.stem
        page.settings = d.get("settings", {})
        s = d.get("summary", {})
        for task, t in s.get("tasks", {}).items():
            page.factors.append({"cell": cell, "what": task, "n": t.get("n"),
                                 "rho": [_rho(t.get("rho", {}).get(f)) for f, _ in FACTORS]})
        if s.get("edit_size"):
            e = s["edit_size"]
            page.factors.append({"cell": cell, "what": "edit size ‖ΔW‖ / ‖ΔW‖/‖W‖ vs mean DNS P(o_edit), per case",
                                 "n": e["n"], "rho": [_rho(e.get("rho_norm")), _rho(e.get("rho_relative")), "", ""]})
        png = path.with_suffix(".png")
        if png.is_file():
            page.figures.append((f"{cell}: contaminating substitution (Fig. 3) and attention patching (Fig. 5)",
                                 png))
    ablation = results_dir / "ablation" / "easy_hard.json"
    if ablation.is_file():
        a = json.loads(ablation.read_text(encoding="utf-8"))
        n_hard = sum(1 for h in a.get("split", {}).values() if h == "hard")
        page.easy_hard_note = (f"median pre-edit margin {a['median_margin']:.3f}; {len(a['split']) - n_hard} easy, "
                               f"{n_hard} hard cases")
        for cell, halves in a.get("cells", {}).items():
            for name, r in halves.items():
                page.easy_hard.append({"cell": cell, "half": name, "n": r.get("n_cases"),
                                       "values": [_pct(r.get(m)) for m in ACCURACIES]
                                       + [_num((r.get(k) or {}).get("mean"), ".2f") for k in DRIFTS]})
        if ablation.with_suffix(".png").is_file():
            page.figures.append(("Easy vs hard edits: ROME, ROME-AWD and ROME+SADR (Table 5)",
                                 ablation.with_suffix(".png")))
    sweep = results_dir / "sweep" / "sweep.json"
    if sweep.is_file():  # §6.1 head selection and Table 10's γ: the rome+sadr configurations of the held-out sweep
        sw = json.loads(sweep.read_text(encoding="utf-8"))
        for name, c in sw.get("configs", {}).items():
            over = name.partition("@")[2]
            keys = {kv.partition("=")[0] for kv in over.split(",") if kv}
            if name.partition("@")[0] != "rome+sadr" or not keys <= ABLATION_KEYS:
                continue
            sc, dr = c.get("scores", {}), c.get("drift", {})
            page.sadr_ablation.append({"config": name, "values": [_pct(sc.get(m)) for m in ACCURACIES]
                                       + [_num((dr.get(k) or {}).get("mean"), ".2f") for k in DRIFTS]})
            page.sadr_ablation_cases = sw.get("n_cases", 0)
        page.sadr_ablation.sort(key=lambda r: r["config"])
    trace = results_dir / "causal_trace.png"
    if trace.is_file():
        page.figures.append(("Causal trace of the unedited model (where the edit layer was chosen)", trace))
    if not (page.calibration or page.factors):
        return None
    return page


def render_pages(pages: list[DiagnosisPage], env, out: Path, common: dict[str, Any]) -> None:
    """Write each page and copy its figures under ``out/diagnosis/``."""
    if not pages:
        return
    folder = out / "diagnosis"
    folder.mkdir(exist_ok=True)
    tpl = env.get_template("diagnosis.html")
    for page in pages:
        figs = []
        for i, (caption, src) in enumerate(page.figures):
            name = f"{page.profile}__{page.model}__{i}{src.suffix}"
            shutil.copyfile(src, folder / name)
            figs.append({"caption": caption, "src": name})
        (out / page.href).write_text(tpl.render(root="../", page=page, figures=figs, factor_names=[n for _, n in FACTORS],
                                                **common), encoding="utf-8")
