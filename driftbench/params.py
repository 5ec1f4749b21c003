"""Read `params.yaml` and derive every path the stages use (one place, so dvc.yaml and the CLI agree)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from driftbench.errors import UserError


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

    def journal_path(self, model: str, rel: str) -> Path:
        """The journal of output ``rel`` (e.g. ``cells/rome.jsonl``), shared by full and smoke runs: every row ever
        computed for it (evaluators.harness)."""
        return self.results_dir(model) / ".journal" / rel


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


CELL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\+sadr)?(\.s\d+)?$")


def check_cell_name(cell: Any, where: str = "cell") -> str:
    """A cell name is ``<editor>[+sadr][.s<seed>]`` with a plain editor name (letters, digits, ``-``, ``_``): it
    becomes a file name, so nothing else (no ``/``, ``..``, spaces) is accepted."""
    if not isinstance(cell, str) or not CELL_NAME.match(cell):
        raise UserError(f"{where} {cell!r} is not a cell name: expected <editor>[+sadr][.s<seed>], e.g. rome+sadr or "
                        "rome.s1 (letters, digits, '-' and '_' only)")
    if parse_cell(cell) == ("none", True):
        raise UserError(f"{where} {cell!r}: the unedited baseline 'none' has no SADR variant; use 'none'")
    return cell


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
    models = raw.get("models")
    if not isinstance(models, dict) or not models or not all(isinstance(m, dict) for m in models.values()):
        raise UserError(f"{where}.models must map each model name to its settings (ref, dtype, ...)")
    for key, m in models.items():
        if not isinstance(m.get("ref"), str) or not m["ref"]:
            raise UserError(f"{where}.models.{key}.ref must be a model reference (embedded name, folder or hub id)")
    cells = raw.get("cells") or []
    if not isinstance(cells, list):
        raise UserError(f"{where}.cells must be a list of cell names")
    for i, c in enumerate(cells):
        check_cell_name(c, f"{where}.cells[{i}]")
    if len(set(cells)) != len(cells):
        raise UserError(f"{where}.cells lists a cell twice")
    hp = raw.get("hparams")
    if hp is not None and not (isinstance(hp, dict) and all(isinstance(v, dict) and all(isinstance(e, dict) or e is None
                                                                                          for e in v.values())
                                                            for v in hp.values() if v is not None)):
        raise UserError(f"{where}.hparams must map model -> editor -> {{name: value}}")


SEED_SUFFIX = re.compile(r"\.s(\d+)$")


def parse_cell(cell: str) -> tuple[str, bool]:
    """``"rome+sadr" -> ("rome", True)``; a seed suffix (``"rome+sadr.s2"``) is ignored here (`cell_seed`)."""
    cell = SEED_SUFFIX.sub("", cell)
    return (cell[: -len("+sadr")], True) if cell.endswith("+sadr") else (cell, False)


def cell_seed(cell: str) -> int | None:
    """The context-template seed a cell name asks for: ``"rome.s2" -> 2``; None without a suffix (the editor's
    hparams decide, template_seed 0 by default)."""
    m = SEED_SUFFIX.search(cell)
    return int(m.group(1)) if m else None


def seeded_cells(cells: list[str], seeds: list[int], unseeded: tuple[str, ...] = ("none",)) -> list[str]:
    """The cell list a profile with template ``seeds`` must have: every editor cell once per seed (the first seed
    as the plain name, the others as ``<cell>.s<seed>``); the editors in ``unseeded`` (no randomness) once."""
    out = []
    for cell in cells:
        out.append(cell)
        if parse_cell(cell)[0] not in unseeded:
            out += [f"{cell}.s{s}" for s in seeds[1:]]
    return out


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
    base = [c for c in cells if cell_seed(c) is None]
    want = seeded_cells(base, seeds)
    if cells != want:
        raise UserError(f"params.yaml: profiles.{profile.name}.cells must list every editor cell once per seed "
                        f"{seeds}: expected {want}, got {cells}")
