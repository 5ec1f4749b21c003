"""Fluency FL and ME-PPL (reference-spec §2.4, §2.6): hand-computed values on fixed texts and a tiny model, the
lm-eval task agreeing with the per-case numbers, seeded sampling, and their aggregation."""
from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.schema import Case
from evaluators.generation import (clean_text, fluency, load_corpus, me_ppl, n_words, ngram_entropy, paper_ppl,
                                   sample_ids, sample_texts, words)
from evaluators.metrics import generation_metrics, score_cell
from model_layer.loading import load_model


def test_ngram_entropy_hand_computed():
    # words: a b a b a -> bigrams ab, ba, ab, ba (f = 1/2 each: H2 = 1); trigrams aba, bab, aba (2/3, 1/3)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b a") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * h3) / 2)
    # all-distinct 4 words: H2 = log2 3, H3 = log2 2 = 1
    assert ngram_entropy("w x y z") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("alone") == 0.0 and ngram_entropy("") == 0.0
    assert words("He left. She stayed, didn't she?") == ["He", "left", ".", "She", "stayed", ",", "did", "n't",
                                                          "she", "?"]


def test_clean_text_as_the_reference():
    assert clean_text("ﬁne\n\nnext<|endoftext|>") == "fine next"


def test_paper_ppl_hand_computed_on_tiny_model(tiny_model_dirs):
    model, tok = load_model(str(tiny_model_dirs["gptj"]))
    texts = ["the cat sat on the mat " * 10, "a second text about dogs " * 10]
    ids = tok(" ".join(texts))["input_ids"][:100]
    assert len(ids) == 100
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    ll = sum(torch.log_softmax(logits[t - 1].double(), -1)[ids[t]].item() for t in range(1, 100))
    assert paper_ppl(model, tok, texts) == pytest.approx(math.exp(-ll / 100), rel=1e-5)  # N = 100 in the exponent
    assert paper_ppl(model, tok, texts) != pytest.approx(math.exp(-ll / 99), rel=1e-5)


def test_me_ppl_matches_the_lm_eval_task(tiny_model_dirs, mirror):
    from evaluators.lm_eval_tasks import run_me_ppl
    from evaluators.scoring import ProbeScorer

    model, tok = load_model(str(tiny_model_dirs["llama"]))
    corpus = mirror / "release" / "Corpus-50.json"
    texts = load_corpus(corpus)
    assert len(texts) == 50
    scorer = ProbeScorer(model, tok, batch_size=8)
    m = me_ppl(model, tok, scorer.lm, texts)
    assert m["words"] == sum(n_words(t) for t in texts) > 1000  # lm-eval counts re.split(r"\s+") pieces
    task = run_me_ppl(scorer.lm, tok, corpus)
    assert task["n"] == 50
    assert math.exp(-m["loglik"] / m["words"]) == pytest.approx(task["word_perplexity"], rel=1e-6)


def test_sampling_is_seeded_top_k_and_100_tokens_long(tiny_model_dirs):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    prompts = ["The capital of France is", "Music"]
    a = sample_ids(model, tok, prompts, seed=3, max_out_len=30)
    assert a == sample_ids(model, tok, prompts, seed=3, max_out_len=30)
    assert a != sample_ids(model, tok, prompts, seed=4, max_out_len=30)
    for p, ids in zip(prompts, a):
        enc = tok(p)["input_ids"]
        assert len(ids) == 30 and ids[: len(enc)] == enc  # the prompt, then samples up to 30 tokens in all
        # every sampled token is among the top 5 of its step (checked with a teacher-forced pass, no padding)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        for t in range(len(enc), len(ids)):
            assert ids[t] in logits[t - 1].topk(5).indices.tolist()
    texts = sample_texts(model, tok, prompts, seed=3, max_out_len=30)
    assert texts == [clean_text(tok.decode(i, skip_special_tokens=False)) for i in a]
    assert all(p in t for p, t in zip(prompts, texts))
    f = fluency(model, tok, prompts, seed=3)
    assert f["entropy"] == pytest.approx(sum(ngram_entropy(t) for t in f["texts"]) / 2)


