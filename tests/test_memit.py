"""MEMIT (+SADR) on the shared locate-then-edit core: tiny random models of every architecture, the least-squares
update and grouped key averaging by hand, hyper-parameter errors, and a full edit → score → restore cell."""
from __future__ import annotations

import pytest
import torch

from editors.registry import get_editor
from editors.core import grouped_mean, least_squares_update, target_ids
from editors.memit import Memit, MemitHparams
from evaluators.scoring import ProbeScorer
from model_layer.arch import arch_for
from model_layer.checksum import param_checksum
from model_layer.loading import load_model
from test_rome_sadr import CASES, TINY_CASE, next_token_logits, tiny_hparams


def memit_hparams(mirror, tmp_path, **kw):
    hp = tiny_hparams(mirror, tmp_path, clamp_norm_factor=4.0, **kw)
    del hp["layer"]
    hp.setdefault("layers", [0, 1])
    # λ on the tiny nets' scale: their 128-dim keys come from a few thousand tokens of a full-rank C, against which
    # the reference's λ = 15000 (GPT-J's scale) leaves the edit ≈ 1.5× instead of > 10×. (Before the statistics were
    # fixed, C was singular and its inverse inflated the update enough to pass at 15000.)
    hp.setdefault("mom2_update_weight", 100)
    return hp


# --------------------------------------------------------------------------------------------- the math by hand

def test_least_squares_update_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, lam = 6, 4, 3.0
    a = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    c = a @ a.T / d_in + torch.eye(d_in, dtype=torch.float64)  # a second moment: symmetric positive definite
    k, r = torch.randn(d_in, generator=g), torch.randn(d_out, generator=g)
    dw = least_squares_update(c.float(), k, r, lam)
    want = r.double()[:, None] @ k.double()[None, :] @ torch.linalg.inv(lam * c + torch.outer(k.double(), k.double()))
    assert dw.shape == (d_out, d_in) and torch.allclose(dw.double(), want, atol=1e-6)
    # Sherman–Morrison: ΔW k = R · s/(1+s) with s = kᵀ(λC)⁻¹k, so the key moves its output part of the way to R
    s = float(k.double() @ torch.linalg.solve(lam * c, k.double()))
    assert torch.allclose((dw.double() @ k.double()), r.double() * s / (1 + s), atol=1e-6)


def test_grouped_mean_weighs_the_bare_prompt_one_half():
    keys = torch.tensor([[10.0], [0.0], [0.0], [0.0], [0.0], [5.0]])  # bare, then 5 templates
    assert grouped_mean(keys, [1, 5]).item() == pytest.approx((10 + 1) / 2)  # 10/2 + 5/10
    assert grouped_mean(keys, [6]).item() == pytest.approx(15 / 6)  # one group: the flat mean (ROME)
    with pytest.raises(ValueError, match="do not add up"):
        grouped_mean(keys, [1, 4])


def test_memit_hparams_defaults_and_errors():
    hp = MemitHparams.from_dict({"layers": [5, 3, 4]})
    assert hp.layers == (3, 4, 5) and hp.layer == 5  # z at the last edit layer
    assert hp.template_groups() == [1, 5] and hp.template_brace_fill == " " and hp.clamp_norm_factor == 0.75
    assert hp.mom2_update_weight == 15000 and hp.sadr_steps == 20 and hp.sadr_gamma == 5e-3
    with pytest.raises(ValueError, match="MEMIT needs hparams 'layers'"):
        MemitHparams.from_dict({})
    with pytest.raises(ValueError, match=r"unknown MEMIT hyper-parameter\(s\) \['layer'\]"):
        MemitHparams.from_dict({"layers": [1], "layer": 1})
    for bad in ([], [1, 1], [-1]):
        with pytest.raises(ValueError, match="non-empty list of distinct layer indices"):
            MemitHparams.from_dict({"layers": bad})
    with pytest.raises(ValueError, match="'layers' must be a list, got '3-8'"):
        MemitHparams.from_dict({"layers": "3-8"})


# --------------------------------------------------------------------------------------------- tiny models

