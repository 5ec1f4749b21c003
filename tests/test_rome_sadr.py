"""ROME and SADR on the shared locate-then-edit core: tiny random models of every architecture, a hand-computed
SADR example, γ = 0 ⇒ plain ROME, exact restore over consecutive edits."""
from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.schema import Case, Probe
from editors.core import (VHparams, build_batch, generate_context_templates, make_request, optimise_target,
                          target_ids)
from editors.rome import Rome
from editors.sadr import SADRLoss, sadr_kl
from evaluators.scoring import ProbeScorer
from model_layer.arch import arch_for
from model_layer.checksum import param_checksum
from model_layer.loading import load_model

CASE = Case(case_id="cf-test", source="counterfact", subject="Danielle Darrieux",
            prompt="The mother tongue of Danielle Darrieux is", target_true="French", target_new="English",
            neighborhood=(Probe("The mother tongue of Léon Blum is", "French"),))
CASES = [
    CASE,
    Case(case_id="cf-2", source="counterfact", subject="Sonny Simmons", prompt="Sonny Simmons performs",
         target_true="jazz", target_new="poetry"),
    Case(case_id="wd-3", source="wikidata", subject="Isabel May", prompt="The occupation of Isabel May is",
         target_true="actor", target_new="politician"),
]


# Random tiny nets attend almost uniformly, so δ at a subject token *before* the last one barely reaches the
# prediction; for architecture coverage the edit prompt ends with the subject (δ feeds the prediction directly).
TINY_CASE = Case(case_id="cf-tiny", source="counterfact", subject="Danielle Darrieux",
                 prompt="The language spoken by Danielle Darrieux", target_true="of", target_new="the")


def tiny_hparams(mirror, tmp_path, **kw):
    hp = {"layer": 1, "v_num_grad_steps": 25, "template_lengths": [[5, 5]], "stats_tokens": 3000,
          "stats_max_len": 128, "stats_dir": str(tmp_path / "stats"), "model_id": "tiny",
          "stats_corpus": str(mirror / "wikitext-2-raw" / "wiki.test.raw")}
    hp.update(kw)
    return hp


def next_token_logits(model, tok, prompt: str) -> torch.Tensor:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1]


@pytest.mark.parametrize("arch", ["gptj", "gpt_neox", "llama", "gemma3"])
def test_rome_puts_target_new_on_top(arch, tiny_model_dirs, mirror, tmp_path):
    model, tok = load_model(str(tiny_model_dirs[arch]))
    CASE = TINY_CASE
    first_new = target_ids(tok, CASE.prompt, CASE.target_new)[0]
    before = next_token_logits(model, tok, CASE.prompt)
    assert before.argmax().item() != first_new
    ck = param_checksum(model)
    # Gemma-3's post-feed-forward RMSNorm rescales the MLP output (and δ with it), so it needs more steps
    steps = 60 if arch == "gemma3" else 25
    handle = Rome().edit(model, tok, CASE, tiny_hparams(mirror, tmp_path, v_num_grad_steps=steps))
    after = next_token_logits(model, tok, CASE.prompt)
    p_before, p_after = before.softmax(-1)[first_new].item(), after.softmax(-1)[first_new].item()
    assert p_after > 10 * p_before
    if arch != "gemma3":
        assert after.argmax().item() == first_new, f"{arch}: target_new's first token is not the argmax after ROME"
    # gemma3: the post-feed-forward RMSNorm bounds how far one MLP output can move the residual stream, so a
    # random tiny net is not driven all the way to top-1 (known limitation, documented in model_layer/arch.py)
    # only the rewrite module changed
    assert list(handle.originals) == [arch_for(model).layer("mlp_out", 1) + ".weight"]
    scores = ProbeScorer(model, tok, batch_size=4).score_pairs([(CASE.prompt + " ", CASE.target_new),
                                                                (CASE.prompt + " ", CASE.target_true)])
    (lp_new, n_new), (lp_true, n_true) = scores
    assert lp_new / n_new > lp_true / n_true  # ES success under the paper protocol
    handle.restore()
    assert param_checksum(model) == ck


