"""Dataset room: release adapter, build stage, loading and stratified subsets (reference-spec §1.1)."""
from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest


from data_pipeline.dataset import build_dataset, load_cases, resolve_mirror
from data_pipeline.release import convert_release
from data_pipeline.schema import Case, DatasetError, PiqaItem, Probe
from data_pipeline.subset import stratified_subset, write_subset

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared/data"
RELEASE_REL = "release/merged_counterfact.json"
RELEASE_SHA = "39ba477f5a69989e7b8b856a72f67f533893c7d0e6944437fec800af99392f83"  # shared/data/SHA256SUMS


# --------------------------------------------------------------------------------------------- fixtures

def wd_record(n: int, *, relation: bool = True) -> dict:
    subj = f"Person {n}"
    return {
        "requested_rewrite": {"prompt": f"The occupation of {subj} is", "subject": subj,
                              "target_new": f"painter {n}", "target_true": f"actor {n}"},
        "rewrite": {"prompts": [f"The occupation of {subj} is"], "targets": [f"painter {n}"]},
        "p-reasoning": {"prompts": [f"The field of work of {subj} is"] * 2, "targets": ["art", "painting"]},
        "l-relation": ({"prompts": [f"The birthplace of {subj} is"], "targets": ["Paris"]} if relation
                       else {"prompts": [], "targets": []}),
        "o-commonsense": {"prompts": f"How to boil water {n}?", "right": "Heat it in a pot. ", "wrong": "Freeze it."},
    }


def cf_record(n: int, *, neighbor: bool = True) -> dict:
    subj = f"Band {n}"
    return {
        "requested_rewrite": {"prompt": f"{subj} performs", "subject": subj, "target_new": "poetry",
                              "target_true": "jazz", "relation_id": "P136", "target_new_id": "Q482"},
        "rewrite": {"prompts": [f"{subj} performs"], "targets": ["poetry"]},
        "p-paraphrase": {"prompts": [f"Noise. {subj} plays", f"The genre of {subj} is"], "targets": ["poetry"] * 2},
        "l-neighbor": ({"prompts": ["Other Band plays", "Third Band plays"], "targets": ["jazz", "jazz"]} if neighbor
                       else {"prompts": [], "targets": []}),
        "generation": {"prompts": [f"{subj} is known for"] * 3 + [f"{subj} is great at"]},
        "o-commonsense": {"prompts": f"How to cut bread {n}?", "right": "Use a knife.", "wrong": "Use a spoon."},
    }


def tiny_release(n_pairs: int = 3) -> list[dict]:
    out = []
    for i in range(n_pairs):
        out += [wd_record(i, relation=i % 2 == 0), cf_record(i, neighbor=i % 2 == 0)]
    return out


def write_release(tmp_path: Path, records: list[dict]) -> tuple[Path, str]:
    mirror = tmp_path / "mirror"
    path = mirror / RELEASE_REL
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return mirror, hashlib.sha256(path.read_bytes()).hexdigest()


def synthetic_cases(n_cf: int, n_wd: int, n_cf_inf: int, n_wd_inf: int) -> list[Case]:
    cases = []
    for src, n, n_inf, fam in (("counterfact", n_cf, n_cf_inf, "neighborhood"), ("wikidata", n_wd, n_wd_inf, "relation")):
        for i in range(n):
            probes = {fam: (Probe("Other plays", "jazz"),)} if i < n_inf else {}
            cases.append(Case(case_id=f"{src[:2]}-{i:04d}", source=src, subject=f"S{i}", prompt=f"S{i} plays",
                              target_true="jazz", target_new="poetry", **probes))
    return cases


# --------------------------------------------------------------------------------------------- real release