def _row(cid, fl=None, ppl=None):
    phase = {}
    if fl is not None:
        phase["fluency"] = {"entropy": fl, "texts": []}
    if ppl is not None:
        phase["me_ppl"] = ppl
    return {"cell": "p/m/rome", "case_id": cid, "pre": phase, "post": phase}


def test_generation_metrics_aggregate_per_case():
    rows = [_row("a", 6.0, {"paper": 40.0, "loglik": -200.0, "words": 100}),
            _row("b", 5.0, {"paper": 50.0, "loglik": -300.0, "words": 100}), _row("c")]  # c: a wikidata case
    paper = generation_metrics(rows, "post", "paper")
    assert paper["FL"]["mean"] == pytest.approx(5.5) and paper["FL"]["n"] == 2
    assert paper["PPL"]["mean"] == pytest.approx(45.0)
    lm = generation_metrics(rows, "post", "lm-eval")
    assert lm["PPL"]["mean"] == pytest.approx((math.exp(2) + math.exp(3)) / 2)
    assert generation_metrics([_row("c")], "post") == {}
    with pytest.raises(ValueError, match="case_id 'x'.*me_ppl"):
        generation_metrics([_row("x", ppl={"paper": 40.0})], "post", "lm-eval")
    with pytest.raises(ValueError, match="case_id 'y'.*fluency.entropy"):
        generation_metrics([_row("y", fl=float("nan"))], "post")


def test_scorer_adds_fl_and_me_ppl_to_counterfact_cases_only(tiny_model_dirs, mirror):
    from evaluators.scoring import ProbeScorer

    model, tok = load_model(str(tiny_model_dirs["gpt_neox"]))
    texts = load_corpus(mirror / "release" / "Corpus-50.json")[:3]
    scorer = ProbeScorer(model, tok, batch_size=8, ppl_texts=texts)
    cf = Case(case_id="cf-1", source="counterfact", subject="Paris", prompt="Paris is in", target_true="France",
              target_new="Italy", generation=("Paris is", "Paris is"))
    wd = Case(case_id="wd-1", source="wikidata", subject="Paris", prompt="Paris is in", target_true="France",
              target_new="Italy")
    s = scorer.score_case(cf)
    assert set(s["fluency"]) == {"entropy", "texts"} and len(s["fluency"]["texts"]) == 2
    assert s["me_ppl"]["paper"] == pytest.approx(paper_ppl(model, tok, texts))
    assert s == scorer.score_case(cf)  # seeded per case: identical on a rerun
    assert "fluency" not in scorer.score_case(wd) and "me_ppl" not in scorer.score_case(wd)
    # ME-PPL depends on the weights only: one value per weights key (pre-edit cases, a stream's final weights)
    calls = []
    import evaluators.generation as generation

    real = generation.me_ppl
    generation.me_ppl = lambda *a: calls.append(1) or real(*a)
    try:
        keyed = [scorer.score_case(cf, weights_key="unedited") for _ in range(3)]
        assert len(calls) == 1 and all(k == s for k in keyed)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(1.5)
        fresh = scorer.score_case(cf, weights_key="edited")
        assert len(calls) == 2 and fresh["me_ppl"]["paper"] != s["me_ppl"]["paper"]
        scorer.score_case(cf), scorer.score_case(cf)  # no key: always recomputed
        assert len(calls) == 4
    finally:
        generation.me_ppl = real
    row = {"cell": "p/m/none", "case_id": "cf-1", "pre": s, "post": s}
    sc = score_cell([row], "post", "paper")
    assert sc["FL"]["mean"] == pytest.approx(s["fluency"]["entropy"]) and sc["PPL"]["mean"] == pytest.approx(
        s["me_ppl"]["paper"])
