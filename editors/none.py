"""The unedited baseline: no edit, so its post-edit scores are the model's own pre-edit scores (the harness reuses
the pre-edit rows instead of scoring every case again; a test keeps one scored run to check determinism)."""
from __future__ import annotations

from typing import Any

from editors.base import EditHandle, Editor, HparamsError


class NoEdit(Editor):
    name = "none"
    capabilities = frozenset()
    undo = "weights"

    def check_hparams(self, model, hparams: dict[str, Any]) -> None:
        extra = sorted(set(hparams) - {"template_seed", "sadr"})
        if extra:
            raise HparamsError(f"the unedited baseline 'none' takes no hyper-parameters, got {extra}")

    def apply(self, model, tok, cases, hparams, ctx) -> EditHandle:
        return EditHandle()
