"""The compute stages: `evaluate pre`, `run-cell`, `trace`, `stats`, `sweep`."""
from __future__ import annotations

from pathlib import Path

from basis.errors import UserError
from basis.cells import parse_cell
from basis.params import get_profile, runner_settings
from evaluators.runner import parse_shard
from driftbench.cli.common import _card, _hparams, _limited, _load, _model_id, _ppl_corpus, _subset_cases



def _parts(profile, name: str, rel: str) -> Path:
    """Part files of output ``rel`` (e.g. ``cells/rome.jsonl``), shared by full and smoke runs."""
    return profile.parts_dir(name) / Path(rel).with_suffix("")


def cmd_evaluate_pre(args, params):
    from evaluators.harness import run_pre

    profile = get_profile(params, args.profile)
    name, _ = profile.model(args.model)
    cases = _subset_cases(params, profile)[: args.limit or None]
    content_id, ppl = _card(params)["content_id"], _ppl_corpus(params)
    out = _limited(profile, name, profile.pre_path(name), args.limit)
    shard = parse_shard(args.shard)
    name, model, tok = _load(profile, args.model)
    rows = run_pre(model, tok, name, content_id, cases, out, ppl_corpus=ppl,
                   batch_size=int(profile.raw.get("batch_size", 32)), progress=not args.no_progress,
                   model_id=_model_id(profile, name), parts=_parts(profile, name, "pre.jsonl"), shard=shard,
                   expect_fingerprint=args.fingerprint)
    _report(f"pre-edit {name}", rows, out)


def _report(what: str, rows, out: Path) -> None:
    if rows is None:
        print(f"{what}: this shard is done; other shards' units are still missing, so {out} is not written yet "
              "(the last shard to finish writes it; or rerun without --shard)")
    else:
        fps = sorted({r.get("fingerprint") for r in rows})
        print(f"{what}: {len(rows)} cases -> {out} (fingerprint {', '.join(map(str, fps))})")


def cell_spec(params, profile, name: str, cell: str):
    """The CellSpec of cell name ``cell`` with the profile's hyper-parameters (seed from the name), checked as far as
    possible without the model: editor, capabilities, hyper-parameter names, types and ranges."""
    from evaluators.harness import CellSpec, prepare_cell

    c = parse_cell(cell, "cell")
    hparams = _hparams(params, profile, name, c.editor)
    if c.seed is not None:
        if "template_seed" in hparams and hparams["template_seed"] != 0:
            raise UserError(f"cell {cell!r}: hparams of {c.editor!r} already set template_seed "
                            f"{hparams['template_seed']}; name the seed in one place")
        hparams["template_seed"] = c.seed
    spec = CellSpec(profile.name, name, c.editor, c.sadr, hparams, seed=c.seed, mode=c.mode, steps_matched=c.steps,
                    group=int(profile.raw.get("edit_group", 1)))
    prepare_cell(None, None, spec)
    return spec


def _cell_job(params, profile_name: str, model: str | None, cell: str, limit: int, threads: int | None = None):
    """The harness job of one cell as `run-cell` builds it (model loaded here): what each Ray worker calls."""
    from evaluators.harness import cell_job, none_job

    if threads:
        import torch

        torch.set_num_threads(threads)
    profile = get_profile(params, profile_name)
    name, _ = profile.model(model)
    spec = cell_spec(params, profile, name, cell)
    cases = _subset_cases(params, profile)[: limit or None]
    pre = profile.pre_path(name)
    if limit and not pre.is_file():
        pre = _limited(profile, name, pre, limit)
    if spec.editor == "none":
        return none_job(spec, cases, pre)
    content_id, ppl = _card(params)["content_id"], _ppl_corpus(params)
    name, model_obj, tok = _load(profile, model)
    return cell_job(model_obj, tok, spec, content_id, cases, pre, batch_size=int(profile.raw.get("batch_size", 32)),
                    model_id=_model_id(profile, name), ppl_corpus=ppl)


