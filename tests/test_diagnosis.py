"""evaluators.diagnosis on tiny models: substitution with a window covering nothing (or with the model's own
outputs) equals the unedited pass; patching every layer's attention with the model's own probabilities changes
nothing, with another prompt's it does; the drift factors on a hand-made example; token groups; and one cell's
whole diagnosis (edit, factors, substitution, patching, restore) through `run_diagnosis`."""
from __future__ import annotations

import math

import pytest
import torch

from evaluators.diagnosis import (GROUPS, KINDS, Prompt, factors, forward_maps, module_outputs, patch_curve,
                                  substitution, token_groups)
from model_layer.attention import patched_attention
from model_layer.arch import arch_for
from model_layer.loading import load_model

ARCHS = ["gptj", "gpt_neox", "llama", "gemma3"]
TEXT = "Danielle Darrieux's mother tongue is French. The capital of Italy is"


def _prompt(tok, model=None, text=TEXT, subject="Danielle Darrieux") -> Prompt:
    """o_true's first token: the model's top next token (a probability that can visibly move), else any."""
    enc = tok(text, return_offsets_mapping=True)
    groups, last = token_groups(enc["offset_mapping"], text.find(subject), text.find(subject) + len(subject))
    ids = list(enc["input_ids"])
    top = ids[1] if model is None else int(forward_maps(model, ids)[1].argmax())
    return Prompt("DNS", text, "Rome", "French", ids, last, groups, top, ids[2])


def test_token_groups_by_hand():
    # "ab cd ef gh" with the subject "cd ef": tokens (0,2) (2,5) (5,8) (8,11) plus a BOS (0,0)
    offsets = [(0, 0), (0, 2), (2, 5), (5, 8), (8, 11)]
    groups, last = token_groups(offsets, 3, 8)
    assert last == 3
    assert [GROUPS[g] for g in groups] == ["before subject", "before subject", "subject", "subject last",
                                           "last token"]
    with pytest.raises(ValueError):
        token_groups(offsets, 20, 25)


