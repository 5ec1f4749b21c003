"""params.yaml is well-formed: profiles, models, and every editor hyper-parameter block parses."""
from __future__ import annotations

from pathlib import Path

import yaml

from basis.cells import parse_cell
from editors.alphaedit import AlphaEditHparams
from editors.registry import available_editors, get_editor
from editors.ft import FTHparams
from editors.memit import MemitHparams
from editors.pmet import PmetHparams
from editors.rome import RomeHparams
from model_layer.loading import DTYPES

PARAMS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def test_paper_profile_lists_the_five_models_with_the_papers_dtypes():
    models = PARAMS["profiles"]["paper"]["models"]
    assert {m["ref"]: m["dtype"] for m in models.values()} == {
        "EleutherAI/gpt-j-6B": "bfloat16", "meta-llama/Meta-Llama-3-8B": "bfloat16",
        "EleutherAI/gpt-neox-20b": "bfloat16", "meta-llama/Llama-2-13b-hf": "bfloat16",
        "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": "float32"}


def test_every_profile_is_complete_and_its_hparams_parse():
    for name, prof in PARAMS["profiles"].items():
        assert prof["models"] and all(m["dtype"] in DTYPES for m in prof["models"].values()), name
        for model, editors in (prof.get("hparams") or {}).items():
            assert model in prof["models"], f"{name}: hparams for unknown model {model}"
            assert set(editors) <= set(available_editors()), f"{name}/{model}: hparams for an unknown editor"
            for editor, values in editors.items():
                get_editor(editor).check_hparams(None, values)  # names, types, ranges
                if editor == "none":
                    continue
                hp = get_editor(editor).hparams_cls.from_dict(values)
                if editor == "mend":  # no steps at edit time: SADR is in its training loss
                    continue
                steps = (hp.num_steps if isinstance(hp, FTHparams) else hp.n_iter if editor == "wise"
                         else hp.v_num_grad_steps)
                assert hp.sadr_steps >= steps, f"{name}/{model}/{editor}: SADR runs fewer steps than the base editor"
        for cell in prof["cells"] + prof.get("extra_cells", []):  # every cell's editor has hparams for every model
            editor = parse_cell(cell).editor
            if editor != "none":
                assert all(editor in (prof["hparams"].get(m) or {}) for m in prof["models"]), f"{name}: {cell}"


def test_paper_rome_values_follow_the_reference():
    hp = {m: RomeHparams.from_dict(e["rome"]) for m, e in PARAMS["profiles"]["paper"]["hparams"].items()}
    assert (hp["gpt-j-6b"].layer, hp["gpt-j-6b"].sadr_gamma, hp["gpt-j-6b"].v_weight_decay) == (5, 0.01, 0.5)
    assert (hp["llama3-8b"].sadr_gamma, hp["tinyllama-1.1b"].sadr_gamma) == (0.04, 0.08)
    assert hp["tinyllama-1.1b"].clamp_norm_factor == 2 and hp["llama2-13b"].layer == 6
    assert all(h.v_lr == 0.5 and h.v_num_grad_steps == 20 and h.kl_factor == 0.0625 for h in hp.values())


def test_paper_memit_values_follow_the_reference():
    hp = {m: MemitHparams.from_dict(e["memit"]) for m, e in PARAMS["profiles"]["paper"]["hparams"].items()}
    assert {m: h.layers for m, h in hp.items()} == {
        "gpt-j-6b": (3, 4, 5, 6, 7, 8), "llama3-8b": (4, 5, 6, 7, 8), "gpt-neox-20b": (13, 14, 15, 16),
        "llama2-13b": (5, 6, 7, 8, 9), "tinyllama-1.1b": (3, 4, 5)}
    assert {m: (h.sadr_steps, h.sadr_gamma) for m, h in hp.items()} == {
        "gpt-j-6b": (20, 0.005), "llama3-8b": (80, 0.01), "gpt-neox-20b": (80, 0.005), "llama2-13b": (80, 0.04),
        "tinyllama-1.1b": (80, 0.08)}
    assert (hp["gpt-j-6b"].clamp_norm_factor, hp["tinyllama-1.1b"].clamp_norm_factor) == (0.75, 8)
    assert hp["tinyllama-1.1b"].mom2_update_weight == 20000 and hp["llama3-8b"].mom2_update_weight == 15000
    assert all(h.v_lr == 0.5 and h.v_num_grad_steps == 20 and h.kl_factor == 0.0625 for h in hp.values())