@pytest.fixture(scope="module")
def real_build(tmp_path_factory):
    if not (SHARED_DATA / RELEASE_REL).is_file():
        pytest.skip(f"release file not mirrored at {SHARED_DATA / RELEASE_REL}; the count test needs the real data")
    out = tmp_path_factory.mktemp("real")
    card = build_dataset(SHARED_DATA, RELEASE_REL, RELEASE_SHA, "paper-v1", out)
    return card, out


def test_real_release_counts(real_build):
    card, out = real_build
    cases = load_cases(out / "cases.jsonl")
    assert len(cases) == 1678 == card["n_cases"]
    assert Counter(c.source for c in cases) == {"counterfact": 839, "wikidata": 839}
    # content-detected source agrees with the index parity of spec §1.1 (even = wikidata)
    assert all(c.source == ("wikidata" if c.meta["release_index"] % 2 == 0 else "counterfact") for c in cases)
    assert [c.meta["release_index"] for c in cases] == list(range(1678))
    assert sum(1 for c in cases if c.neighborhood) == 761
    assert sum(1 for c in cases if c.relation) == 450
    prompts = {fam: sum(len(getattr(c, fam)) for c in cases)
               for fam in ("paraphrase", "subject_alias", "reasoning", "neighborhood", "relation", "generation")}
    assert prompts == {"paraphrase": 1678, "subject_alias": 2358, "reasoning": 2487, "neighborhood": 5840,
                       "relation": 1416, "generation": 8390}
    assert {f: v["prompts"] for f, v in card["totals"].items() if f != "piqa"} == prompts
    assert sum(1 for c in cases if c.piqa is not None) == 1678
    ids = [c.case_id for c in cases]
    assert len(set(ids)) == len(ids)
    assert all(c.case_id.startswith("cf-" if c.source == "counterfact" else "wd-") for c in cases)
    assert all(("relation_id" in c.meta) == (c.source == "counterfact") for c in cases)
    piqa = [json.loads(line) for line in (out / "piqa.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["case_id"] for p in piqa] == ids
    assert piqa[1]["edit_text"] == "Sonny Simmons performs poetry."  # spec §2.3 example
    assert card["content_id"] == hashlib.sha256((out / "cases.jsonl").read_bytes()).hexdigest()[:16]
    assert card["version"] == "paper-v1" and card["source"]["sha256"] == RELEASE_SHA
    md = (out / "card.md").read_text(encoding="utf-8")
    assert card["content_id"] in md and RELEASE_SHA in md and "1683" in md and "AFL-3.0" in md


def test_real_release_build_is_byte_stable(real_build, tmp_path):
    _, out = real_build
    build_dataset(SHARED_DATA, RELEASE_REL, RELEASE_SHA, "paper-v1", tmp_path / "again")
    for name in ("cases.jsonl", "piqa.jsonl", "card.json", "card.md"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name


# --------------------------------------------------------------------------------------------- build stage

def test_tiny_build_maps_fields(tmp_path):
    records = tiny_release(2)
    mirror, sha = write_release(tmp_path, records)
    card = build_dataset(mirror, RELEASE_REL, sha, "tiny", tmp_path / "out")
    cases = load_cases(tmp_path / "out" / "cases.jsonl")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["card.json", "card.md", "cases.jsonl", "piqa.jsonl"]
    wd, cf = cases[0], cases[1]
    assert (wd.source, cf.source) == ("wikidata", "counterfact")
    assert wd.reasoning == (Probe("The field of work of Person 0 is", "art"), Probe("The field of work of Person 0 is", "painting"))
    assert wd.relation == (Probe("The birthplace of Person 0 is", "Paris"),)
    assert wd.piqa == PiqaItem("How to boil water 0?", "Heat it in a pot. ", "Freeze it.")  # trailing space kept
    assert cf.generation == ("Band 0 is known for",) * 3 + ("Band 0 is great at",)
    assert cf.paraphrase[1] == Probe("The genre of Band 0 is", "poetry")
    assert cf.meta == {"release_index": 1, "relation_id": "P136", "target_new_id": "Q482"}
    assert cases[3].neighborhood == () and cases[2].relation == ()
    expected = hashlib.sha256(json.dumps(records[1]["requested_rewrite"], sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()[:12]
    assert cf.case_id == f"cf-{expected}"
    assert card["by_source"]["counterfact"]["families"]["neighborhood"] == {"cases_nonempty": 1, "prompts": 2}


def test_source_from_content_not_parity():
    # a wiki record at an odd index and a CF record at an even index: content decides
    cases = convert_release([cf_record(0), wd_record(0)])
    assert [c.source for c in cases] == ["counterfact", "wikidata"]
    bare = []
    for n in (5, 6):  # only requested_rewrite/rewrite/o-commonsense: nothing tells, so index parity decides
        r = wd_record(n)
        del r["p-reasoning"], r["l-relation"]
        bare.append(r)
    assert [c.source for c in convert_release(bare)] == ["wikidata", "counterfact"]


def test_sha256_mismatch_rejected_and_nothing_written(tmp_path):
    mirror, _ = write_release(tmp_path, tiny_release(1))
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as exc:
        build_dataset(mirror, RELEASE_REL, "0" * 64, "tiny", out)
    msg = str(exc.value)
    assert "sha256" in msg and "merged_counterfact.json" in msg and "0" * 64 in msg
    assert not out.exists()


def test_missing_release_file(tmp_path):
    with pytest.raises(DatasetError, match="merged_counterfact.json.*does not exist"):
        build_dataset(tmp_path, RELEASE_REL, "0" * 64, "tiny", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _break_subject(r):
    del r["requested_rewrite"]["subject"]


def _break_neighbor(r):
    r["l-neighbor"]["targets"].pop()


def _break_subject_in_prompt(r):
    r["requested_rewrite"]["subject"] = "Somebody Else"


def _break_piqa(r):
    del r["o-commonsense"]["wrong"]


def _break_prompts_type(r):
    r["p-paraphrase"]["prompts"] = "not a list"


@pytest.mark.parametrize("index, breaker, field", [
    (2, _break_subject, "requested_rewrite.subject"),
    (5, _break_neighbor, "l-neighbor.targets"),
    (4, _break_subject_in_prompt, "requested_rewrite.subject"),
    (3, _break_piqa, "o-commonsense.wrong"),
    (1, _break_prompts_type, "p-paraphrase.prompts"),
])
def test_malformed_record_rejected(tmp_path, index, breaker, field):
    records = tiny_release(3)
    breaker(records[index])
    mirror, sha = write_release(tmp_path, records)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(DatasetError) as exc:
        build_dataset(mirror, RELEASE_REL, sha, "tiny", out)
    msg = str(exc.value)
    assert f"record {index}:" in msg and f"'{field}'" in msg
    assert "mirror" in msg  # says what to do
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written, no temp folder left


def test_duplicate_case_ids_name_both_indices():
    records = tiny_release(2)
    records.append(copy.deepcopy(records[1]))
    with pytest.raises(DatasetError, match=r"record 4: .*duplicates record 1"):
        convert_release(records)


def test_resolve_mirror(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.delenv("DRIFTBENCH_DATA_MIRROR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_mirror("m") == (tmp_path / "m").resolve()
    monkeypatch.setenv("DRIFTBENCH_DATA_MIRROR", str(tmp_path / "m"))
    assert resolve_mirror("does-not-exist") == (tmp_path / "m").resolve()
    monkeypatch.setenv("DRIFTBENCH_DATA_MIRROR", str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="nope.*DRIFTBENCH_DATA_MIRROR"):
        resolve_mirror("m")


def test_load_cases_reports_line(tmp_path):
    good = Case(case_id="x-1", source="wikidata", subject="A", prompt="A is", target_true="b", target_new="c")
    bad = good.to_json() | {"case_id": "x-2", "subject": "Z"}
    p = tmp_path / "cases.jsonl"
    p.write_text(json.dumps(good.to_json()) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"cases\.jsonl:2.*subject"):
        load_cases(p)


# --------------------------------------------------------------------------------------------- schema

def test_case_round_trip():
    case = Case(case_id="cf-abc", source="counterfact", subject="Sonny Simmons", prompt="Sonny Simmons performs",
                target_true="jazz", target_new="poetry",
                paraphrase=(Probe("Sonny Simmons, who plays", "poetry"),) * 2,
                neighborhood=(Probe("Zeena Parkins plays", "jazz"),), generation=("Sonny Simmons is",) * 3,
                piqa=PiqaItem("How?", "Like this. ", "Not so."), meta={"release_index": 1, "relation_id": "P136"})
    d = json.loads(json.dumps(case.to_json()))
    back = Case.from_json(d)
    assert back == case and back.meta == case.meta and back.to_json() == case.to_json()
    assert back.edit_text == "Sonny Simmons performs poetry."


# --------------------------------------------------------------------------------------------- subsets

def test_subset_balanced_and_reproducible():
    cases = synthetic_cases(40, 40, 30, 20)
    ids = stratified_subset(cases, 11, seed=0)
    assert len(ids) == len(set(ids)) == 11
    src = [i[:2] for i in ids]
    assert src == ["co", "wi"] * 5 + ["co"]  # interleaved, extra one to counterfact
    assert stratified_subset(list(reversed(cases)), 11, seed=0) == ids  # input order does not matter
    assert stratified_subset(cases, 11, seed=1) != ids
    # informative cases first: 6 cf (of 30) and 5 wd (of 20) informative cases are available
    by_id = {c.case_id: c for c in cases}
    assert all(by_id[i].neighborhood or by_id[i].relation for i in ids)


def test_subset_prefers_informative_then_fills():
    cases = synthetic_cases(10, 10, 3, 2)
    ids = stratified_subset(cases, 20, seed=7)
    by_id = {c.case_id: c for c in cases}
    cf = [i for i in ids if by_id[i].source == "counterfact"]
    wd = [i for i in ids if by_id[i].source == "wikidata"]
    assert all(by_id[i].neighborhood for i in cf[:3]) and not any(by_id[i].neighborhood for i in cf[3:])
    assert all(by_id[i].relation for i in wd[:2]) and not any(by_id[i].relation for i in wd[2:])


def test_subset_prefix_stable():
    cases = synthetic_cases(30, 30, 10, 25)
    big = stratified_subset(cases, 40, seed=3)
    for n in (1, 2, 7, 20, 39):
        small = stratified_subset(cases, n, seed=3)
        assert small == big[:n]


def test_subset_too_large_and_write(tmp_path):
    cases = synthetic_cases(5, 4, 5, 4)
    assert len(stratified_subset(cases, 9, seed=0)) == 9
    with pytest.raises(DatasetError, match="at most 9"):
        stratified_subset(cases, 10, seed=0)
    with pytest.raises(DatasetError):
        stratified_subset(synthetic_cases(5, 5, 0, 0), 12, seed=0)
    ids = stratified_subset(cases, 4, seed=5)
    write_subset(ids, tmp_path / "subset.json")
    assert json.loads((tmp_path / "subset.json").read_text()) == {"size": 4, "seed": 5, "case_ids": list(ids)}


def test_real_release_content_id_is_the_published_one(real_build):
    """The id a citation names (dvc.yaml `artifacts: paper-v1: meta.content_id`, README, CITATION.cff) is the id this
    machine builds: content ids depend only on the release bytes and the code, never on the machine or a path."""
    import yaml

    card, _ = real_build
    published = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]["paper-v1"]["meta"]["content_id"]
    assert card["content_id"] == published
    for doc in ("README.md", "CITATION.cff"):
        assert published in (ROOT / doc).read_text(encoding="utf-8"), doc
