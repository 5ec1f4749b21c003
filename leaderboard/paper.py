"""The paper's reported numbers (Wang et al., ICLR 2025, Tables 6 and 7) from ``paper_reported.csv`` of the data
mirror, verified against the mirror's ``SHA256SUMS`` when it lists the file.

CSV columns: ``source, model, editor, sadr, ES, EM, PS, PM, RES, NS, NM, RS, RM, DNS, DNM, OS, DOS, FL, PPL, AvgS``.
Accuracies and magnitudes are percentages in the file; they are stored here as fractions (value / 100) so they
sort and render with our own scores. FL is printed × 100 in the paper (621.96 = mean n-gram entropy 6.2196), so it
is divided by 100 too and shown × 100 like ours; PPL is a perplexity and is kept as it is. An empty field means
the paper reports no number there (e.g. Avg.S in Table 6). Every row is tagged protocol ``paper`` (the reference
implementation's metric definitions, which our ``paper`` protocol reproduces).

Other papers' tables (``leaderboard/reported/*.csv``, e.g. AlphaEdit's Table 1) use the same columns plus two
optional ones: ``regime`` (the editing regime when it is not one edit at a time, e.g. ``seq2000-batch100``: such
rows get a table of their own and are never ranked with single edits) and ``dataset`` (when it is not paper-v1).
"""
from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

PERCENT_COLUMNS = ("ES", "EM", "PS", "PM", "RES", "NS", "NM", "RS", "RM", "DNS", "DNM", "OS", "DOS", "FL")
RAW_COLUMNS = ("PPL",)
REQUIRED = ("source", "model", "editor", "sadr") + PERCENT_COLUMNS + RAW_COLUMNS + ("AvgS",)


def normalise_name(name: str) -> str:
    """Model names compared across the paper and params.yaml: ``"GPT-J-6B"`` ~ ``"gpt-j-6b"`` ~ ``"gptj6b"``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _verify(path: Path) -> None:
    sums = path.parent / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("./") == path.name:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
            if actual != parts[0]:
                raise ValueError(f"{path}: sha256 {actual} differs from {sums} ({parts[0]}); restore the mirror's copy")
            return


def _number(value: str, path: Path, no: int, column: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{path}:{no}: column {column!r} holds {value!r}, not a number") from None


def read_paper_csv(path: str | Path, verify: bool = True) -> list[dict]:
    """One dict per reported row: ``{"source", "model", "editor", "sadr", "scores": {"paper": {...}}}`` where the
    scores mimic :func:`evaluators.metrics.score_cell` (``{"mean", "ci95": None, "n": None}``; Avg.S a float)."""
    path = Path(path)
    if verify:
        _verify(path)
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(REQUIRED)}")
        for no, rec in enumerate(reader, 2):
            sadr = rec["sadr"].strip().lower()
            if sadr not in ("true", "false"):
                raise ValueError(f"{path}:{no}: column 'sadr' must be True or False, got {rec['sadr']!r}")
            scores: dict = {"protocol": "paper", "n_cases": None}
            for col in PERCENT_COLUMNS:
                v = _number(rec[col], path, no, col)
                scores[col] = {"mean": None if v is None else v / 100.0, "ci95": None, "n": None}
            for col in RAW_COLUMNS:
                v = _number(rec[col], path, no, col)
                scores[col] = {"mean": v, "ci95": None, "n": None}
            avg = _number(rec["AvgS"], path, no, "AvgS")
            scores["AvgS"] = None if avg is None else avg / 100.0
            regime = (rec.get("regime") or "").strip()
            if regime and not re.fullmatch(r"[a-z]+[0-9]+(-[a-z]+[0-9]+)*", regime):
                raise ValueError(f"{path}:{no}: column 'regime' must look like seq2000-batch100, got {regime!r}")
            out.append({"source": rec["source"].strip(), "model": rec["model"].strip(),
                        "editor": rec["editor"].strip(), "sadr": sadr == "true", "scores": {"paper": scores},
                        "regime": regime, "dataset": (rec.get("dataset") or "").strip() or "paper-v1"})
    return out