def test_exact_restore_after_five_consecutive_edits(tiny_model_dirs, mirror, tmp_path):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    ck = param_checksum(model)
    rome = Rome()
    for i in range(5):
        case = CASES[i % len(CASES)]
        h = rome.edit(model, tok, case, tiny_hparams(mirror, tmp_path, v_num_grad_steps=4, sadr=bool(i % 2)))
        assert param_checksum(model) != ck  # the edit really changed the weights
        h.restore()
        assert param_checksum(model) == ck, f"edit {i}: weights not bit-identical after restore()"


def test_sadr_kl_and_mask_hand_computed():
    # one layer, one prompt, two heads, three keys; query row q = 2, subject key s = 1
    p = torch.tensor([[[[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]]]])  # vanilla  [L=1, N=1, H=2, T=3]
    q = torch.tensor([[[[0.2, 0.6, 0.2], [0.5, 0.2, 0.3]]]])  # current
    loss, mask = sadr_kl(p, q, torch.tensor([1]), hinge=True, eps=0.0)
    # M = max_h P[.,s] = max(0.3, 0.1) = 0.3; head 0: Q=0.6 > 0.3 → selected; head 1: Q=0.2 → not selected
    assert mask.tolist() == [[[True, False]]]
    kl0 = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.6) + 0.2 * math.log(0.2 / 0.2)
    assert loss.item() == pytest.approx(kl0, rel=1e-6)
    loss_all, mask_all = sadr_kl(p, q, torch.tensor([1]), hinge=False, eps=0.0)
    kl1 = 0.6 * math.log(0.6 / 0.5) + 0.1 * math.log(0.1 / 0.2) + 0.3 * math.log(0.3 / 0.3)
    assert mask_all.all() and loss_all.item() == pytest.approx(kl0 + kl1, rel=1e-6)
    # eps is added to both sides without renormalisation
    loss_eps, _ = sadr_kl(p, q, torch.tensor([1]), hinge=True, eps=1e-8)
    kl0e = sum((a + 1e-8) * math.log((a + 1e-8) / (b + 1e-8)) for a, b in ((0.5, 0.2), (0.3, 0.6), (0.2, 0.2)))
    assert loss_eps.item() == pytest.approx(kl0e, rel=1e-6)


def test_sadr_matches_loop_reference_on_tiny_model(tiny_model_dirs):
    """Vectorised SADR == a plain loop over layers, prompts and heads on real attention maps of a tiny model."""
    model, tok = load_model(str(tiny_model_dirs["llama"]), attn_implementation="eager")
    templates = ["{}", "The cat sat. {}", "I went home today. {}"]
    batch = build_batch(tok, make_request(CASE), templates, "cpu")
    with torch.no_grad():
        att_p = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True).attentions
        model.get_submodule("model.layers.2.mlp.down_proj").weight.add_(0.3)  # perturb above layer 1
        att_q = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True).attentions
    eps, total, n = 1e-8, 0.0, batch.n_rewrite
    for l in range(len(att_p)):
        layer_sum = 0.0
        for j in range(n):
            qj, sj = int(batch.query_idx[j]), int(batch.subject_idx[j])
            m = max(float(att_p[l][j, h, qj, sj]) + eps for h in range(att_p[l].shape[1]))
            for h in range(att_p[l].shape[1]):
                if float(att_q[l][j, h, qj, sj]) + eps > m:
                    pr, qr = att_p[l][j, h, qj].double() + eps, att_q[l][j, h, qj].double() + eps
                    layer_sum += float((pr * (pr / qr).log()).sum())
        total += layer_sum / n
    assert total > 0  # the perturbation really moved some selected head
    j = torch.arange(n)

    def rows(att):  # what the loop hands an ExtraLoss: {layer: [N, H, T]} at each rewriting row's query position
        return {layer: a[j, :, batch.query_idx] for layer, a in enumerate(att)}

    loss, _ = sadr_kl(torch.stack(list(rows(att_p).values())), torch.stack(list(rows(att_q).values())),
                      batch.subject_idx)
    assert loss.item() == pytest.approx(total, rel=1e-4)
    # SADRLoss: nothing at step 0, γ·L afterwards; skipping layers ≤ 1 changes nothing (their drift is 0)
    sl = SADRLoss(gamma=0.5, first_layer=0)
    assert sl(0, rows(att_p), batch) is None
    assert sl(1, rows(att_q), batch).item() == pytest.approx(0.5 * total, rel=1e-4)
    sl2 = SADRLoss(gamma=0.5, first_layer=3)
    sl2(0, rows(att_p), batch)
    assert sl2(1, rows(att_q), batch).item() == pytest.approx(0.5 * total, rel=1e-4)


