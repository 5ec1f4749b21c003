"""MEND on tiny random models of every architecture: the hyper-network is the identity at initialisation, its
training loss falls on a tiny synthetic edit set and the trained editor raises the target's probability, only the
edited weights move and restore is bit-exact, SADR's training term is zero at γ = 0 and changes the checkpoint at
γ > 0, a killed training resumes to the same bytes, and the CLI refuses what it cannot run."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.schema import Case
from editors.base import EditContext
from editors.core import target_ids
from editors.mend import GradientTransform, MendHparams, MendNet, edited_weights, gradient_factors, edit_row
from editors.mend_train import train, training_cases
from editors.registry import get_editor
from model_layer.loading import load_model
from test_more_editors import changed, snapshot

ARCHS = ["gptj", "gpt_neox", "llama", "gemma3"]
SUBJECTS = ["Danielle Darrieux", "Sonny Simmons", "Isabel May", "Paris", "London", "Berlin", "Toyota", "Apple"]
WORDS = ["French", "jazz", "actor", "city", "river", "music", "car", "fruit"]
CASES = [Case(case_id=f"syn-{i}", source="counterfact", subject=s, prompt=f"The language of {s} is",
              target_true=WORDS[(i + 1) % len(WORDS)], target_new=WORDS[i]) for i, s in enumerate(SUBJECTS)]


def mend_hparams(tmp_path, **kw):
    hp = {"layers": [2, 3], "rank": 32, "train_steps": 80, "lr": 1e-3, "accumulate": 4, "edit_lr": 1e-3,
          "checkpoint_dir": str(tmp_path / "ck"), "model_id": "tiny"}
    hp.update(kw)
    return hp


def p_new(model, tok, case) -> float:
    _, ids, mask, label_pos, labels = edit_row(tok, case, "cpu")
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=mask).logits[0].log_softmax(-1)
    return float(logp[torch.tensor(label_pos), torch.tensor(labels)].sum().exp())


def test_the_hypernetwork_is_the_identity_at_initialisation_and_the_update_is_the_outer_product():
    g = torch.Generator().manual_seed(0)
    hp = MendHparams.from_dict({"layers": [0], "rank": 4})
    net = MendNet({"w": (3, 5)}, hp).train()
    u, d = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    u[2] = 0  # a row without input: dropped
    dw = net.deltas({"w": (u, d)})["w"]
    keep = torch.tensor([0, 1, 3, 4, 5])
    un = (u[keep] - u[keep].mean(0)) / (u[keep].std(0) + 1e-7)  # the running statistics of this one batch
    dn = (d[keep] - d[keep].mean(0)) / (d[keep].std(0) + 1e-7)
    assert dw.shape == (3, 5) and torch.allclose(dw, 1e-4 * dn.T @ un, atol=1e-5)
    gt = GradientTransform(5, 3, rank=2, n_hidden=1, n_modes=1, gen=g)
    assert gt.layers[0].u.shape == (8, 2)  # rank min(rank, d_u + d_δ)


def test_gradient_factors_give_the_weight_gradient_as_a_sum_of_outer_products(tiny_model_dirs):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    hp = MendHparams.from_dict({"layers": [1]})
    names = list(edited_weights(model, hp))
    flags = [p.requires_grad for p in model.parameters()]
    _, ids, mask, label_pos, labels = edit_row(tok, CASES[0], "cpu")
    factors, _ = gradient_factors(model, names, ids, mask, label_pos, labels)
    assert [p.requires_grad for p in model.parameters()] == flags  # put back
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    logits = model(input_ids=ids, attention_mask=mask).logits[0]
    from editors.mend import nll_at

    grads = torch.autograd.grad(nll_at(logits, label_pos, labels), [dict(model.named_parameters())[n] for n in names])
    for n, g in zip(names, grads):
        u, d = factors[n]
        assert torch.allclose(d.T @ u, g, atol=1e-6, rtol=1e-4), n
        assert g.abs().max() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_trained_mend_edits_raise_the_target_touch_only_its_weights_and_restore_exactly(arch, tiny_model_dirs,
                                                                                      tmp_path):
    model, tok = load_model(str(tiny_model_dirs[arch]))
    hp = mend_hparams(tmp_path)
    h = MendHparams.from_dict(hp)
    meta = train(model, tok, CASES, h, None, h.checkpoint_path(None))
    hist = meta["history"]
    first = sum(r["edit_nll"] for r in hist[:3]) / 3
    last = sum(r["edit_nll"] for r in hist[-3:]) / 3
    assert last < 0.5 * first, (first, last)  # the training loss falls
    assert meta["steps"] == 80 and len(hist) == 20
    editor = get_editor("mend")
    before = snapshot(model)
    case = CASES[1]
    p0 = p_new(model, tok, case)
    handle = editor.apply(model, tok, [case], hp, EditContext(model))
    assert p_new(model, tok, case) > 2 * p0
    assert changed(model, before) == sorted(edited_weights(model, h))
    handle.restore()
    assert changed(model, before) == []


def test_sadr_term_is_zero_at_gamma_zero_and_changes_the_checkpoint_above(tiny_model_dirs, tmp_path):
    from safetensors.torch import load_file

    model, tok = load_model(str(tiny_model_dirs["llama"]))
    h = MendHparams.from_dict(mend_hparams(tmp_path, train_steps=24, layers=[1, 2]))
    plain = train(model, tok, CASES, h, None, h.checkpoint_path(None))
    zero = train(model, tok, CASES, h, {"gamma": 0.0, "hinge": False}, h.checkpoint_path({"gamma": 0.0, "hinge": False}))
    on = train(model, tok, CASES, h, {"gamma": 10.0, "hinge": False}, h.checkpoint_path({"gamma": 10.0, "hinge": False}))
    assert all(r["sadr"] == 0 for r in zero["history"]) and any(r["sadr"] > 0 for r in on["history"])
    a, b, c = (load_file(str(h.checkpoint_path(s))) for s in (None, {"gamma": 0.0, "hinge": False},
                                                               {"gamma": 10.0, "hinge": False}))
    assert all(torch.equal(a[k], b[k]) for k in a)  # γ = 0: the plain training, tensor for tensor
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert [r["edit_nll"] for r in plain["history"]] == [r["edit_nll"] for r in zero["history"]]


@pytest.mark.parametrize("arch", ["gptj", "llama"])
def test_replaying_the_blocks_below_the_edit_gives_the_same_checkpoint_bytes(arch, tiny_model_dirs, tmp_path,
                                                                             monkeypatch):
    """Training replays blocks 0..min(layers)−1 from the edit row's and the locality row's first forward
    (editors/replay.py, PrefixCache): the checkpoint is byte-identical to running them every time, SADR on."""
    import editors.mend_train as mt
    from model_layer.arch import arch_for

    model, tok = load_model(str(tiny_model_dirs[arch]))
    h = MendHparams.from_dict(mend_hparams(tmp_path, train_steps=8, layers=[2, 3]))
    sadr = {"gamma": 1.0, "hinge": False}
    calls = []  # block 0's MLP runs only when block 0 really computes
    hook = model.get_submodule(arch_for(model).layer("mlp", 0)).register_forward_pre_hook(lambda *_: calls.append(1))
    got, n_calls = {}, {}
    try:
        for cached in (True, False):
            monkeypatch.setattr(mt, "PREFIX_CACHE", cached)
            calls.clear()
            out = tmp_path / f"{cached}.safetensors"
            got[cached] = (train(model, tok, CASES, h, sadr, out)["history"], out.read_bytes())
            n_calls[cached] = len(calls)
    finally:
        hook.remove()
    assert got[True] == got[False]
    assert any(r["sadr"] > 0 for r in got[True][0])
    # per training edit: edit row, locality row, SADR's unedited rows, post-edit edit and locality rows = 5 forwards;
    # replayed, only the first two compute
    assert (n_calls[False], n_calls[True]) == (5 * 8, 2 * 8), n_calls


def test_a_killed_training_resumes_to_the_same_bytes(tiny_model_dirs, tmp_path):
    model, tok = load_model(str(tiny_model_dirs["gpt_neox"]))
    h = MendHparams.from_dict(mend_hparams(tmp_path, train_steps=24, checkpoint_every=2))
    once = tmp_path / "once.safetensors"
    train(model, tok, CASES, h, None, once)

    class Kill(Exception):
        pass

    def die(step, row):
        if step == 16:
            raise Kill

    twice = tmp_path / "twice.safetensors"
    with pytest.raises(Kill):
        train(model, tok, CASES, h, None, twice, die)
    assert not twice.exists() and twice.with_name(twice.name + ".resume.pt").is_file()
    train(model, tok, CASES, h, None, twice)
    assert twice.read_bytes() == once.read_bytes()
    assert not twice.with_name(twice.name + ".resume.pt").exists()


def test_training_cases_exclude_the_evaluated_ones_in_a_seeded_order():
    got = training_cases(CASES, {"syn-0", "syn-3"}, seed=0)
    assert sorted(c.case_id for c in got) == sorted(c.case_id for c in CASES if c.case_id not in {"syn-0", "syn-3"})
    assert [c.case_id for c in got] == [c.case_id for c in training_cases(CASES, {"syn-0", "syn-3"}, seed=0)]
    assert [c.case_id for c in got] != [c.case_id for c in training_cases(CASES, {"syn-0", "syn-3"}, seed=1)]


def test_mend_hparams_and_missing_checkpoints_fail_in_one_line(tiny_model_dirs, tmp_path):
    from basis.errors import UserError
    from editors.base import HparamsError

    editor = get_editor("mend")
    for bad, what in (({"layers": []}, "layers"), ({"layers": [1], "modules": ["mlp"]}, "modules"),
                      ({"layers": [1], "rank": 0}, "rank"), ({"layers": [1], "cloc": -1}, "cloc")):
        with pytest.raises(HparamsError, match=what):
            editor.check_hparams(None, bad)
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    with pytest.raises(HparamsError, match="layers"):
        editor.check_hparams(model, {"layers": [9]})
    with pytest.raises(UserError, match="train-mend"):
        editor.apply(model, tok, [CASES[0]], mend_hparams(tmp_path), EditContext(model))
    with pytest.raises(HparamsError, match=r"\+steps"):
        editor.apply(model, tok, [CASES[0]], mend_hparams(tmp_path), EditContext(model, steps_matched=True))
    assert target_ids(tok, CASES[0].prompt, CASES[0].target_new)  # the synthetic cases tokenise


def test_mend_cells_through_the_harness(tiny_model_dirs, tmp_path):
    from evaluators.harness import CellSpec, run_cell, run_pre

    model, tok = load_model(str(tiny_model_dirs["llama"]))
    hp = mend_hparams(tmp_path, train_steps=8)
    h = MendHparams.from_dict(hp)
    editor = get_editor("mend")
    for sadr in (None, editor.sadr_settings(hp)):
        train(model, tok, CASES, h, sadr, h.checkpoint_path(sadr))
    cases = CASES[:2]
    run_pre(model, tok, "tiny", "test", cases, tmp_path / "pre.jsonl", progress=False)
    for sadr in (False, True):
        rows = run_cell(model, tok, CellSpec("test", "tiny", "mend", sadr, hp), "test", cases, tmp_path / "pre.jsonl",
                        tmp_path / f"mend{sadr}.jsonl", verify_restore=True, progress=False)
        assert [r["case_id"] for r in rows] == [x.case_id for x in cases]
        want = h.checkpoint_path(editor.sadr_settings(hp) if sadr else None).name
        assert all(r["editor"]["diagnostics"]["checkpoint"] == want for r in rows)


def test_the_checkpoint_name_covers_the_training_set(tmp_path):
    from editors.mend_train import training_id

    base = mend_hparams(tmp_path)
    a = MendHparams.from_dict(dict(base, train_cases=training_id(CASES[:5])))
    b = MendHparams.from_dict(dict(base, train_cases=training_id(CASES[1:6])))
    assert a.checkpoint_path(None) != b.checkpoint_path(None)
    assert a.checkpoint_path(None).parent.name == "mend" and a.checkpoint_path({"gamma": 1.0}).parent.name == "mend+sadr"


def test_a_cell_names_only_the_checkpoint_it_loads(tmp_path):
    """artefacts(): the plain checkpoint for a mend cell, the +SADR one for mend+sadr (the harness passes the flag),
    both for the stats/prepare callers that give no flag — so retraining one never changes the other's fingerprint."""
    editor = get_editor("mend")
    hp = mend_hparams(tmp_path)
    plain = [a.path for a in editor.artefacts(None, None, dict(hp, sadr=False))]
    sadr = [a.path for a in editor.artefacts(None, None, dict(hp, sadr=True))]
    both = [a.path for a in editor.artefacts(None, None, hp)]
    assert len(plain) == len(sadr) == 1 and plain != sadr and both == plain + sadr
    assert "/mend/" in plain[0] and "/mend+sadr/" in sadr[0]
