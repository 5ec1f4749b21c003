"""AlphaEdit, PMET and FT-L (±SADR) on tiny random models of every architecture: target_new on top after the edit,
only the intended tensors touched, bit-exact restore, each update against its closed form on a hand-sized example,
AlphaEdit's cache of earlier edits (in a stream only, never across single edits), PMET's joint two-site loop and
NLL schedule, FT-L's L∞ ball, and cells through the harness."""
from __future__ import annotations

import pytest
import torch

from editors.alphaedit import AlphaEdit, projected_update
from editors.base import EditContext
from editors.registry import get_editor
from editors.core import (VHparams, build_batch, generate_context_templates, least_squares_update, make_request,
                          optimise_target, target_ids)
from editors.ft import FineTune, FTHparams
from editors.pmet import Pmet
from editors.stats import nullspace_basis
from model_layer.arch import arch_for
from model_layer.checksum import param_checksum
from model_layer.loading import load_model
from test_memit import memit_hparams
from test_rome_sadr import CASES, TINY_CASE, next_token_logits, tiny_hparams

ARCHS = ["gptj", "gpt_neox", "llama", "gemma3"]


def p_first_new(model, tok, case=TINY_CASE) -> float:
    first_new = target_ids(tok, case.prompt, case.target_new)[0]
    return next_token_logits(model, tok, case.prompt).softmax(-1)[first_new].item()


def changed(model, before: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n]))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------- closed forms

def test_nullspace_basis_keeps_the_eigenvectors_below_the_threshold():
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    c = q @ torch.diag(torch.tensor([1e-4, 3e-3, 0.5, 2.0, 9.0], dtype=torch.float64)) @ q.T
    u = nullspace_basis(c.float(), 1e-2)
    assert u.shape == (5, 2)
    p = (u @ u.T).double()
    assert torch.allclose(p, q[:, :2] @ q[:, :2].T, atol=1e-5)  # the projector onto the two small directions


def test_alphaedit_update_matches_its_closed_form_and_spares_the_preserved_keys():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, l2 = 6, 4, 10.0
    q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    u = q[:, :3].float()  # the null space of the preserved keys' second moment
    k, r = torch.randn(2, d_in, generator=g), torch.randn(2, d_out, generator=g)
    cache = torch.randn(d_in, 3, generator=g, dtype=torch.float64)
    cache = cache @ cache.T
    dw = projected_update(u, k, r, l2, cache)
    p = q[:, :3] @ q[:, :3].T
    kk = k.double().T @ k.double() + cache
    want = torch.linalg.inv(p @ kk + l2 * torch.eye(d_in, dtype=torch.float64)) @ p @ k.double().T @ r.double()
    assert dw.shape == (d_out, d_in) and torch.allclose(dw.double(), want.T, atol=1e-5)
    preserved = q[:, 3:].float()  # keys outside the null space (what the statistics saw): untouched outputs
    assert (dw @ preserved).abs().max() < 1e-5
    assert (dw @ k.T).abs().max() > 1e-2  # while the edited keys move


def test_pmet_spreads_the_residual_by_the_square_root_of_the_remaining_layers():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    c = (a @ a.T / 5 + torch.eye(5, dtype=torch.float64)).float()
    k, r = torch.randn(5, generator=g), torch.randn(3, generator=g)
    assert Pmet.spread(4) == 2.0 and AlphaEdit.spread(4) == 4  # AlphaEdit keeps MEMIT's even spread
    dw = least_squares_update(c, k, r / Pmet.spread(4), 100.0)
    want = (r.double() / 2)[:, None] @ k.double()[None] @ torch.linalg.inv(
        torch.outer(k.double(), k.double()) + 100.0 * c.double())
    assert torch.allclose(dw.double(), want, atol=1e-6)


# --------------------------------------------------------------------------------------------- tiny models

