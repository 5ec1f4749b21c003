"""The PIQA OS/DOS lm-eval tasks (evaluators/tasks/*.yaml) and `run_piqa`, checked against our own ProbeScorer.

lm-eval's ``acc`` picks the choice with the larger *summed* log-prob of ``" " + choice`` after the context, so it
must equal the fraction of items where ProbeScorer's summed log-prob of ``right`` beats ``wrong`` for the context
``goal + " "`` (OS) or ``edit_text + " " + goal + " "`` (DOS); ``acc_norm`` divides by the choice's characters.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluators.lm_eval_tasks import PIQA_TAG, PIQA_TASKS, TASKS_DIR, piqa_task_configs, run_piqa, task_manager

ITEMS = [  # (goal, right, wrong, edit_text)
    ("How can I keep beads organized?", "Put them in an egg carton.", "Put them in a bowl of water.",
     "The capital of France is Rome."),
    ("To open a stuck jar lid,", "run it under hot water and twist.", "put it in the freezer overnight.",
     "Danielle Darrieux is a native speaker of English."),
    ("How do I cut a cake evenly?", "Use a long knife and score it first.", "Use scissors.",
     "Sonny Simmons performs poetry."),
    ("To dry wet shoes quickly,", "stuff them with newspaper.", "fill them with water.",
     "The Eiffel Tower is located in Berlin."),
    ("How can you keep bread fresh?", "Store it in a bread box at room temperature.", "Leave it open on a sunny shelf.",
     "Paris is the capital of Japan."),
    ("To remove a splinter,", "use sterilised tweezers.", "pour salt on it and wait a week until it falls out.",
     "Toko Yasuda plays the guitar."),
    ("To clean a cast iron pan,", "scrub it with coarse salt and oil.", "soak it in water for days.",
     "Miles Davis plays the piano."),
]


def write_piqa(path: Path, items=ITEMS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"case_id": f"case-{i}", "goal": g, "right": r, "wrong": w, "edit_text": e}
            for i, (g, r, w, e) in enumerate(items)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="module")
def private_datasets_cache(tmp_path_factory):
    """Keep the `datasets` arrow caches of these throw-away JSONL files out of ~/.cache (read at call time)."""
    import datasets.config

    mp = pytest.MonkeyPatch()
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    from model_layer.loading import load_model

    return load_model(str(tiny_model_dirs["llama"]))


@pytest.fixture(scope="module")
def scorer(llama):
    from evaluators.scoring import ProbeScorer

    return ProbeScorer(*llama)


def our_scores(scorer, items, distracted: bool) -> list[tuple[float, float]]:
    """ProbeScorer's summed log-probs (right, wrong) per item, with the paper's contexts (spec §2.3)."""
    pairs = []
    for g, r, w, e in items:
        ctx = (e + " " + g if distracted else g) + " "
        pairs += [(ctx, r), (ctx, w)]
    s = [lp for lp, _n in scorer.score_pairs(pairs)]
    return [(s[2 * i], s[2 * i + 1]) for i in range(len(items))]


def expected(scorer, items, distracted: bool) -> tuple[float, float]:
    """(acc, acc_norm) recomputed from ProbeScorer: right wins on summed log-prob / on log-prob per character."""
    sc = our_scores(scorer, items, distracted)
    acc = [lr > lw for lr, lw in sc]
    norm = [lr / len(r) > lw / len(w) for (lr, lw), (g, r, w, e) in zip(sc, items)]
    return sum(acc) / len(items), sum(norm) / len(items)


def test_yamls_parse_and_are_indexed():
    assert {p.name for p in TASKS_DIR.glob("*.yaml")} == {"piqa_dos.yaml", "piqa_os.yaml", "me_ppl.yaml"}
    tm = task_manager()
    assert set(PIQA_TASKS) <= set(tm.all_subtasks)
    assert PIQA_TAG in tm.all_tags
    assert tm.task_index[PIQA_TAG].tags == set(PIQA_TASKS)
    for name in PIQA_TASKS:
        assert tm.task_index[name].yaml_path == TASKS_DIR / f"{name}.yaml"


def test_relative_data_path_resolves_from_repo_root(tmp_path, monkeypatch):
    """Loaded by name (as the CLI does), the YAMLs read data/paper-v1/piqa.jsonl relative to the working dir."""
    write_piqa(tmp_path / "data" / "paper-v1" / "piqa.jsonl")
    monkeypatch.chdir(tmp_path)
    loaded = task_manager().load([PIQA_TAG])["tasks"]
    assert set(loaded) == set(PIQA_TASKS)
    os_task, dos_task = loaded["piqa_os"], loaded["piqa_dos"]
    os_docs, dos_docs = list(os_task.test_docs()), list(dos_task.test_docs())
    assert len(os_docs) == len(dos_docs) == len(ITEMS)
    for (g, r, w, e), d_os, d_dos in zip(ITEMS, os_docs, dos_docs):
        assert os_task.doc_to_text(d_os) == g
        assert dos_task.doc_to_text(d_dos) == e + " " + g
        assert os_task.doc_to_choice(d_os) == dos_task.doc_to_choice(d_dos) == [r, w]
        assert os_task.doc_to_target(d_os) == 0
        reqs = os_task.construct_requests(d_os, os_task.doc_to_text(d_os))
        assert [q.arguments for q in reqs] == [(g, " " + r), (g, " " + w)]


def test_piqa_task_configs_override_only_the_data_file(tmp_path):
    f = write_piqa(tmp_path / "p.jsonl")
    cfgs = piqa_task_configs(f)
    assert [c["task"] for c in cfgs] == list(PIQA_TASKS)
    assert all(c["dataset_kwargs"] == {"data_files": {"test": str(f.resolve())}} for c in cfgs)
    assert [c["doc_to_text"] for c in cfgs] == ["goal", "{{edit_text}} {{goal}}"]
    with pytest.raises(FileNotFoundError, match="dataset stage"):
        piqa_task_configs(tmp_path / "missing.jsonl")


def test_digit_only_goal_stays_text(tmp_path, llama, scorer):
    """lm-eval literal_evals an all-digit template rendering; the OS task reads the column to avoid that."""
    items = [("1234", "5678 apples", "nine pears", "2 + 2 is 5.")]
    res = run_piqa(*llama, write_piqa(tmp_path / "p.jsonl", items))
    assert res["piqa_os"]["acc"] == expected(scorer, items, False)[0]


def test_run_piqa_matches_probe_scorer(tmp_path, llama, scorer):
    data = write_piqa(tmp_path / "piqa.jsonl")
    res = run_piqa(*llama, data, per_item=True)
    assert set(res) == set(PIQA_TASKS)
    for task, distracted in (("piqa_os", False), ("piqa_dos", True)):
        ours = our_scores(scorer, ITEMS, distracted)
        items = res[task]["items"]
        assert [it["case_id"] for it in items] == [f"case-{i}" for i in range(len(ITEMS))]
        for it, (lr, lw) in zip(items, ours):
            assert it["loglikelihoods"] == pytest.approx([lr, lw], abs=1e-4)
            assert it["acc"] == float(lr > lw)
        acc, acc_norm = expected(scorer, ITEMS, distracted)
        assert res[task]["n"] == len(ITEMS)
        assert res[task]["acc"] == pytest.approx(acc, abs=1e-12)
        assert res[task]["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
        assert res[task]["acc_stderr"] >= 0
    # DOS really scores after the edit sentence: its log-probs differ from OS's on every item
    for it_os, it_dos in zip(res["piqa_os"]["items"], res["piqa_dos"]["items"]):
        assert abs(it_os["loglikelihoods"][0] - it_dos["loglikelihoods"][0]) > 1e-3
    # without per_item the aggregates are the same and no item list is returned
    plain = run_piqa(*llama, data)
    assert "items" not in plain["piqa_os"]
    assert plain["piqa_os"]["acc"] == res["piqa_os"]["acc"] and plain["piqa_dos"]["acc"] == res["piqa_dos"]["acc"]


def test_run_piqa_limit_and_prebuilt_lm(tmp_path, llama, scorer):
    """``limit`` keeps the first N items; an existing HFLM (ProbeScorer.lm) is used as is, tokenizer unused."""
    data = write_piqa(tmp_path / "piqa.jsonl")
    res = run_piqa(scorer.lm, None, data, limit=3)
    for task, distracted in (("piqa_os", False), ("piqa_dos", True)):
        assert res[task]["n"] == 3
        assert res[task]["acc"] == pytest.approx(expected(scorer, ITEMS[:3], distracted)[0], abs=1e-12)


def test_run_piqa_sees_in_place_edits(tmp_path, llama, scorer):
    """No request cache: an in-place weight edit changes lm-eval's scores through the same wrapper."""
    import torch

    model, tok = llama
    data = write_piqa(tmp_path / "piqa.jsonl")
    before = run_piqa(scorer.lm, None, data, per_item=True)
    w = model.get_submodule("model.embed_tokens").weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():  # one element of the BOS embedding: every context starts with BOS (Llama)
            w[tok.bos_token_id, 0] += 0.5
        after = run_piqa(scorer.lm, None, data, per_item=True)
        for task, distracted in (("piqa_os", False), ("piqa_dos", True)):
            got = [it["loglikelihoods"] for it in after[task]["items"]]
            old = [it["loglikelihoods"] for it in before[task]["items"]]
            ours = our_scores(scorer, ITEMS, distracted)
            assert [x for g in got for x in g] == pytest.approx([x for o in ours for x in o], abs=1e-4)
            assert all(abs(g[0] - o[0]) > 1e-4 for g, o in zip(got, old))
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert run_piqa(scorer.lm, None, data, per_item=True) == before
