"""`driftbench` — one command line for every pipeline stage (dvc.yaml calls exactly these).

Run from the repository root; paths come from params.yaml (see driftbench/params.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from driftbench.errors import UserError
from driftbench.io import read_json
from driftbench.params import cell_seed, check_cell_name, get_profile, load_params, parse_cell

EPILOG = """stages, in pipeline order (all read params.yaml):
  driftbench dataset build                  canonical cases.jsonl + card from the paper release (paper-v1)
  driftbench dataset subset -p embedded     stratified, seeded case subset of a profile
  driftbench dataset build-raw [--dry-run]  optional: a dataset version from raw CounterFact + KnowEdit, LLM-judged
  driftbench model prepare  -p embedded     embedded GGUF -> fp32 safetensors in models/<name>
  driftbench evaluate pre   -p embedded     pre-edit scores, once per model, shared by every editor
  driftbench trace          -p embedded     causal tracing on known facts: which layer to edit (json + png)
  driftbench stats          -p embedded     key second moments E[kk^T] per edited layer (content-named files)
  driftbench run-cell       -p embedded -c rome+sadr   edit -> score -> restore for every case of one cell
  driftbench sweep          -p embedded -c rome --vary layer=1,3,5   tune on held-out cases (not a stage)
  driftbench aggregate      -p embedded     results/summary.json (+ .md) from result files only
  driftbench leaderboard    -p embedded     static site/ (tables, chart, per-cell pages) from result files only
  driftbench submit -p embedded -c rome --submitter NAME   pack a cell's results as a submission bundle
  driftbench validate BUNDLE...             check a bundle (schema, dataset, protocols, recomputed aggregates)
Every long stage resumes where it stopped; kill it at any time. --limit N (smoke runs) writes under
results/<profile>/<model>/smoke/ and never touches the full run's files.
Errors you can fix print one line (exit status 2); add --debug for the traceback."""


def _card(params) -> dict:
    path = Path(params["data"]["out"]) / "card.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `driftbench dataset build` first")
    return read_json(path)


def _subset_cases(params, profile):
    from data_pipeline.dataset import load_cases

    cases = load_cases(Path(params["data"]["out"]) / "cases.jsonl")
    sp = profile.subset_path()
    if not sp.is_file():
        raise UserError(f"{sp} not found: run `driftbench dataset subset -p {profile.name}` first")
    doc = read_json(sp)
    ids = doc.get("case_ids") if isinstance(doc, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise UserError(f"{sp}: expected {{\"case_ids\": [...]}}; rerun `driftbench dataset subset -p {profile.name}`")
    by_id = {c.case_id: c for c in cases}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UserError(f"{sp} names case {missing[0]} which is not in the dataset: rerun `driftbench dataset subset`")
    return [by_id[i] for i in ids]


def _model_id(profile, name: str) -> str:
    """Identity of the weights for content-derived stats names: GGUF sha256 of a prepared model, else ref@revision."""
    prov = profile.prepared_model_dir(name) / "driftbench_model.json"
    m = profile.models[name]
    if prov.is_file():
        p = read_json(prov)
        return f"{name}@{p.get('gguf_sha256', p.get('ref'))[:16]}"
    return f"{m['ref']}@{m.get('revision', 'main')}"


def _hparams(params, profile, name: str, editor: str) -> dict:
    """The profile's hyper-parameters for (model, editor), with data paths resolved through the mirror."""
    from data_pipeline.dataset import resolve_mirror

    hp = dict((profile.raw.get("hparams") or {}).get(name, {}).get(editor, {}) or {})
    if editor != "none":
        hp.setdefault("model_id", _model_id(profile, name))
        hp.setdefault("stats_dir", str(Path("stats") / name))
        corpus = hp.get("stats_corpus", "wikitext-2-raw/wiki.test.raw")
        if not corpus.startswith("hub:"):  # a file of the data mirror
            hp["stats_corpus"] = str(resolve_mirror(params["data"]["mirror"]) / corpus)
    return hp