def cmd_run_cell(args, params):
    from evaluators.harness import run_job

    profile = get_profile(params, args.profile)
    name, _ = profile.model(args.model)
    spec = cell_spec(params, profile, name, args.cell)  # everything a user can get wrong, before the model loads
    shard = parse_shard(args.shard)
    out = _limited(profile, name, profile.cell_path(name, args.cell), args.limit)
    parts = _parts(profile, name, f"cells/{args.cell}.jsonl")
    keys = ("backend", "workers", "address", "threads")  # flags over the profile's runner section over defaults
    for key, value in runner_settings(profile, **{k: getattr(args, k) for k in keys}).items():
        setattr(args, key, value)
    if args.backend == "ray":
        if args.shard or args.fingerprint:
            raise UserError("--shard and --fingerprint are for the local backend; --backend ray plans and shards "
                            "the cell itself")
        if args.workers < 1:
            raise UserError(f"--workers {args.workers}: expected at least 1")
        import functools

        from evaluators.cluster import run_on_ray
        from evaluators.harness import worker_identity

        if profile.raw.get("device") == "cuda":
            resources = {"num_gpus": 1}
        else:
            resources = {"num_cpus": args.threads or 1}
        build = functools.partial(_cell_job, params, profile.name, args.model, args.cell, args.limit, args.threads)
        res = run_on_ray(build, worker_identity(spec.editor), spec.editor, out, parts, workers=args.workers,
                         address=args.address, resources=resources, threads=args.threads,
                         progress=not args.no_progress, desc=spec.cell_id)
        print(f"{spec.cell_id}: ray backend, {args.workers} workers, {res['ran']} units run now, "
              f"{res['restarts']} worker restarts")
        return _report(spec.cell_id, res["rows"], out)
    job = _cell_job(params, profile.name, args.model, args.cell, args.limit)
    rows = run_job(job, out, parts, shard, not args.no_progress, args.fingerprint)
    _report(spec.cell_id, rows, out)


def cmd_stats(args, params):
    """Run each editor's `prepare` (its artefacts, such as key second moments) for the profile's cells and for
    every other editor with hyper-parameters for the model, so a cell run by hand never writes into the stats
    folder (a DVC output the cells depend on)."""
    from editors.registry import get_editor

    profile = get_profile(params, args.profile)
    name, model, tok = _load(profile, args.model, stored=True)  # C in the stored dtype
    editors = {parse_cell(c).editor for c in profile.raw.get("cells", [])}
    editors |= set((profile.raw.get("hparams") or {}).get(name) or {})
    for editor in sorted(editors):
        for what in get_editor(editor).prepare(model, tok, _hparams(params, profile, name, editor),
                                               progress=not args.no_progress):
            print(f"{name} {editor}: {what}")


def cmd_train_mend(args, params):
    """Train MEND's hyper-network (plain, or with SADR's term) for one model of the profile: the checkpoint its
    mend / mend+sadr cells load (content-named by the recipe; resumable)."""
    from tqdm import tqdm

    from editors.mend import MendHparams
    from editors.mend_train import train
    from editors.registry import get_editor

    from driftbench.cli.common import _mend_training_cases

    profile = get_profile(params, args.profile)
    name, _ = profile.model(args.model)
    if not (profile.raw.get("hparams") or {}).get(name, {}).get("mend"):
        raise UserError(f"params.yaml profiles.{args.profile}.hparams.{name} has no 'mend' entry: add MEND's "
                        "hyper-parameters for this model first")
    hparams = _hparams(params, profile, name, "mend")  # its train_cases names the training set below
    editor = get_editor("mend")
    editor.check_hparams(None, hparams)
    hp = MendHparams.from_dict(hparams)
    sadr = editor.sadr_settings(hparams) if args.sadr else None
    train_set = _mend_training_cases(params, profile, hparams)
    out = hp.checkpoint_path(sadr)
    if out.is_file() and not args.force:
        print(f"{out} exists (the recipe's checkpoint); --force retrains it")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    _, model, tok = _load(profile, name)
    print(f"MEND{'+SADR' if sadr else ''} on {name}: {len(train_set)} training cases (none evaluated or held out), "
          f"{hp.train_steps} edits, {hp.train_steps // hp.accumulate} optimiser steps -> {out}")
    bar = tqdm(total=hp.train_steps, desc=f"train mend{'+sadr' if sadr else ''}", disable=args.no_progress)

    def progress(step, row):
        bar.n = step
        bar.set_postfix(edit=f"{row['edit_nll_pre']:.2f}->{row['edit_nll']:.2f}", kl=f"{row['loc_kl']:.3f}")

    meta = train(model, tok, train_set, hp, sadr, out, progress)
    bar.close()
    for old in out.parent.glob("mend.*.safetensors"):  # checkpoints of earlier recipes (the stage's folder)
        if old != out:
            old.unlink()
    first, last = meta["history"][0], meta["history"][-1]
    print(f"wrote {out}: edit NLL after the edit {first['edit_nll']:.3f} (first step) -> {last['edit_nll']:.3f} "
          f"(last), locality KL {first['loc_kl']:.4f} -> {last['loc_kl']:.4f}, {meta['skipped']} steps skipped")


