"""The static leaderboard (leaderboard.site) and submission bundles (leaderboard.submission) on synthetic result
rows: no model, no network. Expected numbers come from evaluators.metrics / evaluators.aggregate (the one place
metric math lives) or are worked out by hand."""
from __future__ import annotations

import hashlib
import html
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from driftbench.cli import main
from basis.io import read_jsonl
from evaluators.aggregate import aggregate
from evaluators.metrics import PROTOCOLS, score_cell
from leaderboard import site as site_mod
from leaderboard.paper import normalise_name, read_paper_csv
from leaderboard.scores import per_case
from leaderboard.site import build_site, collect, render
from leaderboard.submission import (BundleError, load_schema, pack_bundle, read_bundle_files, validate_bundle)
from leaderboard.synthetic import write_result_file

ROOT = Path(__file__).resolve().parents[1]
DATASET = {"version": "paper-v1", "content_id": "db5bf212e166e86f"}
DATASETS = {DATASET["version"]: DATASET["content_id"]}
CARD = {"version": "paper-v1", "content_id": "db5bf212e166e86f", "n_cases": 1678}
GIT = {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False}
PARAMS = {"data": {"version": "paper-v1"},
          "profiles": {"paper": {"models": {"gpt-j-6b": {"ref": "EleutherAI/gpt-j-6B"}},
                                 "hparams": {"gpt-j-6b": {"rome": {"layer": 5, "v_lr": 0.5}}}}}}
PAPER_CSV = """source,model,editor,sadr,ES,EM,PS,PM,RES,NS,NM,RS,RM,DNS,DNM,OS,DOS,FL,PPL,AvgS
paper Table 6,GPT-J-6B,ROME,False,99.88,99.39,99.58,76.93,52.39,80.26,6.04,11.94,3.29,30.43,10.45,74.73,74.37,620.58,68.02,
paper Table 6,GPT-J-6B,ROME,True,99.76,99.26,96.36,53.73,50.42,80.86,6.11,27.75,5.85,49.35,14.16,74.73,74.49,623.00,63.85,
paper Table 7,GPT-J-6B,WISE,False,100.00,,38.60,,,67.12,,25.24,,5.87,,,,480.50,,24.57
"""
N = 24


