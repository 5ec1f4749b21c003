"""The results stages: `aggregate`, `leaderboard`, `submit`, `validate`, `editors`."""
from __future__ import annotations

import sys
from pathlib import Path

from basis.errors import UserError
from basis.cells import parse_cell
from basis.params import get_profile
from driftbench.cli.common import _dataset_identity, _profile_cases, _result_files, _subset_cases

# the lock files a leaderboard reads provenance from: the default run's and the optional editors' pipeline
DVC_LOCKS = ("dvc.lock", "pipelines/editors/dvc.lock")


def cmd_aggregate(args, params):
    from evaluators.aggregate import aggregate, format_table

    profile = get_profile(params, args.profile)
    files = [profile.cell_path(m, c) for m in profile.models for c in _cell_names(profile, args.cells)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"missing result files {missing}: run their `driftbench run-cell` stages first")
    expected = [c.case_id for c in _subset_cases(params, profile)]
    summary = aggregate(files, Path(args.out_json), Path(args.out_md), expected_cases=expected)
    print(format_table(summary))
    print(f"\nwrote {args.out_json} and {args.out_md}")


def _cell_names(profile, which: str) -> list[str]:
    """The profile's default cells (``cells``: what `dvc repro` runs) or those plus ``extra_cells``."""
    return list(profile.raw.get("cells", [])) + (list(profile.raw.get("extra_cells", [])) if which == "all" else [])


def cmd_leaderboard(args, params):
    from leaderboard.provenance import git_commit
    from leaderboard.site import build_site
    from leaderboard.submission import BundleError

    files = []
    if not args.no_profile:
        profile = get_profile(params, args.profile)
        wanted = [profile.cell_path(m, c) for m in profile.models for c in profile.raw.get("cells", [])]
        missing = [str(f) for f in wanted if not f.is_file()]
        if missing and not args.allow_missing:
            raise UserError(f"missing result files {missing}: run their `driftbench run-cell` stages first "
                            "(or pass --allow-missing)")
        files += [f for f in wanted if f.is_file()]
        if args.cells == "all":  # the optional cells (pipelines/editors/dvc.yaml) that have been run
            defaults = set(_cell_names(profile, "default"))
            extra = [profile.cell_path(m, c) for m in profile.models for c in _cell_names(profile, "all")
                     if c not in defaults]
            files += [f for f in extra if f.is_file()]
            if not args.quiet and len(files) < len(wanted) + len(extra):
                print(f"{len(wanted) + len(extra) - len(files)} optional cell(s) not run yet: "
                      "`dvc repro pipelines/editors/dvc.yaml` runs them")
    files += _result_files(args.results)
    if args.no_paper:
        paper = None
    elif args.paper_csv:
        paper = Path(args.paper_csv)
    else:
        from data_pipeline.dataset import resolve_mirror

        paper = resolve_mirror(params["data"]["mirror"]) / "paper_reported.csv"
    if paper is not None and not paper.is_file():
        raise UserError(f"{paper} not found: pass --paper-csv PATH, or --no-paper to leave the paper's rows out")
    card, _, cases = _dataset_identity(params, need_card=False)
    try:
        data = build_site(sorted(set(files)), Path(args.out), submissions_dir=Path(args.submissions),
                          paper_csv=paper, dvc_lock=[Path(x) for x in (args.dvc_lock or DVC_LOCKS)], params=params, card=card,
                          git=git_commit("."), on_invalid="skip" if args.skip_invalid else "error",
                          profile_cases=_profile_cases(params),
                          diagnosis=[] if args.no_profile else [(profile.name, m, profile.results_dir(m))
                                                                for m in profile.models],
                          dataset_cases=cases, log=(lambda m: None) if args.quiet else print)
    except BundleError as exc:
        raise UserError(str(exc), hint="fix or remove the bundle, or pass --skip-invalid to build without it")
    kinds = {}
    for e in data.entries:
        kind = "other" if e.key.startswith("reported:") else e.kind
        kinds[kind] = kinds.get(kind, 0) + 1
    for r in data.rejected:
        print(f"left out an invalid submission:\n{r}", file=sys.stderr)
    print(f"leaderboard: {kinds.get('pipeline', 0)} pipeline cells, {kinds.get('submission', 0)} submissions, "
          f"{kinds.get('paper', 0)} paper rows, {kinds.get('other', 0)} rows of other papers' tables, "
          f"{data.build['n_rows']} per-case rows -> {args.out}/index.html "
          f"(serve it: python -m http.server -d {args.out})")