SWEEP_CASES, SWEEP_SEED = 8, 7  # the default held-out set of `driftbench sweep` (its rows live in sweep/)


def _check_case_set(pre_path: Path, case_ids: list[str]) -> None:
    """Refuse to sweep a folder whose pre-edit rows are of other held-out cases: every configuration of a folder is
    tabulated against its one pre.jsonl, and a smaller --cases would replace it."""
    from basis.io import read_jsonl

    if not pre_path.is_file():
        return
    have = {r.get("case_id") for r in read_jsonl(pre_path) if isinstance(r, dict)}
    if have != set(case_ids):
        raise UserError(f"{pre_path}: this sweep folder holds {len(have)} other held-out cases than the {len(case_ids)} "
                        "asked for (another --cases or --seed); pass --out to sweep them in a folder of their own")


def cmd_sweep(args, params):
    """Sweep hyper-parameters of one cell on held-out cases (never the profile's reported subset)."""
    from data_pipeline.dataset import load_cases
    from data_pipeline.subset import held_out
    from evaluators.sweep import parse_vary, run_sweep

    profile = get_profile(params, args.profile)
    cell = parse_cell(args.cell, "cell")
    if cell.mode.suffix or cell.seed is not None:
        raise UserError(f"sweep -c {args.cell!r}: sweep one editor configuration (<editor>[+sadr]); vary "
                        "template_seed with --vary")
    editor, sadr = cell.editor, cell.sadr
    cases = load_cases(Path(params["data"]["out"]) / "cases.jsonl")
    reported = [c.case_id for c in _subset_cases(params, profile)]
    ids = held_out(cases, args.cases, args.seed, exclude=reported)
    by_id = {c.case_id: c for c in cases}
    name = profile.model(args.model)[0]
    out_dir = Path(args.out) if args.out else profile.results_dir(name) / "sweep"
    if not args.out and (args.cases, args.seed) != (SWEEP_CASES, SWEEP_SEED):
        out_dir = out_dir / f"held-out-{args.cases}-s{args.seed}"  # never mixed with the default set's rows
    _check_case_set(out_dir / "pre.jsonl", ids)  # before the model loads or anything is written
    name, model, tok = _load(profile, args.model)
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
    from basis.io import atomic_write_json
    from editors.tracing import known_facts, plot, trace

    profile = get_profile(params, args.profile)
    name, model, tok = _load(profile, args.model, stored=True)
    cfg = profile.raw.get("trace", {})
    facts = known_facts(model, tok, resolve_mirror(params["data"]["mirror"]) / "rome" / "known_1000.json",
                        int(cfg.get("facts", 30)))
    kw = dict(samples=int(cfg.get("samples", 3)), window=int(cfg.get("window", 6)), seed=int(cfg.get("seed", 0)),
              progress=not args.no_progress)
    res = trace(model, tok, facts, **kw)
    attn = trace(model, tok, facts, module="attn", **kw)  # the same noise: the two traces are paired
    out = profile.results_dir(name)
    atomic_write_json(out / "causal_trace.json", {**res.__dict__, "attn": attn.__dict__})
    plot(res, out / "causal_trace.png", name, attn)
    print(f"{name}: {res.n_facts} facts, clean P {res.clean_p:.3f} -> corrupted {res.corrupted_p:.3f}; "
          f"MLP indirect effect peaks at layer {res.chosen_layer} (first half), attention's at layer "
          f"{max(range(len(attn.indirect_effect)), key=attn.indirect_effect.__getitem__)} -> {out / 'causal_trace.png'}")


