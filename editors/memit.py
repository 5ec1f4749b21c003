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

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from data_pipeline.schema import Case
from editors.base import EditHandle
from editors.core import (HparamsError, LocateEditor, LocateHparams, build_batch, grouped_mean, least_squares_update,
                          make_request, module_io_at, optimise_target, subject_rows)
from editors.sadr import SADRLoss
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

    def edit_layers(self) -> tuple[int, ...]:
        return self.layers


class Memit(LocateEditor):
    hparams_cls = MemitHparams
    name = "memit"

    def prepare(self, model, tok, hparams: dict[str, Any], progress: bool = True) -> list[str]:
        hp = MemitHparams.from_dict(hparams)
        return self.prepare_layers(model, tok, hp, hp.layers, progress)

    def edit(self, model, tok, case: Case, hparams: dict[str, Any]) -> EditHandle:
        import time

        hp = MemitHparams.from_dict(hparams)
        sadr = bool(hparams.get("sadr"))
        arch = arch_for(model)
        n_layers = arch.n_layers(model.config)
        if hp.layer >= n_layers:
            raise ValueError(f"MEMIT layers {list(hp.layers)}: the model has {n_layers} layers (0..{n_layers - 1})")
        dev = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        t = {"start": time.perf_counter()}

        covs = {layer: self.covariance(model, tok, arch.layer("mlp_out", layer), hp).to(dev) for layer in hp.layers}
        t["stats"] = time.perf_counter()
        templates = self.templates(model, tok, hp)
        t["templates"] = time.perf_counter()
        req = make_request(case)
        batch = build_batch(tok, req, templates, dev)
        extras = [SADRLoss(hp.sadr_gamma, hinge=hp.sadr_hinge, first_layer=hp.layer + 1)] if sadr else []
        vhp = replace(hp, v_num_grad_steps=hp.sadr_steps) if sadr else hp
        z_block = arch.layer("block", hp.layer)
        res = optimise_target(model, batch, z_block, vhp, extras)  # z* = z_init + δ at the last edit layer
        t["optimise"] = time.perf_counter()

        rows, s_idx = subject_rows(tok, req, templates)
        handle = EditHandle()
        update_norms = []
        for i, layer in enumerate(hp.layers):
            mlp_out = arch.layer("mlp_out", layer)
            keys, _ = module_io_at(model, mlp_out, rows, s_idx, pad)
            k = grouped_mean(keys, hp.template_groups())
            _, cur_z = module_io_at(model, z_block, rows[:1], s_idx[:1], pad)
            resid = (res.v_star - cur_z[0]) / (len(hp.layers) - i)
            dw = least_squares_update(covs[layer], k, resid, hp.mom2_update_weight)
            weight = model.get_submodule(mlp_out).weight
            handle.save(f"{mlp_out}.weight", weight)
            with torch.no_grad():
                weight.add_(dw.to(weight.dtype))
            update_norms.append(float(dw.norm()))
        _, z_final = module_io_at(model, z_block, rows[:1], s_idx[:1], pad)
        t["update"] = time.perf_counter()
        gap0, gap1 = float((res.v_star - res.v_init).norm()), float((res.v_star - z_final[0]).norm())
        handle.diagnostics = {
            "layers": list(hp.layers), "steps": res.steps, "final_loss": res.losses[-1], "delta_norm": gap0,
            "z_init_norm": float(res.v_init.norm()), "update_norms": update_norms,
            # how much of z* − z_init the spread over the layers achieved at the last edit layer (1 = all of it)
            "z_reached": (1.0 - gap1 / gap0) if gap0 > 0 else 1.0,
        }
        handle.timings = {"stats_s": t["stats"] - t["start"], "templates_s": t["templates"] - t["stats"],
                          "optimise_s": t["optimise"] - t["templates"], "update_s": t["update"] - t["optimise"],
                          "step_s": res.step_seconds}
        if extras:
            handle.diagnostics["sadr_selected_heads"] = extras[0].selected
        return handle
