"""Synthetic result rows in the harness's exact format (``evaluators.probes`` contract) — for tests, the
``bench/`` script and the example submission bundle. Never a source of reported numbers.

A row has the shape :func:`evaluators.harness.run_cell` writes: ``cell``, ``case_id``, ``source``, ``pre``/``post``
(per probe key aligned ``[logprob_sum, n_tokens]`` pairs of the right and the wrong target), ``editor`` (name, sadr,
diagnostics with ``attn_drift`` for edited cells), ``env`` and ``fingerprint``. Probe counts follow the shapes seen
in the paper-v1 cases (CounterFact: rewrite, 2 paraphrases, ~7 neighbourhood prompts and their distracted copies,
one PIQA item; WikiData: rewrite, alias, reasoning and relation prompts, PIQA). ``skill`` raises the post-edit
per-token log-probs of the right targets of the edit probes (edit success) and ``damage`` lowers those of the
specificity probes (specificity failure).
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Iterator, Sequence

from basis.cells import parse_cell_id

ENV = {"device": "cpu", "dtype": "float32", "lm_eval": "0.4.13", "python": "3.11.7", "torch": "2.13.0+cpu",
       "transformers": "5.23.0"}
EDIT_KEYS = ("rewrite", "paraphrase", "subject_alias", "reasoning")
SPEC_KEYS = ("neighborhood", "neighborhood_distracted", "relation", "relation_distracted")


def case_id(source: str, i: int) -> str:
    return f"{'cf' if source == 'counterfact' else 'wd'}-" + hashlib.sha256(f"{source}{i}".encode()).hexdigest()[:12]


def _shape(rng: random.Random, source: str) -> dict[str, tuple[int, int]]:
    """probe key -> (number of prompts, tokens per target)."""
    if source == "counterfact":
        n_nb = rng.randint(3, 10)
        return {"rewrite": (1, 1), "paraphrase": (2, 1), "neighborhood": (n_nb, 1),
                "neighborhood_distracted": (n_nb, 1), "piqa": (1, rng.randint(8, 120)),
                "piqa_distracted": (1, rng.randint(8, 120))}
    n_rel, tok = rng.randint(1, 8), rng.randint(1, 4)
    shape = {"rewrite": (1, rng.randint(1, 6)), "subject_alias": (rng.randint(1, 3), 2), "relation": (n_rel, tok),
             "relation_distracted": (n_rel, tok), "piqa": (1, rng.randint(8, 120)),
             "piqa_distracted": (1, rng.randint(8, 120))}
    if rng.random() < 0.6:
        shape["reasoning"] = (rng.randint(1, 20), 1)
    return shape


def _probes(rng: random.Random, shape, shift: dict[str, float]) -> dict:
    out = {}
    for key, (n, tok) in shape.items():
        s = shift.get(key, 0.0)
        right = [[round(-tok * max(0.05, rng.uniform(0.5, 4.0) - s), 6), tok] for _ in range(n)]
        wrong = [[round(-tok * rng.uniform(0.5, 4.0), 6), tok] for _ in range(n)]
        out[key] = {"right": right, "wrong": wrong}
    return out


def synthetic_rows(cell: str, n_cases: int, seed: int = 0, skill: float = 1.5, damage: float = 0.5,
                   cases: Sequence[tuple[str, str]] | None = None) -> Iterator[dict]:
    """``n_cases`` rows of one cell (``"<profile>/<model>/<editor>"``), alternating CounterFact and WikiData, or
    one row per ``(case_id, source)`` of ``cases`` when given (e.g. the real ids of a profile's subset).

    Pre-edit probes depend only on (case, seed) — not on the cell — so cells of one model share identical
    ``pre`` entries, as the pipeline guarantees (``evaluators.aggregate`` checks it)."""
    name = parse_cell_id(cell).name
    sadr, base = name.sadr, name.editor
    if cases is None:
        cases = [(case_id(s, i), s) for i in range(n_cases) for s in ["counterfact" if i % 2 == 0 else "wikidata"]]
    for i, (cid, source) in enumerate(cases):
        pre_rng = random.Random(f"{seed}/{cid}")
        shape = _shape(pre_rng, source)
        pre = _probes(pre_rng, shape, {})
        if base == "none":
            post, diagnostics = pre, {}
        else:
            rng = random.Random(f"{seed}/{cid}/{cell}")
            shift = {k: skill for k in EDIT_KEYS}
            shift.update({k: -damage for k in SPEC_KEYS})
            post = _probes(rng, shape, shift)
            diagnostics = {"layer": 4, "steps": rng.randint(5, 20), "delta_norm": round(rng.uniform(1, 9), 4),
                           "attn_drift": {k: [round(rng.uniform(0, damage), 6) for _ in range(shape[k][0])]
                                          for k in ("neighborhood_distracted", "relation") if k in shape}}
        yield {"cell": cell, "case_id": cid, "source": source, "pre": pre, "post": post,
               "editor": {"name": base, "sadr": sadr, "diagnostics": diagnostics}, "env": dict(ENV),
               "fingerprint": hashlib.sha256(cell.encode()).hexdigest()[:16]}


def write_result_file(path, cell: str, n_cases: int, **kwargs) -> Path:
    """Write ``synthetic_rows(cell, n_cases, **kwargs)`` as a result file (canonical JSONL, like the harness)."""
    from basis.io import atomic_write_jsonl

    path = Path(path)
    atomic_write_jsonl(path, synthetic_rows(cell, n_cases, **kwargs))
    return path


def main(argv: list[str] | None = None) -> None:
    """Regenerate the example bundle ``leaderboard/examples/example-synthetic`` (synthetic numbers on the real case
    ids of the embedded subset; run from the repository root after ``dvc repro``)."""
    import argparse
    import json
    import tempfile

    from leaderboard.submission import dataset_cases, pack_bundle

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default="leaderboard/examples/example-synthetic")
    ap.add_argument("--card", default="data/paper-v1/card.json")
    ap.add_argument("--subset", default="data/subsets/embedded.json")
    ap.add_argument("--cases", default="data/paper-v1/cases.jsonl")
    args = ap.parse_args(argv)
    card = json.loads(Path(args.card).read_text())
    sources = dataset_cases(args.cases)
    ids = json.loads(Path(args.subset).read_text())["case_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        res = write_result_file(Path(tmp) / "cell.jsonl", "embedded/smollm2-135m/example-synthetic", len(ids),
                                cases=[(i, sources[i]) for i in ids])
        path = pack_bundle(
            res, Path(args.out), dataset={"version": card["version"], "content_id": card["content_id"]},
            editor={"version": "0.0.0", "description": "EXAMPLE ONLY - synthetic numbers generated by "
                    "leaderboard/synthetic.py to show the bundle format; not a real editor, never a leaderboard entry.",
                    "url": "https://example.org/not-a-real-editor", "plugin": "example-synthetic = mypkg.editor:Example",
                    "package": "mypkg==0.0.0", "hparams": {"layer": 4, "lr": 0.5}},
            submitter={"name": "driftbench maintainers (example)"}, git_commit="unknown",
            notes="Generated by `python -m leaderboard.synthetic`.", datasets={card["version"]: card["content_id"]},
            dataset_case_map=sources)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
