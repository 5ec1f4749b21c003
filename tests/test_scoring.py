"""evaluators.scoring.ProbeScorer against a hand-written log-prob computation and lm-eval's public API.

Protocol under test (reference-spec §2.2, evaluators/scoring.py): the context is ``prompt + " "``; the joint string
``prompt + " " + target`` is tokenised with the tokenizer's defaults (BOS for Llama/Gemma, none for GPT-J/NeoX);
the continuation is what follows the tokens of ``prompt`` alone, and its score is the sum over those positions of
``log_softmax(logits)[pos - 1, token]``.
"""
from __future__ import annotations

import pytest
import torch

from data_pipeline.schema import Case, PiqaItem, Probe
from evaluators.probes import build_probes
from evaluators.scoring import ProbeScorer, tokenizer_adds_bos

TINY = ("gptj", "gpt_neox", "llama", "gemma3")
PAIRS = [  # (prompt, target): contexts and continuations of different token lengths, scored in one batch
    ("The capital of France is", "Paris"),
    ("Danielle Darrieux is a native speaker of", "French"),
    ("Q", "a much longer continuation, with several words and punctuation in it."),
    ("How can I keep beads organized when I am crafting at home with the kids?", "Put them in an egg carton."),
    ("Sonny Simmons performs poetry. Zeena Parkins plays", "jazz"),
    ("The Eiffel Tower is in", "Rome"),
]


@pytest.fixture(scope="module")
def scorers(tiny_model_dirs):
    from model_layer.loading import load_model

    # a small batch size so the six pairs span several padded batches
    return {a: ProbeScorer(*load_model(str(tiny_model_dirs[a])), batch_size=4) for a in TINY}


def manual_score(model, tok, prompt: str, target: str) -> tuple[float, int]:
    """Sum of log-probs of the joint string's tokens after the prompt's tokens (one unpadded forward)."""
    joint = tok(prompt + " " + target)["input_ids"]
    ctx = tok(prompt)["input_ids"]
    assert joint[:len(ctx)] == ctx, "the prompt's tokens must be a prefix of the joint tokens"
    assert len(joint) > len(ctx)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([joint])).logits[0].double(), dim=-1)
    total = sum(float(logp[pos - 1, joint[pos]]) for pos in range(len(ctx), len(joint)))
    return total, len(joint) - len(ctx)


@pytest.mark.parametrize("arch", TINY)
def test_score_pairs_matches_manual_computation(arch, scorers):
    sc = scorers[arch]
    got = sc.score_pairs([(p + " ", t) for p, t in PAIRS])
    assert len(got) == len(PAIRS)
    lengths = set()
    for (p, t), (lp, n) in zip(PAIRS, got):
        exp_lp, exp_n = manual_score(sc.model, sc.tok, p, t)
        assert n == exp_n
        assert lp == pytest.approx(exp_lp, abs=1e-4)
        assert lp < 0
        lengths.add(n)
    assert len(lengths) >= 3  # really different continuation lengths in one call
    # the batch composition does not matter: one pair at a time gives the same numbers
    for pair, (lp, n) in zip(PAIRS, got):
        lp1, n1 = sc.score_pairs([(pair[0] + " ", pair[1])])[0]
        assert n1 == n and lp1 == pytest.approx(lp, abs=1e-4)


@pytest.mark.parametrize("arch", TINY)
def test_score_pairs_agrees_with_lm_eval_loglikelihood(arch, scorers):
    from lm_eval.api.instance import Instance

    sc = scorers[arch]
    ours = sc.score_pairs([(p + " ", t) for p, t in PAIRS])
    # lm-eval's own convention puts the space in the continuation; both must give the same numbers
    for args in ([(p + " ", t) for p, t in PAIRS], [(p, " " + t) for p, t in PAIRS]):
        reqs = [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=0) for a in args]
        theirs = sc.lm.loglikelihood(reqs, disable_tqdm=True)
        assert len(theirs) == len(PAIRS)
        for (lp, _n), (lp_e, _greedy) in zip(ours, theirs):
            assert lp == pytest.approx(lp_e, abs=1e-4)


