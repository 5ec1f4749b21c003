"""Evaluation cost per part, before/after and fp32 vs bf16, side by side in one run (issue 13; never asserted).

On N CounterFact subset cases (the ones with fluency and ME-PPL), interleaved over rounds, each part of
`ProbeScorer.score_case` and of the attention-drift probe is timed:

  probes      every probe pair through lm-eval's loglikelihood (one batched call)
  fluency     10 generation prompts x 100 tokens, top-k sampling with a KV cache (tokens/s reported, and the
              weight bytes streamed per decode step against the machine's measured memory bandwidth)
  me-ppl      lm-eval rolling loglikelihood of Corpus-50 + the paper's 100-token PPL; "after" = once per set of
              weights (pre-edit cases share one; a stream's final evaluation shares one): amortised over N cases
  drift       last-token attention rows: eager whole maps (before) vs rows beside SDPA (after)
  case        the whole pre-edit evaluation of one case (probes + fluency + ME-PPL + drift), before vs after

and the same parts on a bfloat16 copy of the model, with the change in every score (max |Δ log-prob|, Δ FL).

    python bench/bench_eval.py [--cases 4] [--rounds 2] [--json bench/out/eval.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bandwidth_gbs(mb: int = 512) -> float:
    """Read bandwidth: summing a buffer much larger than the caches (GB/s)."""
    import torch

    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    return 5 * x.numel() * 4 / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="bench/out/eval.json")
    args = ap.parse_args()

    import torch
    import yaml

    from data_pipeline.dataset import load_cases
    from evaluators.drift import DriftProbe
    from evaluators.generation import case_seed, fluency, load_corpus, me_ppl, sample_ids
    from evaluators.probes import build_probes
    from evaluators.scoring import ProbeScorer
    from model_layer.attention import attention_implementation
    from model_layer.loading import load_model

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    texts = load_corpus(ROOT / params["data"]["mirror"] / params["data"]["me_ppl_corpus"])
    model, tok = load_model(str(ROOT / "models" / "smollm2-135m"))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    by_id = {c.case_id: c for c in load_cases(ROOT / "data" / "paper-v1" / "cases.jsonl")}
    ids = json.loads((ROOT / "data" / "subsets" / "embedded.json").read_text())["case_ids"]
    cases = [by_id[i] for i in ids if by_id[i].generation][: args.cases]
    batch = params["profiles"]["embedded"]["batch_size"]
    scorers = {"fp32": ProbeScorer(model, tok, batch, texts), "bf16": ProbeScorer(bf16, tok, batch, texts)}
    probes = {"fp32": DriftProbe(model, tok), "bf16": DriftProbe(bf16, tok)}
    t: dict[str, list[float]] = {}
    scores: dict[tuple[str, str], dict] = {}
    gen_tokens = 0

    def rec(name, fn):
        t0 = time.perf_counter()
        out = fn()
        t.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for r in range(args.rounds):
        for case in cases:
            pairs = [(c + " ", tgt) for ps in build_probes(case).values() for side in (ps.right, ps.wrong)
                     for c, tgt in zip(ps.contexts, side)]
            for dt, m in (("fp32", model), ("bf16", bf16)):
                sc = scorers[dt]
                lp = rec(f"probes {dt}", lambda: sc.score_pairs(pairs))
                fl = rec(f"fluency {dt}", lambda: fluency(m, tok, case.generation, case_seed(case.case_id)))
                ppl = rec(f"me-ppl before {dt}", lambda: me_ppl(m, tok, sc.lm, texts))
                rec(f"me-ppl after {dt}", lambda: sc.me_ppl(weights_key="unedited"))
                with attention_implementation(m, "eager"):
                    rec(f"drift before {dt}", lambda: probes[dt].before(case))
                rec(f"drift after {dt}", lambda: probes[dt].before(case))
                scores[(dt, case.case_id)] = {"lp": [x for x, _ in lp], "fl": fl["entropy"], "ppl": ppl["paper"]}
            if r == 0:
                gen_tokens += sum(100 - len(x) for x in (tok(p)["input_ids"] for p in case.generation))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    med = {k: statistics.median(v) for k, v in t.items()}
    n = len(cases)
    print(f"\nevaluation of one CounterFact case, SmolLM2-135M, median over {n} cases x {args.rounds} rounds (s)\n")
    print(f"{'part':<10} {'fp32 before':>12} {'fp32 after':>11} {'ratio':>7} {'bf16 after':>11} {'bf16/fp32':>10}")
    out = {"cases": [c.case_id for c in cases], "parts": {}}
    rows = [("probes", "probes", "probes"), ("fluency", "fluency", "fluency"),
            ("me-ppl", "me-ppl before", "me-ppl after"), ("drift", "drift before", "drift after")]
    tot = {"before": 0.0, "after": 0.0, "bf16": 0.0}
    for label, before, after in rows:
        b, a, h = med[f"{before} fp32"], med[f"{after} fp32"], med[f"{after} bf16"]
        if label == "me-ppl":  # once per set of weights: amortised over the pre-edit cases
            a, h = med["me-ppl before fp32"] / n, med["me-ppl before bf16"] / n
        tot["before"] += b
        tot["after"] += a
        tot["bf16"] += h
        out["parts"][label] = {"fp32_before": b, "fp32_after": a, "bf16_after": h}
        print(f"{label:<10} {b:>12.2f} {a:>11.2f} {b / a:>6.2f}x {h:>11.2f} {a / h:>9.2f}x")
    print(f"{'case':<10} {tot['before']:>12.2f} {tot['after']:>11.2f} {tot['before'] / tot['after']:>6.2f}x "
          f"{tot['bf16']:>11.2f} {tot['after'] / tot['bf16']:>9.2f}x")
    out["case"] = tot

    # fluency decode against the memory bandwidth: each step streams every weight once
    bw = bandwidth_gbs()
    for dt, m in (("fp32", model), ("bf16", bf16)):
        wbytes = sum(p.numel() * p.element_size() for p in m.parameters())
        steps = 100 - min(len(tok(p)["input_ids"]) for p in cases[0].generation)
        t0 = time.perf_counter()
        sample_ids(m, tok, cases[0].generation, 0)
        per_step = (time.perf_counter() - t0) / steps
        print(f"fluency decode {dt}: {gen_tokens / n / med[f'fluency {dt}']:.0f} tokens/s, {per_step * 1e3:.0f} ms "
              f"per step for {wbytes / 1e6:.0f} MB of weights = {wbytes / per_step / 1e9:.1f} GB/s "
              f"({100 * wbytes / per_step / 1e9 / bw:.0f}% of the {bw:.1f} GB/s read bandwidth measured here)")
        out[f"decode_{dt}"] = {"ms_per_step": per_step * 1e3, "weight_mb": wbytes / 1e6, "gbs": wbytes / per_step / 1e9}
    out["read_bandwidth_gbs"] = bw

    dlp = max(abs(a - b) for c in cases for a, b in zip(scores[("fp32", c.case_id)]["lp"],
                                                          scores[("bf16", c.case_id)]["lp"]))
    dfl = max(abs(scores[("fp32", c.case_id)]["fl"] - scores[("bf16", c.case_id)]["fl"]) for c in cases)
    dppl = max(abs(scores[("fp32", c.case_id)]["ppl"] / scores[("bf16", c.case_id)]["ppl"] - 1) for c in cases)
    print(f"bf16 vs fp32 scores: max |Δ log-prob| {dlp:.3f} nats, max |Δ FL| {100 * dfl:.2f} (x100 scale), "
          f"max ME-PPL ratio - 1 {100 * dppl:.1f}%")
    out["bf16_vs_fp32"] = {"max_dlogprob": dlp, "max_dfl": dfl, "max_ppl_rel": dppl}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
