"""Shared fixtures: repo paths, the data mirror, and tiny random-weight models saved locally."""
from __future__ import annotations

import os
from pathlib import Path

import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny_models.py
MIRROR = Path(os.environ.get("DRIFTBENCH_DATA_MIRROR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "release" / "merged_counterfact.json").is_file():
        pytest.skip(f"data mirror not found at {MIRROR} (set DRIFTBENCH_DATA_MIRROR)")
    return MIRROR


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """``{arch: folder}`` for gptj, gpt_neox, llama, gemma3 tiny random models saved with save_pretrained."""
    from tiny_models import ARCHS, save_tiny_model

    base = tmp_path_factory.mktemp("tiny_models")
    return {a: save_tiny_model(a, base / a, seed=i) for i, a in enumerate(ARCHS)}
