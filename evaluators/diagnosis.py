"""The half of the paper's diagnosis that needs the edited model's forward passes (§3.2–3.4, Table 2, Table 4),
for any cell: where the failure enters, whether attention drift predicts it, whether undoing the drift cures it.

For each of the first ``cases`` cases of the profile's subset, every distracted-neighbourhood (DNS) and relation
(RS, those that contain the subject) prompt is run on the unedited model, the cell's edit is applied
(the cell's editor, hyper-parameters and SADR setting, through `EditContext` as the harness does), the prompts are
run on the edited model, and the edit is restored (checked bit-exactly against the model's state before).

- **Drift factors (Table 2)**, from the last token's attention rows ``A[l, h, t]`` before and after the edit, with
  s the subject's last token and Δ = A_post − A_pre (our reading of the paper's three factors, written out):
  ``kl`` = Σ_l Σ_h KL(A_pre[l, h] ‖ A_post[l, h]); ``f1`` = Σ_l max_h Δ[l, h, s] (the rows' ``attn_drift``);
  ``f2`` = Σ_l max_h Σ_{t≠s} max(Δ[l, h, t], 0) (the same, at every other token); ``f3`` = Σ_l Σ_h Δ[l, h, s]
  (every head, not only the largest). Each against P(o_edit) after the edit (the paper protocol: exp of the
  mean per-token log-prob, `evaluators.scoring`), Pearson ρ and p per task.
- **Edit size (Table 4)**: per case, the Frobenius norm of the weight change (absolute and relative to the
  changed tensors' norm) against the case's mean DNS P(o_edit); ρ across cases. Editors that leave the weights
  alone (WISE's side memory) have none.
- **Contaminating substitution (§3.2, Fig. 3)**, on the first ``prompts`` prompts of each task (it costs about
  300 forwards per prompt; everything else runs on every prompt): in a forward pass of the *unedited* model, the outputs of one
  module kind (MLP or attention) in a window of ``window`` layers starting at layer l are replaced, at one group of
  token positions, by the edited model's outputs there; the effect is the change of P(o_true) (and P(o_edit))
  against the unedited pass. Token groups: before the subject, the subject's other tokens, its last token, after
  the subject, the prompt's last token. A heatmap (window start × token group) per module kind and task.
- **Patching attention (§3.4, Fig. 5)**: in a forward pass of the *edited* model, the attention probabilities of
  a window of ``window`` layers starting at layer l are replaced by the unedited model's on the same prompt (the
  values stay the edited model's); curves of P(o_true) and P(o_edit) against the window's start, x = 0 being no
  patch and x = l + 1 the window from layer l.

Substitution and patching measure the probability of each object's first token at the prompt's last position (one
forward per variant, as causal tracing does); the factors use the paper protocol above.

Hooks (all in `model_layer`): substitution uses `model_layer.hooks.inject` (adding ``edited − current`` replaces
the output); patching uses `model_layer.attention.patched_attention`.
"""
from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from data_pipeline.schema import Case
from evaluators.analysis import pearson
from evaluators.metrics import mean_ci
from evaluators.probes import build_probes

TASKS = {"DNS": "neighborhood_distracted", "RS": "relation"}
GROUPS = ("before subject", "subject", "subject last", "after subject", "last token")
KINDS = ("mlp", "attn")


@dataclass
class Prompt:
    task: str
    text: str  # the context, as scored (without the trailing space the scorer moves into the continuation)
    o_true: str
    o_edit: str
    ids: list[int]
    subject_last: int  # token index of the subject's last token
    groups: list[int]  # per token: an index into GROUPS
    t_true: int  # first token of each object's continuation
    t_edit: int


