"""`driftbench` — one command line for every pipeline stage (dvc.yaml calls exactly these).

Run from the repository root; paths come from params.yaml (see driftbench/params.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from driftbench.params import get_profile, load_params, parse_cell

EPILOG = """stages, in pipeline order (all read params.yaml):
  driftbench dataset build                  canonical cases.jsonl + card from the paper release (paper-v1)
  driftbench dataset subset -p embedded     stratified, seeded case subset of a profile
  driftbench model prepare  -p embedded     embedded GGUF -> fp32 safetensors in models/<name>
  driftbench evaluate pre   -p embedded     pre-edit scores, once per model, shared by every editor
  driftbench trace          -p embedded     causal tracing on known facts: which layer to edit (json + png)
  driftbench stats          -p embedded     key second moments E[kk^T] per edited layer (content-named files)
  driftbench run-cell       -p embedded -c rome+sadr   edit -> score -> restore for every case of one cell
  driftbench aggregate      -p embedded     results/summary.json (+ .md) from result files only
Every long stage resumes where it stopped; kill it at any time."""


def _card(params) -> dict:
    path = Path(params["data"]["out"]) / "card.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `driftbench dataset build` first")
    return json.loads(path.read_text())


def _subset_cases(params, profile):
    from data_pipeline.dataset import load_cases

    cases = load_cases(Path(params["data"]["out"]) / "cases.jsonl")
    sp = profile.subset_path()
    if not sp.is_file():
        raise SystemExit(f"{sp} not found: run `driftbench dataset subset -p {profile.name}` first")
    ids = json.loads(sp.read_text())["case_ids"]
    by_id = {c.case_id: c for c in cases}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise SystemExit(f"{sp} names case {missing[0]} which is not in the dataset: rerun `driftbench dataset subset`")
    return [by_id[i] for i in ids]


def _model_id(profile, name: str) -> str:
    """Identity of the weights for content-derived stats names: GGUF sha256 of a prepared model, else ref@revision."""
    prov = profile.prepared_model_dir(name) / "driftbench_model.json"
    m = profile.models[name]
    if prov.is_file():
        p = json.loads(prov.read_text())
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


def cmd_model_prepare(args, params):
    from model_layer.loading import prepare_model

    profile = get_profile(params, args.profile)
    name, m = profile.model(args.model)
    prov = prepare_model(m["ref"], profile.prepared_model_dir(name), dtype=m.get("dtype", "float32"))
    print(f"prepared {name}: {prov['n_params']:,} parameters -> {profile.prepared_model_dir(name)}")


def cmd_evaluate_pre(args, params):
    from evaluators.harness import run_pre

    profile = get_profile(params, args.profile)
    cases = _subset_cases(params, profile)[: args.limit or None]
    name, model, tok = _load(profile, args.model)
    rows = run_pre(model, tok, name, _card(params)["content_id"], cases, profile.pre_path(name),
                   batch_size=int(profile.raw.get("batch_size", 32)), progress=not args.no_progress,
                   model_id=_model_id(profile, name))
    print(f"pre-edit scores for {len(rows)} cases -> {profile.pre_path(name)}")


def cmd_run_cell(args, params):
    from evaluators.harness import CellSpec, run_cell

    profile = get_profile(params, args.profile)
    editor, sadr = parse_cell(args.cell)
    cases = _subset_cases(params, profile)[: args.limit or None]
    name, model, tok = _load(profile, args.model)
    hparams = _hparams(params, profile, name, editor)
    spec = CellSpec(profile.name, name, editor, sadr, hparams)
    out = profile.cell_path(name, args.cell)
    rows = run_cell(model, tok, spec, _card(params)["content_id"], cases, profile.pre_path(name), out,
                    batch_size=int(profile.raw.get("batch_size", 32)), verify_restore=args.verify_restore,
                    progress=not args.no_progress, model_id=_model_id(profile, name))
    print(f"{spec.cell_id}: {len(rows)} cases -> {out}")


def cmd_stats(args, params):
    """Run each editor's `prepare` (cacheable preparation such as key second moments) for the profile's cells."""
    from editors.base import get_editor

    profile = get_profile(params, args.profile)
    name, model, tok = _load(profile, args.model)
    for editor in sorted({parse_cell(c)[0] for c in profile.raw.get("cells", [])}):
        ed = get_editor(editor)
        if hasattr(ed, "prepare"):
            for what in ed.prepare(model, tok, _hparams(params, profile, name, editor), progress=not args.no_progress):
                print(f"{name} {editor}: {what}")


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
        raise SystemExit(f"missing result files {missing}: run their `driftbench run-cell` stages first")
    summary = aggregate(files, Path(args.out_json), Path(args.out_md))
    print(format_table(summary))
    print(f"\nwrote {args.out_json} and {args.out_md}")


def cmd_editors(args, params):
    from editors.base import available_editors

    print("\n".join(available_editors()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="driftbench", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
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

    ag = with_profile(add(sub, "aggregate", "summary tables with 95%% CIs from result files only"), model=False)
    ag.add_argument("--out-json", default="results/summary.json")
    ag.add_argument("--out-md", default="results/summary.md")
    ag.set_defaults(func=cmd_aggregate)

    add(sub, "editors", "list available editors (built-in and plugins)").set_defaults(func=cmd_editors)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args, load_params(args.params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