def _ppl_corpus(params) -> Path | None:
    """The ME-PPL corpus of the data mirror (params data.me_ppl_corpus); None disables FL and ME-PPL."""
    from data_pipeline.dataset import resolve_mirror

    rel = params["data"].get("me_ppl_corpus")
    if not rel:
        return None
    path = resolve_mirror(params["data"]["mirror"]) / rel
    if not path.is_file():
        raise UserError(f"ME-PPL corpus {path} not found: set the data mirror (DRIFTBENCH_DATA_MIRROR) or "
                        "params data.me_ppl_corpus")
    return path


def _load(profile, model_name):
    import torch

    from model_layer.loading import load_model

    torch.manual_seed(0)
    name, m = profile.model(model_name)
    prepared = profile.prepared_model_dir(name)
    ref = str(prepared) if prepared.is_dir() else m["ref"]
    model, tok = load_model(ref, dtype=m.get("dtype", "float32"), device=profile.raw.get("device", "cpu"),
                            revision=m.get("revision"))
    return name, model, tok


def cmd_dataset_build(args, params):
    from data_pipeline.dataset import build_dataset, resolve_mirror

    d = params["data"]
    card = build_dataset(resolve_mirror(d["mirror"]), d["release"], d["release_sha256"], d["version"], Path(d["out"]))
    print(f"dataset {card['version']} (content id {card['content_id']}): {card['n_cases']} cases -> {d['out']}")


def cmd_dataset_subset(args, params):
    from data_pipeline.dataset import load_cases
    from data_pipeline.subset import stratified_subset, write_subset

    profile = get_profile(params, args.profile)
    cases = load_cases(Path(params["data"]["out"]) / "cases.jsonl")
    size = int(profile.raw.get("subset_size", 0)) or len(cases)
    seed = int(profile.raw.get("seed", 0))
    ids = stratified_subset(cases, size, seed)
    write_subset(ids, profile.subset_path(), seed=seed)
    print(f"subset {profile.name}: {len(ids)} cases (seed {seed}) -> {profile.subset_path()}")


def _raw_cfg(args, params) -> tuple[dict, "Path | None"]:
    """params `data_raw` over the built-in defaults, with command-line overrides; the mirror if one is configured."""
    from data_pipeline.artifact import raw_config
    from data_pipeline.dataset import resolve_mirror
    from data_pipeline.schema import DatasetError

    cfg = raw_config(params)
    judge = cfg["judge"]
    for opt, key in (("model", "model"), ("base_url", "base_url"), ("concurrency", "concurrency"),
                     ("cache", "cache")):
        if getattr(args, opt, None) is not None:
            judge[key] = getattr(args, opt)
    if getattr(args, "n_per_source", None) is not None:
        cfg["merge"]["n_per_source"] = args.n_per_source
    if getattr(args, "out", None):
        cfg["out"] = args.out
    try:
        mirror = resolve_mirror(params["data"]["mirror"])
    except DatasetError as exc:
        print(f"note: {exc}; raw files will be looked up in {cfg['download_dir']} or downloaded", file=sys.stderr)
        mirror = None
    return cfg, mirror


def cmd_dataset_fetch_raw(args, params):
    from data_pipeline.artifact import raw_sources
    from data_pipeline.raw import fetch

    cfg, mirror = _raw_cfg(args, params)
    for srcs in raw_sources(cfg).values():
        for src in srcs:
            path, digest = fetch(src, mirror, Path(cfg["download_dir"]), offline=args.offline or None,
                                 materialize=True)
            pin = "verified" if src.sha256 else "not pinned upstream; pin it with data_raw.source_overrides"
            print(f"{src.name}: {path} sha256 {digest} ({pin})")


def cmd_dataset_build_raw(args, params):
    from data_pipeline.artifact import build_from_raw

    cfg, mirror = _raw_cfg(args, params)
    print(f"dataset {cfg['version']} from raw sources -> {cfg['out']}")
    res = build_from_raw(cfg, mirror, mode="replay" if args.replay else "live", dry_run=args.dry_run,
                         offline=args.offline or None, progress=not args.no_progress,
                         raw_from_mirror=not args.downloads_only)
    if args.dry_run:
        print(json.dumps(res, indent=2))
        return
    print(f"dataset {res['version']} (content id {res['content_id']}): {res['n_cases']} cases -> {cfg['out']}")