def token_groups(offsets: Sequence[tuple[int, int]], s0: int, s1: int) -> tuple[list[int], int]:
    """Per token, its group (GROUPS) for a subject at characters [s0, s1); and the subject's last token."""
    n = len(offsets)
    last_subj = None
    out = []
    for i, (a, b) in enumerate(offsets):
        if a <= s1 - 1 < b:
            g, last_subj = 2, i
        elif b <= s0 or (a == b == 0 and i == 0):  # BOS has the empty span (0, 0)
            g = 0
        elif a < s1:
            g = 1
        else:
            g = 3
        out.append(g)
    if last_subj is None:
        raise ValueError(f"no token holds the subject's last character {s1 - 1}")
    if last_subj != n - 1:
        out[n - 1] = 4
    return out, last_subj


def case_prompts(case: Case, tok, scorer, per_task: int | None = None) -> list[Prompt]:
    """The DNS prompts and the RS prompts containing the subject (the first ``per_task`` of each; None: all),
    tokenised as the scorer does."""
    probes = build_probes(case)
    out = []
    for task, key in TASKS.items():
        ps = probes.get(key)
        if ps is None:
            continue
        picked = 0
        for ctx, right, wrong in zip(ps.contexts, ps.right, ps.wrong):
            if per_task is not None and picked >= per_task:
                break
            s0 = (case.prompt.find(case.subject) if task == "DNS" else ctx.rfind(case.subject))
            if s0 < 0:
                continue
            s1 = s0 + len(case.subject)
            enc = tok(ctx, return_offsets_mapping=True)
            ctx_true, cont_true = scorer.lm._encode_pair(ctx + " ", right)
            ctx_edit, cont_edit = scorer.lm._encode_pair(ctx + " ", wrong)
            if list(enc["input_ids"]) != list(ctx_true) or list(ctx_true) != list(ctx_edit):
                raise ValueError(f"case {case.case_id}: {ctx!r} tokenises differently alone and as a scored context")
            groups, last = token_groups(enc["offset_mapping"], s0, s1)
            out.append(Prompt(task, ctx, right, wrong, list(ctx_true), last, groups, cont_true[0], cont_edit[0]))
            picked += 1
    return out


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def forward_maps(model, ids: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(every layer's attention probabilities [H, T, T] in fp32, next-token log-probs at the last position [V])."""
    from model_layer.attention import eager_attention

    x = torch.tensor([list(ids)], device=_device(model))
    with eager_attention(model):
        out = model(input_ids=x, output_attentions=True, use_cache=False)
    return [a[0].float() for a in out.attentions], torch.log_softmax(out.logits[0, -1].float(), -1)


def factors(pre: torch.Tensor, post: torch.Tensor, s: int) -> dict[str, float]:
    """The drift factors of one prompt from its last token's rows [L, H, T] before and after (module docstring)."""
    d = post - pre
    others = torch.ones(d.shape[-1], dtype=torch.bool)
    others[s] = False
    eps = 1e-12
    kl = (pre * ((pre + eps).log() - (post + eps).log())).sum()
    return {"kl": float(kl), "f1": float(d[:, :, s].max(dim=1).values.sum()),
            "f2": float(d[:, :, others].clamp(min=0).sum(-1).max(dim=1).values.sum()),
            "f3": float(d[:, :, s].sum())}


def _probs(logits_last: torch.Tensor, p: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(logits_last.float(), -1)
    return lp[..., p.t_true].exp(), lp[..., p.t_edit].exp()


@torch.no_grad()
def patch_curve(model, p: Prompt, unedited_maps: list[torch.Tensor], window: int) -> dict[str, list[float]]:
    """On the (edited) model: P(o_true), P(o_edit) with no patch (x = 0) and with the unedited attention
    probabilities in layers [l, l + window) (x = l + 1), one batch of L + 1 rows."""
    from model_layer.attention import patched_attention

    n_layers = len(unedited_maps)
    rows = {l: [x for x in range(1, n_layers + 1) if x - 1 <= l < x - 1 + window] for l in range(n_layers)}
    x = torch.tensor([p.ids] * (n_layers + 1), device=_device(model))
    with patched_attention(model, dict(enumerate(unedited_maps)), rows):
        logits = model(input_ids=x, use_cache=False, logits_to_keep=1).logits[:, -1]
    pt, pe = _probs(logits, p)
    return {"p_true": pt.tolist(), "p_edit": pe.tolist()}


@torch.no_grad()
def module_outputs(model, arch, ids: Sequence[int], n_layers: int) -> dict[tuple[str, int], torch.Tensor]:
    """{(kind, layer): output hidden states [T, D]} of every MLP and attention module on one prompt."""
    from model_layer.arch import get_module
    from model_layer.hooks import capture

    caps = {}
    with ExitStack() as stack:
        for kind in KINDS:
            for l in range(n_layers):
                caps[(kind, l)] = stack.enter_context(capture(get_module(model, arch.layer(kind, l))))
        model(input_ids=torch.tensor([list(ids)], device=_device(model)), use_cache=False, logits_to_keep=1)
    return {k: c["out"][0] for k, c in caps.items()}


@torch.no_grad()
def substitution(model, arch, p: Prompt, edited: dict[tuple[str, int], torch.Tensor], window: int,
                 batch: int = 32) -> dict[str, Any]:
    """On the (unedited) model: ΔP(o_true) and ΔP(o_edit) against the plain pass, for each module kind, window
    start and token group (NaN where the prompt has no token of the group): arrays [kind][start][group]."""
    from model_layer.arch import get_module
    from model_layer.hooks import inject

    n_layers = len({l for _, l in edited})
    dev = _device(model)
    base = model(input_ids=torch.tensor([p.ids], device=dev), use_cache=False, logits_to_keep=1).logits[:, -1]
    bt, be = _probs(base, p)
    by_group = {g: [i for i, x in enumerate(p.groups) if x == g] for g in range(len(GROUPS))}
    variants = [(k, l, g) for k in KINDS for l in range(n_layers) for g in range(len(GROUPS)) if by_group[g]]
    d_true = np.full((len(KINDS), n_layers, len(GROUPS)), np.nan)
    d_edit = np.full_like(d_true, np.nan)
    for c0 in range(0, len(variants), batch):
        chunk = variants[c0:c0 + batch]
        with ExitStack() as stack:
            for kind in KINDS:
                for layer in range(n_layers):
                    pairs = [(b, t) for b, (k, l0, g) in enumerate(chunk)
                             if k == kind and l0 <= layer < l0 + window for t in by_group[g]]
                    if not pairs:
                        continue
                    rows = torch.tensor([b for b, _ in pairs], device=dev)
                    pos = torch.tensor([t for _, t in pairs], device=dev)
                    target = edited[(kind, layer)][pos]
                    seen: list[torch.Tensor] = []
                    stack.enter_context(inject(
                        get_module(model, arch.layer(kind, layer)), rows, pos,
                        delta=lambda target=target, seen=seen: target - seen[0],
                        on_first=lambda hs, rows=rows, pos=pos, seen=seen: seen.append(hs[rows, pos].detach())))
            x = torch.tensor([p.ids] * len(chunk), device=dev)
            logits = model(input_ids=x, use_cache=False, logits_to_keep=1).logits[:, -1]
        pt, pe = _probs(logits, p)
        for b, (k, l0, g) in enumerate(chunk):
            d_true[KINDS.index(k), l0, g] = float(pt[b] - bt[0])
            d_edit[KINDS.index(k), l0, g] = float(pe[b] - be[0])
    return {"d_true": d_true, "d_edit": d_edit}


def _weight_change(model, clean: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """Frobenius norm of the change of every parameter the edit touched, and relative to those tensors' norm."""
    diff = base = 0.0
    for name, param in model.named_parameters():
        d = (param.detach().float() - clean[name].to(param.device).float())
        n = float(d.norm())
        if n > 0:
            diff += n * n
            base += float(clean[name].float().norm()) ** 2
    if diff == 0:
        return None
    return {"norm": math.sqrt(diff), "relative": math.sqrt(diff / base)}


def diagnose_case(model, tok, arch, editor, spec, case: Case, scorer, settings: dict, clean_state,
                  clean_params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Everything for one case (module docstring); the model leaves it exactly as it came (checked)."""
    from editors.base import EditContext
    from model_layer.checksum import model_state

    window = int(settings["window"])
    prompts = case_prompts(case, tok, scorer)
    n_sub = int(settings["prompts"])  # substitution on the first n_sub prompts of each task
    rank = {id(p): sum(1 for q in prompts[:i] if q.task == p.task) for i, p in enumerate(prompts)}
    pre = [forward_maps(model, p.ids) for p in prompts]
    n_layers = len(pre[0][0]) if pre else 0
    ctx = EditContext(model, editor.sadr_settings(spec.hparams) if spec.sadr else None,
                      steps_matched=spec.steps_matched)
    out: dict[str, Any] = {"case_id": case.case_id, "prompts": []}
    try:
        handle = next(editor.apply_each(model, tok, [case], dict(spec.hparams), ctx))
        ctx.push(handle)
        out["weight_change"] = _weight_change(model, clean_params)
        scored = scorer.score_pairs([(p.text + " ", o) for p in prompts for o in (p.o_true, p.o_edit)])
        for i, p in enumerate(prompts):
            post_maps, post_lp = forward_maps(model, p.ids)
            last = len(p.ids) - 1
            f = factors(torch.stack([m[:, last] for m in pre[i][0]]), torch.stack([m[:, last] for m in post_maps]),
                        p.subject_last)
            (lt, nt), (le, ne) = scored[2 * i], scored[2 * i + 1]
            curve = patch_curve(model, p, pre[i][0], window)
            sub = None
            if rank[id(p)] < n_sub:
                edited = module_outputs(model, arch, p.ids, n_layers)
                with ctx.unedited():
                    sub = substitution(model, arch, p, edited, window, int(settings.get("batch", 32)))
            out["prompts"].append({
                "task": p.task, "text": p.text, "tokens": len(p.ids), "groups": p.groups, **f,
                "p_edit": math.exp(le / ne), "p_true": math.exp(lt / nt),
                "first_token": {"pre": [float(pre[i][1][p.t_true].exp()), float(pre[i][1][p.t_edit].exp())],
                                "post": [float(post_lp[p.t_true].exp()), float(post_lp[p.t_edit].exp())]},
                "patch": curve, "substitution": None if sub is None else {k: v.tolist() for k, v in sub.items()}})
    finally:
        ctx.restore_all()
    if model_state(model, editor) != clean_state:
        raise RuntimeError(f"{spec.cell_id} case {case.case_id}: the model differs after restore()")
    return out


def summarise(per_case: list[dict]) -> dict[str, Any]:
    """Per task: ρ of each factor with P(o_edit); mean substitution heatmaps; patching curves with CIs; and the
    edit-size correlation across cases."""
    res: dict[str, Any] = {"tasks": {}}
    for task in TASKS:
        ps = [p for c in per_case for p in c["prompts"] if p["task"] == task]
        if not ps:
            continue
        y = [p["p_edit"] for p in ps]
        t: dict[str, Any] = {"n": len(ps), "rho": {f: pearson([p[f] for p in ps], y) for f in ("kl", "f1", "f2", "f3")}}
        subs = [p["substitution"] for p in ps if p.get("substitution")]
        t["n_substitution"] = len(subs)
        for key in ("d_true", "d_edit"):
            if not subs:
                continue
            arr = np.array([s_[key] for s_ in subs], dtype=np.float64)
            with warnings.catch_warnings():  # a token group no prompt has: its column stays empty (None)
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(arr, axis=0)
            t[f"substitution_{key}"] = np.where(np.isnan(mean), None, np.round(mean, 6)).tolist()
        for key in ("p_true", "p_edit"):
            curves = np.array([p["patch"][key] for p in ps], dtype=np.float64)
            t[f"patch_{key}"] = [mean_ci(curves[:, x]) for x in range(curves.shape[1])]
        res["tasks"][task] = t
    sizes = [(c["weight_change"]["norm"], c["weight_change"]["relative"],
              float(np.mean([p["p_edit"] for p in c["prompts"] if p["task"] == "DNS"])))
             for c in per_case if c.get("weight_change") and any(p["task"] == "DNS" for p in c["prompts"])]
    if sizes:
        res["edit_size"] = {"n": len(sizes), "rho_norm": pearson([a for a, _, _ in sizes], [c for _, _, c in sizes]),
                            "rho_relative": pearson([b for _, b, _ in sizes], [c for _, _, c in sizes]),
                            "norm": mean_ci(np.array([a for a, _, _ in sizes]))}
    return res


def plot(cell: str, summary: dict, window: int, path) -> None:
    """One figure per cell, a row per task: substitution heatmaps (MLP and attention outputs of the edited model,
    effect on P(o_true) and on P(o_edit)) and the patching curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if t in summary["tasks"]]
    if not tasks:
        return
    fig, axes = plt.subplots(len(tasks), 5, figsize=(24, 3.8 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        t = summary["tasks"][task]
        for j, (key, what) in enumerate((("d_true", "ΔP(o_true)"), ("d_edit", "ΔP(o_edit)"))):
            if f"substitution_{key}" not in t:
                for k in range(len(KINDS)):
                    axes[i][2 * j + k].axis("off")
                continue
            heat = np.array(t[f"substitution_{key}"], dtype=np.float64)  # [kind, start, group]
            lim = float(np.nanmax(np.abs(heat))) if np.isfinite(heat).any() else 1.0
            for k, kind in enumerate(KINDS):
                ax = axes[i][2 * j + k]
                im = ax.imshow(heat[k], aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
                ax.set_xticks(range(len(GROUPS)), GROUPS, rotation=30, fontsize=7, ha="right")
                ax.set_ylabel(f"first layer of the {window}-layer window", fontsize=7)
                ax.set_title(f"{task}: edited {kind} outputs into the unedited model → {what} "
                             f"(n = {t['n_substitution']})", fontsize=8)
                fig.colorbar(im, ax=ax, fraction=0.046)
        ax = axes[i][4]
        for key, colour in (("p_true", "tab:blue"), ("p_edit", "tab:red")):
            m = np.array([c["mean"] for c in t[f"patch_{key}"]])
            ci = np.array([c.get("ci95") or 0.0 for c in t[f"patch_{key}"]])
            xs = np.arange(len(m))
            ax.plot(xs, m, color=colour, label=key.replace("p_", "P(o_") + ")")
            ax.fill_between(xs, m - ci, m + ci, color=colour, alpha=0.2)
        ax.set_xlabel(f"unedited attention in layers x−1 … x+{window - 2}; x = 0: no patch", fontsize=7)
        ax.set_title(f"{task}: patching the edited model's attention (n = {t['n']} prompts)", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"{cell}: where the failure enters (substitution) and whether undoing the drift cures it (patching)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_diagnosis(model, tok, spec, cases: list[Case], settings: dict, progress: bool = True) -> dict[str, Any]:
    """The per-case records and their summary for one cell (``settings``: cases, prompts, window[, batch])."""
    from tqdm.auto import tqdm

    from evaluators.harness import prepare_cell
    from evaluators.scoring import ProbeScorer
    from model_layer.arch import arch_for
    from model_layer.checksum import model_state

    if spec.mode.kind != "single":
        raise ValueError(f"{spec.cell_id}: the diagnosis edits one case at a time; choose a single-edit cell")
    editor, _ = prepare_cell(model, tok, spec)
    arch = arch_for(model)
    scorer = ProbeScorer(model, tok, batch_size=32)
    clean_state = model_state(model, editor)
    clean_params = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    per_case = []
    for case in tqdm(cases[: int(settings["cases"])], desc=f"diagnose {spec.cell_id}", unit="case",
                     disable=not progress):
        per_case.append(diagnose_case(model, tok, arch, editor, spec, case, scorer, settings, clean_state,
                                      clean_params))
    return {"cell": spec.cell_id, "settings": dict(settings), "summary": summarise(per_case), "cases": per_case}
