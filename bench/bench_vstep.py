"""The v* step and the whole edit, before/after, side by side in one run (issue 13; never asserted in tests).

Variants of `editors.core.optimise_target` on the same cases, interleaved over rounds (so drift of the machine hits
all of them alike), each at a fixed number of steps (no early stop):

  ref-logits     logits at every position (the reference's way), blocks 0..L every step, SDPA
  label-logits   logits only at the label / KL positions
  + prefix       ... and blocks 0..L run once per edit (the default)
  bf16           the default on a bfloat16 copy of the model (δ fp32)
  sadr eager     SADR, eager attention (whole maps), all logits, no prefix cache (the old path)
  sadr rows      SADR, query rows beside SDPA, label logits, prefix cache (the default)
  sadr bf16      the default SADR path in bfloat16

For each: median seconds per step, the ratio to its baseline, and max |Δv*| / ‖v* − v_init‖ against the fp32
baseline of the same loss (0 = identical). Then whole ROME edits fp32 vs bf16 (seconds per edit and the v*
difference), matmul FLOPs of one step (torch's FlopCounterMode) against the measured matmul ceilings of this
machine (fp32 and bf16, at the step's own shapes and at a square 1024 GEMM), and the padding share of the batch.

    python bench/bench_vstep.py [--cases 3] [--rounds 3] [--steps 8] [--json bench/out/vstep.json]
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


def matmul_gflops(m: int, k: int, n: int, dtype, reps: int = 20) -> float:
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="optimisation iterations per run (no early stop)")
    ap.add_argument("--json", default="bench/out/vstep.json")
    args = ap.parse_args()

    import torch
    import yaml
    from torch.utils.flop_counter import FlopCounterMode

    from data_pipeline.dataset import load_cases
    from editors.base import EditContext
    from editors.registry import get_editor
    from editors.core import VHparams, build_batch, make_request, optimise_target
    from editors.rome import RomeHparams
    from editors.sadr import SADRLoss
    from model_layer.arch import arch_for
    from model_layer.attention import attention_implementation
    from model_layer.loading import load_model

    model, tok = load_model(str(ROOT / "models" / "smollm2-135m"))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    emb = params["profiles"]["embedded"]
    rome_hp = dict(emb["hparams"]["smollm2-135m"]["rome"], stats_dir=str(ROOT / "stats"), model_id="smollm2-135m",
                   stats_corpus=str((ROOT / params["data"]["mirror"] / "wikitext-2-raw" / "wiki.test.raw").resolve()))
    by_id = {c.case_id: c for c in load_cases(ROOT / "data" / "paper-v1" / "cases.jsonl")}
    ids = json.loads((ROOT / "data" / "subsets" / "embedded.json").read_text())["case_ids"][: args.cases]
    rome = get_editor("rome")
    rhp = RomeHparams.from_dict(rome_hp)
    arch = arch_for(model)
    hook = arch.layer("mlp", rhp.layer)
    vhp = VHparams(layer=rhp.layer, v_num_grad_steps=args.steps, early_stop_loss=0.0, v_lr=rhp.v_lr,
                   v_weight_decay=rhp.v_weight_decay, clamp_norm_factor=rhp.clamp_norm_factor, kl_factor=rhp.kl_factor)
    templates = {id(m): rome.templates(m, tok, rhp) for m in (model, bf16)}
    sadr_gamma = rhp.sadr_gamma

    def run(m, case, sadr: bool, **kw):
        batch = build_batch(tok, make_request(case), templates[id(m)], "cpu")
        extras = [SADRLoss(sadr_gamma, first_layer=rhp.layer + 1)] if sadr else []
        return optimise_target(m, batch, hook, vhp, extras, **kw)

    def eager(m, case, sadr, **kw):
        with attention_implementation(m, "eager"):
            return run(m, case, sadr, **kw)

    variants = {  # name: (callable, model, sadr, kwargs, baseline name for the ratio and the v* difference)
        "ref-logits": (run, model, False, dict(all_logits=True, prefix_cache=False), "ref-logits"),
        "label-logits": (run, model, False, dict(prefix_cache=False), "ref-logits"),
        "+ prefix": (run, model, False, {}, "ref-logits"),
        "bf16": (run, bf16, False, {}, "+ prefix"),
        "sadr eager": (eager, model, True, dict(all_logits=True, prefix_cache=False), "sadr eager"),
        "sadr rows": (run, model, True, {}, "sadr eager"),
        "sadr bf16": (run, bf16, True, {}, "sadr rows"),
    }
    steps = {v: [] for v in variants}
    vstar: dict[tuple[str, str], torch.Tensor] = {}
    moved: dict[tuple[str, str], float] = {}
    for r in range(args.rounds):
        for cid in ids:
            for name, (fn, m, sadr, kw, _) in variants.items():
                res = fn(m, by_id[cid], sadr, **kw)
                steps[name] += res.step_seconds[1:]  # step 0 also fills caches (prefix, SADR reference)
                vstar[(name, cid)] = res.v_star
                moved[(name, cid)] = float((res.v_star - res.v_init).norm())
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    out = {"steps": args.steps, "cases": ids, "variants": {}}
    print(f"\nv* step, SmolLM2-135M layer {rhp.layer}, {len(templates[id(model)])} templates, {args.cases} cases x "
          f"{args.rounds} rounds x {args.steps} steps\n")
    print(f"{'variant':<14} {'s/step':>8} {'vs':>14} {'ratio':>7} {'max|Δv*|/|v*-v0|':>18}")
    for name, (_, _, _, _, base) in variants.items():
        med = statistics.median(steps[name])
        ratio = statistics.median(steps[base]) / med
        diff = max(float((vstar[(name, c)] - vstar[(base, c)]).norm()) / moved[(base, c)] for c in ids)
        out["variants"][name] = {"s_per_step": med, "baseline": base, "speedup": ratio, "max_rel_dv": diff}
        print(f"{name:<14} {med:>8.3f} {base:>14} {ratio:>6.2f}x {diff:>18.2e}")

    # whole ROME edits (keys, optimisation with early stop, update) fp32 vs bf16, and the v* they reach
    edit_s = {"fp32": [], "bf16": []}
    v_diff = []
    for cid in ids:
        vs = {}
        for label, m in (("fp32", model), ("bf16", bf16)):
            t = time.perf_counter()
            h = rome.apply(m, tok, [by_id[cid]], dict(rome_hp), EditContext(m))
            edit_s[label].append(time.perf_counter() - t)
            vs[label] = (h.diagnostics["delta_norm"], h.diagnostics["steps"])
            h.restore()
        v_diff.append((vs["fp32"], vs["bf16"]))
    e32, e16 = statistics.median(edit_s["fp32"]), statistics.median(edit_s["bf16"])
    print(f"\nROME edit (default hparams, early stop): fp32 {e32:.2f} s, bf16 {e16:.2f} s: x{e32 / e16:.2f}; "
          f"‖δ‖ and steps fp32 vs bf16: " + "; ".join(f"{a[0]:.3f}/{a[1]} vs {b[0]:.3f}/{b[1]}" for a, b in v_diff))
    out["edit"] = {"fp32_s": e32, "bf16_s": e16, "delta_norm_steps": v_diff}

    # FLOPs of one default step and the machine's matmul ceilings
    case = by_id[ids[0]]
    batch = build_batch(tok, make_request(case), templates[id(model)], "cpu")
    flops = []
    for n in (2, 3):  # the difference is one steady step: forward over the replayed prefix + backward
        with FlopCounterMode(display=False) as fc:
            optimise_target(model, batch, hook, VHparams(layer=rhp.layer, v_num_grad_steps=n, early_stop_loss=0.0))
        flops.append(fc.get_total_flops())
    step_flops = flops[1] - flops[0]
    tokens = int(batch.attention_mask.numel())
    real = int(batch.attention_mask.sum())
    d, ff = model.config.hidden_size, model.config.intermediate_size
    ceil = {}
    for label, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ceil[label] = {"mlp_shape": matmul_gflops(tokens, d, ff, dt), "square_1024": matmul_gflops(1024, 1024, 1024, dt)}
    step32 = out["variants"]["+ prefix"]["s_per_step"]
    step16 = out["variants"]["bf16"]["s_per_step"]
    print(f"\none default step ≈ {step_flops / 1e9:.1f} GFLOP of matmuls ({tokens} tokens in the batch, {real} real: "
          f"{100 * (1 - real / tokens):.0f}% padding)")
    for label, s in (("fp32", step32), ("bf16", step16)):
        c = ceil[label]
        print(f"  {label}: {step_flops / s / 1e9:.0f} GFLOP/s achieved; ceiling {c['mlp_shape']:.0f} GFLOP/s at the "
              f"step's MLP shape ({tokens}x{d}x{ff}), {c['square_1024']:.0f} at 1024^3 -> "
              f"{100 * step_flops / s / 1e9 / c['mlp_shape']:.0f}% of the shape ceiling")
    out.update(step_gflop=step_flops / 1e9, tokens=tokens, real_tokens=real, ceilings_gflops=ceil)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
