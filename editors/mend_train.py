"""Training MEND's hyper-network (the `train_mend` stage; the editor itself is editors/mend.py).

For each training edit (prompt, target_new) with a locality example (another training case's prompt and its true
answer), as the original's outer loop:

    (u, δ) of the edit NLL on the unedited model  →  ΔW = g(u, δ)  →  W' = W + ΔW  (functional: W is never written)
    L = cedit · NLL_{W'}(target_new | prompt) + cloc · KL(p_W(· | loc) ‖ p_{W'}(· | loc)) [+ γ · L_SADR]

The edit loss is EasyEdit's ("edit_inner": the edit prompt itself); the KL is over the positions predicting the locality
answer's tokens (EasyEdit's zsRE loss). MEND+SADR adds SADR's term (editors/sadr.py, built by the framework's
`EditContext`) on the edit prompt: the attention of the edited forward W' against the unedited forward W at the
prompt's last token, in the layers above the first edited one. Adam (``lr``) on g's parameters and the steps η_ℓ,
gradients averaged over ``accumulate`` edits, clipped to ``grad_clip``; a step whose loss is not finite is skipped
(as the original). The original's second Adam for η (``lr_lr``) is left out: it steps after the main optimiser has
zeroed the gradients, so it never changes η (the main Adam trains η, as here).

Training cases: the dataset's cases outside the profile's evaluated subset and outside the first ``heldout`` cases of
the sweeps' held-out order (so no evaluated or swept case is ever trained on); the order is a permutation seeded by
``train_seed``. Every ``checkpoint_every`` optimiser steps a snapshot (g, Adam, losses, position) is written
atomically beside the output; a killed run resumes from it and ends with the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from basis.errors import UserError
from basis.io import atomic_write_bytes, sha256_text
from data_pipeline.schema import Case
from editors.base import EditContext
from editors.core import only_grad
from editors.mend import MendHparams, MendNet, edit_row, edited_weights, gradient_factors, nll_at, save_checkpoint
from editors.replay import PrefixCache
from model_layer.attention import attention_rows

PREFIX_CACHE = True  # replay the blocks below the edited layers (same bytes either way; tests compare)


def training_cases(cases: list[Case], exclude: set[str], seed: int) -> list[Case]:
    """The cases MEND trains on (``exclude``: evaluated and held-out ids), in a seeded order."""
    pool = sorted((c for c in cases if c.case_id not in exclude), key=lambda c: c.case_id)
    if len(pool) < 2:
        raise UserError(f"MEND training needs at least 2 cases outside the excluded ones, has {len(pool)}")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in order]


def training_id(cases: list[Case]) -> str:
    """sha256[:16] of the training cases' ids in order: part of the checkpoint's recipe, so another training set
    (another subset, held-out size or seed) is another file, never a stale one."""
    return sha256_text("\n".join(c.case_id for c in cases))[:16]


def locality_row(tok, case: Case, device):
    """``case``'s prompt + its true answer as an unrelated fact: (ids, mask, label positions)."""
    _, ids, mask, label_pos, _ = edit_row(tok, dataclasses.replace(case, target_new=case.target_true), device)
    return ids, mask, label_pos


