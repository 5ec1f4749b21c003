"""Relatedness judge through the real `openai` client against a loopback OpenAI-compatible server, and the full
raw → merge → judge → artifact build (no network: loopback only).
"""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.artifact import PARQUET_FILE, build_from_raw, judge_release, raw_config
from data_pipeline.judge import Judge, JudgeConfig, JudgeError, JudgmentCache, cache_key, parse_answer
from openai_stub import OpenAIStub
from test_raw_sources import write_raw_mirror

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "DRIFTBENCH_TEST_JUDGE_KEY"
SECRET = "sk-test-SECRET-7f3a9"


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


@pytest.fixture
def stub():
    with OpenAIStub() as s:
        yield s


def cfg_for(stub_or_url, tmp_path: Path, **kw) -> JudgeConfig:
    url = stub_or_url if isinstance(stub_or_url, str) else stub_or_url.base_url
    base = dict(model="judge-test", base_url=url, api_key_env=KEY_ENV, concurrency=4, max_retries=4,
                backoff_base=0.01, backoff_max=0.05, timeout=5.0, cache=str(tmp_path / "judgments.jsonl"))
    base.update(kw)
    return JudgeConfig(**base)


def prompt(i: int, tag: str = "") -> str:
    return f"Question {i}\nNeighbourhood test: {tag}Other Band {i} plays jazz\nAnswer with one word."


def run(cfg: JudgeConfig, prompts, **kw):
    with JudgmentCache(cfg.cache) as cache:
        judge = Judge(cfg, cache)
        return judge.run(prompts, **kw), judge.last_stats


# --------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, label", [
    ("related", "related"), ("Unrelated.", "unrelated"), ('"related"', "related"), ("Answer: unrelated", "unrelated"),
    ("  RELATED!\n", "related"), ("**Unrelated**", "unrelated"), ("not related", "unparseable"),
    ("related or unrelated", "unparseable"), ("The subject is unrelated.", "unparseable"), ("", "unparseable"),
    (None, "unparseable"),
])
def test_parse_answer_never_guesses(text, label):
    assert parse_answer(text) == label


# --------------------------------------------------------------------------------------------- transport