def cells(tmp: Path, n: int = N) -> list[Path]:
    """Three cells of gpt-j-6b (none, rome, rome+sadr) and one of another model; shared pre-edit probes."""
    d = tmp / "results"
    return [write_result_file(d / "none.jsonl", "paper/gpt-j-6b/none", n),
            write_result_file(d / "rome.jsonl", "paper/gpt-j-6b/rome", n, damage=1.0),
            write_result_file(d / "rome+sadr.jsonl", "paper/gpt-j-6b/rome+sadr", n, damage=0.2),
            write_result_file(d / "tiny-rome.jsonl", "embedded/tiny/rome", n // 2, seed=3)]


def paper_csv(tmp: Path) -> Path:
    p = tmp / "paper_reported.csv"
    p.write_text(PAPER_CSV, encoding="utf-8")
    return p


def bundle(tmp: Path, cell="paper/gpt-j-6b/rome+sadr", name="b", n=N, tar=False, **kw) -> Path:
    res = write_result_file(tmp / f"{name}.jsonl", cell, n, damage=0.2, **kw)
    return pack_bundle(res, tmp / "subs" / name, dataset=DATASET,
                       editor={"version": "1.0", "description": "test editor", "url": "https://example.org/x"},
                       submitter={"name": "A. Tester"}, tar=tar)


def build(tmp: Path, files=None, **kw) -> Path:
    out = tmp / "site"
    kw.setdefault("paper_csv", paper_csv(tmp))
    build_site(files if files is not None else cells(tmp), out, params=PARAMS, card=CARD, git=GIT, **kw)
    return out


def rewrite_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def refresh_hash(folder: Path, name: str) -> None:
    """What a careful forger does after editing a file: update its sha256 in metadata.json."""
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    rewrite_json(folder / "metadata.json", lambda m: m["files"][name].update(sha256=digest))


def rejected(path, datasets=DATASETS, cases=None) -> str:
    with pytest.raises(BundleError) as exc:
        validate_bundle(path, datasets, cases)
    return str(exc.value)


# ------------------------------------------------------------------------------------------------ site: numbers
def test_site_summary_equals_aggregate(tmp_path):
    files = cells(tmp_path)
    out = build(tmp_path, files)
    ours = json.loads((out / "data" / "summary.json").read_text())
    theirs = aggregate(files, tmp_path / "agg.json", tmp_path / "agg.md")
    assert ours == json.loads(json.dumps(theirs))


def test_per_case_counts_pool_to_score_cell(tmp_path):
    rows = list(read_jsonl(cells(tmp_path)[1]))
    pc = per_case(rows, PROTOCOLS)
    assert pc["case_id"] == [r["case_id"] for r in rows]
    for proto in PROTOCOLS:
        for phase in ("pre", "post"):
            official = score_cell(rows, phase, proto)
            for m in pc["metrics"]:
                n, s = sum(pc["n"][phase][m]), sum(pc["s"][proto][phase][m])
                assert n == official[m]["n"]
                if n:
                    assert s / n == pytest.approx(official[m]["mean"], abs=1e-12)
    # drift per case = mean of that case's prompts
    r0 = rows[0]["editor"]["diagnostics"]["attn_drift"]["neighborhood_distracted"]
    assert pc["drift"]["drift_DNS"][0] == pytest.approx(sum(r0) / len(r0), abs=1e-4)


def _section(index: str, model: str) -> str:
    m = re.search(rf'<section class="model" id="[^"]+" data-model="{re.escape(model)}">(.*?)</section>', index, re.S)
    assert m, f"no section for {model}"
    return m.group(1)


def _rows(section: str) -> list[str]:
    return re.findall(r"<tr data-row .*?</tr>", section, re.S)


def test_index_tables_badges_delta_and_chart(tmp_path):
    out = build(tmp_path)
    index = (out / "index.html").read_text()
    gptj, tiny = _section(index, "gpt-j-6b"), _section(index, "tiny")
    # one table per model; the paper's GPT-J-6B rows land in the gpt-j-6b table, next to our reproductions
    assert 'data-origin="paper"' in gptj and 'data-origin="paper"' not in tiny
    assert "badge b-paper" in gptj and ">reported in paper</span>" in gptj
    main_table = gptj.split('<table class="board delta')[0]
    rows = _rows(main_table)
    # pre + none + rome + rome+sadr under 2 protocols, + 3 paper rows under protocol paper only
    assert len(rows) == 4 * 2 + 3
    assert sum('data-origin="paper"' in r for r in rows) == 3
    assert all('data-protocol="paper"' in r for r in rows if 'data-origin="paper"' in r)
    # default order: our rome row directly before the paper's ROME row (same editor, protocol paper)
    paper_rows = [r for r in rows if 'data-protocol="paper"' in r]
    labels = [re.search(r'<th scope="row" data-v="([^"]+)"', r).group(1) for r in paper_rows]
    kinds = [re.search(r'class="k-(\w+)"', r).group(1) for r in paper_rows]
    assert list(zip(labels, kinds))[:6] == [("pre (unedited)", "pre"), ("none", "pipeline"), ("rome", "pipeline"),
                                             ("rome", "paper"), ("rome+sadr", "pipeline"), ("rome+sadr", "paper")]
    # FL/PPL: "–" for our rows (no such metric yet), the paper's values on its rows
    rome_paper = paper_rows[3]
    assert ">620.58<" in rome_paper and ">68.02<" in rome_paper and ">99.88<" in rome_paper
    # SADR delta of our pipeline under protocol paper, ES column: (sadr - plain) * 100
    summ = json.loads((out / "data" / "summary.json").read_text())["cells"]
    d_es = (summ["paper/gpt-j-6b/rome+sadr"]["paper"]["ES"]["mean"] - summ["paper/gpt-j-6b/rome"]["paper"]["ES"]["mean"]) * 100
    delta_table = gptj.split('<table class="board delta')[1].split("</table>")[0]
    ours = [r for r in _rows(delta_table) if 'data-origin="pipeline"' in r and 'data-protocol="paper"' in r]
    assert len(ours) == 1
    first_metric = re.findall(r'<td class="num[^"]*" data-v="([^"]*)">', ours[0])[0]
    assert float(first_metric) == pytest.approx(d_es)
    paper_delta = [r for r in _rows(delta_table) if 'data-origin="paper"' in r]
    assert len(paper_delta) == 1 and ">-0.12<" in paper_delta[0]  # 99.76 - 99.88
    # trade-off charts: one per protocol, with an arrow from rome to rome+sadr
    assert gptj.count('<figure data-protocol="') == 2
    assert gptj.count('class="sadr-arrow mark"') == 3  # ours × 2 protocols + the paper's (protocol paper)
    # every filter value is offered
    for v in ("gpt-j-6b", "tiny", "rome", "paper-v1", "lm-eval"):
        assert f'<option value="{v}">' in index


def test_fl_and_ppl_columns_render_when_score_cell_has_them(tmp_path, monkeypatch):
    import evaluators.aggregate as aggregate_mod  # the site scores cells through aggregate.SummaryBuilder

    real = aggregate_mod.score_cell_protocols

    def with_fluency(rows, phase="post", protocols=()):
        out = real(rows, phase, protocols)
        for scores in out.values():
            scores["FL"] = {"mean": 6.12345, "ci95": 0.015, "n": 7}  # entropy; shown × 100 like the paper
            scores["PPL"] = {"mean": 47.25, "ci95": None, "n": 7}
        return out

    monkeypatch.setattr(aggregate_mod, "score_cell_protocols", with_fluency)
    index = (build(tmp_path) / "index.html").read_text()
    row = [r for r in _rows(_section(index, "tiny")) if 'class="k-pipeline"' in r][0]
    assert "612.35<small>±1.50</small>" in row and ">47.25<" in row


def test_cell_page_provenance_and_drilldown(tmp_path, monkeypatch):
    files = cells(tmp_path)
    monkeypatch.chdir(tmp_path)
    md5 = hashlib.md5(files[1].read_bytes()).hexdigest()
    lock = tmp_path / "dvc.lock"
    lock.write_text(json.dumps({"schema": "2.0", "stages": {"cell@rome": {
        "cmd": "driftbench run-cell -p paper -c rome",
        "deps": [{"path": "data/paper-v1/cases.jsonl", "hash": "md5", "md5": "7cb5cbabc49fffac635f8da8076e97fd",
                  "size": 2326973}],
        "params": {"params.yaml": {"profiles.paper.batch_size": 64}},
        "outs": [{"path": "results/rome.jsonl", "hash": "md5", "md5": md5, "size": 1}]}}}))
    # the optional editors' pipeline keeps its own lock; its stages run at the root (wdir ../..)
    (tmp_path / "pipelines" / "editors").mkdir(parents=True)
    (tmp_path / "pipelines" / "editors" / "dvc.lock").write_text(json.dumps({"schema": "2.0", "stages": {
        "memit_family@rome+sadr": {"cmd": "driftbench run-cell -p paper -c rome+sadr", "deps": [], "params": {},
                                   "outs": [{"path": "results/rome+sadr.jsonl", "md5": "0" * 32, "size": 1}]}}}))
    data = build_site(files, tmp_path / "site", params=PARAMS, card=CARD, git=GIT, root=tmp_path,
                      dvc_lock=[lock, tmp_path / "pipelines" / "editors" / "dvc.lock", tmp_path / "absent.lock"])
    rome = next(e for e in data.entries if e.cell == "paper/gpt-j-6b/rome")
    page = (tmp_path / "site" / rome.href).read_text()
    for text in ("cell@rome", "driftbench run-cell -p paper -c rome", "7cb5cbabc49fffac635f8da8076e97fd",
                 "profiles.paper.batch_size", GIT["commit"], "db5bf212e166e86f", "2.13.0+cpu", "5.23.0", "float32",
                 "matches <code>dvc.lock</code>", '"v_lr": 0.5'):
        assert text in html.unescape(page), text
    sadr = next(e for e in data.entries if e.cell == "paper/gpt-j-6b/rome+sadr")
    sadr_page = html.unescape((tmp_path / "site" / sadr.href).read_text())
    assert "pipelines/editors/dvc.yaml:memit_family@rome+sadr" in sadr_page
    assert "differs from <code>pipelines/editors/dvc.lock</code>" in sadr_page
    assert ("b-warn", "changed since dvc.lock") == sadr.badges[-1][:2]
    # per-case drill-down data embedded as JSON, and the same numbers as CSV
    blob = re.search(r'<script type="application/json" id="case-data">(.*?)</script>', page, re.S).group(1)
    pc = json.loads(blob)
    assert len(pc["case_id"]) == N and set(pc["s"]) == set(PROTOCOLS)
    csv_rows = (tmp_path / "site" / rome.href.replace(".html", ".csv")).read_text().splitlines()
    assert len(csv_rows) == N + 1 and csv_rows[0].startswith("case_id,source,paper.post.ES")


def test_site_is_self_contained(tmp_path):
    out = build(tmp_path)
    pages = [out / "index.html", *sorted((out / "cells").glob("*.html"))]
    for page in pages:
        text = page.read_text()
        assert "Content-Security-Policy" in text and "default-src 'none'" in text
        for tag, attr, url in re.findall(r"<(script|link|img|iframe)\b[^>]*?\b(src|href)=\"([^\"]*)\"", text):
            assert not re.match(r"^[a-z]+:", url) or url == "data:,", f"{page.name}: {tag} loads {url}"
            if not url.startswith("data:"):
                assert (page.parent / url).resolve().is_file(), f"{page.name}: {url} missing"
        for href in re.findall(r'<a [^>]*href="([^"]+)"', text):
            if not re.match(r"^(https?:|#)", href):
                assert (page.parent / href).resolve().is_file(), f"{page.name}: broken link {href}"
    js = (out / "assets" / "leaderboard.js").read_text()
    assert "innerHTML" not in js and "fetch(" not in js and "XMLHttpRequest" not in js and "eval(" not in js


def test_build_replaces_site_atomically(tmp_path, monkeypatch):
    out = build(tmp_path)
    before = (out / "index.html").read_text()

    def broken(data, folder):
        (Path(folder) / "index.html").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(site_mod, "render", broken)
    with pytest.raises(RuntimeError):
        build(tmp_path)
    assert (out / "index.html").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".site")] == []