def test_sadr_gamma_zero_gives_plain_rome_v_star(tiny_model_dirs):
    model, tok = load_model(str(tiny_model_dirs["llama"]), attn_implementation="eager")
    templates = generate_context_templates(model, tok, ((5, 5),), seed=0)
    batch = build_batch(tok, make_request(CASE), templates, "cpu")
    hp = VHparams(layer=1, v_num_grad_steps=8, early_stop_loss=0.0)
    plain = optimise_target(model, batch, "model.layers.1.mlp", hp)
    zero = optimise_target(model, batch, "model.layers.1.mlp", hp, [SADRLoss(gamma=0.0, first_layer=2)])
    assert torch.equal(plain.v_star, zero.v_star)
    strong = optimise_target(model, batch, "model.layers.1.mlp", hp, [SADRLoss(gamma=10.0, first_layer=2)])
    assert not torch.equal(plain.v_star, strong.v_star)  # the term does act when γ > 0


def test_context_templates_are_seeded(tiny_model_dirs):
    model, tok = load_model(str(tiny_model_dirs["gptj"]))
    a = generate_context_templates(model, tok, ((5, 5),), seed=3)
    b = generate_context_templates(model, tok, ((5, 5),), seed=3)
    c = generate_context_templates(model, tok, ((5, 5),), seed=4)
    assert a == b and a != c and a[0] == "{}" and len(a) == 6
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in a[1:])


def test_rome_hparams_errors():
    from editors.rome import RomeHparams

    with pytest.raises(ValueError, match="layer"):
        RomeHparams.from_dict({})
    with pytest.raises(ValueError, match="v_num_grad_stepz"):
        RomeHparams.from_dict({"layer": 1, "v_num_grad_stepz": 3})


def test_drift_formula_hand_computed():
    from model_layer.attention import drift

    pre = torch.tensor([[[0.1, 0.2], [0.3, 0.1]]])  # [n=1, L=2, H=2]
    post = torch.tensor([[[0.4, 0.1], [0.2, 0.3]]])
    # layer 0: max(0.3, -0.1) = 0.3; layer 1: max(-0.1, 0.2) = 0.2 → 0.5
    assert drift(pre, post) == pytest.approx([0.5])


def test_drift_probe_on_tiny_model(tiny_model_dirs, mirror, tmp_path):
    from evaluators.drift import DriftProbe, drift_prompts
    from model_layer.attention import token_index_at_char

    model, tok = load_model(str(tiny_model_dirs["llama"]))
    case = Case(case_id="cf-d", source="counterfact", subject="Danielle Darrieux",
                prompt="The mother tongue of Danielle Darrieux is", target_true="French", target_new="English",
                neighborhood=(Probe("The mother tongue of Léon Blum is", "French"), Probe("Paris is in", "France")),
                relation=(Probe("Danielle Darrieux was born in", "Bordeaux"), Probe("No subject here", "x")))
    prompts = drift_prompts(case)
    assert len(prompts["neighborhood_distracted"][0]) == 2 and len(prompts["relation"][0]) == 1
    text, end = prompts["relation"][0][0], prompts["relation"][1][0]
    i = token_index_at_char(tok, text, end - 1)
    assert tok.decode(tok(text)["input_ids"][i]).strip()[-1] == "x"  # last character of "Darrieux"
    probe = DriftProbe(model, tok)
    state = probe.before(case)
    assert probe.after(state) == {"neighborhood_distracted": [0.0, 0.0], "relation": [0.0]}  # unchanged model
    state = probe.before(case)
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.down_proj").weight.mul_(3.0)
    d = probe.after(state)
    assert any(abs(x) > 1e-4 for x in d["neighborhood_distracted"] + d["relation"])
    assert model.config._attn_implementation != "eager"  # eager only while capturing


