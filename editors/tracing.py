"""Causal tracing of MLP outputs (Meng et al. 2022, ROME §2) — the documented procedure that picks the edit layer.

For a fact the model knows (prompt p with subject s, answer token a = the model's own top-1 next token when it is
the first token of " " + known attribute):
  clean      : P(a | p)
  corrupted  : P(a | p) with Gaussian noise (ν = 3 × std of the subject token embeddings) added to the subject's
               token embeddings (S seeded noise samples)
  restored_l : corrupted, but the MLP outputs of layers [l − w//2, l + w//2] at the subject's last token are set
               back to their clean values
Indirect effect IE_l = mean over samples and facts of restored_l − corrupted. The edit layer is the argmax of IE_l
(ties → the lower layer) among layers in the first half of the network, where ROME-style editing is effective.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from editors.core import encode
from model_layer.arch import arch_for


@dataclass
class TraceResult:
    layers: list[int]
    indirect_effect: list[float]
    n_facts: int
    chosen_layer: int
    clean_p: float
    corrupted_p: float


def known_facts(model, tok, path: str | Path, limit: int) -> list[tuple[str, str, int]]:
    """(prompt, subject, answer id) for facts whose top-1 next token starts the known attribute."""
    out = []
    for rec in json.loads(Path(path).read_text()):
        prompt, subject = rec["prompt"], rec["subject"]
        if subject not in prompt:
            continue
        want = encode(tok, prompt + " " + rec["attribute"])[len(encode(tok, prompt))]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([encode(tok, prompt)])).logits[0, -1]
        if int(logits.argmax()) == want:
            out.append((prompt, subject, want))
            if len(out) >= limit:
                break
    return out


@torch.no_grad()
def trace(model, tok, facts, samples: int = 3, window: int = 6, noise_mult: float = 3.0, seed: int = 0,
          progress: bool = True) -> TraceResult:
    from tqdm.auto import tqdm

    arch = arch_for(model)
    n_layers = arch.n_layers(model.config)
    emb = model.get_submodule(arch.embed)
    subj_ids = [encode(tok, s)[-1] for _, s, _ in facts]
    nu = noise_mult * emb.weight[torch.tensor(subj_ids)].float().std().item()
    gen = torch.Generator().manual_seed(seed)
    ie = torch.zeros(n_layers)
    clean_sum = corrupt_sum = 0.0
    for prompt, subject, ans in tqdm(facts, desc="causal tracing", disable=not progress):
        ids = encode(tok, prompt)
        start = prompt.index(subject)
        s_first = len(encode(tok, prompt[:start])) if start else (1 if ids[0] == tok.bos_token_id else 0)
        s_last = len(encode(tok, prompt[: start + len(subject)])) - 1
        x = torch.tensor([ids])
        # clean MLP outputs at the subject's last token, every layer
        clean_mlp: dict[int, torch.Tensor] = {}
        hooks = [model.get_submodule(arch.layer("mlp", l)).register_forward_hook(
            lambda m, i, o, l=l: clean_mlp.__setitem__(l, o[0, s_last].clone())) for l in range(n_layers)]
        p_clean = model(input_ids=x).logits[0, -1].softmax(-1)[ans].item()
        for h in hooks:
            h.remove()
        rows = 1 + n_layers  # per sample: corrupted, then one restored run per layer window
        batch = x.repeat(rows * samples, 1)
        noise = torch.randn((samples, s_last - s_first + 1, emb.weight.shape[1]), generator=gen) * nu
        noise = noise.repeat_interleave(rows, dim=0)

        def add_noise(m, i, o):
            o = o.clone()
            o[:, s_first: s_last + 1] += noise.to(o.dtype)
            return o

        def restore(l):
            def f(m, i, o, l=l):
                o = o.clone()
                for r in range(rows * samples):
                    centre = r % rows - 1  # -1 → the plain corrupted row
                    if centre >= 0 and max(0, centre - window // 2) <= l < min(n_layers, centre - window // 2 + window):
                        o[r, s_last] = clean_mlp[l]
                return o
            return f

        hooks = [emb.register_forward_hook(add_noise)]
        hooks += [model.get_submodule(arch.layer("mlp", l)).register_forward_hook(restore(l)) for l in range(n_layers)]
        try:
            p = model(input_ids=batch).logits[:, -1].softmax(-1)[:, ans].view(samples, rows)
        finally:
            for h in hooks:
                h.remove()
        corrupted = p[:, 0].mean()
        ie += (p[:, 1:] - p[:, :1]).mean(0)
        clean_sum += p_clean
        corrupt_sum += corrupted.item()
    ie /= len(facts)
    half = ie[: n_layers // 2]
    chosen = int(torch.argmax(half))
    return TraceResult(list(range(n_layers)), [round(v, 6) for v in ie.tolist()], len(facts), chosen,
                       clean_sum / len(facts), corrupt_sum / len(facts))


def plot(result: TraceResult, path: str | Path, title: str) -> None:
    """Bar chart of the indirect effect per layer, chosen layer highlighted (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=120)
    colors = ["#d62728" if l == result.chosen_layer else "#1f77b4" for l in result.layers]
    ax.bar(result.layers, result.indirect_effect, color=colors)
    ax.set_xlabel("layer (centre of restored MLP window)")
    ax.set_ylabel("indirect effect on P(answer)")
    ax.set_title(f"{title}: MLP causal trace, {result.n_facts} facts (chosen layer {result.chosen_layer})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