def alpha_hparams(mirror, tmp_path, **kw):
    hp = memit_hparams(mirror, tmp_path, **kw)
    hp.pop("mom2_update_weight")
    hp.setdefault("nullspace_threshold", 1e9)  # every direction: P = I (the projection itself is tested below)
    hp.setdefault("L2", 1.0)
    return hp


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("editor", ["alphaedit", "pmet", "intattn"])
def test_edits_put_target_new_up_touch_only_their_tensors_and_restore_exactly(editor, arch, tiny_model_dirs, mirror,
                                                                             tmp_path):
    """AlphaEdit and PMET write the MLPs of their layers only; IntAttn-Edit also their attention output projections."""
    model, tok = load_model(str(tiny_model_dirs[arch]))
    spec = arch_for(model)
    hp = {"alphaedit": lambda: alpha_hparams(mirror, tmp_path),
          "pmet": lambda: memit_hparams(mirror, tmp_path, mom2_update_weight=10),
          "intattn": lambda: intattn_hparams(mirror, tmp_path, alpha=0.3)}[editor]()
    kinds = ("attn_out", "mlp_out") if editor == "intattn" else ("mlp_out",)
    before, ck, p0 = snapshot(model), param_checksum(model), p_first_new(model, tok)
    handle = get_editor(editor).edit(model, tok, TINY_CASE, hp)
    assert p_first_new(model, tok) > 10 * p0
    assert changed(model, before) == sorted(spec.layer(k, i) + ".weight" for i in (0, 1) for k in kinds)
    d = handle.diagnostics
    if editor == "alphaedit":  # threshold 1e9: the whole key space is "null" (P = I)
        assert d["nullspace_dims"] == [model.get_submodule(spec.layer("mlp_out", 0)).in_features] * 2
    elif editor == "pmet":
        assert d["attn_delta_norm"] > 0 and d["delta_norm"] > 0
    else:
        assert d["alpha"] == 0.3 and len(d["attn_update_norms"]) == len(d["mlp_update_norms"]) == 2
    handle.restore()
    assert param_checksum(model) == ck


