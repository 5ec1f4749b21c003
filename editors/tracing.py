"""Causal tracing of MLP and attention outputs (Meng et al. 2022, ROME §2) — the documented procedure that picks
the edit layer, and the measured split of an update between attention and MLP (IntAttn-Edit's α).

For a fact the model knows (prompt p with subject s, answer token a = the model's own top-1 next token when it is
the first token of " " + known attribute):
  clean      : P(a | p)
  corrupted  : P(a | p) with Gaussian noise (ν = 3 × std of the subject token embeddings) added to the subject's
               token embeddings (S seeded noise samples)
  restored_l : corrupted, but the outputs of the traced module (``mlp``: the MLP; ``attn``: the attention block,
               its output projection included) of layers [l − w//2, l + w//2] at the subject's last token are set
               back to their clean values
Indirect effect IE_l = mean over samples and facts of restored_l − corrupted. The edit layer is the argmax of the
MLP's IE_l (ties → the lower layer) among layers in the first half of the network, where ROME-style editing is
effective. `attention_share` turns the two traces into IntAttn-Edit's α for a set of edit layers.
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
    module: str = "mlp"


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
          progress: bool = True, module: str = "mlp") -> TraceResult:
    from tqdm.auto import tqdm

    arch = arch_for(model)
    n_layers = arch.n_layers(model.config)
    emb = model.get_submodule(arch.embed)
    dev = emb.weight.device  # inputs and noise are built where the model is
    subj_ids = [encode(tok, s)[-1] for _, s, _ in facts]
    nu = noise_mult * emb.weight[torch.tensor(subj_ids, device=dev)].float().std().item()
    gen = torch.Generator().manual_seed(seed)
    ie = torch.zeros(n_layers)
    clean_sum = corrupt_sum = 0.0
    if module not in ("mlp", "attn"):
        raise ValueError(f"trace module must be 'mlp' or 'attn', got {module!r}")
    for prompt, subject, ans in tqdm(facts, desc=f"causal tracing ({module})", disable=not progress):
        ids = encode(tok, prompt)
        start = prompt.index(subject)
        s_first = len(encode(tok, prompt[:start])) if start else (1 if ids[0] == tok.bos_token_id else 0)
        s_last = len(encode(tok, prompt[: start + len(subject)])) - 1
        x = torch.tensor([ids], device=dev)
        # clean outputs of the traced module at the subject's last token, every layer
        clean_mlp: dict[int, torch.Tensor] = {}
        hooks = [model.get_submodule(arch.layer(module, l)).register_forward_hook(
            lambda m, i, o, l=l: clean_mlp.__setitem__(l, _hidden(o)[0, s_last].clone())) for l in range(n_layers)]
        p_clean = model(input_ids=x).logits[0, -1].softmax(-1)[ans].item()
        for h in hooks:
            h.remove()
        rows = 1 + n_layers  # per sample: corrupted, then one restored run per layer window
        batch = x.repeat(rows * samples, 1)
        noise = torch.randn((samples, s_last - s_first + 1, emb.weight.shape[1]), generator=gen) * nu
        noise = noise.repeat_interleave(rows, dim=0).to(dev)  # drawn on the host: the same noise on every device

        def add_noise(m, i, o):
            o = o.clone()
            o[:, s_first: s_last + 1] += noise.to(o.dtype)
            return o

        def restore(l):
            def f(m, i, o, l=l):
                h = _hidden(o).clone()
                for r in range(rows * samples):
                    centre = r % rows - 1  # -1 → the plain corrupted row
                    if centre >= 0 and max(0, centre - window // 2) <= l < min(n_layers, centre - window // 2 + window):
                        h[r, s_last] = clean_mlp[l]
                return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h
            return f

        hooks = [emb.register_forward_hook(add_noise)]
        hooks += [model.get_submodule(arch.layer(module, l)).register_forward_hook(restore(l)) for l in range(n_layers)]
        try:
            p = model(input_ids=batch).logits[:, -1].softmax(-1)[:, ans].view(samples, rows)
        finally:
            for h in hooks:
                h.remove()
        corrupted = p[:, 0].mean()
        ie += (p[:, 1:] - p[:, :1]).mean(0).cpu()
        clean_sum += p_clean
        corrupt_sum += corrupted.item()
    ie /= len(facts)
    half = ie[: n_layers // 2]
    chosen = int(torch.argmax(half))
    return TraceResult(list(range(n_layers)), [round(v, 6) for v in ie.tolist()], len(facts), chosen,
                       clean_sum / len(facts), corrupt_sum / len(facts), module)


def _hidden(o):
    return o[0] if isinstance(o, tuple) else o


def attention_share(mlp_ie: list[float], attn_ie: list[float], layers) -> float:
    """IntAttn-Edit's α for edit ``layers``: Σ_l max(IE_attn,l, 0) / Σ_l (max(IE_attn,l, 0) + max(IE_mlp,l, 0)), the
    attention's share of the two modules' measured causal contribution there (negative effects count as none);
    0.5 when neither has any. Our inference: the paper derives α from the modules' causal contributions but
    publishes no formula (neighbours §F)."""
    a = sum(max(attn_ie[l], 0.0) for l in layers)
    m = sum(max(mlp_ie[l], 0.0) for l in layers)
    return 0.5 if a + m == 0 else a / (a + m)


def plot(result: TraceResult, path: str | Path, title: str, attn: TraceResult | None = None) -> None:
    """Bar chart of the MLP's indirect effect per layer, chosen layer highlighted, and the attention's beside it
    when given (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=120)
    colors = ["#d62728" if l == result.chosen_layer else "#1f77b4" for l in result.layers]
    w = 0.42 if attn is not None else 0.8
    ax.bar([l - (w / 2 if attn is not None else 0) for l in result.layers], result.indirect_effect, width=w,
           color=colors, label="MLP")
    if attn is not None:
        ax.bar([l + w / 2 for l in attn.layers], attn.indirect_effect, width=w, color="#ff7f0e", label="attention")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("layer (centre of the restored window)")
    ax.set_ylabel("indirect effect on P(answer)")
    ax.set_title(f"{title}: causal trace, {result.n_facts} facts (chosen layer {result.chosen_layer})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