def test_run_dtype_is_checked_and_defaults_to_the_stored_dtype():
    import copy

    import pytest

    from basis.errors import UserError
    from basis.params import get_profile, run_dtype

    assert run_dtype({"dtype": "bfloat16"}) == "bfloat16" and run_dtype({}) == "float32"
    assert run_dtype({"dtype": "float32", "run_dtype": "bfloat16"}) == "bfloat16"
    for field in ("dtype", "run_dtype", "edit_group"):
        params = copy.deepcopy(PARAMS)
        target = params["profiles"]["embedded"]
        if field == "edit_group":
            target["edit_group"] = 0
        else:
            target["models"]["smollm2-135m"][field] = "fp8"
        with pytest.raises(UserError, match=field):
            get_profile(params, "embedded")


def test_runner_settings_come_from_flags_then_the_profile_then_defaults_and_are_checked():
    """profiles.<p>.runner (how run-cell and the paper pipeline execute cells): the paper profile names 8 workers;
    a flag overrides its field; a bad field is refused by name before anything runs."""
    import copy

    import pytest

    from basis.errors import UserError
    from basis.params import get_profile, runner_settings

    paper = get_profile(PARAMS, "paper")
    assert runner_settings(paper) == {"backend": "local", "workers": 8, "address": None, "threads": None}
    assert runner_settings(paper, backend="ray", address="auto", workers=None)["workers"] == 8
    assert runner_settings(paper, backend="ray", address="auto")["address"] == "auto"
    assert runner_settings(get_profile(PARAMS, "embedded"))["backend"] == "local"  # no runner section: defaults
    for bad, field in (({"backend": "slurm"}, "runner.backend"), ({"workers": 0}, "runner.workers"),
                       ({"address": ""}, "runner.address"), ({"gpus": 2}, "runner must be")):
        params = copy.deepcopy(PARAMS)
        params["profiles"]["paper"]["runner"] = bad
        with pytest.raises(UserError, match=field):
            get_profile(params, "paper")


def test_paper_values_of_the_next_editors_follow_their_sources():
    hp = PARAMS["profiles"]["paper"]["hparams"]
    pmet = {m: PmetHparams.from_dict(e["pmet"]) for m, e in hp.items()}
    alpha = {m: AlphaEditHparams.from_dict(e["alphaedit"]) for m, e in hp.items()}
    # PMET, reference-spec §4.6: GPT-J with the YAML's kl_factor 1, λ 15000 (20000 for TinyLlama), SADR 40 / 8e-2
    assert (pmet["gpt-j-6b"].layers, pmet["gpt-j-6b"].kl_factor, pmet["gpt-j-6b"].clamp_norm_factor) == (
        (3, 4, 5, 6, 7, 8), 1, 0.75)
    assert (pmet["gpt-j-6b"].sadr_steps, pmet["gpt-j-6b"].sadr_gamma) == (40, 0.08)
    assert pmet["llama2-13b"].layers == (7, 8, 9) and pmet["tinyllama-1.1b"].mom2_update_weight == 20000
    assert all(h.argmax_schedule and h.v_lr == 0.5 for h in pmet.values())
    # AlphaEdit, the original's configs: 25 steps, clamp 0.75, threshold 2e-2, L2 10; lr 0.5 (GPT-J) / 0.1 (Llama3)
    assert all(h.v_num_grad_steps == 25 and h.nullspace_threshold == 0.02 and h.L2 == 10 for h in alpha.values())
    assert (alpha["gpt-j-6b"].v_lr, alpha["llama3-8b"].v_lr, alpha["llama3-8b"].layers) == (0.5, 0.1, (4, 5, 6, 7, 8))
    # FT-L: ROME's constrained GPT-J config
    ft = FTHparams.from_dict(hp["gpt-j-6b"]["ft"])
    assert (ft.layer, ft.num_steps, ft.lr, ft.norm_constraint) == (0, 25, 5e-4, 5e-5)
