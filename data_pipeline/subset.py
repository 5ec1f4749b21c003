"""Reproducible, source-stratified subsets of the cases (for smoke and CPU runs; the full protocol uses all 1,678,
reference-spec §8 gotcha 15).

Rules:
* Stratified over `source`: ceil(size/2) CounterFact and floor(size/2) WikiData cases (an odd extra goes to CF).
* Informative cases first: within each source, cases whose locality probe list is non-empty come first (CF:
  `neighborhood`, the NS/DNS probes; Wiki: `relation`, the RS probes; reference-spec §1.1 lists 78 CF and 379 Wiki
  records with an empty one), then the rest.
* Reproducible and prefix-stable: each stratum (source × informative/rest) is sorted by case_id and shuffled once with
  ``random.Random(seed)`` in a fixed order, independent of `size`; a subset takes the first k of each source's order.
  So subset(n) ⊆ subset(N) for n ≤ N, with the same per-source order.
* Returned ids interleave the sources: cf, wd, cf, wd, … (the tail is cf when size is odd).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterable

from basis.io import atomic_write_json

from .schema import Case, DatasetError

#: the probe family that makes a case informative for locality, per source
INFORMATIVE = {"counterfact": "neighborhood", "wikidata": "relation"}
ORDER = ("counterfact", "wikidata")


class SubsetIds(list):
    """A plain list of case ids that also remembers the `seed` and requested `size` (read by `write_subset`)."""

    seed: int | None = None
    size: int | None = None


def source_orders(cases: list[Case], seed: int) -> dict[str, list[str]]:
    """The full, size-independent sampling order of each source's case ids for `seed`."""
    seen: set[str] = set()
    for c in cases:
        if c.case_id in seen:
            raise DatasetError(f"case_id {c.case_id} occurs twice in the case list; rebuild the dataset")
        seen.add(c.case_id)
        if c.source not in INFORMATIVE:
            raise DatasetError(f"case {c.case_id}: unknown source {c.source!r} (expected one of {ORDER})")
    rng = random.Random(seed)
    orders: dict[str, list[str]] = {}
    for src in ORDER:
        pool = sorted((c for c in cases if c.source == src), key=lambda c: c.case_id)
        fam = INFORMATIVE[src]
        preferred = [c.case_id for c in pool if getattr(c, fam)]
        rest = [c.case_id for c in pool if not getattr(c, fam)]
        rng.shuffle(preferred)
        rng.shuffle(rest)
        orders[src] = preferred + rest
    return orders


def stratified_subset(cases: list[Case], size: int, seed: int) -> list[str]:
    """`size` case ids, balanced over sources (odd extra → counterfact), reproducible and prefix-stable for `seed`."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise DatasetError(f"subset size must be a non-negative integer, got {size!r}")
    orders = source_orders(cases, seed)
    want = {"counterfact": (size + 1) // 2, "wikidata": size // 2}
    short = [f"{want[s]} {s} (have {len(orders[s])})" for s in ORDER if want[s] > len(orders[s])]
    if short:
        largest = min(2 * len(orders["counterfact"]), 2 * len(orders["wikidata"]) + 1)
        raise DatasetError(f"subset size {size} needs {' and '.join(short)} cases; choose a size of at most "
                           f"{largest} or use the full dataset")
    picked = {s: orders[s][:want[s]] for s in ORDER}
    out = SubsetIds()
    for i in range(want["counterfact"]):
        out.append(picked["counterfact"][i])
        if i < want["wikidata"]:
            out.append(picked["wikidata"][i])
    out.seed, out.size = seed, size
    return out


def write_subset(ids: list[str], path: str | os.PathLike, seed: int | None = None) -> None:
    """Write ``{"size", "seed", "case_ids"}`` atomically; `seed` defaults to the one `stratified_subset` recorded."""
    ids = list(ids) if not isinstance(ids, SubsetIds) else ids
    if seed is None:
        seed = getattr(ids, "seed", None)
    if not all(isinstance(i, str) and i for i in ids):
        raise DatasetError(f"subset ids must be non-empty strings; not writing {path}")
    if len(set(ids)) != len(ids):
        raise DatasetError(f"subset ids contain duplicates; not writing {path}")
    atomic_write_json(Path(path), {"size": len(ids), "seed": seed, "case_ids": list(ids)})


def held_out(cases: list[Case], size: int, seed: int, exclude: Iterable[str]) -> list[str]:
    """`size` case ids disjoint from ``exclude`` (a profile's subset), balanced over sources like
    `stratified_subset`, in a seeded order: the cases a hyper-parameter sweep may look at without touching the
    reported ones."""
    skip = set(exclude)
    orders = {s: [i for i in o if i not in skip] for s, o in source_orders(cases, seed).items()}
    want = {"counterfact": (size + 1) // 2, "wikidata": size // 2}
    short = [s for s in ORDER if want[s] > len(orders[s])]
    if short:
        raise DatasetError(f"held-out size {size}: not enough {short[0]} cases outside the excluded subset")
    out = []
    for i in range(want["counterfact"]):
        out.append(orders["counterfact"][i])
        if i < want["wikidata"]:
            out.append(orders["wikidata"][i])
    return out
