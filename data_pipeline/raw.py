"""Raw sources → canonical `Case`: ROME's CounterFact, KnowEdit's WikiData_counterfact, and their download.

Sources (../shared/data/README.md; reference-spec §1.1 for how the paper's release was derived from them):

* **CounterFact** `counterfact.json` (ROME; 21,919 records; 45,108,470 bytes, sha256 pinned below). Each record:
  ``{case_id, pararel_idx, requested_rewrite: {prompt (with "{}" for the subject), relation_id, subject,
  target_new: {str, id}, target_true: {str, id}}, paraphrase_prompts [2], neighborhood_prompts [10],
  attribute_prompts [10], generation_prompts [10]}``.
* **KnowEdit WikiData_counterfact** `test_cf.json` (885) / `train_cf.json` (1,455). Each record:
  ``{subject, prompt (filled), target_new, ground_truth, portability: {Reasoning, Subject_Aliasing,
  Logical_Generalization}, locality: {Relation_Specificity, Forgetfulness}}``; every portability/locality entry is a
  list of ``{prompt, ground_truth}`` where ground_truth is a string (one answer), a list of strings (one answer and
  its aliases) or a list of alias lists (several answers, each with its aliases); only the first alias of an answer
  is carried, as in the release.

Mapping to `Case` (the same shape the release has, so raw-derived case ids equal paper-v1's):

| Case field      | CounterFact                                   | WikiData_counterfact                                  |
|-----------------|-----------------------------------------------|-------------------------------------------------------|
| prompt          | requested_rewrite.prompt with {} → subject    | prompt                                                |
| target_true/new | target_true.str / target_new.str              | ground_truth (first answer) / target_new              |
| paraphrase      | paraphrase_prompts → target_new               | —                                                     |
| neighborhood    | neighborhood_prompts → target_true (judged)   | —                                                     |
| generation      | generation_prompts (duplicates kept)          | —                                                     |
| subject_alias   | —                                             | portability.Subject_Aliasing, first answer per prompt |
| reasoning       | —                                             | portability.Reasoning, one probe per answer (1st alias)|
| relation        | —                                             | locality.Relation_Specificity, first answer (judged)  |
| meta            | relation_id, target_new_id, raw index, id     | raw file + index                                      |

Not carried (the release does not carry them either): CounterFact `attribute_prompts` and `target_true.id`;
KnowEdit `Logical_Generalization` and `Forgetfulness` (counted in the dataset card as dropped).

`case_id` = ``{cf|wd}-sha256(canonical requested_rewrite)[:12]`` (`release.case_id_for`), where requested_rewrite
is built exactly as the release writes it: {prompt, subject, target_new, target_true} plus relation_id and
target_new_id for CounterFact.

Download: `fetch` looks for the file in the data mirror (``<mirror>/<relpath>``; env ``DRIFTBENCH_DATA_MIRROR``),
then in the local download folder, and only then downloads the URL (stdlib urllib, streamed into a temp file, sha256
and size checked, then renamed). Offline (``DRIFTBENCH_OFFLINE=1`` or ``offline=True``) a missing file is an error
naming the file, its URL and the mirror variable.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .release import case_id_for
from .schema import Case, DatasetError

OFFLINE_ENV = "DRIFTBENCH_OFFLINE"
MIRROR_ENV = "DRIFTBENCH_DATA_MIRROR"  # same variable as data_pipeline.dataset.MIRROR_ENV


@dataclass(frozen=True)
class RawSource:
    """One raw file: where it lives in a mirror, where it is downloaded from, and what it must hash to."""
    name: str
    relpath: str  # path inside the data mirror and inside the download folder
    url: str
    size: int | None = None
    sha256: str | None = None  # None: not pinned upstream; the card records what was read
    licence: str = ""
    kind: str = ""  # counterfact | knowedit

    def with_overrides(self, **kw: Any) -> "RawSource":
        d = {**self.__dict__, **{k: v for k, v in kw.items() if v is not None}}
        return RawSource(**d)


KNOWEDIT_BASE = "https://huggingface.co/datasets/zjunlp/KnowEdit/resolve/main/benchmark/wiki_counterfact"
RAW_SOURCES: dict[str, RawSource] = {
    "counterfact": RawSource(
        "counterfact", "raw/rome/counterfact.json", "https://rome.baulab.info/data/dsets/counterfact.json",
        size=45_108_470, sha256="d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f",
        licence="MIT (ROME, kmeng01/rome)", kind="counterfact"),
    "knowedit_test_cf": RawSource(
        "knowedit_test_cf", "raw/knowedit/wiki_counterfact/test_cf.json", f"{KNOWEDIT_BASE}/test_cf.json",
        licence="see upstream KnowEdit terms (zjunlp/KnowEdit)", kind="knowedit"),
    "knowedit_train_cf": RawSource(
        "knowedit_train_cf", "raw/knowedit/wiki_counterfact/train_cf.json", f"{KNOWEDIT_BASE}/train_cf.json",
        licence="see upstream KnowEdit terms (zjunlp/KnowEdit)", kind="knowedit"),
}


# --------------------------------------------------------------------------------------------- fetching

def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def verify_file(path: Path, src: RawSource) -> str:
    """Check size and sha256 (when pinned); returns the sha256. A mismatch names the file, both hashes and the URL."""
    size = path.stat().st_size
    if src.size is not None and size != src.size:
        raise DatasetError(f"raw file {path} ({src.name}) has {size:,} bytes, expected {src.size:,}; it is truncated "
                           f"or a different version — delete it and fetch it again from {src.url}")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if src.sha256 and digest != src.sha256.lower():
        raise DatasetError(f"sha256 mismatch for raw file {path} ({src.name}): expected {src.sha256}, got {digest}; "
                           f"the file is corrupt or a different version — replace it with the file from {src.url}")
    return digest


def download(url: str, dest: Path, src: RawSource, timeout: float = 60.0,
             progress: Callable[[int, int | None], None] | None = None) -> str:
    """Stream `url` into a temp file beside `dest`, verify it, then rename; nothing partial is left behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "driftbench-data/1"})
        with urllib.request.urlopen(req, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            done = 0
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                out.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        digest = verify_file(Path(tmp), src)
        os.replace(tmp, dest)
        return digest
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DatasetError(f"could not download {src.name} from {url} ({exc}); put a copy at <mirror>/{src.relpath} "
                           f"and set {MIRROR_ENV}, or retry when the network is reachable") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(src: RawSource, mirror: Path | None, download_dir: Path, *, offline: bool | None = None,
          progress: Callable[[int, int | None], None] | None = None, materialize: bool = False) -> tuple[Path, str]:
    """Locate (or download) one raw file and verify it; returns (path, sha256).

    Order: ``<mirror>/<relpath>`` → ``<download_dir>/<relpath>`` (an earlier download) → the URL. Offline, a file in
    neither place raises DatasetError naming the file, its URL and the mirror variable. `materialize`: a mirror copy
    is also copied (verified, atomically) into the download folder, which a DVC stage can then track.
    """
    if materialize and mirror is not None and (Path(mirror) / src.relpath).is_file():
        from basis.io import atomic_write_bytes

        path, digest = Path(mirror) / src.relpath, verify_file(Path(mirror) / src.relpath, src)
        local = Path(download_dir) / src.relpath
        if not (local.is_file() and local.stat().st_size == path.stat().st_size and verify_file(local, src) == digest):
            atomic_write_bytes(local, path.read_bytes())
        return local, digest
    candidates = []
    if mirror is not None:
        candidates.append(Path(mirror) / src.relpath)
    local = Path(download_dir) / src.relpath
    candidates.append(local)
    for path in candidates:
        if path.is_file():
            return path, verify_file(path, src)
    if _offline(offline):
        where = " or ".join(str(p) for p in candidates)
        raise DatasetError(f"raw file {src.relpath} ({src.name}) is not available offline: looked in {where}. "
                           f"Download it from {src.url} into <mirror>/{src.relpath} and set {MIRROR_ENV} to the "
                           f"mirror folder (or unset {OFFLINE_ENV} to download it)")
    return local, download(src.url, local, src, progress=progress)


def load_json_file(path: Path, name: str) -> Any:
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"raw file {path} ({name}) does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"raw file {path} ({name}) is not valid UTF-8 JSON ({exc}); fetch it again") from None


# --------------------------------------------------------------------------------------------- adapters

class _Where:
    """Error context: '<file> record <i> (id …)' + field path."""

    def __init__(self, file: str, index: int, rid: Any = None):
        self.prefix = f"{file} record {index}" + (f" (case_id {rid})" if rid is not None else "")

    def err(self, path: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.prefix}: field '{path}' {problem}; fix or re-download the raw file")

    def text(self, v: Any, path: str) -> str:
        if v is None:
            raise self.err(path, "is missing (expected a non-empty string)")
        if not isinstance(v, str):
            raise self.err(path, f"must be a string, got {type(v).__name__} {v!r}")
        if not v.strip():
            raise self.err(path, f"must be a non-empty string, got {v!r}")
        return v

    def obj(self, v: Any, path: str) -> dict:
        if not isinstance(v, dict):
            raise self.err(path, "is missing (expected a JSON object)" if v is None
                           else f"must be a JSON object, got {type(v).__name__}")
        return v

    def texts(self, v: Any, path: str) -> list[str]:
        if not isinstance(v, list):
            raise self.err(path, "is missing (expected a list of strings)" if v is None
                           else f"must be a list of strings, got {type(v).__name__}")
        return [self.text(x, f"{path}[{i}]") for i, x in enumerate(v)]


def _check_edit(w: _Where, subject: str, prompt: str, target_new: str, target_true: str, field: str) -> None:
    if subject not in prompt:
        raise w.err(f"{field}.prompt", f"{prompt!r} does not contain the subject {subject!r}")
    if target_new == target_true:
        raise w.err(f"{field}.target_new", f"equals target_true ({target_new!r}); an edit must change the answer")


def convert_counterfact_record(rec: Any, index: int, file: str = "counterfact.json") -> Case:
    """One ROME CounterFact record → `Case` (source counterfact; neighbourhood prompts not yet judged)."""
    if not isinstance(rec, dict):
        raise DatasetError(f"{file} record {index}: expected a JSON object, got {type(rec).__name__}")
    w = _Where(file, index, rec.get("case_id"))
    rr = w.obj(rec.get("requested_rewrite"), "requested_rewrite")
    template = w.text(rr.get("prompt"), "requested_rewrite.prompt")
    subject = w.text(rr.get("subject"), "requested_rewrite.subject")
    if template.count("{}") != 1:
        raise w.err("requested_rewrite.prompt", f"must contain exactly one '{{}}' placeholder for the subject, "
                    f"got {template!r}")
    tn = w.obj(rr.get("target_new"), "requested_rewrite.target_new")
    tt = w.obj(rr.get("target_true"), "requested_rewrite.target_true")
    target_new = w.text(tn.get("str"), "requested_rewrite.target_new.str")
    target_true = w.text(tt.get("str"), "requested_rewrite.target_true.str")
    relation_id = w.text(rr.get("relation_id"), "requested_rewrite.relation_id")
    target_new_id = w.text(tn.get("id"), "requested_rewrite.target_new.id")
    prompt = template.replace("{}", subject)
    _check_edit(w, subject, prompt, target_new, target_true, "requested_rewrite")
    release_rr = {"prompt": prompt, "subject": subject, "target_new": target_new, "target_true": target_true,
                  "relation_id": relation_id, "target_new_id": target_new_id}
    paraphrase = w.texts(rec.get("paraphrase_prompts"), "paraphrase_prompts")
    neighborhood = w.texts(rec.get("neighborhood_prompts"), "neighborhood_prompts")
    generation = w.texts(rec.get("generation_prompts"), "generation_prompts")
    d = {"case_id": case_id_for(release_rr, "counterfact"), "source": "counterfact", "subject": subject,
         "prompt": prompt, "target_true": target_true, "target_new": target_new,
         "paraphrase": [[p, target_new] for p in paraphrase],
         "neighborhood": [[p, target_true] for p in neighborhood],
         "generation": generation,
         "meta": {"raw_file": file, "raw_index": index, "raw_case_id": rec.get("case_id"),
                  "relation_id": relation_id, "target_new_id": target_new_id}}
    return Case.from_json(d, where=w.prefix)


def _answer_groups(w: _Where, gt: Any, path: str) -> list[list[str]]:
    """KnowEdit ground_truth → answer groups, each a list of aliases with the preferred name first.

    The shapes in KnowEdit's files (EasyEdit examples/KnowEdit.md): a string (one answer), a list of strings (one
    answer and its aliases), or a list of alias lists (several answers, e.g. ``[["Mongolian"], ["Tuvan"]]``, each
    with its aliases, e.g. ``[["Syrian pound", "SYP", "LS", "Syrian lira"]]``).
    """
    if isinstance(gt, str):
        return [[w.text(gt, path)]]
    if not isinstance(gt, list) or not gt:
        raise w.err(path, f"must be a string or a non-empty list of (lists of) strings, got {gt!r}")
    if all(isinstance(x, list) for x in gt):
        groups = [w.texts(x, f"{path}[{i}]") for i, x in enumerate(gt)]
        for i, g in enumerate(groups):
            if not g:
                raise w.err(f"{path}[{i}]", "is an empty alias list")
        return groups
    if any(isinstance(x, list) for x in gt):
        raise w.err(path, f"mixes strings and alias lists: {gt!r}")
    return [w.texts(gt, path)]


def _answers(w: _Where, gt: Any, path: str) -> list[str]:
    """One answer per group: its preferred name (the first alias); aliases are not carried (the release has none)."""
    return [g[0] for g in _answer_groups(w, gt, path)]


#: KnowEdit family → one probe per answer (True) or one per prompt with its first answer (False).
#: Inferred from the release (reference-spec §1.1): p-reasoning has 534 duplicate prompts whose targets are distinct
#: answers (e.g. "Mongolian", "Tuvan"), never aliases of one answer ("Syrian pound" appears, "SYP" does not);
#: p-subject_alias and l-relation have no duplicate prompts.
PER_ANSWER = {"Reasoning": True, "Subject_Aliasing": False, "Relation_Specificity": False,
              "Logical_Generalization": True, "Forgetfulness": False}


def _knowedit_probes(w: _Where, block: dict, key: str, path: str) -> list[list[str]]:
    """A portability/locality family → [prompt, answer] pairs (per answer or first answer: `PER_ANSWER`)."""
    items = block.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        raise w.err(f"{path}.{key}", f"must be a list of {{prompt, ground_truth}} objects, got {type(items).__name__}")
    pairs = []
    for i, it in enumerate(items):
        it = w.obj(it, f"{path}.{key}[{i}]")
        prompt = w.text(it.get("prompt"), f"{path}.{key}[{i}].prompt")
        answers = _answers(w, it.get("ground_truth"), f"{path}.{key}[{i}].ground_truth")
        pairs += [[prompt, a] for a in (answers if PER_ANSWER[key] else answers[:1])]
    return pairs


KNOWEDIT_DROPPED = (("portability", "Logical_Generalization"), ("locality", "Forgetfulness"))


def convert_knowedit_record(rec: Any, index: int, file: str = "test_cf.json") -> Case:
    """One KnowEdit WikiData_counterfact record → `Case` (source wikidata; relation prompts not yet judged)."""
    if not isinstance(rec, dict):
        raise DatasetError(f"{file} record {index}: expected a JSON object, got {type(rec).__name__}")
    w = _Where(file, index)
    subject = w.text(rec.get("subject"), "subject")
    prompt = w.text(rec.get("prompt"), "prompt")
    target_new = w.text(rec.get("target_new"), "target_new")
    target_true = _answers(w, rec.get("ground_truth"), "ground_truth")[0]
    _check_edit(w, subject, prompt, target_new, target_true, "")
    port = rec.get("portability") or {}
    loc = rec.get("locality") or {}
    port, loc = w.obj(port, "portability"), w.obj(loc, "locality")
    dropped = {}
    for block_name, key in KNOWEDIT_DROPPED:
        block = port if block_name == "portability" else loc
        n = len(_knowedit_probes(w, block, key, block_name))
        if n:
            dropped[f"{block_name}.{key}"] = n
    release_rr = {"prompt": prompt, "subject": subject, "target_new": target_new, "target_true": target_true}
    d = {"case_id": case_id_for(release_rr, "wikidata"), "source": "wikidata", "subject": subject, "prompt": prompt,
         "target_true": target_true, "target_new": target_new,
         "subject_alias": _knowedit_probes(w, port, "Subject_Aliasing", "portability"),
         "reasoning": _knowedit_probes(w, port, "Reasoning", "portability"),
         "relation": _knowedit_probes(w, loc, "Relation_Specificity", "locality"),
         "meta": {"raw_file": file, "raw_index": index, **({"dropped_probes": dropped} if dropped else {})}}
    return Case.from_json(d, where=w.prefix)


def _convert_all(records: Any, file: str, fn: Callable[[Any, int, str], Case]) -> list[Case]:
    if not isinstance(records, list):
        raise DatasetError(f"{file}: expected a JSON list of records at the top level, got {type(records).__name__}")
    out, seen = [], {}
    for i, rec in enumerate(records):
        c = fn(rec, i, file)
        if c.case_id in seen:  # the same edit twice (KnowEdit test/train overlap, or a duplicated record): keep first
            continue
        seen[c.case_id] = i
        out.append(c)
    return out


def convert_counterfact(records: Any, file: str = "counterfact.json") -> list[Case]:
    """All CounterFact records, file order; an exact duplicate edit (same requested_rewrite) is kept once."""
    return _convert_all(records, file, convert_counterfact_record)


def convert_knowedit(records: Any, file: str = "test_cf.json") -> list[Case]:
    """All WikiData_counterfact records of one file, file order; duplicate edits kept once."""
    return _convert_all(records, file, convert_knowedit_record)


def load_source(src: RawSource, path: Path) -> list[Case]:
    records = load_json_file(path, src.name)
    name = Path(src.relpath).name
    if src.kind == "counterfact":
        return convert_counterfact(records, name)
    if src.kind == "knowedit":
        return convert_knowedit(records, name)
    raise DatasetError(f"raw source {src.name}: unknown kind {src.kind!r} (counterfact | knowedit)")
