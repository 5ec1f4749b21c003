"""Leaderboard benchmark (issue: static site): build the site from 50,000 synthetic per-case result rows.

Layout like the paper profile at full size: the paper's five models × five cells (none, rome, rome+sadr, memit,
memit+sadr) × 2,000 cases = 50,000 rows (~110 MB of JSONL), plus the paper's reported rows when the data mirror is
present. Prints the build time and rows/s with its parts (reading + scoring every cell with
evaluators.metrics.score_cell under both protocols + per-case data, then rendering), and the size of the output;
then the same read + score once more with the pair-validation fast path switched off, side by side, as a ratio.
Never asserted in tests (timings on a shared machine are noisy).

Usage (from the repo root):
    python bench/bench_leaderboard.py [--cases 2000] [--json bench/out/leaderboard_bench.json] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("gpt-j-6b", "llama3-8b", "gpt-neox-20b", "llama2-13b", "tinyllama-1.1b")
CELLS = {"none": 0.0, "rome": 1.0, "rome+sadr": 0.3, "memit": 1.2, "memit+sadr": 0.4}  # cell -> damage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2000, help="cases per cell (default 2000: 25 cells -> 50,000 rows)")
    ap.add_argument("--json", default="bench/out/leaderboard_bench.json", help="where to write the figures")
    ap.add_argument("--keep", default=None, help="also copy the built site here (to look at it)")
    args = ap.parse_args()

    from leaderboard.site import collect, render
    from leaderboard.synthetic import write_result_file

    paper = ROOT.parent / "shared" / "data" / "paper_reported.csv"
    card = {"version": "paper-v1", "content_id": "db5bf212e166e86f"}
    params = {"profiles": {"paper": {"models": {m: {} for m in MODELS}}}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        files = [write_result_file(tmp / "results" / m / f"{c}.jsonl", f"paper/{m}/{c}", args.cases, seed=i,
                                   damage=d)
                 for i, m in enumerate(MODELS) for c, d in CELLS.items()]
        gen_s = time.perf_counter() - t0
        n_rows = len(files) * args.cases
        mb_in = sum(f.stat().st_size for f in files) / 1e6
        print(f"generated {n_rows:,} rows in {len(files)} result files ({mb_in:.0f} MB) in {gen_s:.1f} s "
              f"(not part of the build)")

        t0 = time.perf_counter()
        data = collect(files, paper_csv=paper if paper.is_file() else None, params=params, card=card,
                       git={"commit": "unknown", "dirty": None})
        t1 = time.perf_counter()
        out = tmp / "site"
        out.mkdir()
        render(data, out)
        t2 = time.perf_counter()
        collect_s, render_s, total = t1 - t0, t2 - t1, t2 - t0
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        pages = len(list((out / "cells").glob("*.html")))
        print(f"build: {total:.1f} s for {n_rows:,} rows = {n_rows / total:,.0f} rows/s "
              f"(read + score + per-case {collect_s:.1f} s, render {render_s:.1f} s); "
              f"site {size:.1f} MB, {pages} cell pages, index {(out / 'index.html').stat().st_size / 1e3:.0f} kB")
        # side by side: the same collect with every [logprob, n] pair checked one by one (no fast path)
        import evaluators.metrics as metrics

        fast_pairs = metrics._pairs
        metrics._pairs = metrics._pairs_checked
        try:
            t0 = time.perf_counter()
            collect(files, paper_csv=paper if paper.is_file() else None, params=params, card=card,
                    git={"commit": "unknown", "dirty": None})
            checked_s = time.perf_counter() - t0
        finally:
            metrics._pairs = fast_pairs
        print(f"read + score + per-case: {collect_s:.1f} s with the pair-validation fast path, {checked_s:.1f} s "
              f"with every pair checked one by one: x{checked_s / collect_s:.2f}")
        print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(out, args.keep)
            print(f"site copied to {args.keep}")
    res = {"rows": n_rows, "cells": len(files), "input_mb": round(mb_in, 1), "build_s": round(total, 2),
           "collect_s": round(collect_s, 2), "collect_checked_pairs_s": round(checked_s, 2),
           "fast_path_speedup": round(checked_s / collect_s, 2), "render_s": round(render_s, 2), "rows_per_s": round(n_rows / total),
           "site_mb": round(size, 1), "cell_pages": pages, "cpus": os.cpu_count(),
           "loadavg_1min": round(os.getloadavg()[0], 2)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
