"""The runner (evaluators/runner.py) on fake units, no model: parts, merge, banking, adoption, refusal."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from basis.cells import Mode
from basis.errors import UserError
from basis.io import atomic_write_jsonl, read_jsonl
from evaluators import runner


def compute(unit):
    return [{"case_id": c, "value": len(c)} for c in unit.case_ids], [{"s": 0.1} for _ in unit.case_ids]


def parts_of(root: Path) -> dict[str, set[str]]:
    return {d.name: {p.name for p in d.glob("*.json")} for d in root.iterdir() if d.is_dir()}


def test_replacing_an_output_banks_every_row_it_held(tmp_path):
    """An output restored without its parts (e.g. by DVC) holds cases a-d under fingerprint F; the subset shrinks
    to a, b under the same F: the merged file has a, b, and c, d stay as parts (nothing deleted)."""
    out, root = tmp_path / "cell.jsonl", tmp_path / ".parts" / "cell"
    atomic_write_jsonl(out, [{"case_id": c, "value": len(c), "fingerprint": "F"} for c in "abcd"]
                       + [{"case_id": "e", "value": 1}])  # and one row without a fingerprint
    res = runner.run(out, root, runner.make_plan("F", ["a", "b"]), compute, progress=False)
    assert res["ran"] == 0 and [r["case_id"] for r in read_jsonl(out)] == ["a", "b"]  # adopted, not recomputed
    parts = parts_of(root)
    assert parts["F"] == {"a.json", "b.json", "c.json", "d.json"}
    (banked,) = parts["_unfingerprinted"]
    assert json.loads((root / "_unfingerprinted" / banked).read_text())["rows"] == [{"case_id": "e", "value": 1}]
    # the subset grows back: c and d come from their parts, nothing is computed
    res = runner.run(out, root, runner.make_plan("F", list("abcd")), compute, progress=False)
    assert res["ran"] == 0 and [r["case_id"] for r in read_jsonl(out)] == list("abcd")


def test_stream_rows_are_never_adopted_into_other_streams(tmp_path):
    out, root = tmp_path / "cell.jsonl", tmp_path / ".parts" / "cell"
    seq = Mode("seq", 4, "final")
    runner.run(out, root, runner.make_plan("F", list("abcd"), seq), compute, progress=False)
    res = runner.run(out, root / "other", runner.make_plan("F", ["c", "d"], seq), compute, progress=False)
    assert res["ran"] == 1  # stream [c, d] is a new stream: computed, not taken from stream [a, b, c, d]


def test_a_row_with_nan_never_becomes_a_part(tmp_path):
    def bad(unit):
        return [{"case_id": unit.case_ids[0], "value": math.nan}], [{}]

    with pytest.raises(ValueError):
        runner.run(tmp_path / "o.jsonl", tmp_path / "p", runner.make_plan("F", ["a"]), bad, progress=False)
    assert not list((tmp_path / "p").rglob("*.json")) and not (tmp_path / "o.jsonl").exists()


def test_a_worker_with_another_fingerprint_writes_nothing(tmp_path):
    out = tmp_path / "o.jsonl"
    atomic_write_jsonl(out, [{"case_id": "a", "value": 1, "fingerprint": "F"}])
    with pytest.raises(UserError, match="the driver planned G"):
        runner.run(out, tmp_path / "p", runner.make_plan("F", ["a"]), compute, progress=False,
                   expect_fingerprint="G")
    assert not (tmp_path / "p").exists()  # checked before adopting or running anything


def test_shards_partition_the_units_and_the_last_one_merges(tmp_path):
    out, root = tmp_path / "o.jsonl", tmp_path / "p"
    plan = runner.make_plan("F", list("abcdefg"), Mode("seq", 2, "final"))
    assert [u.case_ids for u in plan.units] == [("a", "b"), ("c", "d"), ("e", "f"), ("g",)]
    runs = [runner.run(out, root, plan, compute, shard=(i, 3), progress=False) for i in (2, 0, 1)]
    assert [r["ran"] for r in runs] == [1, 2, 1] and runs[0]["rows"] is None and runs[2]["rows"] is not None
    assert [r["case_id"] for r in read_jsonl(out)] == list("abcdefg")
    with pytest.raises(UserError, match="expected I/N"):
        runner.parse_shard("0/2")
    assert runner.parse_shard("2/4") == (1, 4) and runner.parse_shard(None) == (0, 1)