def register(sub, add, with_profile) -> None:
    """Add this group's subcommands to the `driftbench` parser."""
    ev = add(sub, "evaluate", "pre-edit evaluation").add_subparsers(dest="action", required=True)
    pre = with_profile(add(ev, "pre", "score every case of the subset on the unedited model (resumable)"),
                       progress=True, limit=True)
    pre.add_argument("--shard", default=None, metavar="I/N", help="run only units I, I+N, ... (1-based; e.g. 2/4); "
                     "the last shard to finish writes the output")
    pre.add_argument("--fingerprint", default=None, metavar="FP", help="refuse to run unless this worker's "
                     "fingerprint is FP (the driver's)")
    pre.set_defaults(func=cmd_evaluate_pre)

    rc = with_profile(add(sub, "run-cell", "edit, score and restore every case of one cell (resumable)"),
                      progress=True, limit=True)
    rc.add_argument("-c", "--cell", required=True, help="cell name <editor>[+sadr][.seq<T>[-each]|.batch<B>][.s<seed>]: "
                    "'+sadr' adds SADR; '.seq16' edits 16 cases in one stream and evaluates after all of them "
                    "('.seq16-each': right after each edit); '.batch16' edits 16 at once; '.s1' uses template seed 1 "
                    "(e.g. rome+sadr, memit.seq16, rome.s1)")
    rc.add_argument("--shard", default=None, metavar="I/N", help="run only units I, I+N, ... (1-based; e.g. 2/4); "
                    "shards may run one after the other or at once, on one machine or many sharing the folder; "
                    "the last to finish merges the output")
    rc.add_argument("--fingerprint", default=None, metavar="FP", help="refuse to run unless this worker's "
                    "fingerprint is FP (the driver's; catches workers with other code, packages or data)")
    rc.add_argument("--backend", choices=("local", "ray"), default=None,
                    help="local: units run in this process; ray: on a pool of Ray actors, each loading the model once "
                    "(evaluators/cluster.py; needs the `ray` extra); the cell file is byte-identical "
                    "(default: the profile's runner.backend in params.yaml, else local)")
    rc.add_argument("--workers", type=int, default=None, help="ray: number of actors (one GPU each on a cuda profile, "
                    "else --threads CPUs each; default: the profile's runner.workers, else 2)")
    rc.add_argument("--address", default=None, help="ray: join this cluster ('auto', or ray://HOST:10001); default: "
                    "the profile's runner.address, else start a local one")
    rc.add_argument("--threads", type=int, default=None, help="ray: torch threads per CPU actor (default: the "
                    "profile's runner.threads, else torch's)")
    rc.add_argument("--verify-restore", action="store_true",
                    help="kept for scripts: the check is always on (after every case, stream or batch, parameters, "
                    "buffers, module tree, hooks and editor state are compared with the unedited model's)")
    rc.set_defaults(func=cmd_run_cell)

    tr = with_profile(add(sub, "trace", "causal tracing of MLP outputs on known facts (chooses the edit layer; plot)"),
                      progress=True)
    tr.set_defaults(func=cmd_trace)

    st = with_profile(add(sub, "stats", "second-moment statistics E[kkᵀ] for every edited layer (cached)"),
                      progress=True)
    st.set_defaults(func=cmd_stats)

    tm = with_profile(add(sub, "train-mend", "train MEND's hyper-network for a model (the checkpoint its cells load; "
                          "training cases exclude the evaluated subset and the sweeps' held-out cases; resumable)"),
                      progress=True)
    tm.add_argument("--sadr", action="store_true", help="add SADR's term to the training loss (MEND+SADR's checkpoint)")
    tm.add_argument("--force", action="store_true", help="retrain even when the recipe's checkpoint exists")
    tm.set_defaults(func=cmd_train_mend)

    sw = with_profile(add(sub, "sweep", "hyper-parameter sweep of one cell on held-out cases (resumable; table in "
                          "results/<profile>/<model>/sweep/sweep.md)"), progress=True)
    sw.add_argument("-c", "--cell", required=True, help="editor, with '+sadr' for the SADR variant (e.g. rome+sadr)")
    sw.add_argument("--vary", action="append", default=[], metavar="NAME=V1,V2",
                    help="hparam values to try on top of the profile's (repeatable; the grid is their product)")
    sw.add_argument("--cases", type=int, default=SWEEP_CASES,
                    help=f"held-out cases, balanced over sources (default {SWEEP_CASES})")
    sw.add_argument("--seed", type=int, default=SWEEP_SEED, help=f"seed of the held-out order (default {SWEEP_SEED})")
    sw.add_argument("--out", default=None,
                    help="output folder (default results/<profile>/<model>/sweep, or its subfolder "
                         "held-out-<cases>-s<seed> for another held-out set: one folder per set of cases)")
    sw.add_argument("--perturb", type=float, default=0.0, metavar="REL",
                    help="multiply every weight by (1 + REL·z), z ~ N(0,1) seeded, before the sweep (e.g. 1e-6), to "
                         "measure how far results move on numerics alone; rows go to sweep/perturb-REL-sSEED/")
    sw.add_argument("--perturb-seed", type=int, default=0, help="seed of the --perturb noise (default 0)")
    sw.set_defaults(func=cmd_sweep)


