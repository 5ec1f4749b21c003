"""Foundation benchmark (issue 2): embedded-model load time and per-case evaluation cost on this CPU.

Measured side by side in one run and reported as ratios (never asserted in tests):
  1. load: embedded GGUF (dequantised by transformers) vs the prepared fp32 safetensors copy;
  2. per-case evaluation (pre + post scoring, i.e. two `score_case` calls, as a cell does) on N subset cases,
     with prompt pairs scored per second, at two lm-eval batch sizes.

Usage (from the repo root, after `dvc repro` has built data/ and models/):
    python bench/bench_foundation.py [--cases 8] [--json bench/out/foundation.json]
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
    ap.add_argument("--cases", type=int, default=8, help="subset cases to score (default 8)")
    ap.add_argument("--batch-sizes", default="8,32", help="lm-eval batch sizes to compare (default 8,32)")
    ap.add_argument("--json", default="bench/out/foundation.json", help="where to write the raw figures")
    args = ap.parse_args()

    import torch

    from data_pipeline.dataset import load_cases
    from evaluators.probes import build_probes
    from evaluators.scoring import ProbeScorer
    from model_layer.loading import load_model

    prepared = ROOT / "models" / "smollm2-135m"
    subset = ROOT / "data" / "subsets" / "embedded.json"
    if not prepared.is_dir() or not subset.is_file():
        sys.exit("run `dvc repro` first (needs models/smollm2-135m and data/subsets/embedded.json)")
    out: dict = {"torch_threads": torch.get_num_threads()}

    t = time.perf_counter(); load_model("smollm2-135m"); out["load_gguf_s"] = time.perf_counter() - t
    t = time.perf_counter(); model, tok = load_model(str(prepared)); out["load_prepared_s"] = time.perf_counter() - t

    by_id = {c.case_id: c for c in load_cases(ROOT / "data" / "paper-v1" / "cases.jsonl")}
    cases = [by_id[i] for i in json.loads(subset.read_text())["case_ids"][: args.cases]]
    n_pairs = sum(2 * len(p.contexts) for c in cases for p in build_probes(c).values())
    out["cases"], out["pairs_per_case"] = len(cases), n_pairs / len(cases)

    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        scorer = ProbeScorer(model, tok, batch_size=bs)
        scorer.score_case(cases[0])  # warm-up
        per_case = []
        for c in cases:
            t = time.perf_counter()
            scorer.score_case(c)  # pre
            scorer.score_case(c)  # post (same cost; the none editor leaves weights unchanged)
            per_case.append(time.perf_counter() - t)
        out[f"bs{bs}"] = {"case_pre_post_s_mean": statistics.mean(per_case),
                          "case_pre_post_s_median": statistics.median(per_case),
                          "pairs_per_s": 2 * n_pairs / sum(per_case)}

    bss = [k for k in out if k.startswith("bs")]
    print(f"torch threads: {out['torch_threads']}")
    print(f"load  GGUF {out['load_gguf_s']:.1f} s | prepared fp32 {out['load_prepared_s']:.2f} s | "
          f"ratio {out['load_gguf_s'] / out['load_prepared_s']:.0f}x faster prepared")
    print(f"cases {out['cases']} ({out['pairs_per_case']:.0f} prompt pairs per case, right+wrong)")
    for k in bss:
        r = out[k]
        print(f"  batch {k[2:]:>3}: pre+post {r['case_pre_post_s_mean']:.2f} s/case (median "
              f"{r['case_pre_post_s_median']:.2f}) | {r['pairs_per_s']:.1f} prompts/s")
    if len(bss) >= 2:
        a, b = out[bss[0]], out[bss[-1]]
        print(f"  ratio batch {bss[0][2:]} / batch {bss[-1][2:]} time: "
              f"{a['case_pre_post_s_mean'] / b['case_pre_post_s_mean']:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
