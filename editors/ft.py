"""FT-L — constrained fine-tuning of one MLP weight (the FT baseline of ROME, Meng et al., 2022;
`kmeng01/rome` baselines/ft, hparams/FT/*_constr.json), optionally + γ·L_SADR in the same loop.

1. Only the down-projection of ``layer`` is trainable: its weight W, and its bias where it has one (GPT-J's fc_out,
   NeoX's dense_4h_to_h; the reference trains every parameter of the module); W₀ their values before the edit.
2. For ``num_steps`` iterations: loss = mean per-token NLL of target_new after the edit prompt (teacher forcing),
   + γ·L_SADR on a +sadr cell; if the loss ≥ ``stop_loss`` an Adam step (lr, weight decay ``weight_decay``); then
   W ← clamp(W, W₀ − ε, W₀ + ε) elementwise (the L∞ ``norm_constraint``); stop once the loss is below ``stop_loss``.
   Adam and the clamp work on an fp32 master copy written back in the model's dtype each step, as the reference's
   fp32 model: in bf16, W₀ ± ε with ε = 5e-5 would round back to W₀ for most weights.

Deviation: the reference scores every target token at the prompt's last position (a known quirk: for a multi-token
target it trains the first position to emit each of them); here each target token is scored where the model
predicts it, the NLL every other editor of the suite optimises (editors.core.build_batch).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from data_pipeline.schema import Case
from editors.base import EditHandle, Editor
from editors.core import Hparams, build_batch, make_request, only_grad
from model_layer.arch import arch_for
from model_layer.attention import attention_rows


@dataclass
class FTHparams(Hparams):
    layer: int
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    norm_constraint: float = 5e-4  # ε of the L∞ ball around W₀
    stop_loss: float = 1e-2
    sadr_gamma: float = 1e-2
    sadr_steps: int = 80
    sadr_hinge: bool = True

    editor: ClassVar[str] = "FT-L"
    required: ClassVar[dict[str, str]] = {"layer": "the MLP whose down-projection is fine-tuned"}


class FineTune(Editor):
    name = "ft"
    capabilities = frozenset({"sadr", "sequential"})
    undo = "weights"
    hparams_cls = FTHparams

    def apply(self, model, tok, cases: list[Case], hparams: dict[str, Any], ctx) -> EditHandle:
        import time

        self.check_hparams(model, hparams)
        hp = FTHparams.from_dict(hparams)
        (case,) = cases
        t0 = time.perf_counter()
        dev = next(model.parameters()).device
        batch = build_batch(tok, make_request(case), ["{}"], dev)  # the edit prompt + target[:-1]; KL row unused
        n = batch.n_rewrite
        ids, mask = batch.input_ids[:n], batch.attention_mask[:n]
        label_pos = torch.tensor(batch.label_pos[0], device=dev)
        labels = torch.tensor(batch.labels[: len(batch.label_pos[0])], device=dev)
        module = arch_for(model).layer("mlp_out", hp.layer)
        trained = [(f"{module}.{n}", p) for n, p in model.get_submodule(module).named_parameters(recurse=False)]
        handle = EditHandle()
        for name, p in trained:
            handle.save(name, p)
        originals = [handle.originals[name].float() for name, _ in trained]
        masters = [w.clone() for w in originals]  # fp32: Adam state, updates and the clamp
        extras = ctx.extra_losses(first_layer=hp.layer + 1)  # W changes layer `layer`'s MLP: attention above it
        steps = hp.sadr_steps if ctx.sadr_step_count else hp.num_steps
        attn_ctx = (attention_rows(model, torch.arange(n, device=dev), batch.query_idx, hp.layer + 1)
                    if any(e.needs_attentions for e in extras) else contextlib.nullcontext({}))
        opt = torch.optim.Adam(masters, lr=hp.lr, weight_decay=hp.weight_decay)
        losses, step_s, updates = [], [], 0
        try:
            with only_grad(model, [p for _, p in trained]), attn_ctx as attn:
                for it in range(steps):
                    t1 = time.perf_counter()
                    for _, p in trained:
                        p.grad = None
                    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
                    logp = F.log_softmax(out.logits[0, label_pos].float(), dim=-1)
                    loss = -logp.gather(1, labels[:, None]).mean()
                    parts = {"nll": loss.item()}
                    for extra in extras:
                        term = extra(it, attn if extra.needs_attentions else None, batch)
                        if term is not None:
                            loss = loss + term
                            parts[type(extra).__name__] = term.item()
                    parts["total"] = loss.item()
                    losses.append(parts)
                    if loss.item() >= hp.stop_loss:
                        loss.backward()
                        for m, (_, p) in zip(masters, trained):
                            m.grad = p.grad.float()
                        opt.step()
                        updates += 1
                    with torch.no_grad():
                        for m, w0, (_, p) in zip(masters, originals, trained):
                            m.copy_(torch.clamp(m, w0 - hp.norm_constraint, w0 + hp.norm_constraint))
                            p.copy_(m.to(p.dtype))
                    step_s.append(time.perf_counter() - t1)
                    if loss.item() < hp.stop_loss:
                        break
        finally:
            for _, p in trained:
                p.grad = None
        dw = (trained[0][1].detach().float() - originals[0])
        notes = {k: v for e in extras for k, v in getattr(e, "notes", dict)().items()}
        handle.diagnostics = {"layer": hp.layer, "steps": len(losses), "updates": updates, "final_loss": losses[-1],
                              "update_norm": float(dw.norm()), "update_max_abs": float(dw.abs().max()), **notes}
        handle.timings = {"optimise_s": time.perf_counter() - t0, "step_s": step_s}
        return handle