def test_paper_csv(tmp_path):
    rows = read_paper_csv(paper_csv(tmp_path))
    assert len(rows) == 3 and [r["sadr"] for r in rows] == [False, True, False]
    s = rows[0]["scores"]["paper"]
    assert s["ES"]["mean"] == pytest.approx(0.9988) and s["FL"]["mean"] == pytest.approx(6.2058) and s["AvgS"] is None
    assert rows[2]["scores"]["paper"]["AvgS"] == pytest.approx(0.2457) and rows[2]["scores"]["paper"]["EM"]["mean"] is None
    assert normalise_name("GPT-J-6B") == normalise_name("gpt-j-6b") and normalise_name("Llama3-8B") == "llama38b"
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  ./paper_reported.csv\n")
    with pytest.raises(ValueError, match="sha256"):
        read_paper_csv(tmp_path / "paper_reported.csv")


def test_real_paper_csv_if_mirror_present():
    path = ROOT.parent / "shared" / "data" / "paper_reported.csv"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    rows = read_paper_csv(path)  # verified against the mirror's SHA256SUMS
    assert len(rows) == 40 and {r["model"] for r in rows} >= {"GPT-J-6B", "Llama3-8B", "TinyLlama-1.1B"}


# ------------------------------------------------------------------------------------------------ submissions
def test_pack_and_validate_folder_and_tar(tmp_path):
    folder = bundle(tmp_path)
    b = validate_bundle(folder, DATASETS)
    assert b.metadata["cell"] == "paper/gpt-j-6b/rome+sadr" and b.metadata["editor"]["sadr"] is True
    assert b.metadata["editor"]["name"] == "rome" and len(b.rows) == N
    assert b.summary["post"]["paper"] == score_cell(b.rows, "post", "paper")
    tar1 = bundle(tmp_path, name="t1", tar=True)
    tar2 = bundle(tmp_path, name="t1b", tar=True)
    assert tar1.name == "t1.tar.gz" and validate_bundle(tar1, DATASETS).metadata == b.metadata
    # reproducible archives: same content, same bytes (names aside)
    with tarfile.open(tar1) as t1, tarfile.open(tar2) as t2:
        assert [m.name.split("/")[1] for m in t1] == [m.name.split("/")[1] for m in t2]


