"""Helpers every command group shares: the dataset card and subset, model identity and loading, hparams with
mirror paths resolved, smoke-run paths, result-file discovery."""
from __future__ import annotations

import sys
from pathlib import Path

from basis.errors import UserError
from basis.io import read_json
from basis.params import get_profile


def _card(params) -> dict:
    path = Path(params["data"]["out"]) / "card.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `driftbench dataset build` first")
    return read_json(path)


def _subset_ids(profile) -> list[str] | None:
    """The case ids of a profile's subset file, checked (None when the file is not built yet)."""
    sp = profile.subset_path()
    if not sp.is_file():
        return None
    doc = read_json(sp)
    ids = doc.get("case_ids") if isinstance(doc, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise UserError(f"{sp}: expected {{\"case_ids\": [...]}}; rerun `driftbench dataset subset -p {profile.name}`")
    return ids


def _subset_cases(params, profile):
    from data_pipeline.dataset import load_cases

    cases = load_cases(Path(params["data"]["out"]) / "cases.jsonl")
    ids = _subset_ids(profile)
    if ids is None:
        raise UserError(f"{profile.subset_path()} not found: run `driftbench dataset subset -p {profile.name}` first")
    by_id = {c.case_id: c for c in cases}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UserError(f"{profile.subset_path()} names case {missing[0]} which is not in the dataset: rerun "
                        "`driftbench dataset subset`")
    return [by_id[i] for i in ids]


def _model_id(profile, name: str) -> str:
    """Identity of the weights for content-derived stats names: GGUF sha256 of a prepared model, else ref@revision."""
    prov = profile.prepared_model_dir(name) / "driftbench_model.json"
    m = profile.models[name]
    if prov.is_file():
        p = read_json(prov)
        return f"{name}@{p.get('gguf_sha256', p.get('ref'))[:16]}"
    return f"{m['ref']}@{m.get('revision', 'main')}"


def _hparams(params, profile, name: str, editor: str) -> dict:
    """The profile's hyper-parameters for (model, editor), with data paths resolved through the mirror."""
    from data_pipeline.dataset import resolve_mirror

    hp = dict((profile.raw.get("hparams") or {}).get(name, {}).get(editor, {}) or {})
    names = _hparam_names(editor) if editor != "none" else set()
    if editor != "none" and _uses_statistics(editor):
        hp.setdefault("model_id", _model_id(profile, name))
        hp.setdefault("stats_dir", str(Path("stats") / name))
    if editor != "none" and (not names or "stats_corpus" in names):  # a corpus file (WISE: its unrelated lines)
        corpus = hp.get("stats_corpus", "wikitext-2-raw/wiki.test.raw")
        if not corpus.startswith("hub:"):  # a file of the data mirror
            hp["stats_corpus"] = str(resolve_mirror(params["data"]["mirror"]) / corpus)
    if "checkpoint_dir" in names:  # trained artefacts (MEND)
        hp.setdefault("model_id", _model_id(profile, name))
        hp.setdefault("checkpoint_dir", str(Path("checkpoints") / name))
    if "train_cases" in names and "train_cases" not in hp:  # MEND: its training set is part of the checkpoint's name
        from editors.mend_train import training_id

        hp["train_cases"] = training_id(_mend_training_cases(params, profile, hp))
    return hp


def _mend_training_cases(params, profile, hp: dict) -> list:
    """MEND's training cases for ``profile``: the dataset minus the evaluated subset and the first ``heldout`` cases
    of the sweeps' held-out order, in the order seeded by ``train_seed`` (editors.mend_train.training_cases)."""
    from data_pipeline.dataset import load_cases
    from data_pipeline.subset import held_out
    from editors.mend import MendHparams
    from editors.mend_train import training_cases

    h = MendHparams.from_dict({k: v for k, v in hp.items() if k != "train_cases"})
    cases = load_cases(Path(params["data"]["out"]) / "cases.jsonl")
    reported = [c.case_id for c in _subset_cases(params, profile)]
    exclude = set(reported) | set(held_out(cases, h.heldout, h.heldout_seed, exclude=reported) if h.heldout else [])
    return training_cases(cases, exclude, h.train_seed)


def _hparam_names(editor: str) -> set[str]:
    """The field names of the editor's hparams class (empty for an editor without one)."""
    import dataclasses

    from editors.registry import get_editor

    cls = getattr(get_editor(editor), "hparams_cls", None)
    return {f.name for f in dataclasses.fields(cls)} if cls is not None and dataclasses.is_dataclass(cls) else set()


def _uses_statistics(editor: str) -> bool:
    """Whether the editor's hyper-parameters take the statistics settings (stats_dir, stats_corpus, model_id): an
    editor whose hparams class lacks them (FT-L) gets none; one without a declared class (plugins) gets them all."""
    names = _hparam_names(editor)
    return not names or "stats_dir" in names


def _ppl_corpus(params) -> Path | None:
    """The ME-PPL corpus of the data mirror (params data.me_ppl_corpus); None disables FL and ME-PPL."""
    from data_pipeline.dataset import resolve_mirror

    rel = params["data"].get("me_ppl_corpus")
    if not rel:
        return None
    path = resolve_mirror(params["data"]["mirror"]) / rel
    if not path.is_file():
        raise UserError(f"ME-PPL corpus {path} not found: set the data mirror (DRIFTBENCH_DATA_MIRROR) or "
                        "params data.me_ppl_corpus")
    return path


def _load(profile, model_name, stored: bool = False):
    """(name, model, tokenizer) in the model's run dtype (``run_dtype``, else ``dtype``), or in its stored ``dtype``
    with ``stored`` (second-moment statistics and causal traces)."""
    import torch

    from basis.params import run_dtype
    from model_layer.loading import load_model

    torch.manual_seed(0)
    name, m = profile.model(model_name)
    prepared = profile.prepared_model_dir(name)
    ref = str(prepared) if prepared.is_dir() else m["ref"]
    dtype = m.get("dtype", "float32") if stored else run_dtype(m)
    model, tok = load_model(ref, dtype=dtype, device=profile.raw.get("device", "cpu"),
                            revision=m.get("revision"))
    return name, model, tok


def _limited(profile, name: str, path: Path, limit: int) -> Path:
    """The output of a run: ``path`` itself, or its twin under the smoke folder for a ``--limit`` run."""
    if limit < 0:
        raise UserError(f"--limit must be a positive number of cases, got {limit}")
    return profile.smoke_dir(name) / path.relative_to(profile.results_dir(name)) if limit else path


def _dataset_identity(params, card_path=None, cases_path=None, need_card=True):
    """(card or None, {version: content_id}, {case_id: source} or None) of the dataset in params.yaml."""
    from leaderboard.submission import dataset_cases

    out = Path(params["data"]["out"])
    card_path = Path(card_path) if card_path else out / "card.json"
    if not card_path.is_file():
        if need_card:
            raise UserError(f"{card_path} not found: run `driftbench dataset build` (or pass --card)")
        print(f"warning: {card_path} not found: dataset version unknown, submissions cannot be validated "
              "(run `driftbench dataset build`)", file=sys.stderr)
        return None, {}, None
    card = read_json(card_path)
    cases_path = Path(cases_path) if cases_path else out / "cases.jsonl"
    cases = dataset_cases(cases_path) if cases_path.is_file() else None
    return card, {card["version"]: card["content_id"]}, cases


def _profile_cases(params, cases_path=None, cases=None) -> dict[str, set] | None:
    """Each profile's full case set (its subset file when built, else its seeded stratified subset of the dataset;
    all cases when subset_size is 0): what a submission of that profile must cover. None without the dataset.
    ``cases``: the dataset's cases when the caller has loaded them already."""
    from data_pipeline.dataset import load_cases
    from data_pipeline.subset import stratified_subset

    if cases is None:
        path = Path(cases_path) if cases_path else Path(params["data"]["out"]) / "cases.jsonl"
        if not path.is_file():
            return None
        cases = load_cases(path)
    out = {}
    for name in params.get("profiles") or {}:
        profile = get_profile(params, name)
        size = int(profile.raw.get("subset_size") or 0)
        ids = _subset_ids(profile)
        if ids is not None:
            out[name] = set(ids)
        else:
            out[name] = set(stratified_subset(cases, size, int(profile.raw.get("seed", 0))) if size
                            else (c.case_id for c in cases))
    return out


def _result_files(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.glob("*.jsonl") if not f.name.endswith(".timings.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such result file or folder")
    return files