@pytest.mark.parametrize("arch", ["gptj", "gpt_neox", "llama", "gemma3"])
def test_memit_puts_target_new_on_top_and_restores_exactly(arch, tiny_model_dirs, mirror, tmp_path):
    model, tok = load_model(str(tiny_model_dirs[arch]))
    first_new = target_ids(tok, TINY_CASE.prompt, TINY_CASE.target_new)[0]
    before = next_token_logits(model, tok, TINY_CASE.prompt)
    ck = param_checksum(model)
    handle = Memit().edit(model, tok, TINY_CASE, memit_hparams(mirror, tmp_path))
    after = next_token_logits(model, tok, TINY_CASE.prompt)
    p_before, p_after = before.softmax(-1)[first_new].item(), after.softmax(-1)[first_new].item()
    assert p_after > 10 * p_before
    if arch != "gemma3":  # Gemma's post-feed-forward norm bounds a tiny random net (see test_rome_sadr)
        assert after.argmax().item() == first_new, f"{arch}: target_new's first token is not the argmax after MEMIT"
    spec = arch_for(model)
    assert list(handle.originals) == [spec.layer("mlp_out", i) + ".weight" for i in (0, 1)]  # only those changed
    d = handle.diagnostics
    assert d["layers"] == [0, 1] and len(d["update_norms"]) == 2 and all(n > 0 for n in d["update_norms"])
    assert 0 < d["z_reached"] <= 1
    (lp_new, n_new), (lp_true, n_true) = ProbeScorer(model, tok, batch_size=4).score_pairs(
        [(TINY_CASE.prompt + " ", TINY_CASE.target_new), (TINY_CASE.prompt + " ", TINY_CASE.target_true)])
    assert lp_new / n_new > lp_true / n_true
    handle.restore()
    assert param_checksum(model) == ck


def test_memit_sadr_adds_the_loss_only_above_the_z_layer_and_restores(tiny_model_dirs, mirror, tmp_path):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    ck = param_checksum(model)
    editor = get_editor("memit")
    for i, case in enumerate(CASES):
        h = editor.edit(model, tok, case, memit_hparams(mirror, tmp_path, sadr=True, sadr_steps=6, sadr_gamma=0.5))
        assert param_checksum(model) != ck
        heads = h.diagnostics["sadr_selected_heads"]
        assert len(heads) == h.diagnostics["steps"] - 1  # no SADR term at step 0
        assert "SADRLoss" in h.diagnostics["final_loss"]
        h.restore()
        assert param_checksum(model) == ck, f"edit {i}: weights not bit-identical after restore()"


def test_memit_layers_beyond_the_model_are_a_clear_error(tiny_model_dirs, mirror, tmp_path):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    n = arch_for(model).n_layers(model.config)
    with pytest.raises(ValueError, match=f"the model has {n} layers"):
        Memit().edit(model, tok, TINY_CASE, memit_hparams(mirror, tmp_path, layers=[0, n]))


def test_memit_cell_through_the_harness(tiny_model_dirs, mirror, tmp_path):
    """run_pre then a memit+sadr cell with per-case restore verification: rows carry MEMIT's diagnostics and the
    attention-drift probe; the model is bit-identical afterwards."""
    from evaluators.harness import CellSpec, run_cell, run_pre

    model, tok = load_model(str(tiny_model_dirs["llama"]))
    ck = param_checksum(model)
    cases = CASES[:2]
    hp = memit_hparams(mirror, tmp_path, v_num_grad_steps=4, sadr_steps=4)
    Memit().prepare(model, tok, hp, progress=False)  # the artefacts (the `stats` stage's job in the pipeline)
    run_pre(model, tok, "tiny", "test", cases, tmp_path / "pre.jsonl", progress=False)
    rows = run_cell(model, tok, CellSpec("test", "tiny", "memit", True, hp), "test", cases, tmp_path / "pre.jsonl",
                    tmp_path / "memit+sadr.jsonl", verify_restore=True, progress=False)
    assert [r["case_id"] for r in rows] == [c.case_id for c in cases]
    for r in rows:
        assert r["cell"] == "test/tiny/memit+sadr" and r["editor"]["name"] == "memit" and r["editor"]["sadr"]
        diag = r["editor"]["diagnostics"]
        assert diag["layers"] == [0, 1] and "attn_drift" in diag  # MEMIT's facts and the attention-drift probe
        assert r["post"] != r["pre"]  # the edit changed the scores
    assert rows[0]["editor"]["diagnostics"]["attn_drift"]  # CASES[0] has a neighbourhood prompt to probe
    assert param_checksum(model) == ck
