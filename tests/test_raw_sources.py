"""Raw source adapters (ROME CounterFact, KnowEdit WikiData_counterfact), download/verification, balanced merge.

Every fixture is written here in the raw formats (data_pipeline/raw.py docstring); no network (loopback only).
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_pipeline.merge import apply_judgments, attach_piqa, balanced_merge, load_piqa_valid
from data_pipeline.raw import (RAW_SOURCES, RawSource, convert_counterfact, convert_knowedit, fetch, load_source,
                               verify_file)
from data_pipeline.release import case_id_for, convert_record
from data_pipeline.schema import DatasetError, PiqaItem


# --------------------------------------------------------------------------------------------- raw fixtures

def cf_raw(n: int, *, related_neighbor: bool = False, garbled_neighbor: bool = False) -> dict:
    """One ROME CounterFact record (its real shape; contents synthetic)."""
    subj = f"Band {n}"
    neigh = [f"Other Band {n}.{k} plays" for k in range(3)]
    if related_neighbor:
        neigh[0] = f"RELATED {subj} Junior plays"
    if garbled_neighbor:
        neigh[1] = f"GARBLE Band {n} plays"
    return {"case_id": n, "pararel_idx": 1000 + n,
            "requested_rewrite": {"prompt": "{} performs", "relation_id": "P136", "subject": subj,
                                  "target_new": {"str": "poetry", "id": "Q482"},
                                  "target_true": {"str": "jazz", "id": "Q8341"}},
            "paraphrase_prompts": [f"Noise. {subj} plays", f"The genre of {subj} is"],
            "neighborhood_prompts": neigh,
            "attribute_prompts": [f"Poet {k} performs" for k in range(2)],
            "generation_prompts": [f"{subj} is known for"] * 3 + [f"{subj} is great at"]}


def ke_raw(n: int, *, related_relation: bool = False) -> dict:
    """One KnowEdit WikiData_counterfact record (its real shape; contents synthetic)."""
    subj = f"Person {n}"
    rel = [{"prompt": f"The occupation of {subj} is", "ground_truth": [["actor", "actress"]]},
           {"prompt": f"The birthplace of {subj} is", "ground_truth": [["Paris"]]}]
    if related_relation:
        rel[1] = {"prompt": f"RELATED The nationality of {subj} is", "ground_truth": [["French"]]}
    return {"subject": subj, "prompt": f"The country of citizenship of {subj} is", "target_new": "Japan",
            "ground_truth": "France",
            "portability": {"Reasoning": [{"prompt": f"The capital of the country of citizenship of {subj} is",
                                           "ground_truth": [["Tokyo", "Tokio"], ["Edo"]]}],
                            "Subject_Aliasing": [{"prompt": f"The country of citizenship of P. {n} is",
                                                  "ground_truth": ["Japan"]}],
                            "Logical_Generalization": [{"prompt": f"{subj} is a citizen of",
                                                        "ground_truth": [["Japan"]]}]},
            "locality": {"Relation_Specificity": rel,
                         "Forgetfulness": [{"prompt": f"The spouse of {subj} is", "ground_truth": [["Ann"]]}]}}


def write_json(path: Path, obj) -> tuple[Path, str, int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(obj, indent=1).encode()
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest(), len(data)


def write_piqa(root: Path, n: int = 12) -> dict:
    """PIQA validation files (valid.jsonl + valid-labels.lst) in their real format; returns their sha256s."""
    lines = [json.dumps({"id": f"p{i}", "goal": f"How to do thing {i}?", "sol1": f"Way A{i}.", "sol2": f"Way B{i}."})
             for i in range(n)]
    (root / "piqa").mkdir(parents=True, exist_ok=True)
    (root / "piqa/valid.jsonl").write_text("\n".join(lines) + "\n")
    (root / "piqa/valid-labels.lst").write_text("\n".join(str(i % 2) for i in range(n)) + "\n")
    return {k: hashlib.sha256((root / "piqa" / f).read_bytes()).hexdigest()
            for k, f in (("jsonl_sha256", "valid.jsonl"), ("labels_sha256", "valid-labels.lst"))}


def write_raw_mirror(root: Path, n_cf: int = 6, n_test: int = 4, n_train: int = 3) -> dict:
    """A data mirror with the three raw files + PIQA; returns `data_raw.source_overrides` + piqa shas."""
    cf = [cf_raw(i, related_neighbor=i % 3 == 0, garbled_neighbor=i == 1) for i in range(n_cf)]
    test = [ke_raw(i, related_relation=i % 2 == 0) for i in range(n_test)]
    train = [ke_raw(100 + i) for i in range(n_train)] + [ke_raw(0, related_relation=True)]  # overlaps test
    overrides = {}
    for name, recs in (("counterfact", cf), ("knowedit_test_cf", test), ("knowedit_train_cf", train)):
        _, sha, size = write_json(root / RAW_SOURCES[name].relpath, recs)
        overrides[name] = {"sha256": sha, "size": size, "url": f"http://127.0.0.1:9/{name}.json"}
    return {"source_overrides": overrides, "piqa": write_piqa(root)}


# --------------------------------------------------------------------------------------------- adapters

def test_counterfact_adapter_maps_fields_and_ids_like_the_release():
    cases = convert_counterfact([cf_raw(0), cf_raw(1)])
    c = cases[0]
    assert (c.source, c.subject, c.prompt, c.target_true, c.target_new) == (
        "counterfact", "Band 0", "Band 0 performs", "jazz", "poetry")
    assert [(p.prompt, p.target) for p in c.paraphrase] == [("Noise. Band 0 plays", "poetry"),
                                                            ("The genre of Band 0 is", "poetry")]
    assert {p.target for p in c.neighborhood} == {"jazz"} and len(c.neighborhood) == 3
    assert len(c.generation) == 4 and c.generation.count("Band 0 is known for") == 3  # duplicates kept
    assert c.meta["relation_id"] == "P136" and c.meta["target_new_id"] == "Q482" and c.meta["raw_case_id"] == 0
    # the same edit written in the release's format gets the same case id (raw-derived ids == paper-v1 ids)
    release_rec = {"requested_rewrite": {"prompt": "Band 0 performs", "target_new": "poetry", "target_true": "jazz",
                                         "subject": "Band 0", "relation_id": "P136", "target_new_id": "Q482"},
                   "o-commonsense": {"prompts": "g", "right": "r", "wrong": "w"}, "p-paraphrase":
                   {"prompts": ["x Band 0"], "targets": ["poetry"]}}
    assert convert_record(release_rec, 1).case_id == c.case_id
    assert cases[1].case_id != c.case_id


def test_knowedit_adapter_flattens_answers_and_drops_unused_families():
    (c,) = convert_knowedit([ke_raw(7, related_relation=True)])
    assert (c.source, c.prompt, c.target_true, c.target_new) == (
        "wikidata", "The country of citizenship of Person 7 is", "France", "Japan")
    reasoning_prompt = "The capital of the country of citizenship of Person 7 is"
    # one probe per answer (its first alias): [["Tokyo", "Tokio"], ["Edo"]] → Tokyo, Edo
    assert [(p.prompt, p.target) for p in c.reasoning] == [(reasoning_prompt, "Tokyo"), (reasoning_prompt, "Edo")]
    assert [p.target for p in c.subject_alias] == ["Japan"]
    assert [p.target for p in c.relation] == ["actor", "French"]  # first answer per prompt (release: no duplicates)
    assert c.meta["dropped_probes"] == {"portability.Logical_Generalization": 1, "locality.Forgetfulness": 1}
    assert c.case_id == case_id_for({"prompt": c.prompt, "subject": c.subject, "target_new": "Japan",
                                     "target_true": "France"}, "wikidata")
    # ground_truth given as a list and missing optional blocks are accepted
    rec = ke_raw(8)
    rec["ground_truth"] = ["France", "French Republic"]
    del rec["portability"]
    (c2,) = convert_knowedit([rec])
    assert c2.target_true == "France" and c2.reasoning == () and len(c2.relation) == 2


def test_duplicate_edits_are_kept_once():
    assert len(convert_counterfact([cf_raw(0), cf_raw(0), cf_raw(1)])) == 2


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["requested_rewrite"].pop("subject"), "counterfact.json record 1 (case_id 1): field "
                                                       "'requested_rewrite.subject' is missing"),
    (lambda r: r["requested_rewrite"].update(prompt="performs"), "exactly one '{}' placeholder"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str=""), "'requested_rewrite.target_new.str' must be a "
                                                                    "non-empty string"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str="jazz"), "an edit must change the answer"),
    (lambda r: r.update(neighborhood_prompts="Other Band plays"), "'neighborhood_prompts' must be a list"),
    (lambda r: r["paraphrase_prompts"].append(3), "'paraphrase_prompts[2]' must be a string"),
])
def test_malformed_counterfact_records_name_record_and_field(mutate, message):
    bad = cf_raw(1)
    mutate(bad)
    with pytest.raises(DatasetError, match=None) as exc:
        convert_counterfact([cf_raw(0), bad])
    assert message in str(exc.value)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("target_new"), "test_cf.json record 1: field 'target_new' is missing"),
    (lambda r: r.update(prompt="Something else is"), "does not contain the subject"),
    (lambda r: r["locality"]["Relation_Specificity"][0].update(ground_truth=[]), "ground_truth' must be a string or"),
    (lambda r: r["portability"].update(Reasoning={"prompt": "x"}), "'portability.Reasoning' must be a list"),
    (lambda r: r.update(portability=[1]), "'portability' must be a JSON object"),
])
def test_malformed_knowedit_records_name_record_and_field(mutate, message):
    bad = ke_raw(1)
    mutate(bad)
    with pytest.raises(DatasetError) as exc:
        convert_knowedit([ke_raw(0), bad])
    assert message in str(exc.value)


def test_top_level_and_json_errors(tmp_path):
    with pytest.raises(DatasetError, match="expected a JSON list"):
        convert_counterfact({"a": 1})
    p = tmp_path / "raw/rome/counterfact.json"
    p.parent.mkdir(parents=True)
    p.write_text("[{")
    with pytest.raises(DatasetError, match="not valid UTF-8 JSON"):
        load_source(RAW_SOURCES["counterfact"], p)


# --------------------------------------------------------------------------------------------- fetch / verify

def _src(name="counterfact", **kw) -> RawSource:
    return RAW_SOURCES[name].with_overrides(**kw)


def test_fetch_prefers_mirror_and_verifies_sha(tmp_path):
    path, sha, size = write_json(tmp_path / "m" / RAW_SOURCES["counterfact"].relpath, [cf_raw(0)])
    got, digest = fetch(_src(sha256=sha, size=size), tmp_path / "m", tmp_path / "dl", offline=True)
    assert got == path and digest == sha
    with pytest.raises(DatasetError) as exc:
        fetch(_src(sha256="0" * 64, size=size), tmp_path / "m", tmp_path / "dl", offline=True)
    msg = str(exc.value)
    assert "sha256 mismatch" in msg and str(path) in msg and "0" * 64 in msg and sha in msg
    assert RAW_SOURCES["counterfact"].url in msg
    local, digest2 = fetch(_src(sha256=sha, size=size), tmp_path / "m", tmp_path / "dl", offline=True,
                           materialize=True)  # `driftbench dataset fetch-raw`: a verified local copy for DVC
    assert local == tmp_path / "dl" / RAW_SOURCES["counterfact"].relpath and local.read_bytes() == path.read_bytes()
    with pytest.raises(DatasetError, match="has .* bytes, expected 45,108,470"):  # the real pinned size
        verify_file(path, RAW_SOURCES["counterfact"])


def test_fetch_offline_without_a_copy_names_file_url_and_mirror_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTBENCH_OFFLINE", "1")
    with pytest.raises(DatasetError) as exc:
        fetch(RAW_SOURCES["knowedit_test_cf"], tmp_path / "m", tmp_path / "dl")
    msg = str(exc.value)
    assert "raw/knowedit/wiki_counterfact/test_cf.json" in msg
    assert "https://huggingface.co/datasets/zjunlp/KnowEdit/resolve/main/benchmark/wiki_counterfact/test_cf.json" in msg
    assert "DRIFTBENCH_DATA_MIRROR" in msg and "not available offline" in msg


class _FileServer:
    """Serves fixed bytes on loopback (stands in for the raw files' URLs)."""

    def __init__(self, files: dict[str, bytes]):
        outer = self
        self.hits = 0

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):  # noqa: N802
                outer.hits += 1
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def test_download_verifies_then_reuses_the_local_copy(tmp_path):
    data = json.dumps([ke_raw(0), ke_raw(1)]).encode()
    sha = hashlib.sha256(data).hexdigest()
    srv = _FileServer({"/test_cf.json": data})
    try:
        src = _src("knowedit_test_cf", url=f"{srv.url}/test_cf.json", sha256=sha, size=len(data))
        path, digest = fetch(src, None, tmp_path / "dl", offline=False)
        assert path.read_bytes() == data and digest == sha and srv.hits == 1
        assert len(load_source(src, path)) == 2
        fetch(src, None, tmp_path / "dl", offline=False)
        assert srv.hits == 1  # second call: the verified local copy, no request

        bad = _src("knowedit_test_cf", url=f"{srv.url}/test_cf.json", sha256="f" * 64, size=None,
                   relpath="other/test_cf.json")
        with pytest.raises(DatasetError, match="sha256 mismatch"):
            fetch(bad, None, tmp_path / "dl", offline=False)
        assert not (tmp_path / "dl/other/test_cf.json").exists()
        assert not list((tmp_path / "dl/other").glob("*.part"))  # nothing partial left behind
        with pytest.raises(DatasetError, match=r"could not download .*HTTP Error 404"):
            fetch(_src("knowedit_train_cf", url=f"{srv.url}/missing.json"), None, tmp_path / "dl", offline=False)
    finally:
        srv.close()


