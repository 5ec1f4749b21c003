"""Read `params.yaml` and derive every path the stages use (one place, so dvc.yaml and the CLI agree)."""
from __future__ import annotations

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
    return Profile(name, profiles[name])


def parse_cell(cell: str) -> tuple[str, bool]:
    """``"rome+sadr" -> ("rome", True)``."""
    return (cell[: -len("+sadr")], True) if cell.endswith("+sadr") else (cell, False)