def test_real_client_against_loopback_with_429_500_and_slow(stub, tmp_path, key):
    stub.slow_s = 1.2
    stub.faults["FLAKY"] = ["429", "500", "slow"]
    ps = [prompt(0), prompt(1, "FLAKY "), prompt(2, "RELATED "), prompt(3, "GARBLE ")]
    labels, st = run(cfg_for(stub, tmp_path, timeout=0.5), ps)
    assert labels == {ps[0]: "unrelated", ps[1]: "unrelated", ps[2]: "related", ps[3]: "unparseable"}
    assert stub.counts[ps[1]] == 4 and all(stub.counts[p] == 1 for p in (ps[0], ps[2], ps[3]))
    assert (st.rate_limited, st.server_errors, st.timeouts, st.retries, st.asked) == (1, 1, 1, 3, 4)
    assert st.prompt_tokens > 0 and st.completion_tokens > 0  # usage from the server
    assert stub.auth_headers == {f"Bearer {SECRET}"}  # the key came from the environment …
    rows = [json.loads(x) for x in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and SECRET not in (tmp_path / "judgments.jsonl").read_text()  # … and is never cached
    garbled = next(r for r in rows if "GARBLE" in r["prompt"])
    assert garbled["answer"] == "Hmm, it depends on the context." and garbled["label"] == "unparseable"
    assert garbled["key"] == cache_key("judge-test", ps[3]) and garbled["usage"]["prompt_tokens"] > 0


def test_retries_exhausted_and_non_retryable_errors(stub, tmp_path, key):
    stub.faults["DOWN"] = ["500"] * 10
    ps = [prompt(0), prompt(1, "DOWN ")]
    with pytest.raises(JudgeError, match="still failing after 2 retries .*HTTP 500.*cached"):
        run(cfg_for(stub, tmp_path, max_retries=2, concurrency=1), ps)
    assert stub.counts[ps[1]] == 3
    with JudgmentCache(tmp_path / "judgments.jsonl") as c:  # the good answer was kept
        assert c.get(cache_key("judge-test", ps[0])) is not None
    stub.faults["AUTH"] = ["401"]
    with pytest.raises(JudgeError) as exc:
        run(cfg_for(stub, tmp_path), [prompt(5, "AUTH ")])
    assert "HTTP 401" in str(exc.value) and "not retried" in str(exc.value) and SECRET not in str(exc.value)
    assert stub.counts[prompt(5, "AUTH ")] == 1


def test_empty_answers_are_retried_and_never_cached(stub, tmp_path, key):
    """Issue 11 item 4: ``choices: []`` or ``content: null`` is not an answer: retried, never cached (it used to be
    cached forever as 'unparseable'); an old cache row without a text answer is asked again."""
    stub.faults["EMPTY"] = ["empty", "null"]
    ps = [prompt(0), prompt(1, "EMPTY ")]
    labels, st = run(cfg_for(stub, tmp_path, max_retries=3), ps)
    assert labels == {ps[0]: "unrelated", ps[1]: "unrelated"} and stub.counts[ps[1]] == 3
    assert st.server_errors == 2 and st.retries == 2
    rows = [json.loads(x) for x in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["answer"], str) for r in rows)
    # all retries used up on empty answers: an error, and nothing cached for that prompt
    stub.faults["NONE"] = ["empty"] * 5
    with pytest.raises(JudgeError, match="no choices"):
        run(cfg_for(stub, tmp_path, max_retries=1), [prompt(2, "NONE ")])
    assert len((tmp_path / "judgments.jsonl").read_text().splitlines()) == 2
    # a row an older version cached from an empty answer does not count as cached
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"key": cache_key("judge-test", ps[0]), "model": "judge-test", "prompt": ps[0],
                                "answer": None, "label": "unparseable"}) + "\n")
    with JudgmentCache(path) as c:
        assert c.get(cache_key("judge-test", ps[0])) is None


def test_corrupt_cache_line_is_an_error_and_keeps_every_answer(stub, tmp_path, key):
    """Issue 11 item 3: a merge-conflict marker after line 1 used to cut an 11-answer cache to 1 answer."""
    ps = [prompt(i) for i in range(11)]
    run(cfg_for(stub, tmp_path), ps)
    path = tmp_path / "judgments.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"<<<<<<< HEAD\n" + b"".join(lines[1:]))
    before = path.read_bytes()
    with pytest.raises(Exception, match=f"{path}:2: not valid JSON"):
        run(cfg_for(stub, tmp_path), ps)
    with pytest.raises(Exception, match=f"{path}:2"):
        JudgmentCache(path, readonly=True)
    assert path.read_bytes() == before
    path.write_bytes(b"".join(lines))  # the conflict resolved: every answer is there, nothing is asked again
    n = sum(stub.counts.values())
    labels, st = run(cfg_for(stub, tmp_path), ps, mode="replay")
    assert len(labels) == 11 and sum(stub.counts.values()) == n


def test_concurrency_is_bounded(stub, tmp_path, key):
    stub.delay = 0.08
    ps = [prompt(i) for i in range(12)]
    t0 = time.perf_counter()
    run(cfg_for(stub, tmp_path, concurrency=3), ps)
    assert 2 <= stub.max_in_flight <= 3
    assert time.perf_counter() - t0 < 12 * 0.08  # really concurrent