def test_alphaedit_projection_protects_the_statistics_directions(tiny_model_dirs, mirror, tmp_path):
    """With the threshold at C's median eigenvalue, the update leaves C's top eigenvector's output unchanged."""
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    hp = alpha_hparams(mirror, tmp_path)
    editor = AlphaEdit()
    editor.prepare(model, tok, hp, progress=False)
    module = arch_for(model).layer("mlp_out", 1)
    c = editor.covariance(model, tok, module, AlphaEdit.hparams_cls.from_dict(hp))
    evals, evecs = torch.linalg.eigh(c.double())
    hp["nullspace_threshold"] = float(evals[len(evals) // 2])
    before = model.get_submodule(module).weight.detach().clone()
    handle = editor.edit(model, tok, TINY_CASE, hp)
    dw = model.get_submodule(module).weight.detach() - before
    top = evecs[:, -1].float()
    assert (dw @ top).norm() < 1e-4 * dw.norm() and dw.norm() > 0
    assert handle.diagnostics["nullspace_dims"][1] == len(evals) // 2
    assert any(a.kind == "projection" for a in editor.artefacts(model, tok, hp))  # a DVC artefact beside C
    handle.restore()


def test_alphaedit_caches_earlier_keys_in_a_stream_only(tiny_model_dirs, mirror, tmp_path, monkeypatch):
    import editors.alphaedit as ae

    model, tok = load_model(str(tiny_model_dirs["llama"]))
    seen = []
    real = ae.projected_update
    monkeypatch.setattr(ae, "projected_update", lambda *a: seen.append(a[4]) or real(*a))
    hp = alpha_hparams(mirror, tmp_path, v_num_grad_steps=3)
    editor, ck = AlphaEdit(), param_checksum(model)
    ctx = EditContext(model)  # a stream: two edits, no restore in between
    for case in CASES[:2]:
        ctx.push(editor.apply(model, tok, [case], hp, ctx))
    assert seen[0] is None and seen[1] is None  # first edit (both layers): nothing earlier
    k1 = ctx.handles[0].memo[ae.MEMO]
    assert torch.allclose(seen[2], k1[0].T @ k1[0]) and torch.allclose(seen[3], k1[1].T @ k1[1])
    ctx.restore_all()
    assert param_checksum(model) == ck
    seen.clear()
    ctx = EditContext(model)  # independent edits: each on the unedited model, restored before the next
    for handle in editor.apply_each(model, tok, CASES[:2], hp, ctx):
        ctx.push(handle)
        ctx.restore_all()
    assert seen == [None] * 4 and param_checksum(model) == ck


def test_pmet_joint_loop_and_its_argmax_schedule(tiny_model_dirs):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    spec = arch_for(model)
    batch = build_batch(tok, make_request(TINY_CASE), generate_context_templates(model, tok, ((5, 5),)), "cpu")
    sites = [spec.layer("mlp_out", 1), spec.layer("attn_out", 1)]
    hp = VHparams(layer=1, v_num_grad_steps=30, early_stop_loss=0.0, kl_factor=0.0, v_lr=0.5)
    plain = optimise_target(model, batch, sites, hp)
    assert plain.steps == 30 and set(plain.others) == {sites[1]}
    init_attn, z_attn = plain.others[sites[1]]
    assert (z_attn - init_attn).norm() > 0 and (plain.v_star - plain.v_init).norm() > 0
    # with the schedule and no KL weight, the loop stops at the first step where every label is the argmax
    sched = optimise_target(model, batch, sites, VHparams(**{**hp.__dict__, "argmax_schedule": True}))
    assert sched.steps < 30
    # the two sites' caches replay blocks 0..L−1 only: the same v* as running every block each step
    again = optimise_target(model, batch, sites, hp, prefix_cache=False)
    assert (again.v_star - plain.v_star).norm() <= 1e-4 * (plain.v_star - plain.v_init).norm()


def ft_hparams(**kw):
    return {"layer": 1, "num_steps": 25, "lr": 5e-3, "norm_constraint": 2e-2, **kw}


@pytest.mark.parametrize("arch", ARCHS)
def test_ft_stays_in_its_linf_ball_and_restores_exactly(arch, tiny_model_dirs):
    model, tok = load_model(str(tiny_model_dirs[arch]))
    before, ck, p0 = snapshot(model), param_checksum(model), p_first_new(model, tok)
    flags = [p.requires_grad for p in model.parameters()]
    handle = FineTune().edit(model, tok, TINY_CASE, ft_hparams())
    assert p_first_new(model, tok) > 10 * p0
    module = arch_for(model).layer("mlp_out", 1)
    name = module + ".weight"
    # the module's weight, and its bias where it has one (GPT-J, NeoX), as the reference trains both
    assert changed(model, before) == sorted(f"{module}.{n}" for n, _ in model.get_submodule(module).named_parameters())
    dw = dict(model.named_parameters())[name].detach() - before[name]
    assert dw.abs().max() <= 2e-2 + 1e-6 and handle.diagnostics["update_max_abs"] == pytest.approx(float(dw.abs().max()))
    assert [p.requires_grad for p in model.parameters()] == flags  # the loop gave the flags back
    handle.restore()
    assert param_checksum(model) == ck


def test_ft_sadr_is_nothing_at_gamma_zero_and_something_above(tiny_model_dirs):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    name = arch_for(model).layer("mlp_out", 1) + ".weight"
    weights = {}
    for label, hp in (("plain", ft_hparams(num_steps=6)), ("zero", ft_hparams(sadr=True, sadr_steps=6, sadr_gamma=0.0)),
                      ("strong", ft_hparams(sadr=True, sadr_steps=6, sadr_gamma=50.0))):
        handle = get_editor("ft").edit(model, tok, CASES[0], hp)
        weights[label] = dict(model.named_parameters())[name].detach().clone()
        if label != "plain":
            assert len(handle.diagnostics["sadr_selected_heads"]) == handle.diagnostics["steps"] - 1
        handle.restore()
    assert torch.allclose(weights["plain"], weights["zero"], atol=0, rtol=0)
    assert not torch.equal(weights["plain"], weights["strong"])


def test_ft_hparams_errors():
    assert FTHparams.from_dict({"layer": 2}).norm_constraint == 5e-4
    with pytest.raises(ValueError, match="FT-L needs hparams 'layer'"):
        FTHparams.from_dict({})
    with pytest.raises(ValueError, match=r"unknown FT-L hyper-parameter\(s\) \['layers'\]"):
        FTHparams.from_dict({"layer": 1, "layers": [1]})
    with pytest.raises(ValueError, match="'norm_constraint' must be > 0"):
        FTHparams.from_dict({"layer": 1, "norm_constraint": 0})


@pytest.mark.parametrize("cell", ["alphaedit+sadr.seq2", "pmet", "ft+sadr", "intattn+sadr"])
def test_new_editor_cells_through_the_harness(cell, tiny_model_dirs, mirror, tmp_path):
    from basis.cells import parse_cell
    from evaluators.harness import CellSpec, run_cell, run_pre

    c = parse_cell(cell)
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    ck = param_checksum(model)
    cases = CASES[:2]
    hp = {"alphaedit": alpha_hparams(mirror, tmp_path, v_num_grad_steps=3, sadr_steps=3),
          "pmet": memit_hparams(mirror, tmp_path, v_num_grad_steps=3, mom2_update_weight=10),
          "ft": ft_hparams(num_steps=3, sadr_steps=3),
          "intattn": memit_hparams(mirror, tmp_path, v_num_grad_steps=3, sadr_steps=3, mom2_update_weight=10,
                                   alpha=0.4)}[c.editor]
    editor = get_editor(c.editor)
    editor.prepare(model, tok, hp, progress=False)
    run_pre(model, tok, "tiny", "test", cases, tmp_path / "pre.jsonl", progress=False)
    rows = run_cell(model, tok, CellSpec("test", "tiny", c.editor, c.sadr, hp, mode=c.mode), "test", cases,
                    tmp_path / "pre.jsonl", tmp_path / f"{cell}.jsonl", verify_restore=True, progress=False)
    assert [r["case_id"] for r in rows] == [x.case_id for x in cases]
    for r in rows:
        assert r["cell"] == f"test/tiny/{cell}" and r["editor"]["name"] == c.editor and r["post"] != r["pre"]
        assert "attn_drift" in r["editor"]["diagnostics"]
    assert param_checksum(model) == ck


def test_steps_matched_control_runs_sadr_steps_without_sadr(tiny_model_dirs, mirror, tmp_path):
    """rome+steps: the v* loop runs hparams sadr_steps iterations (not v_num_grad_steps) and has no SADR term; an
    editor without SADR cannot have the control."""
    from basis.errors import UserError
    from evaluators.harness import CellSpec, prepare_cell, run_cell, run_pre

    model, tok = load_model(str(tiny_model_dirs["llama"]))
    cases = CASES[:1]
    hp = tiny_hparams(mirror, tmp_path, v_num_grad_steps=3, sadr_steps=5, early_stop_loss=0.0)
    get_editor("rome").prepare(model, tok, hp, progress=False)
    run_pre(model, tok, "tiny", "test", cases, tmp_path / "pre.jsonl", progress=False)
    rows = {}
    for steps in (False, True):
        spec = CellSpec("test", "tiny", "rome", False, hp, steps_matched=steps)
        rows[steps] = run_cell(model, tok, spec, "test", cases, tmp_path / "pre.jsonl",
                               tmp_path / f"{spec.name}.jsonl", progress=False)[0]
    assert rows[True]["cell"] == "test/tiny/rome+steps" and rows[True]["editor"]["sadr"] is False
    d_plain, d_steps = rows[False]["editor"]["diagnostics"], rows[True]["editor"]["diagnostics"]
    assert (d_plain["steps"], d_steps["steps"]) == (3, 5)
    assert "SADRLoss" not in d_steps["final_loss"] and "sadr_selected_heads" not in d_steps
    with pytest.raises(UserError, match="does not support SADR"):
        prepare_cell(None, None, CellSpec("test", "tiny", "none", False, {}, steps_matched=True))


# --------------------------------------------------------------------------------------------- IntAttn-Edit

def test_attention_trace_and_the_alpha_it_gives(tiny_model_dirs, tmp_path):
    import json

    from editors.intattn import trace_alpha
    from editors.tracing import attention_share, trace

    model, tok = load_model(str(tiny_model_dirs["gptj"]))  # GPT-J's attention returns a tuple: hooks must cope
    facts = [("Danielle Darrieux was born in", "Danielle Darrieux", 5), ("Sonny Simmons plays", "Sonny Simmons", 7)]
    quiet = trace(model, tok, facts, samples=2, window=2, noise_mult=0.0, progress=False, module="attn")
    assert quiet.module == "attn" and all(abs(v) < 1e-6 for v in quiet.indirect_effect)
    mlp = trace(model, tok, facts, samples=2, window=2, progress=False)
    attn = trace(model, tok, facts, samples=2, window=2, progress=False, module="attn")
    assert attn.indirect_effect != mlp.indirect_effect and attn.corrupted_p == pytest.approx(mlp.corrupted_p)
    # α by hand: attention's positive effect over both modules' at the edit layers
    assert attention_share([0.3, -0.1, 0.2], [0.1, 0.5, -0.4], [0, 2]) == pytest.approx(0.1 / (0.1 + 0.5))
    assert attention_share([0.0, -1.0], [-2.0, 0.0], [0, 1]) == 0.5
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({**mlp.__dict__, "attn": attn.__dict__}))
    want = attention_share(mlp.indirect_effect, attn.indirect_effect, [0, 1])
    assert trace_alpha(path, (0, 1)) == pytest.approx(want)
    path.write_text(json.dumps(mlp.__dict__))  # an MLP-only trace (before attention tracing existed)
    from basis.errors import UserError

    with pytest.raises(UserError, match="attn.indirect_effect"):
        trace_alpha(path, (0, 1))


def intattn_hparams(mirror, tmp_path, **kw):
    return memit_hparams(mirror, tmp_path, mom2_update_weight=10, **kw)


def test_intattn_alpha_splits_the_update_between_the_modules(tiny_model_dirs, mirror, tmp_path):
    """α = 0 writes only the MLPs and equals MEMIT exactly; α = 1 only the attention outputs; a larger α moves
    more of the update into attention."""
    from editors.intattn import IntAttn
    from editors.memit import Memit

    model, tok = load_model(str(tiny_model_dirs["llama"]))
    spec = arch_for(model)
    hp = intattn_hparams(mirror, tmp_path, v_num_grad_steps=5)
    IntAttn().prepare(model, tok, hp, progress=False)
    norms, weights = {}, {}
    for alpha in (0.0, 0.2, 0.8, 1.0):
        before = snapshot(model)
        h = IntAttn().edit(model, tok, TINY_CASE, dict(hp, alpha=alpha))
        kinds = {n.split(".")[-2] for n in changed(model, before)}
        norms[alpha] = (sum(h.diagnostics["attn_update_norms"]), sum(h.diagnostics["mlp_update_norms"]))
        weights[alpha] = {n: p.detach().clone() for n, p in model.named_parameters()}
        h.restore()
        assert kinds == {0.0: {"down_proj"}, 1.0: {"o_proj"}}.get(alpha, {"down_proj", "o_proj"})
    assert norms[0.8][0] > norms[0.2][0] and norms[0.8][1] < norms[0.2][1]
    h = Memit().edit(model, tok, TINY_CASE, hp)
    memit = {n: p.detach().clone() for n, p in model.named_parameters()}
    h.restore()
    name = spec.layer("mlp_out", 1) + ".weight"
    assert torch.allclose(memit[name], weights[0.0][name], atol=1e-6)
    with pytest.raises(ValueError, match="'alpha' must lie in"):
        IntAttn().check_hparams(None, dict(hp, alpha=1.5))


def test_the_cli_gives_statistics_settings_only_to_editors_that_take_them():
    from driftbench.cli.common import _uses_statistics

    assert [_uses_statistics(e) for e in ("rome", "memit", "pmet", "alphaedit", "intattn", "ft")] == [True] * 5 + [False]


def test_ft_in_bf16_moves_the_weights_through_an_fp32_master_copy(tiny_model_dirs):
    """In bf16, W₀ ± ε rounds back to W₀ for most weights when ε is below half a bf16 step; the fp32 master copy
    keeps the fine-tuning alive and the written weights within the ball (up to one bf16 rounding)."""
    model, tok = load_model(str(tiny_model_dirs["llama"]), dtype="bfloat16")
    name = arch_for(model).layer("mlp_out", 1) + ".weight"
    w0 = dict(model.named_parameters())[name].detach().clone()
    ck = param_checksum(model)
    eps = 5e-3
    handle = FineTune().edit(model, tok, TINY_CASE, ft_hparams(norm_constraint=eps, num_steps=10))
    w = dict(model.named_parameters())[name].detach()
    assert w.dtype == torch.bfloat16
    moved = (w != w0).float().mean().item()
    assert moved > 0.5, f"only {moved:.0%} of the weights moved"
    # one bf16 rounding of the written value: half its spacing, 2^(floor(log2|w|) − 8)
    half_spacing = 2.0 ** (torch.floor(torch.log2(w.float().abs().clamp(min=1e-30))) - 8)
    assert bool(((w.float() - w0.float()).abs() <= eps + half_spacing + 1e-7).all())
    handle.restore()
    assert param_checksum(model) == ck


def test_alphaedit_and_pmet_hparams_ranges():
    from editors.alphaedit import AlphaEditHparams
    from editors.pmet import PmetHparams

    for bad in ({"L2": 0}, {"nullspace_threshold": 0.0}):
        with pytest.raises(ValueError, match=f"'{next(iter(bad))}' must be > 0"):
            AlphaEditHparams.from_dict({"layers": [1], **bad})
    with pytest.raises(ValueError, match="'nll_loss_factor' must be > 0"):
        PmetHparams.from_dict({"layers": [1], "nll_loss_factor": -1})
    assert PmetHparams.from_dict({"layers": [1]}).argmax_schedule is True
