"""IntAttn-Edit — "Balancing Knowledge Updates: Toward Unified Modular Editing in LLMs" (Liu et al., ACML 2025,
arXiv 2510.27400). No public code and no formula-level text exist (neighbours §F, §H); every step below is OUR
INFERENCE from the paper's description: MEMIT's associative-memory least-squares update applied jointly to the MLP
down-projection and the attention output projection, the update magnitude split by a balancing factor α derived
from each module's measured causal contribution.

1. z* as MEMIT: δ at the last edit layer's block output (the residual stream), optionally + γ·L_SADR.
2. α = the attention's share of the causal effect at the edit layers, from the paired MLP / attention causal traces
   (editors.tracing.attention_share: Σ_l IE_attn / Σ_l (IE_attn + IE_mlp), negative effects as none), read from the
   trace artefact named by ``alpha_from``; or the number ``alpha`` (sweeps).
3. For each edit layer l_i in ascending order (L layers): R = (z* − cur_z)/(L − i) (MEMIT's spread, cur_z the z
   layer's block output for the bare prompt on the model updated so far); then
   attention: K_a = the output projection's input at the subject's last token (template-grouped mean),
              ΔW_o = (α R) K_aᵀ (λ C_a + K_a K_aᵀ)⁻¹ with C_a = E[k kᵀ] of that input (its own statistics artefact);
   MLP:       K_m = the down-projection's input, read after the attention update (the MLP sees it),
              ΔW_d = ((1 − α) R) K_mᵀ (λ C_m + K_m K_mᵀ)⁻¹.
   Both outputs are added to the residual stream, so together they aim at R, split α : 1 − α.

Choices we made where the paper is silent: one λ for both modules; the split of each layer's share of R rather
than separate z* per module (PMET's way); attention written before the MLP within a layer. α is swept on held-out
cases (the paper reports a stable range of moderate α).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from basis.errors import UserError
from editors.base import Artefact, EditHandle
from editors.core import (HparamsError, grouped_mean, least_squares_update, make_request, module_io_at,
                          subject_rows)
from editors.memit import Memit, MemitHparams, z_reached
from model_layer.arch import arch_for


@dataclass
class IntAttnHparams(MemitHparams):
    alpha: float = 0.5  # the attention's share of each layer's residual (used when alpha_from is empty)
    alpha_from: str = ""  # a causal-trace JSON (`driftbench trace`) with MLP and attention indirect effects

    editor: ClassVar[str] = "IntAttn-Edit"

    @classmethod
    def derive(cls, kw):
        kw = super().derive(kw)
        if not 0.0 <= kw.get("alpha", 0.5) <= 1.0:
            raise HparamsError(f"IntAttn-Edit hparams 'alpha' must lie in [0, 1], got {kw['alpha']!r}")
        return kw


def trace_alpha(path: str | Path, layers) -> float:
    """α from a causal-trace file (one-line error naming the file and field when it cannot give one)."""
    from editors.tracing import attention_share

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: causal trace not found (hparams 'alpha_from'): run `driftbench trace` first")
    data = json.loads(p.read_text(encoding="utf-8"))
    mlp, attn = data.get("indirect_effect"), (data.get("attn") or {}).get("indirect_effect")
    if not isinstance(mlp, list) or not isinstance(attn, list) or max(layers) >= min(len(mlp), len(attn)):
        raise UserError(f"{p}: needs 'indirect_effect' and 'attn.indirect_effect' covering layers {list(layers)} "
                        "(rerun `driftbench trace`, which traces both modules)")
    return attention_share(mlp, attn, layers)


class IntAttn(Memit):
    name = "intattn"
    hparams_cls = IntAttnHparams
    capabilities = frozenset({"sadr", "sequential"})

    def alpha(self, hp: IntAttnHparams) -> float:
        return trace_alpha(hp.alpha_from, hp.layers) if hp.alpha_from else hp.alpha

    def write(self, model, tok, cases, results, hp: IntAttnHparams, ctx=None) -> EditHandle:
        import time

        (case,), (res,) = cases, results
        t0 = time.perf_counter()
        arch, dev = arch_for(model), next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        alpha = self.alpha(hp)
        rows, s_idx = subject_rows(tok, make_request(case), self.templates(model, tok, hp))
        self.load_statistics(model, tok, hp)
        z_block = arch.layer("block", hp.layer)
        handle, norms = EditHandle(), {"attn": [], "mlp": []}
        for i, layer in enumerate(hp.layers):
            _, cur_z = module_io_at(model, z_block, rows[:1], s_idx[:1], pad)
            resid = (res.v_star - cur_z[0]) / (len(hp.layers) - i)
            for kind, share in (("attn_out", alpha), ("mlp_out", 1.0 - alpha)):
                if share == 0.0:
                    continue
                module = arch.layer(kind, layer)
                keys, _ = module_io_at(model, module, rows, s_idx, pad)  # after this layer's attention update
                c = self.covariance(model, tok, module, hp).to(dev)
                dw = least_squares_update(c, grouped_mean(keys, hp.template_groups()), share * resid,
                                          hp.mom2_update_weight)
                weight = model.get_submodule(module).weight
                handle.save(f"{module}.weight", weight)
                with torch.no_grad():
                    weight.add_(dw.to(weight.dtype))
                norms["attn" if kind == "attn_out" else "mlp"].append(float(dw.norm()))
        gap0, reached = z_reached(model, z_block, rows, s_idx, res, pad)
        handle.diagnostics = {"layers": list(hp.layers), "alpha": alpha, "steps": res.steps,
                              "final_loss": res.losses[-1], "delta_norm": gap0, "z_init_norm": float(res.v_init.norm()),
                              "attn_update_norms": norms["attn"], "mlp_update_norms": norms["mlp"],
                              "z_reached": reached, **res.notes}
        handle.timings = {"update_s": time.perf_counter() - t0}
        return handle

    def statistics_modules(self, model, hp: IntAttnHparams) -> list[str]:
        arch = arch_for(model)
        return [arch.layer(kind, layer) for layer in hp.layers for kind in ("attn_out", "mlp_out")]

    def artefacts(self, model, tok, hparams) -> list[Artefact]:
        """C of both modules of every edit layer (`driftbench stats`) and the causal trace α comes from."""
        hp = self.hparams_cls.from_dict(hparams)
        return super().artefacts(model, tok, hparams) + (
            [Artefact("trace", hp.alpha_from, "driftbench trace")] if hp.alpha_from else [])