def cmd_dataset_judge_release(args, params):
    from data_pipeline.artifact import judge_release
    from data_pipeline.dataset import load_cases
    from data_pipeline.judge import JudgeConfig
    from driftbench.io import atomic_write_json

    cfg, _ = _raw_cfg(args, params)
    cases = load_cases(Path(args.cases or Path(params["data"]["out"]) / "cases.jsonl"))
    if args.limit:
        cases = cases[:args.limit]
    rep = judge_release(cases, JudgeConfig.from_dict(cfg["judge"]), mode="replay" if args.replay else "live",
                        dry_run=args.dry_run, progress=not args.no_progress)
    if not args.dry_run:
        atomic_write_json(args.report, rep)
    print(json.dumps(rep, indent=2))


def cmd_dataset_export(args, params):
    from data_pipeline.artifact import export_parquet

    cases = Path(args.cases or Path(params["data"]["out"]) / "cases.jsonl")
    dest = export_parquet(cases, Path(args.out) if args.out else cases.parent / "parquet")
    print(f"{cases} -> {dest} (load with datasets.load_dataset('parquet', data_files='{dest}'))")


def cmd_model_prepare(args, params):
    from model_layer.loading import prepare_model

    profile = get_profile(params, args.profile)
    name, m = profile.model(args.model)
    prov = prepare_model(m["ref"], profile.prepared_model_dir(name), dtype=m.get("dtype", "float32"),
                         expect_sha256=m.get("sha256"))
    print(f"prepared {name}: {prov['n_params']:,} parameters -> {profile.prepared_model_dir(name)}")


def _limited(profile, name: str, path: Path, limit: int) -> Path:
    """The output of a run: ``path`` itself, or its twin under the smoke folder for a ``--limit`` run."""
    if limit < 0:
        raise UserError(f"--limit must be a positive number of cases, got {limit}")
    return profile.smoke_dir(name) / path.relative_to(profile.results_dir(name)) if limit else path


def cmd_evaluate_pre(args, params):
    from evaluators.harness import run_pre

    profile = get_profile(params, args.profile)
    name, _ = profile.model(args.model)
    cases = _subset_cases(params, profile)[: args.limit or None]
    content_id, ppl = _card(params)["content_id"], _ppl_corpus(params)
    out = _limited(profile, name, profile.pre_path(name), args.limit)
    name, model, tok = _load(profile, args.model)
    rows = run_pre(model, tok, name, content_id, cases, out, ppl_corpus=ppl,
                   batch_size=int(profile.raw.get("batch_size", 32)), progress=not args.no_progress,
                   model_id=_model_id(profile, name), journal=profile.journal_path(name, "pre.jsonl"))
    print(f"pre-edit scores for {len(rows)} cases -> {out}")


def cmd_run_cell(args, params):
    from evaluators.harness import CellSpec, run_cell

    from editors.base import get_editor

    profile = get_profile(params, args.profile)
    name, _ = profile.model(args.model)
    check_cell_name(args.cell, "cell")
    editor, sadr = parse_cell(args.cell)
    seed = cell_seed(args.cell)
    ed = get_editor(editor)  # everything a user can get wrong is checked before the model loads
    if sadr and not getattr(ed, "supports_sadr", False):
        raise UserError(f"editor {editor!r} does not support SADR: drop '+sadr' from the cell name")
    cases = _subset_cases(params, profile)[: args.limit or None]
    hparams = _hparams(params, profile, name, editor)
    if seed is not None:
        if "template_seed" in hparams and hparams["template_seed"] != 0:
            raise UserError(f"cell {args.cell!r}: hparams of {editor!r} already set template_seed "
                            f"{hparams['template_seed']}; name the seed in one place")
        hparams["template_seed"] = seed
    if hasattr(ed, "check_hparams"):
        ed.check_hparams(None, dict(hparams, sadr=sadr))  # names and types; layer ranges once the model is loaded
    content_id, ppl = _card(params)["content_id"], _ppl_corpus(params)
    out = _limited(profile, name, profile.cell_path(name, args.cell), args.limit)
    pre = profile.pre_path(name)
    if args.limit and not pre.is_file():
        pre = _limited(profile, name, pre, args.limit)
    name, model, tok = _load(profile, args.model)
    spec = CellSpec(profile.name, name, editor, sadr, hparams, seed=seed)
    rows = run_cell(model, tok, spec, content_id, cases, pre, out, ppl_corpus=ppl,
                    batch_size=int(profile.raw.get("batch_size", 32)), verify_restore=args.verify_restore,
                    progress=not args.no_progress, model_id=_model_id(profile, name),
                    journal=profile.journal_path(name, f"cells/{args.cell}.jsonl"))
    print(f"{spec.cell_id}: {len(rows)} cases -> {out}")