@pytest.mark.parametrize("arch", ["gptj", "gpt_neox", "llama", "gemma3"])
def test_prefix_cache_gives_the_same_v_star(tiny_model_dirs, arch):
    """Replaying blocks 0..L from step 0's output (δ then added to block L's output) = running them every step,
    for δ at the MLP (ROME) and at the block (MEMIT), with and without SADR (rows from layers above L); where a norm
    follows the MLP (gemma3), blocks 0..L−1 are replayed and block L runs with δ at its MLP."""
    from model_layer.arch import arch_for

    model, tok = load_model(str(tiny_model_dirs[arch]))
    spec = arch_for(model)
    templates = generate_context_templates(model, tok, ((5, 3),), seed=0)
    batch = build_batch(tok, make_request(CASE), templates, "cpu")
    hp = VHparams(layer=1, v_num_grad_steps=6, early_stop_loss=0.0)
    for where in ("mlp", "block"):
        for extras in ((), (SADRLoss(gamma=5.0, first_layer=2),)):
            calls = []  # forwards of block 0's attention: every step, or step 0 only when its block is replayed
            h = model.get_submodule(spec.layer("attn", 0)).register_forward_pre_hook(lambda *_: calls.append(1))
            runs = []
            for c in (False, True):
                calls.clear()
                runs.append(optimise_target(model, batch, spec.layer(where, 1), hp,
                                            [SADRLoss(e.gamma, first_layer=e.first_layer) for e in extras],
                                            prefix_cache=c))
                # gemma3's MLP (a norm after it): blocks 0..L−1 replayed, block L run; block 0 is replayed either way
                assert len(calls) == (1 if c else 6)
            h.remove()
            a, b = (r.v_star for r in runs)
            moved = (a - runs[0].v_init).norm()
            assert moved > 0 and runs[0].steps == runs[1].steps == 6
            assert (a - b).norm() <= 1e-4 * moved, (where, len(extras), float((a - b).norm() / moved))
            if arch == "gemma3" and where == "mlp":  # only blocks below L replayed: the same tensors, bit-identical
                assert torch.equal(a, b)


def test_rome_awd_edits_without_gradient_through_attention_and_refuses_sadr(tiny_model_dirs, mirror, tmp_path):
    """detach_attention (the paper's ROME-AWD): the edit still succeeds, its v* differs from plain ROME's (the
    gradient through the attention probabilities is gone), and a +sadr cell with it is refused up front."""
    from basis.errors import UserError
    from evaluators.harness import CellSpec, prepare_cell

    model, tok = load_model(str(tiny_model_dirs["llama"]))
    ck = param_checksum(model)
    first_new = target_ids(tok, TINY_CASE.prompt, TINY_CASE.target_new)[0]
    p_before = next_token_logits(model, tok, TINY_CASE.prompt).softmax(-1)[first_new].item()
    vs = {}
    for awd in (False, True):
        h = Rome().edit(model, tok, TINY_CASE, tiny_hparams(mirror, tmp_path, detach_attention=awd))
        after = next_token_logits(model, tok, TINY_CASE.prompt).softmax(-1)[first_new].item()
        assert after > 10 * p_before
        w = model.get_submodule(arch_for(model).layer("mlp_out", 1)).weight.detach().clone()
        vs[awd] = w
        h.restore()
        assert param_checksum(model) == ck
    assert not torch.equal(vs[False], vs[True])
    # the rome_awd editor (the optional cell) is exactly ROME with detach_attention on: the same written weight
    from editors.registry import get_editor
    awd = get_editor("rome_awd")
    h = awd.edit(model, tok, TINY_CASE, tiny_hparams(mirror, tmp_path))
    assert torch.equal(model.get_submodule(arch_for(model).layer("mlp_out", 1)).weight, vs[True])
    h.restore()
    assert param_checksum(model) == ck
    with pytest.raises(UserError, match="detach_attention"):
        prepare_cell(model, tok, CellSpec("t", "tiny", "rome_awd", True, tiny_hparams(mirror, tmp_path)))
    with pytest.raises(UserError, match="detach_attention"):
        prepare_cell(model, tok, CellSpec("t", "tiny", "rome", True, tiny_hparams(mirror, tmp_path,
                                                                                  detach_attention=True)))