def test_replay_dry_run_missing_key_and_offline_rerun(stub, tmp_path, key, monkeypatch):
    ps = [prompt(i) for i in range(3)] + [prompt(0)]  # a duplicate prompt is asked once
    cfg = cfg_for(stub, tmp_path)
    with pytest.raises(JudgeError, match=r"replay mode: 3 of 3 judge prompts are not in the cache .*Other Band 0"):
        run(cfg, ps, mode="replay")
    with JudgmentCache(cfg.cache) as c:
        est = Judge(cfg, c).estimate(ps)
    assert (est["prompts"], est["unique_prompts"], est["cached"], est["to_ask"]) == (4, 3, 0, 3)
    assert est["est_prompt_tokens"] > 0 and est["est_cost_usd"] > 0
    assert sum(stub.counts.values()) == 0  # neither replay nor the estimate asked anything
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=f"API key in the environment variable {KEY_ENV}"):
        run(cfg, ps)
    monkeypatch.setenv(KEY_ENV, SECRET)
    run(cfg, ps)
    assert sum(stub.counts.values()) == 3
    stub.stop()
    monkeypatch.delenv(KEY_ENV)  # everything cached: no key, no server needed
    labels, st = run(cfg_for("http://127.0.0.1:9/v1", tmp_path), ps, mode="replay")
    assert set(labels.values()) == {"unrelated"} and st.asked == 0 and st.cache_hits == 3


KILL_SCRIPT = """
import json, sys
from data_pipeline.judge import Judge, JudgeConfig, JudgmentCache
prompts = json.load(open(sys.argv[1]))
cfg = JudgeConfig(model="judge-test", base_url=sys.argv[2], cache=sys.argv[3], api_key_env=%r, concurrency=2,
                  backoff_base=0.01)
with JudgmentCache(cfg.cache) as c:
    Judge(cfg, c).run(prompts)
print("finished")
""" % KEY_ENV


def test_kill_during_judging_loses_no_answer_and_reasks_nothing_cached(stub, tmp_path, key):
    stub.delay = 0.1
    ps = [prompt(i) for i in range(40)]
    (tmp_path / "prompts.json").write_text(json.dumps(ps))
    cache = tmp_path / "judgments.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "prompts.json"), stub.base_url,
                             str(cache)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while time.time() < deadline and (not cache.exists() or cache.read_text().count("\n") < 6):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and b"finished" not in out, err.decode()[-2000:]
    asked_before = sum(stub.counts.values())
    with open(cache, "ab") as fh:
        fh.write(b'{"key": "torn')  # a torn tail (what a kill inside a write would leave) is dropped on open
    before = {json.loads(x)["prompt"] for x in cache.read_text().splitlines()[:-1]}
    assert 6 <= len(before) < 40 and before <= set(ps)

    labels, st = run(cfg_for(stub, tmp_path, concurrency=4), ps)
    assert len(labels) == 40 and st.cache_hits == len(before)
    assert all(stub.counts[p] == 1 for p in before)  # nothing already cached was asked again
    assert sum(stub.counts.values()) <= 40 + 2  # at most the 2 requests in flight at the kill are repeated
    assert sum(stub.counts.values()) == asked_before + st.asked
    rows = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(rows) == 40 and len({r["key"] for r in rows}) == 40  # no lost, no duplicated answer


# --------------------------------------------------------------------------------------------- full build

def build_cfg(tmp_path: Path, stub_url: str, overrides: dict, out: str) -> dict:
    return raw_config({"data_raw": {
        "version": "raw-test", "out": str(tmp_path / out), "download_dir": str(tmp_path / "dl"),
        "source_overrides": overrides["source_overrides"], "piqa": {**overrides["piqa"], "seed": 5},
        "merge": {"n_per_source": 4, "seed": 11},
        "judge": {"model": "judge-test", "base_url": stub_url, "api_key_env": KEY_ENV, "concurrency": 3,
                  "backoff_base": 0.01, "cache": str(tmp_path / "cache/judgments.jsonl")}}})


