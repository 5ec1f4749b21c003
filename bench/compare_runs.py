"""Do two runs of the default profile reach the same conclusions? (issue 13: bf16 as a measured choice.)

Reads two `results/summary.json` files (e.g. fp32 and bf16 runs of the same cells) and prints, for every metric:

1. per seeded cell, each run's mean ± sd [min–max] over the context-template seeds, and whether the other run's
   mean lies inside the first run's seed range widened by one sd ("within seed spread");
2. per +SADR / plain pair (rome+sadr vs rome, ...), the conclusion each run supports: "+" (every seed of +SADR
   above every seed of plain), "−" (every seed below), "=" (ranges overlap), and whether the two runs agree;
3. for unseeded cells (streams), the two values and their difference.

    python bench/compare_runs.py results/summary.json /path/to/bf16/results/summary.json [--protocol paper]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("ES", "PS", "NS", "RS", "DNS", "RES", "AvgS", "FL", "PPL")
DRIFT = ("drift_DNS", "drift_RS")


def seed_stats(summary: dict, protocol: str) -> dict[str, dict[str, dict]]:
    """{config cell: {metric: {mean, sd, min, max, per_seed}}} for the seeded cells (drift included)."""
    out = {}
    for name, s in summary.get("seeds", {}).items():
        out[name] = {**{m: s[protocol][m] for m in METRICS if m in s.get(protocol, {})},
                     **{m: s["drift"][m] for m in DRIFT if m in s.get("drift", {})}}
    return out


def verdict(a: dict, b: dict) -> str:
    """'+' if every seed of a is above every seed of b, '−' if below, '=' if the ranges overlap."""
    if a["min"] > b["max"]:
        return "+"
    if a["max"] < b["min"]:
        return "−"
    return "="


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", help="summary.json of the reference run (e.g. fp32)")
    ap.add_argument("second", help="summary.json of the other run (e.g. bf16)")
    ap.add_argument("--protocol", default="paper", choices=("paper", "lm-eval"))
    args = ap.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in (args.first, args.second)]
    stats = [seed_stats(r, args.protocol) for r in runs]
    scale = {m: (1.0 if m in DRIFT or m == "PPL" else 100.0) for m in METRICS + DRIFT}  # as summary.md shows them

    print(f"1. seeded cells, protocol {args.protocol}: first vs second (mean ± sd [min–max] over seeds)\n")
    outside = 0
    for cell in sorted(set(stats[0]) & set(stats[1])):
        for m in METRICS + DRIFT:
            if m not in stats[0][cell] or m not in stats[1][cell]:
                continue
            a, b, k = stats[0][cell][m], stats[1][cell][m], scale[m]
            lo, hi = a["min"] - a["sd"], a["max"] + a["sd"]
            ok = lo - 1e-12 <= b["mean"] <= hi + 1e-12
            outside += not ok
            print(f"  {cell.split('/')[-1]:<12} {m:<10} {k * a['mean']:8.2f} ± {k * a['sd']:5.2f} "
                  f"[{k * a['min']:7.2f}–{k * a['max']:7.2f}]   {k * b['mean']:8.2f} ± {k * b['sd']:5.2f} "
                  f"[{k * b['min']:7.2f}–{k * b['max']:7.2f}]   {'within seed spread' if ok else 'OUTSIDE'}")
    print(f"\n  {outside} metric(s) of the second run outside the first run's seed range ± 1 sd\n")

    print("2. +SADR vs plain: '+' every seed higher, '−' every seed lower, '=' ranges overlap\n")
    disagree = 0
    for cell in sorted(stats[0]):
        base = cell.replace("+sadr", "")
        if "+sadr" not in cell or base not in stats[0] or cell not in stats[1] or base not in stats[1]:
            continue
        for m in METRICS + DRIFT:
            if m not in stats[0][cell]:
                continue
            v = [verdict(s[cell][m], s[base][m]) for s in stats]
            disagree += v[0] != v[1]
            print(f"  {cell.split('/')[-1]:<12} {m:<10} first {v[0]}  second {v[1]}  "
                  f"{'same conclusion' if v[0] == v[1] else 'DIFFERENT'}")
    print(f"\n  {disagree} conclusion(s) differ\n")

    print("3. unseeded cells (streams): first vs second\n")
    for cell, c in sorted(runs[0]["cells"].items()):
        if c.get("seed") is not None or cell in stats[0] or cell not in runs[1]["cells"] or "mode" not in c:
            continue
        d = runs[1]["cells"][cell]
        vals = [f"{m} {100 * c[args.protocol][m]['mean']:.1f}/{100 * d[args.protocol][m]['mean']:.1f}"
                for m in ("ES", "PS", "NS", "RS", "DNS") if m in c[args.protocol] and m in d[args.protocol]]
        drift = [f"{m} {c['drift'][m]['mean']:.2f}/{d['drift'][m]['mean']:.2f}" for m in DRIFT
                 if m in (c.get("drift") or {}) and m in (d.get("drift") or {})]
        print(f"  {cell.split('/')[-1]:<18} " + ", ".join(vals + drift))
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
