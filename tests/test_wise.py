"""WISE: TIES against its closed form, the router on a hand-built side memory (top-1 among memories over their
thresholds, per row, causal, independent of padding, batch composition and a KV cache), edits on tiny random models
of every architecture (the target goes up through the side memory, only the down-projection is swapped, restore is
bit-exact, hooks included), SADR's term (zero at γ = 0, a different side memory above), and a sequential stream's
shards, merges and retrieval."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from basis.cells import Mode
from editors.base import EditContext
from editors.registry import get_editor
from editors.wise import SideMemory, WiseHparams, ties_merge
from model_layer.arch import arch_for
from model_layer.checksum import param_checksum
from model_layer.loading import load_model
from test_mend import CASES, p_new

ARCHS = ["gptj", "gpt_neox", "llama", "gemma3"]


def model_state(model):
    """Parameters and the module tree (names, classes, identities) and the root's pre-hooks."""
    return (param_checksum(model), [(n, type(m).__name__, id(m)) for n, m in model.named_modules()],
            len(model._forward_pre_hooks))


def wise_hparams(mirror, **kw):
    hp = {"layer": 2, "n_iter": 25, "edit_lr": 5.0, "act_margin": [0.5, 5.0, 2.0], "mask_ratio": 1.0,
          "template_lengths": [[5, 2]], "stats_corpus": str(mirror / "wikitext-2-raw" / "wiki.test.raw")}
    hp.update(kw)
    return hp


def test_ties_merge_trims_elects_the_sign_and_averages_the_agreeing_entries():
    base = torch.zeros(4)
    a = torch.tensor([3.0, -1.0, 0.1, 2.0])
    b = torch.tensor([1.0, 2.0, -0.2, -4.0])
    got = ties_merge(base, [a, b], [0.5, 0.5], density=0.5)
    # trimmed: a -> [3, 0, 0, 2], b -> [0, 2, 0, -4]; weighted sums 1.5, 1, 0, -1 -> signs +, +, +, -
    # agreeing entries: [a], [b], none, [b] -> disjoint weighted means 3, 2, 0, -4
    assert torch.allclose(got, torch.tensor([3.0, 2.0, 0.0, -4.0]))
    assert torch.equal(ties_merge(base, [a], [1.0], density=1.0), a)  # one full task vector comes back whole


def hand_memory(d: int = 4):
    """A main memory W = 0 (bias 0) and a side memory answering only along input direction e0."""
    main = nn.Linear(d, d, bias=True)
    with torch.no_grad():
        main.weight.zero_()
        main.bias.zero_()
    mem = SideMemory(main, act=lambda x: x, act_ratio=1.0)
    with torch.no_grad():
        mem.side.zero_()
        mem.side[:, 0] = 1.0  # W' x = x_0 · 1: distance √d·|x_0|
    mem.shard_scores = [1.0]  # ε = 1
    return mem


def test_the_router_answers_from_the_side_memory_only_where_the_prefix_score_exceeds_the_threshold():
    mem = hand_memory()
    x = torch.zeros(1, 3, 4)
    x[0, 1, 0] = 1.0  # distances ‖W'x − Wx‖ = 2|x_0|: 0, 2, 0 -> prefix means 0, 1, 0.667, none above ε = 1
    mem(x)
    assert mem.last_routed.tolist() == [[False, False, False]]
    x[0, 2, 0] = 1.0  # distances 0, 2, 2 -> prefix means 0, 1, 1.333
    out = mem(x)
    assert mem.last_routed.tolist() == [[False, False, True]]
    assert torch.equal(out[0, 2], torch.ones(4)) and torch.equal(out[0, :2], torch.zeros(2, 4))


def test_the_router_is_per_row_and_ignores_padding_and_batch_composition():
    mem = hand_memory()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 4, generator=g) for n in (5, 3, 4)]
    alone = []
    for r in rows:
        mem.call = {}
        alone.append(mem(r[None])[0])
    width = max(r.shape[0] for r in rows)
    for side in ("right", "left"):
        x = torch.zeros(len(rows), width, 4)
        mask = torch.zeros(len(rows), width)
        for i, r in enumerate(rows):
            sl = slice(0, r.shape[0]) if side == "right" else slice(width - r.shape[0], width)
            x[i, sl], mask[i, sl] = r, 1
        mem.call = {"mask": mask, "continues": False}
        out = mem(x)
        for i, r in enumerate(rows):
            sl = slice(0, r.shape[0]) if side == "right" else slice(width - r.shape[0], width)
            assert torch.allclose(out[i, sl], alone[i], atol=1e-6), (side, i)
    # a KV-cached continuation carries the prefix sums: token by token equals the whole row at once
    r = rows[0]
    mem.call = {"mask": torch.ones(1, 2), "continues": False}
    steps = [mem(r[None, :2])[0]]
    for t in range(2, r.shape[0]):
        mem.call = {"mask": torch.ones(1, t + 1), "continues": True}
        steps.append(mem(r[None, t:t + 1])[0])
    assert torch.allclose(torch.cat(steps), alone[0], atol=1e-6)