def test_full_build_from_raw_fixtures_then_offline_byte_identical_rerun(stub, tmp_path, key, capsys, monkeypatch):
    mirror = tmp_path / "mirror"
    overrides = write_raw_mirror(mirror)
    stub.faults["Other Band 2.1"] = ["429", "500"]
    cfg = build_cfg(tmp_path, stub.base_url, overrides, "a")

    est = build_from_raw(cfg, mirror, dry_run=True, offline=True)
    assert est["to_ask"] > 0 and sum(stub.counts.values()) == 0  # --dry-run asks nothing …
    assert not (tmp_path / "cache").exists() and not (tmp_path / "a").exists()  # … and writes nothing
    card = build_from_raw(cfg, mirror, offline=True)
    asked = sum(stub.counts.values())
    assert card["n_cases"] == 8 and card["by_source"]["counterfact"]["cases"] == 4
    assert card["merge"]["available"] == {"counterfact": 6, "wikidata": 7}  # test/train overlap counted once
    cf, wd = card["judge"]["summary"]["counterfact"], card["judge"]["summary"]["wikidata"]
    assert cf["prompts"] == 12 and cf["related"] + cf["unrelated"] + cf["unparseable"] == 12
    assert (cf["related"], cf["unparseable"], cf["kept"]) == (1, 1, 11)  # unparseable kept (policy keep), counted
    assert wd["family"] == "relation" and (wd["prompts"], wd["related"], wd["kept"]) == (8, 1, 7)
    assert stub.statuses[429] == 1 and stub.statuses[500] == 1  # the build went through retried errors
    assert card["dropped_probes"] == {"locality.Forgetfulness": 4, "portability.Logical_Generalization": 4}
    out = tmp_path / "a"
    cases = [json.loads(x) for x in (out / "cases.jsonl").read_text().splitlines()]
    assert [c["source"] for c in cases] == ["wikidata", "counterfact"] * 4
    assert not any("RELATED" in p for c in cases for p, _ in c["neighborhood"] + c["relation"])  # related dropped
    assert all(c["piqa"] for c in cases)
    judg = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judg) == 20 and {j["label"] for j in judg} <= {"related", "unrelated", "unparseable"}
    assert card["content_id"] == __import__("hashlib").sha256((out / "cases.jsonl").read_bytes()).hexdigest()[:16]
    assert "judge-test" in (out / "card.md").read_text()

    # the parquet export is readable by datasets.load_dataset
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out / PARQUET_FILE), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 8 and ds[1]["case_id"] == cases[1]["case_id"]
    assert ds[1]["neighborhood"][0]["target"] == "jazz" and ds[0]["piqa"]["goal"] == cases[0]["piqa"]["goal"]

    # rerun with the server stopped and no key: no request, byte-identical artifact (live and replay modes)
    stub.stop()
    monkeypatch.delenv(KEY_ENV)
    # (another base_url, or none: the card names the endpoint that answered, which the cache recorded)
    assert card["judge"]["endpoints"] == [stub.base_url]
    for mode, name, base_url in (("live", "b", stub.base_url), ("replay", "c", None),
                                 ("live", "e", "http://127.0.0.1:9/v1")):
        cfg2 = build_cfg(tmp_path, base_url, overrides, name)
        build_from_raw(cfg2, mirror, mode=mode, offline=True)
        files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file())
        for f in files:
            assert (out / f).read_bytes() == (tmp_path / name / f).read_bytes(), f
    assert sum(stub.counts.values()) == asked
    # a changed judge model is a different cache key: replay refuses instead of reusing another model's answers
    cfg3 = build_cfg(tmp_path, stub.base_url, overrides, "d")
    cfg3["judge"]["model"] = "another-model"
    with pytest.raises(JudgeError, match="replay mode: 20 of 20"):
        build_from_raw(cfg3, mirror, mode="replay", offline=True)
    assert not (tmp_path / "d").exists()  # nothing partial written
    everything = capsys.readouterr()
    assert SECRET not in everything.out + everything.err
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.suffix in (".jsonl", ".json", ".md", ".parquet"):
            assert SECRET.encode() not in p.read_bytes(), p


def test_judge_release_counts_related_prompts(stub, tmp_path, key):
    from data_pipeline.raw import convert_counterfact, convert_knowedit
    from test_raw_sources import cf_raw, ke_raw

    cases = convert_counterfact([cf_raw(0, related_neighbor=True)]) + convert_knowedit([ke_raw(0)])
    rep = judge_release(cases, cfg_for(stub, tmp_path))
    assert rep["by_source"]["counterfact"] == {"family": "neighborhood", "prompts": 3, "related": 1, "unrelated": 2,
                                               "unparseable": 0, "cases_with_related": 1}
    assert rep["by_source"]["wikidata"]["prompts"] == 2 and rep["by_source"]["wikidata"]["related"] == 0


