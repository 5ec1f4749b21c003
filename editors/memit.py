"""MEMIT — Mass-Editing Memory in a Transformer (Meng et al., 2023), one edit at a time, as implemented by the SADR
reference (reference-spec §4.1, §4.3).

1. z* = argmin_δ of the shared target-vector loss, δ added to the output of the *last* edit layer's block (the
   residual stream) at the subject's last token (editors.core.optimise_target), optionally + γ·L_SADR.
2. For each edit layer l_i in ascending order (L layers):
   K = the down-projection input at the subject's last token, averaged per template group then across groups;
   cur_z = the last edit layer's block output for the bare prompt, with the lower layers already updated;
   R = (z* − cur_z) / (L − i);   ΔW = R Kᵀ (λC + K Kᵀ)⁻¹;   W ← W + ΔW.

Reference quirks kept: 6 templates in two groups ([bare] + 5 of 10 tokens, braces replaced by spaces), so the bare
prompt's key weighs 1/2; keys and cur_z recomputed after each lower layer's update; NLL from the final logits (the
reference's v_loss_layer is the last layer). SADR shapes z* only; spreading it over the layers constrains the final
model's attention indirectly (spec §3). Deviations: see editors/core.py (target tokenisation, seeded templates).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from data_pipeline.schema import Case
from editors.base import EditHandle
from editors.core import (HparamsError, LocateEditor, LocateHparams, VResult, grouped_mean, least_squares_update,
                          make_request, module_io_at, subject_rows)
from model_layer.arch import arch_for


@dataclass
class MemitHparams(LocateHparams):
    layers: tuple = ()
    mom2_update_weight: float = 15000.0  # λ
    template_lengths: tuple = ((10, 5),)  # [bare] + 5 templates of 10 tokens
    template_brace_fill: str = " "
    clamp_norm_factor: float = 0.75
    sadr_gamma: float = 5e-3
    sadr_steps: int = 20

    editor: ClassVar[str] = "MEMIT"
    required: ClassVar[dict[str, str]] = {"layers": "the edited MLP layers, e.g. [3, 4, 5, 6, 7, 8]"}

    @classmethod
    def derived(cls) -> set[str]:
        return {"layer"}  # z is optimised at the last edit layer

    @classmethod
    def derive(cls, kw: dict[str, Any]) -> dict[str, Any]:
        layers = kw["layers"]
        if (not isinstance(layers, (list, tuple)) or not layers or len(set(layers)) != len(layers)
                or not all(isinstance(x, int) and x >= 0 for x in layers)):
            raise HparamsError(f"MEMIT hparams 'layers' must be a non-empty list of distinct layer indices, got {layers!r}")
        return {**kw, "layers": tuple(sorted(layers)), "layer": max(layers)}


def z_reached(model, module: str, rows, s_idx, res: VResult, pad: int) -> tuple[float, float]:
    """(‖z* − z_init‖, the share of it the written layers achieved at ``module`` for the bare prompt: 1 = all)."""
    _, z_final = module_io_at(model, module, rows[:1], s_idx[:1], pad)
    gap0, gap1 = float((res.v_star - res.v_init).norm()), float((res.v_star - z_final[0]).norm())
    return gap0, (1.0 - gap1 / gap0) if gap0 > 0 else 1.0


class Memit(LocateEditor):
    hparams_cls = MemitHparams
    name = "memit"
    capabilities = frozenset({"sadr", "sequential", "batch"})
    target_at = "block"  # step 1: z* at the output of the last edit layer's block
    residual_at: ClassVar[str] = "block"  # step 2's cur_z: the z layer's block output (PMET: its down-projection's)

    @staticmethod
    def spread(remaining: int) -> float:
        """The divisor of the residual at the i-th of L layers (remaining = L − i): MEMIT spreads it evenly."""
        return remaining

    def write(self, model, tok, cases: list[Case], results: list[VResult], hp: MemitHparams,
              ctx=None) -> EditHandle:
        """Step 2 for ``cases`` at once: a batch of n cases stacks their keys K [d_in, n] and residuals R [d_out, n]
        (MEMIT's mass edit); one case is the batch of one."""
        import time

        t0 = time.perf_counter()
        arch = arch_for(model)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        z_block = arch.layer(self.residual_at, hp.layer)
        templates = self.templates(model, tok, hp)
        rows = [subject_rows(tok, make_request(case), templates) for case in cases]
        self.load_statistics(model, tok, hp)  # every layer's, before any weight changes
        handle = EditHandle()
        update_norms = []
        for i, layer in enumerate(hp.layers):
            mlp_out = arch.layer("mlp_out", layer)
            ks, resids = [], []
            for (r, s_idx), res in zip(rows, results):
                keys, _ = module_io_at(model, mlp_out, r, s_idx, pad)
                ks.append(grouped_mean(keys, hp.template_groups()))
                _, cur_z = module_io_at(model, z_block, r[:1], s_idx[:1], pad)
                resids.append((res.v_star - cur_z[0]) / self.spread(len(hp.layers) - i))
            k, resid = (ks[0], resids[0]) if len(cases) == 1 else (torch.stack(ks), torch.stack(resids))
            dw = self.layer_update(model, tok, layer, k, resid, hp, ctx)
            weight = model.get_submodule(mlp_out).weight
            handle.save(f"{mlp_out}.weight", weight)
            with torch.no_grad():
                weight.add_(dw.to(weight.dtype))
            update_norms.append(float(dw.norm()))
        reached = [z_reached(model, z_block, r, s_idx, res, pad) for (r, s_idx), res in zip(rows, results)]
        res = results[0]
        handle.diagnostics = {
            "layers": list(hp.layers), "steps": res.steps, "final_loss": res.losses[-1], "delta_norm": reached[0][0],
            "z_init_norm": float(res.v_init.norm()), "update_norms": update_norms, "z_reached": reached[0][1],
            **res.notes,
        }
        if len(cases) > 1:  # per case, in the order of ``cases``
            handle.diagnostics.update(batch_size=len(cases), steps=[x.steps for x in results],
                                      final_loss=[x.losses[-1] for x in results], delta_norm=[g for g, _ in reached],
                                      z_init_norm=[float(x.v_init.norm()) for x in results],
                                      z_reached=[z for _, z in reached])
            if res.notes:
                handle.diagnostics.update({key: [x.notes[key] for x in results] for key in res.notes})
        self.after_write(model, tok, handle, rows, hp)
        handle.timings = {"update_s": time.perf_counter() - t0}
        return handle

    def load_statistics(self, model, tok, hp: MemitHparams) -> None:
        """Load (or compute) every statistic the write needs while the model is still unedited: a missing file is
        then never computed on a partly written model."""
        for module in self.statistics_modules(model, hp):
            self.covariance(model, tok, module, hp)

    def layer_update(self, model, tok, layer: int, k: torch.Tensor, resid: torch.Tensor, hp: MemitHparams,
                     ctx) -> torch.Tensor:
        """ΔW of one edit layer for keys ``k`` and residuals ``resid`` (one case: vectors; a batch: rows)."""
        c = self.covariance(model, tok, arch_for(model).layer("mlp_out", layer), hp).to(k.device)
        return least_squares_update(c, k, resid, hp.mom2_update_weight)

    def after_write(self, model, tok, handle: EditHandle, rows, hp: MemitHparams) -> None:
        """Called once every layer is written (AlphaEdit records the edit's keys for later edits of a stream)."""