def kl_at(pre: torch.Tensor, post: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """Mean over ``pos`` of KL(softmax(pre) ‖ softmax(post)) for one row's logits [T, V]."""
    p = torch.tensor(pos, device=pre.device)
    lp, lq = F.log_softmax(pre[p].float(), -1), F.log_softmax(post[p].float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def outer_loss(model, tok, net: MendNet, hp: MendHparams, edit: Case, loc: Case, sadr: dict[str, Any] | None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """MEND's training loss for one edit and one locality example (with SADR's term when ``sadr``)."""
    dev = next(model.parameters()).device
    shapes = edited_weights(model, hp)
    names = list(shapes)
    batch, ids, mask, label_pos, labels = edit_row(tok, edit, dev)
    # the edit changes only blocks min(layers) and above: the blocks below run once per row (edit, locality) and
    # the post-edit forwards replay them (bit-identical; PREFIX_CACHE = False runs them every time, for the test)
    prefix = PrefixCache.below(model, min(hp.layers), PREFIX_CACHE)
    factors, nll_pre = gradient_factors(model, names, ids, mask, label_pos, labels, prefix("edit"))
    deltas = net.deltas(factors)
    params = dict(model.named_parameters())
    fast = {n: params[n] + deltas[n].to(params[n].dtype) for n in names}
    extras = EditContext(model, sadr).extra_losses(first_layer=min(hp.layers) + 1)
    rows = torch.zeros(1, dtype=torch.long, device=dev)

    def run(weights, ids_, mask_, attn: bool, key: str):
        with prefix(key):
            if not attn:
                return torch.func.functional_call(model, weights, (), dict(input_ids=ids_, attention_mask=mask_,
                                                                          use_cache=False)).logits[0], None
            with attention_rows(model, rows, batch.query_idx[:1], min(hp.layers) + 1) as att:
                logits = torch.func.functional_call(model, weights, (), dict(input_ids=ids_, attention_mask=mask_,
                                                                            use_cache=False)).logits[0]
            return logits, dict(att)

    with torch.no_grad():
        l_ids, l_mask, l_pos = locality_row(tok, loc, dev)
        pre_loc = run({}, l_ids, l_mask, False, "loc")[0]
        pre_att = run({}, ids, mask, True, "edit")[1] if extras else None
    post, post_att = run(fast, ids, mask, bool(extras), "edit")
    l_edit = nll_at(post, label_pos, labels)
    l_loc = kl_at(pre_loc, run(fast, l_ids, l_mask, False, "loc")[0], l_pos)
    loss = hp.cedit * l_edit + hp.cloc * l_loc
    parts = {"edit_nll_pre": nll_pre, "edit_nll": l_edit.item(), "loc_kl": l_loc.item()}
    one = dataclasses.replace(batch, n_rewrite=1)
    for extra in extras:  # SADR: step 0 takes the unedited rows as its reference, step 1 scores the edited ones
        extra(0, pre_att, one)
        term = extra(1, post_att, one)
        loss = loss + term
        parts["sadr"] = term.item()
    parts["total"] = loss.item()
    return loss, parts


def train(model, tok, cases: list[Case], hp: MendHparams, sadr: dict[str, Any] | None, out: Path,
          progress: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train g on ``cases`` (already the training set, in order) for ``hp.train_steps`` edits; write the checkpoint
    to ``out`` (resuming from ``<out>.resume.pt`` when present). Returns the checkpoint's metadata."""
    model.eval()
    with only_grad(model):  # the model is never trained: its weights need no gradient path
        return _train(model, tok, cases, hp, sadr, out, progress)


def _train(model, tok, cases, hp, sadr, out, progress):
    shapes = edited_weights(model, hp)
    dev = next(model.parameters()).device
    net = MendNet(shapes, hp).to(dev).train()
    opt = torch.optim.Adam(net.parameters(), lr=hp.lr)
    resume = out.with_name(out.name + ".resume.pt")
    ids_sha = training_id(cases)
    if hp.train_cases and hp.train_cases != ids_sha:
        raise UserError(f"MEND hparams train_cases {hp.train_cases} name another training set than the {len(cases)} "
                        f"cases given ({ids_sha})")
    key = {"recipe": hp.recipe(sadr), "cases": ids_sha}
    state = {"step": 0, "history": [], "skipped": 0}
    if resume.is_file():
        snap = torch.load(resume, weights_only=False, map_location=dev)
        if snap["key"] != key:
            raise UserError(f"{resume}: a snapshot of another training run (recipe or cases differ): delete it")
        net.load_state_dict(snap["net"])
        opt.load_state_dict(snap["opt"])
        state = snap["state"]
    n = len(cases)
    params = list(net.parameters())
    window: list[dict] = []
    while state["step"] < hp.train_steps:
        i = state["step"]
        loss, parts = outer_loss(model, tok, net, hp, cases[i % n], cases[(i + n // 2) % n], sadr)
        if math.isfinite(loss.item()):
            grads = torch.autograd.grad(loss / hp.accumulate, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        else:
            state["skipped"] += 1
        window.append(parts)
        state["step"] += 1
        if state["step"] % hp.accumulate == 0 or state["step"] == hp.train_steps:
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["history"].append({k: sum(w[k] for w in window) / len(window) for k in window[0]})
            window = []
            if progress is not None:
                progress(state["step"], state["history"][-1])
            if len(state["history"]) % hp.checkpoint_every == 0 and state["step"] < hp.train_steps:
                import io

                buf = io.BytesIO()
                torch.save({"key": key, "net": net.state_dict(), "opt": opt.state_dict(), "state": state}, buf)
                atomic_write_bytes(resume, buf.getvalue())
    meta = {"names": net.names, "key": key, "steps": state["step"], "skipped": state["skipped"],
            "history": state["history"]}
    save_checkpoint(net.eval(), out, meta)
    resume.unlink(missing_ok=True)
    return meta
