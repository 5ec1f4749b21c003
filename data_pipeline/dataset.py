"""The dataset build stage: verified release file → `cases.jsonl`, `piqa.jsonl`, `card.json`, `card.md`.

* The input is the paper's release `merged_counterfact.json` (reference-spec §1.1) read from a local data mirror
  (`resolve_mirror`); its SHA-256 is checked before anything is parsed.
* Every record is converted and validated (`data_pipeline.release`) before a single byte is written; the four
  outputs are staged in a temporary folder inside `out_dir` and then renamed into place one by one (`card.json`
  last, so a complete card means a complete build). Outputs are deterministic: building twice gives identical bytes.
* The content version id is ``sha256(cases.jsonl bytes)[:16]`` (`card["content_id"]`).
* `piqa.jsonl` feeds the OS/DOS probes (reference-spec §2.3): one line per case with the PIQA goal, gold solution,
  distractor and the case's distracting prefix ``edit_text`` = "{prompt} {target_new}." (§8 gotcha 4).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from basis.io import JsonInputError, dumps_line, loads_strict, sha256_file

from .release import FIX_HINT, read_release
from .schema import SOURCES, TARGETED_FAMILIES, Case, DatasetError

MIRROR_ENV = "DRIFTBENCH_DATA_MIRROR"
CASES_FILE, PIQA_FILE, CARD_JSON, CARD_MD = "cases.jsonl", "piqa.jsonl", "card.json", "card.md"
FAMILIES = (*TARGETED_FAMILIES, "generation")
PAPER_RECORDS = 1683  # what the paper states; the release holds 1,678 (reference-spec §1.1, §7.1)

LICENCES = (
    {"what": "paper release merged_counterfact.json (PinzhengWang322/Reveal_Attention_Drift @ 96259ac)",
     "licence": "MIT"},
    {"what": "CounterFact records (ROME, kmeng01/rome)", "licence": "MIT"},
    {"what": "WikiData_counterfact records (KnowEdit, zjunlp/KnowEdit)", "licence": "see upstream KnowEdit terms"},
    {"what": "PIQA validation items (o-commonsense)", "licence": "AFL-3.0"},
)


def resolve_mirror(params_mirror: str) -> Path:
    """The data mirror folder: env `DRIFTBENCH_DATA_MIRROR` if set (non-empty), else params `data.mirror`.

    A relative path is taken relative to the current working directory. A missing folder raises DatasetError.
    """
    env = os.environ.get(MIRROR_ENV, "").strip()
    raw, origin = (env, f"env {MIRROR_ENV}") if env else (str(params_mirror or "").strip(), "params `data.mirror`")
    if not raw:
        raise DatasetError(f"no data mirror configured; set {MIRROR_ENV} or params `data.mirror` to the folder "
                           "holding the mirrored data (e.g. ../shared/data)")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    if not path.is_dir():
        raise DatasetError(f"data mirror folder {path} (from {origin}: {raw!r}) does not exist or is not a folder; "
                           f"set {MIRROR_ENV} or params `data.mirror` to the folder holding the mirrored data")
    return path


def _family_counts(cases: list[Case]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for fam in FAMILIES:
        lists = [getattr(c, fam) for c in cases]
        out[fam] = {"cases_nonempty": sum(1 for x in lists if x), "prompts": sum(len(x) for x in lists)}
    items = [(c.piqa.goal, c.piqa.right, c.piqa.wrong) for c in cases if c.piqa is not None]
    out["piqa"] = {"cases_nonempty": len(items), "prompts": len(items), "distinct_items": len(set(items)),
                   "distinct_goals": len({g for g, _, _ in items})}
    return out


def make_card(cases: list[Case], *, version: str, content_id: str, release_relpath: str, release_sha256: str,
              release_bytes: int, files: dict[str, str]) -> dict[str, Any]:
    """The machine-readable dataset card (deterministic: no timestamps, no absolute paths)."""
    by_source = {}
    for src in SOURCES:
        sub = [c for c in cases if c.source == src]
        by_source[src] = {"cases": len(sub), "families": _family_counts(sub)}
    items = [c.piqa for c in cases if c.piqa is not None]
    return {
        "name": "driftbench",
        "version": version,
        "content_id": content_id,
        "source": {"file": release_relpath, "sha256": release_sha256, "bytes": release_bytes,
                   "records": len(cases), "format": "reference-spec §1.1"},
        "n_cases": len(cases),
        "by_source": by_source,
        "totals": _family_counts(cases),
        "files": files,
        "licences": list(LICENCES),
        "notes": [
            f"The release holds {len(cases)} records; the paper states {PAPER_RECORDS} (reference-spec §7.1).",
            "Empty probe lists are kept empty and contribute nothing to any metric (reference-spec §8 gotcha 5).",
            "Duplicate prompts are kept (p-reasoning has one prompt per acceptable answer; generation repeats prompts).",
            f"{sum(1 for p in items if p.right != p.right.strip() or p.wrong != p.wrong.strip())} cases have a PIQA "
            "solution with leading/trailing whitespace (inherited from PIQA); kept verbatim.",
        ],
    }


def render_card_md(card: dict[str, Any]) -> str:
    """The human dataset card, rendered from the machine-readable one."""
    src = card["source"]
    lines = [
        f"# driftbench dataset `{card['version']}`",
        "",
        f"- content version id: `{card['content_id']}` (sha256 of `{CASES_FILE}`, first 16 hex digits)",
        f"- source file: `{src['file']}` ({src['bytes']:,} bytes), sha256 `{src['sha256']}`",
        f"- cases: {card['n_cases']:,} ("
        + ", ".join(f"{s}: {card['by_source'][s]['cases']:,}" for s in SOURCES) + ")",
        "",
        "The paper's released, GPT-4-filtered benchmark (reference-spec §1.1): WikiData_counterfact (KnowEdit) and "
        "CounterFact records alternate, one PIQA validation item attached to each.",
        "",
        "## Probes per family",
        "",
        "Cases with a non-empty list / number of prompts.",
        "",
        "| family | " + " | ".join(SOURCES) + " | total |",
        "|---|" + "---|" * (len(SOURCES) + 1),
    ]
    for fam in (*FAMILIES, "piqa"):
        cells = [card["by_source"][s]["families"][fam] for s in SOURCES] + [card["totals"][fam]]
        lines.append(f"| {fam} | " + " | ".join(f"{c['cases_nonempty']:,} / {c['prompts']:,}" for c in cells) + " |")
    piqa = card["totals"]["piqa"]
    lines += [
        "",
        f"PIQA: {piqa['distinct_items']:,} distinct (goal, right, wrong) items, {piqa['distinct_goals']:,} distinct "
        "goals; items are reused across cases.",
        "",
        "## Files",
        "",
        *(f"- `{name}`: sha256 `{digest}`" for name, digest in sorted(card["files"].items())),
        "",
        "## Licences",
        "",
        *(f"- {x['what']}: {x['licence']}" for x in card["licences"]),
        "",
        "## Notes",
        "",
        *(f"- {n}" for n in card["notes"]),
        "",
    ]
    return "\n".join(lines)


def _write_all(out_dir: Path, payloads: dict[str, bytes]) -> None:
    """Stage every file in a temp folder inside `out_dir`, fsync, then rename each into place (dict order)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    try:
        for name, data in payloads.items():
            with open(stage / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for name in payloads:
            os.replace(stage / name, out_dir / name)
        try:
            dfd = os.open(out_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def build_dataset(mirror: Path, release_relpath: str, expected_sha256: str, version: str, out_dir: Path) -> dict:
    """Build the dataset artifact from `mirror / release_relpath`; returns the card dict.

    Order: the file must exist and match `expected_sha256` (reference-spec §1.1; the mirror README's SHA256SUMS),
    then every record is converted and validated, and only then are `cases.jsonl`, `piqa.jsonl`, `card.md` and
    `card.json` written into `out_dir`. Any failure raises DatasetError and writes nothing.
    """
    path = Path(mirror) / release_relpath
    if not path.is_file():
        raise DatasetError(f"release file {path} does not exist (mirror {mirror}, relative path {release_relpath!r}); "
                           f"{FIX_HINT}")
    expected = (expected_sha256 or "").strip().lower()
    actual = sha256_file(path)
    if actual != expected:
        raise DatasetError(f"sha256 mismatch for release file {path}: expected {expected or '(none given)'}, "
                           f"got {actual}; the file is corrupt or a different version — {FIX_HINT}, or update the "
                           "pinned sha256 in params only if you mean to change the dataset version")
    cases = read_release(path)
    if not cases:
        raise DatasetError(f"release file {path} holds no records; {FIX_HINT}")

    cases_bytes = "".join(dumps_line(c.to_json()) + "\n" for c in cases).encode("utf-8")
    piqa_rows = []
    for c in cases:
        if c.piqa is None:  # the release adapter requires o-commonsense; guard anyway
            raise DatasetError(f"case {c.case_id} (record {c.meta.get('release_index')}): no PIQA item; {FIX_HINT}")
        piqa_rows.append({"case_id": c.case_id, "goal": c.piqa.goal, "right": c.piqa.right, "wrong": c.piqa.wrong,
                          "edit_text": c.edit_text})
    piqa_bytes = "".join(dumps_line(r) + "\n" for r in piqa_rows).encode("utf-8")
    content_id = hashlib.sha256(cases_bytes).hexdigest()[:16]
    files = {CASES_FILE: hashlib.sha256(cases_bytes).hexdigest(), PIQA_FILE: hashlib.sha256(piqa_bytes).hexdigest()}
    card = make_card(cases, version=version, content_id=content_id, release_relpath=release_relpath,
                     release_sha256=actual, release_bytes=path.stat().st_size, files=files)
    card_json = (json.dumps(card, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    _write_all(Path(out_dir), {CASES_FILE: cases_bytes, PIQA_FILE: piqa_bytes,
                               CARD_MD: render_card_md(card).encode("utf-8"), CARD_JSON: card_json})
    return card


def load_cases(path: str | os.PathLike) -> list[Case]:
    """Read a `cases.jsonl` written by `build_dataset`; errors name `path:line` and the field."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; run the dataset build stage first")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:  # UTF-8, no duplicate keys, no NaN/Infinity
            d = loads_strict(line, f"{path}:{lineno}")
        except JsonInputError as exc:
            raise DatasetError(f"{exc}; rebuild the dataset") from None
        case = Case.from_json(d, where=f"{path}:{lineno}")
        if case.case_id in seen:
            raise DatasetError(f"{path}:{lineno}: case_id {case.case_id} already on line {seen[case.case_id]}; "
                               "rebuild the dataset")
        seen[case.case_id] = lineno
        cases.append(case)
    return cases
