"""`driftbench dataset ...` and `driftbench model prepare`: the dataset versions and the prepared model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from basis.params import get_profile



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
    from basis.io import atomic_write_json

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


def register(sub, add, with_profile) -> None:
    """Add this group's subcommands to the `driftbench` parser."""
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