def cmd_stats(args, params):
    """Run each editor's `prepare` (cacheable preparation such as key second moments) for the profile's cells and
    for every other editor with hyper-parameters for the model, so a cell run by hand never writes into the stats
    folder (a DVC output the cells depend on)."""
    from editors.base import get_editor

    profile = get_profile(params, args.profile)
    name, model, tok = _load(profile, args.model)
    editors = {parse_cell(c)[0] for c in profile.raw.get("cells", [])}
    editors |= set((profile.raw.get("hparams") or {}).get(name) or {})
    for editor in sorted(editors):
        ed = get_editor(editor)
        if hasattr(ed, "prepare"):
            for what in ed.prepare(model, tok, _hparams(params, profile, name, editor), progress=not args.no_progress):
                print(f"{name} {editor}: {what}")


def cmd_sweep(args, params):
    """Sweep hyper-parameters of one cell on held-out cases (never the profile's reported subset)."""
    from data_pipeline.dataset import load_cases
    from data_pipeline.subset import held_out
    from evaluators.sweep import parse_vary, run_sweep

    profile = get_profile(params, args.profile)
    editor, sadr = parse_cell(args.cell)
    cases = load_cases(Path(params["data"]["out"]) / "cases.jsonl")
    reported = [c.case_id for c in _subset_cases(params, profile)]
    ids = held_out(cases, args.cases, args.seed, exclude=reported)
    by_id = {c.case_id: c for c in cases}
    name, model, tok = _load(profile, args.model)
    out_dir = Path(args.out) if args.out else profile.results_dir(name) / "sweep"
    model_id = _model_id(profile, name)
    if args.perturb:
        from model_layer.checksum import perturb_weights

        perturb_weights(model, args.perturb, args.perturb_seed)
        model_id = f"{model_id}~perturb{args.perturb:g}@{args.perturb_seed}"
        if not args.out:
            out_dir = out_dir / f"perturb-{args.perturb:g}-s{args.perturb_seed}"
    base = _hparams(params, profile, name, editor)
    if "model_id" in base:
        base["model_id"] = model_id
    if "stats_dir" in base:  # the pipeline's stats folder is a DVC output: keep sweep-only layers out of it
        base["stats_dir"] = str(out_dir / "stats")
    summary = run_sweep(model, tok, profile=profile.name, model_name=name, editor=editor, sadr=sadr,
                        base_hparams=base, grid=parse_vary(args.vary),
                        cases=[by_id[i] for i in ids], content_id=_card(params)["content_id"], out_dir=out_dir,
                        batch_size=int(profile.raw.get("batch_size", 32)), model_id=model_id,
                        progress=not args.no_progress)
    from evaluators.sweep import render

    print(render(summary))
    print(f"wrote {out_dir / 'sweep.md'}")


def cmd_trace(args, params):
    """Causal tracing of MLP outputs on ROME's known facts: the documented procedure behind each edit layer."""
    from data_pipeline.dataset import resolve_mirror
    from driftbench.io import atomic_write_json
    from editors.tracing import known_facts, plot, trace

    profile = get_profile(params, args.profile)
    name, model, tok = _load(profile, args.model)
    cfg = profile.raw.get("trace", {})
    facts = known_facts(model, tok, resolve_mirror(params["data"]["mirror"]) / "rome" / "known_1000.json",
                        int(cfg.get("facts", 30)))
    res = trace(model, tok, facts, samples=int(cfg.get("samples", 3)), window=int(cfg.get("window", 6)),
                seed=int(cfg.get("seed", 0)), progress=not args.no_progress)
    out = profile.results_dir(name)
    atomic_write_json(out / "causal_trace.json", res.__dict__)
    plot(res, out / "causal_trace.png", name)
    print(f"{name}: {res.n_facts} facts, clean P {res.clean_p:.3f} -> corrupted {res.corrupted_p:.3f}; "
          f"MLP indirect effect peaks at layer {res.chosen_layer} (first half) -> {out / 'causal_trace.png'}")


