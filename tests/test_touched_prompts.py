"""bench/touched_prompts.py: a prompt counts as touched when either continuation's log-prob moved at all."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("touched_prompts", ROOT / "bench" / "touched_prompts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(case_id, pre, post):
    return json.dumps({"case_id": case_id, "pre": pre, "post": post})


def test_counts_moved_prompts_per_task(tmp_path):
    mod = _load()
    pre = {"neighborhood": {"right": [[-1.0, 1], [-2.0, 1]], "wrong": [[-3.0, 1], [-4.0, 1]]},
           "rewrite": {"right": [[-5.0, 1]], "wrong": [[-1.0, 1]]}, "fl": 6.1}
    post = {"neighborhood": {"right": [[-1.0, 1], [-2.0, 1]], "wrong": [[-3.0, 1], [-4.000001, 1]]},
            "rewrite": {"right": [[-0.1, 1]], "wrong": [[-1.0, 1]]}, "fl": 6.0}
    f = tmp_path / "cell.jsonl"
    f.write_text(_row("a", pre, post) + "\n" + _row("b", pre, pre) + "\n")
    moved, total = mod.touched(f)
    assert dict(total) == {"neighborhood": 4, "rewrite": 2}
    assert dict(moved) == {"neighborhood": 1, "rewrite": 1}  # only the wrong side moved, by 1e-6: still touched


def test_refuses_a_file_without_scores(tmp_path):
    f = tmp_path / "cell.timings.jsonl"
    f.write_text(json.dumps({"case_id": "a", "edit_s": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="cell.timings.jsonl:1: a row without"):
        _load().touched(f)
