"""Which prompts did an edit touch? Per task, the number of prompts whose post-edit scores differ from their
pre-edit scores at all (either continuation's log-prob, compared bit for bit).

For a weight editor nearly every prompt moves a little. For a routed editor (WISE) a prompt whose scores are
bit-identical to the unedited model's was answered by the main memory at every token, so the count is the routing
rate: which prompts the side memory reached.

    python bench/touched_prompts.py results/embedded/smollm2-135m/cells/wise.jsonl [more cell files]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from basis.io import read_jsonl  # noqa: E402  (strict JSONL: a bad line is named by file and line)


def touched(path: Path) -> tuple[Counter, Counter]:
    """({task: prompts whose scores moved}, {task: prompts}) over every row of one cell file."""
    moved, total = Counter(), Counter()
    for no, row in enumerate(read_jsonl(path), 1):
        if "post" not in row or "pre" not in row:
            raise SystemExit(f"{path}:{no}: a row without 'pre' and 'post' scores; pass a cell's rows file")
        for task, post in row["post"].items():
            if not isinstance(post, dict) or "right" not in post:
                continue  # generation metrics (FL) and magnitudes-only entries
            pre = row["pre"][task]
            for i, (pr, pw) in enumerate(zip(post["right"], post["wrong"])):
                total[task] += 1
                moved[task] += (pr != pre["right"][i]) or (pw != pre["wrong"][i])
    return moved, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="cell rows files (results/<profile>/<model>/cells/*.jsonl)")
    args = ap.parse_args(argv)
    for path in args.files:
        moved, total = touched(path)
        print(f"{path.name}: " + ", ".join(f"{t} {moved[t]}/{total[t]}" for t in sorted(total)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
