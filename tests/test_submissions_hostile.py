"""Issue 11: nothing forged reaches the leaderboard, and one bad bundle never takes the site down.

Items: 6 (verified means every shown number was recomputed), 7 (a bundle covers its profile's case set or is a
labelled partial run, ranked apart), 8 (Infinity, wrong types, deep nesting are rejected by `validate` with the file
and field, and `--skip-invalid` builds without them), plus a fuzz test over bundles and result files.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from basis.io import atomic_write_jsonl, read_jsonl
from basis.errors import UserError
from evaluators.aggregate import SummaryBuilder, load_cell
from leaderboard.site import build_site
from leaderboard.submission import BundleError, pack_bundle, validate_bundle
from leaderboard.synthetic import write_result_file
from test_leaderboard import CARD, DATASET, DATASETS, GIT, PARAMS, cells, refresh_hash

CELL = "paper/gpt-j-6b/rome+sadr"


def _pack(rows_file: Path, out: Path, **kw) -> Path:
    return pack_bundle(rows_file, out, dataset=DATASET, editor={"version": "1", **kw.pop("editor", {})},
                       submitter={"name": "x"}, **kw)


def _badges(data) -> dict[str, list[str]]:
    return {Path(e.key).name: [b[1] for b in e.badges] for e in data.entries if e.kind == "submission"}


def _forge(src: Path, dst: Path, fn) -> Path:
    rows = list(read_jsonl(src))
    for r in rows:
        fn(r)
    atomic_write_jsonl(dst, rows)
    return dst


# ------------------------------------------------------------------------------------------------ item 6
def test_forged_drift_magnitudes_or_hparams_are_never_verified(tmp_path):
    files = cells(tmp_path)
    subs = tmp_path / "subs"
    _pack(files[2], subs / "honest")

    def drift(r):  # accuracies untouched, attention drift divided by 400
        d = r["editor"]["diagnostics"].get("attn_drift") or {}
        for k in d:
            d[k] = [v / 400 for v in d[k]]

    def magnitude(r):  # a successful rewrite made far more confident: ES unchanged, EM forged
        right, wrong = r["post"]["rewrite"]["right"], r["post"]["rewrite"]["wrong"]
        for a, b in zip(right, wrong):
            if a[0] / a[1] > b[0] / b[1]:
                a[0] += 5.0 * a[1]

    _pack(_forge(files[2], tmp_path / "f1.jsonl", drift), subs / "drift")
    _pack(_forge(files[2], tmp_path / "f2.jsonl", magnitude), subs / "magnitude")
    _pack(files[2], subs / "hparams", editor={"hparams": {"layer": 99}})
    params = {**PARAMS, "profiles": {"paper": {"hparams": {"gpt-j-6b": {"rome": {"layer": 5}}}}}}
    data = build_site(files, tmp_path / "site", submissions_dir=subs, params=params, card=CARD, git=GIT)
    assert _badges(data) == {"honest": ["verified"], "drift": ["self-reported"], "magnitude": ["self-reported"],
                             "hparams": ["self-reported"]}
    why = {Path(e.key).name: e.page["provenance"]["differences"] for e in data.entries if e.kind == "submission"}
    assert why["honest"] == []
    assert any("drift" in d for d in why["drift"])
    assert any(".EM." in d for d in why["magnitude"]) and not any(".ES." in d for d in why["magnitude"])
    assert any(d.startswith("hparams:") for d in why["hparams"])


# ------------------------------------------------------------------------------------------------ item 7
def test_cherry_picked_subset_is_rejected_or_ranked_apart(tmp_path):
    files = cells(tmp_path)
    full = {r["case_id"] for r in read_jsonl(files[2])}
    profile_cases = {"paper": full, "embedded": full}
    picked = tmp_path / "picked.jsonl"
    atomic_write_jsonl(picked, list(read_jsonl(files[2]))[:2])
    with pytest.raises(BundleError, match="covers 2 of the 24 cases of profile 'paper'.*--partial"):
        _pack(picked, tmp_path / "subs" / "picked", profile_cases=profile_cases)
    assert not (tmp_path / "subs" / "picked").exists()
    # labelled partial: accepted, in a table of its own, never verified or ranked with full runs
    _pack(picked, tmp_path / "subs" / "partial", partial=True, profile_cases=profile_cases)
    data = build_site(files, tmp_path / "site", submissions_dir=tmp_path / "subs", params=PARAMS, card=CARD, git=GIT,
                      profile_cases=profile_cases)
    sub = next(e for e in data.entries if e.kind == "submission")
    assert "partial run" in [b[1] for b in sub.badges] and sub.group.endswith("partial runs (not ranked)")
    assert all(e.group != sub.group for e in data.entries if e is not sub)
    # cases from outside the profile's set are refused even when labelled partial
    other = write_result_file(tmp_path / "other.jsonl", CELL, 30)
    with pytest.raises(BundleError, match="not in profile 'paper'"):
        _pack(other, tmp_path / "subs" / "other", partial=True, profile_cases=profile_cases)
    with pytest.raises(BundleError, match="'profile' is 'paper', which this leaderboard does not define"):
        _pack(files[2], tmp_path / "subs" / "x", profile_cases={"embedded": full})


# ------------------------------------------------------------------------------------------------ item 8
def _bundle(tmp_path: Path, name: str) -> Path:
    return _pack(write_result_file(tmp_path / f"{name}.jsonl", CELL, 6, damage=0.2), tmp_path / "subs" / name)


def _edit_rows(folder: Path, fn) -> None:
    lines = (folder / "cases.jsonl").read_text().splitlines()
    (folder / "cases.jsonl").write_text("\n".join(fn(lines)) + "\n")
    refresh_hash(folder, "cases.jsonl")


def _set_drift(line: str, value) -> str:
    row = json.loads(line)
    row["editor"]["diagnostics"]["attn_drift"] = value
    return json.dumps(row)


@pytest.mark.parametrize("mutate, match", [
    (lambda ls: [ls[0].replace('"attn_drift":{', '"attn_drift":{"relation":[Infinity],', 1)] + ls[1:],
     "line 1.*Infinity"),
    (lambda ls: [ls[0].replace('"attn_drift":{', '"attn_drift":{"relation":[NaN],', 1)] + ls[1:], "line 1.*NaN"),
    (lambda ls: [_set_drift(ls[0], 5)] + ls[1:], "row 1: field 'editor.diagnostics.attn_drift'"),
    (lambda ls: [_set_drift(ls[0], {"relation": ["x"]})] + ls[1:], "row 1: field 'editor.diagnostics.attn_drift"),
    (lambda ls: ls[:1] + ['{"a":' * 5000 + "1" + "}" * 5000] + ls[2:], "line 2.*nested"),
    (lambda ls: [ls[0].replace('{"case_id"', '{"case_id":"dup","case_id"', 1)] + ls[1:], "line 1.*duplicate key"),
])
def test_validate_rejects_what_the_site_cannot_render(tmp_path, mutate, match):
    good = _bundle(tmp_path, "good")
    bad = _bundle(tmp_path, "bad")
    _edit_rows(bad, mutate)
    with pytest.raises(BundleError, match=match):
        validate_bundle(bad, DATASETS)
    with pytest.raises(BundleError):
        build_site([], tmp_path / "site", submissions_dir=tmp_path / "subs", params=PARAMS, card=CARD, git=GIT)
    data = build_site([], tmp_path / "site", submissions_dir=tmp_path / "subs", params=PARAMS, card=CARD, git=GIT,
                      on_invalid="skip")
    assert [Path(e.key).name for e in data.entries if e.kind == "submission"] == [good.name]
    assert len(data.rejected) == 1 and (tmp_path / "site" / "index.html").is_file()


# ------------------------------------------------------------------------------------------------ fuzz
def _mutations(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0 and data:  # truncate
        return data[: rng.randrange(len(data))]
    if kind == 1 and data:  # flip bits
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:  # a number where anything else was
        text = data.decode("utf-8", "replace")
        i = rng.randrange(max(1, len(text)))
        for tok in ('"', "[", "{"):
            j = text.find(tok, i)
            if j >= 0:
                return (text[:j] + rng.choice(["5", "NaN", "Infinity", "-Infinity", "1e999", "null", "true"])
                        + text[j + 1:]).encode()
        return data
    if kind == 3:  # invalid UTF-8
        i = rng.randrange(max(1, len(data)))
        return data[:i] + b"\xff\xfe" + data[i:]
    if kind == 4:  # deep nesting
        return b'{"x":' + b"[" * 3000 + b"]" * 3000 + b"}\n" + data
    return data.replace(b'"source":', b'"source":"x","source":', 1)  # duplicate key


def test_fuzz_bundles_and_result_files(tmp_path):
    """Random truncation, bit flips, wrong types, NaN/Inf, invalid UTF-8, deep nesting and duplicate keys in any file
    of a bundle or in a result file: `validate_bundle` raises only BundleError, the result-file reader only its own
    error, and the site always builds from the good bundles with ``on_invalid="skip"``."""
    rng = random.Random(11)
    subs = tmp_path / "subs"
    good = _bundle(tmp_path, "good")
    template = _bundle(tmp_path, "template")
    originals = {n: (template / n).read_bytes() for n in ("metadata.json", "cases.jsonl", "summary.json")}
    result = write_result_file(tmp_path / "r.jsonl", CELL, 4)
    result_bytes = result.read_bytes()
    outcomes = {"rejected": 0, "accepted": 0, "result_rejected": 0}
    for trial in range(120):
        name = rng.choice(list(originals))
        for n, data in originals.items():
            (template / n).write_bytes(data)
        (template / name).write_bytes(_mutations(originals[name], rng))
        if name != "metadata.json" and rng.random() < 0.5:
            refresh_hash(template, name)  # a forger who keeps the hashes consistent
        try:
            validate_bundle(template, DATASETS)
            outcomes["accepted"] += 1
        except BundleError as exc:
            outcomes["rejected"] += 1
            outcomes["net"] = outcomes.get("net", 0) + ("malformed content (" in str(exc))
        result.write_bytes(_mutations(result_bytes, rng))
        try:  # what `aggregate` and the site do with a result file
            cell, rows = load_cell(result)
            SummaryBuilder(["paper"]).add(result, cell, rows)
        except UserError as exc:  # ResultFileError or JsonInputError: names the file
            assert str(result) in str(exc), exc
            outcomes["result_rejected"] += 1
        if trial % 20 == 0:
            data = build_site([], tmp_path / "site", submissions_dir=subs, params=PARAMS, card=CARD, git=GIT,
                              on_invalid="skip")
            names = [Path(e.key).name for e in data.entries if e.kind == "submission"]
            assert good.name in names
    assert outcomes["rejected"] > 60 and outcomes["result_rejected"] > 30, outcomes
    assert outcomes.get("net", 0) == 0, outcomes  # every rejection named its own problem (no catch-all)
