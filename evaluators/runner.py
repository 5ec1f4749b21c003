"""The runner: plan → units → execute → store → merge, the same for one process, shards and a cluster.

- **plan**: the driver fixes the fingerprint (everything that decides a row) and cuts the cases into units — one
  case, a sequential stream of T cases, or a batch of B cases (`basis.cells.Mode`).
- **execute**: a worker runs the units of its shard (``index % n == i``) that have no part yet. A worker given the
  driver's fingerprint refuses to run when its own differs (other code, lock, hparams or data).
- **store**: each unit's rows (and timings) are written atomically to their own part file
  ``<parts>/<cell>/<fingerprint>/<unit key>.json``. Parts are never deleted or rewritten by a later configuration:
  a changed fingerprint writes a new folder, and an old configuration's parts are reused if it comes back. A
  ``kill -9`` loses at most the unit in flight; a torn part cannot exist (write to a temporary file, then rename).
- **merge**: when every unit has its part, the cell file DVC tracks is written once, atomically, rows in the plan's
  case order — byte-identical whatever the order of execution, the sharding or the interruptions. Merging twice,
  or from two shards at once (a lock serialises them), writes the same bytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from basis.cells import SINGLE, Mode
from basis.errors import UserError
from basis.io import OutputLock, atomic_write_jsonl, atomic_write_text, dumps_line, read_json, read_jsonl, sha256_text

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")


@dataclass(frozen=True)
class Unit:
    index: int  # position in the plan
    case_ids: tuple[str, ...]
    kind: str = SINGLE

    @property
    def key(self) -> str:
        """File name of the unit's part: the case id for a single case, else the mode and a digest of its cases."""
        if self.kind == SINGLE and len(self.case_ids) == 1 and _SAFE.match(self.case_ids[0]):
            return self.case_ids[0]
        return f"{self.kind}{len(self.case_ids)}-{sha256_text(dumps_line(list(self.case_ids)))[:16]}"


@dataclass(frozen=True)
class Plan:
    fingerprint: str
    units: tuple[Unit, ...]
    case_ids: tuple[str, ...]  # output order

    def shard(self, index: int, count: int) -> list[Unit]:
        return [u for u in self.units if u.index % count == index]


