"""SADR — Selective Attention Drift Restriction (Wang et al., ICLR 2025), reference-spec §3, as one extra loss term.

With P the attention of the unedited forward on the same batch (optimisation step 0, δ = 0) and Q the current one,
for every layer l, rewriting prompt j (N of them; the essence-KL row is excluded) and head h, looking only at the
query row q_j (the prompt's last token, which predicts the first target token) and the key column s_j (the
subject's last token, where δ is injected):

    M_{l,j}   = max_h P[l,j,h,q_j,s_j]                                   (largest vanilla head)
    m_{l,j,h} = [ Q[l,j,h,q_j,s_j] > M_{l,j} ]     (no gradient, recomputed each step; all ones if hinge=False)
    L_SADR    = Σ_l (1/N) Σ_j Σ_h m_{l,j,h} · Σ_k P[l,j,h,q_j,k] · log(P[l,j,h,q_j,k] / Q[l,j,h,q_j,k])

with eps = 1e-8 added to P and Q (no renormalisation), weighted by γ, and no term at step 0.
Everything is vectorised over layers, prompts and heads (no Python loops over heads); only the q_j rows are
computed, beside an SDPA forward (model_layer.attention.attention_rows), never whole maps. Layers at or below the edit layer cannot change (δ enters after their attention), so
their KL is exactly 0 and their mask exactly false: ``first_layer`` skips them without changing the value.
Deviation: the KL is computed in fp32 even when the model runs in bf16 (the reference computes it in bf16).
"""
from __future__ import annotations

from typing import Callable

import torch

from editors.core import Batch
from model_layer.attention import stack_rows


def sadr_kl(p: torch.Tensor, q: torch.Tensor, subject_idx: torch.Tensor, hinge: bool = True,
            eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """L_SADR (un-weighted) from vanilla rows ``p`` and current rows ``q`` [L, N, H, T]; returns (loss, mask)."""
    p, q = p + eps, q + eps
    L, N, H, _ = p.shape
    s = subject_idx[:N].view(1, N, 1, 1).expand(L, N, H, 1)
    p_s, q_s = p.gather(-1, s).squeeze(-1), q.gather(-1, s).squeeze(-1)  # [L, N, H]
    if hinge:
        mask = (q_s > p_s.max(dim=2, keepdim=True).values).detach()
    else:
        mask = torch.ones_like(q_s, dtype=torch.bool)
    kl = (p * (p.log() - q.log())).sum(-1)  # [L, N, H]
    return (kl * mask).sum(2).mean(1).sum(0), mask


class SADRLoss:
    """γ·L_SADR as an `ExtraLoss` of any optimisation loop. Built by the framework (`EditContext.extra_losses`),
    never by an editor. The reference P is the unedited model's attention on the loop's batch: the step-0 forward
    when the loop starts from the unedited model (δ = 0, weights untouched), else ``reference(batch, first_layer)``
    (the model with every earlier edit of a sequential stream reverted). The loop passes ``attentions`` as
    ``{layer: [N, H, T]}``, the q_j rows of the rewriting prompts (`ExtraLoss`)."""
    needs_attentions = True

    def __init__(self, gamma: float, hinge: bool = True, first_layer: int = 0, eps: float = 1e-8,
                 reference: Callable[[Batch, int], dict] | None = None):
        self.gamma, self.hinge, self.first_layer, self.eps = gamma, hinge, first_layer, eps
        self.reference = reference
        self.vanilla: torch.Tensor | None = None
        self.selected: list[int] = []  # number of selected (layer, prompt, head) triples per step

    def notes(self) -> dict:
        return {"sadr_selected_heads": self.selected}

    def __call__(self, step: int, attentions, batch: Batch) -> torch.Tensor | None:
        rows = stack_rows(attentions, self.first_layer)
        if self.vanilla is None:
            if self.reference is None:
                self.vanilla = rows.detach()
            else:
                self.vanilla = stack_rows(self.reference(batch, self.first_layer), self.first_layer).detach()
        if step == 0:
            return None
        loss, mask = sadr_kl(self.vanilla, rows, batch.subject_idx, self.hinge, self.eps)
        self.selected.append(int(mask.sum()))
        return self.gamma * loss