@pytest.mark.parametrize("arch,bos", [("gptj", False), ("gpt_neox", False), ("llama", True), ("gemma3", True)])
def test_bos_only_where_the_tokenizer_adds_it(arch, bos, scorers):
    sc = scorers[arch]
    assert tokenizer_adds_bos(sc.tok) is bos
    ctx_enc, cont_enc = sc.lm._encode_pair("The capital of France is ", "Paris")
    bos_id = sc.tok.bos_token_id
    assert (ctx_enc[0] == bos_id) is bos
    assert ctx_enc.count(bos_id) == int(bos)  # exactly one BOS for Llama/Gemma, none for GPT-J/NeoX
    assert bos_id not in cont_enc
    # the context's tokens are the tokenizer's default encoding of the prompt without its trailing space
    assert ctx_enc == sc.tok("The capital of France is")["input_ids"]
    assert sc.tok.decode(cont_enc) == " Paris"


def test_empty_continuation_is_an_error(scorers):
    with pytest.raises(ValueError, match="tokenises to nothing"):
        scorers["gptj"].score_pairs([("The capital of France is", "")])


# --------------------------------------------------------------------------------------------- score_case

CASE = Case(
    case_id="t-1", source="counterfact", subject="Danielle Darrieux",
    prompt="The mother tongue of Danielle Darrieux is", target_true="French", target_new="English",
    paraphrase=(Probe("Danielle Darrieux spoke the language", "English"),
                Probe("Where Danielle Darrieux is from, people speak the language of", "English")),
    neighborhood=(Probe("The native language of Montesquieu is", "French"),
                  Probe("Jacques Chirac, a native", "French")),
    relation=(Probe("Danielle Darrieux was born in the city of", "Bordeaux"),),
    piqa=PiqaItem("How can I keep beads organized?", "Put them in an egg carton.", "Put them in a bowl of water."),
)


def flat(result):
    return [(k, side, i, tuple(v)) for k in sorted(result) for side in ("right", "wrong")
            for i, v in enumerate(result[k][side])]


def test_build_probes_of_the_hand_built_case():
    probes = build_probes(CASE)
    assert set(probes) == {"rewrite", "paraphrase", "neighborhood", "neighborhood_distracted", "relation",
                           "relation_distracted", "piqa", "piqa_distracted"}
    assert CASE.edit_text == "The mother tongue of Danielle Darrieux is English."
    for key in ("neighborhood", "relation", "piqa"):
        plain, dist = probes[key], probes[f"{key}_distracted"]
        assert dist.contexts == tuple(CASE.edit_text + " " + c for c in plain.contexts)
        assert (dist.right, dist.wrong) == (plain.right, plain.wrong)
    assert probes["neighborhood"].wrong == ("English", "English")
    assert probes["paraphrase"].wrong == ("French", "French")
    assert probes["piqa"].right == (CASE.piqa.right,) and probes["piqa"].wrong == (CASE.piqa.wrong,)


def test_score_case_shape_alignment_and_in_place_edits(scorers):
    sc = scorers["llama"]
    probes = build_probes(CASE)
    res = sc.score_case(CASE)
    assert set(res) == set(probes)
    for key, ps in probes.items():
        assert set(res[key]) == {"right", "wrong"}
        assert len(res[key]["right"]) == len(res[key]["wrong"]) == len(ps.contexts)
        # each entry is the score of (context + " ", target) for the aligned target
        expect_r = sc.score_pairs([(c + " ", t) for c, t in zip(ps.contexts, ps.right)])
        expect_w = sc.score_pairs([(c + " ", t) for c, t in zip(ps.contexts, ps.wrong)])
        for got, exp in ((res[key]["right"], expect_r), (res[key]["wrong"], expect_w)):
            for (lp, n), (elp, en) in zip(got, exp):
                assert n == en and lp == pytest.approx(elp, abs=1e-4)
    # distraction changes the scores (the edit sentence really is in the context)
    assert res["neighborhood_distracted"]["right"][0][0] != pytest.approx(res["neighborhood"]["right"][0][0], abs=1e-4)

    before = flat(res)
    for module, row in (("lm_head", "target"), ("model.embed_tokens", "prompt")):
        w = sc.model.get_submodule(module).weight
        ids = sc.tok(" " + CASE.target_new if row == "target" else CASE.prompt, add_special_tokens=False)["input_ids"]
        idx = (ids[0], 0)
        old = w[idx].item()
        try:
            with torch.no_grad():
                w[idx] += 0.5  # in place, same HFLM: no re-wrap, no cache
            edited = flat(sc.score_case(CASE))
            assert edited != before
            rewrite_right = [v for v in zip(before, edited) if v[0][:3] == ("rewrite", "right", 0)][0]
            assert abs(rewrite_right[0][3][0] - rewrite_right[1][3][0]) > 1e-4, module
        finally:
            with torch.no_grad():
                w[idx] = old
        assert flat(sc.score_case(CASE)) == before  # restoring the weight restores the exact scores
