"""WISE — lifelong editing with a side memory, knowledge sharding and routing (Wang et al., NeurIPS 2024; the
official code is EasyEdit's `easyeditor/models/wise`), and WISE+SADR: SADR's term in the side memory's loss.

The main memory is one MLP down-projection W (layer ``layer``); the side memory W' starts as a copy of W. The
module is swapped for a `SideMemory` (restore swaps the original back: nothing of the side memory survives).

Editing one case (``n_iter`` SGD steps on W' only, lr ``edit_lr``, weight decay ``weight_decay``; the forward
always goes through W' while editing):

    L = NLL(target_new | template ⊕ prompt)                                   (the context-template rows)
        + m⁺(s_out − s_in + γ) + m⁺(s_out − α) + m⁺(β − s_in)                 (the routing margin, act_margin α, β, γ)
        [+ γ_SADR · L_SADR]

    s(x) = mean over x's tokens t of ‖act(W' x_t + b) − act(W x_t + b)‖₂     (act: the model's MLP activation)

s_in per edit row, s_out of an unrelated row (a WikiText line chosen by the case id); m⁺(v) is the mean of v's
positive entries (0 if none). The gradient is multiplied by the shard's random mask (a fraction ``mask_ratio`` of the
entries, one mask per shard, seeded); after each step W' is clamped to W ± ``norm_constraint`` elementwise; the loop
stops early once the loss is ≤ 0.02 and moved ≤ 1e-4 since the previous step (EasyEdit compares the two steps
before: it may stop one step earlier). After the edit, its routing score — the
routing statistic below at the bare prompt's last token — joins the shard's record.

Routing at inference, per memory c (the current shard, every stored shard and merged memory): the score at position t
is the mean of ‖act(W_c x) − act(W x)‖₂ over the row's real tokens up to t (the attention mask; continued across a KV
cache); c answers where its score exceeds ε_c = ``act_ratio`` · min over its edits of their routing scores, and among
those the highest score wins (top-1); elsewhere the main memory answers.

Sequential streams: every ``save_freq`` edits the shard is stored and a fresh W' starts from W (with a new mask);
every ``merge_freq`` edits the stored shards are merged by TIES (trim to ``density``, elect signs, disjoint mean) —
into one memory with the previous merge (weights 0.6 and 0.4/n, WISE-Merge) or, with ``retrieve``, into a new memory
beside the older ones (WISE-Retrieve).

Deviations from EasyEdit (each for determinism or because the original's choice cannot score a batch):
- the routing decision is per row and causal (prefix means over real tokens), not one decision per forward call from
  the mean over every token of every row (which forces batch size 1, counts padding and the scored continuation);
  the threshold is calibrated on the same statistic (each edit's prefix mean at its prompt's last token), where
  EasyEdit takes the template rows' whole-row means;
- the side memory keeps the layer's bias (EasyEdit drops it on GPT-J's fc_out);
- the NLL is the mean over target tokens, as every editor here (EasyEdit divides the sum by T + 1);
- context templates are the suite's (`editors.core.generate_context_templates`: 5 prefixes, sampled, seeded), not
  EasyEdit's greedy continuations of "I", "You", "Because", "Yes", "Q: "; masks are drawn from a seeded generator.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from editors.base import EditHandle, Editor, HparamsError
from editors.core import Hparams, _is_int, build_batch, generate_context_templates, make_request, only_grad
from editors.replay import PrefixCache
from model_layer.arch import arch_for
from model_layer.attention import attention_rows
from model_layer.batching import right_pad


@dataclass
class WiseHparams(Hparams):
    layer: int
    n_iter: int = 70
    edit_lr: float = 1.0
    weight_decay: float = 1e-5
    mask_ratio: float = 0.2
    norm_constraint: float = 1.0
    act_margin: tuple = (5.0, 20.0, 10.0)  # α (out-of-scope ceiling), β (in-scope floor), γ (gap)
    act_ratio: float = 0.88
    save_freq: int = 500
    merge_freq: int = 1000
    retrieve: bool = True
    density: float = 0.53
    mask_seed: int = 0
    template_lengths: tuple = ((5, 5), (10, 5))  # 1 + 10 rows, the original's 11
    template_seed: int = 0
    loc_tokens: int = 24
    sadr_gamma: float = 1e-2
    sadr_steps: int = 70
    sadr_hinge: bool = True
    stats_corpus: str = "../shared/data/wikitext-2-raw/wiki.test.raw"  # the unrelated lines (WISE reads no statistics)

    editor: ClassVar[str] = "WISE"
    required: ClassVar[dict[str, str]] = {"layer": "the MLP whose down-projection gets a side memory"}

    @classmethod
    def normalise(cls, kw: dict[str, Any]) -> dict[str, Any]:
        m = kw.get("act_margin", cls.act_margin)
        if len(m) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in m):
            raise HparamsError(f"WISE hparams 'act_margin' must be three numbers >= 0 (α, β, γ), got {m!r}")
        for name in ("n_iter", "save_freq", "merge_freq", "loc_tokens"):
            if name in kw and not kw[name] >= 1:
                raise HparamsError(f"WISE hparams {name!r} must be >= 1, got {kw[name]!r}")
        for name in ("mask_ratio", "density", "act_ratio"):
            if name in kw and not 0 < kw[name] <= 1:
                raise HparamsError(f"WISE hparams {name!r} must be in (0, 1], got {kw[name]!r}")
        for name in ("edit_lr", "norm_constraint"):
            if name in kw and not kw[name] > 0:
                raise HparamsError(f"WISE hparams {name!r} must be > 0, got {kw[name]!r}")
        save, merge = kw.get("save_freq", cls.save_freq), kw.get("merge_freq", cls.merge_freq)
        if merge % save:
            raise HparamsError(f"WISE hparams 'merge_freq' ({merge}) must be a multiple of 'save_freq' ({save})")
        tl = kw.get("template_lengths", cls.template_lengths)
        if not all(isinstance(x, (list, tuple)) and len(x) == 2 and all(_is_int(y) and y > 0 for y in x) for x in tl):
            raise HparamsError(f"WISE hparams 'template_lengths' must be [length, count] pairs, got {tl!r}")
        return dict(kw, act_margin=tuple(float(x) for x in m), template_lengths=tuple(tuple(x) for x in tl))


def ties_merge(base: torch.Tensor, weights: list[torch.Tensor], coeffs: list[float], density: float) -> torch.Tensor:
    """TIES (Yadav et al., 2023) of ``weights`` around ``base``: each task vector W_i − base trimmed to its top
    ``density`` fraction by magnitude, the sign elected by the weighted sum, then the weighted mean of the entries
    that agree with it (entries where none agrees stay at ``base``)."""
    taus = []
    for w in weights:
        tau = (w - base).float()
        k = int(density * tau.numel())
        if k < tau.numel():
            keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
            keep[tau.abs().flatten().topk(k).indices] = True
            tau = tau * keep.view_as(tau)
        taus.append(tau)
    c = torch.tensor(coeffs, dtype=torch.float32, device=base.device).view(-1, *[1] * base.dim())
    stacked = torch.stack(taus) * c
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    total = (c * agree).sum(0)
    merged = (stacked * agree).sum(0) / torch.where(total == 0, torch.ones_like(total), total)
    return (base.float() + merged).to(base.dtype)


def _activation(config):
    from transformers.activations import ACT2FN

    for name in ("hidden_act", "hidden_activation", "activation_function"):
        act = getattr(config, name, None)
        if isinstance(act, str):
            return ACT2FN[act]
    raise HparamsError(f"{type(config).__name__} names no MLP activation (hidden_act / activation_function)")


class SideMemory(nn.Module):
    """The wrapped down-projection: the main memory (the original module, untouched), the side memory W' being
    trained, the stored shards and merged memories, and the routing between them (see the module docstring)."""

    def __init__(self, main: nn.Module, act, act_ratio: float):
        super().__init__()
        self.main = main
        self.act_ratio = act_ratio
        self.side = nn.Parameter(main.weight.detach().clone(), requires_grad=False)  # trained only inside an edit
        self.act = act
        self.editing = False
        self.shard_scores: list[float] = []  # the routing score of each edit in the current shard
        self.stored: list[tuple[torch.Tensor, float]] = []  # saved shards not merged yet: (W, min s_in)
        self.memories: list[tuple[torch.Tensor, float]] = []  # merged memories
        self.count = 0  # edits so far
        self.mask: torch.Tensor | None = None
        self.last_dist: torch.Tensor | None = None  # [B, T] distances of the latest editing forward
        self.last_routed: torch.Tensor | None = None
        self.call: dict[str, Any] = {}  # the current forward's attention mask and cache state (model pre-hook)
        self._sums: torch.Tensor | None = None  # prefix sums across a KV-cached generation: [B, C]
        self._counts: torch.Tensor | None = None

    def _out(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.main.bias)

    def _dist(self, out: torch.Tensor, main_out: torch.Tensor) -> torch.Tensor:
        return (self.act(out) - self.act(main_out)).float().norm(dim=-1)

    def candidates(self) -> list[tuple[torch.Tensor, float]]:
        cur = [(self.side, self.act_ratio * min(self.shard_scores))] if self.shard_scores else []
        return cur + self.stored + self.memories

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main_out = self.main(x)
        if self.editing:
            out = self._out(x, self.side)
            self.last_dist = self._dist(out, main_out)
            return out
        cands = self.candidates()
        if not cands:
            return main_out
        b, t = x.shape[:2]
        mask = self.call.get("mask")
        m = (mask[:, -t:] if mask is not None else torch.ones(b, t, device=x.device)).float()
        outs = [self._out(x, w) for w, _ in cands]
        dist = torch.stack([self._dist(o, main_out) for o in outs], dim=-1)  # [B, T, C]
        sums = torch.cumsum(dist * m[..., None], dim=1)
        counts = torch.cumsum(m, dim=1)[..., None].expand_as(sums)
        if self.call.get("continues") and self._sums is not None and self._sums.shape == (b, len(cands)):
            sums, counts = sums + self._sums[:, None], counts + self._counts[:, None]
        self._sums, self._counts = sums[:, -1].detach(), counts[:, -1].detach()
        score = sums / counts.clamp(min=1)
        thr = torch.tensor([eps for _, eps in cands], device=x.device)
        score = torch.where(score > thr, score, torch.full_like(score, -1.0))
        best = score.argmax(-1)  # [B, T]
        routed = score.gather(-1, best[..., None])[..., 0] > -1.0
        self.last_routed = routed  # [B, T]: where a side memory answered (diagnostics and tests)
        pick = torch.stack(outs, dim=-2).gather(-2, best[..., None, None].expand(b, t, 1, main_out.shape[-1]))[..., 0, :]
        return torch.where(routed[..., None], pick, main_out)

    # -- state of a stream (for a later edit's exact undo) ------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """A snapshot for a later edit's undo, kept on the CPU (a long stream would otherwise hold one weight copy
        per edit on the device)."""
        return {"side": self.side.detach().to("cpu", copy=True), "shard_scores": list(self.shard_scores),
                "stored": list(self.stored), "memories": list(self.memories), "count": self.count,
                "mask": self.mask}

    def load_state(self, s: dict[str, Any]) -> None:
        with torch.no_grad():
            self.side.copy_(s["side"])
        self.shard_scores, self.stored, self.memories = list(s["shard_scores"]), list(s["stored"]), list(s["memories"])
        self.count, self.mask = s["count"], s["mask"]
        self._sums = self._counts = None


def _row_means(dist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return (dist * m).sum(1) / m.sum(1).clamp(min=1)


def _pos_mean(v: torch.Tensor) -> torch.Tensor:
    """m⁺: the mean of the positive entries (0 when there are none), as the original."""
    pos = v[v > 0]
    return pos.mean() if pos.numel() else v.new_zeros(())


class Wise(Editor):
    name = "wise"
    capabilities = frozenset({"sadr", "sequential", "changes_forward"})
    undo = "modules"
    hparams_cls = WiseHparams
    sadr_in_streams = False  # the side memory's routing hook is not reverted by EditContext.unedited

    def __init__(self, prefix_cache: bool = True):
        self._templates: dict[tuple, list[str]] = {}
        self._lines: dict[str, list[str]] = {}
        self.prefix_cache = prefix_cache  # same numbers either way (tested); off only to compare

    def code_files(self):
        from editors import replay

        return super().code_files() + [replay.FILE]  # the side-memory loop replays the blocks below it

    def unrelated_line(self, tok, hp: WiseHparams, case_id: str) -> list[int]:
        """An unrelated row for s_out: a WikiText line chosen by the case id, cut to ``loc_tokens`` tokens."""
        if hp.stats_corpus not in self._lines:
            from editors.stats import wikitext_articles

            lines = [ln.strip() for a in wikitext_articles(hp.stats_corpus) for ln in a.split("\n")]
            self._lines[hp.stats_corpus] = [ln for ln in lines if len(ln) > 80 and not ln.startswith("=")]
        lines = self._lines[hp.stats_corpus]
        i = int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16) % len(lines)
        return tok(lines[i])["input_ids"][: hp.loc_tokens]

    def memory(self, model, handle: EditHandle, hp: WiseHparams) -> SideMemory:
        """The layer's side memory: swapped in by the first edit of a unit (with the model pre-hook that tells it
        each forward's attention mask and cache state); a later edit of the stream snapshots its state instead."""
        name = arch_for(model).layer("mlp_out", hp.layer)
        current = model.get_submodule(name)
        if isinstance(current, SideMemory):
            snap = current.state()
            handle.on_restore(lambda: current.load_state(snap))
            return current
        mem = SideMemory(current, _activation(model.config), hp.act_ratio)

        def pre_hook(_m, args, kwargs):
            past = kwargs.get("past_key_values", kwargs.get("cache"))
            mem.call = {"mask": kwargs.get("attention_mask"),
                        "continues": past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0}

        hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        handle.on_restore(hook.remove)
        handle.swap(model, name, mem)
        return mem

    def apply(self, model, tok, cases, hparams: dict[str, Any], ctx) -> EditHandle:
        hp = WiseHparams.from_dict(hparams)
        self.check_hparams(model, hparams)
        (case,) = cases
        t0 = time.perf_counter()
        dev = next(model.parameters()).device
        key = (id(model), hp.template_lengths, hp.template_seed)
        if key not in self._templates:
            self._templates[key] = generate_context_templates(model, tok, hp.template_lengths, hp.template_seed)
        batch = build_batch(tok, make_request(case), self._templates[key], dev)
        loc_ids, loc_mask = right_pad([self.unrelated_line(tok, hp, case.case_id)], tok.pad_token_id)
        loc_ids, loc_mask = loc_ids.to(dev), loc_mask.to(dev)
        if ctx.sadr is not None and not ctx.pristine:  # the harness refuses such cells first (sadr_in_streams)
            raise HparamsError("WISE+SADR in a stream is not supported yet: SADR's reference mid-stream needs the "
                               "unedited forward, which a side memory's hook does not revert; run wise+sadr on "
                               "single edits, or wise.seq<T> without SADR")
        handle = EditHandle()
        mem = self.memory(model, handle, hp)
        try:
            return self._edit(model, tok, case, batch, loc_ids, loc_mask, hp, ctx, handle, mem, t0)
        except BaseException:
            handle.restore()  # a failed edit leaves no side memory or hook behind
            raise

    def _edit(self, model, tok, case, batch, loc_ids, loc_mask, hp: WiseHparams, ctx, handle: EditHandle,
              mem: SideMemory, t0: float) -> EditHandle:
        dev = next(model.parameters()).device
        n = batch.n_rewrite
        ids, mask = batch.input_ids[:n], batch.attention_mask[:n]
        if mem.count % hp.save_freq == 0 or mem.mask is None:  # a new shard: a new random mask
            gen = torch.Generator().manual_seed(hp.mask_seed * 1_000_003 + mem.count // hp.save_freq)
            mem.mask = (torch.rand(mem.side.shape, generator=gen) < hp.mask_ratio).to(dev, mem.side.dtype)
        w0 = mem.main.weight.detach()
        alpha, beta, gamma = hp.act_margin
        extras = ctx.extra_losses(first_layer=hp.layer + 1)
        steps = hp.sadr_steps if ctx.sadr_step_count else hp.n_iter
        opt = torch.optim.SGD([mem.side], lr=hp.edit_lr, weight_decay=hp.weight_decay)
        # nothing below the side memory's block changes while editing: its blocks run once per input, then replay
        prefix = PrefixCache.below(model, hp.layer, self.prefix_cache)
        losses, prev, s_in = [], None, None
        mem.editing = True
        try:
            with only_grad(model, [mem.side]):
                rows = torch.arange(n, device=dev)
                for it in range(steps):
                    with attention_rows(model, rows, batch.query_idx, hp.layer + 1) if extras else nullcontext({}) as att, \
                            prefix("edit"):
                        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    d_in = mem.last_dist
                    nll = torch.stack([-F.log_softmax(logits[i, batch.label_pos[i]].float(), -1)
                                       .gather(1, torch.tensor(batch.labels[: len(batch.label_pos[i])], device=dev)[:, None])
                                       .mean() for i in range(n)]).mean()
                    with prefix("unrelated"):
                        model(input_ids=loc_ids, attention_mask=loc_mask, use_cache=False, logits_to_keep=1)
                    s_in, s_out = _row_means(d_in, mask), _row_means(mem.last_dist, loc_mask)
                    margin = (_pos_mean(s_out - s_in + gamma) + _pos_mean(s_out - alpha) + _pos_mean(beta - s_in))
                    loss = nll + margin
                    parts = {"nll": nll.item(), "margin": margin.item()}
                    for extra in extras:
                        term = extra(it, dict(att), batch)
                        if term is not None:
                            loss = loss + term
                            parts[type(extra).__name__] = term.item()
                    parts["total"] = loss.item()
                    losses.append(parts)
                    if prev is not None and abs(loss.item() - prev) <= 1e-4 and loss.item() <= 0.02:
                        break
                    prev = loss.item()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    mem.side.grad.mul_(mem.mask)
                    opt.step()
                    with torch.no_grad():
                        mem.side.copy_(torch.clamp(mem.side, w0 - hp.norm_constraint, w0 + hp.norm_constraint))
                with torch.no_grad():  # the edit's own routing score: the bare prompt's prefix mean at its last token
                    q = int(batch.query_idx[0])
                    model(input_ids=ids[:1, : q + 1], use_cache=False, logits_to_keep=1)
                    score = float(mem.last_dist[0].mean())
        finally:
            mem.editing = False
            mem.side.grad = None
        threshold = hp.act_ratio * min(mem.shard_scores + [score])
        self._remember(mem, score, hp)
        notes = {k: v for e in extras for k, v in getattr(e, "notes", dict)().items()}
        handle.diagnostics = {"layer": hp.layer, "steps": len(losses), "final_loss": losses[-1],
                              "s_in": float(s_in.detach().mean()), "score": score,
                              "threshold": threshold,
                              "edits": mem.count, "shards_stored": len(mem.stored), "memories": len(mem.memories),
                              **notes}
        handle.timings = {"optimise_s": time.perf_counter() - t0}
        return handle

    @staticmethod
    def _remember(mem: SideMemory, score: float, hp: WiseHparams) -> None:
        """Record the edit's routing score; store the shard every save_freq edits and merge every merge_freq (module doc)."""
        mem.shard_scores.append(score)
        mem.count += 1
        if mem.count % hp.save_freq == 0:
            mem.stored.append((mem.side.detach().clone(), hp.act_ratio * min(mem.shard_scores)))
            with torch.no_grad():
                mem.side.copy_(mem.main.weight)
            mem.shard_scores = []
        if mem.count % hp.merge_freq == 0 and mem.stored:
            base = mem.main.weight.detach()
            ws, eps = [w for w, _ in mem.stored], min(e for _, e in mem.stored)
            if hp.retrieve:
                mem.memories.append((ties_merge(base, ws, [1.0 / len(ws)] * len(ws), hp.density), eps))
            elif mem.memories:
                (old, old_eps), = mem.memories
                mem.memories = [(ties_merge(base, [old] + ws, [0.6] + [0.4 / len(ws)] * len(ws), hp.density),
                                 min(old_eps, eps))]
            else:
                mem.memories = [(ties_merge(base, ws, [1.0 / len(ws)] * len(ws), hp.density), eps)]
            mem.stored = []