def make_plan(fingerprint: str, case_ids: Sequence[str], mode: Mode = Mode(), group: int = 1) -> Plan:
    """Units of ``mode.size`` consecutive cases in the given order (the last stream may be shorter); single-case
    modes: units of ``group`` independent cases (the last group may be shorter)."""
    ids = list(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("a plan's case ids must be distinct")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    size = group if mode.kind == SINGLE else mode.size
    units = tuple(Unit(i, tuple(ids[j:j + size]), mode.kind) for i, j in enumerate(range(0, len(ids), size)))
    return Plan(fingerprint, units, tuple(ids))


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"2/4"`` → (1, 4): the second of four shards (1-based on the command line)."""
    if not text:
        return 0, 1
    m = re.fullmatch(r"([0-9]+)/([0-9]+)", text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise UserError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. --shard 2/4")
    return int(m[1]) - 1, int(m[2])


class PartStore:
    """Part files of one output under ``root`` (``<results>/.parts/<output name>``), one folder per fingerprint."""

    def __init__(self, root: Path, fingerprint: str):
        self.dir = Path(root) / fingerprint
        self.fingerprint = fingerprint

    def path(self, unit: Unit) -> Path:
        return self.dir / f"{unit.key}.json"

    def read(self, unit: Unit) -> dict | None:
        """The unit's part, checked (fingerprint, case ids, one row per case), or None when it has none yet."""
        p = self.path(unit)
        if not p.is_file():
            return None
        part = read_json(p)
        rows = part.get("rows") if isinstance(part, dict) else None
        if (not isinstance(rows, list) or part.get("fingerprint") != self.fingerprint
                or [r.get("case_id") if isinstance(r, dict) else None for r in rows] != list(unit.case_ids)):
            raise UserError(f"{p}: not the part of unit {unit.key} with fingerprint {self.fingerprint} "
                            "(edited by hand?); delete that file and rerun")
        return part

    def write(self, unit: Unit, rows: list[dict], timings: list[dict]) -> None:
        """Atomically; NaN/Infinity refused here (ValueError) so a part that could not be read back never exists."""
        atomic_write_text(self.path(unit), dumps_line({"fingerprint": self.fingerprint, "unit": unit.key,
                                                       "rows": rows, "timings": timings}) + "\n")


def adopt(out_path: Path, plan: Plan, store: PartStore) -> int:
    """Turn rows of an existing output written with the plan's fingerprint into parts (outputs restored by DVC or
    written before parts existed), so a finished output is never recomputed; returns the units adopted. Only
    single-case units: a stream's rows depend on the whole stream, which the file does not record."""
    if not out_path.is_file() or any(u.kind != SINGLE for u in plan.units):
        return 0
    rows = {r.get("case_id"): r for r in read_jsonl(out_path)
            if isinstance(r, dict) and r.get("fingerprint") == plan.fingerprint}
    n = 0
    for unit in plan.units:
        if all(c in rows for c in unit.case_ids) and store.read(unit) is None:
            store.write(unit, [rows[c] for c in unit.case_ids], [])
            n += 1
    return n


def _in_unit(row: dict) -> bool:
    """A row of a stream or batch (its diagnostics say its position in the unit)."""
    diag = (row.get("editor") or {}).get("diagnostics") if isinstance(row.get("editor"), dict) else None
    return isinstance(diag, dict) and bool({"stream_position", "batch_position"} & set(diag))


def bank(rows: list[dict], root: Path) -> None:
    """Keep every row of an output about to be replaced: under its fingerprint's folder as the part of its
    single-case unit (reused if that configuration and case come back) unless that part exists; rows of streams
    and batches, whose units cannot be rebuilt from the file, and rows without a usable fingerprint all together in
    ``banked-<digest>.json`` (the latter under ``_unfingerprinted``). So replacing an output never deletes a row."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        fp = r.get("fingerprint") if isinstance(r, dict) else None
        groups.setdefault(fp if isinstance(fp, str) and _SAFE.match(fp) else "_unfingerprinted", []).append(r)
    for fp, grp in groups.items():
        store = PartStore(root, fp)
        if fp != "_unfingerprinted" and all(isinstance(r.get("case_id"), str) and _SAFE.match(r["case_id"])
                                            and not _in_unit(r) for r in grp):
            for r in grp:
                unit = Unit(0, (r["case_id"],))
                if not store.path(unit).is_file():
                    store.write(unit, [r], [])
        else:
            body = dumps_line(grp)
            path = store.dir / f"banked-{sha256_text(body)[:16]}.json"
            if not path.is_file():
                atomic_write_text(path, dumps_line({"fingerprint": fp, "rows": grp}) + "\n")


def check_fingerprint(plan: Plan, expect: str | None, desc: str) -> None:
    """A worker runs only the driver's plan: refuse when its own fingerprint differs (before anything is written)."""
    if expect is not None and expect != plan.fingerprint:
        raise UserError(f"{desc}: this worker's fingerprint is {plan.fingerprint} but the driver planned {expect}: "
                        "its code, installed packages, hyper-parameters or data differ; install the same lock and "
                        "checkout on every worker")


def record(plan: Plan, store: PartStore, unit: Unit, rows: list[dict], timings: list[dict]) -> None:
    """Store one computed unit as its part: its rows (checked against the unit's cases) stamped with the plan's
    fingerprint, and its timings. Wherever ``compute`` ran, this is how its result enters the output."""
    if [r.get("case_id") for r in rows] != list(unit.case_ids) or len(timings) != len(rows):  # a bug in compute
        raise RuntimeError(f"unit {unit.key}: rows {[r.get('case_id') for r in rows]} and {len(timings)} timings "
                           f"for {unit.case_ids}")
    for r in rows:
        r["fingerprint"] = plan.fingerprint
    store.write(unit, rows, [{"case_id": c, "fingerprint": plan.fingerprint, **t}
                             for c, t in zip(unit.case_ids, timings)])


def execute(plan: Plan, store: PartStore, compute: Callable[[Unit], tuple[list[dict], list[dict]]],
            shard: tuple[int, int] = (0, 1), progress: bool = True, desc: str = "",
            expect_fingerprint: str | None = None) -> int:
    """Run ``compute(unit) -> (rows, timings)`` for every unit of this shard without a part; returns units run."""
    from tqdm.auto import tqdm

    check_fingerprint(plan, expect_fingerprint, desc)
    mine = plan.shard(*shard)
    todo = [u for u in mine if store.read(u) is None]
    n_cases = sum(len(u.case_ids) for u in mine)
    bar = tqdm(total=n_cases, initial=n_cases - sum(len(u.case_ids) for u in todo), desc=desc, unit="case",
               disable=not progress, dynamic_ncols=True, smoothing=0.1)
    try:
        for unit in todo:
            record(plan, store, unit, *compute(unit))
            bar.update(len(unit.case_ids))
    finally:
        bar.close()
    return len(todo)


def merge(out_path: Path, plan: Plan, store: PartStore) -> list[dict] | None:
    """Write the output (and its ``.timings.jsonl`` sidecar) from the parts when every unit has one; returns its
    rows, or None while units are missing (other shards still running). Nothing is written otherwise."""
    out_path = Path(out_path)
    parts = [store.read(u) for u in plan.units]
    if any(p is None for p in parts):
        return None
    rows = [r for p in parts for r in p["rows"]]
    if [r["case_id"] for r in rows] != list(plan.case_ids):  # cannot happen: units cover the plan in order
        raise RuntimeError(f"{out_path}: parts do not cover the plan's cases in order")
    timings = [t for p in parts for t in p.get("timings", [])]
    # one lock per output file (whatever parts folder a caller uses), beside it in a folder git and DVC ignore
    with OutputLock(out_path.parent / ".locks" / f"{out_path.name}.lock", str(out_path), wait=True):
        current = list(read_jsonl(out_path)) if out_path.is_file() else None
        if current != rows:
            if current:
                bank(current, store.dir.parent)
            atomic_write_jsonl(out_path, rows)
        if timings:
            atomic_write_jsonl(out_path.with_name(out_path.stem + ".timings.jsonl"), timings)
    return rows


def missing_units(plan: Plan, store: PartStore) -> list[Unit]:
    return [u for u in plan.units if store.read(u) is None]


def run(out_path: Path, parts_root: Path, plan: Plan, compute: Callable[[Unit], tuple[list[dict], list[dict]]],
        shard: tuple[int, int] = (0, 1), progress: bool = True, desc: str = "",
        expect_fingerprint: str | None = None) -> dict[str, Any]:
    """execute this shard, then merge if every unit is done; returns {"ran", "rows" (or None), "missing"}."""
    check_fingerprint(plan, expect_fingerprint, desc)
    store = PartStore(parts_root, plan.fingerprint)
    adopt(Path(out_path), plan, store)
    ran = execute(plan, store, compute, shard, progress, desc)
    rows = merge(Path(out_path), plan, store)
    return {"ran": ran, "rows": rows, "missing": [] if rows is not None else missing_units(plan, store),
            "fingerprint": plan.fingerprint}
