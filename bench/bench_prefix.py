"""WISE on the embedded model with and without the prefix replay (editors/replay.py), side by side in one run:
the same case and hparams (the profile's, with ``--iters`` SGD steps; early stop as in the cells), rounds interleaved.
Prints the edit time of each and their ratio, and checks that the side memories are bit-identical. Never asserted
in tests.

    python bench/bench_prefix.py [--rounds 1] [--iters 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20, help="SGD steps of the side memory (n_iter)")
    args = ap.parse_args()

    import torch
    import yaml

    from basis.params import get_profile
    from driftbench.cli.common import _hparams, _load, _subset_cases
    from editors.base import EditContext
    from editors.wise import Wise
    from model_layer.arch import arch_for

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    profile = get_profile(params, "embedded")
    name, model, tok = _load(profile, None)
    case = next(c for c in _subset_cases(params, profile) if c.source == "counterfact")
    hp = dict(_hparams(params, profile, name, "wise"), n_iter=args.iters)
    times: dict[bool, list[float]] = {True: [], False: []}
    sides: dict[bool, torch.Tensor] = {}
    steps: dict[bool, int] = {}
    for _ in range(args.rounds):
        for cached in (True, False):
            editor = Wise(prefix_cache=cached)
            t0 = time.perf_counter()
            handle = editor.apply(model, tok, [case], hp, EditContext(model))
            times[cached].append(time.perf_counter() - t0)
            mem = model.get_submodule(arch_for(model).layer("mlp_out", hp["layer"]))
            sides[cached], steps[cached] = mem.side.detach().clone(), handle.diagnostics["steps"]
            handle.restore()
    same = torch.equal(sides[True], sides[False])
    t_on, t_off = statistics.median(times[True]), statistics.median(times[False])
    print(f"WISE, layer {hp['layer']} of {model.config.num_hidden_layers}, case {case.case_id}, "
          f"{steps[True]} steps, {torch.get_num_threads()} thread(s), {args.rounds} round(s), medians:")
    print("| variant | edit s | s/step |\n|---|---:|---:|")
    print(f"| every block at every step | {t_off:.2f} | {t_off / steps[False]:.3f} |")
    print(f"| blocks below replayed (default) | {t_on:.2f} | {t_on / steps[True]:.3f} |")
    print(f"speed-up x{t_off / t_on:.2f}; side memories bit-identical: {same}")
    if not same:
        raise SystemExit("the prefix replay changed the side memory")


if __name__ == "__main__":
    main()