def test_cli_build_raw_dry_run_build_and_replay(stub, tmp_path, key, capsys, monkeypatch):
    import yaml

    from driftbench.cli import main

    mirror = tmp_path / "mirror"
    overrides = write_raw_mirror(mirror)
    data_raw = build_cfg(tmp_path, stub.base_url, overrides, "cli")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"mirror": str(mirror), "out": str(tmp_path / "paper")},
                                      "data_raw": data_raw}))
    monkeypatch.delenv("DRIFTBENCH_DATA_MIRROR", raising=False)
    main(["--params", str(params), "dataset", "build-raw", "--offline", "--dry-run", "--no-progress"])
    assert '"to_ask": 20' in capsys.readouterr().out
    main(["--params", str(params), "dataset", "build-raw", "--offline", "--no-progress", "--concurrency", "2"])
    assert "content id" in capsys.readouterr().out and stub.max_in_flight <= 2
    first = (tmp_path / "cli/cases.jsonl").read_bytes()
    stub.stop()
    main(["--params", str(params), "dataset", "build-raw", "--offline", "--replay", "--no-progress"])
    assert (tmp_path / "cli/cases.jsonl").read_bytes() == first
    assert main(["--params", str(params), "dataset", "build-raw", "--offline", "--replay", "--model", "other"]) == 2
    assert re.search("^error: replay mode: 20 of 20 .* model other", capsys.readouterr().err)
    assert main(["--params", str(params), "dataset", "build-raw", "--offline", "--downloads-only", "--dry-run"]) == 2
    assert re.search("^error: raw file .*not available offline.*DRIFTBENCH_DATA_MIRROR", capsys.readouterr().err)


# --------------------------------------------------------------------------------------------- the DVC stages

def test_raw_dvc_pipeline_runs_then_reruns_offline_byte_identical(stub, tmp_path, key):
    """`dvc repro pipelines/raw/dvc.yaml` as written (stage commands, params, deps, outs) on a fixture mirror: the
    first run asks the loopback judge; with the server stopped, a rebuild of the deleted artifact asks nothing and
    is byte-identical, and a third run finds everything up to date."""
    import yaml

    repo, mirror = tmp_path / "repo", tmp_path / "mirror"
    for rel in ("params.yaml", "pipelines/raw/dvc.yaml", *(p.relative_to(ROOT).as_posix()
                                                          for p in (ROOT / "data_pipeline").glob("*.py"))):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes((ROOT / rel).read_bytes())
    overrides = write_raw_mirror(mirror)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["mirror"] = str(mirror)
    raw = params["data_raw"]
    raw["source_overrides"] = overrides["source_overrides"]
    raw["piqa"].update(overrides["piqa"])
    raw["merge"]["n_per_source"] = 4
    raw["judge"].update(base_url=stub.base_url, api_key_env=KEY_ENV, model="judge-test")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "DRIFTBENCH_DATA_MIRROR": str(mirror)}
    env.pop("DRIFTBENCH_OFFLINE", None)

    def sh(*cmd):
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
        return r.stdout + r.stderr

    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    sh(sys.executable, "-m", "dvc", "repro", "pipelines/raw/dvc.yaml")
    asked = sum(stub.counts.values())
    out = repo / "data/raw-v1"
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    card = json.loads(first[Path("card.json")])
    assert asked == 20 and card["n_cases"] == 8 and card["judge"]["endpoints"] == [stub.base_url]
    assert (repo / "data/downloads/raw/rome/counterfact.json").is_file()  # raw_fetch materialised the mirror copy
    assert (repo / "pipelines/raw/dvc.lock").is_file()

    stub.stop()
    for p in sorted(out.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    out.rmdir()
    log = sh(sys.executable, "-m", "dvc", "repro", "pipelines/raw/dvc.yaml")
    assert "0 to ask" in log
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
    assert sum(stub.counts.values()) == asked
    assert "up to date" in sh(sys.executable, "-m", "dvc", "repro", "pipelines/raw/dvc.yaml")