def test_the_router_picks_the_top_memory_among_those_over_their_thresholds():
    mem = hand_memory()
    w1 = torch.zeros(4, 4)
    w1[:, 1] = 3.0  # a stored memory answering along e1 with threshold 1
    mem.memories = [(w1, 1.0)]
    x = torch.zeros(2, 1, 4)
    x[0, 0, 0] = 1.0  # side: distance 2 > 1; memory: 0
    x[1, 0, :2] = 1.0  # side: 2, memory: 6 -> the memory wins
    out = mem(x)
    assert torch.equal(out[0, 0], torch.ones(4)) and torch.equal(out[1, 0], torch.full((4,), 3.0))


@pytest.mark.parametrize("arch", ARCHS)
def test_wise_edits_through_its_side_memory_and_restores_exactly(arch, tiny_model_dirs, mirror):
    model, tok = load_model(str(tiny_model_dirs[arch]))
    before = model_state(model)
    n_hooks = len(model._forward_pre_hooks)
    name = arch_for(model).layer("mlp_out", 2)
    original = model.get_submodule(name)
    w_before = original.weight.detach().clone()
    p0 = p_new(model, tok, CASES[0])
    handle = get_editor("wise").apply(model, tok, [CASES[0]], wise_hparams(mirror), EditContext(model))
    mem = model.get_submodule(name)
    assert isinstance(mem, SideMemory) and mem.main is original
    assert torch.equal(original.weight, w_before)  # the main memory is never written
    assert p_new(model, tok, CASES[0]) > 10 * p0 and mem.last_routed.any()
    assert len(model._forward_pre_hooks) == n_hooks + 1
    handle.restore()
    assert model.get_submodule(name) is original and len(model._forward_pre_hooks) == n_hooks
    assert model_state(model) == before


@pytest.mark.parametrize("arch", ARCHS)
def test_the_blocks_below_the_side_memory_run_once_per_input_and_change_nothing(arch, tiny_model_dirs, mirror):
    """The prefix cache (editors/replay.py, PrefixCache): blocks 0..layer-1 run once for the edit rows and once for
    the unrelated row, not at every step, and the side memory, losses and routing score are bit-identical to
    running every block at every step (with SADR's term on, which records attention above the edit)."""
    from editors.wise import Wise

    model, tok = load_model(str(tiny_model_dirs[arch]))
    name = arch_for(model).layer("mlp_out", 2)
    mlp0 = model.get_submodule(arch_for(model).layer("mlp", 0))  # runs only when block 0 really computes
    calls = []
    hook = mlp0.register_forward_pre_hook(lambda *_: calls.append(1))
    got = {}
    try:
        for cached in (True, False):
            calls.clear()
            hp = wise_hparams(mirror, n_iter=6, sadr_steps=6)
            h = Wise(prefix_cache=cached).apply(model, tok, [CASES[0]], hp,
                                                EditContext(model, {"gamma": 1.0, "hinge": False}))
            got[cached] = (model.get_submodule(name).side.detach().clone(), h.diagnostics["final_loss"],
                           h.diagnostics["score"], h.diagnostics["steps"], len(calls))
            h.restore()
    finally:
        hook.remove()
    (side_c, loss_c, score_c, steps, calls_c), (side_f, loss_f, score_f, steps_f, calls_f) = got[True], got[False]
    assert steps == steps_f == 6 and torch.equal(side_c, side_f) and loss_c == loss_f and score_c == score_f
    # uncached: 2 forwards per step (edit rows, unrelated row); cached: only the first step's (the rest of the count is
    # the same in both: templates, SADR's unedited reference, the routing score)
    assert calls_f - calls_c == 2 * (steps - 1), (calls_c, calls_f)


def test_sadr_term_is_zero_at_gamma_zero_and_moves_the_side_memory_above(tiny_model_dirs, mirror):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    name = arch_for(model).layer("mlp_out", 2)
    ed = get_editor("wise")
    sides = {}
    for label, ctx_sadr in (("plain", None), ("zero", {"gamma": 0.0, "hinge": False}),
                            ("on", {"gamma": 50.0, "hinge": False})):
        h = ed.apply(model, tok, [CASES[0]], wise_hparams(mirror, sadr_steps=25), EditContext(model, ctx_sadr))
        sides[label] = model.get_submodule(name).side.detach().clone()
        if ctx_sadr:
            assert "SADRLoss" in h.diagnostics["final_loss"]
        h.restore()
    assert torch.equal(sides["plain"], sides["zero"]) and not torch.equal(sides["plain"], sides["on"])


