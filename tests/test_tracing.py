"""Causal tracing (the edit-layer selection procedure) on a tiny model."""
from __future__ import annotations

import json

import torch

from editors.tracing import known_facts, plot, trace
from model_layer.loading import load_model


def _facts_file(model, tok, tmp_path):
    recs = []  # facts "known" by the random model: its top-1 token is a word that starts with a space
    for subject in ("Danielle Darrieux", "Sonny Simmons", "Isabel May", "Paris", "The river", "A city", "Lia"):
        for rest in (" was born in", " plays the", " is located in", " speaks"):
            prompt = subject + rest
            with torch.no_grad():
                top = int(model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax())
            word = tok.decode([top])
            if word.startswith(" ") and word.strip() and tok(prompt + word)["input_ids"][len(tok(prompt)["input_ids"])] == top:
                recs.append({"subject": subject, "prompt": prompt, "attribute": word.strip()})
    recs.append({"subject": "Nobody", "prompt": "Paris is the capital of", "attribute": "zzzzqq"})
    path = tmp_path / "known.json"
    path.write_text(json.dumps(recs))
    return path


def test_trace_zero_noise_has_zero_effect_and_plot(tiny_model_dirs, tmp_path):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    facts = [("Danielle Darrieux was born in", "Danielle Darrieux", 5), ("Sonny Simmons plays", "Sonny Simmons", 7)]
    res = trace(model, tok, facts, samples=2, window=2, noise_mult=0.0, progress=False)
    assert len(res.indirect_effect) == 4 and res.n_facts == 2
    assert all(abs(v) < 1e-6 for v in res.indirect_effect)  # nothing corrupted → nothing to restore
    assert abs(res.clean_p - res.corrupted_p) < 1e-6
    noisy = trace(model, tok, facts, samples=2, window=2, noise_mult=3.0, progress=False)
    assert abs(noisy.clean_p - noisy.corrupted_p) > 1e-4  # the noise really corrupts
    assert 0 <= noisy.chosen_layer < 2  # first half of 4 layers
    assert noisy.indirect_effect[noisy.chosen_layer] == max(noisy.indirect_effect[:2])
    plot(noisy, tmp_path / "trace.png", "tiny")
    assert (tmp_path / "trace.png").read_bytes()[:4] == b"\x89PNG"


def test_known_facts_keeps_only_facts_the_model_predicts(tiny_model_dirs, tmp_path):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    facts = known_facts(model, tok, _facts_file(model, tok, tmp_path), limit=10)
    prompts = [f[0] for f in facts]
    assert "Paris is the capital of" not in prompts
    assert len(facts) >= 1 and all(isinstance(f[2], int) for f in facts)
