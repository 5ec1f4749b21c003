"""Adapter for the paper's release file `merged_counterfact.json` → canonical `Case` objects.

Format (reference-spec §1.1): a JSON list of 1,678 records. Even indices come from KnowEdit's WikiData_counterfact
and odd indices from CounterFact, 839 of each. The file has no id field. Each record has:

* `requested_rewrite` {prompt, subject, target_new, target_true} (+ relation_id, target_new_id in CounterFact only)
* `rewrite` {prompts, targets}: always [prompt] → [target_new]; checked here but not kept (it is the edit itself)
* probe families as {prompts, targets}: `p-paraphrase`, `p-subject_alias`, `p-reasoning`, `l-neighbor`, `l-relation`
* `generation` {prompts} (CounterFact only, 10 prompts per record, duplicates kept on purpose)
* `o-commonsense` {prompts (a *string*: the PIQA goal), right, wrong}

Mapping to `Case` (data_pipeline/schema.py, reference-spec §2.3): p-paraphrase → paraphrase, p-subject_alias →
subject_alias, p-reasoning → reasoning, l-neighbor → neighborhood, l-relation → relation, generation.prompts →
generation, o-commonsense → piqa. Prompt i is paired with target i, in order; duplicate prompts are kept (p-reasoning
has one prompt per acceptable answer, §1.1) and empty lists stay empty (§8 gotcha 5). Strings are kept verbatim:
some PIQA solutions end with a space in the release, and scoring uses them as written.

The source of a record is read from its content: CounterFact records have `p-paraphrase`, `l-neighbor`,
`generation` or a `relation_id` in `requested_rewrite`; a record with only Wiki families is wikidata; a record with
neither falls back to the index parity of §1.1 (even → wikidata, odd → counterfact).

`case_id` is content-derived and stable: ``{cf|wd}-`` + the first 12 hex digits of the SHA-256 of the canonical JSON
(`basis.io.dumps_line`: sorted keys, ``(',', ':')`` separators, UTF-8) of the whole `requested_rewrite` object.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from basis.io import dumps_line

from .schema import Case, DatasetError

#: release key → Case field, for the {prompts, targets} probe families (reference-spec §1.1, §2.3).
PROBE_FAMILIES: dict[str, str] = {
    "p-paraphrase": "paraphrase",
    "p-subject_alias": "subject_alias",
    "p-reasoning": "reasoning",
    "l-neighbor": "neighborhood",
    "l-relation": "relation",
}
CF_MARKERS = ("p-paraphrase", "l-neighbor", "generation")
WD_MARKERS = ("p-subject_alias", "p-reasoning", "l-relation")
KNOWN_KEYS = frozenset({"requested_rewrite", "rewrite", "generation", "o-commonsense", *PROBE_FAMILIES})
REWRITE_REQUIRED = ("prompt", "subject", "target_new", "target_true")
REWRITE_OPTIONAL = ("relation_id", "target_new_id")  # CounterFact's Wikidata P-id / Q-id
SOURCE_PREFIX = {"counterfact": "cf", "wikidata": "wd"}

FIX_HINT = ("fix the release file, or point the data mirror (env DRIFTBENCH_DATA_MIRROR or params `data.mirror`) "
            "at a good copy of it")


def _err(index: int, path: str, problem: str) -> DatasetError:
    return DatasetError(f"record {index}: field '{path}' {problem}; {FIX_HINT}")


def _text(value: Any, index: int, path: str) -> str:
    if not isinstance(value, str):
        if value is None:
            raise _err(index, path, "is missing (expected a non-empty string)")
        raise _err(index, path, f"must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise _err(index, path, f"must be a non-empty string, got {value!r}")
    return value


def _text_list(value: Any, index: int, path: str) -> list[str]:
    if not isinstance(value, list):
        if value is None:
            raise _err(index, path, "is missing (expected a list of strings)")
        raise _err(index, path, f"must be a list of strings, got {type(value).__name__}")
    return [_text(v, index, f"{path}[{i}]") for i, v in enumerate(value)]


def _object(value: Any, index: int, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        if value is None:
            raise _err(index, path, "is missing (expected a JSON object)")
        raise _err(index, path, f"must be a JSON object, got {type(value).__name__}")
    return value


def detect_source(record: dict[str, Any], index: int) -> str:
    """'counterfact' or 'wikidata' from the record's content; index parity only when content says nothing (§1.1)."""
    rr = record.get("requested_rewrite")
    if any(k in record for k in CF_MARKERS) or (isinstance(rr, dict) and "relation_id" in rr):
        return "counterfact"
    if any(k in record for k in WD_MARKERS):
        return "wikidata"
    return "wikidata" if index % 2 == 0 else "counterfact"