def test_factors_by_hand():
    pre = torch.tensor([[[0.5, 0.5], [0.2, 0.8]]])  # [L=1, H=2, T=2]
    post = torch.tensor([[[0.7, 0.3], [0.1, 0.9]]])
    f = factors(pre, post, s=0)
    assert f["f1"] == pytest.approx(0.2)  # max over heads of the increase at s: head 0, +0.2
    assert f["f3"] == pytest.approx(0.1)  # +0.2 − 0.1
    assert f["f2"] == pytest.approx(0.1)  # other token: head 0 −0.2 (clamped to 0), head 1 +0.1
    kl = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3) + 0.2 * math.log(0.2 / 0.1) + 0.8 * math.log(0.8 / 0.9)
    assert f["kl"] == pytest.approx(kl, rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_patching_with_own_attention_changes_nothing_and_with_another_prompts_does(tiny_model_dirs, arch):
    model, tok = load_model(str(tiny_model_dirs[arch]))
    p = _prompt(tok)
    maps, lp = forward_maps(model, p.ids)
    n = len(maps)
    x = torch.tensor([p.ids, p.ids])
    with torch.no_grad():
        with patched_attention(model, dict(enumerate(maps)), {l: [0, 1] for l in range(n)}):
            got = torch.log_softmax(model(input_ids=x, use_cache=False).logits[:, -1].float(), -1)
        assert (got - lp).abs().max().item() < 1e-4
        other = [torch.full_like(m, 0.0).tril() for m in maps]  # uniform causal attention: a different map
        other = [o + torch.tril(torch.ones_like(o)) / torch.arange(1, o.shape[-1] + 1)[:, None] for o in other]
        with patched_attention(model, dict(enumerate(other)), {l: [1] for l in range(n)}):
            out = torch.log_softmax(model(input_ids=x, use_cache=False).logits[:, -1].float(), -1)
    assert (out[0] - lp).abs().max().item() < 1e-4  # row 0 is not patched
    assert (out[1] - lp).abs().max().item() > 1e-3
    curve = patch_curve(model, p, maps, window=2)  # the model's own maps: every window is the plain pass
    assert len(curve["p_true"]) == n + 1
    assert max(abs(a - curve["p_true"][0]) for a in curve["p_true"]) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_substitution_of_nothing_or_of_the_same_outputs_is_the_unedited_pass(tiny_model_dirs, arch):
    model, tok = load_model(str(tiny_model_dirs[arch]))
    arch_spec = arch_for(model)
    p = _prompt(tok, model)
    n = arch_spec.n_layers(model.config)
    own = module_outputs(model, arch_spec, p.ids, n)
    assert set(own) == {(k, l) for k in KINDS for l in range(n)}
    empty = substitution(model, arch_spec, p, own, window=0)  # a window that covers no layer
    assert abs(empty["d_true"][~torch.isnan(torch.tensor(empty["d_true"])).numpy()]).max() == 0.0
    same = substitution(model, arch_spec, p, own, window=2, batch=7)  # its own outputs: nothing changes
    assert abs(same["d_true"][~torch.isnan(torch.tensor(same["d_true"])).numpy()]).max() < 1e-5
    g = torch.Generator().manual_seed(0)
    other = {k: v + torch.randn(v.shape, generator=g) for k, v in own.items()}
    changed = substitution(model, arch_spec, p, other, window=2, batch=7)
    finite = changed["d_true"][~torch.isnan(torch.tensor(changed["d_true"])).numpy()]
    assert abs(finite).max() > 1e-4
    # groups the prompt has no token of stay NaN; every present group has a value at every start layer
    present = sorted(set(p.groups))
    assert not torch.isnan(torch.tensor(changed["d_true"][:, :, present])).any()


def test_run_diagnosis_on_a_finetune_cell(tiny_model_dirs):
    from evaluators.diagnosis import run_diagnosis, summarise
    from evaluators.harness import CellSpec
    from data_pipeline.schema import Case, Probe
    from model_layer.checksum import param_checksum
    from test_more_editors import ft_hparams
    from test_rome_sadr import CASES

    rich = Case(case_id="cf-d", source="counterfact", subject="Danielle Darrieux",
                prompt="The mother tongue of Danielle Darrieux is", target_true="French", target_new="English",
                neighborhood=(Probe("The mother tongue of Léon Blum is", "French"), Probe("Paris is in", "France")),
                relation=(Probe("Danielle Darrieux was born in", "Bordeaux"), Probe("No subject here", "x"),
                          Probe("Danielle Darrieux speaks", "French")))
    cases = [rich] + CASES
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    ck = param_checksum(model)
    spec = CellSpec("test", "tiny", "ft", True, ft_hparams(num_steps=3, sadr_steps=3))
    out = run_diagnosis(model, tok, spec, cases, {"cases": 2, "prompts": 1, "window": 2}, progress=False)
    assert param_checksum(model) == ck  # restored
    assert [c["case_id"] for c in out["cases"]] == [c.case_id for c in cases[:2]]
    n_layers = arch_for(model).n_layers(model.config)
    for c in out["cases"]:
        assert c["weight_change"]["norm"] > 0
        for task in ("DNS", "RS"):  # substitution on the first prompt of each task (prompts: 1), the rest without
            subs = [p["substitution"] is not None for p in c["prompts"] if p["task"] == task]
            assert subs[:1] == [True] * min(1, len(subs)) and not any(subs[1:])
        for p in c["prompts"]:
            assert p["task"] in ("DNS", "RS") and 0 < p["p_edit"] < 1
            assert len(p["patch"]["p_true"]) == n_layers + 1
            # the edited model with no patch (x = 0) gives the post-edit first-token probability
            assert p["patch"]["p_true"][0] == pytest.approx(p["first_token"]["post"][0], abs=1e-5)
    # every DNS prompt and every RS prompt that contains the subject (2 + 2 of the first case)
    assert [p["task"] for p in out["cases"][0]["prompts"]] == ["DNS", "DNS", "RS", "RS"]
    s = out["summary"]
    assert s == summarise(out["cases"])
    for task, t in s["tasks"].items():
        assert set(t["rho"]) == {"kl", "f1", "f2", "f3"}
        assert t["n"] == sum(p["task"] == task for c in out["cases"] for p in c["prompts"])
        assert t["n_substitution"] == sum(p["task"] == task and p["substitution"] is not None
                                          for c in out["cases"] for p in c["prompts"])
        assert len(t["substitution_d_true"]) == len(KINDS) and len(t["substitution_d_true"][0]) == n_layers


def test_site_diagnosis_page_shows_the_numbers_and_figures(tmp_path):
    """leaderboard.diagnosis: a page per model from analysis/ and diagnosis/ files, the paper's row labelled."""
    import json

    from leaderboard.diagnosis import read_page, render_pages
    from leaderboard.site import _env

    res = tmp_path / "results"
    (res / "analysis").mkdir(parents=True)
    (res / "diagnosis").mkdir()
    post = {"p_edit": {"mean": 0.241, "ci95": 0.05, "n": 60}, "p_true": {"mean": 0.1, "ci95": 0.02, "n": 60},
            "accuracy": 0.15, "n": 60}
    pre = dict(post, p_edit={"mean": 0.057, "ci95": 0.01, "n": 60})
    (res / "analysis" / "analysis.json").write_text(json.dumps({
        "paper_table1": {"model": "GPT-J-6B", "editor": "ROME", "task": "DNS", "p_edit_pre": 0.033,
                         "p_edit_post": 0.484},
        "cells": {"rome": {"calibration": {"DNS": {"pre": pre, "post": post}},
                           "drift": {"DNS": {"rho": 0.4321, "p": 6e-4, "n": 60, "points": []}}}}}))
    rho = {"rho": 0.777, "p": 0.01, "n": 9}
    (res / "diagnosis" / "rome.json").write_text(json.dumps({"settings": {"cases": 3, "prompts": 2, "window": 5},
        "summary": {"tasks": {"DNS": {"n": 9, "rho": {"kl": rho, "f1": rho, "f2": rho, "f3": rho}}}}}))
    (res / "diagnosis" / "rome.png").write_bytes(b"\x89PNG fake")
    (res / "ablation").mkdir()  # Table 5 from `driftbench ablation`
    half = {"n_cases": 8, **{m: {"mean": 0.5, "ci95": 0.25, "n": 8} for m in ("ES", "PS", "NS", "RS")},
            "DNS": {"mean": 0.125, "ci95": 0.0625, "n": 30}, "drift_DNS": {"mean": 1.234, "ci95": 0.1, "n": 30}}
    (res / "ablation" / "easy_hard.json").write_text(json.dumps({
        "median_margin": 1.5, "split": {"a": "easy", "b": "hard"},
        "cells": {"rome_awd": {"easy": half, "hard": dict(half, n_cases=7)}}}))
    (res / "sweep").mkdir()  # the held-out sweep: SADR's head-selection and γ rows are shown, other editors' not
    cfg = {"scores": {"ES": {"mean": 1.0, "ci95": 0.0}, "DNS": {"mean": 0.0606, "ci95": 0.08}},
           "drift": {"drift_DNS": {"mean": 0.4321}}}
    (res / "sweep" / "sweep.json").write_text(json.dumps({"n_cases": 8, "configs": {
        "rome+sadr": cfg, "rome+sadr@sadr_hinge=False": cfg, "rome@layer=1": cfg, "rome+sadr@layer=2": cfg}}))
    assert read_page("embedded", "m", tmp_path / "nothing") is None
    page = read_page("embedded", "m", res)
    out = tmp_path / "site"
    out.mkdir()
    render_pages([page], _env(), out, {"build": {"git": {"commit": "c", "dirty": False},
                                                 "dataset": {"version": "paper-v1", "content_id": "x"}},
                                       "version": "0", "protocol_docs": {}})
    html = (out / page.href).read_text(encoding="utf-8")
    assert "0.241 ± 0.050" in html and "0.43 (p 0.0006, n 60)" in html and "0.78 (p 0.01, n 9)" in html
    assert "paper: ROME on GPT-J-6B" in html and "0.484" in html
    assert "rome+sadr@sadr_hinge=False" in html and "0.43" in html and "6.1 ± 8.0" in html
    assert "rome@layer=1" not in html and "rome+sadr@layer=2" not in html
    assert "Table 5" in html and "rome_awd" in html and "12.5 ± 6.2" in html and "1.23" in html
    assert "1 easy, 1 hard" in html
    figs = sorted((out / "diagnosis").glob("*.png"))
    assert len(figs) == 1 and figs[0].read_bytes() == b"\x89PNG fake" and figs[0].name in html
