"""AlphaEdit — null-space constrained knowledge editing (Fang et al., ICLR 2025; `jianghoucheng/AlphaEdit`,
neighbours §G1): MEMIT's z* and keys, with the update projected onto the null space of the preserved keys.

1. z* and, per edit layer l_i (ascending, L layers), K and R = (z* − cur_z)/(L − i) exactly as MEMIT (editors.memit).
2. P = Û Ûᵀ, Û the eigenvectors of C = E[k kᵀ] (the layer's key second moment, editors.stats) with eigenvalue below
   ``nullspace_threshold``: directions the preserved knowledge's keys (almost) never take. A content-named artefact
   beside C (`driftbench stats`), computed once per (model, layer, statistics, threshold).
3. ΔW_l = ((P (K Kᵀ + C_cache) + L2·I)⁻¹ P K Rᵀ)ᵀ, so every key of the preserved set maps (almost) to what it did.
4. C_cache = Σ K_e K_eᵀ over the earlier edits e of the same sequential stream, their keys read on the model after
   their own update (the original's ``cache_c``): later edits keep earlier ones. It is derived from the unit's own
   handles (`EditHandle.memo`), so it is empty for every single edit and never leaks across cases or cells.

Deviations: eigh and the solve in float64 (the original: fp32 SVD and solve); the original's L2 is 10 (EasyEdit's
Llama3-8B config uses 1: the paper profile records which it took). Everything of MEMIT's (templates, key grouping,
tokenisation) as in editors/core.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from editors.base import Artefact, EditHandle
from editors.core import grouped_mean, module_io_at
from editors.memit import Memit, MemitHparams
from model_layer.arch import arch_for

MEMO = "alphaedit_keys"


@dataclass
class AlphaEditHparams(MemitHparams):
    v_num_grad_steps: int = 25
    nullspace_threshold: float = 2e-2
    L2: float = 10.0

    editor: ClassVar[str] = "AlphaEdit"


def projected_update(basis: torch.Tensor, k: torch.Tensor, resid: torch.Tensor, l2: float,
                     cache: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW = ((P (K Kᵀ + cache) + l2·I)⁻¹ P K Rᵀ)ᵀ with P = Û Ûᵀ (``basis`` Û [d_in, r]), in float64. ``k`` [d_in] or
    [n, d_in], ``resid`` [d_out] or [n, d_out]; returns ΔW [d_out, d_in] fp32 (nn.Linear layout)."""
    u = basis.double()  # P M computed as Û (Ûᵀ M): P itself is never formed
    k64 = k.double().reshape(-1, 1) if k.dim() == 1 else k.double().T.contiguous()  # K [d_in, n]
    r64 = resid.double().reshape(-1, 1) if resid.dim() == 1 else resid.double().T.contiguous()  # R [d_out, n]
    kk = k64 @ k64.T + (cache.double() if cache is not None else 0.0)
    lhs = u @ (u.T @ kk) + l2 * torch.eye(u.shape[0], dtype=torch.float64, device=u.device)
    return torch.linalg.solve(lhs, u @ ((u.T @ k64) @ r64.T)).T.float()


class AlphaEdit(Memit):
    name = "alphaedit"
    hparams_cls = AlphaEditHparams

    def nullspace(self, model, tok, layer: int, hp: AlphaEditHparams) -> torch.Tensor:
        from editors.stats import load_or_compute_nullspace

        module = arch_for(model).layer("mlp_out", layer)
        key, _ = self.stats_key(model, module, hp)
        dev = next(model.parameters()).device
        cache_key = ("nullspace", key, hp.nullspace_threshold, dev)
        if cache_key not in self._cov:  # the artefact is computed on the host (the same bytes on every machine type)
            self._cov[cache_key] = load_or_compute_nullspace(
                hp.stats_dir, key, hp.nullspace_threshold, lambda: self.covariance(model, tok, module, hp).cpu()).to(dev)
        return self._cov[cache_key]

    def load_statistics(self, model, tok, hp: AlphaEditHparams) -> None:
        for layer in hp.layers:
            self.nullspace(model, tok, layer, hp)

    def layer_update(self, model, tok, layer, k, resid, hp: AlphaEditHparams, ctx) -> torch.Tensor:
        earlier = [h.memo[MEMO][layer] for h in (ctx.handles if ctx is not None else []) if MEMO in h.memo]
        cache = sum(e.T @ e for e in earlier) if earlier else None  # Σ K_e K_eᵀ, keys as rows
        return projected_update(self.nullspace(model, tok, layer, hp).to(k.device), k, resid, hp.L2, cache)

    def after_write(self, model, tok, handle: EditHandle, rows, hp: AlphaEditHparams) -> None:
        """This edit's keys on the edited model, per layer (the original adds them to cache_c after the update)."""
        arch, pad = arch_for(model), tok.pad_token_id if tok.pad_token_id is not None else 0
        keys = {}
        for layer in hp.layers:
            ks = [grouped_mean(module_io_at(model, arch.layer("mlp_out", layer), r, s_idx, pad)[0],
                               hp.template_groups()) for r, s_idx in rows]
            keys[layer] = torch.stack(ks).double()  # [n_cases, d_in]
        handle.memo[MEMO] = keys
        handle.diagnostics["nullspace_dims"] = [int(self.nullspace(model, tok, layer, hp).shape[1])
                                                for layer in hp.layers]

    def artefacts(self, model, tok, hparams) -> list[Artefact]:
        """C of every edited layer and its null-space basis (both made by `driftbench stats`)."""
        from editors.stats import projection_filename

        hp, arch = self.hparams_cls.from_dict(hparams), arch_for(model)
        return super().artefacts(model, tok, hparams) + [
            Artefact("projection", str(Path(hp.stats_dir) / projection_filename(
                self.stats_key(model, arch.layer("mlp_out", layer), hp)[0], hp.nullspace_threshold)),
                "driftbench stats") for layer in hp.edit_layers()]

    def prepare(self, model, tok, hparams, progress: bool = True) -> list[str]:
        hp = self.hparams_cls.from_dict(hparams)
        done = super().prepare(model, tok, hparams, progress)
        for layer in hp.edit_layers():
            basis = self.nullspace(model, tok, layer, hp)
            done.append(f"layer {layer}: null space of C below {hp.nullspace_threshold:g}: {basis.shape[1]} of "
                        f"{basis.shape[0]} dimensions")
        return done
