"""Relatedness-judge throughput against the loopback OpenAI-compatible server (tests/openai_stub.py).

The real `openai` client, our thread pool, retries and the fsynced JSONL cache, against a server that answers every
request after a fixed latency (default 100 ms, roughly a fast hosted model's time-to-first-token for a one-word
answer). Every level judges the same N fresh prompts into a fresh cache, side by side in one run, and the figures
are ratios to concurrency 1. A final pass reruns the last level with its cache complete (offline replay).
Never asserted in tests (timings on a shared machine are noisy).

Usage (from the repo root):
    python bench/bench_judge.py [--prompts 200] [--latency 0.1] [--levels 1,4,16,64] [--json bench/out/judge.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.1, help="server latency per request, seconds")
    ap.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    ap.add_argument("--json", default="bench/out/judge.json")
    args = ap.parse_args()

    from data_pipeline.judge import Judge, JudgeConfig, JudgmentCache
    from openai_stub import OpenAIStub

    os.environ["DRIFTBENCH_BENCH_KEY"] = "bench"
    rows = []
    with OpenAIStub(delay=args.latency) as stub, tempfile.TemporaryDirectory() as tmp:
        base = None
        for level in [int(x) for x in args.levels.split(",")]:
            prompts = [f"bench c={level} #{i}\nNeighbourhood test: Band {i} plays jazz" for i in range(args.prompts)]
            cfg = JudgeConfig(model="bench", base_url=stub.base_url, api_key_env="DRIFTBENCH_BENCH_KEY",
                              concurrency=level, cache=str(Path(tmp) / f"c{level}.jsonl"))
            stub.max_in_flight = 0
            with JudgmentCache(cfg.cache) as cache:
                judge = Judge(cfg, cache)
                t0 = time.perf_counter()
                judge.run(prompts)
                dt = time.perf_counter() - t0
            base = base or dt
            rows.append({"concurrency": level, "prompts": args.prompts, "seconds": round(dt, 3),
                         "prompts_per_s": round(args.prompts / dt, 1), "speedup": round(base / dt, 2),
                         "max_in_flight": stub.max_in_flight,
                         "ideal_prompts_per_s": round(level / args.latency, 1)})
            print(f"concurrency {level:>3}: {args.prompts} prompts in {dt:6.2f} s = {args.prompts / dt:7.1f} prompts/s "
                  f"(x{base / dt:5.2f} vs 1; ideal {level / args.latency:.0f}/s; max in flight {stub.max_in_flight})")
        stub.stop()
        with JudgmentCache(cfg.cache) as cache:  # server stopped: everything from the cache
            t0 = time.perf_counter()
            Judge(cfg, cache).run(prompts, mode="replay")
            dt = time.perf_counter() - t0
        print(f"replay from cache (server stopped): {args.prompts} prompts in {dt * 1000:.1f} ms")
        rows.append({"replay_seconds": round(dt, 4), "prompts": args.prompts})
    out = {"latency_s": args.latency, "cpu_count": os.cpu_count(), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