def test_validate_rejects_edited_summary(tmp_path):
    folder = bundle(tmp_path)
    rewrite_json(folder / "summary.json", lambda s: s["post"]["paper"]["ES"].update(mean=0.999))
    msg = rejected(folder)
    assert "summary.json" in msg and "sha256" in msg  # caught first by the hash
    refresh_hash(folder, "summary.json")              # a forger who also fixes the hash
    msg = rejected(folder)
    assert "post.paper.ES.mean is 0.999 but the rows give" in msg and "driftbench submit" in msg
    # an edited Avg.S or drift number is caught the same way
    folder = bundle(tmp_path, name="c")
    rewrite_json(folder / "summary.json", lambda s: s["pre"]["lm-eval"].update(AvgS=0.5))
    refresh_hash(folder, "summary.json")
    assert "pre.lm-eval.AvgS is 0.5" in rejected(folder)


def test_validate_rejects_edited_rows(tmp_path):
    folder = bundle(tmp_path)
    lines = (folder / "cases.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["post"]["rewrite"]["right"][0][0] = 0.0  # make the edit "succeed"
    lines[0] = json.dumps(row)
    (folder / "cases.jsonl").write_text("\n".join(lines) + "\n")
    refresh_hash(folder, "cases.jsonl")
    assert "the rows give" in rejected(folder)


def test_validate_rejects_wrong_dataset(tmp_path):
    folder = bundle(tmp_path)
    rewrite_json(folder / "metadata.json", lambda m: m["dataset"].update(version="paper-v0"))
    msg = rejected(folder)
    assert "field 'dataset.version' is 'paper-v0'" in msg and "db5bf212e166e86f" in msg
    rewrite_json(folder / "metadata.json", lambda m: m["dataset"].update(version="paper-v1", content_id="f" * 16))
    msg = rejected(folder)
    assert "field 'dataset.content_id'" in msg and "driftbench dataset build" in msg
    # cases that are not in the dataset
    folder = bundle(tmp_path, name="d")
    msg = rejected(folder, cases={"cf-000000000000": "counterfact"})
    assert "is not a case of the dataset" in msg


@pytest.mark.parametrize("where, path", [("metadata.json", ("submitter",)), ("metadata.json", ("editor", "version")),
                                         ("metadata.json", ("dataset", "content_id")), ("cases.jsonl", ("post",)),
                                         ("cases.jsonl", ("env",)), ("summary.json", ("drift",))])
def test_validate_rejects_missing_field(tmp_path, where, path):
    folder = bundle(tmp_path)
    if where == "cases.jsonl":
        lines = (folder / where).read_text().splitlines()
        row = json.loads(lines[2])
        del row[path[0]]
        lines[2] = json.dumps(row)
        (folder / where).write_text("\n".join(lines) + "\n")
    else:
        def drop(obj):
            for k in path[:-1]:
                obj = obj[k]
            del obj[path[-1]]
        rewrite_json(folder / where, drop)
    if where != "metadata.json":
        refresh_hash(folder, where)
    msg = rejected(folder)
    assert f"'{path[-1]}' is a required property" in msg
    assert (f"{where}: row 3" if where == "cases.jsonl" else f"{where}: field") in msg


def test_validate_rejects_script_editor_name(tmp_path):
    folder = bundle(tmp_path)
    evil = "<script>alert(1)</script>"
    rewrite_json(folder / "metadata.json", lambda m: (m["editor"].update(name=evil),
                                                      m.update(cell=f"paper/gpt-j-6b/{evil}+sadr")))
    msg = rejected(folder)
    assert "field 'editor.name'" in msg and "does not match" in msg


def test_validate_rejects_other_problems(tmp_path):
    folder = bundle(tmp_path)
    rewrite_json(folder / "metadata.json", lambda m: m.update(protocol_ids=["paper", "bleu"]))
    assert "field 'protocol_ids.1'" in rejected(folder)
    folder = bundle(tmp_path, name="e")
    rewrite_json(folder / "metadata.json", lambda m: m["editor"].update(url="javascript:alert(1)"))
    assert "field 'editor.url'" in rejected(folder)
    folder = bundle(tmp_path, name="f")
    (folder / "run.sh").write_text("echo hi")
    assert "run.sh: not part of a bundle" in rejected(folder)
    (folder / "run.sh").unlink()
    rewrite_json(folder / "metadata.json", lambda m: m.update(cell="paper/gpt-j-6b/other"))
    assert "field 'cell'" in rejected(folder)
    # an archive with a path outside its folder
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        data = b"{}"
        ti = tarfile.TarInfo("../../metadata.json")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    with pytest.raises(BundleError, match="not part of a bundle"):
        read_bundle_files(evil)


def test_schema_protocol_ids_match_metrics():
    from jsonschema import Draft202012Validator

    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert sorted(schema["properties"]["protocol_ids"]["items"]["enum"]) == sorted(PROTOCOLS)


def test_example_bundle_validates():
    folder = ROOT / "leaderboard" / "examples" / "example-synthetic"
    cases_file = ROOT / "data" / "paper-v1" / "cases.jsonl"
    from leaderboard.submission import dataset_cases

    b = validate_bundle(folder, DATASETS, dataset_cases(cases_file) if cases_file.is_file() else None)
    assert b.metadata["editor"]["name"] == "example-synthetic" and "EXAMPLE" in b.metadata["editor"]["description"]


# ------------------------------------------------------------------------------------------------ submissions on the site
def test_submissions_badged_verified_or_self_reported(tmp_path):
    files = cells(tmp_path)
    subs = tmp_path / "subs"
    # packed from the pipeline's own result file -> reproduced; a different run of the same cell -> self-reported
    pack_bundle(files[2], subs / "same", dataset=DATASET, editor={"version": "1"}, submitter={"name": "x"})
    bundle(tmp_path, name="other", seed=9)
    data = build_site(files, tmp_path / "site", submissions_dir=subs, params=PARAMS, card=CARD, git=GIT)
    badges = {Path(e.key).name: [b[1] for b in e.badges] for e in data.entries if e.kind == "submission"}
    assert badges == {"same": ["verified"], "other": ["self-reported"]}
    index = (tmp_path / "site" / "index.html").read_text()
    sub_rows = [r for r in _rows(index) if 'data-origin="submission"' in r]
    assert len(sub_rows) == 4  # two bundles × two protocols
    assert sum(">verified</span>" in r for r in sub_rows) == sum(">self-reported</span>" in r for r in sub_rows) == 2


def test_invalid_bundle_fails_build_or_is_left_out(tmp_path):
    files = cells(tmp_path)
    folder = bundle(tmp_path)
    rewrite_json(folder / "summary.json", lambda s: s["post"]["paper"]["ES"].update(mean=1.0))
    refresh_hash(folder, "summary.json")
    with pytest.raises(BundleError):
        build_site(files, tmp_path / "site", submissions_dir=tmp_path / "subs", params=PARAMS, card=CARD, git=GIT)
    data = build_site(files, tmp_path / "site", submissions_dir=tmp_path / "subs", params=PARAMS, card=CARD,
                      git=GIT, on_invalid="skip")
    assert not [e for e in data.entries if e.kind == "submission"] and len(data.rejected) == 1
    assert "Submissions left out" in (tmp_path / "site" / "index.html").read_text()


EVIL = "<script>window.__pwned=1</script>"


def test_script_editor_name_renders_inert(tmp_path):
    """validate() rejects such a name; should one reach the renderer anyway, it is escaped everywhere."""
    files = cells(tmp_path)
    bundle(tmp_path)
    data = collect(files, submissions_dir=tmp_path / "subs", params=PARAMS, card=CARD, git=GIT)
    sub = next(e for e in data.entries if e.kind == "submission")
    meta = sub.page["provenance"]["metadata"]
    sub.editor = sub.base_editor = EVIL
    sub.cell = meta["cell"] = f"paper/gpt-j-6b/{EVIL}"
    meta["editor"]["name"] = EVIL
    meta["editor"]["description"] = '<img src=x onerror="window.__pwned=2">' + EVIL
    meta["editor"]["url"] = "javascript:window.__pwned=3"
    sub.page["per_case"]["case_id"][0] = EVIL
    out = tmp_path / "site"
    out.mkdir()
    render(data, out)
    index, page = (out / "index.html").read_text(), (out / sub.href).read_text()
    for text in (index, page):
        assert "<script>window.__pwned" not in text and "<img src=x" not in text
        assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in text
    assert 'href="javascript:' not in page and "javascript:window.__pwned=3" not in page
    # inside the JSON data block the tag cannot close the block
    blob = re.search(r'<script type="application/json" id="case-data">(.*?)</script>', page, re.S).group(1)
    assert "\\u003cscript\\u003e" in blob and json.loads(blob)["case_id"][0] == EVIL
    # the only <script> elements are the data block and the site's own file
    for text in (index, page):
        for tag in re.findall(r"<script\b[^>]*>", text):
            assert tag in ('<script src="assets/leaderboard.js">', '<script src="../assets/leaderboard.js">',
                           '<script type="application/json" id="case-data">')


def test_pipeline_result_with_html_in_cell_id_is_escaped(tmp_path):
    """HTML in the free-form model part of a cell id is escaped on every page; in the cell name it is refused (the
    grammar of basis/cells.py allows letters, digits, '-', '_' only)."""
    from evaluators.aggregate import ResultFileError

    evil = "<img src=x onerror=alert(1)>"
    named = write_result_file(tmp_path / "n.jsonl", "embedded/tiny/rome", 4)
    named.write_text(named.read_text().replace('"embedded/tiny/rome"', f'"embedded/tiny/{evil}"'))
    (tmp_path / "refused").mkdir()
    with pytest.raises(ResultFileError, match="is not a cell name"):
        build(tmp_path / "refused", [named], paper_csv=None)
    files = [write_result_file(tmp_path / "e.jsonl", f"embedded/{evil}/rome", 4)]
    out = build(tmp_path, files, paper_csv=None)
    for page in [out / "index.html", *(out / "cells").glob("*.html")]:
        text = page.read_text()
        assert "<img src=x" not in text


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("cmd, words", [
    ("leaderboard", ["static leaderboard", "--results", "--submissions", "--paper-csv", "--skip-invalid", "file://"]),
    ("submit", ["submission bundle", "--cell", "--submitter", "--plugin", "--tar"]),
    ("validate", ["JSON Schema", "dataset version", "recomputed", "BUNDLE"]),
])
def test_cli_help(cmd, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for w in words:
        assert w in text, w


def _project(tmp_path: Path) -> Path:
    """A minimal project folder: params.yaml, the dataset card and one embedded cell."""
    (tmp_path / "data" / "paper-v1").mkdir(parents=True)
    (tmp_path / "data" / "paper-v1" / "card.json").write_text(json.dumps(CARD))
    (tmp_path / "params.yaml").write_text(json.dumps({
        "data": {"version": "paper-v1", "out": "data/paper-v1", "mirror": str(tmp_path)},
        "profiles": {"embedded": {"models": {"tiny": {"ref": "x"}}, "cells": ["rome"],
                                  "hparams": {"tiny": {"rome": {"layer": 1}}}}}}))
    write_result_file(tmp_path / "results" / "embedded" / "tiny" / "cells" / "rome.jsonl", "embedded/tiny/rome", 6)
    paper_csv(tmp_path)
    return tmp_path


def test_cli_submit_validate_leaderboard(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_project(tmp_path))
    monkeypatch.delenv("DRIFTBENCH_DATA_MIRROR", raising=False)
    assert main(["submit", "-p", "embedded", "-c", "rome", "--submitter", "Me", "--editor-version", "2.0"]) == 0
    folder = tmp_path / "leaderboard" / "submissions" / "embedded__tiny__rome"
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["editor"]["hparams"] == {"layer": 1} and meta["editor"]["version"] == "2.0"
    assert main(["validate", str(folder)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["leaderboard", "-p", "embedded", "--quiet"]) == 0
    assert (tmp_path / "site" / "index.html").is_file()
    assert "1 pipeline cells, 1 submissions, 3 paper rows, 8 rows of other papers' tables" in capsys.readouterr().out
    rewrite_json(folder / "metadata.json", lambda m: m["dataset"].update(content_id="0" * 16))
    assert main(["validate", str(folder)]) == 2  # one line per rejected bundle, then the count
    err = capsys.readouterr().err
    assert "REJECTED" in err and "error: 1 of 1 bundle" in err
    assert main(["leaderboard", "-p", "embedded", "--quiet"]) == 2
    assert "skip-invalid" in capsys.readouterr().err


def test_leaderboard_adds_the_optional_cells_that_have_been_run(tmp_path, monkeypatch, capsys):
    """extra_cells (pipelines/editors/dvc.yaml) join the site when their file exists; --cells default leaves them out;
    aggregate --cells all requires every one."""
    project = _project(tmp_path)
    params = json.loads((project / "params.yaml").read_text())
    params["profiles"]["embedded"]["extra_cells"] = ["rome+steps", "memit"]
    (project / "params.yaml").write_text(json.dumps(params))
    write_result_file(project / "results" / "embedded" / "tiny" / "cells" / "rome+steps.jsonl",
                      "embedded/tiny/rome+steps", 6)
    monkeypatch.chdir(project)
    monkeypatch.delenv("DRIFTBENCH_DATA_MIRROR", raising=False)
    assert main(["leaderboard", "-p", "embedded", "--no-paper"]) == 0
    out = capsys.readouterr().out
    assert "2 pipeline cells" in out and "1 optional cell(s) not run yet" in out
    assert main(["leaderboard", "-p", "embedded", "--no-paper", "--cells", "default", "--quiet"]) == 0
    assert "1 pipeline cells" in capsys.readouterr().out
    assert main(["aggregate", "-p", "embedded", "--cells", "all"]) == 2
    assert "memit.jsonl" in capsys.readouterr().err


def test_leaderboard_room_never_imports_torch(tmp_path):
    """design.md §2: the leaderboard reads result files only; building a site must not pull in torch/transformers."""
    import subprocess
    import sys

    code = ("import sys, json; from pathlib import Path; from leaderboard.site import build_site; "
            "from leaderboard.synthetic import write_result_file; import driftbench.cli; "
            f"p = write_result_file(Path({str(tmp_path)!r}) / 'r.jsonl', 'embedded/tiny/rome', 3); "
            f"build_site([p], Path({str(tmp_path)!r}) / 'site', git={{'commit': 'unknown', 'dirty': None}}); "
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules)))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_a_stream_cell_gets_its_own_protocol_table_and_labelled_group(tmp_path):
    """Issue 12: a sequential cell's evaluation timing is part of its protocol id, summary.md gives it a table of its
    own, and the site lists it apart with the regime as a badge; single-edit tables are unchanged by it."""
    files = cells(tmp_path)
    stream = write_result_file(tmp_path / "results" / "memit.seq16.jsonl", "paper/gpt-j-6b/memit.seq16", N,
                               damage=0.6)
    alone = aggregate(files, tmp_path / "a.json", tmp_path / "a.md")
    both = aggregate(files + [stream], tmp_path / "b.json", tmp_path / "b.md")
    entry = both["cells"]["paper/gpt-j-6b/memit.seq16"]
    assert entry["mode"] == "seq16-final" and entry["paper"]["protocol"] == "paper+seq16-final"
    assert "mode" not in both["cells"]["paper/gpt-j-6b/rome"]
    assert alone["cells"]["paper/gpt-j-6b/rome"] == both["cells"]["paper/gpt-j-6b/rome"]
    md_a, md_b = (tmp_path / "a.md").read_text(), (tmp_path / "b.md").read_text()
    assert "### paper/gpt-j-6b — protocol `paper+seq16-final` (sequential stream of 16 edits, evaluated after all " \
           "16 edits; not comparable with single edits)" in md_b
    single = md_b.split("### paper/gpt-j-6b — protocol `paper`")[1].split("###")[0]
    assert "| memit.seq16 |" not in single and single in md_a  # the single-edit table is as before
    out = build(tmp_path, files + [stream], paper_csv=None)
    index = (out / "index.html").read_text()
    assert "seq16-final: sequential stream of 16 edits, evaluated after all 16 edits" in html.unescape(index)


def test_other_papers_tables_get_their_regime_table_and_never_pool_with_single_edits(tmp_path):
    """leaderboard/reported/alphaedit_table1.csv: AlphaEdit's sequential numbers (2,000 CounterFact edits in batches
    of 100) appear, labelled with their regime and dataset, in a table of their own."""
    from leaderboard.site import REPORTED

    rows = read_paper_csv(REPORTED / "alphaedit_table1.csv", verify=False)
    assert len(rows) == 8 and {r["regime"] for r in rows} == {"seq2000-batch100"}
    assert {r["dataset"] for r in rows} == {"counterfact"}
    alpha = next(r for r in rows if r["editor"] == "AlphaEdit" and r["model"] == "GPT-J-6B")["scores"]["paper"]
    assert alpha["ES"]["mean"] == pytest.approx(0.9975) and alpha["NS"]["mean"] == pytest.approx(0.7548)
    assert alpha["DNS"]["mean"] is None and alpha["FL"]["mean"] == pytest.approx(6.185)
    out = build(tmp_path)
    html = (out / "index.html").read_text()
    assert "seq2000-batch100 (AlphaEdit Table 1; dataset counterfact)" in html
    bad = tmp_path / "bad.csv"
    bad.write_text((REPORTED / "alphaedit_table1.csv").read_text().replace("seq2000-batch100", "2000 seq", 1))
    with pytest.raises(ValueError, match="column 'regime'"):
        read_paper_csv(bad, verify=False)