# --------------------------------------------------------------------------------------------- merge

def test_balanced_merge_is_seeded_balanced_and_order_independent():
    cf = convert_counterfact([cf_raw(i) for i in range(10)])
    wd = convert_knowedit([ke_raw(i) for i in range(8)])
    a = balanced_merge(cf, wd, 5, seed=3)
    assert [c.source for c in a] == ["wikidata", "counterfact"] * 5
    assert [c.case_id for c in a] == [c.case_id for c in balanced_merge(cf[::-1], wd[::-1], 5, seed=3)]
    assert [c.case_id for c in a] != [c.case_id for c in balanced_merge(cf, wd, 5, seed=4)]
    assert len(balanced_merge(cf, wd, 0, seed=3)) == 16  # 0 = as many as the smaller source
    with pytest.raises(DatasetError, match="only 10 counterfact and 8 wikidata"):
        balanced_merge(cf, wd, 9, seed=0)


def test_piqa_attachment_uses_gold_labels_and_never_repeats_adjacent(tmp_path):
    write_piqa(tmp_path, n=3)
    items = load_piqa_valid(tmp_path / "piqa/valid.jsonl", tmp_path / "piqa/valid-labels.lst")
    assert items[0] == PiqaItem("How to do thing 0?", "Way A0.", "Way B0.")
    assert items[1] == PiqaItem("How to do thing 1?", "Way B1.", "Way A1.")  # label 1 -> sol2 is right
    cases = convert_counterfact([cf_raw(i) for i in range(40)])
    out = attach_piqa(cases, items, seed=0)
    assert all(a.piqa != b.piqa for a, b in zip(out, out[1:]))
    assert [c.piqa for c in out] == [c.piqa for c in attach_piqa(cases, items, seed=0)]
    (tmp_path / "piqa/valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DatasetError, match="3 items but .* 2 labels"):
        load_piqa_valid(tmp_path / "piqa/valid.jsonl", tmp_path / "piqa/valid-labels.lst")


def test_apply_judgments_drops_related_and_counts_unparseable():
    cases = convert_counterfact([cf_raw(0, related_neighbor=True, garbled_neighbor=True)])

    def label(c, kind, p):
        return "related" if "RELATED" in p.prompt else "unparseable" if "GARBLE" in p.prompt else "unrelated"

    kept, stats = apply_judgments(cases, label, "keep")
    assert [p.prompt for p in kept[0].neighborhood] == ["GARBLE Band 0 plays", "Other Band 0.2 plays"]
    assert stats["counterfact"] == {"family": "neighborhood", "prompts": 3, "related": 1, "unrelated": 1,
                                    "unparseable": 1, "kept": 2, "cases_emptied": 0}
    dropped, stats = apply_judgments(cases, label, "drop")
    assert [p.prompt for p in dropped[0].neighborhood] == ["Other Band 0.2 plays"]
    assert cases[0].neighborhood != dropped[0].neighborhood  # the input is not mutated
    with pytest.raises(DatasetError, match="keep"):
        apply_judgments(cases, label, "guess")


# --------------------------------------------------------------------------------------------- real formats

def test_knowedit_records_in_the_documented_shape():
    """The WikiData_counterfact record and the test_cf Reasoning block as KnowEdit documents them (EasyEdit
    examples/KnowEdit.md): string ground truths, and alias lists where only the first alias is an answer."""
    rec = {"subject": "Frederic Piesch", "prompt": "The name of the position held by Frederic Piesch is",
           "target_new": "Archbishop of Le\u00f3n, Mexico", "ground_truth": "mayor of Vienna",
           "portability": {
               "Subject_Aliasing": [{"prompt": "The name of the position held by Frederic of Pieschen is",
                                     "ground_truth": "Archbishop of Le\u00f3n, Mexico"}],
               "Reasoning": [{"prompt": "The name of the currency in the country of citizenship of Frederic Piesch is",
                              "ground_truth": [["Syrian pound", "SYP", "LS", "Syrian lira"]]},
                             {"prompt": "The official language of the country of citizenship of Frederic Piesch is",
                              "ground_truth": [["Arabic", "ar", "Arabic language"], ["Kurdish", "ku"]]}]},
           "locality": {"Relation_Specificity": [{"prompt": "The gender of Frederic Piesch is", "ground_truth": "male"}],
                        "Forgetfulness": [{"prompt": "The name of the position held by Frederic Piesch, which is not "
                                                     "Archbishop of Le\u00f3n, Mexico, is",
                                           "ground_truth": "mayor of Vienna"}]}}
    (c,) = convert_knowedit([rec])
    assert (c.target_true, c.target_new) == ("mayor of Vienna", "Archbishop of Le\u00f3n, Mexico")
    assert [p.target for p in c.subject_alias] == ["Archbishop of Le\u00f3n, Mexico"]
    assert [p.target for p in c.reasoning] == ["Syrian pound", "Arabic", "Kurdish"]  # no "SYP", no "ar"
    assert [(p.prompt, p.target) for p in c.relation] == [("The gender of Frederic Piesch is", "male")]
    assert c.meta["dropped_probes"] == {"locality.Forgetfulness": 1}


def _raw_from_release(rec: dict) -> tuple[str, dict]:
    """Write one paper-v1 record back in its raw source's format (the inverse of the README's field mapping)."""
    rr = rec["requested_rewrite"]
    pairs = lambda key: list(zip(rec[key]["prompts"], rec[key]["targets"])) if rec.get(key) else []  # noqa: E731
    if "relation_id" in rr:  # CounterFact
        return "counterfact", {
            "case_id": 0, "requested_rewrite": {
                "prompt": rr["prompt"].replace(rr["subject"], "{}", 1), "subject": rr["subject"],
                "relation_id": rr["relation_id"], "target_new": {"str": rr["target_new"], "id": rr["target_new_id"]},
                "target_true": {"str": rr["target_true"], "id": "Q0"}},
            "paraphrase_prompts": [p for p, _ in pairs("p-paraphrase")],
            "neighborhood_prompts": [p for p, _ in pairs("l-neighbor")],
            "attribute_prompts": [], "generation_prompts": rec["generation"]["prompts"]}
    reasoning: dict[str, list] = {}  # duplicate prompts = several answers of one prompt, each with an alias
    for p, t in pairs("p-reasoning"):
        reasoning.setdefault(p, []).append([t, f"alias of {t}"])
    port = {"Reasoning": [{"prompt": p, "ground_truth": g} for p, g in reasoning.items()],
            "Subject_Aliasing": [{"prompt": p, "ground_truth": t} for p, t in pairs("p-subject_alias")]}
    loc = {"Relation_Specificity": [{"prompt": p, "ground_truth": t} for p, t in pairs("l-relation")]}
    return "wikidata", {"subject": rr["subject"], "prompt": rr["prompt"], "target_new": rr["target_new"],
                        "ground_truth": rr["target_true"], "portability": port,
                        "locality": loc if "l-relation" in rec else {}}


def test_every_paper_v1_record_round_trips_through_the_raw_adapters(mirror):
    """For each of the 1,678 release records, a raw record in its source's format maps back onto the same case:
    same content-derived case id, edit and probes. So the adapters reject nothing the paper kept, and a raw-derived
    version shares paper-v1's ids wherever it shares its edits."""
    release = json.loads((mirror / "release/merged_counterfact.json").read_text())
    fields = ("case_id", "source", "subject", "prompt", "target_true", "target_new", "paraphrase", "neighborhood",
              "generation", "subject_alias", "reasoning", "relation")
    counts = {"counterfact": 0, "wikidata": 0}
    for i, rec in enumerate(release):
        want = convert_record(rec, i)
        kind, raw = _raw_from_release(rec)
        (got,) = (convert_counterfact if kind == "counterfact" else convert_knowedit)([raw])
        counts[kind] += 1
        for f in fields:
            assert getattr(got, f) == getattr(want, f), f"release record {i}: field {f} differs"
    assert counts == {"counterfact": 839, "wikidata": 839}
