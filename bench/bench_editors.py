"""Per-edit time split of every editor, ±SADR, side by side in one run (issue 14): optimisation (v*/z* loop or the
FT weight loop), write (keys, residuals and the update: `LocateEditor.write`), restore, and one evaluation of the
edited model (`ProbeScorer.score_case`), with the SADR per-step overhead (mean step time +sadr / plain, both at
the SADR step count, so the ratio is per step). Editors and variants are interleaved over rounds on the same
cases; the profile's embedded hparams are used (early stop on, as in the cells). Never asserted in tests.

    python bench/bench_editors.py [--cases 2] [--rounds 1] [--editors rome,memit,pmet,alphaedit,intattn,ft]
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
    ap.add_argument("--cases", type=int, default=2, help="CounterFact cases of the embedded subset")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--editors", default="rome,memit,pmet,alphaedit,intattn,ft")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation column")
    ap.add_argument("--json", default="bench/out/editors.json")
    args = ap.parse_args()

    import yaml

    from basis.params import get_profile
    from driftbench.cli.common import _hparams, _load, _ppl_corpus, _subset_cases
    from editors.base import EditContext
    from editors.registry import get_editor
    from evaluators.generation import load_corpus
    from evaluators.scoring import ProbeScorer

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    profile = get_profile(params, "embedded")
    name, model, tok = _load(profile, None)
    cases = [c for c in _subset_cases(params, profile) if c.source == "counterfact"][: args.cases]
    scorer = ProbeScorer(model, tok, batch_size=int(profile.raw.get("batch_size", 8)),
                         ppl_texts=load_corpus(_ppl_corpus(params)))
    editors = args.editors.split(",")
    res: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for ed in editors:
            editor = get_editor(ed)
            hp = _hparams(params, profile, name, ed)
            editor.prepare(model, tok, hp, progress=False)
            for variant in ("plain", "steps", "sadr"):  # +steps: SADR's step count without SADR (per-step base)
                sadr = editor.sadr_settings(hp) if variant == "sadr" else None
                for case in cases:
                    ctx = EditContext(model, sadr, steps_matched=variant == "steps")
                    t0 = time.perf_counter()
                    handle = editor.apply(model, tok, [case], hp, ctx)
                    edit_s = time.perf_counter() - t0
                    t1 = time.perf_counter()
                    if not args.no_eval and variant == "plain":
                        scorer.score_case(case, weights_key=f"bench {ed} {case.case_id} {time.time()}")
                    eval_s = time.perf_counter() - t1
                    t2 = time.perf_counter()
                    handle.restore()
                    restore_s = time.perf_counter() - t2
                    tim = handle.timings
                    r = res.setdefault(f"{ed}:{variant}", {})
                    steps = tim.get("step_s") or []
                    for key, v in (("edit_s", edit_s), ("optimise_s", tim.get("optimise_s", edit_s)),
                                   ("write_s", tim.get("write_s", 0.0)), ("restore_s", restore_s),
                                   ("step_s", statistics.mean(steps) if steps else 0.0), ("steps", len(steps))):
                        r.setdefault(key, []).append(v)
                    if not args.no_eval and variant == "plain":
                        r.setdefault("eval_s", []).append(eval_s)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
    print(f"{len(cases)} CounterFact case(s) x {args.rounds} round(s); medians in seconds\n")
    print("| editor | steps | optimise | write (keys + update) | restore | evaluation | edit total | "
          "SADR steps | s/step +steps | s/step +sadr | SADR per-step overhead |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ed in editors:
        p, st, s = med[f"{ed}:plain"], med[f"{ed}:steps"], med[f"{ed}:sadr"]
        ratio = s["step_s"] / st["step_s"] if st["step_s"] else float("nan")
        print(f"| {ed} | {p['steps']:.0f} | {p['optimise_s']:.2f} | {p['write_s']:.2f} | {p['restore_s']:.4f} | "
              f"{p.get('eval_s', float('nan')):.2f} | {p['edit_s']:.2f} | {s['steps']:.0f} | {st['step_s']:.3f} | "
              f"{s['step_s']:.3f} | x{ratio:.2f} |")
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cases": [c.case_id for c in cases], "rounds": args.rounds, "median": med,
                               "raw": res}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
