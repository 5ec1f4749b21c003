"""ROME (or MEMIT) vs +SADR on the embedded model: per-edit time split and the per-step SADR overhead, side by side.

For each case both variants run on the same loaded model, with the same templates and statistics; the split is
stats lookup | templates | keys | optimisation steps | update | evaluation (probe scoring), and the headline is
the ratio of mean seconds per optimisation step (SADR / plain), which the paper's implementation puts at +24% per
edit. Printed, and written as JSON. Never asserted in tests.

    python bench/bench_rome.py [--cases 3] [--steps 10] [--layer 4] [--templates 5,5]
    python bench/bench_rome.py --editor memit --layers 2,3,4 --templates 10,5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="optimisation iterations for both variants (no early stop)")
    ap.add_argument("--editor", choices=("rome", "memit"), default="rome")
    ap.add_argument("--layer", type=int, default=4, help="ROME's edit layer")
    ap.add_argument("--layers", default="2,3,4", help="MEMIT's edit layers (comma-separated)")
    ap.add_argument("--templates", default="5,5;10,5", help="template lengths 'len,n;len,n' (default 5,5;10,5)")
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--json", default=None, help="default bench/out/<editor>.json")
    args = ap.parse_args()

    from data_pipeline.dataset import load_cases
    from editors.registry import get_editor
    from evaluators.scoring import ProbeScorer
    from model_layer.loading import load_model

    model, tok = load_model(str(ROOT / "models" / "smollm2-135m"))
    by_id = {c.case_id: c for c in load_cases(ROOT / "data" / "paper-v1" / "cases.jsonl")}
    ids = json.loads((ROOT / "data" / "subsets" / "embedded.json").read_text())["case_ids"][: args.cases]
    lengths = [[int(x) for x in part.split(",")] for part in args.templates.split(";")]
    where = {"layer": args.layer} if args.editor == "rome" else {"layers": [int(x) for x in args.layers.split(",")]}
    hp = {**where, "v_num_grad_steps": args.steps, "sadr_steps": args.steps, "early_stop_loss": 0.0,
          "template_lengths": lengths, "stats_tokens": args.stats_tokens, "stats_dir": str(ROOT / "bench/out/stats"),
          "model_id": "bench-smollm2", "stats_corpus": str(ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw")}
    editor, scorer = get_editor(args.editor), ProbeScorer(model, tok, batch_size=8)
    rows = {args.editor: [], f"{args.editor}+sadr": []}
    for cid in ids:
        case = by_id[cid]
        for variant in rows:
            h = editor.edit(model, tok, case, dict(hp, sadr=variant.endswith("sadr")))
            t = time.perf_counter()
            scorer.score_case(case)
            ev = time.perf_counter() - t
            h.restore()
            tm = dict(h.timings, eval_s=ev)
            steps = tm.pop("step_s")
            tm["step_mean_s"] = statistics.mean(steps[:-1]) if len(steps) > 1 else steps[0]  # last only evaluates
            rows[variant].append(tm)
    summary = {v: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for v, rs in rows.items()}
    ratio = summary[f"{args.editor}+sadr"]["step_mean_s"] / summary[args.editor]["step_mean_s"]
    print(f"{args.cases} cases, {args.editor} {where}, {args.steps} iterations, templates {lengths}")
    keys = [k for k in ("stats_s", "templates_s", "keys_s", "optimise_s", "step_mean_s", "update_s", "eval_s")
            if k in summary[args.editor]]
    print("variant     " + " ".join(f"{k:>12}" for k in keys))
    for v, s in summary.items():
        print(f"{v:<11} " + " ".join(f"{s[k]:12.3f}" for k in keys))
    print(f"SADR per-step overhead: x{ratio:.3f} ({100 * (ratio - 1):+.1f}% per optimisation step)")
    out = Path(args.json or f"bench/out/{args.editor}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "summary": summary, "sadr_step_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