@pytest.mark.parametrize("retrieve", [True, False])
def test_a_stream_stores_shards_merges_them_and_restores_as_a_unit(retrieve, tiny_model_dirs, mirror):
    model, tok = load_model(str(tiny_model_dirs["gpt_neox"]))
    before = model_state(model)
    name = arch_for(model).layer("mlp_out", 2)
    hp = wise_hparams(mirror, n_iter=5, save_freq=2, merge_freq=4, retrieve=retrieve, mask_ratio=0.5)
    ctx = EditContext(model)
    states = []
    for i in range(6):
        ctx.push(get_editor("wise").apply(model, tok, [CASES[i]], hp, ctx))
        mem = model.get_submodule(name)
        states.append((len(mem.shard_scores), len(mem.stored), len(mem.memories)))
    # after edits 1..6: shard sizes and stored/merged counts (saved every 2, merged every 4)
    assert states == [(1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1)]
    assert mem.count == 6
    ctx.handles[-1].restore()  # a later edit's undo puts the stream back to where it was before it
    assert (len(mem.shard_scores), len(mem.stored), len(mem.memories)) == (1, 0, 1) and mem.count == 5
    ctx.handles.pop()
    ctx.restore_all()
    assert model.get_submodule(name) is not mem and model_state(model) == before


def test_wise_hparams_fail_in_one_line():
    from editors.base import HparamsError

    for bad, what in (({"layer": 1, "act_margin": [1, 2]}, "act_margin"), ({"layer": 1, "mask_ratio": 0}, "mask_ratio"),
                      ({"layer": 1, "save_freq": 3, "merge_freq": 4}, "merge_freq"), ({}, "layer")):
        with pytest.raises(HparamsError, match=what):
            WiseHparams.from_dict(bad)


@pytest.mark.parametrize("cell", ["wise+sadr", "wise.seq3-each"])
def test_wise_cells_through_the_harness(cell, tiny_model_dirs, mirror, tmp_path):
    """The harness scores through the router (probes, lm-eval tasks, generation) and finds the model unchanged
    after every unit (parameters, buffers, module tree, hooks)."""
    from basis.cells import parse_cell
    from evaluators.harness import CellSpec, run_cell, run_pre

    c = parse_cell(cell)
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    cases = CASES[:3]
    hp = wise_hparams(mirror, n_iter=4, sadr_steps=4, save_freq=2, merge_freq=2)
    run_pre(model, tok, "tiny", "test", cases, tmp_path / "pre.jsonl", progress=False)
    rows = run_cell(model, tok, CellSpec("test", "tiny", c.editor, c.sadr, hp, mode=c.mode), "test", cases,
                    tmp_path / "pre.jsonl", tmp_path / f"{cell}.jsonl", verify_restore=True, progress=False)
    assert [r["case_id"] for r in rows] == [x.case_id for x in cases]
    assert all(r["post"] != r["pre"] for r in rows)
    if c.mode.kind == "seq":
        assert [r["editor"]["diagnostics"]["edits"] for r in rows] == [1, 2, 3]


def test_a_refused_or_failed_edit_leaves_nothing_behind(tiny_model_dirs, mirror, monkeypatch):
    """WISE+SADR in a stream is refused at its second edit with one line; the side memory's parameter never keeps a
    gradient flag; an edit that fails midway removes its side memory and hook."""
    from editors.base import HparamsError

    model, tok = load_model(str(tiny_model_dirs["llama"]))
    before = model_state(model)
    name = arch_for(model).layer("mlp_out", 2)
    ed = get_editor("wise")
    ctx = EditContext(model, {"gamma": 1.0, "hinge": True})
    ctx.push(ed.apply(model, tok, [CASES[0]], wise_hparams(mirror, n_iter=2, sadr_steps=2), ctx))
    assert not model.get_submodule(name).side.requires_grad
    with pytest.raises(HparamsError, match="in a stream is not supported"):
        ed.apply(model, tok, [CASES[1]], wise_hparams(mirror, n_iter=2, sadr_steps=2), ctx)
    ctx.restore_all()
    assert model_state(model) == before
    # ... and the harness refuses such a cell before anything runs
    from basis.errors import UserError
    from evaluators.harness import CellSpec, prepare_cell

    with pytest.raises(UserError, match="cannot run SADR in a stream"):
        prepare_cell(None, None, CellSpec("t", "tiny", "wise", True, wise_hparams(mirror), mode=Mode("seq", 4)))

    def broken(self, out, main_out):
        raise RuntimeError("boom")

    monkeypatch.setattr(SideMemory, "_dist", broken)  # fails inside the edit, after the swap and the hook
    with pytest.raises(RuntimeError, match="boom"):
        ed.apply(model, tok, [CASES[0]], wise_hparams(mirror, n_iter=2), EditContext(model))
    assert model_state(model) == before