def cmd_submit(args, params):
    from leaderboard.provenance import git_commit
    from leaderboard.submission import BundleError, bundle_name, pack_bundle

    profile = get_profile(params, args.profile)
    name, _ = profile.model(args.model)
    editor = parse_cell(args.cell, "cell").editor
    result = Path(args.results) if args.results else profile.cell_path(name, args.cell)
    if not result.is_file():
        raise UserError(f"{result} not found: run `driftbench run-cell -p {profile.name} -m {name} -c {args.cell}` first")
    card, datasets, cases = _dataset_identity(params, args.card)
    hparams = ((profile.raw.get("hparams") or {}).get(name) or {}).get(editor)
    out = Path(args.out) if args.out else Path(args.submissions) / bundle_name(f"{profile.name}/{name}/{args.cell}")
    try:
        path = pack_bundle(result, out, dataset={"version": card["version"], "content_id": card["content_id"]},
                           editor={"version": args.editor_version, "description": args.description, "url": args.url,
                                   "plugin": args.plugin, "package": args.package,
                                   "hparams": hparams if hparams is not None else None},
                           submitter={"name": args.submitter, "contact": args.contact, "affiliation": args.affiliation},
                           protocols=args.protocol or None, git_commit=git_commit(".")["commit"], notes=args.notes,
                           tar=args.tar, datasets=datasets, dataset_case_map=cases, partial=args.partial,
                           profile_cases=_profile_cases(params, args.cases if hasattr(args, "cases") else None))
    except (BundleError, FileExistsError, ValueError) as exc:
        raise UserError(str(exc))
    print(f"packed and validated {path}; check it with `driftbench validate {path}`, then open a pull request "
          "adding it under leaderboard/submissions/")


def cmd_validate(args, params):
    from leaderboard.submission import BundleError, validate_bundle

    _, datasets, cases = _dataset_identity(params, args.card, args.cases)
    profile_cases = None if args.no_case_check else _profile_cases(params, args.cases)
    if args.no_case_check:
        cases = None
    elif cases is None:
        print("note: the dataset's cases.jsonl is not here, so case ids are not checked against it "
              "(run `driftbench dataset build`)", file=sys.stderr)
    bad = 0
    for path in args.bundles:
        try:
            b = validate_bundle(path, datasets, cases, profile_cases)
        except BundleError as exc:
            bad += 1
            print(f"REJECTED {exc}", file=sys.stderr)
            continue
        m = b.metadata
        print(f"OK {path}: {m['cell']} ({m['editor']['name']} {m['editor']['version']}), {len(b.rows)} cases, "
              f"dataset {m['dataset']['version']} ({m['dataset']['content_id']}), protocols "
              f"{', '.join(m['protocol_ids'])}; every aggregate of summary.json recomputed from cases.jsonl")
    if bad:
        raise UserError(f"{bad} of {len(args.bundles)} bundle(s) rejected")


def cmd_plan(args, params):
    """The cost of a profile's grid before running it (evaluators.plan): per model and cell, edits, TFLOP and
    seconds per edit, device-hours, one-time training hours, memory per worker, and the total wall time."""
    from evaluators.plan import DEVICES, MODEL_FACTS, case_work, char_tokens, format_plan, plan_cell

    from basis.params import run_dtype

    profile = get_profile(params, args.profile)
    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    device = DEVICES[args.device or ("cpu" if profile.raw.get("device", "cpu") == "cpu" else "a100")]
    count = char_tokens
    tok_dir = Path("models") / "smollm2-135m"
    if tok_dir.is_dir() and not args.char_tokens:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        count = lambda text: len(tok(text)["input_ids"])  # noqa: E731
    from data_pipeline.dataset import load_cases

    path = Path(params["data"]["out"]) / "cases.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: build the dataset first (`dvc repro dataset`)")
    cases = load_cases(path)
    ids = _profile_cases(params, cases=cases)[profile.name]
    works = [case_work(c, count) for c in cases if c.case_id in ids]
    costs = []
    for name, m in profile.models.items():
        if name not in MODEL_FACTS:
            raise UserError(f"no published configuration for model {name!r} in evaluators/plan.MODEL_FACTS: add its "
                            "parameter count, layers, d_model and d_ffn")
        hps = (profile.raw.get("hparams") or {}).get(name) or {}
        for cell in _cell_names(profile, args.cells):
            editor = parse_cell(cell).editor
            costs.append(plan_cell(name, MODEL_FACTS[name], run_dtype(m), cell, _parsed_hparams(editor, hps.get(editor)),
                                   works, device))
    print(format_plan(costs, device, args.gpus))


