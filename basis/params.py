"""Read `params.yaml` and derive every path the stages use (one place, so dvc.yaml and the CLI agree)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from basis.cells import parse_cell, seeded_cells
from basis.errors import UserError

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # model_layer.loading.DTYPES maps them to torch dtypes


@dataclass(frozen=True)
class Profile:
    name: str
    raw: dict[str, Any]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.raw["models"]

    def model(self, name: str | None) -> tuple[str, dict[str, Any]]:
        if name is None:
            if len(self.models) != 1:
                raise UserError(f"profile {self.name!r} has several models {sorted(self.models)}: pass --model")
            name = next(iter(self.models))
        if name not in self.models:
            raise UserError(f"model {name!r} is not in profile {self.name!r}; choose one of {sorted(self.models)}")
        return name, self.models[name]

    def subset_path(self) -> Path:
        return Path("data/subsets") / f"{self.name}.json"

    def prepared_model_dir(self, model: str) -> Path:
        return Path("models") / model

    def results_dir(self, model: str) -> Path:
        return Path("results") / self.name / model

    def pre_path(self, model: str) -> Path:
        return self.results_dir(model) / "pre.jsonl"

    def cell_path(self, model: str, cell: str) -> Path:
        return self.results_dir(model) / "cells" / f"{cell}.jsonl"

    def smoke_dir(self, model: str) -> Path:
        """Where ``--limit`` runs write (never over the full run's files)."""
        return self.results_dir(model) / "smoke"

    def parts_dir(self, model: str) -> Path:
        """Part files of every output of a model (evaluators.runner), shared by full and smoke runs; ignored by git
        and DVC."""
        return self.results_dir(model) / ".parts"


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: run driftbench from the repository root or pass --params")
    try:
        with open(path, encoding="utf-8") as fh:
            params = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}); fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8; save it as UTF-8") from None
    if not isinstance(params, dict) or not all(isinstance(params.get(k, {}), dict) for k in ("data", "profiles")):
        raise UserError(f"{path}: expected a mapping whose 'data' and 'profiles' are mappings; see the repository's "
                        "params.yaml")
    return params


# How `run-cell` executes a profile's cells when its flags do not say (profiles.<p>.runner): which backend, how many
# Ray workers, which cluster (null: a local one) and torch threads per CPU worker. None of it changes a result byte,
# so no DVC stage lists it as a parameter (changing the backend reruns nothing).
RUNNER_DEFAULTS: dict[str, Any] = {"backend": "local", "workers": 2, "address": None, "threads": None}


def runner_settings(profile: "Profile", **flags: Any) -> dict[str, Any]:
    """The runner settings: each flag given (not None) over the profile's ``runner`` field (checked by
    `check_profile`) over the default."""
    got = {**RUNNER_DEFAULTS, **(profile.raw.get("runner") or {})}
    got.update({k: v for k, v in flags.items() if v is not None})
    return got


def get_profile(params: dict[str, Any], name: str) -> Profile:
    profiles = params.get("profiles", {})
    if name not in profiles:
        raise UserError(f"profile {name!r} not in params.yaml; choose one of {sorted(profiles)}")
    if not isinstance(profiles[name], dict):
        raise UserError(f"params.yaml: profiles.{name} must be a mapping")
    profile = Profile(name, profiles[name])
    check_profile(profile)
    check_profile_cells(profile)
    return profile


def check_profile(profile: "Profile") -> None:
    """Types and ranges of a profile's fields, checked before any stage touches a file."""
    raw, where = profile.raw, f"params.yaml: profiles.{profile.name}"

    def int_field(key: str, low: int) -> None:
        v = raw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise UserError(f"{where}.{key} must be an integer >= {low}, got {v!r}")

    int_field("subset_size", 0)
    int_field("seed", 0)
    int_field("batch_size", 1)
    int_field("edit_group", 1)
    models = raw.get("models")
    if not isinstance(models, dict) or not models or not all(isinstance(m, dict) for m in models.values()):
        raise UserError(f"{where}.models must map each model name to its settings (ref, dtype, ...)")
    for key, m in models.items():
        if not isinstance(m.get("ref"), str) or not m["ref"]:
            raise UserError(f"{where}.models.{key}.ref must be a model reference (embedded name, folder or hub id)")
        for field in ("dtype", "run_dtype"):
            if field in m and m[field] not in DTYPE_NAMES:
                raise UserError(f"{where}.models.{key}.{field} must be one of {list(DTYPE_NAMES)}, got {m[field]!r}")
    cells = raw.get("cells") or []
    if not isinstance(cells, list):
        raise UserError(f"{where}.cells must be a list of cell names")
    for i, c in enumerate(cells):
        parse_cell(c, f"{where}.cells[{i}]")
    if len(set(cells)) != len(cells):
        raise UserError(f"{where}.cells lists a cell twice")
    extra = raw.get("extra_cells") or []
    if not isinstance(extra, list):
        raise UserError(f"{where}.extra_cells must be a list of cell names")
    for i, c in enumerate(extra):
        parse_cell(c, f"{where}.extra_cells[{i}]")
    if len(set(extra)) != len(extra) or set(extra) & set(cells):
        raise UserError(f"{where}.extra_cells lists a cell twice or one of {where}.cells")
    runner = raw.get("runner")
    if runner is not None:
        if not isinstance(runner, dict) or set(runner) - set(RUNNER_DEFAULTS):
            raise UserError(f"{where}.runner must be a mapping with keys among {sorted(RUNNER_DEFAULTS)}")
        if runner.get("backend", "local") not in ("local", "ray"):
            raise UserError(f"{where}.runner.backend must be 'local' or 'ray', got {runner['backend']!r}")
        for key in ("workers", "threads"):
            v = runner.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise UserError(f"{where}.runner.{key} must be an integer >= 1, got {v!r}")
        if runner.get("address") is not None and (not isinstance(runner["address"], str) or not runner["address"]):
            raise UserError(f"{where}.runner.address must be a Ray address ('auto', ray://HOST:10001) or null, "
                            f"got {runner['address']!r}")
    hp = raw.get("hparams")
    if hp is not None and not (isinstance(hp, dict) and all(isinstance(v, dict) and all(isinstance(e, dict) or e is None
                                                                                          for e in v.values())
                                                            for v in hp.values() if v is not None)):
        raise UserError(f"{where}.hparams must map model -> editor -> {{name: value}}")


def run_dtype(model: dict) -> str:
    """The dtype edits and evaluation run in: ``run_dtype``, else the stored ``dtype``. Statistics (C) and causal
    traces always use ``dtype``; δ stays fp32 and the solves fp64 whatever the run dtype."""
    return model.get("run_dtype", model.get("dtype", "float32"))


def check_profile_cells(profile: "Profile") -> None:
    """``cells`` must hold every editor cell once per entry of ``seeds`` (dvc.yaml can only iterate a literal
    list, so params.yaml spells the seeded cells out, and this check keeps the two in step)."""
    cells, seeds = list(profile.raw.get("cells") or []), profile.raw.get("seeds")
    if seeds is None:
        return
    if (not isinstance(seeds, list) or not seeds or seeds[0] != 0 or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise UserError(f"params.yaml: profiles.{profile.name}.seeds must be a list of distinct non-negative "
                        f"integers starting with 0 (got {seeds!r})")
    base = [c for c in cells if parse_cell(c).seed is None]
    want = seeded_cells(base, seeds)
    if cells != want:
        raise UserError(f"params.yaml: profiles.{profile.name}.cells must list every editor cell once per seed "
                        f"{seeds}: expected {want}, got {cells}")
