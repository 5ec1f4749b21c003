"""Batched independent edits vs one at a time: per-case v* throughput for k = 1, 2, 4, 8 (issue 13 item 4).

k cases' v* are optimised in one forward/backward (`editors.core.optimise_targets`) against the same k cases one
at a time (`optimise_target`), interleaved over rounds, at a fixed number of steps (no early stop, so both do the
same number of steps). Printed per k: seconds per step per case for each, the ratio (batched speed-up; < 1 means
batching costs more), the padding share of the stacked batch, and max ‖Δv*‖ / ‖v* − v_init‖ between the two.
On a GPU (``--device cuda``) it also runs k = 16 and 32. Never asserted in tests.

    python bench/bench_batched.py [--ks 1,2,4,8] [--rounds 2] [--steps 6] [--dtype float32] [--device cpu]
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
    ap.add_argument("--ks", default=None, help="group sizes (default 1,2,4,8; on cuda 1,2,4,8,16,32)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"), help="model folder or hub id")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--json", default="bench/out/batched.json")
    args = ap.parse_args()

    import torch

    from data_pipeline.dataset import load_cases
    from editors.core import (VHparams, build_batch, generate_context_templates, make_request, optimise_target,
                              optimise_targets)
    from model_layer.arch import arch_for
    from model_layer.loading import load_model

    ks = [int(x) for x in (args.ks or ("1,2,4,8,16,32" if args.device.startswith("cuda") else "1,2,4,8")).split(",")]
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    cases = load_cases(ROOT / "data" / "paper-v1" / "cases.jsonl")[: max(ks)]
    templates = generate_context_templates(model, tok, ((10, 5),), seed=0)
    batches = [build_batch(tok, make_request(c), templates, args.device) for c in cases]
    hook = arch_for(model).layer("mlp", args.layer)
    hp = VHparams(layer=args.layer, v_num_grad_steps=args.steps, early_stop_loss=0.0)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t

    res = {k: {"one": [], "batched": [], "dv": 0.0} for k in ks}
    for r in range(args.rounds):
        for k in ks:
            group = batches[:k]
            one, t_one = timed(lambda: [optimise_target(model, b, hook, hp) for b in group])
            many, t_many = timed(lambda: optimise_targets(model, group, hook, hp))
            res[k]["one"].append(t_one / (k * args.steps))
            res[k]["batched"].append(t_many / (k * args.steps))
            res[k]["dv"] = max(res[k]["dv"], max(float((a.v_star - b.v_star).norm() / (b.v_star - b.v_init).norm())
                                                 for a, b in zip(many, one)))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"\nbatched v* vs one at a time: {args.model} {args.dtype} on {args.device}, layer {args.layer}, "
          f"{len(templates)} templates, {args.steps} steps, {args.rounds} rounds\n")
    print(f"{'k':>3} {'one s/step/case':>16} {'batched':>9} {'speed-up':>9} {'padding':>8} {'max|Δv*|/|v*-v0|':>18}")
    out = {"device": args.device, "dtype": args.dtype, "steps": args.steps, "k": {}}
    for k in ks:
        a, b = statistics.median(res[k]["one"]), statistics.median(res[k]["batched"])
        widths = [bt.input_ids.shape[1] for bt in batches[:k]]
        rows = [bt.input_ids.shape[0] for bt in batches[:k]]
        real = sum(int(bt.attention_mask.sum()) for bt in batches[:k])
        pad = 1 - real / (max(widths) * sum(rows))
        out["k"][k] = {"one_s_per_step_case": a, "batched_s_per_step_case": b, "speedup": a / b, "padding": pad,
                       "max_rel_dv": res[k]["dv"]}
        print(f"{k:>3} {a:>16.3f} {b:>9.3f} {a / b:>8.2f}x {100 * pad:>7.0f}% {res[k]['dv']:>18.2e}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
