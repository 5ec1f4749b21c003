"""Job builders the Ray workers of tests/test_cluster.py import (module-level, so Ray pickles them by reference)."""
from __future__ import annotations

from pathlib import Path


def tiny_cell_job(model_dir: str, spec, cases, pre_path: str):
    """The harness job of ``spec`` on the tiny model in ``model_dir`` (what `driftbench run-cell` builds)."""
    import torch

    from evaluators.harness import cell_job
    from model_layer.loading import load_model

    torch.set_num_threads(1)
    model, tok = load_model(model_dir)
    return cell_job(model, tok, spec, "test", cases, Path(pre_path))
