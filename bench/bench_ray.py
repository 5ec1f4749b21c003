"""The Ray backend against the local backend on one cell of the embedded model, side by side in one run.

    python bench/bench_ray.py [--cell rome] [--limit 4] [--workers 2]

Three runs of the cell's first ``--limit`` cases, each into its own temporary folder (nothing under results/):
the local backend with 1 torch thread, Ray with ``--workers`` actors of 1 thread each (the same fingerprint, so the
merged file must be byte-identical to the first), and the local backend with the machine's default thread count
(another fingerprint: timing only). Prints wall times, the ratios, per-unit compute seconds on the workers and
Ray's overhead (wall − the slowest worker's compute), and whether the files match.
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", default="rome")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import os

    os.chdir(ROOT)  # params.yaml's paths are relative to the repository root
    import torch

    from basis.params import get_profile, load_params
    from driftbench.cli.run import _cell_job, cell_spec
    from evaluators.cluster import run_on_ray
    from evaluators.harness import parts_root, run_job, worker_identity

    params = load_params(ROOT / "params.yaml")
    profile = get_profile(params, "embedded")
    name, _ = profile.model(None)
    spec = cell_spec(params, profile, name, args.cell)
    default_threads = torch.get_num_threads()
    out: dict[str, Path] = {}
    wall: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, threads in (("local 1 thread", 1), ("local default threads", default_threads)):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            job = _cell_job(params, profile.name, None, args.cell, args.limit, threads)
            out[label] = Path(tmp) / label.replace(" ", "_") / f"{args.cell}.jsonl"
            run_job(job, out[label], progress=False)
            wall[label] = time.perf_counter() - t0
        label = f"ray {args.workers}x1 thread"
        out[label] = Path(tmp) / "ray" / f"{args.cell}.jsonl"
        t0 = time.perf_counter()
        build = functools.partial(_cell_job, params, profile.name, None, args.cell, args.limit, 1)
        res = run_on_ray(build, worker_identity(spec.editor), spec.editor, out[label], parts_root(out[label]),
                         workers=args.workers, resources={"num_cpus": 1}, threads=1, progress=False,
                         desc=spec.cell_id)
        wall[label] = time.perf_counter() - t0
        same = out[label].read_bytes() == out["local 1 thread"].read_bytes()
        base = wall["local 1 thread"]
        print(f"cell {spec.cell_id}, {args.limit} cases, torch default threads {default_threads}\n")
        print("| backend | wall s | vs local 1 thread |\n|---|---:|---:|")
        for k, v in wall.items():
            print(f"| {k} | {v:.1f} | ×{base / v:.2f} |")
        per = res["per_unit_s"]
        print(f"\nray: {len(per)} units, compute {sum(per):.1f} s in all (mean {sum(per) / max(1, len(per)):.1f} s); "
              f"overhead (wall − compute / workers): {wall[label] - sum(per) / args.workers:.1f} s")
        print(f"ray file byte-identical to the local 1-thread file: {same}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