def cmd_aggregate(args, params):
    from evaluators.aggregate import aggregate, format_table

    profile = get_profile(params, args.profile)
    files = [profile.cell_path(m, c) for m in profile.models for c in profile.raw.get("cells", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"missing result files {missing}: run their `driftbench run-cell` stages first")
    expected = [c.case_id for c in _subset_cases(params, profile)]
    summary = aggregate(files, Path(args.out_json), Path(args.out_md), expected_cases=expected)
    print(format_table(summary))
    print(f"\nwrote {args.out_json} and {args.out_md}")


def _dataset_identity(params, card_path=None, cases_path=None, need_card=True):
    """(card or None, {version: content_id}, {case_id: source} or None) of the dataset in params.yaml."""
    from leaderboard.submission import dataset_cases

    out = Path(params["data"]["out"])
    card_path = Path(card_path) if card_path else out / "card.json"
    if not card_path.is_file():
        if need_card:
            raise UserError(f"{card_path} not found: run `driftbench dataset build` (or pass --card)")
        print(f"warning: {card_path} not found: dataset version unknown, submissions cannot be validated "
              "(run `driftbench dataset build`)", file=sys.stderr)
        return None, {}, None
    card = read_json(card_path)
    cases_path = Path(cases_path) if cases_path else out / "cases.jsonl"
    cases = dataset_cases(cases_path) if cases_path.is_file() else None
    return card, {card["version"]: card["content_id"]}, cases


def _profile_cases(params, cases_path=None) -> dict[str, set] | None:
    """Each profile's full case set (its subset file when built, else its seeded stratified subset of the dataset;
    all cases when subset_size is 0): what a submission of that profile must cover. None without the dataset."""
    from data_pipeline.dataset import load_cases
    from data_pipeline.subset import stratified_subset

    path = Path(cases_path) if cases_path else Path(params["data"]["out"]) / "cases.jsonl"
    if not path.is_file():
        return None
    cases = load_cases(path)
    out = {}
    for name in params.get("profiles") or {}:
        profile = get_profile(params, name)
        sp = profile.subset_path()
        size = int(profile.raw.get("subset_size") or 0)
        if sp.is_file():
            out[name] = set(read_json(sp)["case_ids"])
        else:
            out[name] = set(stratified_subset(cases, size, int(profile.raw.get("seed", 0))) if size
                            else (c.case_id for c in cases))
    return out


def _result_files(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.glob("*.jsonl") if not f.name.endswith(".timings.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such result file or folder")
    return files


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
                          paper_csv=paper, dvc_lock=Path(args.dvc_lock), params=params, card=card,
                          git=git_commit("."), on_invalid="skip" if args.skip_invalid else "error",
                          profile_cases=_profile_cases(params),
                          dataset_cases=cases, log=(lambda m: None) if args.quiet else print)
    except BundleError as exc:
        raise UserError(f"{exc}\nfix or remove the bundle, or pass --skip-invalid to build without it")
    kinds = {}
    for e in data.entries:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    for r in data.rejected:
        print(f"left out an invalid submission:\n{r}", file=sys.stderr)
    print(f"leaderboard: {kinds.get('pipeline', 0)} pipeline cells, {kinds.get('submission', 0)} submissions, "
          f"{kinds.get('paper', 0)} paper rows, {data.build['n_rows']} per-case rows -> {args.out}/index.html "
          f"(serve it: python -m http.server -d {args.out})")


def cmd_submit(args, params):
    from leaderboard.provenance import git_commit
    from leaderboard.submission import BundleError, bundle_name, pack_bundle

    profile = get_profile(params, args.profile)
    name, _ = profile.model(args.model)
    editor, _ = parse_cell(args.cell)
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


def cmd_editors(args, params):
    from editors.base import available_editors

    print("\n".join(available_editors()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="driftbench", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (accepted anywhere)")
    sub = p.add_subparsers(dest="command", required=True)

    def with_profile(sp, model=True, progress=False, limit=False):
        sp.add_argument("-p", "--profile", default="embedded", help="profile in params.yaml (default: embedded)")
        if model:
            sp.add_argument("-m", "--model", default=None, help="model key of the profile (default: its only model)")
        if limit:
            sp.add_argument("--limit", type=int, default=0, help="only the first N cases (smoke tests)")
        if progress:
            sp.add_argument("--no-progress", action="store_true", help="no progress bar")
        return sp

    def add(subparsers, name, text):  # the help line also describes the subcommand in its own --help
        return subparsers.add_parser(name, help=text, description=text.replace("%%", "%"))

    ds = add(sub, "dataset", "build the canonical dataset or a profile's subset").add_subparsers(
        dest="action", required=True)
    add(ds, "build", "verify the release's sha256 and write cases.jsonl, piqa.jsonl and the dataset card"
        ).set_defaults(func=cmd_dataset_build)
    with_profile(add(ds, "subset", "write the profile's stratified, seeded case subset"), model=False
                 ).set_defaults(func=cmd_dataset_subset)

    def judge_opts(sp):
        sp.add_argument("--model", default=None, help="judge model (default: params data_raw.judge.model, gpt-4-0613)")
        sp.add_argument("--base-url", default=None, help="any OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 "
                        "(default: params data_raw.judge.base_url, else the openai client's default)")
        sp.add_argument("--concurrency", type=int, default=None, help="requests in flight at once (default 8)")
        sp.add_argument("--cache", default=None, help="judgment cache JSONL (default data/judge/judgments.jsonl)")
        sp.add_argument("--replay", action="store_true", help="use cached judgments only; a cache miss is an error")
        sp.add_argument("--dry-run", action="store_true", help="print prompt counts, cache hits and the estimated "
                        "tokens and cost; ask nothing, write nothing")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
        return sp

    fr = add(ds, "fetch-raw", "put verified copies of the raw CounterFact and KnowEdit files into "
             "data_raw.download_dir (copied from the data mirror when it has them, else downloaded; size and sha256 "
             "checked)")
    fr.add_argument("--offline", action="store_true", help="never download (same as DRIFTBENCH_OFFLINE=1)")
    fr.set_defaults(func=cmd_dataset_fetch_raw)
    br = judge_opts(add(ds, "build-raw", "build a dataset version from raw sources: adapters, balanced seeded merge, "
                        "LLM relatedness filter (API key from the env variable data_raw.judge.api_key_env, "
                        "OPENAI_API_KEY by default; never logged or cached), PIQA, card, parquet export"))
    br.add_argument("--offline", action="store_true", help="never download raw files (same as DRIFTBENCH_OFFLINE=1)")
    br.add_argument("--downloads-only", action="store_true", help="read raw files only from data_raw.download_dir "
                    "(what `dataset fetch-raw` filled and DVC tracks), not from the data mirror")
    br.add_argument("--n-per-source", type=int, default=None, help="cases per source (default 839; 0 = all)")
    br.add_argument("--out", default=None, help="output folder (default: params data_raw.out, data/raw-v1)")
    br.set_defaults(func=cmd_dataset_build_raw)
    jr = judge_opts(add(ds, "judge-release", "fidelity check: run our relatedness judge on the built dataset's "
                        "neighbourhood/relation prompts (paper-v1: already GPT-4-filtered) and count 'related'"))
    jr.add_argument("--cases", default=None, help="cases.jsonl to judge (default: <data.out>/cases.jsonl)")
    jr.add_argument("--limit", type=int, default=0, help="only the first N cases")
    jr.add_argument("--report", default="data/judge/release_report.json", help="where the counts go (JSON)")
    jr.set_defaults(func=cmd_dataset_judge_release)
    ex = add(ds, "export", "write a cases.jsonl as parquet/cases.parquet for datasets.load_dataset('parquet', ...)")
    ex.add_argument("--cases", default=None, help="cases.jsonl (default: <data.out>/cases.jsonl)")
    ex.add_argument("--out", default=None, help="output folder (default: parquet/ beside the cases file)")
    ex.set_defaults(func=cmd_dataset_export)

    md = add(sub, "model", "model preparation").add_subparsers(dest="action", required=True)
    with_profile(add(md, "prepare", "convert a model (the embedded GGUF) once to fp32 safetensors")
                 ).set_defaults(func=cmd_model_prepare)

    ev = add(sub, "evaluate", "pre-edit evaluation").add_subparsers(dest="action", required=True)
    pre = with_profile(add(ev, "pre", "score every case of the subset on the unedited model (resumable)"),
                       progress=True, limit=True)
    pre.set_defaults(func=cmd_evaluate_pre)

    rc = with_profile(add(sub, "run-cell", "edit, score and restore every case of one cell (resumable)"),
                      progress=True, limit=True)
    rc.add_argument("-c", "--cell", required=True, help="editor name, with '+sadr' for the SADR variant (e.g. rome+sadr)")
    rc.add_argument("--verify-restore", action="store_true",
                    help="checksum all parameters after each restore and stop if they differ from the original")
    rc.set_defaults(func=cmd_run_cell)

    tr = with_profile(add(sub, "trace", "causal tracing of MLP outputs on known facts (chooses the edit layer; plot)"),
                      progress=True)
    tr.set_defaults(func=cmd_trace)

    st = with_profile(add(sub, "stats", "second-moment statistics E[kkᵀ] for every edited layer (cached)"),
                      progress=True)
    st.set_defaults(func=cmd_stats)

    sw = with_profile(add(sub, "sweep", "hyper-parameter sweep of one cell on held-out cases (resumable; table in "
                          "results/<profile>/<model>/sweep/sweep.md)"), progress=True)
    sw.add_argument("-c", "--cell", required=True, help="editor, with '+sadr' for the SADR variant (e.g. rome+sadr)")
    sw.add_argument("--vary", action="append", default=[], metavar="NAME=V1,V2",
                    help="hparam values to try on top of the profile's (repeatable; the grid is their product)")
    sw.add_argument("--cases", type=int, default=8, help="held-out cases, balanced over sources (default 8)")
    sw.add_argument("--seed", type=int, default=7, help="seed of the held-out order (default 7)")
    sw.add_argument("--out", default=None, help="output folder (default results/<profile>/<model>/sweep)")
    sw.add_argument("--perturb", type=float, default=0.0, metavar="REL",
                    help="multiply every weight by (1 + REL·z), z ~ N(0,1) seeded, before the sweep (e.g. 1e-6), to "
                         "measure how far results move on numerics alone; rows go to sweep/perturb-REL-sSEED/")
    sw.add_argument("--perturb-seed", type=int, default=0, help="seed of the --perturb noise (default 0)")
    sw.set_defaults(func=cmd_sweep)

    ag = with_profile(add(sub, "aggregate", "summary tables with 95%% CIs from result files only"), model=False)
    ag.add_argument("--out-json", default="results/summary.json")
    ag.add_argument("--out-md", default="results/summary.md")
    ag.set_defaults(func=cmd_aggregate)

    lb = with_profile(add(sub, "leaderboard", "build the static leaderboard site (index with one table per model, "
                          "SADR deltas, ES-vs-DNS trade-off chart, per-cell pages with per-case drill-down and "
                          "provenance) from result files, accepted submissions and the paper's reported numbers; "
                          "no network requests, works from file:// or any static host"), model=False)
    lb.add_argument("--results", action="append", default=[], metavar="PATH",
                    help="extra result file (or folder of *.jsonl) to include; repeatable")
    lb.add_argument("--no-profile", action="store_true", help="only the --results files, not the profile's cells")
    lb.add_argument("--allow-missing", action="store_true", help="skip profile cells that have no result file yet")
    lb.add_argument("--out", default="site", help="output folder, replaced atomically (default: site)")
    lb.add_argument("--submissions", default="leaderboard/submissions",
                    help="folder of accepted submission bundles (default: leaderboard/submissions)")
    lb.add_argument("--paper-csv", default=None,
                    help="the paper's reported numbers (default: paper_reported.csv of the data mirror)")
    lb.add_argument("--no-paper", action="store_true", help="leave the paper's reported rows out")
    lb.add_argument("--dvc-lock", default="dvc.lock", help="dvc.lock to read provenance from (default: dvc.lock)")
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
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error the user can fix (`driftbench.errors.UserError`, which the data, judge, model,
    editor, result-file and bundle errors all are) prints as ``error: ...`` on one line, plus ``hint: ...`` when there
    is one, with exit status 2; ``--debug`` (anywhere on the line) shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    try:
        args.func(args, load_params(args.params))
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
