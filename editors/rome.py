"""ROME — Rank-One Model Editing (Meng et al., 2022) as implemented by the SADR reference (reference-spec §4.2).

1. k̄ = mean over the context templates x_j of the down-projection input at the subject's last token of x_j ⊕ p.
2. u = C⁻¹k̄ / ‖C⁻¹k̄‖ with C = E[k kᵀ] over a text corpus (editors.stats).
3. v* = argmin_δ of the shared target-vector loss, δ added to the MLP output at the subject's last token
   (editors.core.optimise_target), optionally + γ·L_SADR (editors.sadr).
4. With k*, out* the down-projection's input/output for the bare prompt: W ← W + r uᵀ, r = (v* − out*)/(k*·u).

Reference quirks kept because they change numbers: 21 flat templates (bare + 10 of 5 tokens + 10 of 10 tokens);
the bare-prompt key (not k̄) in r; ‖δ‖ (not ‖δ‖²) in the weight decay; n iterations with n−1 Adam steps;
essence KL = KL(new ‖ init) at the subject's last token of "{subject} is a"; δ injected in every row (KL row too).
Deviations: see editors/core.py (target tokenisation, seeded templates, float64 solve).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from data_pipeline.schema import Case
from editors.base import EditHandle
from editors.core import (LocateEditor, LocateHparams, VResult, make_request, module_io_at, rank_one_direction,
                          rank_one_update, subject_rows)
from model_layer.arch import arch_for


@dataclass
class RomeHparams(LocateHparams):
    template_lengths: tuple = ((5, 10), (10, 10))  # 21 flat templates
    sadr_gamma: float = 1e-2
    sadr_steps: int = 80

    editor: ClassVar[str] = "ROME"
    required: ClassVar[dict[str, str]] = {"layer": "the edited MLP layer"}


class Rome(LocateEditor):
    name = "rome"
    hparams_cls = RomeHparams
    target_at = "mlp"  # step 3: δ at the MLP output of `layer`

    def write(self, model, tok, cases: list[Case], results: list[VResult], hp: RomeHparams,
              ctx=None) -> EditHandle:
        """Steps 1, 2 and 4 for one case whose v* is ``results[0]``."""
        import time

        (case,), (res,) = cases, results
        t0 = time.perf_counter()
        mlp_out = arch_for(model).layer("mlp_out", hp.layer)
        dev = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        c = self.covariance(model, tok, mlp_out, hp).to(dev)
        rows, s_idx = subject_rows(tok, make_request(case), self.templates(model, tok, hp))
        keys, _ = module_io_at(model, mlp_out, rows, s_idx, pad)
        u = rank_one_direction(c, keys.mean(0))
        k_star, out_star = module_io_at(model, mlp_out, rows[:1], s_idx[:1], pad)
        handle = EditHandle()
        weight = model.get_submodule(mlp_out).weight
        handle.save(f"{mlp_out}.weight", weight)
        dw = rank_one_update(weight, u, res.v_star, k_star[0], out_star[0])
        handle.diagnostics = {
            "layer": hp.layer, "steps": res.steps, "final_loss": res.losses[-1],
            "delta_norm": float((res.v_star - res.v_init).norm()), "v_init_norm": float(res.v_init.norm()),
            "update_norm": float(dw.norm()), **res.notes,
        }
        handle.timings = {"update_s": time.perf_counter() - t0}
        return handle