def case_id_for(requested_rewrite: dict[str, Any], source: str) -> str:
    """Stable content-derived id: ``{cf|wd}-sha256(dumps_line(requested_rewrite))[:12]``."""
    digest = hashlib.sha256(dumps_line(requested_rewrite).encode("utf-8")).hexdigest()
    return f"{SOURCE_PREFIX[source]}-{digest[:12]}"


def _pairs(record: dict[str, Any], key: str, index: int) -> list[list[str]]:
    if key not in record:
        return []
    fam = _object(record[key], index, key)
    prompts = _text_list(fam.get("prompts"), index, f"{key}.prompts")
    targets = _text_list(fam.get("targets"), index, f"{key}.targets")
    if len(prompts) != len(targets):
        raise _err(index, f"{key}.targets", f"has {len(targets)} entries but '{key}.prompts' has {len(prompts)}; "
                   "each prompt needs exactly one target")
    return [[p, t] for p, t in zip(prompts, targets)]


def convert_record(record: Any, index: int) -> Case:
    """Map one release record (reference-spec §1.1) to a validated `Case`; errors name the index and field path."""
    if not isinstance(record, dict):
        raise DatasetError(f"record {index}: expected a JSON object, got {type(record).__name__}; {FIX_HINT}")
    unknown = sorted(set(record) - KNOWN_KEYS)
    if unknown:
        raise _err(index, unknown[0], f"is not a release field (known: {', '.join(sorted(KNOWN_KEYS))})")

    rr = _object(record.get("requested_rewrite"), index, "requested_rewrite")
    unknown = sorted(set(rr) - set(REWRITE_REQUIRED) - set(REWRITE_OPTIONAL))
    if unknown:
        raise _err(index, f"requested_rewrite.{unknown[0]}", "is not a requested_rewrite field")
    fields = {k: _text(rr.get(k), index, f"requested_rewrite.{k}") for k in REWRITE_REQUIRED}
    if fields["subject"] not in fields["prompt"]:
        raise _err(index, "requested_rewrite.subject",
                   f"{fields['subject']!r} does not occur in 'requested_rewrite.prompt' {fields['prompt']!r}")
    if fields["target_new"] == fields["target_true"]:
        raise _err(index, "requested_rewrite.target_new",
                   f"equals 'requested_rewrite.target_true' ({fields['target_new']!r}); an edit must change the answer")
    source = detect_source(record, index)
    meta: dict[str, Any] = {"release_index": index}
    for k in REWRITE_OPTIONAL:
        if k in rr:
            meta[k] = _text(rr[k], index, f"requested_rewrite.{k}")

    if "rewrite" in record:  # always [prompt] → [target_new] (§1.1); anything else means a corrupted record
        rw = _pairs(record, "rewrite", index)
        if rw != [[fields["prompt"], fields["target_new"]]]:
            raise _err(index, "rewrite", f"must be exactly [requested_rewrite.prompt] → [requested_rewrite.target_new], "
                       f"got {rw!r}")

    probes = {field: _pairs(record, key, index) for key, field in PROBE_FAMILIES.items()}

    generation: list[str] = []
    if "generation" in record:
        generation = _text_list(_object(record["generation"], index, "generation").get("prompts"), index,
                                "generation.prompts")

    oc = _object(record.get("o-commonsense"), index, "o-commonsense")
    piqa = {"goal": _text(oc.get("prompts"), index, "o-commonsense.prompts"),
            "right": _text(oc.get("right"), index, "o-commonsense.right"),
            "wrong": _text(oc.get("wrong"), index, "o-commonsense.wrong")}

    d = {"case_id": case_id_for(rr, source), "source": source, **fields, **probes,
         "generation": generation, "piqa": piqa, "meta": meta}
    return Case.from_json(d, where=f"record {index}")  # second line of defence: the schema's own validation


def convert_release(records: Any) -> list[Case]:
    """Convert the whole release list, in release order; ids must be unique (the error names both indices)."""
    if not isinstance(records, list):
        raise DatasetError(f"release: expected a JSON list of records at the top level, got {type(records).__name__}; "
                           f"{FIX_HINT}")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        case = convert_record(record, index)
        if case.case_id in seen:
            raise DatasetError(f"record {index}: case_id {case.case_id} duplicates record {seen[case.case_id]} "
                               f"(identical requested_rewrite); {FIX_HINT}")
        seen[case.case_id] = index
        cases.append(case)
    return cases


def read_release(path: str | Path) -> list[Case]:
    """Parse `path` as the release JSON and convert it; a missing or unparsable file raises DatasetError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"release file {path} does not exist; {FIX_HINT}") from None
    try:
        records = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"release file {path} is not valid UTF-8 JSON ({exc}); {FIX_HINT}") from None
    return convert_release(records)
