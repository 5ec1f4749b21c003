"""PMET — Precise Model Editing in a Transformer (Li et al., AAAI 2024; `xpq-tech/PMET`) as the SADR reference
implements it (reference-spec §4.1, §4.4).

1. Two vectors optimised jointly at the z layer (the last edit layer), one Adam over both: δ_attn added to the
   attention output projection's output and δ_mlp to the MLP down-projection's output at the subject's last token,
   each with its own weight decay wd·‖δ‖/‖init‖² and clamp ‖δ‖ ≤ clamp·‖init‖; the NLL is weighted
   0.1·``nll_loss_factor`` at the next step while every target token is the argmax, and the loop stops once the
   weighted essence KL is ≤ 0.01 in that state (editors.core.optimise_targets, ``argmax_schedule``).
   SADR, on a +sadr cell, is added to this joint loss (its rows from the layers above the z layer).
2. Only the MLP target is written (the reference's ``rewrite_module_tmps`` lists only the MLP): for each edit layer
   l_i in ascending order (L layers), K = the down-projection input at the subject's last token, grouped per template
   group then across groups (as MEMIT); R = z*_mlp − the z layer's down-projection output for the bare prompt,
   recomputed with the lower layers already updated; ΔW = (R/√(L − i)) Kᵀ (K Kᵀ + λC)⁻¹ in float64.

Deviations: the solve instead of ``torch.inverse``; the argmax test compares each label with its argmax (the
reference compares two float means, equal exactly when every label is the argmax). Everything else as MEMIT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from editors.base import EditHandle
from editors.memit import Memit, MemitHparams


@dataclass
class PmetHparams(MemitHparams):
    argmax_schedule: bool = True
    sadr_gamma: float = 8e-2  # GPT-J's script value (spec §4.6): 40 steps, γ = 800 × 1e-4
    sadr_steps: int = 40

    editor: ClassVar[str] = "PMET"


class Pmet(Memit):
    name = "pmet"
    hparams_cls = PmetHparams
    target_at = ("mlp_out", "attn_out")  # step 1: δ_mlp (written) and δ_attn (shapes z only)
    residual_at = "mlp_out"

    @staticmethod
    def spread(remaining: int) -> float:
        return math.sqrt(remaining)

    def write(self, model, tok, cases, results, hp: PmetHparams, ctx=None) -> EditHandle:
        handle = super().write(model, tok, cases, results, hp, ctx)
        attn = [next(iter(r.others.values())) for r in results]  # (init, z*) of the attention output
        norms = [float((z - init).norm()) for init, z in attn]
        handle.diagnostics["attn_delta_norm"] = norms[0] if len(cases) == 1 else norms
        return handle
