"""`driftbench` — one command line for every pipeline stage (dvc.yaml calls exactly these).

Run from the repository root; paths come from params.yaml (see driftbench/params.py).
"""
from __future__ import annotations

import argparse
import sys

from basis.errors import UserError
from basis.params import load_params

EPILOG = """stages, in pipeline order (all read params.yaml):
  driftbench dataset build                  canonical cases.jsonl + card from the paper release (paper-v1)
  driftbench dataset subset -p embedded     stratified, seeded case subset of a profile
  driftbench dataset build-raw [--dry-run]  optional: a dataset version from raw CounterFact + KnowEdit, LLM-judged
  driftbench model prepare  -p embedded     embedded GGUF -> fp32 safetensors in models/<name>
  driftbench evaluate pre   -p embedded     pre-edit scores, once per model, shared by every editor
  driftbench trace          -p embedded     causal tracing on known facts: which layer to edit (json + png)
  driftbench stats          -p embedded     key second moments E[kk^T] per edited layer (content-named files)
  driftbench train-mend     -p embedded [--sadr]   MEND's hyper-network checkpoint (cases never evaluated)
  driftbench run-cell       -p embedded -c rome+sadr   edit -> score -> restore for every case of one cell
  driftbench sweep          -p embedded -c rome --vary layer=1,3,5   tune on held-out cases (not a stage)
  driftbench aggregate      -p embedded     results/summary.json (+ .md) from result files only
  driftbench leaderboard    -p embedded     static site/ (tables, chart, per-cell pages) from result files only
  driftbench submit -p embedded -c rome --submitter NAME   pack a cell's results as a submission bundle
  driftbench validate BUNDLE...             check a bundle (schema, dataset, protocols, recomputed aggregates)
Every long stage resumes where it stopped; kill it at any time. --limit N (smoke runs) writes under
results/<profile>/<model>/smoke/ and never touches the full run's files.
Errors you can fix print one line (exit status 2); add --debug for the traceback."""


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

    from driftbench.cli import data, results, run

    for group in (data, run, results):
        group.register(sub, add, with_profile)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error the user can fix (`basis.errors.UserError`, which the data, judge, model,
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



