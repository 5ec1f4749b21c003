"""Balanced, seeded merge of CounterFact and WikiData_counterfact cases, PIQA attachment, relatedness filtering.

The release (reference-spec §1.1) alternates WikiData_counterfact (even index) and CounterFact (odd index), 839 of
each, with one PIQA validation item per record whose `right` is the gold solution. Its PIQA items look like a
uniform draw *with replacement* (1,090 distinct items over 1,678 records, as expected from 1,838 items; adjacent
records never share one). We do the same, seeded:

1. `balanced_merge`: sort each source's cases by case_id (so the input file order does not matter), draw
   ``n_per_source`` of each with ``random.Random(seed)`` (n = 0 → as many as the smaller source has), and
   interleave wikidata, counterfact, wikidata, … .
2. `apply_judgments`: drop the neighbourhood (CounterFact) and relation (WikiData) prompts the judge called
   "related" to the edit (paper appendix C.1); "unrelated" prompts are kept; an unparseable answer keeps the prompt
   and is counted (policy `keep`) or drops it (policy `drop`) — never guessed.
3. `attach_piqa`: one PIQA validation item per case, uniform with replacement, re-drawn when it equals the
   previous case's item.

Deterministic: the same seed and inputs give the same cases in the same order.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Callable, Iterable

from .schema import Case, DatasetError, PiqaItem, Probe

#: which probe family of which source is judged, and with which of the paper's two prompts (judge.py)
JUDGED_FAMILIES = {"counterfact": ("neighborhood", "neighbor"), "wikidata": ("relation", "relation")}
UNPARSEABLE_POLICIES = ("keep", "drop")


def balanced_merge(cf: list[Case], wd: list[Case], n_per_source: int, seed: int) -> list[Case]:
    """Equal numbers of each source, seeded, interleaved wd/cf (the release's order, §1.1)."""
    if not cf or not wd:
        raise DatasetError(f"balanced merge needs cases of both sources, got {len(cf)} counterfact and {len(wd)} "
                           "wikidata; check the raw files")
    n = n_per_source or min(len(cf), len(wd))
    if n > min(len(cf), len(wd)):
        raise DatasetError(f"merge.n_per_source = {n} but only {len(cf)} counterfact and {len(wd)} wikidata cases "
                           "are available; lower it (0 = as many as the smaller source)")
    rng = random.Random(seed)
    pick_wd = rng.sample(sorted(wd, key=lambda c: c.case_id), n)
    pick_cf = rng.sample(sorted(cf, key=lambda c: c.case_id), n)
    out: list[Case] = []
    for a, b in zip(pick_wd, pick_cf):
        out += [a, b]
    return out


def judged_prompts(cases: Iterable[Case]) -> list[tuple[Case, str, str, Probe]]:
    """(case, family, judge kind, probe) for every probe the relatedness judge must see."""
    out = []
    for c in cases:
        fam, kind = JUDGED_FAMILIES[c.source]
        for p in getattr(c, fam):
            out.append((c, fam, kind, p))
    return out


def apply_judgments(cases: list[Case], label_of: Callable[[Case, str, Probe], str],
                    unparseable: str = "keep") -> tuple[list[Case], dict]:
    """Filter each case's judged family by `label_of(case, kind, probe)` ∈ {related, unrelated, unparseable}.

    Returns the filtered cases and counts per source and label. Empty lists stay empty (they score nothing).
    """
    if unparseable not in UNPARSEABLE_POLICIES:
        raise DatasetError(f"judge.unparseable must be one of {UNPARSEABLE_POLICIES}, got {unparseable!r}")
    stats: dict = {}
    out = []
    for c in cases:
        fam, kind = JUDGED_FAMILIES[c.source]
        s = stats.setdefault(c.source, {"family": fam, "prompts": 0, "related": 0, "unrelated": 0, "unparseable": 0,
                                        "kept": 0, "cases_emptied": 0})
        kept = []
        for p in getattr(c, fam):
            label = label_of(c, kind, p)
            s["prompts"] += 1
            s[label] += 1
            if label == "unrelated" or (label == "unparseable" and unparseable == "keep"):
                kept.append(p)
        s["kept"] += len(kept)
        if getattr(c, fam) and not kept:
            s["cases_emptied"] += 1
        out.append(dataclasses.replace(c, **{fam: tuple(kept)}))
    return out, stats


def load_piqa_valid(jsonl: Path, labels: Path) -> list[PiqaItem]:
    """PIQA validation split → items with right = the labelled gold solution (sol1 if label 0, sol2 if 1)."""
    try:
        lines = [ln for ln in Path(jsonl).read_text(encoding="utf-8").splitlines() if ln.strip()]
        labs = [ln.strip() for ln in Path(labels).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError as exc:
        raise DatasetError(f"PIQA file {exc.filename} does not exist; point the data mirror at a folder with "
                           "piqa/valid.jsonl and piqa/valid-labels.lst") from None
    if len(lines) != len(labs):
        raise DatasetError(f"PIQA: {jsonl} has {len(lines)} items but {labels} has {len(labs)} labels")
    items = []
    for i, (ln, lab) in enumerate(zip(lines, labs)):
        try:
            d = json.loads(ln)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{jsonl}:{i + 1}: not valid JSON ({exc.msg})") from None
        if lab not in ("0", "1") or not all(isinstance(d.get(k), str) and d[k].strip() for k in ("goal", "sol1", "sol2")):
            raise DatasetError(f"{jsonl}:{i + 1}: needs non-empty goal, sol1, sol2 and a label 0/1 (got {lab!r})")
        right, wrong = (d["sol1"], d["sol2"]) if lab == "0" else (d["sol2"], d["sol1"])
        items.append(PiqaItem(d["goal"], right, wrong))
    if len(items) < 2:
        raise DatasetError(f"PIQA: {jsonl} holds {len(items)} items; need at least 2")
    return items


def attach_piqa(cases: list[Case], items: list[PiqaItem], seed: int) -> list[Case]:
    """One item per case: uniform with replacement, never the same as the previous case's (as in the release)."""
    rng = random.Random(seed)
    out, prev = [], None
    for c in cases:
        item = items[rng.randrange(len(items))]
        while item == prev:
            item = items[rng.randrange(len(items))]
        out.append(dataclasses.replace(c, piqa=item))
        prev = item
    return out
