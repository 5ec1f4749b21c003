"""Shared fixtures: repo paths, the data mirror, and tiny random-weight models saved locally."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("DRIFTBENCH_DATA_MIRROR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "release" / "merged_counterfact.json").is_file():
        pytest.skip(f"data mirror not found at {MIRROR} (set DRIFTBENCH_DATA_MIRROR)")
    return MIRROR
