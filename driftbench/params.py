"""Read `params.yaml` and derive every path the stages use (one place, so dvc.yaml and the CLI agree)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


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
                raise SystemExit(f"profile {self.name!r} has several models {sorted(self.models)}: pass --model")
            name = next(iter(self.models))
        if name not in self.models:
            raise SystemExit(f"model {name!r} is not in profile {self.name!r}; choose one of {sorted(self.models)}")
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


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path} not found: run driftbench from the repository root or pass --params")
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def get_profile(params: dict[str, Any], name: str) -> Profile:
    profiles = params.get("profiles", {})
    if name not in profiles:
        raise SystemExit(f"profile {name!r} not in params.yaml; choose one of {sorted(profiles)}")
    profile = Profile(name, profiles[name])
    check_profile_cells(profile)
    return profile


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
        raise SystemExit(f"params.yaml: profiles.{profile.name}.seeds must be a list of distinct non-negative "
                         f"integers starting with 0 (got {seeds!r})")
    base = [c for c in cells if cell_seed(c) is None]
    want = seeded_cells(base, seeds)
    if cells != want:
        raise SystemExit(f"params.yaml: profiles.{profile.name}.cells must list every editor cell once per seed "
                         f"{seeds}: expected {want}, got {cells}")