def cmd_analyse(args, params):
    """The paper's diagnosis from result rows (evaluators.analysis): calibration (Table 1) and whether attention drift
    predicts the failure (Table 2, factor 1), per cell, as JSON, a markdown table and a scatter plot per model."""
    import json

    from basis.io import atomic_write_text, read_jsonl
    from data_pipeline.dataset import load_cases
    from evaluators.analysis import PAPER_TABLE1, calibration, drift_vs_failure, plot

    profile = get_profile(params, args.profile)
    cases = {c.case_id: c for c in load_cases(Path(params["data"]["out"]) / "cases.jsonl")}
    for model in profile.models:
        results = {}
        for cell in _cell_names(profile, args.cells):
            path = profile.cell_path(model, cell)
            if not path.is_file():
                if cell in profile.raw.get("cells", []):
                    raise UserError(f"missing result file {path}: run its `driftbench run-cell` stage first")
                continue
            rows = list(read_jsonl(path))
            results[cell] = {"calibration": calibration(rows), "drift": drift_vs_failure(rows, cases)}
        out = profile.results_dir(model) / "analysis"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "analysis.json", json.dumps({"paper_table1": PAPER_TABLE1, "cells": results},
                                                            indent=1, sort_keys=True) + "\n")
        lines = ["| cell | task | P(o_edit) pre | P(o_edit) post [95% CI] | P(o_true) post | accuracy post | "
                 "ρ(drift, P(o_edit)) | p | n |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for cell, r in results.items():
            for task, cal in r["calibration"].items():
                post, pre = cal.get("post", {}), cal.get("pre", {})
                d = r["drift"].get(task, {})
                rho = "" if d.get("rho") is None else f"{d['rho']:.3f}"
                pv = "" if d.get("p") is None else f"{d['p']:.2g}"
                ci = post["p_edit"].get("ci95") or 0.0
                lines.append(f"| {cell} | {task} | {pre['p_edit']['mean']:.3f} | {post['p_edit']['mean']:.3f} "
                             f"± {ci:.3f} | {post['p_true']['mean']:.3f} | {post['accuracy']:.3f} | {rho} | {pv} | "
                             f"{d.get('n', '')} |")
        lines.append(f"\nPaper (GPT-J-6B, ROME, DNS, its dataset): P(o_edit) {PAPER_TABLE1['p_edit_pre']:.3f} before, "
                     f"{PAPER_TABLE1['p_edit_post']:.3f} after the edit.")
        atomic_write_text(out / "analysis.md", "\n".join(lines) + "\n")
        plot(results, out / "drift_failure.png")
        print("\n".join(lines))
        print(f"\nwrote {out}/analysis.json, analysis.md, drift_failure.png")


def cmd_ablation(args, params):
    """Table 5: the cells split into the same easy and hard edits (evaluators.analysis.easy_hard), per model, as
    JSON, a markdown table and a bar plot (results/<profile>/<model>/ablation/)."""
    import json

    from basis.io import atomic_write_text, read_jsonl
    from evaluators.analysis import EASY_HARD_METRICS, easy_hard, plot_easy_hard

    profile = get_profile(params, args.profile)
    cells = args.cell or ["rome", "rome_awd", "rome+sadr"]
    for cell in cells:
        parse_cell(cell)
    for model in profile.models:
        paths = {c: profile.cell_path(model, c) for c in cells}
        missing = [str(p) for c, p in paths.items() if not p.is_file()]
        if missing:
            raise UserError(f"missing result files {missing}: run their `driftbench run-cell` stages first "
                            "(rome_awd: `dvc repro pipelines/editors/dvc.yaml:rome_awd@rome_awd`)")
        rows = {c: list(read_jsonl(p)) for c, p in paths.items()}
        try:
            result = easy_hard(rows)
        except ValueError as e:
            raise UserError(f"{profile.results_dir(model)}: {e}") from None
        out = profile.results_dir(model) / "ablation"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "easy_hard.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
        n_hard = sum(1 for h in result["split"].values() if h == "hard")
        lines = [f"Easy vs hard edits (Table 5): median pre-edit margin log P(o_true) − log P(o_edit) on the edit "
                 f"prompt {result['median_margin']:.3f}; {len(result['split']) - n_hard} easy, {n_hard} hard cases. "
                 "Paper protocol, % with 95% CI; drift = factor 1.", "",
                 "| cell | half | " + " | ".join(EASY_HARD_METRICS) + " | drift DNS | drift RS |",
                 "|---|---|" + "---:|" * (len(EASY_HARD_METRICS) + 2)]
        for cell, halves in result["cells"].items():
            for name, r in halves.items():
                vals = [f"{100 * r[m]['mean']:.1f} ({100 * (r[m]['ci95'] or 0):.1f})" if r[m]["mean"] is not None
                        else "—" for m in EASY_HARD_METRICS]
                drift = [f"{r[k]['mean']:.2f} ({r[k]['ci95'] or 0:.2f})" if r.get(k, {}).get("mean") is not None
                         else "—" for k in ("drift_DNS", "drift_RS")]
                lines.append(f"| {cell} | {name} | " + " | ".join(vals + drift) + " |")
        atomic_write_text(out / "easy_hard.md", "\n".join(lines) + "\n")
        plot_easy_hard(result, out / "easy_hard.png")
        print("\n".join(lines))
        print(f"\nwrote {out}/easy_hard.json, easy_hard.md, easy_hard.png")


def cmd_diagnose(args, params):
    """The diagnosis that needs the edited model (evaluators.diagnosis): drift factors and KL against P(o_edit)
    (Table 2), edit size (Table 4), contaminating substitution (Fig. 3) and attention patching (Fig. 5), per cell."""
    import json

    from basis.io import atomic_write_text
    from driftbench.cli.common import _load
    from driftbench.cli.run import cell_spec
    from evaluators.diagnosis import GROUPS, KINDS, plot, run_diagnosis

    settings = dict(params.get("diagnosis") or {})
    for key in ("cases", "prompts", "window"):
        if not isinstance(settings.get(key), int) or settings[key] < 1:
            raise UserError(f"params.yaml diagnosis.{key}: expected a positive integer, got {settings.get(key)!r}")
    if args.cases:
        settings["cases"] = args.cases
    profile = get_profile(params, args.profile)
    name, _ = profile.model(args.model)
    cells = args.cell or list(settings.get("cells") or [])
    if not cells:
        raise UserError("no cell to diagnose: pass -c CELL or set params.yaml diagnosis.cells")
    specs = [cell_spec(params, profile, name, c) for c in cells]  # every cell checked before the model loads
    for c, spec in zip(cells, specs):
        if spec.mode.kind != "single":
            raise UserError(f"cell {c!r}: the diagnosis edits one case at a time; choose a single-edit cell")
    cases = _subset_cases(params, profile)
    _, model, tok = _load(profile, name)
    # a run on fewer cases (--cases) is a smoke run: it writes beside the results, never over them
    out = profile.results_dir(name) / ("smoke/diagnosis" if args.cases else "diagnosis")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Model {name} (profile {profile.name}); {settings['cases']} cases, {settings['prompts']} prompts per "
             f"task, window {settings['window']} layers.", "",
             "| cell | task | n | ρ KL (p) | ρ factor 1 (p) | ρ factor 2 (p) | ρ factor 3 (p) |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def rho(r):
        return "n/a" if r["rho"] is None else f"{r['rho']:.2f} ({r['p']:.2g})"

    for c, spec in zip(cells, specs):
        res = run_diagnosis(model, tok, spec, cases, settings, progress=not args.no_progress)
        res.update(model=name, groups=list(GROUPS), kinds=list(KINDS))
        atomic_write_text(out / f"{c}.json", json.dumps(res, indent=1, sort_keys=True) + "\n")
        plot(c, res["summary"], settings["window"], out / f"{c}.png")
        for task, t in res["summary"]["tasks"].items():
            lines.append(f"| {c} | {task} | {t['n']} | " + " | ".join(rho(t["rho"][f]) for f in ("kl", "f1", "f2", "f3"))
                         + " |")
        size = res["summary"].get("edit_size")
        if size:
            lines.append(f"| {c} | edit size (Table 4): ‖ΔW‖ vs mean DNS P(o_edit), per case | {size['n']} | "
                         f"ρ ‖ΔW‖ {rho(size['rho_norm'])} | ρ ‖ΔW‖/‖W‖ {rho(size['rho_relative'])} | | |")
    atomic_write_text(out / "diagnosis.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}/")


def _parsed_hparams(editor: str, raw: dict | None) -> dict:
    """The editor's hyper-parameters with its class defaults filled in (steps, templates), as a plain dict."""
    import dataclasses

    from editors.registry import get_editor

    cls = getattr(get_editor(editor), "hparams_cls", None) if editor != "none" else None
    if cls is None:
        return dict(raw or {})
    return dataclasses.asdict(cls.from_dict(dict(raw or {})))


def cmd_editors(args, params):
    from editors.registry import available_editors

    print("\n".join(available_editors()))


def register(sub, add, with_profile) -> None:
    """Add this group's subcommands to the `driftbench` parser."""
    ag = with_profile(add(sub, "aggregate", "summary tables with 95%% CIs from result files only"), model=False)
    ag.add_argument("--out-json", default="results/summary.json")
    ag.add_argument("--out-md", default="results/summary.md")
    ag.add_argument("--cells", choices=("default", "all"), default="default",
                    help="default: the profile's cells (what `dvc repro` runs); all: also its extra_cells "
                         "(pipelines/editors/dvc.yaml), every file required")
    ag.set_defaults(func=cmd_aggregate)

    lb = with_profile(add(sub, "leaderboard", "build the static leaderboard site (index with one table per model, "
                          "SADR deltas, ES-vs-DNS trade-off chart, per-cell pages with per-case drill-down and "
                          "provenance) from result files, accepted submissions and the paper's reported numbers; "
                          "no network requests, works from file:// or any static host"), model=False)
    lb.add_argument("--results", action="append", default=[], metavar="PATH",
                    help="extra result file (or folder of *.jsonl) to include; repeatable")
    lb.add_argument("--no-profile", action="store_true", help="only the --results files, not the profile's cells")
    lb.add_argument("--allow-missing", action="store_true", help="skip profile cells that have no result file yet")
    lb.add_argument("--cells", choices=("default", "all"), default="all",
                    help="all (default): the profile's cells and those of its extra_cells that have been run "
                         "(`dvc repro pipelines/editors/dvc.yaml`, then `dvc repro -f -s leaderboard`); "
                         "default: the profile's cells only")
    lb.add_argument("--out", default="site", help="output folder, replaced atomically (default: site)")
    lb.add_argument("--submissions", default="leaderboard/submissions",
                    help="folder of accepted submission bundles (default: leaderboard/submissions)")
    lb.add_argument("--paper-csv", default=None,
                    help="the paper's reported numbers (default: paper_reported.csv of the data mirror)")
    lb.add_argument("--no-paper", action="store_true", help="leave the paper's reported rows out")
    lb.add_argument("--dvc-lock", action="append", default=None, metavar="PATH",
                    help="a dvc.lock to read provenance from (repeatable; default: " + " and ".join(DVC_LOCKS) + ")")
    lb.add_argument("--skip-invalid", action="store_true",
                    help="leave invalid submission bundles out (listed on the page) instead of failing")
    lb.add_argument("--quiet", action="store_true", help="no per-cell progress lines")
    lb.set_defaults(func=cmd_leaderboard)

    sm = with_profile(add(sub, "submit", "pack one cell's results (per-case rows, recomputed summary, metadata) into "
                          "a submission bundle under leaderboard/submissions/ and validate it"))
    sm.add_argument("-c", "--cell", required=True, help="editor, with '+sadr' for the SADR variant (e.g. myedit+sadr)")
    sm.add_argument("--submitter", required=True, help="your name (shown on the site)")
    sm.add_argument("--contact", default=None, help="e-mail or handle (shown on the site)")
    sm.add_argument("--affiliation", default=None, help="affiliation (shown on the site)")
    sm.add_argument("--editor-version", default="unversioned", help="version of the editor (default: unversioned)")
    sm.add_argument("--description", default="", help="one paragraph on the editor (plain text, shown escaped)")
    sm.add_argument("--url", default=None, help="paper or code URL (http/https)")
    sm.add_argument("--plugin", default=None,
                    help="entry point of the editor, e.g. 'myedit = mypkg.editor:MyEdit' (group driftbench.editors)")
    sm.add_argument("--package", default=None, help="pip requirement that provides the plugin, e.g. mypkg==1.0")
    sm.add_argument("--notes", default=None, help="anything reviewers should know (plain text)")
    sm.add_argument("--protocol", action="append", default=[], metavar="ID",
                    help="metric protocol to include (repeatable; default: all, i.e. paper and lm-eval)")
    sm.add_argument("--results", default=None, help="result file to pack (default: the profile's cell file)")
    sm.add_argument("--card", default=None, help="dataset card (default: <data.out>/card.json)")
    sm.add_argument("--submissions", default="leaderboard/submissions", help="where bundles go (default: %(default)s)")
    sm.add_argument("--out", default=None, help="bundle folder (default: <submissions>/<profile>__<model>__<cell>)")
    sm.add_argument("--tar", action="store_true", help="write <out>.tar.gz instead of a folder")
    sm.add_argument("--partial", action="store_true", help="label the bundle a partial run (it covers only part of "
                    "the profile's cases): listed apart on the site, never ranked with full runs")
    sm.set_defaults(func=cmd_submit)

    va = add(sub, "validate", "check submission bundles: JSON Schema, dataset version and content id, protocol ids, "
             "file hashes, rows vs dataset, and every aggregate of summary.json recomputed from cases.jsonl "
             "(exit status 2 when any bundle is rejected)")
    va.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folder or .tar.gz")
    va.add_argument("--card", default=None, help="dataset card (default: <data.out>/card.json)")
    va.add_argument("--cases", default=None, help="dataset cases.jsonl to check case ids against "
                    "(default: <data.out>/cases.jsonl when present)")
    va.add_argument("--no-case-check", action="store_true", help="do not check case ids against the dataset")
    va.set_defaults(func=cmd_validate)

    add(sub, "editors", "list available editors (built-in and plugins)").set_defaults(func=cmd_editors)

    an = with_profile(add(sub, "analyse", "the paper's diagnosis from result rows: calibration of P(o_edit) vs "
                          "P(o_true) on RS/DNS prompts (Table 1) and Pearson ρ between attention drift and P(o_edit) "
                          "(Table 2, factor 1), per cell, with scatter plots (results/<profile>/<model>/analysis/)"),
                      model=False)
    an.add_argument("--cells", choices=("default", "all"), default="default",
                    help="default: the profile's cells (all required); all: also its extra_cells that have been run")
    an.set_defaults(func=cmd_analyse)

    dg = with_profile(add(sub, "diagnose", "the diagnosis that needs the edited model, per single-edit cell: the "
                          "attention-drift factors and KL against P(o_edit) (Table 2), edit size (Table 4), "
                          "contaminating substitution heatmaps (§3.2, Fig. 3) and attention patching curves (§3.4, "
                          "Fig. 5) on the first params.yaml diagnosis.cases cases (results/<profile>/<model>/diagnosis/)"),
                      progress=True)
    dg.add_argument("-c", "--cell", action="append", default=[],
                    help="cell to diagnose (repeatable; default: params.yaml diagnosis.cells)")
    dg.add_argument("--cases", type=int, default=0, help="only the first N cases, written under results/<profile>/<model>/smoke/diagnosis "
                    "(default: diagnosis.cases, written to the results)")
    dg.set_defaults(func=cmd_diagnose)

    ab = with_profile(add(sub, "ablation", "Table 5: ROME against ROME-AWD (attention-weight optimisation disabled) "
                          "and ROME+SADR on the same easy and hard halves of the cases (split at the median of the "
                          "unedited model's margin for the true object on the edit prompt), from result rows "
                          "(results/<profile>/<model>/ablation/)"), model=False)
    ab.add_argument("-c", "--cell", action="append", default=[],
                    help="cell to include (repeatable, all required; default: rome, rome_awd, rome+sadr; e.g. add "
                    "rome+steps for the steps-matched control)")
    ab.set_defaults(func=cmd_ablation)

    pl = with_profile(add(sub, "plan", "estimate what a profile's grid costs before running it: edits, TFLOP and "
                          "seconds per edit, device-hours, memory per worker and wall time on N devices (a FLOP and "
                          "bandwidth model; this CPU's efficiencies are measured, a GPU's are assumed and say so)"),
                      model=False)
    pl.add_argument("--gpus", type=int, default=8, help="devices working in parallel (default 8, the paper's)")
    pl.add_argument("--device", choices=("cpu", "a100", "h100", "h200"), default=None,
                    help="device kind (default: cpu for a CPU profile, else a100 as the paper)")
    pl.add_argument("--cells", choices=("default", "all"), default="all",
                    help="the profile's cells, or those and its extra_cells (default: all)")
    pl.add_argument("--char-tokens", action="store_true", help="count 4 characters per token instead of tokenising")
    pl.set_defaults(func=cmd_plan)

